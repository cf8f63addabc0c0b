"""The admin API's contract and client: ``virtsvc.admin.v1.Admin``.

Its messages come from ``v1/admin.binpb`` loaded into a private descriptor pool (no generated ``_pb2``
modules, which would pin the protobuf runtime). The service itself is ``virtsvc.server.admin``; this module
is what both the server and clients (the testing package, users' tools) need, and imports neither.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message

__all__ = [
    "ADMIN_SERVICE",
    "METHODS",
    "ORIGIN",
    "STREAMING",
    "AdminClient",
    "add_to_pool",
    "admin_file_descriptor",
    "message_class",
    "messages",
]


ADMIN_SERVICE = "virtsvc.admin.v1.Admin"
PROTO_NAME = "virtsvc/admin/v1/admin.proto"
ORIGIN = "<admin>"  # the "file" of scenarios and rules put through the API, in located messages
AUTH_MESSAGE = "admin calls need authorization: Bearer <token>"
_BINPB = Path(__file__).resolve().parent / "v1" / "admin.binpb"


def _load() -> tuple[descriptor_pb2.FileDescriptorSet, descriptor_pool.DescriptorPool]:
    file_set = descriptor_pb2.FileDescriptorSet.FromString(_BINPB.read_bytes())
    # Private: the user's own copies of the well-known types in the default pool can never conflict.
    pool = descriptor_pool.DescriptorPool()
    for proto in file_set.file:  # protoc --include_imports lists dependencies first
        pool.Add(proto)
    return file_set, pool


_FILE_SET, _POOL = _load()


def admin_file_descriptor() -> FileDescriptor:
    """The FileDescriptor of ``virtsvc/admin/v1/admin.proto`` (its dependencies reachable from it)."""
    return _POOL.FindFileByName(PROTO_NAME)


@functools.cache
def message_class(name: str) -> type[Message]:
    """An admin message class by short (``PutScenarioRequest``) or full name."""
    full = name if "." in name else f"virtsvc.admin.v1.{name}"
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full))


class _Messages:
    """The admin message classes as attributes: ``messages.PutScenarioRequest(text=...)``."""

    def __getattr__(self, name: str) -> type[Message]:
        try:
            return message_class(name)
        except KeyError:
            raise AttributeError(f"virtsvc.admin.v1 has no message {name}") from None

    def __dir__(self) -> list[str]:
        return sorted(m.name for m in admin_file_descriptor().message_types_by_name.values())


messages = _Messages()

#: method name -> (request class, response class)
METHODS: Mapping[str, tuple[type[Message], type[Message]]] = {
    m.name: (message_class(m.input_type.full_name), message_class(m.output_type.full_name))
    for m in admin_file_descriptor().services_by_name["Admin"].methods
}
#: the methods that answer with a server stream (the others are unary)
STREAMING = frozenset(
    m.name for m in admin_file_descriptor().services_by_name["Admin"].methods if m.server_streaming
)


def add_to_pool(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds the admin file and those of its imports that ``pool`` lacks (so reflection can describe it)."""
    for proto in _FILE_SET.file:
        try:
            pool.FindFileByName(proto.name)
        except KeyError:
            pool.Add(proto)


class AdminClient:
    """A small client: ``AdminClient(channel, token).call("PutScenario", text=...)`` returns the reply.

    Refusals raise ``grpc.RpcError`` (``.code()``, ``.details()``).
    """

    def __init__(self, channel: grpc.Channel, token: str | None = None, timeout: float | None = 10.0) -> None:
        self._channel = channel
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._stubs: dict[str, grpc.UnaryUnaryMultiCallable] = {}

    def call(self, method: str, request: Message | None = None, /, **fields: Any) -> Any:
        """Calls ``method`` with ``request``, or with a request built from ``fields``."""
        try:
            request_class, response_class = METHODS[method]
        except KeyError:
            raise ValueError(f"unknown admin method {method}; they are: {', '.join(METHODS)}") from None
        if method in STREAMING:
            raise ValueError(f"{method} answers with a stream: use AdminClient.watch()")
        stub = self._stubs.get(method)
        if stub is None:
            stub = self._stubs[method] = self._channel.unary_unary(
                f"/{ADMIN_SERVICE}/{method}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
        return stub(
            request if request is not None else request_class(**fields),
            metadata=self._metadata,
            timeout=self._timeout,
        )

    def watch(
        self,
        scenario: str = "",
        session: str = "",
        method: str = "",
        *,
        include_existing: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """``WatchJournal``: an iterator of JournalEntry messages as calls finish (empty filters match any).

        The result is also the grpc call: ``.cancel()`` ends the watch. It runs until then, until
        ``timeout`` (DEADLINE_EXCEEDED) or until the server stops (the iterator ends).
        """
        request_class, response_class = METHODS["WatchJournal"]
        stub = self._channel.unary_stream(
            f"/{ADMIN_SERVICE}/WatchJournal",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        request = request_class(
            scenario=scenario, session=session, method=method, include_existing=include_existing
        )
        return stub(request, metadata=self._metadata, timeout=timeout)
