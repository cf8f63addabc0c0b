"""The admin API of a running virtual server: gRPC service ``virtsvc.admin.v1.Admin``.

Served on the same port as the virtual services and listed by reflection, so grpcurl can call it. Its proto
is ``virtsvc/admin/v1/admin.proto``; the message classes come from the shipped descriptor set, not generated
modules::

    from virtsvc.admin import AdminClient

    admin = AdminClient(grpc.insecure_channel(server.address))
    admin.call("PutScenario", text=open("checkout.yaml").read())
"""

from virtsvc.admin.api import (
    ADMIN_SERVICE,
    METHODS,
    ORIGIN,
    AdminClient,
    admin_file_descriptor,
    message_class,
    messages,
)

__all__ = [
    "ADMIN_SERVICE",
    "METHODS",
    "ORIGIN",
    "AdminClient",
    "admin_file_descriptor",
    "message_class",
    "messages",
]
