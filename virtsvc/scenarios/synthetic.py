"""Synthetic messages: any message type filled from its schema with realistic, seeded values.

A value is chosen by the field's type and name: ``*_id`` fields get prefixed ids, ``email`` an address,
``currency_code`` an ISO code, ``price`` an amount, ``*_at`` a timestamp, enums a valid non-zero value;
repeated fields and maps get a few elements, nested messages are filled down to a depth bound (so recursive
types end), and a oneof gets exactly one member. The same (seed, index) always gives the same message.

Faker supplies the realistic words, but a Faker call costs tens of microseconds, so each kind of value is
drawn once into a pool (from a Faker seeded with a constant) and a generation only picks from the pools with
its own seeded ``random.Random``. A plan (one value function per field) is made once per message type.

``reply: {$generate: {seed: 7, override: {...}}}`` compiles here into a reply template: the generated message
with the override (a reply body, templates allowed) written over it. Without a seed, each call draws one (or
takes the request's ``x-virtsvc-seed`` header) and sends it back in the ``x-virtsvc-seed`` response header.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from virtsvc.errors import TemplateError
from virtsvc.scenarios import fakes
from virtsvc.scenarios.fields import (
    DURATION,
    EMPTY,
    INT_RANGES,
    LIST_VALUE,
    STRUCT,
    TIMESTAMP,
    VALUE,
    WRAPPERS,
    F,
    is_map,
    message_class,
    message_info,
    special_type,
    suggest,
)
from virtsvc.scenarios.located import Site
from virtsvc.scenarios.model import Call, MessageTemplate

__all__ = [
    "GENERATE",
    "GENERATE_KEYS",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "SEED_HEADER",
    "call_seed",
    "compile_generate",
    "generate",
    "is_generate",
    "message_json",
    "unknown_type_message",
]

GENERATE = "$generate"
GENERATE_KEYS = ("seed", "override")
SEED_HEADER = "x-virtsvc-seed"
MAX_DEPTH = 4  # nested messages below this depth are left unset: a recursive type ends
MAX_ITEMS = 3  # repeated fields and maps get 1..MAX_ITEMS elements
_EPOCH = 1_735_689_600  # 2025-01-01T00:00:00Z: generated times are fixed for a seed, never "now"
_YEAR = 365 * 86_400

_Value = Callable[[random.Random, int], Any]  # (rng, depth) -> a value the message constructor takes


def _pick(kind: str) -> _Value:
    holder: list[tuple[Any, ...]] = []

    def pick(rng: random.Random, depth: int) -> Any:
        if not holder:
            holder.append(fakes.pool(kind))
        pool = holder[0]
        return pool[int(rng.random() * len(pool))]

    return pick


# --------------------------------------------------------------------------------------------------------
# values by name and type

_TEXT_BY_NAME: tuple[tuple[tuple[str, ...], str], ...] = (
    (("email", "email_address"), "email"),
    (("first_name", "given_name"), "first_name"),
    (("last_name", "surname", "family_name"), "last_name"),
    (("name", "full_name", "owner_name", "display_name", "customer_name", "holder"), "name"),
    (("username", "user_name", "login", "actor", "user", "author"), "user_name"),
    (("company", "merchant", "vendor", "organisation", "organization", "brand"), "company"),
    (("phone", "phone_number", "mobile"), "phone"),
    (("address", "street", "street_address", "address_line"), "street"),
    (("city", "town"), "city"),
    (("country",), "country"),
    (("country_code", "region_code"), "country_code"),
    (("zip", "zip_code", "postcode", "postal_code"), "postcode"),
    (("currency", "currency_code"), "currency_code"),
    (("url", "uri", "website", "link", "href", "image_url"), "url"),
    (("title", "headline", "subject", "product_name"), "title"),
    (("description", "reason", "message", "note", "notes", "comment", "summary", "text"), "sentence"),
    (("color", "colour"), "color"),
    (("ip", "ip_address", "ipv4"), "ipv4"),
    (("iban", "account_number"), "iban"),
    (("number", "card_number", "pan"), "card"),
    (("branch", "warehouse", "location", "site"), "city_slug"),
)
_TEXT_KINDS = {name: kind for names, kind in _TEXT_BY_NAME for name in names}


def _hex(rng: random.Random, digits: int) -> str:
    return format(rng.getrandbits(digits * 4), f"0{digits}x")


def _text(field: FieldDescriptor, owner: str) -> _Value:
    name = field.name.lower()
    if name in ("id", "uuid", "guid") or name.endswith(("_id", "_uuid", "_key", "_ref")):
        stem = name.rsplit("_", 1)[0] if "_" in name else owner.lower()
        if name in ("uuid", "guid") or name.endswith(("_uuid", "_key")):
            return lambda rng, d: (
                f"{_hex(rng, 8)}-{_hex(rng, 4)}-4{_hex(rng, 3)}-a{_hex(rng, 3)}-{_hex(rng, 12)}"
            )
        prefix = stem[:12].replace("_", "-")
        return lambda rng, d: f"{prefix}-{_hex(rng, 8)}"
    if name == "sku" or name.endswith("_sku"):
        return lambda rng, d: f"SKU-{10000 + int(rng.random() * 90000)}"
    if "token" in name or name.endswith(("_hash", "_secret", "_signature")):
        return lambda rng, d: _hex(rng, 24)
    kind = _TEXT_KINDS.get(name)
    if kind is None:
        last = name.rsplit("_", 1)[-1]
        kind = _TEXT_KINDS.get(last, "word")
    return _pick(kind)


def _integer(field: FieldDescriptor) -> _Value:
    name = field.name.lower()
    lo, hi = 1, 1000
    if name.endswith("month"):
        lo, hi = 1, 12
    elif name.endswith("year"):
        lo, hi = 2025, 2032
    elif name.endswith("day"):
        lo, hi = 1, 28
    elif name.endswith(("units", "cents", "amount", "price", "cost", "total", "balance")):
        lo, hi = 100, 100_000
    elif name.endswith(("qty", "quantity", "count", "size", "accepted", "reserved")):
        lo, hi = 1, 20
    elif name.endswith(("page_size", "limit")):
        lo, hi = 10, 100
    elif name.endswith("age"):
        lo, hi = 18, 90
    elif name.endswith(("sequence", "version", "revision", "offset")):
        lo, hi = 1, 1_000_000
    elif name.endswith(("_seconds", "_ms", "_millis", "timestamp", "_at", "_time")):
        lo, hi = _EPOCH, _EPOCH + _YEAR
    tlo, thi, _ = INT_RANGES[field.type]
    lo, hi = max(lo, tlo), min(hi, thi)
    span = hi - lo + 1
    return lambda rng, d: lo + int(rng.random() * span)


def _floating(field: FieldDescriptor) -> _Value:
    name = field.name.lower()
    if name in ("lat", "latitude"):
        return lambda rng, d: round(rng.uniform(-90, 90), 6)
    if name in ("lon", "lng", "longitude"):
        return lambda rng, d: round(rng.uniform(-180, 180), 6)
    if name.endswith(("rate", "ratio", "score", "probability", "share", "weight")):
        return lambda rng, d: round(rng.random(), 3)
    if name.endswith(("price", "amount", "cost", "total", "balance", "fee")):
        return lambda rng, d: round(rng.uniform(1, 500), 2)
    return lambda rng, d: round(rng.uniform(1, 200), 1)


def _enum(field: FieldDescriptor) -> _Value:
    numbers = [v.number for v in field.enum_type.values if v.number != 0] or [
        field.enum_type.values[0].number
    ]
    return lambda rng, d: numbers[int(rng.random() * len(numbers))]


def _timestamp(field: FieldDescriptor, cls: type[Message]) -> _Value:
    name = field.name.lower()
    future = name.startswith(("expires", "due", "valid_until", "deadline", "ends")) or "expir" in name
    base = _EPOCH + _YEAR if future else _EPOCH

    def value(rng: random.Random, d: int) -> Message:
        return cls(seconds=base + int(rng.random() * _YEAR))

    return value


def _special(field: FieldDescriptor, full_name: str) -> _Value | None:
    """A well-known type's value; None leaves the field unset (Any, FieldMask: nothing sensible to make)."""
    cls = message_class(field.message_type)
    if full_name == TIMESTAMP:
        return _timestamp(field, cls)
    if full_name == DURATION:
        return lambda rng, d: cls(seconds=1 + int(rng.random() * 3600))
    if full_name == EMPTY:
        return lambda rng, d: cls()
    if full_name in WRAPPERS:
        inner = _scalar(field.message_type.fields_by_name["value"], field.name)
        return lambda rng, d: cls(value=inner(rng, d))
    if full_name in (STRUCT, VALUE, LIST_VALUE):
        word = _pick("word")

        def value(rng: random.Random, d: int) -> Message:
            msg = cls()
            if full_name == STRUCT:
                msg.update({"source": word(rng, d), "score": round(rng.random(), 3)})
            elif full_name == VALUE:
                msg.string_value = word(rng, d)
            else:
                msg.extend([word(rng, d), word(rng, d)])
            return msg

        return value
    return None


def _scalar(field: FieldDescriptor, owner: str) -> _Value:
    t = field.type
    if field.enum_type is not None:
        return _enum(field)
    if t == F.TYPE_STRING:
        return _text(field, owner)
    if t in INT_RANGES:
        return _integer(field)
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return _floating(field)
    if t == F.TYPE_BOOL:
        return lambda rng, d: rng.random() < 0.5
    return lambda rng, d: rng.getrandbits(64).to_bytes(8, "big")  # bytes


# --------------------------------------------------------------------------------------------------------
# plans: one value function per field, made once per message type


@dataclass(frozen=True, slots=True)
class _Plan:
    cls: type[Message]
    fields: tuple[tuple[str, _Value], ...]  # always set
    oneofs: tuple[tuple[tuple[str, _Value], ...], ...]  # one member of each set


_plans: dict[Descriptor, _Plan] = {}


def _plan(desc: Descriptor) -> _Plan:
    plan = _plans.get(desc)
    if plan is None:
        fields: list[tuple[str, _Value]] = []
        oneofs: dict[str, list[tuple[str, _Value]]] = {}
        for field in desc.fields:
            value = _field_value(field, desc.name)
            if value is None:
                continue
            oneof = field.containing_oneof
            if oneof is not None and not (len(oneof.fields) == 1 and oneof.name == "_" + field.name):
                oneofs.setdefault(oneof.name, []).append((field.name, value))
            else:
                fields.append((field.name, value))
        plan = _plans[desc] = _Plan(
            message_class(desc), tuple(fields), tuple(tuple(m) for m in oneofs.values())
        )
    return plan


def _field_value(field: FieldDescriptor, owner: str) -> _Value | None:
    if is_map(field):
        entry = field.message_type
        key = _element(entry.fields_by_name["key"], field.name)
        value = _element(entry.fields_by_name["value"], field.name)
        if key is None or value is None:
            return None

        def mapping(rng: random.Random, d: int) -> dict[Any, Any] | None:
            out = {}
            for _ in range(1 + int(rng.random() * MAX_ITEMS)):
                v = value(rng, d)
                if v is None:
                    return None
                out[key(rng, d)] = v
            return out

        return mapping
    one = _element(field, owner)
    if one is None:
        return None
    if field.is_repeated:

        def repeated(rng: random.Random, d: int) -> list[Any] | None:
            out = []
            for _ in range(1 + int(rng.random() * MAX_ITEMS)):
                v = one(rng, d)
                if v is None:
                    return None  # too deep: no elements at all
                out.append(v)
            return out

        return repeated
    return one


def _element(field: FieldDescriptor, owner: str) -> _Value | None:
    if field.message_type is None:
        return _scalar(field, owner)
    special = special_type(field)
    if special is not None:
        return _special(field, special)
    desc = field.message_type

    def nested(rng: random.Random, d: int) -> Message | None:
        if d >= MAX_DEPTH:
            return None
        return _build(_plan(desc), rng, d + 1)

    return nested


def _build(plan: _Plan, rng: random.Random, depth: int) -> Message:
    values: dict[str, Any] = {}
    for name, value in plan.fields:
        v = value(rng, depth)
        if v is not None:
            values[name] = v
    for members in plan.oneofs:
        name, value = members[int(rng.random() * len(members))]
        v = value(rng, depth)
        if v is not None:
            values[name] = v
    return plan.cls(**values)


def generate(descriptor: Descriptor, seed: int, index: int = 0) -> Message:
    """The message of ``descriptor`` for ``seed`` (and ``index``, the position in a stream or a data set):
    the same arguments give the same message in every process."""
    return _build(_plan(descriptor), random.Random(f"{seed}/{index}"), 0)


# --------------------------------------------------------------------------------------------------------
# reply: {$generate: {...}}


def is_generate(value: Any) -> bool:
    """Whether a reply body is ``{$generate: ...}``."""
    return isinstance(value, Mapping) and GENERATE in value


_Tree = dict[str, "_Tree | None"]  # the fields an override writes: a nested tree or None (replaced whole)


def _written(desc: Descriptor, value: Mapping[Any, Any]) -> _Tree:
    from virtsvc.scenarios.templates import is_template

    info = message_info(desc)
    out: _Tree = {}
    for key, v in value.items():
        field = info.fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue  # the override's compilation reports it
        if (
            isinstance(v, Mapping)
            and not is_template(v)
            and field.message_type is not None
            and not field.is_repeated
            and special_type(field) is None
        ):
            out[field.name] = _written(field.message_type, v)
        else:
            out[field.name] = None
    return out


def _overlay(base: Message, over: Message, tree: _Tree) -> None:
    fields = base.DESCRIPTOR.fields_by_name
    for name, sub in tree.items():
        field = fields[name]
        if sub is not None:
            _overlay(getattr(base, name), getattr(over, name), sub)
            continue
        base.ClearField(name)
        if field.is_repeated:
            target = getattr(base, name)
            if is_map(field):
                target.MergeFrom(getattr(over, name))
            else:
                target.extend(getattr(over, name))
        elif field.message_type is not None:
            if over.HasField(name):
                getattr(base, name).CopyFrom(getattr(over, name))
        elif not field.has_presence or over.HasField(name):
            setattr(base, name, getattr(over, name))


class _SeedHeader:
    """The ``x-virtsvc-seed`` response header of a generated reply without a seed of its own."""

    static: str | None = None

    def render(self, call: Call, index: int) -> str:
        return str(call_seed(call))


_SEED_MEMO = "_virtsvc_seed"


def call_seed(call: Call) -> int:
    """The seed of a call's generated replies: the request's ``x-virtsvc-seed`` or one drawn from the
    session's generator, chosen once per call (so the header and the body agree)."""
    memo = call.__dict__
    seed: int | None = memo.get(_SEED_MEMO)
    if seed is None:
        text = call.metadata.get(SEED_HEADER)
        if text is not None:
            try:
                seed = int(str(text).strip())
            except ValueError:
                raise TemplateError(
                    f"{SEED_HEADER}: expected an integer seed (as an earlier reply sent), got {text!r}"
                ) from None
        else:
            seed = call.session.rng.getrandbits(32)
        memo[_SEED_MEMO] = seed
    return seed


class _Generated:
    """A reply generated from its type, with an override written over it."""

    static: bytes | None = None

    def __init__(
        self, desc: Descriptor, seed: int | None, over: MessageTemplate | None, tree: _Tree, path: str
    ) -> None:
        self._desc = desc
        self._cls = message_class(desc)
        self._seed = seed
        self._over = over
        self._tree = tree
        self._path = path
        self.needs_request = bool(over is not None and over.needs_request)
        # a fixed seed without an override is the same message every time: made once
        self._fixed: bytes | None = None
        self.seed_header = _SeedHeader() if seed is None else None

    def build(self, call: Call, index: int) -> Message:
        seed = self._seed if self._seed is not None else call_seed(call)
        msg = generate(self._desc, seed, index)
        if self._over is not None:
            over = self._cls()
            over.ParseFromString(self._over.render(call, index))
            _overlay(msg, over, self._tree)
        return msg

    def render(self, call: Call, index: int) -> bytes:
        if self._fixed is not None:
            return self._fixed
        raw = self.build(call, index).SerializeToString(deterministic=True)
        if self._seed is not None and self._over is None and index == 0:
            self._fixed = raw
        return raw

    def render_json(self, call: Call, index: int) -> dict[str, Any]:
        from virtsvc.scenarios.model import to_json

        msg = self._cls()
        msg.ParseFromString(self.render(call, index))
        return to_json(msg)


def compile_generate(value: Mapping[Any, Any], descriptor: Descriptor, site: Site, path: str) -> Any:
    """Validates and compiles ``{$generate: {seed, override}}`` for ``descriptor``; None (with located
    problems) if it is wrong."""
    from virtsvc.scenarios.templates import compile_message

    before = len(site.problems.items)
    for key in value:
        if key != GENERATE:
            site.error(
                value,
                key,
                f"{path}.{key}: a generated reply holds $generate alone; put fields under $generate.override",
            )
    spec = value[GENERATE]
    gpath = f"{path}.{GENERATE}"
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        site.error(
            value, GENERATE, f"{gpath}: expected a mapping ({{seed: 7, override: {{...}}}}), got {spec!r}"
        )
        return None
    for key in spec:
        if key not in GENERATE_KEYS:
            site.error(
                spec,
                key,
                f'{gpath}: unknown key "{key}"{suggest(str(key), GENERATE_KEYS)}; '
                f"valid keys: {', '.join(GENERATE_KEYS)}",
            )
    seed = spec.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        site.error(spec, "seed", f"{gpath}.seed: expected an integer, got {seed!r}")
    over = None
    tree: _Tree = {}
    override = spec.get("override")
    if override is not None:
        if not isinstance(override, Mapping):
            site.error(spec, "override", f"{gpath}.override: expected a mapping of fields, got {override!r}")
        else:
            over = compile_message(override, descriptor, site, f"{gpath}.override")
            tree = _written(descriptor, override)
    if len(site.problems.items) > before:
        return None
    return _Generated(descriptor, seed, over, tree, path)


def unknown_type_message(name: str, catalog: Any) -> str:
    """The one wording of "no such message type", with the closest names in the catalog."""
    from virtsvc import _text

    names = sorted(_message_names(catalog))
    text = f'unknown message type "{name}"'
    short = name.rsplit(".", 1)[-1].lower()
    same = [n for n in names if n.rsplit(".", 1)[-1].lower() == short]  # the package left out or wrong
    near = "; " + _text.alternatives(same[:3]) if same else _text.did_you_mean(name, names, n=3, quote='"')
    return text + (near or f"; the types here include {', '.join(names[:6])}")


def _message_names(catalog: Any) -> list[str]:
    out: list[str] = []

    def walk(desc: Descriptor) -> None:
        if desc.GetOptions().map_entry:
            return
        out.append(desc.full_name)
        for nested in desc.nested_types:
            walk(nested)

    for proto in catalog.file_set.file:
        for desc in catalog.pool.FindFileByName(proto.name).message_types_by_name.values():
            walk(desc)
    return out


def message_json(msg: Message) -> dict[str, Any]:
    """A message as proto3 JSON with its map entries in key order (a map's own order varies by process), so
    the same message prints as the same text."""
    from virtsvc.scenarios.model import to_json

    return _sorted_maps(msg.DESCRIPTOR, to_json(msg))


def _sorted_maps(desc: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    for field in desc.fields:
        value = data.get(field.name)
        if value is None or field.message_type is None or special_type(field) is not None:
            continue
        if is_map(field):
            vf = field.message_type.fields_by_name["value"]
            items = sorted(value.items())
            if vf.message_type is not None and special_type(vf) is None:
                items = [(k, _sorted_maps(vf.message_type, v)) for k, v in items]
            data[field.name] = dict(items)
        elif field.is_repeated:
            data[field.name] = [_sorted_maps(field.message_type, v) for v in value]
        else:
            data[field.name] = _sorted_maps(field.message_type, value)
    return data
