"""Recorded scenario files: written atomically (a temporary file beside it, then ``os.replace``), so an
interrupted recording leaves the previous complete file, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from virtsvc.errors import ConfigError

__all__ = ["read_scenario", "scenario_name", "write_scenario"]

_HEADER = "# Recorded by virtsvc: edit freely; `virtsvc check` validates it, `virtsvc serve` replays it.\n"


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order given, long text kept on one line."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def scenario_name(path: Path) -> str:
    """A scenario name from a file name: ``Recorded Orders.yaml`` -> ``recorded-orders``."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._")
    return slug or "recorded"


def write_scenario(path: Path, name: str, rules: list[dict[str, Any]], *, description: str = "") -> None:
    """Writes one scenario with ``rules`` to ``path``, atomically."""
    doc: dict[str, Any] = {"scenario": name}
    if description:
        doc["description"] = description
    doc["rules"] = rules
    text = _HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_scenario(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The name and rules (plain data) of a recorded file, to add to or refresh."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules", []), list):
        raise ConfigError(f"{path}: not a recorded scenario (a mapping with scenario: and rules:)")
    return str(doc.get("scenario") or scenario_name(Path(path))), list(doc.get("rules") or [])
