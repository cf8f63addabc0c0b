"""Data sets: a scenario's ``data:`` collections of records, shared by its rules within a session.

A collection is a list of records (JSON mappings) found by a key field, so ``ListItems``, ``GetItem`` and
``GetOrder`` answer from one set of facts and agree with one another::

    data:
      items:                                          # a list of records, found by their "id"...
        - {id: it-1, title: Lamp}
      orders: {key: order_id, type: shop.v1.Order, records: [...]}     # ...or with options
      stock: {key: sku, $generate: {type: shop.v1.Item, count: 20, seed: 3}}

Compiled once at load (:mod:`virtsvc.scenarios.datasets`) into immutable :class:`Collection` objects (a
``type:`` checks each record and makes it read like a request: proto or JSON field names, unset fields at
their defaults). Per session, a
:class:`SessionData` lays the session's own changes (a Python handler's ``put`` and ``remove``, kept by the
session store) over the initial records; dropping the session (a reset) drops its changes, so the initial
data come back. Templates read a session's data as ``data``; handlers through ``virtsvc.data()``.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from jinja2.sandbox import unsafe

from virtsvc import _text
from virtsvc.errors import ConversionError, Refusal
from virtsvc.scenarios.fields import fill_message, make_view, message_class
from virtsvc.scenarios.model import Location, to_json

if TYPE_CHECKING:
    pass

__all__ = [
    "COLLECTION_KEYS",
    "DATA_GENERATE_KEYS",
    "DEFAULT_KEY",
    "EMPTY_DATA",
    "MAX_RECORDS",
    "Collection",
    "DataSets",
    "DataUse",
    "Records",
    "SessionData",
    "key_text",
    "pick",
    "session_data",
]

GENERATE = "$generate"
COLLECTION_KEYS = ("key", "type", "records", GENERATE)
DATA_GENERATE_KEYS = ("type", "count", "seed", "override")
DEFAULT_KEY = "id"
MAX_RECORDS = 10_000  # per collection: records are made at load, and generating one costs tens of us
# What a generated collection's override templates may use: the data are made at load, with no call.
OVERRIDE_NAMES = frozenset({"data", "index", "pick", "randint", "uuid"})


def key_text(value: Any) -> str | None:
    """A key as the collection indexes it: text, so ``data.orders[request.n]`` finds id 5 by ``"5"`` too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


@dataclass(frozen=True, eq=False)
class Collection:
    """One collection as loaded: its records in order, found by ``key``; typed when ``descriptor`` is set."""

    name: str
    key: str
    records: tuple[dict[str, Any], ...]  # as templates read them (request-like views when typed)
    index: Mapping[str, int]  # key text -> position in ``records``
    location: Location
    descriptor: Descriptor | None = None
    lines: tuple[int, ...] = ()  # the line of each record as written (none for generated records)

    def record(self, value: Any, what: str) -> dict[str, Any]:
        """A record given at run time (a handler's ``put``) in the form stored: plain JSON, checked against
        the type when there is one. ValueError says what is wrong."""
        if isinstance(value, Message):
            value = to_json(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"{what}: a record is a mapping or a message, got {_text.show(value)}")
        try:
            plain = json.loads(json.dumps(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: the record is not JSON data: {exc}") from None
        if self.descriptor is not None:
            msg = message_class(self.descriptor)()
            try:
                fill_message(msg, plain, False, what)
            except ConversionError as exc:
                raise ValueError(str(exc)) from None
            plain = to_json(msg)
        if key_text(plain.get(self.key)) is None:
            raise ValueError(
                f'{what}: the record has no "{self.key}" (the key of data.{self.name}), got '
                f"{_text.show(plain)}"
            )
        return plain

    def shown(self, record: dict[str, Any]) -> dict[str, Any]:
        """A stored record as templates read it."""
        return record if self.descriptor is None else make_view(self.descriptor, record)


class DataSets(dict[str, Collection]):
    """A scenario's collections by name (never changed once made)."""

    def merged(self, parent: DataSets) -> DataSets:
        """These collections over an ``extends`` parent's: a name declared here replaces the parent's."""
        if not parent:
            return self
        return DataSets({**parent, **self})


EMPTY_DATA = DataSets()


class RecordStore(Protocol):
    """What a session keeps of its data (the session store implements it): changes, not copies."""

    def records(self) -> Mapping[str, Mapping[str, Any]]:
        """Collection -> key -> the record put, or None where one was removed; oldest change first."""
        ...

    def put_record(self, collection: str, key: str, record: dict[str, Any] | None) -> None: ...


# --------------------------------------------------------------------------------------------------------
# a session's view


class SessionData(Mapping[str, "Records"]):
    """A session's collections: the initial records with the session's changes over them.

    Read once per call (so a call sees one state, and a shared store is asked once); a change made through
    it is seen at once by the same call. ``for_code`` hands out copies, so Python code can change what it
    got without changing the data.
    """

    def __init__(self, sets: DataSets, session: RecordStore, *, for_code: bool = False) -> None:
        self._sets = sets
        self._session = session
        self._for_code = for_code
        self._changes: Mapping[str, Mapping[str, Any]] | None = None
        self._views: dict[str, Records] = {}

    def changes(self, name: str) -> Mapping[str, Any]:
        if self._changes is None:
            self._changes = self._session.records()
        return self._changes.get(name, {})

    def changed(self) -> None:
        """Forgets what was read, after a change."""
        self._changes = None
        for view in self._views.values():
            view._rows = None

    def collection(self, name: str) -> Records:
        view = self._views.get(name)
        if view is None:
            coll = self._sets.get(name)
            if coll is None:
                raise NoSuchCollection(unknown_collection(name, self._sets))
            view = self._views[name] = Records(self, coll, self._for_code)
        return view

    def __getitem__(self, name: str) -> Records:
        if name not in self._sets:
            raise KeyError(name)
        return self.collection(name)

    def __getattr__(self, name: str) -> Records:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.collection(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __repr__(self) -> str:
        return f"<data: {', '.join(self._sets) or 'no collections'}>"


class NoSuchCollection(ValueError):
    """``data.x`` for a collection the scenario does not declare."""


def unknown_collection(name: str, sets: Mapping[str, Any]) -> str:
    text = f'data has no collection "{name}"'
    hint = _text.did_you_mean(name, list(sets), n=3, quote='"')
    if hint:
        return text + hint
    return text + ("; the collections are " + ", ".join(sets) if sets else "; the scenario declares no data:")


class Records(Sequence[dict[str, Any]]):
    """One collection as a session sees it: a list of records (``|selectattr``, ``|first``, ``|list``)
    that also finds a record by its key (``data.items[key]``, ``.get(key)``, ``key in data.items``).

    A key that is not there fails the call with NOT_FOUND naming the collection and the key, which is what a
    real service answers to a Get of an unknown id; ``.get(key)`` gives None instead.
    """

    def __init__(self, data: SessionData, coll: Collection, for_code: bool) -> None:
        self._data = data
        self._coll = coll
        self._for_code = for_code
        self._rows: tuple[list[dict[str, Any]], dict[str, int]] | None = None

    @property
    def key(self) -> str:
        """The field records are found by."""
        return self._coll.key

    def _current(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        rows = self._rows
        if rows is None:
            coll = self._coll
            changes = self._data.changes(coll.name)
            if not changes:
                rows = (list(coll.records), dict(coll.index))
            else:
                merged: list[dict[str, Any] | None] = list(coll.records)
                at = dict(coll.index)
                for key, record in changes.items():
                    shown = None if record is None else coll.shown(record)
                    if key in at:
                        merged[at[key]] = shown
                    elif shown is not None:
                        at[key] = len(merged)
                        merged.append(shown)
                kept = [r for r in merged if r is not None]
                rows = (kept, {key_text(r.get(coll.key)) or "": i for i, r in enumerate(kept)})
            self._rows = rows
        return rows

    def _out(self, record: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(record) if self._for_code else record

    def __getitem__(self, key: Any) -> Any:
        records, index = self._current()
        if isinstance(key, slice):
            return [self._out(r) for r in records[key]]
        text = key_text(key)
        at = index.get(text) if text is not None else None
        if at is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, self._missing(key, index))
        return self._out(records[at])

    def _missing(self, key: Any, index: Mapping[str, int]) -> str:
        coll = self._coll
        text = f"data.{coll.name} has no record with {coll.key} {_text.show(key)}"
        if isinstance(key, str) and len(index) <= 1000:
            text += _text.did_you_mean(key, list(index), n=3, quote='"')
        return text

    def get(self, key: Any, default: Any = None) -> Any:
        """The record with this key, or ``default``."""
        records, index = self._current()
        text = key_text(key)
        at = index.get(text) if text is not None else None
        return default if at is None else self._out(records[at])

    def __contains__(self, key: object) -> bool:
        text = key_text(key)
        return text is not None and text in self._current()[1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter([self._out(r) for r in self._current()[0]])

    def __reversed__(self) -> Iterator[dict[str, Any]]:
        return iter([self._out(r) for r in reversed(self._current()[0])])

    def __len__(self) -> int:
        return len(self._current()[0])

    def keys(self) -> list[str]:
        """The keys, in the records' order."""
        return list(self._current()[1])

    @unsafe  # templates read data; only Python handlers change it
    def put(self, record: Any) -> dict[str, Any]:
        """Adds the record, or replaces the one with its key (keeping its place), for this session only;
        returns it as stored. A message or a proto3 JSON mapping; ValueError when it does not fit."""
        coll = self._coll
        plain = coll.record(record, f"data.{coll.name}.put")
        key = key_text(plain[coll.key])
        assert key is not None
        self._data._session.put_record(coll.name, key, plain)
        self._data.changed()
        return copy.deepcopy(plain)

    @unsafe
    def remove(self, key: Any) -> bool:
        """Removes the record with this key for this session; False when there was none."""
        text = key_text(key)
        if text is None or text not in self:
            return False
        self._data._session.put_record(self._coll.name, text, None)
        self._data.changed()
        return True

    def __repr__(self) -> str:
        return f"<data.{self._coll.name}: {len(self)} records by {self._coll.key}>"


def session_data(call: Any, *, for_code: bool = False) -> SessionData:
    """The call's data: its scenario's collections with its session's changes (one view per call)."""
    if for_code:
        return SessionData(call.datasets or EMPTY_DATA, call.session, for_code=True)
    memo = call.__dict__
    view: SessionData | None = memo.get("_virtsvc_data")
    if view is None:
        view = memo["_virtsvc_data"] = SessionData(call.datasets or EMPTY_DATA, call.session)
    return view


def pick(rng: random.Random) -> Any:
    """``pick(collection)``: one record drawn with ``rng`` (the session's, or a generated record's own)."""

    def pick_one(records: Any) -> Any:
        items = list(records)
        if not items:
            raise ValueError("pick() of an empty list")
        return items[int(rng.random() * len(items))]

    return pick_one


# --------------------------------------------------------------------------------------------------------
# what templates name, for virtsvc check (datasets.check_uses)


@dataclass(frozen=True)
class DataUse:
    """A template that names ``data.<collection>`` (``descriptor``: the message type its records fill)."""

    collection: str
    file: str
    line: int
    descriptor: Descriptor | None = None
    path: str = ""
