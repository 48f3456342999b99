"""A README command is a promise: every `tuneops ...` line of README.md, read from the README
itself (code blocks and inline code), is run as a user types it in a trained tiny project
(the shared flow run), or is listed below with the test that covers it. Each must exit with
the code the README implies and print no traceback. First, every subcommand on the default
params with its `--help`, and `tuneops plan` as is (it once failed on the default params)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tuneops import cli, stages

from tests.conftest import REPO

# Run elsewhere (expensive or needs servers), with the test that covers it.
COVERED_ELSEWHERE = {
    "tuneops train": "each stage runs as dvc.yaml's `tuneops <stage>` under dvc repro (test_dvc.py)",
    "tuneops optimize": "run by dvc repro in test_dvc.py; variants in test_optimize_onnx.py",
    "tuneops run": "the Prefect flow (test_flow.py); minilm scenarios in test_heads.py; ZeRO in test_training.py",
    "tuneops deploy": "needs a Prefect server: test_orchestration.py",
    "tuneops worker": "needs a Prefect server: test_orchestration.py",
    "tuneops watch": "needs a Prefect server: test_orchestration.py",
    "tuneops server start": "starts servers: test_orchestration.py",
    "tuneops api": "serves the jobs API: test_service.py",
    "tuneops serve": "serves until stopped: tests/inference/test_serve.py runs `tuneops serve FOLDER` as a user would",
    "tuneops api worker": "a Prefect worker: test_service.py",
    "tuneops classify": "needs a classifier export: test_optimize_onnx.py",
    "tuneops generate --model models:/ft-": "a jobs-API model: test_service.py",
    "tuneops generate \"How are you?\" --variant int8": "needs the cpu target's variants: test_optimize_onnx.py",
}
# Exit codes the README states for an example (default 0).
EXPECTED = {
    "tuneops train --set train.learning_rate=-1": 2,     # the README shows this error
    "tuneops server status": 3,                          # no server running
    "tuneops models promote default@3": 1,               # the tiny project has fewer versions
    "tuneops models rollback": 1,                        # ... and no earlier champion to go back to
}
# The README's registered-model name is params' register.model_name; the test project has its own.
PLACEHOLDER = re.compile(r"<|\.\.\.|\b[A-Z][A-Z_]{2,}\b|\[|path/to/")


def readme_commands() -> list[str]:
    """Every `tuneops ...` command of the README, in order, without comments and prompts;
    `a | b` alternatives (``tuneops server status | stop``) become one command each."""
    found: list[str] = []
    block = False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block = not block
            continue
        texts = [line.strip()] if block else re.findall(r"`(tuneops(?: [^`]*)?)`", line)
        for text in texts:
            text = re.split(r"\s+#", text.removeprefix("$ "))[0].strip().removesuffix("&").strip()
            if not re.match(r"^tuneops\s", text):           # a command, not the word `tuneops`
                continue
            if not block and re.fullmatch(r"tuneops( [a-z]+)+", text):
                text += " --help"                # prose naming a command (`tuneops data add`): its help
            head, _, alts = text.partition(" | ") if " | " in text and not PLACEHOLDER.search(text) else (text, "", "")
            found.append(head)
            if alts:
                found += [" ".join(head.split()[:-1] + [alt.strip()]) for alt in alts.split("|")]
    return list(dict.fromkeys(found))


def _covered(command: str) -> str | None:
    if command in EXPECTED or command.endswith("--help"):
        return None
    return next((why for prefix, why in COVERED_ELSEWHERE.items() if command.startswith(prefix)
                 and (prefix != "tuneops api" or command in ("tuneops api", "tuneops api serve"))), None)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy())


def _check(command: str, proc: subprocess.CompletedProcess, expected: int = 0) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, f"{command}: traceback\n{out[-3000:]}"
    assert proc.returncode == expected, f"{command}: exit {proc.returncode} (expected {expected})\n{out[-3000:]}"


@pytest.fixture(scope="module")
def project(flow_run) -> Path:
    root, state, _ = flow_run
    assert state.is_completed(), state
    if not (root / "tests").exists():
        (root / "tests").symlink_to(REPO / "tests")        # README paths like tests/fixtures/...
    return root


def test_the_readme_has_commands_and_each_is_run_or_covered():
    commands = readme_commands()
    assert "tuneops plan --json" in commands and any(c.startswith("tuneops data checkout") for c in commands)
    subcommands = {c.split()[1] for c in commands if len(c.split()) > 1 and not c.split()[1].startswith(("-", "<"))}
    documented = set(cli.COMMANDS) | {"plan"}
    assert subcommands <= documented, f"the README shows unknown commands {subcommands - documented}"
    missing = documented - subcommands - set(stages.STAGE_NAMES) - {"params"}
    assert not missing, f"commands the README never shows: {missing}"


def test_every_subcommand_answers_help_on_the_default_params(project):
    for command in sorted(cli.COMMANDS) + ["plan"]:
        _check(f"tuneops {command} --help", _run(["tuneops", command, "--help"], project))


def test_tuneops_plan_works_on_the_default_params(project):
    proc = _run(["tuneops", "plan"], project)
    _check("tuneops plan", proc)
    assert "plan for" in proc.stdout and "method" in proc.stdout


def test_every_readme_command_works_as_written(project, tmp_path):
    name = cli._config(cli.build_parser().parse_args(["--params", str(project / "params.yaml"), "params"])) \
        .register.model_name
    # the README's data-add example file: a slice of the project's own chat data
    rows = (project / "data/chat/train.jsonl").read_text().splitlines()[:30]
    (project / "my.jsonl").write_text("\n".join(rows) + "\n")
    held_out = (project / "data/chat/eval.jsonl").read_text().splitlines()[:8]
    (project / "my-eval.jsonl").write_text("\n".join(held_out) + "\n")
    params = (project / "params.yaml").read_text()
    _run(["tuneops", "api", "token", "revoke", "alice"], project)   # the README creates it (state is shared)
    ran, skipped = [], []
    try:
        for command in readme_commands():
            why = _covered(command)
            if why:
                skipped.append((command, why))
                continue
            if PLACEHOLDER.search(command):       # a syntax line (`tuneops lineage NAME@ALIAS ...`): its help
                words = [w for w in shlex.split(command) if not PLACEHOLDER.search(w) and "|" not in w][:3]
                words = [w for w in words if not w.startswith("-")]
                _check(command, _run([*words, "--help"], project))
                ran.append(command)
                continue
            argv = shlex.split(command.replace("tuneops-chat@", f"{name}@"))
            _check(command, _run(argv, project), EXPECTED.get(command, 0))
            ran.append(command)
    finally:
        (project / "params.yaml").write_text(params)
        (project / "my.jsonl").unlink(missing_ok=True)
        (project / "my-eval.jsonl").unlink(missing_ok=True)
        shutil.rmtree(project / "data" / "user", ignore_errors=True)
    print(f"README commands: {len(ran)} run, {len(skipped)} covered elsewhere")
    assert any(c.startswith("tuneops plan") for c in ran)
    assert len(ran) >= 20


def test_a_stage_ends_with_a_summary_json_on_request_and_quiet_hides_progress(project):
    import json

    proc = _run(["tuneops", "validate"], project)
    _check("tuneops validate", proc)
    assert re.fullmatch(r"validate: \d+\.\d s, peak RSS (\d+\.\d GiB|-)  train rows \d+, eval rows \d+, rejected \d+\n", proc.stdout), proc.stdout
    assert "validate: record checks" in proc.stderr                     # progress of a long step
    assert "Warning" not in proc.stderr, proc.stderr                    # third-party warnings out of view
    as_json = _run(["tuneops", "validate", "--json"], project)
    _check("tuneops validate --json", as_json)
    assert json.loads(as_json.stdout)["train_rows"] > 0
    quiet = _run(["tuneops", "-q", "validate"], project)
    _check("tuneops -q validate", quiet)
    assert "record checks" not in quiet.stderr
