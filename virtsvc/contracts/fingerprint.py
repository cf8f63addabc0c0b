"""A method's contract as one stable hash: what a recorded answer depends on.

A recording is only as good as the contract it was made against. The fingerprint covers what decides the
bytes and meaning on the wire: the method's streaming kinds and its input and output message types,
transitively (every field's name, number, type, label and type name, oneofs, map entries, enums and their
values). It leaves out what does not: file names, comments, options and their order, and the types of the
same files that the method never reaches. So ``contract:`` on a rule is invalidated exactly when the
contract the rule's answers came from changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from google.protobuf import descriptor_pb2

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor, EnumDescriptor

    from virtsvc.contracts.catalog import Catalog, MethodSpec

__all__ = ["FINGERPRINT_PREFIX", "contract_of", "method_fingerprint", "spec_fingerprint"]

FINGERPRINT_PREFIX = "sha256:"
_HEX_DIGITS = 24  # 96 bits: collisions between two versions of one method's contract are not a concern


def method_fingerprint(catalog: Catalog, method: str) -> str:
    """The fingerprint of ``method`` (``pkg.Svc/Method``) in ``catalog``: ``sha256:`` and 24 hex digits.

    Raises KeyError (naming the closest methods) for a method the catalog does not know.
    """
    return spec_fingerprint(catalog.method(method))


def spec_fingerprint(spec: MethodSpec) -> str:
    """:func:`method_fingerprint` of a resolved method."""
    canonical = json.dumps(contract_of(spec), sort_keys=True, separators=(",", ":"))
    return FINGERPRINT_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:_HEX_DIGITS]


def contract_of(spec: MethodSpec) -> dict[str, Any]:
    """The canonical, JSON-ready form of a method's contract that the fingerprint hashes."""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    pending: list[Descriptor] = [spec.input, spec.output]
    while pending:
        message = pending.pop()
        if message.full_name in messages:
            continue
        messages[message.full_name] = _message(message)
        for field in message.fields:
            if field.message_type is not None:
                pending.append(field.message_type)
            if field.enum_type is not None and field.enum_type.full_name not in enums:
                enums[field.enum_type.full_name] = _enum(field.enum_type)
    return {
        "client_streaming": spec.client_streaming,
        "server_streaming": spec.server_streaming,
        "input": spec.input.full_name,
        "output": spec.output.full_name,
        "messages": messages,
        "enums": enums,
    }


def _message(message: Descriptor) -> dict[str, Any]:
    # The descriptor proto rather than the run-time descriptor: the same words protoc writes, whichever
    # protobuf implementation (upb, python) is loaded.
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    oneofs = [o.name for o in proto.oneof_decl]
    fields = []
    for f in sorted(proto.field, key=lambda f: f.number):
        entry: dict[str, Any] = {
            "name": f.name,
            "number": f.number,
            "type": descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
            "label": descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
        }
        if f.type_name:
            entry["type_name"] = f.type_name.lstrip(".")
        if f.HasField("oneof_index") and not f.proto3_optional:
            entry["oneof"] = oneofs[f.oneof_index]
        if f.proto3_optional:
            entry["optional"] = True
        fields.append(entry)
    out: dict[str, Any] = {"fields": fields}
    if proto.options.map_entry:
        out["map_entry"] = True
    return out


def _enum(enum: EnumDescriptor) -> list[list[Any]]:
    return sorted([v.number, v.name] for v in enum.values)
