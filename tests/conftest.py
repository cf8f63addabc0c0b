"""Shared fixtures: the example estate compiled once per test process, and servers on loopback port 0."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from virtsvc import _protoc
from virtsvc.descriptors import Catalog

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SCENARIOS = ROOT / "scenarios"


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``virtsvc gen protos/`` into a temporary OUT, importable (``from shop.v1 import inventory_pb2``)."""
    out = tmp_path_factory.mktemp("generated")
    _protoc.generate(PROTOS, out)
    sys.path.insert(0, str(out))
    return out


@pytest.fixture(scope="session")
def catalog(generated: Path) -> Catalog:
    return Catalog.from_file(generated / "descriptors.binpb")


@pytest.fixture
def channel_to() -> Iterator[object]:
    """``channel_to(address)`` opens a channel closed at teardown."""
    channels: list[grpc.Channel] = []

    def open_channel(address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()
