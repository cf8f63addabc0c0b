"""The public facade: the exported names are part of the API, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import virtsvc


def test_exported_names() -> None:
    """Adding or removing a public name is a deliberate change: this list says so."""
    assert sorted(virtsvc.__all__) == [
        "Catalog",
        "ConfigError",
        "DescriptorError",
        "MethodSpec",
        "Problem",
        "ProtoError",
        "Scenario",
        "ScenarioError",
        "VirtsvcError",
        "VirtualServer",
        "__version__",
        "data",
        "serve_in_process",
        "session",
    ]
    for name in virtsvc.__all__:
        assert getattr(virtsvc, name) is not None


def test_import_does_not_load_grpc() -> None:
    """The pytest plugin loads with every pytest run: importing virtsvc must not import grpc."""
    code = "import sys, virtsvc, virtsvc.testing.plugin; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
