"""Learning a real service's contracts from its server reflection (v1, falling back to v1alpha).

What ``virtsvc record`` uses when given neither ``--protos`` nor ``--descriptors``: every service the
upstream lists (reflection and health aside), with the files that define them and everything they import,
as one descriptor set in dependency order.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from virtsvc.contracts.catalog import Catalog
from virtsvc.errors import ConfigError

__all__ = ["REFLECTION_PATHS", "catalog_from_reflection", "fetch_file_set"]

# The two protocols are the same messages under two packages: one set of message classes speaks both.
REFLECTION_PATHS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
_SKIPPED = ("grpc.reflection.", "grpc.health.")


class _Session:
    """One reflection stream per question (simple, and every server answers it)."""

    def __init__(self, channel: grpc.Channel, path: str, timeout: float) -> None:
        self._call = channel.stream_stream(
            path,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        self._timeout = timeout

    def ask(self, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        for response in self._call(iter([request]), timeout=self._timeout):
            return response
        raise ConfigError("the upstream's reflection service answered nothing")


def fetch_file_set(
    channel: grpc.Channel, address: str, timeout: float = 10.0
) -> tuple[descriptor_pb2.FileDescriptorSet, str]:
    """The upstream's services as a FileDescriptorSet (dependencies first) and the reflection path used."""
    last: grpc.RpcError | None = None
    for path in REFLECTION_PATHS:
        session = _Session(channel, path, timeout)
        try:
            listed = session.ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        except grpc.RpcError as exc:
            last = exc
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                continue  # no v1 here: try v1alpha
            break
        return _files(session, listed, address), path
    assert last is not None
    raise ConfigError(
        f"cannot learn the contracts of {address} through server reflection ({last.code().name}: "
        f"{last.details()}); give --protos DIR or --descriptors FILE"
    )


def _files(
    session: _Session, listed: reflection_pb2.ServerReflectionResponse, address: str
) -> descriptor_pb2.FileDescriptorSet:
    services = [s.name for s in listed.list_services_response.service if not s.name.startswith(_SKIPPED)]
    if not services:
        raise ConfigError(f"{address} lists no services through reflection (only reflection and health)")
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def take(response: reflection_pb2.ServerReflectionResponse, what: str) -> None:
        if response.HasField("error_response"):
            raise ConfigError(
                f"{address}: reflection cannot describe {what}: {response.error_response.error_message}"
            )
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files.setdefault(proto.name, proto)

    for service in services:
        take(session.ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)), service)
    # Servers may send only the file asked for: fetch the imports they left out.
    missing = _missing(files)
    while missing:
        for name in missing:
            take(session.ask(reflection_pb2.ServerReflectionRequest(file_by_filename=name)), name)
        missing = _missing(files)
    out = descriptor_pb2.FileDescriptorSet()
    done: set[str] = set()

    def add(name: str) -> None:
        if name in done:
            return
        done.add(name)
        for dep in files[name].dependency:
            add(dep)
        out.file.append(files[name])

    for name in sorted(files):
        add(name)
    return out


def _missing(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> list[str]:
    return sorted({d for f in files.values() for d in f.dependency if d not in files})


def catalog_from_reflection(address: str, *, credentials: grpc.ChannelCredentials | None = None) -> Catalog:
    """A Catalog of the upstream's services, learned through its reflection service."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            file_set, _ = fetch_file_set(channel, address)
        except grpc.RpcError as exc:  # pragma: no cover - fetch_file_set turns them into ConfigError
            raise ConfigError(f"{address}: reflection failed: {exc.code().name}") from None
    return Catalog.from_file_set(file_set)
