"""Rebuilds ``v1/admin.binpb`` from ``v1/admin.proto``: ``python virtsvc/admin/build.py [--check]``.

The admin service ships as a serialized FileDescriptorSet (with its imports) rather than generated
``_pb2`` modules, which would pin the protobuf runtime version. This script imports nothing from virtsvc,
so it runs even when the binpb is missing or stale; ``tests/test_admin.py`` re-runs it to catch drift.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # holds the virtsvc package, so the file is named virtsvc/admin/v1/admin.proto
PROTO_NAME = "virtsvc/admin/v1/admin.proto"
BINPB = HERE / "v1" / "admin.binpb"


def build() -> bytes:
    """The FileDescriptorSet of admin.proto and its imports (dependencies first), serialized."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "admin.binpb"
        code = protoc.main(
            [
                "protoc",
                f"-I{ROOT}",
                f"-I{well_known}",
                "--include_imports",
                "--include_source_info",  # keeps the comments for `grpcurl -protoset admin.binpb describe`
                f"--descriptor_set_out={out}",
                PROTO_NAME,
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {PROTO_NAME} (exit {code}); see its messages above")
        return out.read_bytes()


def admin_file(data: bytes) -> descriptor_pb2.FileDescriptorProto:
    """The admin file's own entry of a serialized set (its imports vary with the grpcio-tools version)."""
    file_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    for proto in file_set.file:
        if proto.name == PROTO_NAME:
            return proto
    raise LookupError(f"{PROTO_NAME} is not in the descriptor set")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    data = build()
    if "--check" in args:
        current = BINPB.read_bytes() if BINPB.exists() else b""
        if not current or admin_file(current) != admin_file(data):
            print(f"{BINPB} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    BINPB.write_bytes(data)
    print(f"wrote {BINPB} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
