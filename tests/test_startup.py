"""What keeps the commands quick to start: gen's lean import set and its own json log lines, gen's reading of
descriptor sets off the wire, and serve's garbage-collector handling. Timings live in bench/, not here."""

from __future__ import annotations

import gc
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from virtsvc import _logs
from virtsvc.cli import configure_logging, main
from virtsvc.contracts import protoc as _protoc

ROOT = Path(__file__).resolve().parent.parent
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


def test_gen_imports_neither_structlog_nor_the_serving_stack(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        before = set(sys.modules)  # the interpreter's own, and what site's .pth files import
        from virtsvc.cli import main
        argv = ["--log-format", "json", "gen", {str(ROOT / "protos")!r}, "-o", {str(tmp_path / "out")!r}]
        assert main(argv) == 0
        # (not shutil: argparse's help formatter imports it, and the editable install's finder does too)
        heavy = ("structlog", "grpc", "jinja2", "yaml", "regex", "google.protobuf.descriptor_pb2",
                 "importlib.metadata", "tempfile", "logging", "asyncio", "ssl", "datetime")
        print(sorted(name for name in heavy if name in set(sys.modules) - before))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    event = json.loads(done.stderr.strip().splitlines()[-1])
    assert (event["event"], event["level"], event["protos"]) == ("gen.completed", "info", 5)


class _Thing:
    def __repr__(self) -> str:
        return "<thing>"


@pytest.mark.parametrize("method", ["debug", "info", "warning", "error"])
def test_json_lines_render_as_structlog_does(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """_logs' own json lines and structlog's chain (configure_logging("json")) give the same line."""
    kw = {"out": "gen/", "protos": 5, "path": Path("a b"), "thing": _Thing(), "text": 'é\n"', "n": None}
    structlog_out, own_out = io.StringIO(), io.StringIO()

    monkeypatch.setattr(sys, "stderr", structlog_out)
    configure_logging("json")
    getattr(_logs.get_logger("virtsvc.test"), method)("some.event", **kw)

    monkeypatch.setattr(sys, "stderr", own_out)
    # (its loggers use it only while structlog is not imported, which it is in this process)
    _logs._JsonLines(20, "stderr", lambda: None).emit(method, "some.event", kw)

    assert own_out.getvalue().count("\n") == structlog_out.getvalue().count("\n") == (method != "debug")
    if method == "debug":
        return
    ours, theirs = json.loads(own_out.getvalue()), json.loads(structlog_out.getvalue())
    assert ISO_UTC.fullmatch(ours.pop("timestamp")) and ISO_UTC.fullmatch(theirs.pop("timestamp"))
    assert list(ours.items()) == list(theirs.items())  # keys in the same order too


def test_gen_logs_the_same_line_with_or_without_structlog(tmp_path: Path, capsys) -> None:
    def strip(err: str) -> str:
        return re.sub(r'"timestamp": "[^"]+"', "", err)

    # in this process structlog is imported, so main() configures it; in a fresh one it is not
    assert main(["--log-format", "json", "gen", str(ROOT / "protos"), "-o", str(tmp_path / "a")]) == 0
    with_structlog = capsys.readouterr().err
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "virtsvc.cli",
            "--log-format",
            "json",
            "gen",
            str(ROOT / "protos"),
            "-o",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    first, second = json.loads(with_structlog), json.loads(done.stderr)
    assert list(first) == list(second)
    assert (first["written"], second["written"]) == (17, 0)


def test_descriptor_sets_read_off_the_wire_match_protobuf(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "shop/v1").mkdir(parents=True)
    (tree / "shop/v1/http.proto").write_text(
        textwrap.dedent(
            """\
            syntax = "proto3";
            package shop.v1;
            import "google/api/annotations.proto";
            import "google/protobuf/empty.proto";
            service Catalog {
              rpc Get(google.protobuf.Empty) returns (google.protobuf.Empty) {
                option (google.api.http) = { get: "/v1/catalog" };
              }
              rpc Chat(stream google.protobuf.Empty) returns (stream google.protobuf.Empty);
            }
            """
        )
    )
    data = _protoc.compile_descriptor_set(tree, cache_dir=tmp_path / "cache")
    files = _protoc._read_set(data)
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    assert list(files) == [f.name for f in fds.file]
    for file in fds.file:
        ours = files[file.name]
        assert (ours.package, ours.dependency) == (file.package, list(file.dependency))
        assert ours.services == [
            (
                s.name,
                [
                    (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                    for m in s.method
                ],
            )
            for s in file.service
        ]
        assert ours.record == descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString()
    assert b"".join(f.record for f in files.values()) == data
    for garbage in (b"garbage", b"\n\xff", b"\x0a\x05ab"):
        with pytest.raises(ValueError):
            _protoc._read_set(garbage)


def test_manifest_text_is_json_dumps_with_indent_2(tmp_path: Path) -> None:
    values: list[object] = [{}, [], {"a": []}, [[{}], [[1, 2]]]]
    values.append({'é\n"': [1, None, False, True, "ü", {"b": [[]]}], "n": {"k": "v"}})
    _protoc.generate(ROOT / "protos", tmp_path / "out")
    values.append(json.loads((tmp_path / "out" / "manifest.json").read_text()))
    for value in values:
        assert _protoc._json_indented(value) == json.dumps(value, indent=2)


def test_tree_scan_finds_what_os_walk_does(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for name in ("a.proto", "b/c.proto", "b/d/e.proto", ".hidden/x.proto", "b/.y.proto", "b/notes.txt"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text('syntax = "proto3";\n')
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/z.proto").write_text("")
    (tree / "linked").symlink_to(tmp_path / "elsewhere")  # a symlinked directory is not entered
    (tree / "f.proto").symlink_to(tree / "a.proto")  # a symlinked file is a file
    expected = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.endswith(".proto") and not name.startswith("."):
                path = Path(dirpath, name)
                expected[path.relative_to(tree).as_posix()] = path
    scanned = _protoc._scan(tree)
    assert scanned.files == dict(sorted(expected.items()))
    assert sorted(scanned.files) == ["a.proto", "b/c.proto", "b/d/e.proto", "f.proto"]


def test_serve_failing_to_start_leaves_the_collector_as_it_was(capsys) -> None:
    assert gc.isenabled()
    assert main(["serve", "--descriptors", "missing.binpb"]) == 1
    assert "no such descriptor set" in capsys.readouterr().err
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
