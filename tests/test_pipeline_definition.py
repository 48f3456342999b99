"""dvc.yaml, the Prefect flow, the stage list and params.yaml must agree."""
from __future__ import annotations

import yaml

from tuneops import stages

from tests.conftest import REPO


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries: list) -> list[str]:
    keys = []
    for e in entries or []:
        text = next(iter(e)) if isinstance(e, dict) else e
        assert text.startswith("${paths.") and text.endswith("}"), f"dvc.yaml must name path keys, got {text}"
        keys.append(text[len("${paths."):-1])
    return keys


def _split_deps(entries: list) -> tuple[list, list]:
    """dvc.yaml deps: the ``${paths.*}`` inputs first, then the code deps (plain repo paths)."""
    keys = [e for e in entries or [] if str(e).startswith("${")]
    code = [e for e in entries or [] if not str(e).startswith("${")]
    assert list(entries or []) == keys + code, "dvc.yaml deps: path keys first, then code"
    return _paths(keys), code


def test_dvc_stages_match_stage_list_in_order():
    assert tuple(_dvc()) == stages.STAGE_NAMES


def test_each_dvc_stage_matches_its_spec():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for spec in stages.STAGES:
        d = _dvc()[spec.name]
        assert d["cmd"] == f"tuneops {spec.name}"
        assert tuple(d.get("params", ())) == spec.params
        keys, code = _split_deps(d.get("deps"))
        assert tuple(keys) == spec.deps
        assert tuple(code) == spec.code, f"{spec.name}: dvc.yaml code deps differ from tuneops/stages.py"
        assert tuple(_paths(d.get("outs"))) == spec.outs + spec.uncached_outs
        for key in spec.params + spec.deps + spec.outs:
            node = params if "." in key or key in params else params["paths"]
            for part in key.split("."):
                assert part in node, f"{spec.name}: {key} is not in params.yaml"
                node = node[part]


def test_every_stage_input_is_produced_upstream():
    produced: set[str] = set()
    for spec in stages.STAGES:
        assert set(spec.deps) <= produced, f"{spec.name} depends on {set(spec.deps) - produced}"
        produced |= set(spec.outs) | set(spec.uncached_outs)


def test_every_params_section_is_read_by_a_stage():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    read = ({p.split(".")[0] for s in stages.STAGES for p in s.params} | {"paths"} | set(stages.ORCHESTRATION_PARAMS)
            | set(stages.SERVICE_PARAMS) | set(stages.SERVE_PARAMS) | set(stages.PLATFORM_PARAMS))
    assert set(params) == read


def test_platform_params_are_read():
    from tuneops.orchestrate import deploy
    from tuneops import platforms
    from tuneops.platforms import azureml, kaito

    sources = "".join(open(m.__file__).read() for m in (platforms, azureml, kaito, deploy))
    params = yaml.safe_load((REPO / "params.yaml").read_text())["platforms"]
    keys = [f"platforms.{k}" for k in params if k not in ("kaito", "azureml")]
    keys += [f"k.{k}" for k in params["kaito"]] + [f"a.{k}" for k in params["azureml"]]
    for key in keys:
        assert key in sources, f"{key} is never read"


def test_service_params_are_read_by_the_jobs_api():
    from tuneops.service import app, jobs

    sources = "".join(open(m.__file__).read() for m in (app, jobs))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in stages.SERVICE_PARAMS:
        for key in params[section]:
            assert f"service.{key}" in sources or f"s.{key}" in sources, f"{section}.{key} is never read"


def test_orchestration_params_are_read_by_the_flow_and_cli():
    """`orchestrate` is not a stage's input (it does not change results) but every key is used."""
    from tuneops.orchestrate import caching, deploy, lock, server, watch

    sources = "".join(open(m.__file__).read() for m in (caching, deploy, lock, server, watch))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in stages.ORCHESTRATION_PARAMS:
        for key in params[section]:
            assert f"o.{key}" in sources or f"orchestrate.{key}" in sources, f"{section}.{key} is never read"


def test_flow_wraps_every_stage_in_order():
    from flows import pipeline

    assert tuple(pipeline.TASKS) == stages.STAGE_NAMES
    for spec in stages.STAGES:
        assert pipeline.TASKS[spec.name].fn is spec.load()


def _module_file(module: str):
    path = REPO / (module.replace(".", "/") + ".py")
    if path.is_file():
        return path
    init = REPO / module.replace(".", "/") / "__init__.py"
    return init if init.is_file() else None


def _imports(module: str) -> set[str]:
    """Project modules ``module`` imports anywhere in its source (top level and inside functions)."""
    import ast

    path = _module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] in ("tuneops", "tasks"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("tuneops", "tasks")}
    return {m for m in found if _module_file(m)}


def test_code_deps_cover_every_module_a_stage_runs():
    """Each stage's code deps (dvc.yaml and the Prefect cache) cover every project module its
    tasks/ module imports, transitively, except the shared plumbing: a change to any of them
    makes the stage stale in both runners. What the plumbing itself imports is not followed:
    config checks names against the spec registries (methods, heads, sources, formats,
    scenarios) for every stage; a stage that runs a registry imports it itself."""
    for spec in stages.STAGES:
        seen, todo = set(), [spec.module]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                if _module_file(module).relative_to(REPO).as_posix() not in stages.PLUMBING:
                    todo += sorted(_imports(module) - seen)
        for module in sorted(seen):
            rel = _module_file(module).relative_to(REPO).as_posix()
            if rel in stages.PLUMBING or (rel.endswith("__init__.py") and module != spec.module):
                continue            # plumbing; a package's __init__ (re-exports) is covered where it matters
            assert any(rel == c or rel.startswith(c.rstrip("/") + "/") for c in spec.code), \
                f"{spec.name} runs {rel} (via {spec.module}) but its code deps do not list it"
        for c in spec.code:
            assert (REPO / c).exists(), f"{spec.name}: code dep {c} does not exist"


def test_dvc_metrics_and_plots_are_stage_outputs():
    """`dvc metrics`/`dvc plots` read files inside the stages' outputs (train, evaluate, optimize)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outs = {f"${{paths.{o}}}" for s in stages.STAGES for o in s.outs}
    metrics = dvc["metrics"]
    plots = [next(iter(p.values())) for p in dvc["plots"]]
    files = list(metrics) + [f for p in plots for f in p["y"]]
    assert {m.split("/")[0] for m in metrics} == {"${paths.train_dir}", "${paths.evaluate_dir}",
                                                   "${paths.optimize_dir}"}
    for f in files:
        assert f.split("/")[0] in outs, f"{f} is not inside a stage output"
    assert [p["x"] for p in plots] == ["step", "value", "size_mb"]


# -- stages read exactly what they declare ---------------------------------------------------

CONFIG_ATTRS = {"path", "root", "raw", "source", "state_dir", "sections_hash", "section", "view"}  # not params


def _cfg_reads(path) -> set[str]:
    """Params a module reads through a name ``cfg``: ``cfg.a.b`` -> ``a.b``, ``cfg.section("a")`` -> ``a``."""
    import ast

    reads = set()
    for node in ast.walk(ast.parse(path.read_text())):
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.insert(0, cur.attr)
            cur = cur.value
        if not (isinstance(cur, ast.Name) and cur.id == "cfg" and chain):
            continue
        if chain[0] == "section" and isinstance(node, ast.Attribute):
            continue                                    # the call below gives its argument
        if chain[0] not in CONFIG_ATTRS:
            reads.add(".".join(chain))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "section" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "cfg":
            reads.add(node.args[0].value)
    return reads


def test_declared_params_are_distinct_and_none_inside_another():
    for spec in stages.STAGES:
        assert len(set(spec.params)) == len(spec.params), spec.name
        for key in spec.params:
            inside = [d for d in spec.params if key != d and key.startswith(d + ".")]
            assert not inside, f"{spec.name}: {key} is already declared by {inside}"
            assert key.split(".")[0] != "paths", f"{spec.name}: paths are deps/outs, not params"


def test_each_stage_module_reads_only_what_its_spec_declares():
    """What a stage's own module reads through ``cfg`` is declared (the pipeline tests run every
    stage on its view, which also catches the reads in the tuneops modules it calls)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for spec in stages.STAGES:
        reads = _cfg_reads(_module_file(spec.module))
        assert reads, f"{spec.name}: no params read found in {spec.module} (the scan is broken)"
        for key in sorted(reads):
            assert key.split(".")[0] in params, f"{spec.module} reads cfg.{key}: not a params section"
            covered = any(key == d or key.startswith(d + ".") for d in spec.params)
            partly = any(d.startswith(key + ".") for d in spec.params)
            assert covered or partly, f"{spec.module} reads {key} but {spec.name} declares only {spec.params}"


def test_a_stage_view_refuses_an_undeclared_read_and_names_the_declaration(tmp_path):
    import pytest

    from tuneops.config import ConfigView, UndeclaredParam, load_config

    cfg = load_config(REPO / "params.yaml")
    view = stages.StageSpec("demo", "", params=("register", "tracking", "model.max_seq_len")).view(cfg)
    assert isinstance(view, ConfigView)
    assert view.register.model_name == cfg.register.model_name and view.model.max_seq_len == cfg.model.max_seq_len
    assert view.path("train_dir") == cfg.path("train_dir") and view.state_dir == cfg.state_dir
    assert view.section("tracking") == cfg.section("tracking")
    assert view.sections_hash() == cfg.sections_hash() and view.raw == cfg.raw     # provenance
    with pytest.raises(UndeclaredParam, match=r"^demo reads evaluate\.max_new_tokens but declares only register, "
                                              r"tracking, model\.max_seq_len \(tuneops/stages\.py\)$"):
        view.evaluate.max_new_tokens
    for read in (lambda: view.model.source, lambda: view.section("model"), lambda: view.model.model_dump(),
                 lambda: getattr(view, "validate", None).min_rows, lambda: view.params.serve.port):
        with pytest.raises(UndeclaredParam):
            read()
    with pytest.raises(AttributeError):
        view.model.no_such_key


def test_every_runner_hands_the_stage_its_view(monkeypatch):
    """``StageSpec.load`` (what the CLI, the flow's tasks and the tests call) gives the stage its view."""
    import importlib

    from tuneops.config import ConfigView, load_config

    cfg = load_config(REPO / "params.yaml")
    seen = {}
    module = importlib.import_module("tasks.select")
    spec = stages.get("select")
    assert spec.load() is spec.load()                   # one function per stage (the flow's task wraps it)
    monkeypatch.setattr(module, "run", lambda c: seen.setdefault("cfg", c))
    stages._viewed_run.__wrapped__(spec.name)(cfg)      # what load() builds, around the patched run
    assert isinstance(seen["cfg"], ConfigView) and seen["cfg"].declared == spec.params
