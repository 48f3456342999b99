"""The Prefect flow's record in DVC: after each stage of a flow run, its ``dvc.lock`` entry.

Mechanism: *commit after run*. The flow runs a stage as a Prefect task (cached, retried,
observable), then commits that stage's lock entry with DVC's own Python API
(``Repo.commit(stage, force=True)``, what ``dvc commit -f STAGE`` does): DVC hashes the
stage's deps, params and outs as they are on disk, stores the outs in its cache
(hardlinks, ``.dvc/config``) and writes the entry ``dvc repro`` would have written. So
after ``make run`` (or a scheduled, data-triggered or jobs-API run), ``dvc status`` is
clean and ``dvc repro`` runs nothing. The alternative, running each stage through
``dvc repro STAGE`` inside its task, starts a ``dvc`` process per stage and puts DVC's
repo lock around the training run; committing costs one hash of the outputs (DVC's state
database keeps unchanged files' hashes), measured in ``tests/test_dvc.py`` and the README.

A run with ``--set`` overrides or another params file is not recorded: dvc.lock records
``params.yaml``'s values, which that run did not use (``dvc exp run -S`` is the way to run
changed params under DVC).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from . import stages

# .dvc/config of a project made by init_project (this repo's own .dvc/config has the same):
# hardlinked cache, the offline plots page, and the default remote `local` (a folder relative to .dvc/).
def _dvc_config(remote: str) -> dict[str, dict[str, object]]:
    return {"core": {"remote": "local"}, "cache": {"type": "reflink,hardlink,copy"},
            "plots": {"html_template": "../.tuneops/dvc-plots.html"}, "remote": {"local": {"url": remote}}}


# `dvc plots show|diff` page: DVC's own template loads Vega from a CDN; this one inlines the
# Vega / Vega-Lite / vega-embed bundle of the vl-convert-python package, so the HTML renders offline.
PLOTS_TEMPLATE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<script>%s</script>
<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""
DVCIGNORE = "__pycache__/\n*.pyc\n/.tuneops/\n/.venv/\n"


def is_project(root: Path) -> bool:
    """A DVC project with this pipeline: ``.dvc/`` and ``dvc.yaml`` in ``root``."""
    return (Path(root) / ".dvc").is_dir() and (Path(root) / "dvc.yaml").is_file()


def commit_stage(root: Path, name: str) -> float:
    """Write stage ``name``'s dvc.lock entry from what is on disk; returns the seconds it took."""
    from dvc.repo import Repo

    t0 = time.perf_counter()
    with contextlib.chdir(root), Repo(".") as repo:   # DVC resolves targets and its run cache against the cwd
        repo.commit(f"dvc.yaml:{name}", force=True)
    return time.perf_counter() - t0


def plots_template(root: Path) -> Path:
    """Write the offline ``dvc plots`` page template that ``.dvc/config`` names (once per project)."""
    path = Path(root) / ".tuneops" / "dvc-plots.html"
    if not path.is_file():
        import vl_convert

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(PLOTS_TEMPLATE % vl_convert.javascript_bundle(), encoding="utf-8")
        tmp.replace(path)
    return path


def init_project(root: Path, code_from: Path | None = None, scm: bool = False,
                 remote: str = "../.tuneops/dvc-remote") -> Path:
    """Make ``root`` (a folder with a params.yaml: a jobs-API working dir, a test project) a DVC
    project of this pipeline: ``dvc.yaml``, ``.dvcignore``, a copy of the stages' code deps (so
    the lock records the code that ran), ``dvc init`` (without git unless ``scm``) and the
    default remote ``local`` at ``remote`` (a URL, or a folder relative to ``.dvc/``)."""
    from dvc.repo import Repo

    root, src = Path(root), Path(code_from or stages.code_root())
    shutil.copyfile(src / "dvc.yaml", root / "dvc.yaml")
    (root / ".dvcignore").write_text(DVCIGNORE)
    for code in sorted({c for s in stages.STAGES for c in s.code}):
        dst = root / code
        if (src / code).is_dir():
            shutil.copytree(src / code, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / code, dst)
    if not (root / ".dvc").is_dir():
        if "://" not in remote and not Path(remote).is_absolute():   # DVC's config API reads paths from the cwd
            remote = str((root / ".dvc" / remote).resolve())
        with contextlib.closing(Repo.init(str(root), no_scm=not scm)) as repo, repo.config.edit() as conf:
            for section, values in _dvc_config(remote).items():
                conf[section].update(values)
    plots_template(root)
    return root
