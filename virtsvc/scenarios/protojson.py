"""proto3 JSON of a message, fast: what ``json_format.MessageToDict(preserving_proto_field_name=True)``
returns, for the fields that are set, without its generic machinery.

Matchers and templates look at every request that reaches a rule with a ``when`` or a template; the
generic converter costs several times the work of answering the call. Well-known types (Timestamp,
Duration, Struct, Any, wrappers...) have their own JSON forms and are left to json_format.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

__all__ = ["message_to_json"]

F = FieldDescriptor
_INT64 = frozenset({F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64})
_FLOAT = frozenset({F.TYPE_FLOAT, F.TYPE_DOUBLE})
_WELL_KNOWN = frozenset(
    {
        "google.protobuf.Any",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.ListValue",
        "google.protobuf.Struct",
        "google.protobuf.Timestamp",
        "google.protobuf.Value",
        "google.protobuf.BoolValue",
        "google.protobuf.BytesValue",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int32Value",
        "google.protobuf.Int64Value",
        "google.protobuf.StringValue",
        "google.protobuf.UInt32Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Empty",
    }
)


_AS_STRING = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"})


def message_to_json(message: Message) -> Any:
    """The proto3 JSON form with proto field names, default values omitted."""
    name = message.DESCRIPTOR.full_name
    if name in _WELL_KNOWN:
        if name in _AS_STRING and hasattr(message, "ToJsonString"):
            try:
                return message.ToJsonString()
            except ValueError:  # out of range: let json_format raise its own error
                pass
        return _generic(message)
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        plan = _PLANS.get(field)
        if plan is None:
            if field.is_extension:
                return _generic(message)  # extensions have bracketed JSON names: leave them to json_format
            plan = _PLANS[field] = _plan(field)
        name, convert = plan
        out[name] = value if convert is None else convert(value)
    return out


# How each field's value turns into JSON, worked out once per field (None: the value as it is).
_PLANS: dict[FieldDescriptor, tuple[str, Callable[[Any], Any] | None]] = {}


def _plan(field: FieldDescriptor) -> tuple[str, Callable[[Any], Any] | None]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        convert_value = _converter(value_field)
        if convert_value is None:
            return field.name, lambda value: {_map_key(k): v for k, v in value.items()}
        return field.name, lambda value: {_map_key(k): convert_value(v) for k, v in value.items()}
    convert = _converter(field)
    if field.is_repeated:
        if convert is None:
            return field.name, list
        return field.name, lambda value: [convert(v) for v in value]
    return field.name, convert


def _converter(field: FieldDescriptor) -> Callable[[Any], Any] | None:
    """One value of ``field`` as JSON, chosen once by the field's type; None when the Python value is its
    JSON form already (strings, bools, 32-bit integers)."""
    t = field.type
    if t == F.TYPE_MESSAGE or t == F.TYPE_GROUP:
        return message_to_json
    if t == F.TYPE_ENUM:
        by_number = field.enum_type.values_by_number

        def enum_name(value: int) -> Any:
            known = by_number.get(value)
            return known.name if known is not None else value  # open enums keep unknown numbers

        return enum_name
    if t in _INT64:
        return str
    if t == F.TYPE_BYTES:
        return lambda value: base64.b64encode(value).decode("ascii")
    if t == F.TYPE_DOUBLE:
        return _double
    if t == F.TYPE_FLOAT:
        return lambda value: _double(value) if not math.isfinite(value) else _short_float(value)
    return None


def _generic(message: Message) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, descriptor_pool=message.DESCRIPTOR.file.pool
    )


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _double(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _short_float(value: float) -> float:
    # float32 values print as the shortest decimal that round-trips through float32, as json_format does.
    from google.protobuf.internal import type_checkers

    return float(type_checkers.ToShortestFloat(value))
