"""The ``virtsvc`` console script.

Each subcommand has a parser section in :func:`build_parser` and one ``_cmd_<name>(args, settings) -> int``
handler. ``[tool.virtsvc]`` settings (:mod:`virtsvc.config`) supply the defaults, flags win. User errors
(:class:`~virtsvc.errors.VirtsvcError`) are printed to stderr as ``virtsvc: error: <text>`` or as their
located ``file:line:col: message`` lines, exit status 1; usage errors exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

from virtsvc import _logs
from virtsvc.config import Settings, load_settings
from virtsvc.errors import ConfigError, VirtsvcError

if TYPE_CHECKING:
    import structlog

__all__ = ["build_parser", "configure_logging", "main"]

PROG = "virtsvc"
LOG_FORMATS = ("json", "console")
# logging.INFO. Heavy modules (structlog, grpc) are imported by what runs, not here: start-up time.
_DEBUG = 10
_INFO = 20
_WARNING = 30
_LOG_LEVELS = {"debug": _DEBUG, "info": _INFO, "warning": _WARNING, "error": 40}
_T = TypeVar("_T")


class _StreamLoggerFactory:
    """PrintLoggers on whatever ``sys.stderr``/``sys.stdout`` is *now* (test runners swap them)."""

    def __init__(self, stream: str = "stderr") -> None:
        self.stream = stream

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        import structlog

        return structlog.PrintLogger(getattr(sys, self.stream))


def _log_format(fmt: str | None) -> str:
    """``fmt``, or for None: json when stdout is not a terminal (piped, CI, containers), else console."""
    if fmt is None:
        fmt = "console" if sys.stdout.isatty() else "json"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    return fmt


def configure_logging(fmt: str | None, level: int = _INFO, stream: str = "stderr") -> None:
    """Set up structlog: ``json`` lines or a ``console`` rendering, written to stderr.

    ``fmt=None`` picks json when stdout is not a terminal (piped, CI, containers) and console otherwise.
    stderr keeps stdout free for the commands' own output; ``serve``, whose output *is* its event
    stream, logs to stdout as a service in a container should.
    """
    import structlog

    fmt = _log_format(fmt)
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
        logger_factory=_StreamLoggerFactory(stream),
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
    from virtsvc.contracts.protoc import generate

    settings = settings.merged(protos=args.proto_dir, generated=args.out)
    if settings.protos is None:
        raise ConfigError("gen: no PROTO_DIR given and no [tool.virtsvc] protos in ./pyproject.toml")
    result = generate(settings.protos, settings.generated, [Path(p) for p in args.include])
    out = _shown_dir(settings.generated)
    protos = len(result.manifest["files"])
    written, removed = len(result.written), len(result.removed)
    if not written and not removed:
        print(f"{out} is up to date ({_count(protos, 'proto')})")
    elif result.compiled:
        also = f", removed {removed}" if removed else ""
        compiled = _count(len(result.compiled), "proto")
        print(f"generated {_count(written, 'file')} from {compiled} into {out}{also}")
    else:  # only deletions: nothing to compile, the descriptor set and manifest shrink
        print(f"updated {out}: {_count(written, 'file')} written, {removed} removed")
    return 0


def _count(n: int, noun: str) -> str:
    """``1 proto``, ``2 protos``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _catalog_from(args: argparse.Namespace, settings: Settings) -> Any:
    """The descriptors named by --protos/--descriptors, else [tool.virtsvc] protos, else generated/."""
    from virtsvc.contracts import load_catalog

    includes = [Path(p) for p in getattr(args, "include", [])]
    if args.descriptors is not None:
        return load_catalog(descriptors=args.descriptors)
    protos = args.protos or settings.protos
    if protos is not None:
        return load_catalog(protos=protos, includes=includes)
    generated = settings.generated / "descriptors.binpb"
    if generated.exists():
        return load_catalog(descriptors=generated)
    raise ConfigError(
        "no descriptors: give --protos DIR or --descriptors FILE, or set protos in [tool.virtsvc]"
    )


def _scenario_paths(args: argparse.Namespace, settings: Settings) -> list[Path]:
    # [tool.virtsvc] paths arrive absolute, but the user wrote them relative: locations in messages and
    # the journal name them relative to the cwd when under it, as the flags' paths are, and as in-process.
    paths = (
        [Path(p) for p in args.scenarios] if args.scenarios else [_as_given(p) for p in settings.scenarios]
    )
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such scenario file or directory")
    return paths


def _as_given(path: Path) -> Path:
    with contextlib.suppress(ValueError, OSError):
        return path.relative_to(Path.cwd())
    return path


def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc check: validate scenario files against the descriptors without serving."""
    from virtsvc.scenarios.loader import check_scenarios
    from virtsvc.scenarios.staleness import stale_rules

    catalog = _catalog_from(args, settings)
    paths = _scenario_paths(args, settings)
    if not paths:
        raise ConfigError("check: no SCENARIO_PATH given and no [tool.virtsvc] scenarios in ./pyproject.toml")
    problems, scenarios = check_scenarios(paths, catalog, _upstreams(args))
    problems = problems or [stale.problem for stale in stale_rules(scenarios, catalog)]
    if problems:
        for problem in problems:
            print(str(problem), file=sys.stderr)
        return 1
    rules = sum(len(s.rules) for s in scenarios)
    print(f"checked {_count(len(scenarios), 'scenario')}, {_count(rules, 'rule')}: ok")
    return 0


def _cmd_fake(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from virtsvc.scenarios.synthetic import generate, message_json, unknown_type_message

    catalog = _catalog_from(args, settings)
    try:
        desc = catalog.pool.FindMessageTypeByName(args.type)
    except KeyError:
        print(f"{PROG} fake: {unknown_type_message(args.type, catalog)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    out = sys.stdout
    for i in range(args.count):
        out.write(json.dumps(message_json(generate(desc, seed, i)), ensure_ascii=False) + "\n")
    if args.seed is None:
        print(f"{PROG} fake: seed {seed} (--seed {seed} prints the same messages)", file=sys.stderr)
    return 0


def _cmd_import_gripmock(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc import gripmock: GripMock stub files -> scenario files, one scenario per PATH."""
    from virtsvc.migrate import import_gripmock

    try:
        catalog = _catalog_from(args, settings)
    except ConfigError:
        if args.protos is not None or args.descriptors is not None:
            raise
        from google.protobuf import descriptor_pb2

        from virtsvc.contracts import Catalog

        catalog = Catalog.from_file_set(descriptor_pb2.FileDescriptorSet())  # health stubs need none
    imported = import_gripmock(args.paths, catalog, scenario=args.scenario)
    failed = False
    for result in imported:
        for note in result.notes:
            print(f"{note} (note)", file=sys.stderr)
        for problem in result.problems:
            print(str(problem), file=sys.stderr)
        if result.problems and not args.partial:
            failed = True
    if failed:
        print(
            f"{PROG} import gripmock: nothing written; fix the stubs above or give --partial to write the "
            "rest",
            file=sys.stderr,
        )
        return 1
    for result in imported:
        path = result.write(args.out)
        left = f", {_count(len(result.problems), 'problem')} left out" if result.problems else ""
        print(
            f"imported {_count(result.stubs, 'stub')} into {path} "
            f"(scenario {result.scenario}, {_count(result.rules, 'rule')}{left})"
        )
    return 0


def _cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc diff: breaking changes from OLD_PROTOS to NEW_PROTOS, and the scenario rules they break."""
    from virtsvc.contracts.diff import diff_catalogs, load_tree

    old, new = load_tree(args.old), load_tree(args.new)
    changes = diff_catalogs(old, new)
    breaking = [c for c in changes if c.breaking]
    broken: dict[Any, list[Any]] = {}
    if args.scenarios:
        from virtsvc.scenarios.loader import load_scenarios
        from virtsvc.scenarios.staleness import rules_broken_by

        for path in args.scenarios:
            if not path.exists():
                raise ConfigError(f"{path}: no such scenario file or directory")
        broken = rules_broken_by(breaking, load_scenarios(args.scenarios, old), old)
    for change in breaking:
        rules = broken.get(change)
        print(str(change) + ("; breaks " + ", ".join(r.where for r in rules) if rules else ""))
    if breaking:
        hit = {r.where for rules in broken.values() for r in rules}
        also = f", breaking {_count(len(hit), 'scenario rule')}" if args.scenarios else ""
        print(f"{_count(len(breaking), 'breaking change')}{also}", file=sys.stderr)
        return 1
    additions = len(changes)
    print("no breaking changes" + (f": {_count(additions, 'addition')}" if additions else " (identical)"))
    return 0


def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc verify: the scenarios against the real service; exit 1 on drift."""
    from virtsvc.scenarios.loader import load_scenarios
    from virtsvc.verify.compare import verify_rules
    from virtsvc.verify.replay import Target, target_catalog
    from virtsvc.verify.report import render, summary

    paths = _scenario_paths(args, settings)
    if not paths:
        raise ConfigError(
            "verify: no SCENARIO_PATH given and no [tool.virtsvc] scenarios in ./pyproject.toml"
        )
    target = Target(args.target, timeout=args.timeout)
    try:
        given = args.protos is not None or args.descriptors is not None or settings.protos is not None
        catalog = _catalog_from(args, settings) if given else None
        target.wait_ready()
        if catalog is None:
            catalog = target_catalog(target)
        results = verify_rules(load_scenarios(paths, catalog), catalog, target)
    finally:
        target.close()
    report = render(results, args.target, args.format)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
        print(summary(results, args.target))
    else:
        sys.stdout.write(report)
    return 1 if any(r.outcome == "drift" for r in results) else 0


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc serve: the sidecar. Runs until SIGTERM/SIGINT, then drains and exits 0."""
    # Importing what serving needs (grpc, protobuf, yaml, jinja2...) makes some 25,000 container objects that
    # all live on: collecting while they are made finds next to nothing. Frozen once imported, they are not
    # walked again by the collections while the scenarios load, nor by the full one the sidecar makes before
    # serving (12 ms -> 0.3 ms): about 30 ms of CPU off start-up. The few hundred objects the imports left as
    # garbage are frozen with them.
    if args.workers > 1:
        import os

        from virtsvc.server.workers import ENVIRONMENT

        if ENVIRONMENT not in os.environ:
            return _supervise_workers(args, settings)
    enabled = gc.isenabled()
    gc.disable()
    try:
        from virtsvc.scenarios import loader as _loader  # noqa: F401 - what serving needs next: imported to be frozen too
        from virtsvc.server.sidecar import run_sidecar
        from virtsvc.server.workers import WorkerLink
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    _logs.structlog_if_imported()  # modules that log through structlog itself write the same lines
    try:
        return run_sidecar(
            catalog=_catalog_from(args, settings),
            scenario_paths=_scenario_paths(args, settings),
            options=_serve_options(args, settings),
            worker=WorkerLink.from_environment() if args.workers > 1 else None,
        )
    except BaseException:
        gc.unfreeze()  # a process that goes on (a test calling main()) keeps a collectable heap
        raise


def _supervise_workers(args: argparse.Namespace, settings: Settings) -> int:
    """serve --workers N: the supervisor of N serving processes (virtsvc.server.workers)."""
    store = getattr(args, "store", None) or "memory"
    if not store.startswith(("redis://", "rediss://")):
        print(
            f"{PROG}: error: --workers {args.workers} needs a shared store: with --store memory "
            "(the default) each worker would keep its own sessions, sequences and journals; give --store redis://HOST:PORT/DB",
            file=sys.stderr,
        )
        return 2
    from virtsvc.server.workers import run_workers

    return run_workers(
        args.argv,
        count=args.workers,
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        grace=args.grace,
    )


def _cmd_record(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc record: a proxy to the real service writing what it answers as a scenario file."""
    from virtsvc.record.recorder import run_record

    _logs.structlog_if_imported()
    address = args.upstream
    if args.descriptors is not None or args.protos is not None:
        catalog = _catalog_from(args, settings)
    else:
        from virtsvc.upstream import catalog_from_reflection

        catalog = catalog_from_reflection(address, credentials=_upstream_credentials(args))
    return run_record(
        upstream=address,
        out=args.out,
        catalog=catalog,
        mode=args.mode,
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        redact=args.redact,
        keep_latency=args.keep_latency,
        credentials=_upstream_credentials(args),
    )


def _upstream_credentials(args: argparse.Namespace) -> Any:
    """TLS to the upstream: --upstream-tls (system roots), or --upstream-ca FILE (a private CA)."""
    if args.upstream_ca is None and not args.upstream_tls:
        return None
    import grpc

    roots = None
    if args.upstream_ca is not None:
        try:
            roots = Path(args.upstream_ca).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"--upstream-ca {args.upstream_ca}: cannot read: {exc.strerror or exc}"
            ) from None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _upstreams(args: argparse.Namespace) -> dict[str, str]:
    """The --upstream NAME=HOST:PORT flags, in order."""
    from virtsvc.upstream import parse_upstreams

    return parse_upstreams(getattr(args, "upstream", None) or [])


def _serve_options(args: argparse.Namespace, settings: Settings) -> Any:
    """The serve flags over ``[tool.virtsvc]``, as the one typed options object the server takes."""
    import os

    from virtsvc.server.options import ServeOptions

    return ServeOptions(
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        default_scenario=args.default_scenario or settings.default_scenario,
        max_workers=args.max_workers,
        journal_size=args.journal_size,
        journal_total=args.journal_total,
        session_ttl=args.session_ttl,
        store=args.store,
        max_message_bytes=args.max_message_bytes,
        max_concurrency=args.max_concurrency,
        max_concurrency_per_session=args.max_concurrency_per_session,
        admin_token=args.admin_token or os.environ.get("VIRTSVC_ADMIN_TOKEN") or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        grace=args.grace,
        watch=args.watch,
        min_ping_interval=args.min_ping_interval,
        upstreams=_upstreams(args),
        mode=args.mode,
        dashboard_port=args.dashboard_port,
        history=args.history,
        metrics_port=args.metrics_port,
        log_calls=_LOG_LEVELS[args.log_level] <= _DEBUG,  # the rpc events are debug-level
        time_scale=settings.time_scale if args.time_scale is None else args.time_scale,
    )


# ------------------------------------------------------------------------------------------ journal, report


def _address(args: argparse.Namespace, settings: Settings) -> str:
    """--address, else [tool.virtsvc] host:port (127.0.0.1:50051)."""
    if args.address:
        return str(args.address)
    host = settings.host
    return f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"


def _admin_token(args: argparse.Namespace) -> str | None:
    import os

    return args.admin_token or os.environ.get("VIRTSVC_ADMIN_TOKEN") or None


def _from_server(address: str, what: str, fetch: Callable[[Any], _T]) -> _T:
    """``fetch(channel)`` on the server at ``address``; a refusal or an unreachable server is one line."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            return fetch(channel)
        except grpc.RpcError as exc:
            code = exc.code()
            name = code.name if code is not None else "UNKNOWN"
            raise VirtsvcError(
                f"cannot read {what} of the server at {address}: {name}: {exc.details()}"
            ) from None


def _cmd_journal_export(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc journal export: the journal of a running server as JSON lines, one entry per line."""
    from virtsvc.observe.report import fetch_journal, write_journal

    address = _address(args, settings)
    token = _admin_token(args)
    entries = _from_server(
        address,
        "the journal",
        lambda channel: fetch_journal(
            channel, token, scenario=args.scenario or "", session=args.session or ""
        ),
    )
    if args.as_scenario:
        return _journal_as_scenario(args, entries)
    count = write_journal(entries, args.out)
    print(f"wrote {count} journal {'entry' if count == 1 else 'entries'} to {args.out}")
    return 0


def _journal_as_scenario(args: argparse.Namespace, entries: list[Any]) -> int:
    """journal export --as-scenario: the calls something answered, as the scenario `virtsvc record` writes."""
    from virtsvc.record import Redaction, rules_from_journal
    from virtsvc.record.export import answered
    from virtsvc.record.writer import scenario_name, write_scenario

    calls = sum(1 for e in entries if answered(e))
    rules = rules_from_journal(
        entries, redaction=Redaction.from_names(args.redact), keep_latency=args.keep_latency
    )
    name = args.name or scenario_name(args.out)
    write_scenario(args.out, name, rules)
    print(f"wrote scenario {name} ({_count(len(rules), 'rule')} from {_count(calls, 'call')}) to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    """virtsvc report: figures per scenario and method, unmatched calls, unused rules, per test; the gates."""
    from virtsvc.observe import formats
    from virtsvc.observe.gates import Gates, parse_p99, parse_rate
    from virtsvc.observe.report import build_report, fetch_journal, fetch_rules, read_journal, rules_of

    gates = Gates(
        max_error_rate=None if args.max_error_rate is None else parse_rate(args.max_error_rate),
        max_p99=None if args.max_p99 is None else parse_p99(args.max_p99),
        fail_on_unmatched=args.fail_on_unmatched,
        fail_on_unused=args.fail_on_unused,
    )
    fmt = args.format or (formats.format_from_suffix(args.output) if args.output else "text")
    rules = None
    if args.scenarios:
        from virtsvc.scenarios.loader import load_scenarios

        rules = list(rules_of(load_scenarios(_scenario_paths(args, settings), _catalog_from(args, settings))))
    if args.journal is not None:
        entries = read_journal(args.journal)
        source = str(args.journal)
    else:
        source = _address(args, settings)
        token = _admin_token(args)
        entries = _from_server(source, "the journal", lambda channel: fetch_journal(channel, token))
        if rules is None:
            rules = _from_server(source, "the rules", lambda channel: fetch_rules(channel, token))
    report = build_report(entries, rules, scenario=args.scenario, session=args.session, source=source)
    verdicts = gates.check(report)
    history = None
    if args.history is not None:
        from virtsvc.observe.history import History

        store = History(args.history)
        store.record(report)
        history = store.view(args.history_runs)
    text = formats.render(report, fmt, verdicts, history)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    failed = [g for g in verdicts if not g.ok]
    for gate in failed:
        print(f"{PROG}: gate failed: {gate.name}: {gate.figure}", file=sys.stderr)
    return 1 if failed else 0


def _report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="the server whose journal to read (default: [tool.virtsvc] host and port, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="the server's admin token (default: $VIRTSVC_ADMIN_TOKEN)",
    )
    parser.add_argument("--scenario", metavar="NAME", help="only the calls of this scenario")
    parser.add_argument("--session", metavar="ID", help="only the calls of this session")


# -------------------------------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand; each subparser sets ``handler`` to its ``_cmd_<name>``."""
    parser = _Parser(
        prog=PROG,
        description="Service virtualisation for gRPC. Defaults come from [tool.virtsvc] in ./pyproject.toml.",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="log rendering (default: json when stdout is not a terminal, console otherwise)",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
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

    check = commands.add_parser(
        "check",
        help="validate scenario files against the descriptors without serving",
        description="Validate scenarios: exit 0 when valid, else 1 with one file:line: message per problem.",
    )
    _descriptor_flags(check)
    check.add_argument(
        "scenarios",
        metavar="SCENARIO_PATH",
        nargs="*",
        type=Path,
        help="files or directories (default: [tool.virtsvc] scenarios)",
    )
    _upstream_flag(check)
    check.set_defaults(handler=_cmd_check)

    fake = commands.add_parser(
        "fake",
        help="print generated messages of a type as JSON lines",
        description=(
            "Print COUNT messages of TYPE filled with realistic values from its schema, one JSON object "
            "a line (the values reply: {$generate: ...} gives): the same --seed prints the same messages."
        ),
    )
    fake.add_argument("type", metavar="TYPE", help="a message type's full name, e.g. shop.v1.Item")
    fake.add_argument("--count", type=_positive, default=1, help="how many messages (default: 1)")
    fake.add_argument("--seed", type=int, help="the seed (default: a random one, said on stderr)")
    _descriptor_flags(fake)
    fake.set_defaults(handler=_cmd_fake)

    importer = commands.add_parser(
        "import",
        help="convert another tool's stubs into scenario files",
        description="Convert another tool's stubs into virtsvc scenario files.",
    )
    tools = importer.add_subparsers(dest="tool", metavar="TOOL", required=True)
    gripmock = tools.add_parser(
        "gripmock",
        help="GripMock stub files (YAML or JSON) -> scenarios",
        description=(
            "Convert GripMock stub files into scenario files that answer as GripMock would: one scenario "
            "per PATH (a directory's stub files, recursively, or one file), named after it, written to "
            "OUT/NAME.yaml. What cannot be converted is reported as file:line: message and nothing is "
            "written (exit 1) unless --partial is given."
        ),
    )
    gripmock.add_argument("paths", metavar="PATH", nargs="+", type=Path, help="stub directories or files")
    gripmock.add_argument("-o", "--out", type=Path, required=True, help="directory the scenarios go to")
    gripmock.add_argument("--scenario", metavar="NAME", help="one scenario of this name for every PATH")
    gripmock.add_argument(
        "--partial", action="store_true", help="write what converts even when some stubs do not"
    )
    _descriptor_flags(gripmock)
    gripmock.set_defaults(handler=_cmd_import_gripmock)

    serve = commands.add_parser(
        "serve",
        help="serve virtual services (the sidecar)",
        description=(
            "Serve every service of the descriptors through the scenario router, with health, reflection and "
            "the admin API, on one port. Stops on SIGTERM/SIGINT after in-flight calls finish."
        ),
    )
    _descriptor_flags(serve)
    serve.add_argument(
        "--scenarios",
        metavar="PATH",
        nargs="+",
        action="extend",
        type=Path,
        help="scenario files or directories, repeatable (default: [tool.virtsvc] scenarios)",
    )
    serve.add_argument("--host", help="address to bind (default: [tool.virtsvc] host, else 127.0.0.1)")
    serve.add_argument(
        "--port", type=_port, help="port (default: [tool.virtsvc] port, else 50051; 0 picks one)"
    )
    serve.add_argument("--default-scenario", metavar="NAME", help="scenario for calls that name none")
    serve.add_argument("--watch", action="store_true", help="reload changed scenario files without a restart")
    _upstream_flag(serve)
    serve.add_argument(
        "--mode",
        choices=("simulate", "spy", "passthrough"),
        default="simulate",
        help="simulate: scenarios only (default); spy: scenarios first, the first --upstream for what no "
        "rule answers; passthrough: the first --upstream answers everything",
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS,
        help="json (default when stdout is not a terminal) or console",
    )
    serve.add_argument(
        "--log-level",
        choices=list(_LOG_LEVELS),
        default="info",
        help="the least severe events logged (default info); debug adds an rpc event per call",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST: --host; 0 picks a port; "
        "needs the metrics extra)",
    )
    serve.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long in-flight calls may take to finish on shutdown (default 10)",
    )
    serve.add_argument(
        "--min-ping-interval",
        type=_interval,
        default=10.0,
        metavar="SECONDS",
        help="the shortest interval between keepalive pings a client may send, calls in flight or not; "
        "faster clients are told too_many_pings (default 10)",
    )
    serve.add_argument(
        "--time-scale",
        type=_time_scale,
        default=None,
        metavar="F",
        help="multiply every delay by F (above 0): 2 stretches them, 0.1 compresses them tenfold "
        "(default 1, or time_scale in [tool.virtsvc])",
    )
    serve.add_argument(
        "--journal-size",
        type=_positive,
        default=500,
        metavar="N",
        help="journal entries kept per session (default 500)",
    )
    serve.add_argument(
        "--journal-total",
        type=_positive,
        default=100_000,
        metavar="N",
        help="journal entries kept in all; past it the least recently active sessions' go first "
        "(default 100000)",
    )
    serve.add_argument(
        "--session-ttl",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="idle sessions expire after this long (default 3600)",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="processes serving the port, one core each (default 1); more than one needs --store redis://...",
    )
    serve.add_argument(
        "--store",
        default="memory",
        metavar="memory|redis://HOST:PORT/DB",
        help="where sessions live: this process (memory, the default) or a Redis shared by every replica "
        "(also rediss://, and redis://:PASSWORD@HOST:PORT/DB)",
    )
    serve.add_argument(
        "--max-workers", type=_positive, default=64, metavar="N", help="threads serving calls (default 64)"
    )
    serve.add_argument(
        "--max-message-bytes",
        type=_positive,
        default=4 * 1024 * 1024,
        metavar="N",
        help="largest message accepted or sent (default 4 MiB, gRPC's own)",
    )
    serve.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="admin calls must send 'authorization: Bearer TOKEN' (required off loopback)",
    )
    serve.add_argument(
        "--max-concurrency",
        type=_positive,
        default=None,
        metavar="N",
        help="calls in flight in the whole server; beyond it calls are answered "
        "RESOURCE_EXHAUSTED at once (default: no limit)",
    )
    serve.add_argument(
        "--max-concurrency-per-session",
        type=_positive,
        default=None,
        metavar="N",
        help="calls in flight per session; beyond it RESOURCE_EXHAUSTED (default: no limit)",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        type=Path,
        help="serve TLS with this PEM certificate (chain); needs --tls-key",
    )
    serve.add_argument("--tls-key", metavar="FILE", type=Path, help="the PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        type=Path,
        help="mutual TLS: clients must present a certificate signed by this PEM CA",
    )
    serve.add_argument(
        "--dashboard-port",
        type=_port,
        default=None,
        metavar="N",
        help="serve the live dashboard (a web page) on this port of --host; 0 picks one (default: none). "
        "With --admin-token it asks for the token",
    )
    serve.add_argument(
        "--history",
        metavar="FILE",
        type=Path,
        default=None,
        help="a run history written by 'virtsvc report --history FILE': the dashboard shows its trends",
    )
    serve.set_defaults(handler=_cmd_serve)

    journal = commands.add_parser("journal", help="read the journal of a running server")
    journal_commands = journal.add_subparsers(dest="journal_command", metavar="COMMAND", required=True)
    export = journal_commands.add_parser(
        "export",
        help="write the journal as JSON lines",
        description=(
            "Write the journal of a running server as JSON lines, one entry per line in proto3 JSON (as "
            "GetJournal sends it), oldest first: for `virtsvc report --journal` and as a CI artifact."
        ),
    )
    _report_flags(export)
    export.add_argument("--out", metavar="FILE", type=Path, required=True, help="the file to write")
    export.add_argument(
        "--as-scenario",
        action="store_true",
        help="write a scenario file instead, as `virtsvc record` does: every call a rule or a real service "
        "answered becomes a rule (calls no rule answered are left out)",
    )
    export.add_argument(
        "--name", metavar="NAME", help="with --as-scenario: the scenario's name (default: from --out's name)"
    )
    export.add_argument(
        "--redact",
        metavar="NAME",
        nargs="+",
        action="extend",
        default=[],
        help="with --as-scenario: a header or field path kept out of the file, as for `virtsvc record`",
    )
    export.add_argument(
        "--keep-latency", action="store_true", help="with --as-scenario: keep each call's latency as delay"
    )
    export.set_defaults(handler=_cmd_journal_export)

    report = commands.add_parser(
        "report",
        help="report a run's calls per scenario, method and test; gates for CI",
        description=(
            "Per scenario and method: calls, error rate, latency p50/p90/p99, unmatched calls with their "
            "near miss, and the rules no call used; per test (the pytest plugin labels each test's session). "
            "The gates exit 1 naming each one that failed and the figure that failed it, 0 when all hold."
        ),
    )
    source = report.add_mutually_exclusive_group()
    source.add_argument(
        "--journal", metavar="FILE", type=Path, help="a journal written by `virtsvc journal export`"
    )
    _report_flags(report)
    report.add_argument(
        "--format",
        choices=("text", "json", "junit", "html"),
        default=None,
        help="text (default), json, junit (XML) or html; with --output, taken from its suffix",
    )
    report.add_argument("--output", "-o", metavar="FILE", type=Path, help="write here instead of stdout")
    report.add_argument(
        "--scenarios",
        metavar="PATH",
        nargs="+",
        action="extend",
        type=Path,
        help="scenario files or directories whose rules the report checks for use (default: the server's)",
    )
    _descriptor_flags(report)
    report.add_argument(
        "--max-error-rate", metavar="R", help="gate: the error rate of all calls at most R (0.05 or 5%%)"
    )
    report.add_argument(
        "--max-p99", metavar="DURATION", help="gate: every scenario and method's p99 at most DURATION (250ms)"
    )
    report.add_argument(
        "--fail-on-unmatched", action="store_true", help="gate: no call that no rule answered"
    )
    report.add_argument("--fail-on-unused", action="store_true", help="gate: no rule that no call used")
    report.add_argument(
        "--history",
        metavar="FILE",
        type=Path,
        help="append this run to a SQLite history and show its trends and flaky tests",
    )
    report.add_argument(
        "--history-runs", metavar="N", type=_positive, default=10, help="runs the trends show (default 10)"
    )
    report.set_defaults(handler=_cmd_report)

    diff = commands.add_parser(
        "diff",
        help="breaking changes between two versions of the contracts",
        description=(
            "Compare two proto trees (or descriptor sets): one breaking change per line, naming the element "
            "(removed or renamed services, methods, fields and enum values; changed field numbers, types, "
            "labels and oneofs; changed streaming kinds and input or output types). With --scenarios, the "
            "rules (file:line) each change breaks. Exit 1 on a breaking change, 0 when the trees are "
            "identical or differ by additions only."
        ),
    )
    diff.add_argument("old", metavar="OLD_PROTOS", type=Path, help="the contracts as they were")
    diff.add_argument("new", metavar="NEW_PROTOS", type=Path, help="the contracts as they are to be")
    diff.add_argument(
        "--scenarios",
        metavar="PATH",
        nargs="+",
        type=Path,
        default=[],
        help="scenario files or directories, loaded against OLD_PROTOS: name the rules each change breaks",
    )
    diff.set_defaults(handler=_cmd_diff)

    verify = commands.add_parser(
        "verify",
        help="replay the scenarios' concrete requests against the real service and report drift",
        description=(
            "Replay each rule's concrete request (examples:, or a when.request of literals) against the real "
            "service at --target and compare its answer with the rule's: the status code, then the reply's "
            "shape (fields, types, enum values), then the values where the rule says verify: exact. One line "
            "per rule naming its file:line; exit 0 when everything holds, 1 on drift. Without --protos or "
            "--descriptors, the contracts come from the target's reflection service."
        ),
    )
    verify.add_argument("--target", required=True, metavar="HOST:PORT", help="the real service")
    _descriptor_flags(verify)
    verify.add_argument(
        "scenarios", metavar="SCENARIO_PATH", nargs="*", type=Path, help="default: [tool.virtsvc] scenarios"
    )
    verify.add_argument(
        "--format",
        choices=("text", "json", "junit"),
        default="text",
        help="the report's format (default text)",
    )
    verify.add_argument(
        "--output",
        metavar="FILE",
        type=Path,
        help="write the report here (stdout then says the summary only)",
    )
    verify.add_argument(
        "--timeout",
        type=_interval,
        default=10.0,
        metavar="SECONDS",
        help="deadline of each call, and of reaching the target (default 10)",
    )
    verify.set_defaults(handler=_cmd_verify)
    _record_parser(commands)

    return parser


def _record_parser(commands: Any) -> None:
    record = commands.add_parser(
        "record",
        help="record a real service's answers as a scenario file (a proxy)",
        description=(
            "A proxy to the real service at --upstream: every call of all four RPC kinds is forwarded and "
            "its answer returned unchanged, and written to --out as a scenario that `virtsvc serve` replays "
            "and `virtsvc check` passes. The contracts come from --protos/--descriptors, else from the "
            "upstream's server reflection. Stops on SIGINT/SIGTERM, leaving a complete file."
        ),
    )
    record.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the real service")
    _descriptor_flags(record)
    record.add_argument("--out", required=True, type=Path, metavar="FILE", help="the scenario file to write")
    record.add_argument("--host", help="address to bind (default: [tool.virtsvc] host, else 127.0.0.1)")
    record.add_argument(
        "--port", type=_port, help="port (default: [tool.virtsvc] port, else 50051; 0 picks one)"
    )
    record.add_argument(
        "--mode",
        choices=("once", "new_episodes", "all", "refresh"),
        default="once",
        help="once: a new file, refused if FILE exists (default); new_episodes: add the calls FILE lacks; "
        "all: record FILE anew; refresh: re-record only the rules whose contract changed, then exit",
    )
    record.add_argument(
        "--redact",
        metavar="NAME",
        nargs="+",
        action="extend",
        default=[],
        help="a header, or a field path (request.card.number, reply.token), kept out of the file; "
        "authorization, cookies and API-key-like headers always are (repeatable)",
    )
    record.add_argument(
        "--keep-latency", action="store_true", help="keep each call's observed latency as its rule's delay"
    )
    record.add_argument(
        "--upstream-tls", action="store_true", help="reach the upstream over TLS (system trust roots)"
    )
    record.add_argument(
        "--upstream-ca", metavar="FILE", type=Path, help="reach the upstream over TLS, trusting this PEM CA"
    )
    record.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS,
        help="json (default when stdout is not a terminal) or console",
    )
    record.set_defaults(handler=_cmd_record)


def _upstream_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--upstream",
        metavar="NAME=HOST:PORT",
        action="append",
        default=[],
        help="a real service that passthrough: rules and --mode spy|passthrough forward calls to "
        "(repeatable)",
    )


def _descriptor_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--protos",
        metavar="DIR",
        type=Path,
        help="a .proto tree, compiled on the fly (cached) (default: [tool.virtsvc] protos)",
    )
    source.add_argument(
        "--descriptors",
        metavar="FILE",
        type=Path,
        help="a FileDescriptorSet, e.g. generated/descriptors.binpb",
    )
    parser.add_argument(
        "-I",
        "--include",
        metavar="INCLUDE",
        action="append",
        default=[],
        type=Path,
        help="extra import root for --protos (repeatable)",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, not {port}")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _time_scale(text: str) -> float:
    from virtsvc.config import time_scale

    try:
        return time_scale(text, "--time-scale")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--time-scale: ")) from None


def _interval(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {value}")
    return value


def _version() -> str:
    # The package this module is in (always imported first); not an import of it, which the layout forbids.
    return str(sys.modules["virtsvc"].__version__)


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # serve --workers gives it to each worker
    stream = "stdout" if args.command in ("serve", "record") else "stderr"
    # gen and check say what they did in one line of their own: their info events (gen.completed) only when
    # a log format was asked for; warnings always.
    level = _INFO if args.command in ("serve", "record") or args.log_format is not None else _WARNING
    if args.command == "serve":
        level = _LOG_LEVELS[args.log_level]
    undo: Callable[[], None] | None = None
    if args.command != "check" and "structlog" not in sys.modules and _log_format(args.log_format) == "json":
        # gen and serve log through virtsvc._logs, whose json lines need no structlog (a third of a gen run)
        undo = _logs.json_lines(level, stream, lambda: configure_logging("json", level, stream=stream))
    else:
        configure_logging(args.log_format, level, stream=stream)
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
    finally:
        if undo is not None:
            undo()


if __name__ == "__main__":
    sys.exit(main())
