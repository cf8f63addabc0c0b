"""Recorded rules whose contract has since changed.

A rule written by ``virtsvc record`` carries ``contract:``, the fingerprint of its method's contract when
it was recorded (:mod:`virtsvc.contracts.fingerprint`). Against today's descriptors, a rule whose
fingerprint differs holds answers of a contract that no longer exists: ``virtsvc check`` reports it at
its ``file:line`` and ``virtsvc record --mode refresh`` re-records exactly those rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from virtsvc.contracts.catalog import Catalog
from virtsvc.contracts.fingerprint import spec_fingerprint
from virtsvc.errors import Problem
from virtsvc.scenarios.model import CompiledScenario, Rule

__all__ = ["StaleRule", "stale_rules"]


@dataclass(frozen=True)
class StaleRule:
    """A rule recorded against a contract that has since changed: what it was recorded against, and now."""

    rule: Rule
    recorded: str
    current: str

    @property
    def problem(self) -> Problem:
        """The ``file:line: message`` that ``virtsvc check`` prints."""
        return Problem(
            self.rule.location.file,
            self.rule.location.line,
            f"rule recorded against a contract that has since changed: {self.rule.method} "
            f"(recorded {self.recorded}, now {self.current}); "
            "re-record it with `virtsvc record --mode refresh`",
        )


def stale_rules(scenarios: Iterable[CompiledScenario], catalog: Catalog) -> list[StaleRule]:
    """The rules of ``scenarios`` with a ``contract:`` that differs from their method's fingerprint now,
    in file and line order. Rules without ``contract:`` (written by hand) are never stale."""
    found: list[StaleRule] = []
    current: dict[str, str] = {}
    for scenario in scenarios:
        for rule in scenario.rules:
            if rule.contract is None:
                continue
            spec = catalog.methods.get(rule.method)
            if spec is None:  # compiled against another catalog: the loader reports unknown methods
                continue
            now = current.get(rule.method)
            if now is None:
                now = current[rule.method] = spec_fingerprint(spec)
            if rule.contract != now:
                found.append(StaleRule(rule, rule.contract, now))
    found.sort(key=lambda s: (s.rule.location.file, s.rule.location.line))
    return found
