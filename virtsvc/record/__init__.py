"""Record and replay: real traffic (a recording proxy's journal, or a session's journal) -> scenario files.

``interactions`` reads calls from journal entries (in process, or the admin API's JournalEntry),
``rules`` turns them into scenario rules (exact matchers, sequences, redaction, contract fingerprints),
``writer`` writes them atomically, and ``recorder`` is ``virtsvc record``: passthrough mode plus a journal
subscriber.
"""

from __future__ import annotations

from virtsvc.record.export import rules_from_journal
from virtsvc.record.interactions import Interaction
from virtsvc.record.redact import Redaction
from virtsvc.record.rules import to_rules
from virtsvc.record.writer import read_scenario, write_scenario

__all__ = ["Interaction", "Redaction", "read_scenario", "rules_from_journal", "to_rules", "write_scenario"]
