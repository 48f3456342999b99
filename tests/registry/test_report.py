"""The run report: one self-contained HTML file per run, saved locally and logged to
MLflow, rendered by headless Chromium (Debian `chromium`) with no console messages;
the screenshot is kept as a test artifact (.tuneops/pytest/artifacts/report.png)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_ROOT

ARTIFACTS = TEST_ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make test-deps)")


def headless(page: Path, screenshot: Path) -> tuple[str, list[str]]:
    """Render ``page`` offline; returns (serialized DOM, console messages)."""
    profile = TEST_ROOT / "chromium-profile"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-extensions", f"--user-data-dir={profile}",
            "--enable-logging=stderr", "--v=0", "--window-size=1100,2600"]
    shot = subprocess.run([*base, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, text=True,
                          timeout=120)
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in (shot.stderr + dom.stderr).splitlines() if ":CONSOLE" in line]
    return dom.stdout, console


@pytest.fixture(scope="module")
def report_page(stage, tiny_cfg) -> Path:
    out = stage("register")
    return Path(out["report"])


def test_report_is_self_contained_and_logged_to_mlflow(report_page, stage, tiny_cfg):
    import mlflow

    html = report_page.read_text()
    for section in ("validation", "plan", "training", "evaluation", "variants", "lineage"):
        assert f'id="{section}"' in html
    assert "<svg" in html and "<polyline" in html                  # the loss curve, inline
    assert not re.search(r"<(script|link|img|iframe)\b", html)      # nothing to fetch, nothing to run
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    reg = stage("register")
    assert reg["tags"]["data.train.md5"] in html and reg["mlflow_run_id"] in html
    ev = stage("evaluate")
    assert f"{ev['base_perplexity']:.4f}" in html and f"{ev['finetuned_perplexity']:.4f}" in html
    files = [f.path for f in mlflow.MlflowClient().list_artifacts(reg["mlflow_run_id"], "report")]
    assert files == ["report/report.html"]


@needs_chromium
def test_report_renders_in_headless_chromium_without_console_errors(report_page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    dom, console = headless(report_page, screenshot)
    assert console == []
    assert 'id="loss-curve"' in dom and "Evaluation" in dom and "Lineage" in dom
    assert screenshot.is_file() and screenshot.stat().st_size > 20_000   # a real page, not a blank one


@needs_chromium
def test_console_check_catches_a_broken_page(tmp_path):
    """The console check can fail: a page with a script error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    _, console = headless(bad, tmp_path / "bad.png")
    assert any("undefinedFunction" in line for line in console)
