"""Compiling ``.proto`` trees in-process with grpcio-tools (no system ``protoc``).

:func:`generate` writes python modules, one ``descriptors.binpb`` FileDescriptorSet and a ``manifest.json``
into an output directory, incrementally (content hashes, not mtimes) and atomically per file.
:func:`compile_descriptor_set` gives the FileDescriptorSet of a tree, cached on disk, for ``virtsvc serve``.

Include path order: the tree itself, the user's ``-I`` paths, then the well-known types shipped with
grpcio-tools and the googleapis protos (google/api, google/rpc, google/type, ...) of googleapis-common-protos.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from google.protobuf import descriptor_pb2

from virtsvc.descriptors import method_kind  # the manifest and the run time name kinds alike
from virtsvc.errors import ConfigError, Problem, ProtoError

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

_log = structlog.get_logger("virtsvc.gen")

MANIFEST_VERSION = 1
DESCRIPTORS_NAME = "descriptors.binpb"
MANIFEST_NAME = "manifest.json"
# Bumped when what generate() writes changes shape, so old output directories are rebuilt.
_FORMAT = 1
# Compiled descriptor sets kept in the cache directory; older ones are pruned.
_CACHE_KEEP = 32

# protoc writes its diagnostics to the C-level fd 2, which is process-wide: one compile at a time.
_PROTOC_LOCK = threading.Lock()


@dataclass
class GenResult:
    """What one :func:`generate` run did; paths in ``written``/``removed`` are relative to OUT."""

    compiled: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- include path


@functools.cache
def _grpc_tools_include() -> Path:
    import grpc_tools

    return (Path(grpc_tools.__file__).parent / "_proto").resolve()


@functools.cache
def _googleapis_include() -> Path | None:
    """The directory holding the ``google`` package of googleapis-common-protos (site-packages)."""
    try:
        located = importlib.metadata.distribution("googleapis-common-protos").locate_file(
            "google/api/annotations.proto"
        )
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(located))
    return path.parents[2].resolve() if path.is_file() else None


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
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Tree:
    """The .proto files under one directory, by import path ("virtual" name in protoc's terms)."""

    root: Path  # resolved
    shown: str  # as the user would type it
    files: dict[str, Path]
    hashes: dict[str, str]


def _scan(proto_dir: Path) -> _Tree:
    proto_dir = Path(proto_dir)
    shown = _shown(proto_dir)
    if not proto_dir.exists():
        raise ConfigError(f"{shown}: no such directory")
    if not proto_dir.is_dir():
        raise ConfigError(f"{shown}: not a directory (expected a directory of .proto files)")
    root = proto_dir.resolve()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden directories (.git, our own .virtsvc-gen-* staging dirs) are never part of the contract
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".proto") and not name.startswith("."):
                path = Path(dirpath, name)
                files[path.relative_to(root).as_posix()] = path
    if not files:
        raise ConfigError(f"{shown}: no .proto files found")
    hashes = {name: _sha256(path.read_bytes()) for name, path in files.items()}
    return _Tree(root=root, shown=shown, files=dict(sorted(files.items())), hashes=hashes)


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
    return None if path is None else _sha256(path.read_bytes())


@functools.cache
def _tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("grpcio-tools", "protobuf"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - both are dependencies
            versions[dist] = "?"
    return versions


def _options_hash(search: Sequence[Path]) -> str:
    blob = json.dumps({"format": _FORMAT, "tools": _tool_versions(), "search": [str(p) for p in search]})
    return _sha256(blob.encode())


# ------------------------------------------------------------------------------------------- running protoc

_LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$")
_FILE_LEVEL = re.compile(r"^(?P<file>[^:]+): (?P<msg>.*)$")
_IMPORT_MISSING = re.compile(r'^Import "(?P<name>[^"]+)" was not found or had errors\.$')


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
        located = _LOCATED.match(line)
        if located:
            file = _display(located["file"], roots)
            message = located["msg"]
            if message.startswith("warning: "):
                warnings.append(f"{file}:{located['line']}:{located['col']}: {message}")
                continue
            problem = Problem(file, int(located["line"]), message, int(located["col"]))
        elif m := _FILE_LEVEL.match(line):
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
    missing = {m["name"] for p in problems if p.line and (m := _IMPORT_MISSING.match(p.message))}
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


def _run_protoc(args: Sequence[str], roots: Sequence[tuple[Path, str]]) -> None:
    """Run protoc in-process; raise ProtoError with one located Problem per protoc error."""
    # grpc_tools.protoc.main() is a thin wrapper around _protoc_compiler.run_main(); importing
    # grpc_tools.protoc however installs import hooks and appends to sys.path of the whole process.
    from grpc_tools import _protoc_compiler

    argv = [b"grpc_tools.protoc", *(os.fsencode(a) for a in args)]
    with _PROTOC_LOCK, tempfile.TemporaryFile() as err:
        with _stderr_to(err.fileno()):
            status = _protoc_compiler.run_main(argv)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    problems, warnings = _parse_protoc_output(text, roots)
    for warning in warnings:
        _log.warning("protoc.warning", message=warning)
    if status != 0:
        raise ProtoError(problems or [Problem("protoc", 0, f"failed with exit status {status}")])


def _roots_shown(tree: _Tree, includes: Sequence[Path]) -> list[tuple[Path, str]]:
    return [(tree.root, tree.shown), *((Path(p).resolve(), _shown(Path(p))) for p in includes)]


# -------------------------------------------------------------------------------------------- descriptor sets


def _ordered(names: Iterable[str], pool: Mapping[str, descriptor_pb2.FileDescriptorProto]) -> list[str]:
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


def _services(fds: descriptor_pb2.FileDescriptorSet, names: set[str]) -> dict[str, Any]:
    services: dict[str, Any] = {}
    for file in fds.file:
        if file.name not in names:
            continue
        prefix = f"{file.package}." if file.package else ""
        for service in file.service:
            full = prefix + service.name
            services[full] = {
                "file": file.name,
                "methods": {
                    m.name: {
                        "full_name": f"{full}/{m.name}",
                        "kind": method_kind(m.client_streaming, m.server_streaming),
                        "input_type": m.input_type.lstrip("."),
                        "output_type": m.output_type.lstrip("."),
                    }
                    for m in service.method
                },
            }
    return services


# ------------------------------------------------------------------------------------------------- generate


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _load_previous(out: Path) -> tuple[dict[str, Any], dict[str, descriptor_pb2.FileDescriptorProto]] | None:
    """The previous run's manifest and descriptors, or None when there is no usable previous run."""
    raw_manifest, raw_fds = _read(out / MANIFEST_NAME), _read(out / DESCRIPTORS_NAME)
    if raw_manifest is None or raw_fds is None:
        return None
    try:
        manifest = json.loads(raw_manifest)
        fds = descriptor_pb2.FileDescriptorSet.FromString(raw_fds)
    except Exception:  # anything unreadable just means "rebuild everything"
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    files, dependencies = manifest.get("files"), manifest.get("dependencies")
    if not isinstance(files, dict) or not isinstance(dependencies, dict):
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("imports"), list) for e in files.values()):
        return None
    pool = {f.name: f for f in fds.file}
    # unchanged files keep these descriptors, so the set must hold every file and everything it imports
    if any(name not in pool for name in files) or any(d not in pool for f in fds.file for d in f.dependency):
        return None
    return manifest, pool


def _to_compile(
    tree: _Tree,
    search: Sequence[Path],
    out: Path,
    options: str,
    previous: tuple[dict[str, Any], dict[str, descriptor_pb2.FileDescriptorProto]] | None,
) -> set[str]:
    """Tree files whose outputs must be regenerated: changed ones and all their (transitive) importers."""
    if previous is None or previous[0].get("options_sha256") != options:
        return set(tree.files)
    manifest = previous[0]
    old_files: dict[str, Any] = manifest["files"]
    # an import path is "changed" when what it resolves to now differs from what was compiled last time
    changed = {n for n in tree.files if old_files.get(n, {}).get("sha256") != tree.hashes[n]}
    changed |= set(old_files) - set(tree.files)
    changed |= {n for n, h in manifest["dependencies"].items() if _hash_resolved(n, search) != h}
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
    recompile |= {n for n in tree.files if any(not (out / o).is_file() for o in _python_outputs(n))}
    return recompile


def _near_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor (where a staging directory can live)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path.cwd()


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
    previous = _load_previous(out_abs)
    recompile = _to_compile(tree, search, out_abs, options, previous)

    pool: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    if previous is not None and recompile != set(tree.files):
        pool.update(previous[1])
    desired: dict[str, bytes] = {}  # output path relative to OUT -> content
    if recompile:
        staging = Path(tempfile.mkdtemp(prefix=".virtsvc-gen-", dir=_near_existing(out_abs.parent)))
        try:
            modules, raw = staging / "modules", staging / "compiled.binpb"
            modules.mkdir()
            _run_protoc(
                [
                    *(f"--proto_path={p}" for p in search),
                    f"--python_out={modules}",
                    f"--pyi_out={modules}",
                    f"--grpc_python_out={modules}",
                    f"--descriptor_set_out={raw}",
                    "--include_imports",
                    "--include_source_info",
                    *(str(tree.files[n]) for n in sorted(recompile)),
                ],
                _roots_shown(tree, includes),
            )
            for name in sorted(recompile):
                for rel in _python_outputs(name):
                    data = _read(modules / rel)
                    if data is None:  # pragma: no cover - would mean protoc changed its naming rule
                        raise RuntimeError(f"protoc did not write the expected {rel} for {name}")
                    desired[rel] = data
            fresh = descriptor_pb2.FileDescriptorSet.FromString(raw.read_bytes())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        pool.update({f.name: f for f in fresh.file})

    # Unchanged files keep their previous descriptors (their imports did not change either), so the
    # merged set equals what compiling the whole tree would give.
    order = _ordered(tree.files, pool)
    fds = descriptor_pb2.FileDescriptorSet(file=[pool[n] for n in order])
    desired[DESCRIPTORS_NAME] = fds.SerializeToString(deterministic=True)
    outputs = sorted({o for n in tree.files for o in _python_outputs(n)} | {DESCRIPTORS_NAME, MANIFEST_NAME})
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "options_sha256": options,
        "files": {n: {"sha256": tree.hashes[n], "imports": list(pool[n].dependency)} for n in tree.files},
        "dependencies": {n: _hash_resolved(n, search) for n in order if n not in tree.files},
        "services": _services(fds, set(tree.files)),
        "outputs": outputs,
    }
    desired[MANIFEST_NAME] = (json.dumps(manifest, indent=2) + "\n").encode()

    written = [rel for rel, data in desired.items() if _read(out_abs / rel) != data]
    old_outputs = set(previous[0].get("outputs", [])) if previous is not None else set()
    removed = sorted(rel for rel in old_outputs - set(outputs) if _inside(rel) and (out_abs / rel).is_file())
    # the manifest goes last: if anything above fails, the old manifest makes the next run redo the work
    for rel in written:
        if rel != MANIFEST_NAME:
            _replace(out_abs / rel, desired[rel])
    for rel in removed:
        (out_abs / rel).unlink()
        _prune_empty_dirs(out_abs, rel)
    if MANIFEST_NAME in written:
        _replace(out_abs / MANIFEST_NAME, desired[MANIFEST_NAME])

    written.sort()
    _log.info(
        "gen.completed",
        out=_shown(out),
        protos=len(tree.files),
        compiled=len(recompile),
        written=len(written),
        removed=len(removed),
    )
    return GenResult(compiled=sorted(recompile), written=written, removed=removed, manifest=manifest)


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
        )
        data = raw.read_bytes()
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    deps = {f.name: _hash_resolved(f.name, search) for f in fds.file if f.name not in tree.files}
    try:
        _replace(entry, data)
        _replace(deps_file, json.dumps(deps, sort_keys=True).encode())
        old = sorted(cache.glob("*.binpb"), key=lambda p: p.stat().st_mtime_ns, reverse=True)[_CACHE_KEEP:]
        for stale in old:
            stale.unlink(missing_ok=True)
            stale.with_name(stale.name[: -len(".binpb")] + ".deps.json").unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache only costs a recompile next time
        _log.warning("descriptors.cache_unwritable", cache_dir=str(cache), error=str(exc))
    _log.info("descriptors.compiled", protos=len(tree.files), files=len(fds.file))
    return data
