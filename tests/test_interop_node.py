"""Clients in other languages: Node.js's @grpc/grpc-js against the virtual estate."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtsvc import VirtualServer
from virtsvc.contracts import Catalog
from virtsvc.contracts.protoc import include_paths
from virtsvc.scenarios import load_scenarios

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "interop" / "node"
ROOT = HERE.parent

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="Node.js is not installed (the interop test runs a Node.js client)"
)


@pytest.fixture(scope="module")
def node_client() -> Path:
    """The client's dependencies (@grpc/grpc-js, @grpc/proto-loader), installed from the npm registry once."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: the Node.js client's packages cannot be fetched")
        try:
            run = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--no-progress"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm install of the Node.js client's packages took over 300 s (no registry?)")
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"npm install of the Node.js client's packages failed: {last}")
    return NODE_DIR / "client.js"


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[VirtualServer]:
    with VirtualServer(catalog, load_scenarios([ROOT / "scenarios"], catalog)) as srv:
        yield srv


def test_node_client_speaks_to_every_kind(node_client: Path, server: VirtualServer) -> None:
    """Unary, server streaming, bidi and a rich error, each answered as the example scenarios say."""
    googleapis = next(p for p in include_paths() if (p / "google" / "rpc" / "status.proto").exists())
    run = subprocess.run(
        ["node", str(node_client), server.address, str(ROOT / "protos"), str(googleapis), "node-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["reserve"]["reservationId"] == "r-ABC-1-3"
    assert out["reserve"]["qtyReserved"] == 3
    # proto3 leaves zero on the wire: the last event has no onHand
    assert [(e["sku"], e.get("onHand")) for e in out["watch"]] == [
        ("ABC-1", "10"),
        ("ABC-1", "9"),
        ("ABC-1", None),
    ]
    assert [u["text"] for u in out["track"]] == ["message 0: HELLO", "message 1: WORLD"]
    assert out["charge"] == {
        "code": 14,
        "message": "payment provider is warming up",
        "details": ["type.googleapis.com/google.rpc.RetryInfo", "type.googleapis.com/google.rpc.ErrorInfo"],
    }
    journal = server.journal.entries(session="node-1")
    assert [e.method for e in journal] == [
        "shop.v1.Inventory/Reserve",
        "shop.v1.Inventory/Watch",
        "shop.v1.Orders/Track",
        "shop.v1.Payments/Charge",
    ]
