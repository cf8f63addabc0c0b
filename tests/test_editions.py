"""Protobuf editions (2023 and 2024): contracts written in editions compile with `gen`, pass `check` and
are served by `virtsvc serve`, their features (implicit presence, closed enums) kept as protoc means them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from virtsvc.cli import main
from virtsvc.contracts import load_catalog

EDITION_2023 = """\
edition = "2023";
package ed.v1;

enum Tier {
  option features.enum_type = CLOSED;
  TIER_UNSPECIFIED = 0;
  TIER_GOLD = 1;
}

message Ping {
  string name = 1;
  int32 count = 2 [features.field_presence = IMPLICIT];
  Tier tier = 3;
  repeated int32 scores = 4;
}

message Pong {
  string text = 1;
  int32 doubled = 2;
  Tier tier = 3;
}

service Echo {
  rpc Say(Ping) returns (Pong);
  rpc Count(Ping) returns (stream Pong);
}
"""

EDITION_2024 = """\
edition = "2024";
package ed24.v1;

message Hello {
  string who = 1;
}

message Greeting {
  string line = 1;
}

service Greeter {
  rpc Greet(Hello) returns (Greeting);
}
"""

SCENARIO = """\
scenario: editions
rules:
  - method: ed.v1.Echo/Say
    when:
      request: {name: ada}
    reply: {text: "hi {{ request.name }}", doubled: "{{ request.count * 2 }}", tier: TIER_GOLD}
  - method: ed.v1.Echo/Count
    stream:
      - reply: {text: "one"}
      - reply: {text: "two"}
  - method: ed24.v1.Greeter/Greet
    reply: {line: "hello {{ request.who }}"}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "protos" / "ed").mkdir(parents=True)
    (tmp_path / "protos" / "ed" / "echo.proto").write_text(EDITION_2023)
    (tmp_path / "protos" / "ed" / "greeter.proto").write_text(EDITION_2024)
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "editions.yaml").write_text(SCENARIO)
    return tmp_path


def test_gen_compiles_both_editions(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`virtsvc gen` writes modules and a descriptor set that keeps each file's edition and features."""
    out = project / "generated"
    assert main(["gen", str(project / "protos"), "--out", str(out)]) == 0
    assert "generated 8 files from 2 protos" in capsys.readouterr().out
    assert (out / "ed" / "echo_pb2.py").is_file() and (out / "ed" / "greeter_pb2_grpc.py").is_file()
    fds = descriptor_pb2.FileDescriptorSet.FromString((out / "descriptors.binpb").read_bytes())
    files = {f.name: f for f in fds.file}
    assert files["ed/echo.proto"].edition == descriptor_pb2.EDITION_2023
    assert files["ed/greeter.proto"].edition == descriptor_pb2.EDITION_2024
    # the generated module imports and speaks the editions' wire format
    code = textwrap.dedent(
        """
        from ed import echo_pb2
        ping = echo_pb2.Ping(name="ada", count=0)
        assert ping.HasField("name")  # editions: explicit presence by default
        try:
            ping.HasField("count")  # ...but this field says IMPLICIT
        except ValueError:
            pass
        else:
            raise SystemExit("count has presence")
        print(echo_pb2.Ping.FromString(ping.SerializeToString()).name)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ada"


def test_check_passes_and_still_finds_mistakes(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`virtsvc check` validates rules on edition contracts like any other, near misses included."""
    protos, scenarios = str(project / "protos"), str(project / "scenarios")
    assert main(["check", "--protos", protos, scenarios]) == 0
    assert "checked 1 scenario, 3 rules: ok" in capsys.readouterr().out

    (project / "scenarios" / "editions.yaml").write_text(
        SCENARIO.replace("{{ request.who }}", "{{ request.whom }}")
    )
    assert main(["check", "--protos", protos, scenarios]) == 1
    err = capsys.readouterr().err
    assert err.endswith(
        'editions.yaml:12: reply.line: request.whom: ed24.v1.Hello has no field "whom" '
        '(did you mean "who"?)\n'
    )


@pytest.fixture
def sidecar(project: Path) -> Iterator[str]:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "virtsvc.cli", "serve", "--log-format", "json", "--port", "0"),
            *("--protos", str(project / "protos"), "--scenarios", str(project / "scenarios")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=project,
    )
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = [
                json.loads(x) for x in list(lines) if '"event": "serving"' in x or '"event":"serving"' in x
            ]
            if ready:
                yield f"127.0.0.1:{ready[0]['port']}"
                break
            assert process.poll() is None, "".join(lines)
            time.sleep(0.05)
        else:
            raise AssertionError(f"no serving event: {lines}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_serve_answers_edition_methods(project: Path, sidecar: str) -> None:
    """`virtsvc serve --protos` answers methods of both editions over the wire, implicit presence kept."""
    catalog = load_catalog(project / "protos")
    say, count, greet = (
        catalog.method(m) for m in ("ed.v1.Echo/Say", "ed.v1.Echo/Count", "ed24.v1.Greeter/Greet")
    )
    metadata = (("x-virtsvc-scenario", "editions"),)
    with grpc.insecure_channel(sidecar) as channel:
        unary = channel.unary_unary(
            say.path,
            request_serializer=say.input_class.SerializeToString,
            response_deserializer=say.output_class.FromString,
        )
        reply = unary(say.input_class(name="ada", count=21), metadata=metadata, timeout=10)
        assert (reply.text, reply.doubled, reply.tier) == ("hi ada", 42, 1)

        stream = channel.unary_stream(
            count.path,
            request_serializer=count.input_class.SerializeToString,
            response_deserializer=count.output_class.FromString,
        )
        assert [m.text for m in stream(count.input_class(), metadata=metadata, timeout=10)] == ["one", "two"]

        hello = channel.unary_unary(
            greet.path,
            request_serializer=greet.input_class.SerializeToString,
            response_deserializer=greet.output_class.FromString,
        )
        assert hello(greet.input_class(who="grace"), metadata=metadata, timeout=10).line == "hello grace"

        with pytest.raises(grpc.RpcError) as info:  # the `when` of an edition field still decides
            unary(say.input_class(name="bob"), metadata=metadata, timeout=10)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert 'request.name: expected "ada", got "bob"' in (info.value.details() or "")
