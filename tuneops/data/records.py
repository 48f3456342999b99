"""Record-level parsing and checks for chat JSONL, before Great Expectations sees the data.

Every problem names the file, line, field and rule: ``PATH:LINE: FIELD: RULE: message``.
The reader never raises on bad input (bad JSON, bad UTF-8, a non-object line): it
reports a problem for that line and goes on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    field: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.rule}: {self.message}"


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line; accepts CRLF and a UTF-8 BOM."""
    with Path(path).open("rb") as f:
        for no, raw in enumerate(f, start=1):
            if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.strip():
                yield no, raw


def parse_jsonl(path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Decode each line; returns ((line, object), ...) and the lines that failed."""
    rows: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    p = str(path)
    for no, raw in iter_lines(path):
        if len(raw) > MAX_LINE_BYTES:
            problems.append(Problem(p, no, "(line)", "max_line_bytes", f"line is {len(raw)} bytes, limit {MAX_LINE_BYTES}"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(p, no, "(line)", "utf8", f"invalid UTF-8 at byte {exc.start}"))
            continue
        try:
            obj = json.loads(text)
        except RecursionError:
            problems.append(Problem(p, no, "(line)", "json", "JSON nested too deeply"))
            continue
        except json.JSONDecodeError as exc:
            problems.append(Problem(p, no, "(line)", "json", f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        rows.append((no, obj))
    return rows, problems


def check_chat(path: str, line: int, obj: Any) -> list[Problem]:
    """Schema, roles and content of one chat record (OpenAI/Azure fine-tuning format)."""
    def bad(field: str, rule: str, msg: str) -> Problem:
        return Problem(path, line, field, rule, msg)

    if not isinstance(obj, dict):
        return [bad("(record)", "type", f"expected a JSON object, got {type(obj).__name__}")]
    msgs = obj.get("messages")
    if msgs is None:
        return [bad("messages", "required", "missing 'messages'")]
    if not isinstance(msgs, list) or not msgs:
        return [bad("messages", "type", "'messages' must be a non-empty list")]
    out: list[Problem] = []
    assistant_ok = False
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            out.append(bad(f, "type", "each message must be an object"))
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            out.append(bad(f"{f}.role", "enum", f"role must be one of {', '.join(ROLES)} (got {role!r})"))
        if not isinstance(content, str):
            out.append(bad(f"{f}.content", "type", "content must be a string"))
        elif not content.strip():
            out.append(bad(f"{f}.content", "non_empty", "content is empty or whitespace"))
        elif role == "assistant":
            assistant_ok = True
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            out.append(bad(f"{f}.weight", "enum", "weight is allowed on assistant turns only, as 0 or 1"))
        if role == "system" and i != 0:
            out.append(bad(f"{f}.role", "order", "a system message may only come first"))
    if not assistant_ok:
        out.append(bad("messages", "assistant_turn", "needs at least one assistant turn with non-empty content"))
    return out
