"""The virtsvc pytest plugin: virtual gRPC services as fixtures (registered through the ``pytest11`` entry
point).

Fixtures:

``virtsvc_server`` (session)
    A ``VirtualServer`` in this process on 127.0.0.1, port 0 (``.address``, ``.port``, ``.catalog``), or
    with ``--virtsvc-address HOST:PORT`` a ``RemoteServer`` for a sidecar that serves the admin API.
``virtual_service`` (function)
    A ``virtsvc.testing.service.VirtualService`` on a fresh session: ``.use(name)``, ``.on(method)...``,
    ``.metadata``, ``.channel()``, ``.aio_channel()``, ``.calls()``, ``.assert_called()``. A test whose
    calls matched no rule, or whose ``times=`` rules were not used up, fails with the reason.

Settings (``[tool.pytest.ini_options]``/``pytest.ini``; each falls back to ``[tool.virtsvc]``):
``virtsvc_protos``, ``virtsvc_descriptors``, ``virtsvc_scenarios``, ``virtsvc_default_scenario``,
``virtsvc_fail_on_unmatched`` (default true), ``virtsvc_time_scale`` (every delay times it; also
``--virtsvc-time-scale F``, which wins).

``--virtsvc-report PATH`` writes the report of the run's calls (``virtsvc report``'s, with a per-test
breakdown: each test's session is labelled with its node id) when the run ends, in the format its suffix
names (.txt, .json, .xml for JUnit, .html). Under xdist each worker hands its calls to the controller,
which writes one report.

This module imports nothing heavy: grpc and the server load when a fixture is first used, so projects that
never use the fixtures pay nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from virtsvc.contracts.catalog import Catalog
    from virtsvc.server.virtual_server import VirtualServer
    from virtsvc.testing.service import RemoteServer, VirtualService

__all__ = ["virtsvc_server", "virtual_service"]

_T = TypeVar("_T")

_SERVICE = pytest.StashKey["VirtualService"]()
_OPTIONS = pytest.StashKey["_Options"]()
_FAILED = pytest.StashKey["_StartFailure"]()
_SESSIONS = pytest.StashKey["set[str]"]()  # the session ids of this process's tests
_COLLECTED = pytest.StashKey["_Collected"]()  # what the report is made of
_WRITTEN = pytest.StashKey[str]()  # the summary line: where the report went, or why there is none
_WORKER_KEY = "virtsvc_report"  # in xdist's workeroutput
_OPT_OUT = (
    "(to allow unmatched calls, pass --virtsvc-no-fail-unmatched or set virtsvc_fail_on_unmatched = false)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("virtsvc", "virtual gRPC services (virtsvc)")
    group.addoption(
        "--virtsvc-address",
        metavar="HOST:PORT",
        help="use the virtsvc server running there (with its admin API) instead of one in this process",
    )
    group.addoption(
        "--virtsvc-admin-token",
        metavar="TOKEN",
        help="admin token of the server given by --virtsvc-address (default: $VIRTSVC_ADMIN_TOKEN)",
    )
    group.addoption(
        "--virtsvc-no-fail-unmatched",
        action="store_true",
        help="do not fail tests whose calls matched no rule",
    )
    group.addoption(
        "--virtsvc-time-scale",
        metavar="F",
        help="multiply every delay of the virtual server in this process by F (above 0): 2 stretches "
        "them, 0.1 compresses them tenfold (default: virtsvc_time_scale, else 1)",
    )
    group.addoption(
        "--virtsvc-report",
        metavar="PATH",
        help="write a report of the virtual services' calls per scenario, method and test when the run "
        "ends; the format from the suffix: .txt, .json, .xml (JUnit) or .html",
    )
    parser.addini("virtsvc_protos", "virtsvc: directory of .proto files to serve", type="paths")
    parser.addini("virtsvc_descriptors", "virtsvc: descriptor set to serve (instead of protos)", type="paths")
    parser.addini("virtsvc_scenarios", "virtsvc: scenario files or directories", type="paths")
    parser.addini("virtsvc_default_scenario", "virtsvc: scenario for calls that name none", type="string")
    parser.addini("virtsvc_time_scale", "virtsvc: multiply every delay by this (default 1)", type="string")
    parser.addini(
        "virtsvc_fail_on_unmatched",
        "virtsvc: fail tests whose calls matched no rule (default: true)",
        type="bool",
        default=True,
    )


def pytest_configure(config: pytest.Config) -> None:
    report = config.getoption("virtsvc_report", None)
    if report:
        from virtsvc.errors import ConfigError
        from virtsvc.observe.formats import format_from_suffix

        try:
            format_from_suffix(report)
        except ConfigError as exc:
            raise pytest.UsageError(f"--virtsvc-report: {exc}") from None
    scale = config.getoption("virtsvc_time_scale", None)
    if scale is not None:
        from virtsvc.config import time_scale
        from virtsvc.errors import ConfigError

        try:
            time_scale(scale, "--virtsvc-time-scale")
        except ConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
    address = config.getoption("virtsvc_address", None)
    if address:
        host, sep, port = str(address).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise pytest.UsageError(
                f"--virtsvc-address: expected HOST:PORT (e.g. 127.0.0.1:50051), got {address!r}"
            )


@dataclass(frozen=True)
class _Options:
    protos: Path | None
    descriptors: Path | None
    scenarios: tuple[Path, ...]
    default_scenario: str | None
    fail_on_unmatched: bool
    address: str | None
    admin_token: str | None
    time_scale: float = 1.0
    time_scale_from: str | None = None  # the option or ini setting that gave it (None: the default)


@dataclass
class _StartFailure:
    """Why the virtual server of this session did not start, and the first test that said so."""

    text: str
    first: str | None = None


def _one(config: pytest.Config, name: str) -> Path | None:
    values = config.getini(name)
    if len(values) > 1:
        from virtsvc.errors import ConfigError

        raise ConfigError(f"{name}: give one path, got {len(values)}: {', '.join(map(str, values))}")
    return Path(values[0]) if values else None


def _options(config: pytest.Config) -> _Options:
    """The ini settings, each falling back to ``[tool.virtsvc]`` of the rootdir's pyproject."""
    cached = config.stash.get(_OPTIONS, None)
    if cached is not None:
        return cached
    protos = _one(config, "virtsvc_protos")
    descriptors = _one(config, "virtsvc_descriptors")
    scenarios = tuple(Path(p) for p in config.getini("virtsvc_scenarios"))
    default = config.getini("virtsvc_default_scenario") or None
    protos_key, scenarios_key = "virtsvc_protos", "virtsvc_scenarios"
    if not (protos or descriptors) or not scenarios or not default:
        from virtsvc.config import load_settings

        settings = load_settings(config.rootpath)
        if not (protos or descriptors):
            protos = settings.protos
            protos_key = "[tool.virtsvc] protos"
        if not scenarios:
            scenarios = settings.scenarios
            scenarios_key = "[tool.virtsvc] scenarios"
        default = default or settings.default_scenario
    keys = (protos_key, "virtsvc_descriptors", scenarios_key)
    _check_paths(config, protos, descriptors, scenarios, keys)
    scale, scale_from = _time_scale(config)
    options = _Options(
        protos=protos,
        descriptors=descriptors,
        scenarios=scenarios,
        default_scenario=default,
        fail_on_unmatched=bool(config.getini("virtsvc_fail_on_unmatched"))
        and not config.getoption("virtsvc_no_fail_unmatched", False),
        address=config.getoption("virtsvc_address", None),
        admin_token=config.getoption("virtsvc_admin_token", None) or os.environ.get("VIRTSVC_ADMIN_TOKEN"),
        time_scale=scale,
        time_scale_from=scale_from,
    )
    config.stash[_OPTIONS] = options
    return options


def _time_scale(config: pytest.Config) -> tuple[float, str | None]:
    """The time scale and the setting that gave it: ``--virtsvc-time-scale``, else ``virtsvc_time_scale``,
    else ``[tool.virtsvc] time_scale``; ConfigError naming the setting when it is not a number above 0."""
    from virtsvc.config import load_settings, time_scale

    given = config.getoption("virtsvc_time_scale", None)
    if given is not None:
        return time_scale(given, "--virtsvc-time-scale"), "--virtsvc-time-scale"
    ini = config.getini("virtsvc_time_scale")
    if ini:
        return time_scale(ini, "virtsvc_time_scale"), "virtsvc_time_scale"
    return load_settings(config.rootpath).time_scale, None


def _check_paths(
    config: pytest.Config,
    protos: Path | None,
    descriptors: Path | None,
    scenarios: tuple[Path, ...],
    keys: tuple[str, str, str],
) -> None:
    """ConfigError naming the setting whose path does not exist (``virtsvc_protos = "protoz": ...``);
    ``keys``: the settings that gave protos, descriptors and scenarios."""
    from virtsvc.errors import ConfigError

    def shown(path: Path) -> str:
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            return str(path)

    if protos is not None and not protos.is_dir():
        what = "not a directory" if protos.exists() else "no such directory"
        raise ConfigError(f'{keys[0]} = "{shown(protos)}": {what}')
    if descriptors is not None and not descriptors.is_file():
        what = "not a file" if descriptors.exists() else "no such file"
        raise ConfigError(f'{keys[1]} = "{shown(descriptors)}": {what}')
    for path in scenarios:
        if not path.exists():
            raise ConfigError(f'{keys[2]} = "{shown(path)}": no such file or directory')


@pytest.fixture(scope="session")
def virtsvc_server(pytestconfig: pytest.Config) -> Iterator[VirtualServer | RemoteServer]:
    """The virtual server of this test session (of this xdist worker): in-process, or the sidecar given by
    ``--virtsvc-address``."""
    from virtsvc.errors import VirtsvcError

    failure: _StartFailure | None = None
    try:
        server = _start(_options(pytestconfig))
    except VirtsvcError as exc:
        failure = _StartFailure(_failure_text(exc))
    if failure is not None:
        # Outside the except block: the problems once, without "During handling of the above exception".
        pytestconfig.stash[_FAILED] = failure
        pytest.fail(failure.text, pytrace=False)
    try:
        yield server
    finally:
        from virtsvc.testing.service import RemoteServer

        if pytestconfig.getoption("virtsvc_report", None):
            import grpc

            try:
                _collect(pytestconfig, server)
            except grpc.RpcError as exc:  # a sidecar gone or refusing: the run's verdict stands, said once
                code = exc.code()
                pytestconfig.stash[_WRITTEN] = (
                    f"virtsvc: no report: cannot read the journal of {server.address}: "
                    f"{code.name if code is not None else 'UNKNOWN'}: {exc.details()}"
                )
        if isinstance(server, RemoteServer):
            server.close()
        else:
            server.stop(0)


def _failure_text(exc: BaseException) -> str:
    text = str(exc)
    if "\n" in text or getattr(exc, "problems", None):  # a list of file:line problems
        return f"virtsvc: the virtual server did not start:\n{text}"
    return f"virtsvc: {text}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    """Once the server failed to start, the tests that need it fail with one line pointing to the first
    one's report (pytest would repeat the whole error for each)."""
    failure = item.config.stash.get(_FAILED, None)
    if failure is not None and "virtsvc_server" in getattr(item, "fixturenames", ()):
        where = f"at setup of {failure.first}" if failure.first else "above"
        pytest.fail(f"virtsvc: the virtual server did not start: see the error {where}", pytrace=False)
    try:
        return (yield)
    finally:
        failure = item.config.stash.get(_FAILED, None)
        if failure is not None and failure.first is None:
            failure.first = item.nodeid


def _start(options: _Options) -> VirtualServer | RemoteServer:
    from virtsvc.contracts.catalog import load_catalog
    from virtsvc.errors import ConfigError
    from virtsvc.scenarios.loader import load_scenarios

    has_source = options.protos is not None or options.descriptors is not None
    if options.address:
        from virtsvc.testing.service import RemoteServer

        if options.time_scale_from is not None:
            raise ConfigError(
                f"{options.time_scale_from} scales the delays of a server in this process; with "
                f"--virtsvc-address give the sidecar's: virtsvc serve --time-scale {options.time_scale:g}"
            )

        def remote_catalog() -> Catalog:
            return _quietly(load_catalog, options.protos, options.descriptors)

        remote = RemoteServer(
            options.address,
            token=options.admin_token,
            default_scenario=options.default_scenario,
            catalog=remote_catalog if has_source else None,
        )
        remote.wait_ready()
        return remote
    if not has_source:
        raise ConfigError(
            "nothing to serve: set virtsvc_protos (a directory of .proto files) or virtsvc_descriptors in "
            "[tool.pytest.ini_options] or pytest.ini, or protos in [tool.virtsvc]; or pass "
            "--virtsvc-address HOST:PORT to use a running server"
        )
    from virtsvc.server.virtual_server import VirtualServer

    catalog = _quietly(load_catalog, options.protos, options.descriptors)
    server = VirtualServer(
        catalog,
        load_scenarios(list(options.scenarios), catalog),
        host="127.0.0.1",
        port=0,
        default_scenario=options.default_scenario,
        time_scale=options.time_scale,
    )
    return server.start()


def _quietly(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` without its info lines (``descriptors.compiled``): they would land in the captured
    output of whichever test happened to start the server. Warnings and errors are logged as usual."""
    import structlog
    from structlog.testing import capture_logs

    with capture_logs() as logged:
        result = fn(*args)
    for entry in logged:
        level = entry.pop("log_level", "info")
        if level not in ("debug", "info"):
            event = entry.pop("event", "")
            getattr(structlog.get_logger("virtsvc"), level, structlog.get_logger("virtsvc").warning)(
                event, **entry
            )
    return result


@pytest.fixture
def virtual_service(
    request: pytest.FixtureRequest, virtsvc_server: VirtualServer | RemoteServer
) -> Iterator[VirtualService]:
    """This test's session on the virtual server; see ``virtsvc.testing.service.VirtualService``."""
    from virtsvc.errors import VirtsvcError
    from virtsvc.testing.service import VirtualService, new_session_id

    try:
        options = _options(request.config)
    except VirtsvcError as exc:  # reached when a conftest overrides virtsvc_server
        error = f"virtsvc: {exc}"
    else:
        error = ""
    if error:
        pytest.fail(error, pytrace=False)
    session_id = new_session_id(request.node.nodeid)
    request.config.stash.setdefault(_SESSIONS, set()).add(session_id)
    service = VirtualService(
        virtsvc_server,
        session_id,
        fail_on_unmatched=options.fail_on_unmatched,
        root=request.config.rootpath,
        fixture="virtual_service",
    )
    request.node.stash[_SERVICE] = service
    yield service
    # Calls made after the test body (by other fixtures' teardown) were not checked by the call hook.
    problems: list[str] = []
    try:
        try:
            problems = service.problems(new_only=True, rules=False)
        finally:
            # The journal stays, labelled with the test, for a report at the end of the run: the plugin's
            # own (--virtsvc-report) or, on a shared sidecar, `virtsvc report` (until the session's TTL).
            from virtsvc.testing.service import RemoteServer

            keep = isinstance(virtsvc_server, RemoteServer) or bool(
                request.config.getoption("virtsvc_report")
            )
            service.close(keep_journal=keep, label=request.node.nodeid)
    except VirtsvcError as exc:
        error = f"virtsvc: cannot check and drop this test's session: {exc}"
    if error:
        pytest.fail(error, pytrace=False)
    if problems:
        pytest.fail(service.format_problems(problems, _OPT_OUT), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Fails a passing test whose calls matched no rule or whose ``times=`` rules were not used up; for a
    failing test, adds the unmatched calls to its report (they often explain the failure)."""
    try:
        result = yield
    except BaseException as exc:
        service = item.stash.get(_SERVICE, None)
        if service is not None:
            _explain(item, service, skipped=isinstance(exc, pytest.skip.Exception))
        raise
    service = item.stash.get(_SERVICE, None)
    if service is not None:
        from virtsvc.errors import VirtsvcError

        problems: list[str] = []
        error = ""
        try:
            problems = service.problems()
        except VirtsvcError as exc:
            error = f"virtsvc: cannot check the calls of this test: {exc}"
        if error:
            pytest.fail(error, pytrace=False)
        if problems:
            hint = _OPT_OUT if any(p.startswith("a call to ") for p in problems) else ""
            pytest.fail(service.format_problems(problems, hint), pytrace=False)
    return result


def _explain(item: pytest.Item, service: Any, *, skipped: bool) -> None:
    try:
        unmatched = service.unmatched(new_only=True)
    except Exception:  # the test already failed; never hide that behind a second error
        return
    if unmatched and not skipped:
        item.add_report_section("call", "virtsvc", "\n".join(service.unmatched_text(c) for c in unmatched))


# -- the report --------------------------------------------------------------------------------------------


@dataclass
class _Collected:
    """The journal entries of this run's tests (proto3 JSON) and the scenarios' rules, ``"scenario\0rule"``
    -> [scenario, method, rule, uses or None]: plain data, as xdist carries it from a worker."""

    entries: list[dict[str, Any]]
    rules: dict[str, list[Any]]

    def add(self, entries: list[dict[str, Any]], rules: dict[str, list[Any]]) -> None:
        self.entries += entries
        for key, info in rules.items():  # each worker served the same scenarios: their uses add up
            known = self.rules.get(key)
            if known is None:
                self.rules[key] = list(info)
            elif known[3] is not None and info[3] is not None:
                known[3] += info[3]


def _collected(config: pytest.Config) -> _Collected:
    return config.stash.setdefault(_COLLECTED, _Collected([], {}))


def _collect(config: pytest.Config, server: Any) -> None:
    """The journal entries of this process's tests and the scenarios' rules, before the server stops."""
    from virtsvc.testing.service import RemoteServer

    sessions = sorted(config.stash.get(_SESSIONS, None) or ())
    rules: dict[str, list[Any]] = {}
    entries: list[dict[str, Any]] = []
    if isinstance(server, RemoteServer):
        from virtsvc.observe.report import journal_json

        admin = server.admin
        for session in sessions:
            entries += [journal_json(e) for e in admin.call("GetJournal", session=session).entries]
        # A shared sidecar counts every suite's calls: only this run's calls say whether a rule was used.
        for info in admin.call("ListScenarios", include_rules=True).scenarios:
            for rule in info.rules:
                rules[f"{info.name}\0{rule.rule}"] = [info.name, rule.method, rule.rule, None]
    else:
        from virtsvc.server.admin import entry_json

        for session in sessions:
            entries += [entry_json(e) for e in server.journal.entries(session=session)]
        uses = server.journal.rule_uses
        for scenario in server.registry.scenarios():
            for rule in scenario.rules:
                key = f"{scenario.name}\0{rule.where}"
                rules[key] = [scenario.name, rule.method, rule.where, uses.get(rule.where, 0)]
    _collected(config).add(entries, rules)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist's controller: a worker's calls and rules join the controller's for the one report."""
    output = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
    if output is not None:
        _collected(node.config).add(output["entries"], output["rules"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    path = config.getoption("virtsvc_report", None)
    if not path:
        return
    if _WRITTEN in config.stash:  # the journal could not be read
        return
    collected = _collected(config)
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller writes the report
        workeroutput[_WORKER_KEY] = {"entries": collected.entries, "rules": collected.rules}
        return
    from virtsvc.observe.formats import format_from_suffix, render
    from virtsvc.observe.report import RuleInfo, build_report

    report = build_report(
        collected.entries, [RuleInfo(*info) for info in collected.rules.values()], source="pytest"
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(report, format_from_suffix(target)), encoding="utf-8")
    config.stash[_WRITTEN] = (
        f"virtsvc: report of {report.calls} call{'' if report.calls == 1 else 's'} in "
        f"{len(report.tests)} test{'' if len(report.tests) == 1 else 's'} written to {path}"
    )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    written = config.stash.get(_WRITTEN, None)
    if written:
        terminalreporter.write_line(written)
