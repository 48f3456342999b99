"""The scenario/method table (``scenario_table.yaml``) as typed data."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

TABLE_PATH = Path(__file__).with_name("scenario_table.yaml")
TASK_HEADS = ("causal_lm", "sequence_classification", "token_classification")


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


@lru_cache(maxsize=1)
def load_table(path: Path = TABLE_PATH) -> ScenarioTable:
    """Parse and check the table: every property used is declared, every task head is known."""
    raw = yaml.safe_load(path.read_text())
    props = dict(raw["properties"])
    methods = {n: MethodRow(n, r["kind"], r["guide"], tuple(r["properties"])) for n, r in raw["methods"].items()}
    scenarios = {n: ScenarioRow(n, r["guide"], r["task_head"]) for n, r in raw["scenarios"].items()}
    for m in methods.values():
        if m.kind not in ("method", "strategy") or set(m.properties) - set(props):
            raise ValueError(f"{path.name}: method {m.name}: bad kind or undeclared property")
    for s in scenarios.values():
        if s.task_head not in TASK_HEADS:
            raise ValueError(f"{path.name}: scenario {s.name}: unknown task_head {s.task_head!r}")
    return ScenarioTable(raw["source"], props, methods, scenarios)
