"""A session's journal -> the same kind of scenario file ``virtsvc record`` writes.

The entries are the admin API's ``GetJournal`` answer in proto3 JSON (what ``virtsvc journal export``
fetches), so a test run's traffic against a sidecar becomes an editable scenario: every call a rule answered
or a real service answered becomes a rule as recorded; calls no rule answered (their answer was the near
miss, not the service's) are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from virtsvc.record.interactions import Interaction
from virtsvc.record.redact import Redaction
from virtsvc.record.rules import to_rules

__all__ = ["answered", "rules_from_journal"]


def answered(entry: dict[str, Any]) -> bool:
    """Whether a journal entry (proto3 JSON) is a call something answered: not a near miss or refusal."""
    return not entry.get("nearMiss") and not entry.get("near_miss") and bool(entry.get("method"))


def rules_from_journal(
    entries: Iterable[dict[str, Any]],
    *,
    redaction: Redaction | None = None,
    keep_latency: bool = False,
    fingerprint: Callable[[str], str | None] | None = None,
) -> list[dict[str, Any]]:
    """Rules answering the journal's answered calls as they were answered."""
    interactions = [Interaction.from_journal_entry(e) for e in entries if answered(e)]
    return to_rules(interactions, redaction=redaction, keep_latency=keep_latency, fingerprint=fingerprint)
