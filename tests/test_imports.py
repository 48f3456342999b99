"""The import graph: tasks/ and flows/ use tuneops/, never the reverse, except through the one
declared table (``tuneops.stages.ENTRY_POINTS``); no import cycles.

Every module's imports are read with ``ast``: top-level and function-level (lazy) imports alike,
and ``importlib.import_module`` targets (a string, or an f-string's constant prefix: every module
under it). The declared entry points are the late-bound way up (a stage command loads
``tasks.<stage>``, ``tuneops run`` loads ``flows.pipeline``, which imports ``tuneops.stages`` again):
they are checked to exist, and left out of the cycle check, which is about static imports.

Cycles are checked module by module (each ``.py``, a package's ``__init__`` being one), over
tuneops/, tasks/ and flows/, and between the three packages. Module level is where an import loop
runs code half-initialised; a coarser level (tuneops' subpackages) would count the params model
(``tuneops.config``) validating names against a registry in a subpackage (``tuneops.data``'s
tables) while another module of that subpackage reads params, which is layering, not a loop.
"""
from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

from tuneops import stages

from tests.conftest import REPO

PACKAGES = ("tuneops", "tasks", "flows")
UPWARD = ("tasks", "flows")          # what tuneops/ may reach only through stages.ENTRY_POINTS
DECLARED_IN = "tuneops.stages"

# Known cycles, each being removed on another branch of issue 31; nothing else may be added here.
# Remove an entry as soon as its cycle is gone (the test says so).
KNOWN_CYCLES: list[set[str]] = []   # none: a cycle that must stay a while is listed here, with why


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    out = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` lives in (``tuneops.data.FORMATS`` -> ``tuneops.data``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def imports_of(module: str, modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{"static": modules imported (anywhere in the file), "names": other strings that name a
    project module or file (``tasks.x``, ``flows/x.py:f``): a load by name}``."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    static: set[str | None] = set()
    names: set[str] = set()
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            static |= {_resolve(a.name, modules) for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] in PACKAGES:
                static |= {_resolve(f"{base}.{a.name}", modules) for a in node.names}
        elif isinstance(node, ast.Call) and node.args and \
                getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            target = node.args[0]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                static.add(_resolve(target.value, modules))
            elif isinstance(target, ast.JoinedStr) and target.values and isinstance(target.values[0], ast.Constant):
                prefix = str(target.values[0].value)       # import_module(f"tuneops.platforms.{name}")
                static |= {m for m in modules if m.startswith(prefix)}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value.strip()
            if text.split(".")[0].split("/")[0].split(":")[0] in UPWARD and len(text) > len(text.split(".")[0]):
                names.add(text)
    static.discard(None)
    static.discard(module)
    return {"static": static, "names": names}          # type: ignore[dict-item]


def graph(modules: dict[str, Path]) -> dict[str, dict[str, set[str]]]:
    return {m: imports_of(m, modules) for m in modules}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    try:
        for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def upward_imports(g: dict[str, dict[str, set[str]]], declared_in: str = DECLARED_IN) -> list[str]:
    """tuneops modules that import tasks/flows, or name them (outside the declared table's module)."""
    bad = []
    for module, found in sorted(g.items()):
        if module.split(".")[0] != "tuneops":
            continue
        for target in sorted(found["static"]):
            if target.split(".")[0] in UPWARD:
                bad.append(f"{module} imports {target}")
        if module != declared_in:
            bad += [f"{module} names {text!r}" for text in sorted(found["names"])]
    return bad


def module_cycles(g: dict[str, dict[str, set[str]]]) -> list[set[str]]:
    return cycles({m: found["static"] for m, found in g.items()})


def package_cycles(g: dict[str, dict[str, set[str]]]) -> list[set[str]]:
    edges: dict[str, set[str]] = {}
    for m, found in g.items():
        for t in found["static"]:
            if m.split(".")[0] != t.split(".")[0]:
                edges.setdefault(m.split(".")[0], set()).add(t.split(".")[0])
    return cycles(edges)


@pytest.fixture(scope="module")
def project_graph() -> dict[str, dict[str, set[str]]]:
    return graph(find_modules(REPO))


def test_tuneops_reaches_tasks_and_flows_only_through_the_entry_table(project_graph):
    assert upward_imports(project_graph) == []
    # the declared module holds the table and no import of them either (checked above); each
    # entry names a module of tasks/ or flows/ that defines the attribute
    modules = find_modules(REPO)
    for name, target in stages.ENTRY_POINTS.items():
        module, _, attr = target.partition(":")
        assert module.split(".")[0] in UPWARD, f"{name}: {target} is not in tasks/ or flows/"
        assert module in modules, f"{name}: {target}: no module {module}"
        tree = ast.parse(modules[module].read_text())
        assert any(getattr(n, "name", None) == attr or attr in {getattr(t, "id", None) for t in
                                                                getattr(n, "targets", [])}
                   for n in tree.body), f"{name}: {module} defines no {attr}"
    assert {stages.get(s).module for s in stages.STAGE_NAMES} <= {t.partition(":")[0]
                                                                   for t in stages.ENTRY_POINTS.values()}
    assert stages.entry_file("finetune") == "flows/pipeline.py:finetune"


def test_no_import_cycles_between_modules(project_graph):
    found = module_cycles(project_graph)
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles (lazy imports count): {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these known cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_no_import_cycles_between_packages(project_graph):
    assert package_cycles(project_graph) == []
    uses = {m.split(".")[0]: {t.split(".")[0] for t in f["static"]} - {m.split(".")[0]}
            for m, f in project_graph.items() if f["static"]}
    assert "tuneops" in uses.get("tasks", set()) and "tuneops" in uses.get("flows", set())


def test_the_checks_catch_an_upward_import_and_a_lazy_cycle(tmp_path):
    """The same checks on a small tree with what they must reject: a function-level import of a
    stage from tuneops, a string load of a flow, and a cycle closed by a lazy import."""
    files = {
        "tuneops/__init__.py": "",
        "tuneops/stages.py": 'ENTRY = {"x": "tasks.x:run"}\n',
        "tuneops/a.py": "from . import b\n",
        "tuneops/b.py": "def f():\n    from tuneops.a import g\n",
        "tuneops/c.py": ('"""Docstrings may name flows.pipeline."""\nimport importlib\n\n'
                         'def go():\n    from tasks import x\n    return importlib.import_module("flows.pipeline")\n'),
        "tuneops/d.py": 'ENTRYPOINT = "flows/pipeline.py:finetune"\n',
        "tasks/__init__.py": "", "tasks/x.py": "from tuneops import a\n",
        "flows/__init__.py": "", "flows/pipeline.py": "from tuneops import stages\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = graph(find_modules(tmp_path))
    assert upward_imports(g) == ["tuneops.c imports flows.pipeline", "tuneops.c imports tasks.x",
                                 "tuneops.c names 'flows.pipeline'", "tuneops.d names 'flows/pipeline.py:finetune'"]
    assert module_cycles(g) == [{"tuneops.a", "tuneops.b"}]
    assert package_cycles(g) == [{"tuneops", "tasks", "flows"}]


def test_only_tuneops_is_installed_into_site_packages():
    """tasks/ and flows/ are the project's source, loaded from its folder (stages.source_root),
    not top-level packages with generic names in site-packages."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["tuneops*"]
    assert stages.source_root() == REPO


def test_entry_points_load_from_the_source_root_when_not_on_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != REPO])
    for name in [m for m in sys.modules if m.split(".")[0] == "flows"]:
        monkeypatch.delitem(sys.modules, name)
    watch = stages.load_entry("watch")
    assert Path(sys.modules[watch.__module__].__file__).resolve() == REPO / "flows" / "watch.py"
    assert sys.path[0] == str(REPO)
