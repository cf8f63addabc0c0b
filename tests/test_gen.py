"""`virtsvc gen` and virtsvc.contracts.protoc: real grpcio-tools compiles into tmp dirs, no mocks."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from virtsvc.cli import main
from virtsvc.contracts.protoc import (
    DESCRIPTORS_NAME,
    MANIFEST_NAME,
    GenResult,
    compile_descriptor_set,
    generate,
    include_paths,
    method_kind,
)
from virtsvc.errors import ConfigError, Problem, ProtoError

ESTATE = Path(__file__).resolve().parents[1] / "protos"
ESTATE_FILES = [
    "common/v1/money.proto",
    "common/v1/types.proto",
    "shop/v1/inventory.proto",
    "shop/v1/orders.proto",
    "shop/v1/payments.proto",
]
# independent of virtsvc.method_kind on purpose
KINDS = {
    (False, False): "unary",
    (False, True): "server_streaming",
    (True, False): "client_streaming",
    (True, True): "bidi_streaming",
}


@pytest.fixture
def protos(tmp_path: Path) -> Path:
    """A private copy of the example estate (tests edit it)."""
    dest = tmp_path / "protos"
    shutil.copytree(ESTATE, dest)
    return dest


def _load_set(out: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString((out / DESCRIPTORS_NAME).read_bytes())


def _snapshot(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """(inode, mtime_ns, content) of every file under ``out``."""
    snap = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            st = path.stat()
            snap[path.relative_to(out).as_posix()] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return snap


def _services_of(fds: descriptor_pb2.FileDescriptorSet, names: set[str]) -> dict[str, str]:
    """Method full name -> kind, straight from the FileDescriptorProtos of ``names``."""
    found = {}
    for file in fds.file:
        if file.name in names:
            for service in file.service:
                for m in service.method:
                    full = (
                        f"{file.package}.{service.name}/{m.name}"
                        if file.package
                        else f"{service.name}/{m.name}"
                    )
                    found[full] = KINDS[(m.client_streaming, m.server_streaming)]
    return found


def _manifest_methods(manifest: dict) -> dict[str, str]:
    return {
        method["full_name"]: method["kind"]
        for service in manifest["services"].values()
        for method in service["methods"].values()
    }


def test_method_kind() -> None:
    assert {k: method_kind(*k) for k in KINDS} == KINDS


def test_include_paths_has_well_known_and_googleapis_after_extra(tmp_path: Path) -> None:
    paths = include_paths([tmp_path])
    assert paths[0] == tmp_path.resolve()
    assert any((p / "google/protobuf/timestamp.proto").is_file() for p in paths[1:])
    assert any((p / "google/api/annotations.proto").is_file() for p in paths[1:])
    with pytest.raises(ConfigError, match="does not exist"):
        include_paths([tmp_path / "nope"])


def test_generate_estate(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = generate(protos, out)
    assert isinstance(result, GenResult)
    assert result.compiled == ESTATE_FILES
    assert result.removed == []

    # modules mirror the package tree; nothing generated for the well-known imports
    modules = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.py*"))
    expected = sorted(
        f"{f[:-6]}{suffix}" for f in ESTATE_FILES for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    )
    assert modules == expected
    assert not (out / "google").exists()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest == result.manifest
    assert manifest["version"] == 1
    assert sorted(manifest["outputs"]) == sorted([*expected, DESCRIPTORS_NAME, MANIFEST_NAME])
    assert sorted(result.written) == manifest["outputs"]

    assert set(manifest["files"]) == set(ESTATE_FILES)
    assert manifest["files"]["shop/v1/payments.proto"]["imports"] == [
        "common/v1/money.proto",
        "google/protobuf/any.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
    ]
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["files"]["common/v1/money.proto"]["sha256"])

    services = manifest["services"]
    assert set(services) == {"shop.v1.Inventory", "shop.v1.Payments", "shop.v1.Orders"}
    assert services["shop.v1.Inventory"]["file"] == "shop/v1/inventory.proto"
    assert services["shop.v1.Inventory"]["methods"]["Reserve"] == {
        "full_name": "shop.v1.Inventory/Reserve",
        "kind": "unary",
        "input_type": "shop.v1.ReserveRequest",
        "output_type": "shop.v1.ReserveResponse",
    }
    methods = _manifest_methods(manifest)
    assert methods["shop.v1.Inventory/Watch"] == "server_streaming"
    assert methods["shop.v1.Inventory/BulkUpdate"] == "client_streaming"
    assert methods["shop.v1.Orders/Track"] == "bidi_streaming"
    assert methods["shop.v1.Payments/Charge"] == "unary"
    assert methods["shop.v1.Inventory/Ping"] == "unary"
    fds = _load_set(out)
    assert methods == _services_of(fds, set(ESTATE_FILES))

    # the descriptor set: every file and import, dependencies first, with source info
    names = [f.name for f in fds.file]
    assert "google/protobuf/timestamp.proto" in names
    assert set(ESTATE_FILES) <= set(names)
    assert len(names) == len(set(names))
    for i, file in enumerate(fds.file):
        assert set(file.dependency) <= set(names[:i]), file.name
    assert all(f.source_code_info.location for f in fds.file)
    inventory = next(f for f in fds.file if f.name == "shop/v1/inventory.proto")
    comments = [loc.leading_comments for loc in inventory.source_code_info.location]
    assert any("Stock levels and reservations" in c for c in comments)


def test_generated_modules_import(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    # a subprocess, so the test process's default descriptor pool stays clean
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(out)!r})
        from shop.v1 import inventory_pb2, inventory_pb2_grpc, orders_pb2_grpc
        from common.v1 import money_pb2
        req = inventory_pb2.ReserveRequest(sku="A-1", qty=2, labels={{"k": "v"}})
        req.hold_for.seconds = 30
        assert inventory_pb2.ReserveRequest.FromString(req.SerializeToString()) == req
        assert hasattr(inventory_pb2_grpc, "InventoryStub") and hasattr(orders_pb2_grpc, "OrdersServicer")
        print(money_pb2.Money(currency_code="EUR", units=1250).units)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1250"


def test_second_run_is_a_noop(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    before = _snapshot(out)
    result = generate(protos, out)
    assert (result.compiled, result.written, result.removed) == ([], [], [])
    assert result.manifest == json.loads((out / MANIFEST_NAME).read_text())
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".virtsvc-gen-*"))


def test_touching_without_changing_is_a_noop(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    before = _snapshot(out)
    money = protos / "common/v1/money.proto"
    money.write_bytes(money.read_bytes())  # new mtime, same content
    assert generate(protos, out).compiled == []
    assert _snapshot(out) == before


def test_change_recompiles_file_and_its_importers_only(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    full_set = (out / DESCRIPTORS_NAME).read_bytes()
    before = _snapshot(out)
    money = protos / "common/v1/money.proto"
    money.write_text(money.read_text().replace("int64 units = 2;", "int64 units = 2;\n  string note = 3;"))

    result = generate(protos, out)
    assert result.compiled == ["common/v1/money.proto", "shop/v1/orders.proto", "shop/v1/payments.proto"]
    after = _snapshot(out)
    for rel in ("shop/v1/inventory_pb2.py", "shop/v1/inventory_pb2_grpc.py", "common/v1/types_pb2.py"):
        assert after[rel] == before[rel], rel  # same inode, mtime and content
    for rel in ("common/v1/money_pb2.py", "common/v1/money_pb2.pyi", DESCRIPTORS_NAME, MANIFEST_NAME):
        assert rel in result.written
        assert after[rel][2] != before[rel][2]
    # orders/payments were recompiled, but their generated code does not change: not rewritten
    assert "shop/v1/orders_pb2.py" not in result.written
    assert after["shop/v1/orders_pb2.py"] == before["shop/v1/orders_pb2.py"]

    # the merged descriptor set equals what a fresh full compile gives
    fresh = tmp_path / "fresh"
    generate(protos, fresh)
    assert (out / DESCRIPTORS_NAME).read_bytes() == (fresh / DESCRIPTORS_NAME).read_bytes() != full_set
    assert json.loads((out / MANIFEST_NAME).read_text()) == json.loads((fresh / MANIFEST_NAME).read_text())
    money_fd = next(f for f in _load_set(out).file if f.name == "common/v1/money.proto")
    assert [f.name for f in money_fd.message_type[0].field] == ["currency_code", "units", "note"]


def test_removed_file_outputs_are_removed(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    (protos / "shop/v1/orders.proto").unlink()
    result = generate(protos, out)
    assert result.compiled == []
    assert result.removed == ["shop/v1/orders_pb2.py", "shop/v1/orders_pb2.pyi", "shop/v1/orders_pb2_grpc.py"]
    assert not list(out.rglob("orders_pb2*"))
    assert "shop.v1.Orders" not in result.manifest["services"]
    assert "shop/v1/orders.proto" not in [f.name for f in _load_set(out).file]
    # common/v1/money.proto is still needed by payments; a whole directory going away is pruned
    shutil.rmtree(protos / "shop")
    generate(protos, out)
    assert not (out / "shop").exists()
    assert [f.name for f in _load_set(out).file] == [
        "common/v1/money.proto",
        "google/protobuf/timestamp.proto",
        "common/v1/types.proto",
    ]


def test_removing_an_imported_file_fails_its_importers(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    before = _snapshot(out)
    (protos / "common/v1/money.proto").unlink()
    with pytest.raises(ProtoError) as exc:
        generate(protos, out)
    # protoc stops at the first input that fails; inputs go in sorted order
    assert exc.value.problems[0] == Problem(
        f"{protos.as_posix()}/shop/v1/orders.proto",
        5,
        'Import "common/v1/money.proto" was not found or had errors.',
        1,
    )
    assert _snapshot(out) == before


def test_unreadable_previous_run_rebuilds_without_rewriting(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    before = _snapshot(out)
    (out / MANIFEST_NAME).write_text("{not json")
    result = generate(protos, out)
    assert result.compiled == ESTATE_FILES
    assert result.written == [MANIFEST_NAME]
    assert _snapshot(out) == {**before, MANIFEST_NAME: _snapshot(out)[MANIFEST_NAME]}
    (out / DESCRIPTORS_NAME).write_bytes(b"garbage")
    assert generate(protos, out).written == [DESCRIPTORS_NAME]


def test_unwritable_out_is_a_plain_error(protos: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    assert main(["gen", "protos", "-o", "afile/out"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtsvc: error: ") and "afile" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "protos"]


def test_deleted_output_is_regenerated(protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(protos, out)
    (out / "shop/v1/inventory_pb2.py").unlink()
    result = generate(protos, out)
    assert result.compiled == ["shop/v1/inventory.proto"]
    assert result.written == ["shop/v1/inventory_pb2.py"]


def test_include_change_forces_recompile_and_included_files_are_tracked(protos: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "ext/v1").mkdir(parents=True)
    (lib / "ext/v1/ext.proto").write_text(
        'syntax = "proto3";\npackage ext.v1;\nmessage Ext { string a = 1; }\n'
    )
    (protos / "shop/v1/uses_ext.proto").write_text(
        'syntax = "proto3";\npackage shop.v1;\nimport "ext/v1/ext.proto";\n'
        "message UsesExt { ext.v1.Ext e = 1; }\n"
    )
    out = tmp_path / "out"
    first = generate(protos, out, [lib])
    assert "ext/v1/ext.proto" in [f.name for f in _load_set(out).file]
    assert not (out / "ext").exists()  # only files under PROTO_DIR get modules
    assert "ext/v1/ext.proto" in first.manifest["dependencies"]

    # an edit in the include dir recompiles its importers only
    (lib / "ext/v1/ext.proto").write_text(
        'syntax = "proto3";\npackage ext.v1;\nmessage Ext { int32 b = 2; }\n'
    )
    assert generate(protos, out, [lib]).compiled == ["shop/v1/uses_ext.proto"]
    ext = next(f for f in _load_set(out).file if f.name == "ext/v1/ext.proto")
    assert ext.message_type[0].field[0].name == "b"

    # a different include set recompiles everything (but rewrites only what differs)
    lib2 = tmp_path / "lib2"
    shutil.copytree(lib, lib2)
    result = generate(protos, out, [lib2])
    assert result.compiled == sorted([*ESTATE_FILES, "shop/v1/uses_ext.proto"])
    assert "shop/v1/inventory_pb2.py" not in result.written


def test_cli_summary_lines(protos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--log-format", "json", "gen", "protos", "-o", "gen"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "generated 17 files from 5 protos into gen/\n"
    event = json.loads(captured.err.strip().splitlines()[-1])
    assert event["event"] == "gen.completed"
    assert (event["protos"], event["compiled"], event["written"], event["removed"]) == (5, 5, 17, 0)
    assert main(["gen", "protos", "-o", "gen"]) == 0
    assert capsys.readouterr().out == "gen/ is up to date (5 protos)\n"
    (protos / "shop/v1/orders.proto").unlink()
    assert main(["gen", "protos", "-o", "gen"]) == 0
    assert capsys.readouterr().out == "updated gen/: 2 files written, 3 removed\n"


BROKEN = """\
syntax = "proto3";
package shop.v1;
import "common/v1/money.proto";
message Broken { int32 a = 1 }
"""

UNRESOLVED = """\
syntax = "proto3";
package shop.v1;
import "shop/v1/nope.proto";
import "google/protobuf/empty.proto";
message Unresolved { google.protobuf.Empty e = 1; }
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BROKEN, 'protos/shop/v1/x.proto:4:30: Expected ";".\n'),
        (
            UNRESOLVED,
            'protos/shop/v1/x.proto:3:1: Import "shop/v1/nope.proto" was not found or had errors.\n',
        ),
    ],
    ids=["syntax-error", "unresolved-import"],
)
def test_cli_error_format_and_out_untouched(
    protos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, text: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["gen", "protos"]) == 0
    before = _snapshot(tmp_path / "generated")
    capsys.readouterr()
    (protos / "shop/v1/x.proto").write_text(text)
    (protos / "common/v1/money.proto").write_text((protos / "common/v1/money.proto").read_text() + "\n// x\n")

    assert main(["gen", "protos"]) == 1
    captured = capsys.readouterr()
    assert captured.err == expected
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert _snapshot(tmp_path / "generated") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated", "protos"]  # no staging dir left


def test_error_paths_as_typed(protos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (protos / "shop/v1/x.proto").write_text(BROKEN)
    monkeypatch.chdir(tmp_path)
    for given, shown in [
        (Path("protos"), "protos"),
        (Path("./protos/"), "protos"),
        (protos, "protos"),  # absolute under the cwd: relative to it
        (Path("protos/../protos"), "protos/../protos"),
    ]:
        with pytest.raises(ProtoError) as exc:
            generate(given, tmp_path / "out")
        assert exc.value.problems == [Problem(f"{shown}/shop/v1/x.proto", 4, 'Expected ";".', 30)]
    assert not (tmp_path / "out").exists()


def test_error_in_include_dir_is_located_there(
    protos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vendor/ext").mkdir(parents=True)
    (tmp_path / "vendor/ext/bad.proto").write_text('syntax = "proto3";\nmessage Bad { int32 a = 1 }\n')
    (protos / "uses.proto").write_text('syntax = "proto3";\nimport "ext/bad.proto";\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProtoError) as exc:
        generate(Path("protos"), Path("out"), [Path("vendor")])
    assert [str(p) for p in exc.value.problems] == [
        'vendor/ext/bad.proto:2:27: Expected ";".',
        'protos/uses.proto:2:1: Import "ext/bad.proto" was not found or had errors.',
    ]


def test_empty_and_missing_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty/sub").mkdir(parents=True)
    (tmp_path / "empty/sub/readme.txt").write_text("no protos here")
    (tmp_path / "afile").write_text("")
    assert main(["gen", "empty"]) == 1
    assert capsys.readouterr().err == "virtsvc: error: empty: no .proto files found\n"
    assert main(["gen", "missing"]) == 1
    assert capsys.readouterr().err == "virtsvc: error: missing: no such directory\n"
    assert main(["gen", "afile"]) == 1
    assert "afile: not a directory" in capsys.readouterr().err
    assert main(["gen", "empty", "-I", "nowhere"]) == 1
    assert not (tmp_path / "generated").exists()


def test_usage_errors_exit_2(capsys) -> None:
    assert main([]) == 2
    assert main(["gen", "--bogus"]) == 2
    err = capsys.readouterr().err
    # One line per usage error, pointing at --help rather than repeating the whole usage.
    assert err.splitlines() == [
        "virtsvc: error: the following arguments are required: COMMAND (see 'virtsvc --help')",
        "virtsvc: error: unrecognized arguments: --bogus (see 'virtsvc --help')",
    ]


def test_googleapis_imports_resolve_automatically(protos: Path, tmp_path: Path) -> None:
    (protos / "shop/v1/http.proto").write_text(
        textwrap.dedent(
            """\
            syntax = "proto3";
            package shop.v1;
            import "google/api/annotations.proto";
            import "google/rpc/status.proto";
            import "google/type/money.proto";
            service Catalog {
              rpc Get(google.type.Money) returns (google.rpc.Status) {
                option (google.api.http) = { get: "/v1/catalog" };
              }
            }
            """
        )
    )
    out = tmp_path / "out"
    result = generate(protos, out)
    names = [f.name for f in _load_set(out).file]
    assert {
        "google/api/annotations.proto",
        "google/api/http.proto",
        "google/protobuf/descriptor.proto",
    } <= set(names)
    assert not (out / "google").exists()
    assert (
        result.manifest["services"]["shop.v1.Catalog"]["methods"]["Get"]["input_type"] == "google.type.Money"
    )


def _wheel_tree(dest: Path) -> set[str]:
    """The .proto files of googleapis-common-protos and google-cloud-pubsub under their import paths."""
    shipped: dict[str, str] = {}
    for dist in ("googleapis-common-protos", "google-cloud-pubsub"):
        for file in importlib.metadata.files(dist) or ():
            if file.suffix == ".proto":
                text = Path(str(file.locate())).read_text(encoding="utf-8")
                package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M)
                assert package, file
                # googleapis convention: the import path follows the package
                # (pubsub ships its protos under google/cloud/pubsub_v1/proto/)
                shipped[f"{package[1].replace('.', '/')}/{file.name}"] = text
    grpc_tools_protos = include_paths()[0]
    well_known = {p.relative_to(grpc_tools_protos).as_posix() for p in grpc_tools_protos.rglob("*.proto")}
    # keep only files whose imports are all shipped in an installed wheel (dropping one can orphan others)
    while True:
        broken = {
            name
            for name, text in shipped.items()
            if any(
                i not in shipped and i not in well_known
                for i in re.findall(r'^import\s+"([^"]+)"', text, re.M)
            )
        }
        if not broken:
            break
        for name in broken:
            del shipped[name]
    for name, text in shipped.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text, encoding="utf-8")
    return set(shipped)


def test_real_googleapis_and_pubsub_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    tree = tmp_path / "tree"
    names = _wheel_tree(tree)
    assert {
        "google/pubsub/v1/pubsub.proto",
        "google/pubsub/v1/schema.proto",
        "google/api/annotations.proto",
    } <= names
    # the tree's own google/api wins over the automatic googleapis include
    http = tree / "google/api/http.proto"
    http.write_text(http.read_text() + "\nmessage VirtsvcTreeMarker {}\n")

    monkeypatch.chdir(tmp_path)
    assert main(["gen", "tree", "-o", "out"]) == 0
    assert capsys.readouterr().out.startswith(
        f"generated {3 * len(names) + 2} files from {len(names)} protos"
    )
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    fds = _load_set(tmp_path / "out")

    assert set(manifest["files"]) == names
    expected = _services_of(fds, names)
    assert len(expected) >= 30  # pubsub alone has ~30 methods
    assert _manifest_methods(manifest) == expected
    services = {f"{f.package}.{s.name}" for f in fds.file if f.name in names for s in f.service}
    assert set(manifest["services"]) == services
    assert expected["google.pubsub.v1.Subscriber/StreamingPull"] == "bidi_streaming"
    assert expected["google.pubsub.v1.Publisher/Publish"] == "unary"
    assert manifest["services"]["google.pubsub.v1.Publisher"]["file"] == "google/pubsub/v1/pubsub.proto"
    assert "google.longrunning.Operations" in services

    http_fd = next(f for f in fds.file if f.name == "google/api/http.proto")
    assert "VirtsvcTreeMarker" in [m.name for m in http_fd.message_type]
    assert (tmp_path / "out/google/pubsub/v1/pubsub_pb2_grpc.py").is_file()
    assert (tmp_path / "out/google/api/http_pb2.py").is_file()
    assert not (tmp_path / "out/google/protobuf").exists()

    assert main(["gen", "tree", "-o", "out"]) == 0
    assert capsys.readouterr().out == f"out/ is up to date ({len(names)} protos)\n"


def test_compile_descriptor_set_is_cached(protos: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = compile_descriptor_set(protos, cache_dir=cache)
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    names = [f.name for f in fds.file]
    assert set(ESTATE_FILES) | {"google/protobuf/timestamp.proto"} <= set(names)
    assert all(f.source_code_info.location for f in fds.file)
    entries = sorted(p.name for p in (cache / "descriptors").iterdir())
    assert len(entries) == 2  # the set and the hashes of the imports it was compiled from

    # a hit is served from disk without compiling: make the cached entry recognisable
    entry = next((cache / "descriptors").glob("*.binpb"))
    marker = descriptor_pb2.FileDescriptorSet(file=[descriptor_pb2.FileDescriptorProto(name="m.proto")])
    entry.write_bytes(marker.SerializeToString())
    assert compile_descriptor_set(protos, cache_dir=cache) == marker.SerializeToString()
    entry.write_bytes(data)

    # a content change is a new key
    money = protos / "common/v1/money.proto"
    money.write_text(money.read_text() + "\nmessage Extra {}\n")
    changed = compile_descriptor_set(protos, cache_dir=cache)
    assert changed != data
    assert "Extra" in [
        m.name for f in descriptor_pb2.FileDescriptorSet.FromString(changed).file for m in f.message_type
    ]
    assert len(list((cache / "descriptors").glob("*.binpb"))) == 2

    # errors are ProtoErrors, nothing cached
    (protos / "bad.proto").write_text(BROKEN)
    with pytest.raises(ProtoError):
        compile_descriptor_set(protos, cache_dir=cache)
    assert len(list((cache / "descriptors").glob("*.binpb"))) == 2


def test_compile_descriptor_set_default_cache_dir(protos: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    compile_descriptor_set(protos)
    assert len(list((tmp_path / "xdg/virtsvc/descriptors").glob("*.binpb"))) == 1


def test_cache_hit_checks_imported_files(protos: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "ext.proto").write_text('syntax = "proto3";\nmessage Ext { string a = 1; }\n')
    (protos / "uses.proto").write_text('syntax = "proto3";\nimport "ext.proto";\nmessage U { Ext e = 1; }\n')
    first = compile_descriptor_set(protos, [lib], cache_dir=tmp_path / "cache")
    (lib / "ext.proto").write_text('syntax = "proto3";\nmessage Ext { int64 b = 2; }\n')
    second = compile_descriptor_set(protos, [lib], cache_dir=tmp_path / "cache")
    assert first != second


def test_concurrent_generate_in_threads(protos: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.proto").write_text(BROKEN)
    errors: list[BaseException] = []
    results: list[GenResult] = []

    def run(i: int) -> None:
        try:
            if i % 2:
                with pytest.raises(ProtoError) as exc:
                    generate(bad, tmp_path / f"out{i}")
                assert exc.value.problems[0].line == 4
            else:
                results.append(generate(protos, tmp_path / f"out{i}"))
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({(tmp_path / f"out{i}" / DESCRIPTORS_NAME).read_bytes() for i in range(0, 6, 2)}) == 1
    assert all(len(r.compiled) == 5 for r in results)
