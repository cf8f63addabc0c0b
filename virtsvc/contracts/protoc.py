"""Compiling ``.proto`` trees in-process with grpcio-tools (no system ``protoc``).

:func:`generate` writes python modules, one ``descriptors.binpb`` FileDescriptorSet and a ``manifest.json``
into an output directory, incrementally (content hashes, not mtimes) and atomically per file.
:func:`compile_descriptor_set` gives the FileDescriptorSet of a tree, cached on disk, for ``virtsvc serve``.

``virtsvc gen`` is meant to cost little more than protoc itself, so this module imports neither structlog
(its loggers come from :mod:`virtsvc._logs`) nor importlib.metadata, tempfile, shutil or the protobuf
runtime: the few descriptor fields it reads are read off the wire (:func:`_read_set`).

Include path order: the tree itself, the user's ``-I`` paths, then the well-known types shipped with
grpcio-tools and the googleapis protos (google/api, google/rpc, google/type, ...) of googleapis-common-protos.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from virtsvc import _logs
from virtsvc.contracts.kinds import method_kind  # the manifest and the run time name kinds alike
from virtsvc.errors import ConfigError, Problem, ProtoError

# CPython's own SHA-256 gives hashlib's digests without hashlib loading OpenSSL (3 ms of a gen run).
try:
    from _sha256 import sha256  # CPython 3.10, 3.11
except ImportError:  # pragma: no cover - other versions and interpreters
    try:
        from _sha2 import sha256  # CPython 3.12+
    except ImportError:
        from hashlib import sha256

__all__ = [
    "DESCRIPTORS_NAME",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "GenResult",
    "compile_descriptor_set",
    "generate",
    "include_paths",
    "method_kind",
]

_log = _logs.get_logger("virtsvc.gen")

MANIFEST_VERSION = 1
DESCRIPTORS_NAME = "descriptors.binpb"
MANIFEST_NAME = "manifest.json"
# Bumped when what generate() writes changes shape, so old output directories are rebuilt.
_FORMAT = 1
# Compiled descriptor sets kept in the cache directory; older ones are pruned.
_CACHE_KEEP = 32

# protoc writes its diagnostics to the C-level fd 2, which is process-wide: one compile at a time.
_PROTOC_LOCK = threading.Lock()


class GenResult:
    """What one :func:`generate` run did; paths in ``written``/``removed`` are relative to OUT."""

    __slots__ = ("compiled", "manifest", "removed", "written")

    def __init__(
        self,
        compiled: list[str] | None = None,
        written: list[str] | None = None,
        removed: list[str] | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        self.compiled = compiled or []
        self.written = written or []
        self.removed = removed or []
        self.manifest = manifest or {}

    def __repr__(self) -> str:
        return (
            f"GenResult(compiled={self.compiled!r}, written={self.written!r}, removed={self.removed!r}, "
            f"manifest=<{len(self.manifest)} keys>)"
        )


# ---------------------------------------------------------------------------------------------- include path


@functools.cache
def _grpc_tools_include() -> Path:
    import grpc_tools

    return (Path(grpc_tools.__file__).parent / "_proto").resolve()


def _is_googleapis_metadata(name: str) -> bool:
    """Whether ``name`` is googleapis-common-protos' metadata directory, as importlib.metadata matches it."""
    project, _, rest = name.lower().partition("-")
    is_metadata = rest.endswith((".dist-info", ".egg-info"))
    return is_metadata and project.replace(".", "_") == "googleapis_common_protos"


@functools.cache
def _googleapis_include() -> Path | None:
    """The directory holding the ``google`` package of googleapis-common-protos (site-packages).

    The first sys.path entry holding the distribution's metadata, as importlib.metadata would find it,
    without importing importlib.metadata (a tenth of a `virtsvc gen` run).
    """
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # missing directories, zip files
            continue
        if any(_is_googleapis_metadata(name) for name in names):
            path = Path(entry or ".", "google", "api", "annotations.proto")
            return path.parents[2].resolve() if path.is_file() else None
    return None


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))


def include_paths(extra: Sequence[Path] = ()) -> list[Path]:
    """``extra`` (resolved; each must be a directory), then the automatic well-known/googleapis roots."""
    resolved: list[Path] = []
    for path in extra:
        path = Path(path)
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ConfigError(f"include path {_shown(path)} {what}")
        resolved.append(path.resolve())
    auto = [_grpc_tools_include(), _googleapis_include()]
    return _dedupe([*resolved, *(p for p in auto if p is not None)])


# ----------------------------------------------------------------------------------------------- the tree


def _shown(path: Path) -> str:
    """``path`` as the user would type it: as given when relative, else relative to the cwd when under it."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return path.as_posix()


def _sha256(data: bytes) -> str:
    return sha256(data).hexdigest()


def _read_file(path: str | Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class _Tree:
    """The .proto files under one directory, by import path ("virtual" name in protoc's terms)."""

    # plain classes, not dataclasses: defining one costs ~0.5 ms at every start of `virtsvc gen`
    __slots__ = ("files", "hashes", "root", "shown")

    def __init__(self, root: Path, shown: str, files: dict[str, Path], hashes: dict[str, str]) -> None:
        self.root = root  # resolved
        self.shown = shown  # as the user would type it
        self.files = files
        self.hashes = hashes


def _scan(proto_dir: Path) -> _Tree:
    proto_dir = Path(proto_dir)
    shown = _shown(proto_dir)
    if not proto_dir.exists():
        raise ConfigError(f"{shown}: no such directory")
    if not proto_dir.is_dir():
        raise ConfigError(f"{shown}: not a directory (expected a directory of .proto files)")
    root = proto_dir.resolve()
    found: list[tuple[str, str]] = []  # (import path, disk path)
    _find_protos(str(root), "", found)
    if not found:
        raise ConfigError(f"{shown}: no .proto files found")
    found.sort()
    files = {name: Path(path) for name, path in found}
    hashes = {name: _sha256(_read_file(path)) for name, path in found}
    return _Tree(root=root, shown=shown, files=files, hashes=hashes)


def _find_protos(directory: str, prefix: str, found: list[tuple[str, str]]) -> None:
    """Appends the .proto files under ``directory`` to ``found``, named ``prefix`` + their path in it.

    What os.walk would give (symlinked directories are listed, not entered; unreadable ones skipped), at a
    fraction of its cost in a tree of many small directories.
    """
    try:
        with os.scandir(directory) as entries:
            listed = [(entry.name, entry.path, entry.is_dir(), entry.is_symlink()) for entry in entries]
    except OSError:
        return
    for name, path, is_dir, is_symlink in listed:
        if name.startswith("."):  # hidden: .git, our own .virtsvc-gen-* staging dirs, editor files
            continue
        if not is_dir:
            if name.endswith(".proto"):
                found.append((prefix + name, path))
        elif not is_symlink:
            _find_protos(path, f"{prefix}{name}/", found)


def _python_outputs(name: str) -> list[str]:
    """The modules protoc's python, pyi and grpc_python generators write for ``name`` (their naming rule)."""
    stem = name[: -len(".proto")] if name.endswith(".proto") else name
    stem = stem.replace("-", "_").replace(".", "/")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def _resolve(name: str, search: Sequence[Path]) -> Path | None:
    """The file protoc would read for import ``name``: the first root that has it."""
    for root in search:
        candidate = root / name
        if candidate.is_file():
            return candidate
    return None


def _hash_resolved(name: str, search: Sequence[Path]) -> str | None:
    path = _resolve(name, search)
    return None if path is None else _sha256(_read_file(path))


@functools.cache
def _tool_versions() -> dict[str, str]:
    """The versions of grpcio-tools and protobuf: what their distributions' metadata say, read from the
    version strings the packages carry (no importlib.metadata; a tenth of a `virtsvc gen` run)."""
    from google.protobuf import __version__ as protobuf
    from grpc_tools.grpc_version import VERSION as grpcio_tools

    return {"grpcio-tools": grpcio_tools, "protobuf": protobuf}


_quoted = json.encoder.encode_basestring_ascii  # json.dumps' own (C) string encoder


def _json_indented(value: Any) -> str:
    """``json.dumps(value, indent=2)`` of str-keyed dicts, lists, str, int, bool and None: the same text.

    json.dumps takes its pure-Python path when asked to indent: writing the manifest that way was a
    twentieth of a run. This writes the same text with a plain recursion and json's C string encoder.
    """
    out: list[str] = []
    write = out.append

    def put(item: Any, newline: str) -> None:
        if isinstance(item, str):
            write(_quoted(item))
        elif isinstance(item, dict):
            if not item:
                write("{}")
                return
            inner, separator = newline + "  ", "{"
            for key, member in item.items():
                write(separator + inner + _quoted(key) + ": ")
                put(member, inner)
                separator = ","
            write(newline + "}")
        elif isinstance(item, list):
            if not item:
                write("[]")
                return
            inner, separator = newline + "  ", "["
            for member in item:
                write(separator + inner)
                put(member, inner)
                separator = ","
            write(newline + "]")
        else:  # None, booleans, numbers
            write(json.dumps(item))

    put(value, "\n")
    return "".join(out)


def _options_hash(search: Sequence[Path]) -> str:
    blob = json.dumps({"format": _FORMAT, "tools": _tool_versions(), "search": [str(p) for p in search]})
    return _sha256(blob.encode())


# ------------------------------------------------------------------------------------------- running protoc

# Patterns, not compiled ones: protoc is mostly silent, and compiling them is work a run need not do.
_LOCATED = r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$"
_FILE_LEVEL = r"^(?P<file>[^:]+): (?P<msg>.*)$"
_IMPORT_MISSING = r'^Import "(?P<name>[^"]+)" was not found or had errors\.$'


def _display(file: str, roots: Sequence[tuple[Path, str]]) -> str:
    """Turn protoc's disk path back into the path as the user would type it."""
    path = Path(file)
    if not path.is_absolute():
        return file  # a virtual name, e.g. of an import that was not found
    for root, shown in roots:
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        return (Path(shown) / rel).as_posix()
    return _shown(path)


def _parse_protoc_output(text: str, roots: Sequence[tuple[Path, str]]) -> tuple[list[Problem], list[str]]:
    """protoc's stderr as (errors, warnings)."""
    problems: list[Problem] = []
    warnings: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line:
            continue
        located = re.match(_LOCATED, line)
        if located:
            file = _display(located["file"], roots)
            message = located["msg"]
            if message.startswith("warning: "):
                warnings.append(f"{file}:{located['line']}:{located['col']}: {message}")
                continue
            problem = Problem(file, int(located["line"]), message, int(located["col"]))
        elif m := re.match(_FILE_LEVEL, line):
            file, message = _display(m["file"], roots), m["msg"]
            if message.startswith("warning: "):
                warnings.append(f"{file}: {message}")
                continue
            problem = Problem(file, 0, message)
        else:
            problem = Problem("protoc", 0, line)
        if problem not in problems:
            problems.append(problem)
    # "x.proto: File not found." only repeats what the located `Import "x.proto" was not found` line says
    missing = {m["name"] for p in problems if p.line and (m := re.match(_IMPORT_MISSING, p.message))}
    redundant = {Problem(name, 0, "File not found.") for name in missing}
    problems = [p for p in problems if p not in redundant]
    return problems, warnings


@contextmanager
def _stderr_to(target: int) -> Iterator[None]:
    """Point the C-level fd 2 at ``target`` for the duration (protoc writes there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _run_protoc(args: Sequence[str], roots: Sequence[tuple[Path, str]], scratch: Path) -> None:
    """Run protoc in-process; raise ProtoError with one located Problem per protoc error.

    ``scratch``: a private directory where protoc's diagnostics are collected (and removed).
    """
    # grpc_tools.protoc.main() is a thin wrapper around _protoc_compiler.run_main(); importing
    # grpc_tools.protoc however installs import hooks and appends to sys.path of the whole process.
    from grpc_tools import _protoc_compiler

    argv = [b"grpc_tools.protoc", *(os.fsencode(a) for a in args)]
    err_path = scratch / ".protoc-stderr"
    with _PROTOC_LOCK, open(err_path, "w+b") as err:
        try:
            with _stderr_to(err.fileno()):
                status = _protoc_compiler.run_main(argv)
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        finally:
            err_path.unlink()
    problems, warnings = _parse_protoc_output(text, roots)
    for warning in warnings:
        _log.warning("protoc.warning", message=warning)
    if status != 0:
        raise ProtoError(problems or [Problem("protoc", 0, f"failed with exit status {status}")])


def _roots_shown(tree: _Tree, includes: Sequence[Path]) -> list[tuple[Path, str]]:
    return [(tree.root, tree.shown), *((Path(p).resolve(), _shown(Path(p))) for p in includes)]


# -------------------------------------------------------------------------------------------- descriptor sets
#
# gen reads a handful of fields of each FileDescriptorProto (name, package, dependency, services) and writes
# the set back as the files' serialised records in dependency order. Reading them off the wire spares it the
# protobuf runtime's import (a sixth of a run), and writing back each file's record exactly as it was read
# (protoc's own bytes, or last run's) makes an incremental set equal to a full compile's byte for byte.


class _WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        try:
            byte = data[pos]
        except IndexError:
            raise _WireError("truncated varint") from None
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _WireError("varint longer than 10 bytes")


def _fields(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Each field of the message in ``data[start:end]``: (number, a, b, start of the field's record).

    Length-delimited fields: ``data[a:b]`` is the payload and ``b`` the record's end. Varints: ``a`` is the
    value. Fixed 32/64-bit fields (never read here): ``a`` and ``b`` are -1.
    """
    end = len(data) if end is None else end
    pos = start
    try:
        while pos < end:
            record = pos
            key = data[pos]  # tags and most lengths are one byte: no call for those
            key, pos = (key, pos + 1) if key < 0x80 else _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0 or wire_type == 2:
                value = data[pos]
                value, pos = (value, pos + 1) if value < 0x80 else _varint(data, pos)
                if wire_type == 0:
                    yield number, value, pos, record
                    continue
                payload, pos = pos, pos + value
            elif wire_type == 1 or wire_type == 5:
                payload, pos = -1, pos + (8 if wire_type == 1 else 4)
            else:  # groups (3, 4) do not occur in descriptors; 6 and 7 are not wire types
                raise _WireError(f"wire type {wire_type}")
            if number == 0 or pos > end:
                raise _WireError("field 0 or a field past the end")
            yield number, payload, pos if payload >= 0 else -1, record
    except IndexError:
        raise _WireError("truncated") from None


def _text(data: bytes, start: int, end: int) -> str:
    if start < 0:
        raise _WireError("a string field that is not length-delimited")
    return data[start:end].decode("utf-8")


class _File:
    """What gen reads of one FileDescriptorProto, and its record in the set (tag, length, payload)."""

    __slots__ = ("dependency", "name", "package", "record", "services")

    def __init__(
        self,
        name: str,
        package: str,
        dependency: list[str],
        services: list[tuple[str, list[tuple[str, str, str, bool, bool]]]],  # (name, methods)
        record: bytes,
    ) -> None:
        self.name = name
        self.package = package
        self.dependency = dependency
        self.services = services
        self.record = record


def _read_service(data: bytes, start: int, end: int) -> tuple[str, list[tuple[str, str, str, bool, bool]]]:
    """A ServiceDescriptorProto's name, and each method's name, input and output types and streaming."""
    service = ""
    methods = []
    for number, a, b, _ in _fields(data, start, end):
        if number == 1:
            service = _text(data, a, b)
        elif number == 2:  # MethodDescriptorProto
            name = input_type = output_type = ""
            client_streaming = server_streaming = False
            for field_number, x, y, _ in _fields(data, a, b):
                if field_number == 1:
                    name = _text(data, x, y)
                elif field_number == 2:
                    input_type = _text(data, x, y)
                elif field_number == 3:
                    output_type = _text(data, x, y)
                elif field_number == 5:
                    client_streaming = bool(x)
                elif field_number == 6:
                    server_streaming = bool(x)
            methods.append((name, input_type, output_type, client_streaming, server_streaming))
    return service, methods


def _read_set(data: bytes) -> dict[str, _File]:
    """The files of a serialised FileDescriptorSet by name; raises _WireError (or UnicodeDecodeError)."""
    files: dict[str, _File] = {}
    for number, start, end, record in _fields(data):
        if number != 1 or start < 0:
            continue
        name, package, dependency, services = "", "", [], []
        for field_number, a, b, _ in _fields(data, start, end):
            if field_number == 1:
                name = _text(data, a, b)
            elif field_number == 2:
                package = _text(data, a, b)
            elif field_number == 3:
                dependency.append(_text(data, a, b))
            elif field_number == 6:
                services.append(_read_service(data, a, b))
        files[name] = _File(name, package, dependency, services, data[record:end])
    return files


def _ordered(names: Iterable[str], pool: Mapping[str, _File]) -> list[str]:
    """``names`` and everything they import, dependencies before dependents (deterministic)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in pool[name].dependency:
            visit(dep)
        order.append(name)

    for name in names:
        visit(name)
    return order


def _services(files: Iterable[_File], names: set[str]) -> dict[str, Any]:
    services: dict[str, Any] = {}
    for file in files:
        if file.name not in names:
            continue
        prefix = f"{file.package}." if file.package else ""
        for service_name, methods in file.services:
            full = prefix + service_name
            services[full] = {
                "file": file.name,
                "methods": {
                    name: {
                        "full_name": f"{full}/{name}",
                        "kind": method_kind(client_streaming, server_streaming),
                        "input_type": input_type.lstrip("."),
                        "output_type": output_type.lstrip("."),
                    }
                    for name, input_type, output_type, client_streaming, server_streaming in methods
                },
            }
    return services


# ------------------------------------------------------------------------------------------------- generate


def _read(path: Path) -> bytes | None:
    try:
        return _read_file(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


_Previous = tuple[dict[str, Any], dict[str, _File]]  # the last run's manifest, and its descriptors by file


def _load_previous(out: Path) -> _Previous | None:
    """The previous run's manifest and descriptors, or None when there is no usable previous run."""
    raw_manifest, raw_fds = _read(out / MANIFEST_NAME), _read(out / DESCRIPTORS_NAME)
    if raw_manifest is None or raw_fds is None:
        return None
    try:
        manifest = json.loads(raw_manifest)
        pool = _read_set(raw_fds)
    except ValueError:  # not json, not a descriptor set: it just means "rebuild everything"
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    files, dependencies = manifest.get("files"), manifest.get("dependencies")
    if not isinstance(files, dict) or not isinstance(dependencies, dict):
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("imports"), list) for e in files.values()):
        return None
    # unchanged files keep these descriptors, so the set must hold every file and everything it imports
    if any(n not in pool for n in files) or any(d not in pool for f in pool.values() for d in f.dependency):
        return None
    return manifest, pool


def _to_compile(
    tree: _Tree,
    out: Path,
    options: str,
    previous: _Previous | None,
    dep_hash: Callable[[str], str | None],
) -> set[str]:
    """Tree files whose outputs must be regenerated: changed ones and all their (transitive) importers."""
    if previous is None or previous[0].get("options_sha256") != options:
        return set(tree.files)
    manifest = previous[0]
    old_files: dict[str, Any] = manifest["files"]
    # an import path is "changed" when what it resolves to now differs from what was compiled last time
    changed = {n for n in tree.files if old_files.get(n, {}).get("sha256") != tree.hashes[n]}
    changed |= set(old_files) - set(tree.files)
    changed |= {n for n, h in manifest["dependencies"].items() if dep_hash(n) != h}
    memo: dict[str, bool] = {}

    def stale(name: str, trail: frozenset[str] = frozenset()) -> bool:
        if name in changed:
            return True
        if name not in memo:
            imports = old_files.get(name, {}).get("imports", [])
            memo[name] = any(stale(i, trail | {name}) for i in imports if i not in trail)
        return memo[name]

    recompile = {n for n in tree.files if stale(n)}
    # outputs someone deleted by hand come back, without disturbing their importers
    out_dir = str(out)
    recompile |= {
        n for n in tree.files if not all(os.path.isfile(os.path.join(out_dir, o)) for o in _python_outputs(n))
    }
    return recompile


def _near_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor (where a staging directory can live)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path.cwd()


def _make_staging(parent: Path) -> Path:
    """A new private directory ``.virtsvc-gen-*`` in ``parent``.

    Made by mkdir, not tempfile.mkdtemp: it gets the permissions the umask gives any new directory, so that
    a first run can rename it into OUT whole (and tempfile's import is spared).
    """
    for n in itertools.count():
        path = parent / f".virtsvc-gen-{os.getpid()}-{threading.get_ident()}-{n}"
        try:
            path.mkdir()
        except FileExistsError:  # left by a crashed run of a process with the same pid
            continue
        return path
    raise AssertionError("unreachable")  # pragma: no cover


def _replace(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically (temp file in the same directory, then os.replace)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A name private to this process and thread: cheaper than mkstemp's random probing (hundreds of files).
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _move(staged: Path, dest: Path) -> None:
    """``staged`` to ``dest`` atomically: a rename, or a copy through _replace across file systems."""
    try:
        os.replace(staged, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # OUT (or a directory in it) is another mount than the staging dir
            raise
        _replace(dest, _read_file(staged))


def _inside(rel: object) -> bool:
    """Whether a manifest entry names a file inside OUT (the manifest is only trusted that far)."""
    return isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts


def _prune_empty_dirs(out: Path, rel: str) -> None:
    parent = (out / rel).parent
    while parent != out and out in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def _rename_whole(staging: Path, out: Path, files: Mapping[str, bytes]) -> bool:
    """First run into a directory that does not exist: ``files`` join protoc's modules in ``staging``, which
    becomes ``out`` in one rename. False (``staging`` as it was) when ``out`` appeared meanwhile or the
    rename cannot be done: the caller then moves file by file."""
    for rel, data in files.items():
        with open(staging / rel, "wb") as fh:
            fh.write(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, out)
    except OSError:
        for rel in files:
            (staging / rel).unlink()
        return False
    return True


def generate(proto_dir: Path, out: Path, includes: Sequence[Path] = ()) -> GenResult:
    """Compile every .proto under ``proto_dir`` into ``out``: modules, descriptors.binpb, manifest.json.

    Incremental: only changed files and their importers are compiled, only files whose content changed are
    rewritten, outputs of removed files are removed. Raises ProtoError (nothing in ``out`` changed) when
    the tree does not compile, ConfigError for missing/empty paths.
    """
    tree = _scan(proto_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{_shown(out)}: exists and is not a directory")
    out_abs = out.resolve()
    search = _dedupe([tree.root, *include_paths(includes)])
    options = _options_hash(search)
    hashed: dict[str, str | None] = {}

    def dep_hash(name: str) -> str | None:
        """The hash of what import ``name`` resolves to; each file is read and hashed once a run."""
        if name not in hashed:
            hashed[name] = _hash_resolved(name, search)
        return hashed[name]

    previous = _load_previous(out_abs)
    recompile = _to_compile(tree, out_abs, options, previous, dep_hash)

    pool: dict[str, _File] = {}
    if previous is not None and recompile != set(tree.files):
        pool.update(previous[1])
    staging = None
    try:
        if recompile:
            # protoc writes into a private directory next to OUT: nothing in OUT changes unless it succeeds
            staging = _make_staging(_near_existing(out_abs.parent))
            raw = staging / ".compiled.binpb"
            _run_protoc(
                [
                    *(f"--proto_path={p}" for p in search),
                    f"--python_out={staging}",
                    f"--pyi_out={staging}",
                    f"--grpc_python_out={staging}",
                    f"--descriptor_set_out={raw}",
                    "--include_imports",
                    "--include_source_info",
                    *(str(tree.files[n]) for n in sorted(recompile)),
                ],
                _roots_shown(tree, includes),
                staging,
            )
            pool.update(_read_set(_read_file(raw)))
            raw.unlink()
            # (Were an expected module missing, the next run would see it and compile its file again.)

        # Unchanged files keep their previous descriptors (their imports did not change either), so the
        # merged set equals what compiling the whole tree would give.
        order = _ordered(tree.files, pool)
        modules = sorted({o for n in tree.files for o in _python_outputs(n)})
        outputs = sorted([*modules, DESCRIPTORS_NAME, MANIFEST_NAME])
        manifest: dict[str, Any] = {
            "version": MANIFEST_VERSION,
            "options_sha256": options,
            "files": {n: {"sha256": tree.hashes[n], "imports": list(pool[n].dependency)} for n in tree.files},
            "dependencies": {n: dep_hash(n) for n in order if n not in tree.files},
            "services": _services((pool[n] for n in order), set(tree.files)),
            "outputs": outputs,
        }
        desired = {  # what goes into OUT besides the modules protoc wrote into staging
            DESCRIPTORS_NAME: b"".join(pool[n].record for n in order),
            MANIFEST_NAME: (_json_indented(manifest) + "\n").encode(),
        }

        removed: list[str] = []
        if staging is not None and not out_abs.exists() and _rename_whole(staging, out_abs, desired):
            written, staging = outputs, None
        else:
            written, removed = _update(out_abs, staging, recompile, desired, previous, set(outputs))
    finally:
        if staging is not None:
            import shutil  # what is left in staging: files that did not change, directories

            shutil.rmtree(staging, ignore_errors=True)

    _log.info(
        "gen.completed",
        out=_shown(out),
        protos=len(tree.files),
        compiled=len(recompile),
        written=len(written),
        removed=len(removed),
    )
    return GenResult(compiled=sorted(recompile), written=written, removed=removed, manifest=manifest)


def _update(
    out: Path,
    staging: Path | None,
    recompiled: Iterable[str],
    desired: Mapping[str, bytes],
    previous: _Previous | None,
    outputs: set[str],
) -> tuple[list[str], list[str]]:
    """Bring an existing OUT up to date, file by file; returns (written, removed), sorted."""
    rewrite = [rel for rel, data in desired.items() if _read(out / rel) != data]
    old_outputs = set(previous[0].get("outputs", [])) if previous is not None else set()
    removed = sorted(rel for rel in old_outputs - outputs if _inside(rel) and (out / rel).is_file())
    changed: list[str] = []
    if staging is not None:
        # only what differs is written: a recompiled file's modules often come out the same
        staged = [rel for name in recompiled for rel in _python_outputs(name)]
        changed = [rel for rel in staged if _read(out / rel) != _read_file(staging / rel)]
        made: set[Path] = set()
        for rel in changed:
            dest = out / rel
            if dest.parent not in made:
                dest.parent.mkdir(parents=True, exist_ok=True)
                made.add(dest.parent)
            _move(staging / rel, dest)
    # the manifest goes last: if anything above fails, the old manifest makes the next run redo the work
    for rel in rewrite:
        if rel != MANIFEST_NAME:
            _replace(out / rel, desired[rel])
    for rel in removed:
        (out / rel).unlink()
        _prune_empty_dirs(out, rel)
    if MANIFEST_NAME in rewrite:
        _replace(out / MANIFEST_NAME, desired[MANIFEST_NAME])
    return sorted(changed + rewrite), removed


# ----------------------------------------------------------------------------------- compile_descriptor_set


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "virtsvc"


def compile_descriptor_set(
    proto_dir: Path, includes: Sequence[Path] = (), cache_dir: Path | None = None
) -> bytes:
    """The serialized FileDescriptorSet (imports + source info) of every .proto under ``proto_dir``.

    Cached under ``cache_dir`` (default ``$XDG_CACHE_HOME/virtsvc``) by a hash of the tree's contents, the
    include paths and the tool versions; a hit is used only if every imported file outside the tree still
    has the content it was compiled from.
    """
    tree = _scan(proto_dir)
    search = _dedupe([tree.root, *include_paths(includes)])
    identity = {"options": _options_hash(search), "files": tree.hashes}
    key = _sha256(json.dumps(identity, sort_keys=True).encode())
    cache = (cache_dir if cache_dir is not None else _default_cache_dir()) / "descriptors"
    entry, deps_file = cache / f"{key}.binpb", cache / f"{key}.deps.json"

    cached, deps_raw = _read(entry), _read(deps_file)
    if cached is not None and deps_raw is not None:
        try:
            deps = json.loads(deps_raw)
            if isinstance(deps, dict) and all(_hash_resolved(n, search) == h for n, h in deps.items()):
                return cached
        except ValueError:
            pass  # a damaged cache entry is simply recompiled

    import tempfile  # here only: `virtsvc gen` does without it

    with tempfile.TemporaryDirectory(prefix="virtsvc-protoc-") as tmp:
        raw = Path(tmp) / "set.binpb"
        _run_protoc(
            [
                *(f"--proto_path={p}" for p in search),
                f"--descriptor_set_out={raw}",
                "--include_imports",
                "--include_source_info",
                *(str(path) for path in tree.files.values()),
            ],
            _roots_shown(tree, includes),
            Path(tmp),
        )
        data = raw.read_bytes()
    files = _read_set(data)
    deps = {name: _hash_resolved(name, search) for name in files if name not in tree.files}
    try:
        _replace(entry, data)
        _replace(deps_file, json.dumps(deps, sort_keys=True).encode())
        old = sorted(cache.glob("*.binpb"), key=lambda p: p.stat().st_mtime_ns, reverse=True)[_CACHE_KEEP:]
        for stale in old:
            stale.unlink(missing_ok=True)
            stale.with_name(stale.name[: -len(".binpb")] + ".deps.json").unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache only costs a recompile next time
        _log.warning("descriptors.cache_unwritable", cache_dir=str(cache), error=str(exc))
    _log.info("descriptors.compiled", protos=len(tree.files), files=len(files))
    return data
