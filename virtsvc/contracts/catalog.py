"""Descriptor sets loaded into a private pool: method name -> MethodSpec.

Serving never needs generated modules: message classes come from the descriptors through the message
factory. The pool is private so that a test process that also imports the user's generated stubs into
the default pool never sees a conflict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FileDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message

from virtsvc import _text
from virtsvc.contracts.kinds import MethodKind, method_kind
from virtsvc.errors import ConfigError, DescriptorError

__all__ = [
    "HEALTH_SERVICE",
    "Catalog",
    "MethodKind",
    "MethodSpec",
    "load_catalog",
    "method_kind",
    "normalize_method_name",
]

HEALTH_SERVICE = "grpc.health.v1.Health"  # served by every virtual server; scenarios may answer for services


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """One RPC method: its names, cardinality and message types."""

    full_name: str  # "shop.v1.Inventory/Reserve", the form scenarios use
    service: str
    name: str
    kind: MethodKind
    input: Descriptor
    output: Descriptor
    input_class: type[Message]
    output_class: type[Message]
    descriptor: MethodDescriptor

    @property
    def path(self) -> str:
        """The HTTP/2 path gRPC puts on the wire: ``/shop.v1.Inventory/Reserve``."""
        return "/" + self.full_name

    @property
    def client_streaming(self) -> bool:
        return self.kind in ("client_streaming", "bidi_streaming")

    @property
    def server_streaming(self) -> bool:
        return self.kind in ("server_streaming", "bidi_streaming")


@dataclass(eq=False)
class Catalog:
    """Every service and message type of a descriptor set, resolved in a private pool."""

    pool: descriptor_pool.DescriptorPool
    file_set: descriptor_pb2.FileDescriptorSet
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    services: tuple[str, ...] = ()
    #: methods every virtual server serves itself that scenarios may answer too (health's Check and Watch)
    builtin: dict[str, MethodSpec] = field(default_factory=dict)

    @classmethod
    def from_file_set(
        cls,
        file_set: descriptor_pb2.FileDescriptorSet,
        extra_files: Iterable[FileDescriptor] = (),
    ) -> Catalog:
        """Builds a catalog; ``extra_files`` (health, admin...) join the pool but add no virtual services."""
        pool = descriptor_pool.DescriptorPool()
        names = set()
        for proto in file_set.file:
            if proto.name in names:
                continue
            names.add(proto.name)
            try:
                pool.Add(proto)
            except (TypeError, ValueError) as exc:
                raise DescriptorError(f"descriptor set: cannot add {proto.name}: {exc}") from None
        _add_with_dependencies(pool, [*_standard_files(), *extra_files], names)
        methods: dict[str, MethodSpec] = {}
        services: list[str] = []
        for proto in file_set.file:
            file_desc = pool.FindFileByName(proto.name)
            for service in file_desc.services_by_name.values():
                if service.full_name in services:
                    continue
                services.append(service.full_name)
                for m in service.methods:
                    methods[f"{service.full_name}/{m.name}"] = _spec(m)
        health = pool.FindServiceByName(HEALTH_SERVICE)
        builtin = {
            f"{HEALTH_SERVICE}/{name}": _spec(health.methods_by_name[name]) for name in ("Check", "Watch")
        }
        return cls(
            pool=pool, file_set=file_set, methods=methods, services=tuple(sorted(services)), builtin=builtin
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, origin: str = "descriptor set") -> Catalog:
        file_set = descriptor_pb2.FileDescriptorSet()
        try:
            file_set.ParseFromString(data)
        except DecodeError:
            raise DescriptorError(f"{origin}: not a serialized FileDescriptorSet") from None
        if not file_set.file:
            raise DescriptorError(f"{origin}: the descriptor set holds no files")
        return cls.from_file_set(file_set)

    @classmethod
    def from_file(cls, path: Path) -> Catalog:
        """Loads ``descriptors.binpb`` written by ``virtsvc gen``, or any exported FileDescriptorSet."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise DescriptorError(f"{path}: no such descriptor set (run `virtsvc gen` first?)") from None
        except OSError as exc:
            raise DescriptorError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.from_bytes(data, origin=str(path))

    @classmethod
    def from_protos(
        cls, proto_dir: Path, includes: Sequence[Path] = (), cache_dir: Path | None = None
    ) -> Catalog:
        """Compiles a proto tree on the fly (cached by content hash, so a restart does not recompile)."""
        from virtsvc.contracts import protoc as _protoc

        return cls.from_bytes(
            _protoc.compile_descriptor_set(proto_dir, includes, cache_dir=cache_dir), origin=str(proto_dir)
        )

    def find(self, name: str) -> MethodSpec | None:
        """A method of the protos, or a built-in one scenarios may answer (``grpc.health.v1.Health/Check``);
        None when there is none of that name."""
        wanted = normalize_method_name(name)
        return self.methods.get(wanted) or self.builtin.get(wanted)

    def method(self, name: str) -> MethodSpec:
        """Finds a method by ``pkg.Svc/Method`` (a leading slash or ``pkg.Svc.Method`` also work).

        Raises KeyError with a message naming the closest known methods.
        """
        spec = self.find(name)
        if spec is None:
            raise KeyError(self.unknown_method_message(name))
        return spec

    def unknown_method_message(self, name: str) -> str:
        wanted = normalize_method_name(name)
        service, _, method = wanted.rpartition("/")
        known = {**self.methods, **self.builtin}
        siblings = [m.name for m in known.values() if m.service == service]
        if siblings:
            # A known service: compare method names alone (a long shared prefix would make everything close).
            close = [f"{service}/{m}" for m in _text.closest(method, siblings, n=3)]
        else:
            close = _text.closest(wanted, list(self.methods), n=3)
        text = f'unknown method "{name}"'
        if close:
            text += "; " + _text.alternatives(close)
        elif siblings:
            text += f"; the methods of {service} are " + ", ".join(siblings)
        elif self.services:
            text += "; the services here are " + ", ".join(self.services)
        return text

    def message_class(self, full_name: str) -> type[Message]:
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def by_service(self) -> Mapping[str, list[MethodSpec]]:
        out: dict[str, list[MethodSpec]] = {s: [] for s in self.services}
        for spec in self.methods.values():
            out[spec.service].append(spec)
        return out


def _spec(method: MethodDescriptor) -> MethodSpec:
    service = method.containing_service.full_name
    return MethodSpec(
        full_name=f"{service}/{method.name}",
        service=service,
        name=method.name,
        kind=method_kind(method.client_streaming, method.server_streaming),
        input=method.input_type,
        output=method.output_type,
        input_class=message_factory.GetMessageClass(method.input_type),
        output_class=message_factory.GetMessageClass(method.output_type),
        descriptor=method,
    )


def normalize_method_name(name: str) -> str:
    """``/pkg.Svc/M`` and ``pkg.Svc.M`` both become ``pkg.Svc/M``."""
    name = name.strip().lstrip("/")
    if "/" not in name and name.count(".") >= 1:
        service, _, method = name.rpartition(".")
        name = f"{service}/{method}"
    return name


def _standard_files() -> list[FileDescriptor]:
    """Files every virtual server resolves, whatever the user's protos import.

    Health (so grpcurl can describe it), and google.rpc's Status and error details (so rich error
    details in scenarios can be packed, and decoded by clients through reflection).
    """
    from google.rpc import error_details_pb2, status_pb2
    from grpc_health.v1 import health_pb2

    return [status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR]


def _add_with_dependencies(
    pool: descriptor_pool.DescriptorPool, files: Iterable[FileDescriptor], seen: set[str]
) -> None:
    for file_desc in files:
        if file_desc.name in seen:
            continue
        _add_with_dependencies(pool, file_desc.dependencies, seen)
        proto = descriptor_pb2.FileDescriptorProto()
        file_desc.CopyToProto(proto)
        pool.Add(proto)
        seen.add(file_desc.name)


def load_catalog(
    protos: str | Path | None = None,
    descriptors: str | Path | None = None,
    includes: Sequence[str | Path] = (),
) -> Catalog:
    """The descriptors to serve: an exported/generated descriptor set, or a proto tree compiled on the fly."""
    if descriptors is not None and protos is not None:
        raise ConfigError("give either protos or descriptors, not both")
    if descriptors is not None:
        return Catalog.from_file(Path(descriptors))
    if protos is not None:
        return Catalog.from_protos(Path(protos), [Path(i) for i in includes])
    raise ConfigError(
        "nothing to serve: give protos (a directory of .proto files) or descriptors (a descriptor set)"
    )
