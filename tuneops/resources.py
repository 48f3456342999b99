"""Wall time and peak resident memory (RSS) per stage, for the flow and the CLI to print.

The process's peak (``VmHWM`` in ``/proc/self/status``) is reset before each stage by writing
``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so it reads the stage's own peak, not the
largest stage so far. Children (the torchrun launcher and its ranks, which it waits for) count
through ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak of the largest terminated child, which
cannot be reset, so a stage gets it only when it grew during that stage (then it is that stage's
child). Concurrent ranks are not summed: it is the largest one. Where ``/proc`` is missing (or
the reset is refused) a figure that cannot be attributed to the stage is ``None``, never a guess.
"""
from __future__ import annotations

import contextlib
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# ru_maxrss is in kilobytes on Linux, bytes on macOS
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


@dataclass
class Usage:
    """One stage (or the whole run): ``peak_rss_bytes`` is the larger of the process's own peak
    and ``children_peak_rss_bytes`` (the largest child that ended during it, if any)."""
    wall_s: float = 0.0
    peak_rss_bytes: int | None = None
    children_peak_rss_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "wall_s": round(self.wall_s, 3)}


def process_peak() -> int | None:
    """This process's peak RSS since start or the last ``reset_peak()`` (``VmHWM``), in bytes."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def children_peak() -> int | None:
    """Peak RSS of the largest terminated (waited-for) child process so far, in bytes."""
    try:
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    except (OSError, ValueError):
        return None
    return maxrss * _MAXRSS_UNIT if maxrss else None


def _grew(before: int | None, after: int | None) -> int | None:
    return after if after is not None and (before is None or after > before) else None


def _max(*values: int | None) -> int | None:
    return max((v for v in values if v is not None), default=None)


@contextlib.contextmanager
def measure() -> Iterator[Usage]:
    """``with measure() as usage:`` the block's wall time and peak RSS (filled in on exit, also
    when the block raises)."""
    usage = Usage()
    reset = reset_peak()
    own_before = None if reset else process_peak()   # no reset: only a new peak is this block's
    kids_before = children_peak()
    t0 = time.perf_counter()
    try:
        yield usage
    finally:
        usage.wall_s = time.perf_counter() - t0
        own = process_peak() if reset else _grew(own_before, process_peak())
        usage.children_peak_rss_bytes = _grew(kids_before, children_peak())
        usage.peak_rss_bytes = _max(own, usage.children_peak_rss_bytes)


def total(stages: dict[str, Usage], wall_s: float) -> Usage:
    """The whole run: its wall time and the largest peak of any stage."""
    return Usage(wall_s=wall_s, peak_rss_bytes=_max(*(u.peak_rss_bytes for u in stages.values())),
                 children_peak_rss_bytes=_max(*(u.children_peak_rss_bytes for u in stages.values())))


def summary(stages: dict[str, Usage], wall_s: float) -> dict[str, dict[str, Any]]:
    """``{stage: {wall_s, peak_rss_bytes, children_peak_rss_bytes}, ..., "total": {...}}`` (JSON-able)."""
    return {**{name: u.as_dict() for name, u in stages.items()}, "total": total(stages, wall_s).as_dict()}
