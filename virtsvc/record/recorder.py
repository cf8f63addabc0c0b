"""``virtsvc record``: a proxy to the real service that writes what it sees as a scenario file.

Built on passthrough: a VirtualServer in ``passthrough`` mode forwards every call (all four kinds, answers
unchanged) and a journal subscriber turns each forwarded call into an interaction. The file is rewritten
atomically as calls come (by a writer thread, so a call never waits for the disk) and once more on
SIGINT/SIGTERM, so an interrupted recording leaves a valid file with everything captured so far.

Modes after vcrpy's: ``once`` writes a new file and refuses to start when it exists; ``new_episodes``
adds the calls the file does not hold yet; ``all`` records the file anew; ``refresh`` re-records only the
rules whose contract has changed (``contract:`` differs from the method's fingerprint now), by replaying
their recorded requests against the upstream, and keeps every other rule as it is.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2

from virtsvc import _logs
from virtsvc.contracts.catalog import Catalog
from virtsvc.contracts.fingerprint import method_fingerprint
from virtsvc.engine.journal import Entry
from virtsvc.errors import ConfigError, Problem, ScenarioError
from virtsvc.record.interactions import Interaction, detail_json, text_metadata
from virtsvc.record.redact import Redaction
from virtsvc.record.rules import request_key, to_rules
from virtsvc.record.writer import read_scenario, scenario_name, write_scenario
from virtsvc.scenarios.loader import load_scenarios
from virtsvc.scenarios.staleness import stale_rules
from virtsvc.server.options import ServeOptions
from virtsvc.server.virtual_server import VirtualServer
from virtsvc.upstream.client import GrpcUpstream

__all__ = ["RECORD_MODES", "Recorder", "refresh", "run_record"]

log = _logs.get_logger("virtsvc")

RECORD_MODES = ("once", "new_episodes", "all", "refresh")
UPSTREAM = "upstream"  # the upstream's name inside the recording proxy


class Recorder:
    """Collects forwarded calls and keeps ``out`` up to date with them (atomically, off the call path)."""

    def __init__(
        self,
        out: Path,
        catalog: Catalog,
        *,
        name: str | None = None,
        redaction: Redaction | None = None,
        keep_latency: bool = False,
        existing: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.out = Path(out)
        self.catalog = catalog
        self.name = name or scenario_name(self.out)
        self.redaction = redaction or Redaction()
        self.keep_latency = keep_latency
        self.existing = list(existing)
        self.interactions: list[Interaction] = []
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._closed = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="virtsvc-record", daemon=True)

    def add(self, entry: Entry) -> None:
        """The journal subscriber: every forwarded call becomes an interaction."""
        if entry.forwarded is None:
            return
        interaction = Interaction.from_entry(entry)
        with self._lock:
            self.interactions.append(interaction)
        self._dirty.set()

    def _fingerprint(self, method: str) -> str | None:
        try:
            return method_fingerprint(self.catalog, method)
        except Exception:  # a method the catalog lacks: recorded without a fingerprint
            return None

    def rules(self) -> list[dict[str, Any]]:
        """The file's rules: those kept from it (new_episodes), then the calls recorded that it lacks."""
        with self._lock:
            items = list(self.interactions)
        recorded = to_rules(
            items, redaction=self.redaction, keep_latency=self.keep_latency, fingerprint=self._fingerprint
        )
        if not self.existing:
            return recorded
        known = {_key_of(rule) for rule in self.existing}
        return [*self.existing, *(r for r in recorded if _key_of(r) not in known)]

    def write(self) -> int:
        """Writes the file now; returns the number of rules written."""
        rules = self.rules()
        write_scenario(self.out, self.name, rules)
        return len(rules)

    def start(self) -> None:
        self._writer.start()

    def _write_loop(self) -> None:
        while not self._closed.is_set():
            if self._dirty.wait(0.2) and not self._closed.is_set():
                self._dirty.clear()
                try:
                    self.write()
                except Exception as exc:  # the disk, or a bug: say so, keep recording, retry on the next call
                    log.error("record.write_failed", out=str(self.out), error=f"{type(exc).__name__}: {exc}")

    def close(self) -> int:
        """Stops the writer and writes the final file; returns its number of rules."""
        self._closed.set()
        if self._writer.is_alive():
            self._writer.join(5)
        return self.write()


def _key_of(rule: dict[str, Any]) -> tuple[str, str]:
    when = rule.get("when")
    request = when.get("request", {}) if isinstance(when, dict) else {}
    return request_key(str(rule.get("method", "")), request if isinstance(request, dict) else {})


def run_record(
    *,
    upstream: str,
    out: Path,
    catalog: Catalog,
    mode: str = "once",
    host: str = "127.0.0.1",
    port: int = 0,
    redact: Sequence[str] = (),
    keep_latency: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
    grace: float = 5.0,
) -> int:
    """Runs the recording proxy until SIGINT/SIGTERM (or ``refresh`` once); returns the exit status."""
    redaction = Redaction.from_names(redact)
    out = Path(out)
    if mode not in RECORD_MODES:
        raise ConfigError(f"record --mode must be one of {', '.join(RECORD_MODES)}, not {mode!r}")
    if mode == "refresh":
        return refresh(out, catalog, upstream, redaction=redaction, keep_latency=keep_latency)
    if mode == "once" and out.exists():
        raise ConfigError(
            f"{out} exists: --mode once records a new file only; use --mode new_episodes to add to it "
            "or --mode all to record it anew"
        )
    name, existing = read_scenario(out) if mode == "new_episodes" and out.exists() else (None, [])
    recorder = Recorder(
        out, catalog, name=name, redaction=redaction, keep_latency=keep_latency, existing=existing
    )
    options = ServeOptions(host=host, port=port, upstreams={UPSTREAM: upstream}, mode="passthrough")
    server = VirtualServer(catalog, (), options)
    if credentials is not None:  # an upstream served over TLS
        server.upstreams[UPSTREAM] = GrpcUpstream(
            UPSTREAM, upstream, credentials=credentials, max_message_bytes=options.max_message_bytes
        )
        server.dispatcher.upstreams = server.upstreams
    server.subscribe(recorder.add)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if mode == "once" or mode == "all":
        recorder.write()  # a valid (empty) file from the start
    recorder.start()
    server.start()
    log.info(
        "serving",
        host=host,
        port=server.port,
        address=server.address,
        services=list(catalog.services),
        upstream=upstream,
        out=str(out),
        record_mode=mode,
    )
    while not stop.wait(0.2):
        pass
    server.stop(grace)
    rules = recorder.close()
    log.info("recorded", out=str(out), calls=len(recorder.interactions), rules=rules)
    return 0


# -- refresh -------------------------------------------------------------------------------------------


def refresh(
    out: Path,
    catalog: Catalog,
    upstream: str,
    *,
    redaction: Redaction | None = None,
    keep_latency: bool = False,
    timeout: float = 10.0,
) -> int:
    """Re-records the rules of ``out`` whose contract changed, replaying their requests against the
    upstream; every other rule is kept as written. Prints what it did; 1 with located problems."""
    if not out.exists():
        raise ConfigError(f"{out}: no such file to refresh (record it first, e.g. with --mode once)")
    name, raw_rules = read_scenario(out)
    stale = _stale_indexes(out, raw_rules, catalog)
    problems: list[Problem] = []
    client = GrpcUpstream(UPSTREAM, upstream)
    try:
        for index, line in stale:
            rule = raw_rules[index]
            try:
                interaction = _replay(client, catalog, rule, timeout)
            except _CannotReplay as exc:
                problems.append(Problem(str(out), line, f"cannot re-record this rule: {exc}"))
                continue
            fresh = to_rules(
                [interaction],
                redaction=redaction,
                keep_latency=keep_latency,
                fingerprint=lambda m: method_fingerprint(catalog, m),
            )[0]
            raw_rules[index] = fresh
    finally:
        client.close()
    if problems:
        for problem in problems:
            print(str(problem))
        return 1
    if stale:
        write_scenario(out, name, raw_rules)
    print(f"refreshed {len(stale)} of {len(raw_rules)} rules in {out}")
    return 0


class _CannotReplay(Exception):
    pass


def _stale_indexes(out: Path, raw_rules: list[dict[str, Any]], catalog: Catalog) -> list[tuple[int, int]]:
    """(index in the file's rules, line) of every stale rule: from the loaded scenario when it still loads,
    else (the contract moved so far that recorded answers no longer fit) from the fingerprints alone."""
    try:
        scenarios = load_scenarios([out], catalog)
    except ScenarioError:
        scenarios = []
    if scenarios:
        found = []
        for stale in stale_rules(scenarios, catalog):
            if stale.rule.key.isdigit():
                found.append((int(stale.rule.key), stale.rule.location.line))
        return sorted(found)
    found = []
    for index, rule in enumerate(raw_rules):
        recorded = rule.get("contract") if isinstance(rule, dict) else None
        if not recorded:
            continue
        method = str(rule.get("method", ""))
        try:
            current = method_fingerprint(catalog, method)
        except Exception:
            current = None
        if current != recorded:
            found.append((index, 0))
    return found


def _replay(client: GrpcUpstream, catalog: Catalog, rule: dict[str, Any], timeout: float) -> Interaction:
    method = str(rule.get("method", ""))
    try:
        spec = catalog.method(method)
    except Exception:
        raise _CannotReplay(f"{method} is no longer in the upstream's contract") from None
    when = rule.get("when") or {}
    request = when.get("request", {}) if isinstance(when, dict) else {}
    message = spec.input_class()
    try:
        json_format.ParseDict(request or {}, message, descriptor_pool=spec.input.file.pool)
    except json_format.ParseError as exc:
        raise _CannotReplay(f"its request no longer fits {spec.input.full_name}: {exc}") from None
    raw = message.SerializeToString()
    requests: bytes | Iterator[bytes] = raw if not spec.client_streaming else iter([raw])
    call = client.open(spec, requests, (), timeout)
    headers = call.headers()
    replies = list(call.replies())
    code, text, trailers = call.outcome()
    if call.unreachable:
        raise _CannotReplay(f"upstream at {client.address} is unavailable: {text}")
    rich = next((v for k, v in trailers if k == "grpc-status-details-bin"), None)
    details = []
    if isinstance(rich, bytes):
        details = [
            detail_json(d.SerializeToString(), spec.input.file.pool)
            for d in status_pb2.Status.FromString(rich).details
        ]
    pool = spec.output.file.pool
    return Interaction(
        method=spec.full_name,
        kind=spec.kind,
        requests=[json_format.MessageToDict(message, descriptor_pool=spec.input.file.pool)],
        replies=[
            json_format.MessageToDict(spec.output_class.FromString(r), descriptor_pool=pool) for r in replies
        ],
        headers=text_metadata(headers),
        trailers=text_metadata([(k, v) for k, v in trailers if k != "grpc-status-details-bin"]),
        code=code.name,
        message=text,
        details=details,
    )
