"""Contract verification: do the scenarios still tell the truth about the real service?

``virtsvc verify`` replays each rule's concrete request (``examples:``, or a ``when.request`` made of
literals) against the real service, all four RPC kinds, and compares the real answer with the rule's:
the status code first, then the reply's shape (fields present, their types, enum values; decoded with the
target's own schema when it offers reflection), then, for rules that say ``verify: exact``, the values.
``replay`` calls the target, ``compare`` judges the answers, ``report`` writes text, JSON or JUnit.

Reads the contracts and scenarios stages only: a client of a real service, never a server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtsvc._lazy import facade

if TYPE_CHECKING:
    from virtsvc.verify.compare import RuleResult, verify_rules
    from virtsvc.verify.replay import Target, target_catalog
    from virtsvc.verify.report import REPORT_FORMATS, render

__all__ = ["REPORT_FORMATS", "RuleResult", "Target", "render", "target_catalog", "verify_rules"]

__getattr__, __dir__ = facade(
    __name__,
    {
        "RuleResult": "virtsvc.verify.compare",
        "verify_rules": "virtsvc.verify.compare",
        "Target": "virtsvc.verify.replay",
        "target_catalog": "virtsvc.verify.replay",
        "REPORT_FORMATS": "virtsvc.verify.report",
        "render": "virtsvc.verify.report",
    },
    globals(),
)
