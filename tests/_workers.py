"""`virtsvc serve` processes for the tests of workers and replicas: their events, pids, and the check that
none outlives its test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, object]]:
        found = [json.loads(line) for line in list(self.lines) if line.startswith("{")]
        return [e for e in found if e.get("event") == name]

    def wait_for(self, name: str, timeout: float = 60.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events(name)
            if events:
                return events[0]
            if self.process.poll() is not None and not self.events(name):
                time.sleep(0.2)
                if not self.events(name):
                    raise AssertionError(f"exited {self.process.returncode} before {name!r}: {self.lines}")
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} event: {self.lines}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.wait_for('serving')['port']}"

    @property
    def worker_pids(self) -> list[int]:
        """The workers' pids; none for a server without --workers."""
        workers = self.wait_for("serving").get("workers", ())
        return [int(w["pid"]) for w in workers]  # type: ignore[attr-defined,union-attr]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def gone(pids: list[int], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[object]:
    """``launch(*command, cwd=ROOT, env={})`` runs a command (``env`` over this process's environment) with
    its stdout and stderr collected; killed after the test if it still runs, and its workers with it."""
    started: list[Served] = []

    def run(*command: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Served:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})},
        )
        served = Served(process)

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                served.lines.append(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()
        started.append(served)
        return served

    yield run
    for served in started:
        pids = served.worker_pids if served.events("serving") else []
        if served.process.poll() is None:
            served.process.kill()
        served.process.wait(timeout=30)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
