"""The README's record -> edit -> replay -> verify workflow, run command by command against a real service.

The commands come from the README's block itself; the real service is tests/upstream_servicer.py on
loopback, and `record` and `serve` run as real processes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from _upstream import run_virtsvc
from google.protobuf import json_format
from upstream_servicer import CatalogUpstream

from virtsvc.contracts.catalog import Catalog

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
REAL = "127.0.0.1:9000"  # the real service's address in the README


def _workflow() -> list[list[str]]:
    """The commands of the README's workflow block, comments dropped."""
    start = README.index("## Record, edit, replay, verify")
    match = re.compile(r"```sh\n(.*?)```", re.S).search(README, start)
    assert match, "no sh block in the workflow section"
    return [shlex.split(line) for line in match.group(1).splitlines() if line and not line.startswith("#")]


def _local(argv: list[str], real: str) -> list[str]:
    """A README command for this machine: the real service's address, and free ports."""
    out = []
    for i, arg in enumerate(argv):
        if arg == REAL:
            arg = real
        elif i and argv[i - 1] == "--port":
            arg = "0"
        out.append(arg)
    return out


def _call(channel: grpc.Channel, catalog: Catalog, method: str, request: Any, **kw: Any) -> Any:
    """One call of any kind with JSON requests and replies (lists for streams)."""
    spec = catalog.method(method)
    factory = {
        "unary": channel.unary_unary,
        "server_streaming": channel.unary_stream,
        "client_streaming": channel.stream_unary,
        "bidi_streaming": channel.stream_stream,
    }[spec.kind]
    stub = factory(
        spec.path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=spec.output_class.FromString,
    )

    def message(data: Any) -> Any:
        return json_format.ParseDict(data, spec.input_class())

    payload = iter([message(r) for r in request]) if spec.client_streaming else message(request)
    answer = stub(payload, timeout=10, **kw)
    if spec.server_streaming:
        return [json_format.MessageToDict(m) for m in answer]
    return json_format.MessageToDict(answer)


def _traffic(address: str, catalog: Catalog) -> dict[str, Any]:
    """What a client does through the proxy: every RPC kind once."""
    with grpc.insecure_channel(address) as channel:
        return {
            "item": _call(channel, catalog, "shop.v1.Inventory/GetItem", {"sku": "A-1"}),
            "watch": _call(channel, catalog, "shop.v1.Inventory/Watch", {"skus": ["A", "B"]}),
            "bulk": _call(channel, catalog, "shop.v1.Inventory/BulkUpdate", [{"sku": "A", "count": "1"}]),
            "track": _call(channel, catalog, "shop.v1.Orders/Track", [{"orderId": "o-1", "text": "hi"}]),
        }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


@pytest.fixture
def real_services(project: Path) -> Iterator[Any]:
    started: list[CatalogUpstream] = []

    def start(tree: Path, *variant: str) -> CatalogUpstream:
        upstream = CatalogUpstream(
            Catalog.from_protos(tree, cache_dir=project / ".cache"), frozenset(variant)
        )
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


def test_record_edit_replay_verify(project: Path, spawn: Any, real_services: Any) -> None:
    """The README's workflow as written: record every RPC kind through the proxy, edit the file, replay it
    through `serve` (the edit shows), verify it against the real service (it holds), then verify again
    after the real service renamed a field (the drift is named at the rule's file:line)."""
    commands = _workflow()
    assert [" ".join(c[:2]) for c in commands] == [
        "virtsvc record", "sed -i", "virtsvc check", "virtsvc serve", "virtsvc verify"
    ]  # fmt: skip
    record, edit, check, serve, verify = commands
    real = real_services(project / "protos")
    catalog = real.catalog

    proxy = spawn(*_local(record, real.address)[1:], cwd=project)
    proxy.wait_serving()
    direct = _traffic(real.address, catalog)
    assert _traffic(proxy.address, catalog) == direct
    assert proxy.stop(signal.SIGINT) == 0

    assert subprocess.run(edit, cwd=project, timeout=30).returncode == 0
    checked = run_virtsvc(*_local(check, real.address)[1:], cwd=project)
    assert checked.returncode == 0, checked.stderr

    replay = spawn(*_local(serve, real.address)[1:], cwd=project)
    replay.wait_serving()
    replayed = _traffic(replay.address, catalog)
    assert replayed["item"]["title"] == "Widget (edited)"
    assert {k: v for k, v in replayed.items() if k != "item"} == {
        k: v for k, v in direct.items() if k != "item"
    }
    assert replay.stop() == 0

    verified = run_virtsvc(*_local(verify, real.address)[1:], cwd=project)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    lines = verified.stdout.splitlines()
    assert lines[-1].startswith(f"verified {len(lines) - 1} rules against {real.address}: ")
    assert sum(": ok: " in line for line in lines) >= 4, lines

    # The real service changes: Item.title is now Item.name.
    renamed = project / "renamed"
    shutil.copytree(project / "protos", renamed)
    inventory = renamed / "shop" / "v1" / "inventory.proto"
    inventory.write_text(inventory.read_text().replace("string title = 2;", "string name = 2;"))
    changed = real_services(renamed, "renamed")
    drifted = run_virtsvc(*_local(verify, changed.address)[1:], cwd=project)
    assert drifted.returncode == 1
    drift = [line for line in drifted.stdout.splitlines() if ": drift: " in line]
    assert len(drift) == 1, drifted.stdout
    shown = README[README.index("$ virtsvc verify", README.index("## Record, edit, replay, verify")) :]
    shown = shown[: shown.index("```")].replace(REAL, changed.address)
    assert drifted.stdout.splitlines() == shown.splitlines()[1:], "the README shows what verify reports"
    assert drift[0].endswith(
        "drift: shop.v1.Inventory/GetItem: reply.title: the target's shop.v1.Item has no field title "
        "(field 2 is name there)"
    )
