"""The journal's bounds: per session and in all."""

from __future__ import annotations

import time

from virtsvc.contracts import Catalog
from virtsvc.engine.journal import Entry, Journal


def _entry(catalog: Catalog, session: str, n: int) -> Entry:
    spec = catalog.method("shop.v1.Inventory/Reserve")
    raw = spec.input_class(sku=f"{session}-{n}").SerializeToString()
    return Entry("s", session, spec, (), time.time(), [raw])


def test_ring_per_session(catalog: Catalog) -> None:
    """A session keeps its newest ``size`` entries."""
    journal = Journal(size=3)
    for n in range(5):
        journal.record(_entry(catalog, "a", n))
    assert [e.requests()[0]["sku"] for e in journal.entries("s", "a")] == ["a-2", "a-3", "a-4"]


def test_total_bound_drops_the_least_recently_active_session(catalog: Catalog) -> None:
    """Past ``max_entries`` the journal of the least recently active session goes first."""
    journal = Journal(size=10, max_entries=4)
    for n in range(3):
        journal.record(_entry(catalog, "a", n))
    journal.record(_entry(catalog, "b", 0))
    journal.record(_entry(catalog, "a", 3))  # a is active again: b is now the least recent
    assert [e.session for e in journal.entries()] == ["a", "a", "a", "a"]  # b went: 4 entries
    journal.record(_entry(catalog, "c", 0))  # 5 > 4: a, now the least recent, goes whole
    assert [e.requests()[0]["sku"] for e in journal.entries()] == ["c-0"]


def test_bound_holds_across_resets_and_full_rings(catalog: Catalog) -> None:
    """Entries already gone (ring overflow, a cleared session) are not counted against the bound."""
    journal = Journal(size=2, max_entries=5)
    for n in range(4):
        journal.record(_entry(catalog, "a", n))  # the ring keeps a-2, a-3
    journal.clear("s", "a")
    for n in range(6):
        journal.record(_entry(catalog, "b", n))
    assert [e.requests()[0]["sku"] for e in journal.entries("s", "b")] == ["b-4", "b-5"]
    for session in "cdefg":
        journal.record(_entry(catalog, session, 0))
    assert len(journal) == 5
    assert sorted(e.session for e in journal.entries()) == ["c", "d", "e", "f", "g"]
