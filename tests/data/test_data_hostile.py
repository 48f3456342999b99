"""`tuneops validate DATA --format F` on hostile files: each one is rejected with an exact
``PATH:LINE`` line (or accepted where valid), exit 1 / 0, never a traceback, and the
reader stays bounded in memory and time on a 10 MB line and 200k-deep nesting."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
import tracemalloc

import pytest

from tests.conftest import make_project

G = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
BIG = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}, {"role": "assistant", "content": "ok"}]})
DEEP = "[" * 200_000 + "]" * 200_000


def _g(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]})


# name -> (file bytes, expected stdout lines with {p} for the path, exit code)
HOSTILE = {
    "empty": (b"", ["{p}:1: (file): non_empty: no records (file is empty or blank)"], 1),
    "blank_only": (b"\n  \n\r\n\t\n", ["{p}:1: (file): non_empty: no records (file is empty or blank)"], 1),
    "truncated": ((G + "\n" + G[:30]).encode(),
                  ["{p}:2: (line): json: invalid JSON: unexpected end of data at column 31"], 1),
    "invalid_utf8": (G.encode() + b'\n{"messages": "\xff"}\n',
                     ["{p}:2: (line): utf8: invalid UTF-8 at byte 14"], 1),
    "binary": (bytes(range(256)) * 4000, ["{p}:1: (file): binary: NUL byte at offset 0: binary file, not JSONL"], 1),
    "gzip": (gzip.compress((G + "\n").encode() * 10), ["{p}:1: (file): binary: file is gzip data, not JSONL"], 1),
    "utf16": ((G + "\n").encode("utf-16"), ["{p}:1: (file): binary: file is UTF-16 text (expected UTF-8), not JSONL"], 1),
    "json_array": (f"[\n  {G},\n  {G}\n]\n".encode(),
                   ["{p}:1: (file): jsonl: JSON array: expected one object per line (JSONL)"], 1),
    "whole_file_array": (f"\n[{G}, {G}]".encode(),
                         ["{p}:2: (file): jsonl: JSON array: expected one object per line (JSONL)"], 1),
    "array_line": (f"{G}\n[1, 2]\n".encode(), ["{p}:2: (record): type: expected a JSON object, got list"], 1),
    "pretty_object": (b'{\n  "messages": []\n}\n',
                      ["{p}:1: (file): jsonl: pretty-printed JSON: expected one object per line (JSONL)"], 1),
    "deep_nesting": (f"{G}\n{DEEP}\n".encode(), ["{p}:2: (line): max_depth: JSON nested 200000 levels deep, limit 64"], 1),
    "ten_mb_record": (f"{G}\n{BIG}\n{_g(3)}\n".encode(),
                      [f"{{p}}:2: (line): max_record_bytes: record is {len(BIG)} bytes, limit 1048576 "
                       f"(validate.max_record_bytes)"], 1),
    "nan": (f'{G}\n{{"messages": NaN}}\n'.encode(),
            ["{p}:2: (line): json: invalid JSON: unexpected character, expected a JSON value at column 14"], 1),
    "lone_surrogate": (f'{G}\n{{"messages": "\\ud800"}}\n'.encode(),
                       ["{p}:2: (line): json: invalid JSON: no low surrogate in string at column 15"], 1),
    "crlf_and_bom": (b"\xef\xbb\xbf" + f"{G}\r\n{_g(2)}\r\n\r\n".encode(), [], 0),
}


@pytest.fixture(scope="module")
def project():
    return make_project("hostile", ("validate.min_rows=1",))


def _validate(project, path, capsys, fmt="chat") -> tuple[int, list[str], str]:
    from tuneops.cli import main

    rc = main(["--params", str(project / "params.yaml"), "validate", str(path), "--format", fmt])
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_gets_exact_lines(name, project, capsys):
    data, expected, code = HOSTILE[name]
    path = project / f"{name}.jsonl"
    path.write_bytes(data)
    rc, lines, err = _validate(project, path, capsys)
    assert lines == [e.format(p=path) for e in expected]
    assert rc == code and "Traceback" not in err


def test_problem_flood_is_capped_with_a_summary(project, capsys):
    path = project / "latin1.jsonl"
    path.write_bytes("\n".join(json.dumps({"messages": [{"role": "user", "content": f"café {i}"},
                                                        {"role": "assistant", "content": "ok"}]}, ensure_ascii=False)
                               for i in range(1500)).encode("latin-1"))
    rc, lines, _ = _validate(project, path, capsys)
    assert rc == 1 and len(lines) == 1001
    assert lines[0] == f"{path}:1: (line): utf8: invalid UTF-8 at byte 46"
    assert lines[-1] == f"{path}:0: (file): max_problems: 500 more problems not shown (first 1000 listed)"


def test_missing_file_and_directory(project, capsys):
    rc, lines, _ = _validate(project, project / "nope.jsonl", capsys)
    assert (rc, lines) == (1, [f"{project / 'nope.jsonl'}:0: (file): exists: file not found"])
    rc, lines, _ = _validate(project, project, capsys)
    assert (rc, lines) == (1, [f"{project}:0: (file): exists: not a regular file"])


def test_reader_is_bounded_in_memory_and_time(project):
    """A 10 MB line is skipped in 1 MiB pieces (never held whole) and 200k-deep nesting
    is measured without recursion."""
    from tuneops.data.records import read_records

    path = project / "monster.jsonl"
    path.write_text(f"{G}\n{BIG}\n{DEEP}\n{BIG}\n{_g(5)}\n")
    tracemalloc.start()
    t0 = time.perf_counter()
    read = read_records(path)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(r.line, [q.rule for q in r.problems]) for r in read.rows] == [
        (1, []), (2, ["max_record_bytes"]), (3, ["max_depth"]), (4, ["max_record_bytes"]), (5, [])]
    assert peak < 5 * 2**20, f"peak {peak / 2**20:.1f} MiB while reading a file with 10 MB lines"
    assert elapsed < 20, elapsed


def test_cli_process_never_shows_a_traceback(project):
    """The real process: exit codes and stderr for a hostile file, a valid one, and a bad flag."""
    bad, good = project / "cli-bad.jsonl", project / "cli-good.jsonl"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    good.write_text(f"{G}\n{_g(2)}\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "tuneops", *args], cwd=project, capture_output=True, text=True,
                              timeout=300)

    proc = run("validate", str(bad), "--format", "chat")
    assert proc.returncode == 1 and proc.stdout == f"{bad}:1: (file): binary: file is gzip data, not JSONL\n"
    assert "Traceback" not in proc.stderr
    proc = run("validate", str(good), "--format", "chat")
    assert proc.returncode == 0 and proc.stdout == "" and "OK: 2 records" in proc.stderr
    proc = run("validate", str(good), "--format", "yaml")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
