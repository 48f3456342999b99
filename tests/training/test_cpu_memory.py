"""CPU training's heap cap (``tuneops/training/loop.py cap_heap_retention``, ``train.cpu_mmap_threshold``):
freed activations go back to the OS. Each case runs in a fresh interpreter (the setting is
process-wide): after a large block was freed (which raises glibc's dynamic mmap threshold above the
activations' size), 64 blocks of 4 MiB are allocated interleaved with 64 that stay alive, and the
first 64 are freed. Without the cap they are holes in the heap that glibc keeps resident; with it
each was its own mapping and is unmapped at once."""
from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import re, sys, torch
from tuneops.training.loop import cap_heap_retention

def rss_mib():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

applied = cap_heap_retention(int(sys.argv[1]))
big = torch.ones(4 * 2**20)          # 16 MiB, freed: glibc's dynamic threshold rises past 4 MiB
del big
pairs = [(torch.ones(2**20), torch.ones(2**20)) for _ in range(64)]   # 2 x 64 x 4 MiB, touched
before = rss_mib()
keep = [b for _, b in pairs]
del pairs
print(applied, round(before - rss_mib()))
"""


def _freed_mib(threshold: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(threshold)], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_cap_returns_freed_activations_to_the_os():
    applied, freed = _freed_mib(65536)
    assert applied and freed >= 200, freed          # ~256 MiB unmapped
    applied, kept = _freed_mib(0)                   # glibc's default: the holes stay resident
    assert not applied and kept < 64, kept
