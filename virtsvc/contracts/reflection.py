"""Server reflection under both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection registers only v1alpha; grpcurl and Postman try v1 first. The two protocols are the same
messages under another package, so one servicer answers both paths with the v1alpha message classes, and a
renamed copy of the reflection proto makes v1 itself describable. Method symbols (``pkg.Svc.Method``)
resolve too, which the upb pool alone does not do.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.reflection import ReflectionServicer

__all__ = ["REFLECTION_SERVICES", "add_reflection", "reflection_files"]

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_SERVICES = (V1, V1ALPHA)


def reflection_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The v1alpha reflection proto and its v1 twin, to add to the served pool."""
    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(alpha)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    prefix = ".grpc.reflection.v1alpha."
    for message in v1.message_type:
        for fld in message.field:
            if fld.type_name.startswith(prefix):
                fld.type_name = ".grpc.reflection.v1." + fld.type_name[len(prefix) :]
    for service in v1.service:
        for method in service.method:
            method.input_type = method.input_type.replace(prefix, ".grpc.reflection.v1.")
            method.output_type = method.output_type.replace(prefix, ".grpc.reflection.v1.")
    v1.options.Clear()
    return [alpha, v1]


class _Servicer(ReflectionServicer):
    def _file_containing_symbol(self, request, fully_qualified_name):  # type: ignore[no-untyped-def]
        pool: descriptor_pool.DescriptorPool = self._pool
        try:
            pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            try:
                method = pool.FindMethodByName(fully_qualified_name)
            except KeyError:
                pass
            else:
                fully_qualified_name = method.containing_service.full_name
        return super()._file_containing_symbol(request, fully_qualified_name)


def add_reflection(
    server: grpc.Server, services: Iterable[str], pool: descriptor_pool.DescriptorPool
) -> None:
    """Serves reflection for ``services`` (plus reflection itself) from ``pool``."""
    for proto in reflection_files():
        try:
            pool.FindFileByName(proto.name)
        except KeyError:
            pool.Add(proto)
    names = sorted({*services, *REFLECTION_SERVICES})
    servicer = _Servicer(names, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(V1ALPHA, {"ServerReflectionInfo": handler}),
            grpc.method_handlers_generic_handler(V1, {"ServerReflectionInfo": handler}),
        ]
    )
