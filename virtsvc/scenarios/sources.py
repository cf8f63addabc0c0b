"""Scenario sources on disk: files and directories walked, YAML and JSON read with their lines, Python
scenario scripts run; what goes wrong inside a file is kept with it, for the loader to report with the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from virtsvc.errors import ConfigError, Problem
from virtsvc.scenarios import yamltree as _yaml
from virtsvc.scenarios.builder import Scenario
from virtsvc.scenarios.located import Problems

__all__ = ["SUFFIXES", "Source", "load_sources"]

SUFFIXES = (".yaml", ".yml", ".json", ".py")


@dataclass
class Source:
    """One file read from disk: YAML documents or a script's ``Scenario`` objects, plus reading problems."""

    file: str  # the path as the user gave it: problems and locations use it
    kind: Literal["yaml", "script"]
    documents: list[Any] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def load_sources(paths: Sequence[Path]) -> list[Source]:
    """Reads files and directories (recursively: ``*.yaml``, ``*.yml``, ``*.json``, ``*.py``, sorted).

    Directories skip hidden entries and ``_*.py`` helper modules. A missing path raises ConfigError;
    problems inside files (syntax, a script that raises) are kept in each ``Source`` for
    ``compile_sources`` to report together with the rest.
    """
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(_walk(path))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ConfigError(
                    f"{path}: not a scenario file (scenarios are .yaml, .yml, .json or .py files)"
                )
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or directory")
    seen: set[Path] = set()
    sources = []
    for path in files:
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        sources.append(_read(path))
    return sources


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in filenames:
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith(".") or suffix not in SUFFIXES or (suffix == ".py" and name.startswith("_")):
                continue
            found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.as_posix())


def _read(path: Path) -> Source:
    file = str(path)
    if path.suffix.lower() == ".py":
        source = Source(file, "script")
        source.scenarios = _import_script(path, source.problems)
        return source
    source = Source(file, "yaml")
    problems = Problems()
    source.documents = _yaml.load_file(path, file, problems)
    source.problems = problems.items
    return source


def _import_script(path: Path, problems: list[Problem]) -> list[Scenario]:
    """Runs a scenario script and returns its module-level ``Scenario`` objects.

    The module name derives from the script's real path, so reloading the same script replaces its module
    instead of piling up new ones. The script's directory is on ``sys.path`` while it runs, so it can import
    helper modules next to it. The code is compiled under the path as the user gave it (importlib would
    make it absolute), so that builder locations and failures name the file the way the user wrote it.
    """
    file = str(path)
    try:
        source = path.read_bytes()
    except OSError as exc:
        problems.append(Problem(file, 0, f"cannot read: {exc.strerror or exc}"))
        return []
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=6).hexdigest()
    name = f"_virtsvc_script_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None:  # pragma: no cover - a .py path always has a spec
        problems.append(Problem(file, 0, "cannot import this script"))
        return []
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    directory = str(path.parent.resolve())
    sys.path.insert(0, directory)
    try:
        code = compile(source, file, "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        problems.append(_script_problem(file, exc))
        return []
    finally:
        with contextlib.suppress(ValueError):  # the script removed it itself
            sys.path.remove(directory)
    found: dict[int, Scenario] = {}
    for value in vars(module).values():
        if isinstance(value, Scenario):
            found.setdefault(id(value), value)
    if not found:
        problems.append(
            Problem(
                file,
                0,
                'the script defines no Scenario at module level (e.g. scenario = Scenario("name")); '
                "name helper modules _*.py so that a directory load skips them",
            )
        )
    return list(found.values())


def _script_problem(file: str, exc: BaseException) -> Problem:
    """The script's line where it failed (the deepest frame in the script) and the error, no traceback."""
    if isinstance(exc, SyntaxError) and exc.filename == file:
        return Problem(file, exc.lineno or 0, f"SyntaxError: {exc.msg}")
    line = 0
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == file:
            line = lineno
    text = str(exc)
    return Problem(file, line, f"the script raised {type(exc).__name__}" + (f": {text}" if text else ""))
