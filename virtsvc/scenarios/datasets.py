"""The ``data:`` key compiled at load: records checked against their type, generated collections made
(their override templates may ``pick()`` from collections declared before, so foreign keys line up), and
``virtsvc check``'s test of records against the message types the rules fill with them. What sessions read
at run time is in :mod:`virtsvc.scenarios.data`."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import Descriptor

from virtsvc import _text
from virtsvc.errors import ConversionError, Refusal
from virtsvc.scenarios.fields import fill_message, make_view, message_class, message_info, special_type
from virtsvc.scenarios.located import Site
from virtsvc.scenarios.model import Location, to_json

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import Catalog

from virtsvc.scenarios import templates
from virtsvc.scenarios.data import (
    COLLECTION_KEYS,
    DATA_GENERATE_KEYS,
    DEFAULT_KEY,
    EMPTY_DATA,
    GENERATE,
    MAX_RECORDS,
    OVERRIDE_NAMES,
    Collection,
    DataSets,
    DataUse,
    SessionData,
    key_text,
    unknown_collection,
)
from virtsvc.scenarios.synthetic import generate, unknown_type_message

__all__ = ["check_uses", "compile_data"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a collection's name: what templates can write as data.NAME


# --------------------------------------------------------------------------------------------------------
# compiling data:


class _LoadTime:
    """The record store of the data being made at load: no changes."""

    def records(self) -> Mapping[str, Mapping[str, Any]]:
        return {}

    def put_record(self, collection: str, key: str, record: dict[str, Any] | None) -> None:
        raise ValueError("data cannot be changed while it is made")


def compile_data(doc: Mapping[Any, Any], site: Site, catalog: Catalog, scenario: str) -> DataSets | None:
    """``data:`` of a scenario document; None (with located problems) when it is wrong."""
    before = len(site.problems.items)
    node = doc["data"]
    if not isinstance(node, Mapping):
        site.error(
            doc, "data", f"data: expected a mapping of collections (name: [records]), got {_kind(node)}"
        )
        return None
    sets = DataSets()
    for name, spec in node.items():
        path = f"data.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            site.error(node, name, f"{path}: a collection's name is a word ([A-Za-z_][A-Za-z0-9_]*)")
            continue
        coll = _collection(name, spec, node, site, catalog, scenario, sets, path)
        if coll is not None:
            sets[name] = coll
    return None if len(site.problems.items) > before else sets


def _collection(name: str, spec: Any, parent: Mapping[Any, Any], site: Site, catalog: Catalog,
                scenario: str, sets: DataSets, path: str) -> Collection | None:  # fmt: skip
    location = Location(site.file, site.line_of(parent, name))
    key, desc = DEFAULT_KEY, None
    records_node, owner, owner_key = spec, parent, name
    generated = False
    if isinstance(spec, Mapping):
        for k in spec:
            if k not in COLLECTION_KEYS:
                hint = _text.did_you_mean(str(k), COLLECTION_KEYS, n=2, quote='"')
                site.error(spec, k, f'{path}: unknown key "{k}"{hint}; a collection holds '
                           f"{', '.join(COLLECTION_KEYS)}")  # fmt: skip
        if ("records" in spec) == (GENERATE in spec):
            site.error(
                parent, name, f"{path}: give its records: a list, records: [...] or $generate: {{...}}"
            )
            return None
        key = spec.get("key", DEFAULT_KEY)
        if not isinstance(key, str) or not key:
            site.error(spec, "key", f"{path}.key: expected the name of the key field, got {_text.show(key)}")
            return None
        if spec.get("type") is not None:
            desc = _type(spec, "type", site, catalog, f"{path}.type")
            if desc is None:
                return None
        generated = GENERATE in spec
        owner, owner_key = spec, GENERATE if generated else "records"
        records_node = spec.get(owner_key)
    if generated:
        made = _generated(name, records_node, spec, site, catalog, scenario, sets, f"{path}.{GENERATE}", desc)
        if made is None:
            return None
        desc, records = made[0], made[1]
        lines: list[int] = []
    else:
        if not isinstance(records_node, list):
            site.error(owner, owner_key, f"{path}: expected a list of records, got {_kind(records_node)}")
            return None
        records, lines = [], []
        for i, rec in enumerate(records_node):
            line = site.line_of(records_node, i)
            rpath = f"{path}[{i}]"
            if not isinstance(rec, Mapping):
                site.error(records_node, i, f"{rpath}: a record is a mapping, got {_kind(rec)}")
                continue
            try:
                plain = json.loads(json.dumps(rec))
            except (TypeError, ValueError) as exc:
                site.error(records_node, i, f"{rpath}: not JSON data: {exc}")
                continue
            if desc is not None:
                msg = message_class(desc)()
                try:
                    fill_message(msg, plain, True, rpath)
                except ConversionError as exc:
                    site.error(records_node, i, str(exc))
                    continue
                plain = to_json(msg)
            records.append(plain)
            lines.append(line)
    return _indexed(name, key, records, tuple(lines), location, desc, site, records_node, path)


def _indexed(name: str, key: str, records: list[dict[str, Any]], lines: tuple[int, ...], location: Location,
             desc: Descriptor | None, site: Site, node: Any, path: str) -> Collection | None:  # fmt: skip
    if desc is not None and key not in message_info(desc).fields:
        hint = _text.did_you_mean(key, message_info(desc).names, n=2, quote='"')
        site.problems.add(location.file, location.line, f'{path}: {desc.full_name} has no field "{key}" to '
                          f"find records by{hint}; name the key with key: FIELD")  # fmt: skip
        return None
    if desc is not None:
        key = message_info(desc).fields[key].name  # proto name, as records are stored
    index: dict[str, int] = {}
    ok = True
    for i, rec in enumerate(records):
        line = lines[i] if i < len(lines) else location.line
        text = key_text(rec.get(key))
        if text is None:
            fields = ", ".join(rec) or "none"
            hint = "" if key != DEFAULT_KEY else "; name another key field with key: FIELD"
            site.problems.add(location.file, line, f'{path}[{i}]: no "{key}" to find the record by (its '
                              f"fields: {fields}){hint}")  # fmt: skip
            ok = False
        elif text in index:
            site.problems.add(location.file, line, f'{path}[{i}]: {key} "{text}" again (record {index[text]} '
                              "has it); keys are unique in a collection")  # fmt: skip
            ok = False
        else:
            index[text] = i
    if not ok:
        return None
    shown = tuple(rec if desc is None else make_view(desc, rec) for rec in records)
    return Collection(name, key, shown, index, location, desc, lines)


def _type(node: Mapping[Any, Any], key: str, site: Site, catalog: Catalog, path: str) -> Descriptor | None:

    name = node.get(key)
    if not isinstance(name, str):
        site.error(node, key, f"{path}: expected a message type (e.g. shop.v1.Item), got {_text.show(name)}")
        return None
    try:
        return catalog.pool.FindMessageTypeByName(name)
    except KeyError:
        site.error(node, key, f"{path}: {unknown_type_message(name, catalog)}")
        return None


def _generated(name: str, spec: Any, owner: Any, site: Site, catalog: Catalog, scenario: str,
               sets: DataSets, path: str, declared: Descriptor | None,
               ) -> tuple[Descriptor, list[dict[str, Any]]] | None:  # fmt: skip

    if not isinstance(spec, Mapping):
        site.error(owner, GENERATE, f"{path}: expected {{type: ..., count: N, seed: S}}, got {_kind(spec)}")
        return None
    before = len(site.problems.items)
    for k in spec:
        if k not in DATA_GENERATE_KEYS:
            hint = _text.did_you_mean(str(k), DATA_GENERATE_KEYS, n=2, quote='"')
            site.error(
                spec, k, f'{path}: unknown key "{k}"{hint}; valid keys: {", ".join(DATA_GENERATE_KEYS)}'
            )
    desc = _type(spec, "type", site, catalog, f"{path}.type") if "type" in spec else declared
    if desc is None:
        if "type" not in spec:
            site.error(owner, GENERATE, f"{path}: give the type of the records (type: shop.v1.Item)")
        return None
    count = spec.get("count", 10)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_RECORDS:
        site.error(spec, "count", f"{path}.count: expected a number of records from 0 to {MAX_RECORDS:,}, "
                   f"got {_text.show(count)}")  # fmt: skip
        return None
    seed = spec.get("seed")
    if seed is None:  # the same records in every process and every run: seeded from the names
        seed = int.from_bytes(hashlib.blake2b(f"{scenario}/{name}".encode(), digest_size=4).digest(), "big")
    elif isinstance(seed, bool) or not isinstance(seed, int):
        site.error(spec, "seed", f"{path}.seed: expected an integer, got {_text.show(seed)}")
        return None
    override = spec.get("override")
    evaluator: Any = False
    if override is not None:
        if not isinstance(override, Mapping):
            site.error(
                spec, "override", f"{path}.override: expected a mapping of fields, got {_kind(override)}"
            )
            return None
        evaluator = templates.compile_tree(override, site, spec, "override", f"{path}.override")
        if evaluator is None:
            return None
        if evaluator is not False:
            extra = sorted(evaluator.names - OVERRIDE_NAMES)
            if extra:
                known = ", ".join(sorted(OVERRIDE_NAMES))
                site.error(
                    spec,
                    "override",
                    f"{path}.override: {extra[0]} is not known here: the data are made at load, and their "
                    f"templates see {known}",
                )
                return None
    if len(site.problems.items) > before:
        return None
    view = SessionData(sets, _LoadTime())
    records = []
    cls = message_class(desc)
    for i in range(count):
        msg = generate(desc, seed, i)
        if override is not None:
            if evaluator is False:
                value = override
            else:
                rng = random.Random(f"{seed}/{i}/data")
                try:
                    value = templates.evaluate_tree(
                        evaluator, templates.generation_context(rng, i, view), f"{path}.override"
                    )
                except (Refusal, ValueError, templates.TemplateError) as exc:
                    site.error(
                        spec, "override", f"record {i}: {exc.message if isinstance(exc, Refusal) else exc}"
                    )
                    return None
            over = cls()
            try:
                fill_message(over, value, False, f"{path}.override")
            except ConversionError as exc:
                site.error(spec, "override", f"record {i}: {exc}")
                return None
            record = _merge(desc, to_json(msg), to_json(over), value)
            msg = cls()
            fill_message(msg, record, False, path)
        records.append(to_json(msg))
    return desc, records


def _merge(desc: Descriptor, base: dict[str, Any], over: dict[str, Any], written: Any) -> dict[str, Any]:
    """``over`` written over ``base``: a nested mapping overrides only the fields it names, anything else
    replaces the field (so a field the override sets to its default is cleared)."""
    out = dict(base)
    info = message_info(desc)
    for key, value in written.items() if isinstance(written, Mapping) else ():
        field = info.fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        name = field.name
        if (
            isinstance(value, Mapping)
            and field.message_type is not None
            and not field.is_repeated
            and special_type(field) is None
        ):
            out[name] = _merge(field.message_type, base.get(name) or {}, over.get(name) or {}, value)
        elif name in over:
            out[name] = over[name]
        else:
            out.pop(name, None)
    return out


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _text.show(value)


# --------------------------------------------------------------------------------------------------------
# virtsvc check: records against the types rules fill with them


def check_uses(sets: DataSets | None, uses: Sequence[DataUse], site: Site, *, inherits: bool) -> None:
    """Reports templates that name a collection the scenario lacks (unless it may inherit it) and records
    that do not fit the message type a rule fills with them (at the record's line, closest field named)."""
    sets = sets or EMPTY_DATA
    checked: set[tuple[str, str]] = set()
    for use in uses:
        coll = sets.get(use.collection)
        if coll is None:
            if not inherits:
                site.problems.add(
                    use.file, use.line, f"{use.path}: {unknown_collection(use.collection, sets)}"
                )
            continue
        desc = use.descriptor
        if desc is None or (coll.name, desc.full_name) in checked:
            continue
        checked.add((coll.name, desc.full_name))
        if coll.descriptor is not None and coll.descriptor.full_name == desc.full_name:
            continue  # checked against its type at load
        cls = message_class(desc)
        for i, record in enumerate(coll.records):
            try:
                fill_message(cls(), record, False, f"data.{coll.name}[{i}]")
            except ConversionError as exc:
                line = coll.lines[i] if i < len(coll.lines) else coll.location.line
                site.problems.add(coll.location.file, line, f"{exc} (the rule at {use.file}:{use.line} fills "
                                  f"{desc.full_name} with data.{coll.name})")  # fmt: skip
