"""Method-selection memory planner: which fine-tuning method, ZeRO stage, batch and launcher fit.

Importable without torch; only ``Hardware.detect()`` imports it.
"""
from .cli import main, summary
from .goals import Goals, LoraSettings
from .hardware import Hardware
from .memory import Estimate, MemoryModelConstants, Setup, estimate
from .model import ModelSpec
from .rules import RULES, Plan, PlanError, explain, make_plan
from .table import load_table

__all__ = ["ModelSpec", "Hardware", "Goals", "LoraSettings", "Plan", "PlanError", "make_plan", "explain", "main",
           "summary", "MemoryModelConstants", "Setup", "Estimate", "estimate", "RULES", "load_table"]
