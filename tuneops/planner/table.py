"""The scenario/method table as typed data: ``scenario_table.yaml`` (properties, strategies,
scenarios) with the method rows from the method specs (``tuneops/training/methods.py``) and each
scenario's task head from the head specs (``tuneops/training/heads.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..training import heads
from ..training.methods import METHODS

TABLE_PATH = Path(__file__).with_name("scenario_table.yaml")


@dataclass(frozen=True)
class MethodRow:
    name: str
    kind: str               # "method" (choosable) or "strategy" (DeepSpeed/ZeRO)
    guide: str
    properties: tuple[str, ...]


@dataclass(frozen=True)
class ScenarioRow:
    name: str
    guide: str
    task_head: str


@dataclass(frozen=True)
class ScenarioTable:
    source: str
    properties: dict[str, str]
    methods: dict[str, MethodRow]
    scenarios: dict[str, ScenarioRow]

    def methods_with(self, prop: str) -> list[str]:
        """Choosable methods that have ``prop``, in table order."""
        return [m.name for m in self.methods.values() if m.kind == "method" and prop in m.properties]

    def has(self, method: str, prop: str) -> bool:
        return prop in self.methods[method].properties


def load_table(path: Path = TABLE_PATH) -> ScenarioTable:
    """Parse and check the table: every property used is declared. Not cached across registry
    changes: the method and head specs are read each time (the YAML file is parsed once)."""
    raw = _raw(path)
    props = dict(raw["properties"])
    methods = {m.name: MethodRow(m.name, "method", m.guide, m.properties) for m in METHODS.values()}
    for n, r in raw["methods"].items():
        if n in methods:
            raise ValueError(f"{path.name}: method {n}: a method's row is its spec (tuneops/training/methods.py)")
        methods[n] = MethodRow(n, r["kind"], r["guide"], tuple(r["properties"]))
    scenarios = {n: ScenarioRow(n, r["guide"], heads.for_format(n).name) for n, r in raw["scenarios"].items()}
    for m in methods.values():
        if m.kind not in ("method", "strategy") or set(m.properties) - set(props):
            raise ValueError(f"{path.name}: method {m.name}: bad kind or undeclared property")
    return ScenarioTable(raw["source"], props, methods, scenarios)


@lru_cache(maxsize=4)
def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())
