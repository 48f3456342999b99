"""Training hardware: detected (torch.cuda, else host RAM and cores) or declared.

All sizes are GiB (2**30 bytes), the unit ``nvidia-smi`` and ``torch.cuda`` report. A machine
without GPUs is one training "device" whose memory is host RAM.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

GIB = 2**30
_KEYS = ("gpus", "gpu_memory_gb", "host_ram_gb", "nodes", "cpu_processes")


@dataclass(frozen=True)
class Hardware:
    """``gpus`` is GPUs per node; ``bf16`` says whether the GPUs support bfloat16 (Ampere+);
    ``cpu_processes`` is how many training processes share a CPU-only node (gloo data
    parallelism; each gets ``host_ram_gb / cpu_processes``)."""

    gpus: int = 0
    gpu_memory_gb: float | None = None
    host_ram_gb: float = 24.0
    nodes: int = 1
    cpu_cores: int = 2
    bf16: bool = True
    cpu_processes: int = 1

    def __post_init__(self) -> None:
        if self.gpus < 0 or self.nodes < 1 or self.host_ram_gb <= 0 or self.cpu_cores < 1 or self.cpu_processes < 1:
            raise ValueError(f"invalid hardware: {self}")
        if self.gpus and not (self.gpu_memory_gb and self.gpu_memory_gb > 0):
            raise ValueError("select.hardware.gpu_memory_gb: required (> 0) when gpus > 0")

    @property
    def is_cpu(self) -> bool:
        return self.gpus == 0

    @property
    def nproc_per_node(self) -> int:
        return self.gpus if self.gpus else self.cpu_processes

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nodes

    @property
    def device_memory_gb(self) -> float:
        """Memory of one training device: a GPU, or host RAM when training on CPU."""
        return float(self.gpu_memory_gb) if self.gpus else self.host_ram_gb / self.cpu_processes

    @classmethod
    def detect(cls) -> "Hardware":
        """GPUs via torch.cuda (imported lazily; smallest card counts), else CPU only."""
        ram, cores = _host_ram_gb(), len(os.sched_getaffinity(0))
        try:
            import torch
        except ImportError:
            return cls(host_ram_gb=ram, cpu_cores=cores)
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return cls(host_ram_gb=ram, cpu_cores=cores)
        n = torch.cuda.device_count()
        mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / GIB
        return cls(gpus=n, gpu_memory_gb=round(mem, 2), host_ram_gb=ram, cpu_cores=cores,
                   bf16=torch.cuda.is_bf16_supported())

    @classmethod
    def from_params(cls, d: dict[str, Any]) -> "Hardware":
        """``select.hardware``: each key a number or ``"auto"`` (detected); declared values win."""
        unknown = set(d) - set(_KEYS)
        if unknown:
            raise ValueError(f"select.hardware.{sorted(unknown)[0]}: unknown key (known: {', '.join(_KEYS)})")
        for key, value in d.items():
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"select.hardware.{key}: must be a number or 'auto' (got {value!r})")
        for key in ("gpus", "nodes", "cpu_processes"):
            if isinstance(d.get(key), float):
                raise ValueError(f"select.hardware.{key}: must be an integer (got {d[key]!r})")
        declared = {k: v for k, v in d.items() if v != "auto"}
        if declared.get("gpus") == 0:
            declared["gpu_memory_gb"] = None
        detect = any(k not in declared for k in ("gpus", "gpu_memory_gb", "host_ram_gb"))
        hw = cls.detect() if detect else cls(cpu_cores=len(os.sched_getaffinity(0)))
        if declared.get("gpus", 0) > 0 and hw.gpu_memory_gb is None and "gpu_memory_gb" not in declared:
            raise ValueError("select.hardware.gpu_memory_gb: 'auto' but no GPU detected; declare it")
        return replace(hw, **declared)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "world_size": self.world_size,
                "device_memory_gb": self.device_memory_gb, "device": "cpu" if self.is_cpu else "cuda"}


def _host_ram_gb() -> float:
    """Total host RAM: psutil if installed, else /proc/meminfo (kB)."""
    try:
        import psutil
        return round(psutil.virtual_memory().total / GIB, 2)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / GIB, 2)
    raise RuntimeError("cannot determine host RAM")
