"""Test helpers for matching and templates: the example protos compiled once, calls, located YAML.

The catalog is compiled here with grpc_tools directly, so these tests do not depend on
``virtsvc.contracts.protoc``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc_tools
import pytest
import yaml
from google.protobuf.message import Message
from grpc_tools import protoc

from virtsvc.contracts import Catalog, MethodSpec
from virtsvc.engine.store import MemorySession as Session
from virtsvc.scenarios.fields import message_class
from virtsvc.scenarios.located import LocatedDict, LocatedList, Problems, Site
from virtsvc.scenarios.model import Call

PROTOS = Path(__file__).resolve().parent.parent / "protos"


def compile_catalog(out: Path) -> Catalog:
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    target = out / "shop.binpb"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", "--include_imports", f"--descriptor_set_out={target}"]
    rc = protoc.main([*args, *files])
    assert rc == 0, f"protoc failed with {rc}"
    return Catalog.from_file(target)


@pytest.fixture(scope="session")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """The example estate (shop.v1, common.v1) as a Catalog."""
    return compile_catalog(tmp_path_factory.mktemp("protos"))


def message_spec(catalog: Catalog, input_type: str, output_type: str | None = None) -> MethodSpec:
    """A stand-in method whose input (and output) is any message type, to reach every field kind."""
    base = catalog.method("shop.v1.Inventory/GetItem")
    inp = catalog.pool.FindMessageTypeByName(input_type)
    out = catalog.pool.FindMessageTypeByName(output_type or input_type)
    return MethodSpec(
        full_name=f"test.Fake/{inp.name}",
        service="test.Fake",
        name=inp.name,
        kind="unary",
        input=inp,
        output=out,
        input_class=message_class(inp),
        output_class=message_class(out),
        descriptor=base.descriptor,
    )


def make_call(
    spec: MethodSpec,
    *requests: Message | Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    session: Session | None = None,
) -> Call:
    raw = []
    for r in requests:
        msg = r if isinstance(r, Message) else spec.input_class(**r)
        raw.append(msg.SerializeToString())
    return Call(
        method=spec,
        scenario="s",
        session=session or Session("s", "t"),
        metadata=dict(metadata or {}),
        raw_requests=raw,
    )


def new_site(file: str = "scenario.yaml", line: int = 1) -> Site:
    return Site(file, Problems(), line)


def problems(site: Site) -> list[str]:
    return [str(p) for p in site.problems.items]


class _LocatedLoader(yaml.SafeLoader):
    """Builds LocatedDict / LocatedList nodes carrying 1-based line numbers, like the scenario loader."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> LocatedDict:
    out = LocatedDict(line=node.start_mark.line + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> LocatedList:
    items = [loader.construct_object(n, deep=True) for n in node.value]
    out = LocatedList(items, line=node.start_mark.line + 1)
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    return out


_LocatedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_LocatedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def located(text: str) -> Any:
    """YAML text as located nodes."""
    return yaml.load(text, Loader=_LocatedLoader)  # a SafeLoader subclass
