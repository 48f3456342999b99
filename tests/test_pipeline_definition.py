"""dvc.yaml, the Prefect flow, the stage list and params.yaml must agree."""
from __future__ import annotations

import yaml

from tuneops import stages

from .conftest import REPO


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _paths(entries: list) -> list[str]:
    keys = []
    for e in entries or []:
        text = next(iter(e)) if isinstance(e, dict) else e
        assert text.startswith("${paths.") and text.endswith("}"), f"dvc.yaml must name path keys, got {text}"
        keys.append(text[len("${paths."):-1])
    return keys


def test_dvc_stages_match_stage_list_in_order():
    assert tuple(_dvc()) == stages.STAGE_NAMES


def test_each_dvc_stage_matches_its_spec():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for spec in stages.STAGES:
        d = _dvc()[spec.name]
        assert d["cmd"] == f"tuneops {spec.name}"
        assert tuple(d.get("params", ())) == spec.params
        assert tuple(_paths(d.get("deps"))) == spec.deps
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
            | set(stages.SERVICE_PARAMS))
    assert set(params) == read


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
