"""Scenarios: files and scripts -> a compiled model. YAML with the line of every key (``yamltree``,
``located``), validation and compilation (``loader``), the Python ``Scenario`` builder (``builder``), the
keys a scenario may hold (``vocabulary``), the run-time model (``model``), answer strategies
(``answers``), matching (``matching``), templates (``templates``), proto field helpers (``fields``),
fast proto3 JSON (``protojson``) and recorded rules whose contract has changed (``staleness``).

Imports the contracts stage only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtsvc._lazy import facade

if TYPE_CHECKING:
    from virtsvc.scenarios.builder import RuleBuilder, Scenario, fail, status, step
    from virtsvc.scenarios.loader import check_paths, compile_rules, compile_text, load_scenarios
    from virtsvc.scenarios.model import CompiledScenario, Location, Rule
    from virtsvc.scenarios.staleness import StaleRule, stale_rules

__all__ = [
    "CompiledScenario",
    "Location",
    "Rule",
    "RuleBuilder",
    "Scenario",
    "StaleRule",
    "check_paths",
    "compile_rules",
    "compile_text",
    "fail",
    "load_scenarios",
    "stale_rules",
    "status",
    "step",
]

__getattr__, __dir__ = facade(
    __name__,
    {
        "RuleBuilder": "virtsvc.scenarios.builder",
        "Scenario": "virtsvc.scenarios.builder",
        "fail": "virtsvc.scenarios.builder",
        "status": "virtsvc.scenarios.builder",
        "step": "virtsvc.scenarios.builder",
        "check_paths": "virtsvc.scenarios.loader",
        "compile_rules": "virtsvc.scenarios.loader",
        "compile_text": "virtsvc.scenarios.loader",
        "load_scenarios": "virtsvc.scenarios.loader",
        "CompiledScenario": "virtsvc.scenarios.model",
        "Location": "virtsvc.scenarios.model",
        "Rule": "virtsvc.scenarios.model",
        "StaleRule": "virtsvc.scenarios.staleness",
        "stale_rules": "virtsvc.scenarios.staleness",
    },
    globals(),
)
