"""Pools of realistic values by kind (``email``, ``city``, ``user_agent``...), drawn once from Faker.

A Faker call costs tens of microseconds, so each kind is drawn once into a pool of 256 values (from a Faker
seeded with a constant, so every process has the same pools) and a caller picks from it with its own seeded
``random.Random``: synthetic messages (:mod:`virtsvc.scenarios.synthetic`) and ``fake(kind)`` in templates.
"""

from __future__ import annotations

import datetime as _dt
import random
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["KINDS", "fake", "pool"]

_POOL = 256  # values drawn from Faker per kind
_UTC = _dt.timezone.utc


def _rfc3339(moment: _dt.datetime) -> str:
    return moment.astimezone(_UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


KINDS: dict[str, Callable[[Any], Any]] = {
    "email": lambda f: f.email(),
    "name": lambda f: f.name(),
    "first_name": lambda f: f.first_name(),
    "last_name": lambda f: f.last_name(),
    "user_name": lambda f: f.user_name(),
    "company": lambda f: f.company(),
    "phone": lambda f: f.phone_number(),
    "street": lambda f: f.street_address(),
    "city": lambda f: f.city(),
    "country": lambda f: f.country(),
    "country_code": lambda f: f.country_code(),
    "postcode": lambda f: f.postcode(),
    "currency_code": lambda f: f.currency_code(),
    "url": lambda f: f.url(),
    "title": lambda f: f.catch_phrase(),
    "sentence": lambda f: f.sentence(nb_words=6),
    "paragraph": lambda f: f.paragraph(nb_sentences=3),
    "word": lambda f: f.word(),
    "product": lambda f: f"{f.color_name()} {f.word()}".title(),
    "color": lambda f: f.color_name(),
    "ipv4": lambda f: f.ipv4(),
    "user_agent": lambda f: f.user_agent(),
    "latitude": lambda f: float(f.latitude()),
    "longitude": lambda f: float(f.longitude()),
    "date": lambda f: _rfc3339(f.date_time_between("-1y", "+1y", tzinfo=_UTC)),
    "past_date": lambda f: _rfc3339(f.date_time_between("-1y", "-1d", tzinfo=_UTC)),
    "future_date": lambda f: _rfc3339(f.date_time_between("+1d", "+1y", tzinfo=_UTC)),
    "iban": lambda f: f.iban(),
    "card": lambda f: f.credit_card_number(),
    "city_slug": lambda f: f.city().lower().replace(" ", "-"),
}

_pools: dict[str, tuple[Any, ...]] = {}
_pools_lock = threading.Lock()
_faker_instance: Any = None


def pool(kind: str) -> tuple[Any, ...]:
    """The pool of ``kind`` (a key of :data:`KINDS`), drawn on first use."""
    values = _pools.get(kind)
    if values is None:
        with _pools_lock:
            values = _pools.get(kind)
            if values is None:
                faker = _faker()
                faker.seed_instance(sum(map(ord, kind)))  # each pool the same in every process
                make = KINDS[kind]
                values = _pools[kind] = tuple(make(faker) for _ in range(_POOL))
    return values


def fake(rng: random.Random) -> Callable[[str], Any]:
    """``fake(kind)`` for templates: a value of ``kind`` drawn with ``rng`` (the session's)."""

    def fake_one(kind: str) -> Any:
        if kind not in KINDS:
            raise ValueError(f"fake(): unknown kind {kind!r} (kinds: {', '.join(sorted(KINDS))})")
        values = pool(kind)
        return values[int(rng.random() * len(values))]

    return fake_one


def _faker() -> Any:
    """One Faker for the process: making one costs ~20 ms, reseeding it nothing."""
    global _faker_instance
    if _faker_instance is None:
        from faker import Faker

        _faker_instance = Faker("en_US")
    return _faker_instance
