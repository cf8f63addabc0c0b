"""The store conformance suite: what every ``Store`` implementation promises the engine.

Parametrised over the implementations (``STORES``); a new store (a shared one on Redis) joins the list and
must pass the same tests. Only the protocol's operations are used here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from virtsvc.engine.store import MemoryStore, PutRule, RuleSet, Store
from virtsvc.scenarios.model import Location, Rule

StoreFactory = Callable[..., Store]

# Each implementation: the fixture giving its URL (None: nothing to start) and how to make one from it.
STORES: dict[str, tuple[str | None, Callable[[str | None, float], Store]]] = {
    "memory": (None, lambda url, ttl: MemoryStore(ttl=ttl)),
    "redis": ("redis_url", lambda url, ttl: _redis_store(url, ttl)),
    "redis-cluster": ("redis_cluster_url", lambda url, ttl: _redis_store(url, ttl)),
}


def _redis_store(url: str | None, ttl: float) -> Store:
    from virtsvc.engine.redis_store import RedisStore

    assert url is not None
    return RedisStore(url, ttl=ttl)


@pytest.fixture(params=sorted(STORES))
def make(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    fixture, factory = STORES[request.param]
    url = request.getfixturevalue(fixture) if fixture else None
    made: list[Store] = []

    def make_store(ttl: float = 3600.0) -> Store:
        store = factory(url, ttl)
        made.append(store)
        return store

    yield make_store
    for store in made:
        close = getattr(store, "close", None)
        if close is not None:
            close()


@pytest.fixture
def store(make: StoreFactory) -> Store:
    return make()


def _rule(key: str, method: str = "shop.v1.Inventory/Reserve", priority: int = 0) -> Rule:
    return Rule("shop", key, method, Location("<test>", 1), priority=priority)


# -- sessions ----------------------------------------------------------------------------------------


def test_a_session_is_made_on_first_use_and_found_after(store: Store) -> None:
    assert store.find("shop", "a") is None
    assert len(store) == 0
    session = store.session("shop", "a")
    assert (session.scenario, session.id, session.calls) == ("shop", "a", 0)
    found = store.find("shop", "a")
    assert found is not None and found.id == "a"
    assert store.keys() == [("shop", "a")]
    assert len(store) == 1


def test_sessions_are_keyed_by_scenario_and_id(store: Store) -> None:
    store.session("shop", "a").advance("seq:x")
    store.session("shop", "a").data["k"] = 1
    # Same id under another scenario, another id under the same scenario: nothing shared.
    for scenario, sid in (("other", "a"), ("shop", "b")):
        session = store.session(scenario, sid)
        assert session.advance("seq:x") == 0
        assert "k" not in session.data
    assert sorted(store.keys()) == [("other", "a"), ("shop", "a"), ("shop", "b")]


def test_touch_counts_the_calls_of_a_session(store: Store) -> None:
    session = store.session("shop", "a")
    assert [session.touch() for _ in range(3)] == [1, 2, 3]
    assert store.session("shop", "a").calls == 3


def test_take_claims_limited_uses_per_counter(store: Store) -> None:
    """Each claim is numbered (a backoff's attempt); 0 once used up."""
    session = store.session("shop", "a")
    assert [session.take("times:r1", 2) for _ in range(3)] == [1, 2, 0]
    assert session.take("times:r2", 1) == 1  # another counter is apart
    assert (session.used("times:r1"), session.used("times:r2"), session.used("times:none")) == (2, 1, 0)


def test_advance_gives_sequence_positions_in_order(store: Store) -> None:
    session = store.session("shop", "a")
    assert [session.advance("seq:r1") for _ in range(4)] == [0, 1, 2, 3]
    assert session.advance("seq:r2") == 0


def test_enter_and_leave_bound_the_calls_in_flight(store: Store) -> None:
    session = store.session("shop", "a")
    assert session.enter(2) and session.enter(2)
    assert not session.enter(2)
    session.leave()
    assert session.enter(2)


def test_take_is_exact_under_parallel_calls(store: Store) -> None:
    """Eight threads race for 100 uses: exactly 100 are granted, numbered 1 to 100 once each (times: never
    answers one call too many)."""
    session = store.session("shop", "a")
    granted: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        mine = [session.take("times:r", 100) for _ in range(40)]
        with lock:
            granted.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(n for n in granted if n) == list(range(1, 101))
    assert session.used("times:r") == 100


def test_the_random_generator_is_seeded_from_the_names(make: StoreFactory) -> None:
    """Two stores (two processes) draw the same values for the same session; another session differs."""
    first = make().session("shop", "a").rng.random()
    again = make().session("shop", "a").rng.random()
    other = make().session("shop", "b").rng.random()
    assert first == again
    assert other != first


# -- session rules -----------------------------------------------------------------------------------


def test_put_rules_replaces_the_session_rules_by_method_best_first(store: Store) -> None:
    low, high, other = _rule("r1"), _rule("r2", priority=5), _rule("r3", method="shop.v1.Inventory/GetItem")
    store.put_rules("shop", "a", RuleSet([low, high, other], source="text"))
    rules = store.session("shop", "a").rules
    assert rules.get("shop.v1.Inventory/Reserve") == (high, low)
    assert rules.get("shop.v1.Inventory/GetItem") == (other,)
    assert rules.source == "text"
    store.put_rules("shop", "a", RuleSet([other]))
    assert "shop.v1.Inventory/Reserve" not in store.session("shop", "a").rules


def test_put_rules_keeps_the_counters_of_rules_kept_by_key(store: Store) -> None:
    rule = _rule("session:0")
    store.put_rules("shop", "a", RuleSet([rule]))
    session = store.session("shop", "a")
    assert session.advance(rule.sequence_key) == 0
    store.put_rules("shop", "a", RuleSet([rule, _rule("session:1")]))
    assert store.session("shop", "a").advance(rule.sequence_key) == 1


def test_clear_rules_removes_them_and_their_counters_only(store: Store) -> None:
    rule = _rule("session:0")
    store.put_rules("shop", "a", RuleSet([rule, _rule("session:1")]))
    session = store.session("shop", "a")
    session.advance(rule.sequence_key)
    session.take(rule.times_key, 5)
    session.advance("seq:shop:scenario-rule")  # a scenario rule's counter: not the session rules'
    assert store.clear_rules("shop", "a") == 2
    session = store.session("shop", "a")
    assert len(session.rules) == 0
    assert (session.used(rule.sequence_key), session.used(rule.times_key)) == (0, 0)
    assert session.used("seq:shop:scenario-rule") == 1
    assert store.clear_rules("shop", "a") == 0
    assert store.clear_rules("shop", "never") == 0
    assert store.find("shop", "never") is None  # clearing does not make a session


def test_change_rules_puts_replaces_and_removes_by_id(store: Store) -> None:
    """What effects do: a put rule is tried first and hides the scenario's rule of its id; a put of the same
    id replaces it, its counters starting over; a remove hides rules by ref; a reset forgets it all."""
    first, second = _rule("effect:x"), _rule("effect:x", priority=3)
    store.change_rules("shop", "a", [("put", PutRule("x", "shop", {"id": "x"}, first))])
    session = store.session("shop", "a")
    assert session.rules.get("shop.v1.Inventory/Reserve") == (first,)
    assert session.rules.hidden == {"x"}
    assert session.take(first.times_key, 5) == 1
    store.change_rules(
        "shop",
        "a",
        [("put", PutRule("x", "shop", {"id": "x"}, second)), ("remove", "shop#3"), ("remove", "shop#3")],
    )
    session = store.session("shop", "a")
    assert session.rules.get("shop.v1.Inventory/Reserve") == (second,)
    assert session.rules.hidden == {"x", "shop#3"}
    assert session.used(second.times_key) == 0  # the same key, put again: counted anew
    store.change_rules("shop", "a", [("remove", "x")])
    assert store.session("shop", "a").rules.get("shop.v1.Inventory/Reserve") is None
    assert store.session("shop", "b").rules.hidden == frozenset()  # another session: untouched
    assert store.reset("shop", "a") is True
    assert store.session("shop", "a").rules.hidden == frozenset()


# -- dropping and its event --------------------------------------------------------------------------


def test_reset_drops_one_session_and_tells_the_listeners(store: Store) -> None:
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda scenario, sid: heard.append((scenario, sid)))
    store.session("shop", "a").advance("seq:r")
    store.session("shop", "b")
    assert store.reset("shop", "a") is True
    assert heard == [("shop", "a")]
    assert store.find("shop", "a") is None
    assert store.session("shop", "a").advance("seq:r") == 0  # a new session starts over
    assert store.reset("shop", "missing") is False
    assert heard == [("shop", "a")]
    assert store.find("shop", "b") is not None


def test_drop_scenario_drops_its_sessions_only(store: Store) -> None:
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda scenario, sid: heard.append((scenario, sid)))
    for scenario, sid in (("shop", "a"), ("shop", "b"), ("other", "a")):
        store.session(scenario, sid)
    assert store.drop_scenario("shop") == 2
    assert sorted(heard) == [("shop", "a"), ("shop", "b")]
    assert store.keys() == [("other", "a")]
    assert store.drop_scenario("shop") == 0


def test_idle_sessions_expire_after_the_ttl(make: StoreFactory) -> None:
    store = make(ttl=30.0)
    heard: list[tuple[str, str]] = []
    store.subscribe(lambda scenario, sid: heard.append((scenario, sid)))
    store.session("shop", "idle")
    assert store.expire(time.monotonic() + 10) == 0  # not idle long enough
    store.session("shop", "busy")
    assert store.expire(time.monotonic() + 31) == 2
    assert sorted(heard) == [("shop", "busy"), ("shop", "idle")]
    assert len(store) == 0


def test_a_touched_session_does_not_expire(make: StoreFactory) -> None:
    store = make(ttl=30.0)
    session = store.session("shop", "a")
    base = time.monotonic()
    session.touch()
    assert store.expire(base + 20) == 0
    assert store.find("shop", "a") is not None


def test_unsubscribed_and_raising_listeners(store: Store) -> None:
    """A listener that raises does not stop the others, nor the drop; an unsubscribed one hears nothing."""
    heard: list[str] = []

    def broken(scenario: str, sid: str) -> None:
        raise RuntimeError("listener bug")

    store.subscribe(broken)
    unsubscribe = store.subscribe(lambda scenario, sid: heard.append(f"gone:{sid}"))
    store.subscribe(lambda scenario, sid: heard.append(f"kept:{sid}"))
    store.session("shop", "a")
    assert store.reset("shop", "a") is True
    assert heard == ["gone:a", "kept:a"]
    unsubscribe()
    store.session("shop", "b")
    store.reset("shop", "b")
    assert heard == ["gone:a", "kept:a", "kept:b"]
    assert store.find("shop", "b") is None


def test_records_are_a_session_s_own_changes_in_first_change_order(store: Store) -> None:
    """put_record keeps each key where it was first changed (None removes); other sessions see nothing."""
    a = store.session("shop", "a")
    assert a.records() == {}
    a.put_record("items", "k:1", {"sku": "k:1", "n": 1})
    a.put_record("items", "b", {"sku": "b"})
    a.put_record("orders", "o-1", {"order_id": "o-1"})
    a.put_record("items", "k:1", {"sku": "k:1", "n": 2})
    a.put_record("items", "b", None)
    again = store.session("shop", "a").records()
    assert again == {
        "items": {"k:1": {"sku": "k:1", "n": 2}, "b": None},
        "orders": {"o-1": {"order_id": "o-1"}},
    }
    assert list(again["items"]) == ["k:1", "b"]
    assert store.session("shop", "other").records() == {}


def test_reset_drops_a_session_s_records(store: Store) -> None:
    """A reset session starts again from no changes."""
    store.session("shop", "a").put_record("items", "x", {"sku": "x"})
    assert store.reset("shop", "a")
    assert store.session("shop", "a").records() == {}
