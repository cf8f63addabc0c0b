"""``[tool.virtsvc]`` settings read from ``./pyproject.toml``: the defaults of every virtsvc command.

    [tool.virtsvc]
    protos = "protos"                 # PROTO_DIR of `virtsvc gen`, --protos of `virtsvc serve`
    scenarios = ["scenarios", "more"] # one path or a list
    generated = "generated"           # OUT of `virtsvc gen`
    host = "127.0.0.1"
    port = 50051
    default_scenario = "happy"
    time_scale = 0.1                  # --time-scale of `virtsvc serve`: every delay times 0.1

Paths are resolved relative to the directory of the pyproject that names them; command-line flags win
(:meth:`Settings.merged`).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from virtsvc import _text
from virtsvc.errors import ConfigError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Settings", "load_settings", "time_scale"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
_PATH_FIELDS = ("protos", "generated")


def _as_path_tuple(value: object) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (Path(value),)
    if isinstance(value, Sequence):
        return tuple(Path(v) for v in value)
    raise TypeError(f"scenarios: expected a path or a list of paths, got {type(value).__name__}")


class Settings:
    """Defaults for every virtsvc command; ``source``: the pyproject that supplied them (None: built-ins).

    Immutable; equal when the settings are (wherever they came from). A plain class rather than a
    dataclass: every command reads it, and importing ``dataclasses`` was 5% of a ``virtsvc gen`` run.
    """

    __slots__ = (
        "default_scenario",
        "generated",
        "host",
        "port",
        "protos",
        "scenarios",
        "source",
        "time_scale",
    )
    _COMPARED = ("protos", "scenarios", "generated", "host", "port", "default_scenario", "time_scale")

    protos: Path | None
    scenarios: tuple[Path, ...]
    generated: Path
    host: str
    port: int
    default_scenario: str | None
    time_scale: float
    source: Path | None

    def __init__(
        self,
        protos: Path | None = None,
        scenarios: tuple[Path, ...] = (),
        generated: Path = Path("generated"),
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        default_scenario: str | None = None,
        time_scale: float = 1.0,
        source: Path | None = None,
    ) -> None:
        values = (protos, scenarios, generated, host, port, default_scenario, time_scale, source)
        for name, value in zip((*self._COMPARED, "source"), values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Settings are immutable: use merged() for a copy with {name} changed")

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._COMPARED)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in (*self._COMPARED, "source"))
        return f"Settings({fields})"

    def merged(self, **flags: Any) -> Settings:
        """A copy where every flag that is not None wins; paths may be given as ``str`` or ``Path``."""
        values = {name: getattr(self, name) for name in (*self._COMPARED, "source")}
        for name, value in flags.items():
            if name not in values:
                raise TypeError(f"Settings has no field {name!r}")
            if value is None:
                continue
            if name in _PATH_FIELDS:
                value = Path(value)
            elif name == "scenarios":
                value = _as_path_tuple(value)
            values[name] = value
        return Settings(**values)


# key -> (what the user is told was expected, check)
_Check = Callable[[object], bool]


def _is_path(v: object) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_paths(v: object) -> bool:
    return _is_path(v) or (isinstance(v, list) and all(_is_path(x) for x in v))


def _is_port(v: object) -> bool:
    # bool is an int subclass: `port = true` is a mistake, not port 1
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535


def _is_text(v: object) -> bool:
    return isinstance(v, str) and v != ""


def _is_scale(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def time_scale(value: object, where: str = "time scale") -> float:
    """``value`` as a time scale (a number above 0, text allowed); ConfigError naming ``where`` if not."""
    number: object = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if not _is_scale(number):
        raise ConfigError(
            f"{where}: expected a number above 0 (every delay is multiplied by it: 2 doubles them, 0.1 "
            f"makes them ten times shorter), got {value!r}"
        )
    return float(number)  # type: ignore[arg-type]


_KEYS: dict[str, tuple[str, _Check]] = {
    "protos": ("a path (string)", _is_path),
    "scenarios": ("a path or a list of paths (strings)", _is_paths),
    "generated": ("a path (string)", _is_path),
    "host": ("a host name or address (string)", _is_text),
    "port": ("a port number (integer 0-65535)", _is_port),
    "default_scenario": ("a scenario name (string)", _is_text),
    "time_scale": ("a number above 0", _is_scale),
}


def _type_name(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _shown(path: Path) -> str:
    """``path`` as the user would type it: relative to the cwd when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _key_line(text: str, key: str) -> int:
    """Line number of ``key = ...`` inside the ``[tool.virtsvc]`` table, 0 when not found (best effort)."""
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            header = stripped.split("#")[0].strip()
            in_table = re.fullmatch(r"\[\s*tool\s*\.\s*virtsvc\s*\]", header) is not None
        elif in_table and re.match(rf"""["']?{re.escape(key)}["']?\s*=""", stripped):
            return number
    return 0


def load_settings(start: Path | None = None) -> Settings:
    """Read ``[tool.virtsvc]`` from ``pyproject.toml`` in ``start`` (a directory or the file; default: cwd).

    No pyproject, or one without the table, gives the built-in defaults. Raises ConfigError for
    unreadable TOML, unknown keys (with a did-you-mean) and values of the wrong type.
    """
    base = Path.cwd() if start is None else Path(start)
    pyproject = base if base.suffix == ".toml" else base / "pyproject.toml"
    if not pyproject.is_file():
        return Settings()
    # Only now: every command starts here, most often where there is no pyproject.toml (start-up time).
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib

    pyproject = pyproject.resolve()
    shown = _shown(pyproject)
    try:
        text = pyproject.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{shown}: not valid TOML: {exc}") from exc

    tool = data.get("tool", {})
    table = tool.get("virtsvc") if isinstance(tool, dict) else None
    if table is None:
        return Settings()
    if not isinstance(table, dict):
        raise ConfigError(f"{shown}: [tool.virtsvc] must be a table, got {_type_name(table)}")

    def where(key: str) -> str:
        line = _key_line(text, key)
        return f"{shown}:{line}" if line else shown

    for key, value in table.items():
        if key not in _KEYS:
            close = _text.closest(key, list(_KEYS), n=1)
            known = "known keys: " + ", ".join(sorted(_KEYS))
            hint = _text.alternatives(close, quote="'") if close else known
            raise ConfigError(f"{where(key)}: [tool.virtsvc] unknown key {key!r} ({hint})")
        expected, check = _KEYS[key]
        if not check(value):
            raise ConfigError(
                f"{where(key)}: [tool.virtsvc] {key}: expected {expected}, got {_type_name(value)} {value!r}"
            )

    root = pyproject.parent

    def path(key: str) -> Path | None:
        value = table.get(key)
        return None if value is None else (root / value).resolve()

    scenarios = table.get("scenarios", ())
    if isinstance(scenarios, str):
        scenarios = [scenarios]
    defaults = Settings()
    return Settings(
        protos=path("protos"),
        scenarios=tuple((root / s).resolve() for s in scenarios),
        generated=path("generated") or defaults.generated,
        host=table.get("host", defaults.host),
        port=table.get("port", defaults.port),
        default_scenario=table.get("default_scenario"),
        time_scale=float(table.get("time_scale", defaults.time_scale)),
        source=pyproject,
    )
