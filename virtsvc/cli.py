"""The ``virtsvc`` console script.

Each subcommand has a parser section in :func:`build_parser` and one ``_cmd_<name>(args, settings) -> int``
handler. ``[tool.virtsvc]`` settings (:mod:`virtsvc.config`) supply the defaults, flags win. User errors
(:class:`~virtsvc.errors.VirtsvcError`) are printed to stderr as ``virtsvc: error: <text>`` or as their
located ``file:line:col: message`` lines, exit status 1; usage errors exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import structlog

from virtsvc.config import Settings, load_settings
from virtsvc.errors import ConfigError, VirtsvcError

__all__ = ["build_parser", "configure_logging", "main"]

PROG = "virtsvc"
LOG_FORMATS = ("json", "console")


class _StderrLoggerFactory:
    """PrintLoggers on whatever ``sys.stderr`` is *now* (test runners and redirections swap it)."""

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(sys.stderr)


def configure_logging(fmt: str | None, level: int = logging.INFO) -> None:
    """Set up structlog: ``json`` lines or a ``console`` rendering, written to stderr.

    ``fmt=None`` picks json when stdout is not a terminal (piped, CI, containers) and console otherwise.
    stderr keeps stdout free for the commands' own output.
    """
    if fmt is None:
        fmt = "console" if sys.stdout.isatty() else "json"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_StderrLoggerFactory(),
        # not cached: a cached logger would keep writing to a stderr that has since been replaced
        cache_logger_on_first_use=False,
    )


# ------------------------------------------------------------------------------------------------ subcommands


def _shown_dir(path: Path) -> str:
    """A directory as the user would type it, with a trailing slash."""
    if path.is_absolute():
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path.cwd())
    text = path.as_posix()
    return text if text.endswith("/") else text + "/"


def _cmd_gen(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc gen: compile a .proto tree into python modules, descriptors.binpb and manifest.json."""
    from virtsvc._protoc import generate

    settings = settings.merged(protos=args.proto_dir, generated=args.out)
    if settings.protos is None:
        raise ConfigError("gen: no PROTO_DIR given and no [tool.virtsvc] protos in ./pyproject.toml")
    result = generate(settings.protos, settings.generated, [Path(p) for p in args.include])
    out = _shown_dir(settings.generated)
    protos = len(result.manifest["files"])
    written, removed = len(result.written), len(result.removed)
    if not written and not removed:
        print(f"{out} is up to date ({protos} protos)")
    elif result.compiled:
        also = f", removed {removed}" if removed else ""
        print(f"generated {written} files from {len(result.compiled)} protos into {out}{also}")
    else:  # only deletions: nothing to compile, the descriptor set and manifest shrink
        print(f"updated {out}: {written} files written, {removed} removed")
    return 0


# -------------------------------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand; each subparser sets ``handler`` to its ``_cmd_<name>``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Service virtualisation for gRPC. Defaults come from [tool.virtsvc] in ./pyproject.toml.",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="log rendering (default: json when stdout is not a terminal, console otherwise)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "gen",
        help="compile .proto files into python modules, a descriptor set and a manifest",
        description=(
            "Compile every .proto under PROTO_DIR with grpcio-tools into OUT: *_pb2.py, *_pb2.pyi, "
            "*_pb2_grpc.py, descriptors.binpb (FileDescriptorSet with imports and source info) and "
            "manifest.json. Incremental: unchanged files are neither recompiled nor rewritten. "
            "Well-known types and googleapis protos (google/api, google/rpc, google/type, ...) are found "
            "automatically."
        ),
    )
    gen.add_argument(
        "proto_dir", metavar="PROTO_DIR", nargs="?", type=Path, help="default: [tool.virtsvc] protos"
    )
    gen.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="output directory (default: [tool.virtsvc] generated, else generated/)",
    )
    gen.add_argument(
        "-I",
        "--include",
        metavar="INCLUDE",
        action="append",
        default=[],
        type=Path,
        help="extra import root, searched after PROTO_DIR (repeatable)",
    )
    gen.set_defaults(handler=_cmd_gen)

    return parser


def _print_error(exc: BaseException, stream: TextIO) -> None:
    problems = getattr(exc, "problems", None)
    if problems:
        # located errors stand on their own, one per line, so editors can jump to them
        for problem in problems:
            print(str(problem), file=stream)
    else:
        print(f"{PROG}: error: {exc}", file=stream)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``virtsvc`` command line; returns the exit status (0 ok, 1 user error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    configure_logging(args.log_format)
    try:
        settings = load_settings()
        return int(args.handler(args, settings))
    except VirtsvcError as exc:
        _print_error(exc, sys.stderr)
        return 1
    except OSError as exc:  # unwritable output directory, full disk...: the user's to fix, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
