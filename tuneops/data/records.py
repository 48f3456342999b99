"""Reading records, before any checks: JSONL (and CSV / Parquet) files into numbered
rows, never raising on bad input.

Every problem names the file, line, field and rule: ``PATH:LINE: FIELD: RULE: message``.
The reader is built for hostile files, in bounded memory and time:

* read in binary, line by line, with a cap on a line's size (``max_record_bytes``): a
  longer line is skipped in 1 MiB pieces and reported, never held or parsed whole;
* a UTF-8 BOM and CRLF line ends are accepted; blank lines are not records;
* empty / blank-only files, a JSON array (whole file or pretty-printed), a binary file
  (NUL bytes in the first record, or a known binary signature) and UTF-16 are one
  file-level problem each;
* bracket depth is measured on the raw bytes before parsing (no recursion
  blow-up on 200k-deep nesting); parsing is strict (orjson): invalid UTF-8, NaN,
  Infinity, lone surrogates and out-of-range numbers are errors;
* at most ``max_problems`` problems are listed per file, then one summary line.

The per-format record checks live in ``formats.py`` (which imports this module, never the
reverse), with ``check_chat`` for callers of the original chat-only gate.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson

MAX_LINE_BYTES = 1024 * 1024     # default for validate.max_record_bytes
MAX_DEPTH = 64                    # JSON nesting levels allowed in one record
MAX_PROBLEMS = 1000               # problems listed per file before a summary line
RAW_KEEP = 2048                   # bytes of an unreadable line kept for the rejects file
BOM = b"\xef\xbb\xbf"
NUL = b"\x00"
BINARY_MAGIC = {
    b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"PAR1": "Parquet", b"%PDF": "PDF", b"\x89PNG": "PNG",
    b"\x7fELF": "ELF executable", b"SQLite format 3\x00": "SQLite", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
    b"7z\xbc\xaf": "7z", b"\x28\xb5\x2f\xfd": "zstd", b"\xff\xd8\xff": "JPEG",
}


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    field: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.rule}: {self.message}"


@dataclass
class Row:
    """One record as read: its line (1-based; Parquet: row number), the parsed object
    (None when unreadable), the raw bytes (no BOM / line end) and its problems."""
    line: int
    obj: Any = None
    raw: bytes = b""
    problems: list[Problem] = field(default_factory=list)


@dataclass
class FileRead:
    path: str
    kind: str                                   # jsonl | csv | parquet
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)   # file-level: nothing usable

    @property
    def ok(self) -> bool:
        return not self.problems


def file_kind(path: Path | str) -> str:
    suffix = Path(path).suffix.lower()
    return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "jsonl")


class RecordReader:
    """Iterate over a file's rows as they are read (bounded look-ahead); file-level
    problems collect in ``problems`` (iteration stops at one)."""

    def __init__(self, path: Path | str, max_record_bytes: int = MAX_LINE_BYTES, kind: str | None = None,
                 columns: tuple[str, ...] | None = None):
        self.path, self.cap, self.columns = str(path), max_record_bytes, columns
        self.kind = kind or file_kind(path)
        self.problems: list[Problem] = []
        self.count = 0

    def __iter__(self) -> Iterator[Row]:
        path, p = Path(self.path), self.path
        if not path.is_file():
            what = "not a regular file" if path.exists() else "file not found"
            self.problems.append(Problem(p, 0, "(file)", "exists", what))
            return
        readers = {"csv": lambda: _csv_rows(path, self.problems, self.cap),
                   "parquet": lambda: _parquet_rows(path, self.problems, self.columns)}
        rows = readers.get(self.kind, lambda: _jsonl_rows(path, self.problems, self.cap))()
        try:
            for row in rows:
                self.count += 1
                yield row
        except OSError as exc:
            self.problems.append(Problem(p, 0, "(file)", "read", f"cannot read file: {exc.strerror or exc}"))
        if not self.count and not self.problems:
            self.problems.append(Problem(p, 1, "(file)", "non_empty", "no records (file is empty or blank)"))


def read_records(path: Path | str, max_record_bytes: int = MAX_LINE_BYTES, kind: str | None = None,
                 columns: tuple[str, ...] | None = None) -> FileRead:
    """Read a JSONL / CSV / Parquet file into rows (never raises on bad content)."""
    reader = RecordReader(path, max_record_bytes, kind, columns)
    rows = list(reader)
    return FileRead(reader.path, reader.kind, rows, reader.problems)


# -- JSONL -----------------------------------------------------------------------------

def _lines(f: Any, cap: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes without line end or None when over ``cap``, size in bytes)."""
    no = 0
    while True:
        raw = f.readline(cap + 1)
        if not raw:
            return
        no += 1
        if len(raw) > cap and not raw.endswith(b"\n"):
            size = len(raw)
            while not raw.endswith(b"\n"):      # skip the rest of the line in bounded pieces
                raw = f.readline(1 << 20)
                if not raw:
                    break
                size += len(raw)
            size -= 2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0
            yield no, None, size
            continue
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        yield no, raw, len(raw)


def _binary_signature(head: bytes) -> str | None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text (expected UTF-8)"
    for magic, name in BINARY_MAGIC.items():
        if head.startswith(magic):
            return f"{name} data"
    return None


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """Maximum bracket depth of a JSON text, ignoring brackets inside strings (vectorised:
    no recursion, linear time, about 5 bytes of memory per bracket)."""
    import numpy as np

    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    step = np.zeros(256, dtype=np.int8)
    step[[91, 123]], step[[93, 125]] = 1, -1
    depth = np.cumsum(step[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int32)
    return int(depth.max(initial=0))


def decode_json_line(raw: bytes, max_depth: int = MAX_DEPTH) -> tuple[Any, tuple[str, str] | None]:
    """Parse one JSONL line: (object, None) or (None, (rule, message)). orjson is strict:
    UTF-8 is validated, NaN/Infinity, lone surrogates and out-of-range numbers are errors."""
    if raw.count(b"[") + raw.count(b"{") > max_depth:       # cheap test first, exact scan if needed
        depth = json_depth(raw)
        if depth > max_depth:
            return None, ("max_depth", f"JSON nested {depth} levels deep, limit {max_depth}")
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return None, ("utf8", f"invalid UTF-8 at byte {uexc.start}")
        return None, ("json", f"invalid JSON: {exc.msg} at column {exc.colno}")


def _jsonl_rows(path: Path, problems: list[Problem], cap: int) -> Iterator[Row]:
    p = str(path)
    with path.open("rb") as f:
        head = f.read(64)
        sig = _binary_signature(head)
        if sig:
            problems.append(Problem(p, 1, "(file)", "binary", f"file is {sig}, not JSONL"))
            return
        f.seek(0)
        first = True
        for no, raw, size in _lines(f, cap):
            if raw is None:
                row = Row(no)
                row.problems.append(Problem(p, no, "(line)", "max_record_bytes",
                                            f"record is {size} bytes, limit {cap} (validate.max_record_bytes)"))
                yield row
                first = False
                continue
            if no == 1 and raw.startswith(BOM):
                raw = raw[3:]
            stripped = raw.strip()
            if not stripped:
                continue
            if first:
                first = False
                nul = raw.find(NUL)
                if nul >= 0:
                    problems.append(Problem(p, no, "(file)", "binary",
                                                f"NUL byte at offset {nul}: binary file, not JSONL"))
                    return
                if stripped.startswith(b"["):
                    problems.append(Problem(p, no, "(file)", "jsonl",
                                                "JSON array: expected one object per line (JSONL)"))
                    return
                if stripped == b"{":
                    problems.append(Problem(p, no, "(file)", "jsonl",
                                                "pretty-printed JSON: expected one object per line (JSONL)"))
                    return
            obj, err = decode_json_line(raw)
            row = Row(no, obj, raw)
            if err:
                row.raw = raw[:RAW_KEEP]
                row.problems.append(Problem(p, no, "(line)", *err))
            yield row


# -- CSV and Parquet -----------------------------------------------------------------------

def _csv_rows(path: Path, problems: list[Problem], cap: int) -> Iterator[Row]:
    """A header row, then one record per row (a quoted field may span lines: a record's
    LINE is where it starts). Empty cells are absent fields; integer cells in
    ``answer_start`` are numbers."""
    p = str(path)
    with path.open("rb") as fb:
        sig = _binary_signature(fb.read(64))
        if sig or NUL in fb.read(4096):
            problems.append(Problem(p, 1, "(file)", "binary", f"file is {sig or 'binary'}, not CSV"))
            return
    csv.field_size_limit(cap)
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        start = 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                problems.append(Problem(p, start, "(file)", "csv", f"unreadable CSV: {exc}"))
                return
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                if len(set(header)) != len(header):
                    problems.append(Problem(p, line, "(header)", "csv", f"duplicate column names: {header}"))
                    return
                continue
            raw = ",".join(cells).encode("utf-8", "surrogateescape")
            row = Row(line, raw=raw[:RAW_KEEP])
            bad = next((i for i, c in enumerate(cells) if re.search("[\udc80-\udcff]", c)), None)
            if bad is not None:
                row.problems.append(Problem(p, line, "(line)", "utf8", f"invalid UTF-8 in column {bad + 1}"))
            elif len(cells) != len(header):
                row.problems.append(Problem(p, line, "(line)", "csv",
                                            f"{len(cells)} cells, header has {len(header)} columns"))
            else:
                row.obj = {k: _csv_value(k, v) for k, v in zip(header, cells) if v != ""}
            yield row


def _csv_value(key: str, value: str) -> Any:
    if key == "answer_start" and value.strip().isdigit():
        return int(value)
    return value


def _parquet_rows(path: Path, problems: list[Problem], columns: tuple[str, ...] | None) -> Iterator[Row]:
    """One record per row; LINE is the row number (1-based)."""
    p = str(path)
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(path))
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names] if columns else None
        no = 0
        for batch in pf.iter_batches(batch_size=4096, columns=cols):
            for rec in batch.to_pylist():
                no += 1
                obj = {k: v for k, v in rec.items() if v is not None}
                yield Row(no, obj, json.dumps(obj, ensure_ascii=False, default=str).encode()[:RAW_KEEP])
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types on corrupt files
        problems.append(Problem(p, 0, "(file)", "parquet", f"unreadable Parquet: {str(exc).splitlines()[0][:200]}"))


# -- problem lists ---------------------------------------------------------------------

def cap_problems(problems: list[Problem], limit: int = MAX_PROBLEMS) -> list[Problem]:
    """The first ``limit`` problems, then one summary line for the rest (per file)."""
    out: list[Problem] = []
    per_file: dict[str, int] = {}
    hidden: dict[str, int] = {}
    for q in problems:
        n = per_file.get(q.path, 0)
        per_file[q.path] = n + 1
        if n < limit:
            out.append(q)
        else:
            hidden[q.path] = hidden.get(q.path, 0) + 1
    for path, n in hidden.items():
        out.append(Problem(path, 0, "(file)", "max_problems", f"{n} more problems not shown (first {limit} listed)"))
    return out


# -- compatibility: the original chat-only helpers ---------------------------------------

def parse_jsonl(path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Decode each line; returns ((line, object), ...) and the problems."""
    read = read_records(path)
    rows = [(r.line, r.obj) for r in read.rows if not r.problems]
    problems = list(read.problems) + [q for r in read.rows for q in r.problems]
    return rows, problems
