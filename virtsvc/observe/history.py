"""The history of runs: each run's report figures in a SQLite file, and the trends and flaky tests they show.

A team keeps the file as a CI cache; ``virtsvc report --history FILE`` appends one run and shows the trends.
The schema is versioned (``meta.schema_version``): a file from a newer virtsvc is refused, not rewritten.

Query functions (the dashboard draws them too): :meth:`History.runs`, :meth:`History.method_trends`,
:meth:`History.test_trends`, :meth:`History.flaky` and :meth:`History.view`, which bundles them as JSON data.
A test is flaky when its answers changed between two runs on the same scenario versions: its digest
(``TestFigures.digest``: each call's method, requests, status and the rule that answered) differs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from virtsvc.errors import ConfigError
from virtsvc.observe.report import Report

__all__ = ["SCHEMA_VERSION", "History"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,              -- when the run was recorded, UTC ISO 8601
    source TEXT NOT NULL,          -- where its report came from (address or journal file)
    calls INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    p99 REAL NOT NULL              -- seconds
);
CREATE TABLE IF NOT EXISTS method_runs (
    run INTEGER NOT NULL REFERENCES runs(id),
    scenario TEXT NOT NULL,
    method TEXT NOT NULL,
    calls INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    p50 REAL NOT NULL,
    p90 REAL NOT NULL,
    p99 REAL NOT NULL,
    PRIMARY KEY (run, scenario, method)
);
CREATE TABLE IF NOT EXISTS test_runs (
    run INTEGER NOT NULL REFERENCES runs(id),
    test TEXT NOT NULL,
    versions TEXT NOT NULL,        -- "scenario@version" of its calls, sorted, comma-separated
    calls INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    p99 REAL NOT NULL,
    digest TEXT NOT NULL,
    answers TEXT NOT NULL,         -- JSON list of "method CODE rule", sorted
    PRIMARY KEY (run, test)
);
"""


class History:
    """A history file; made with its schema on first use. Every method opens and closes the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(sqlite3.connect(self.path, timeout=30)) as db:
                with db:
                    db.executescript(_SCHEMA)
                    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                    if row is None:
                        db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                    elif int(row[0]) > SCHEMA_VERSION:
                        raise ConfigError(
                            f"{self.path}: history schema version {row[0]} is newer than this virtsvc "
                            f"reads ({SCHEMA_VERSION}); upgrade virtsvc, or start a new history file"
                        )
                with db:
                    yield db
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: not a virtsvc history (SQLite: {exc})") from None

    def record(self, report: Report, at: str | None = None) -> int:
        """Appends ``report`` as a run; returns the run's id."""
        at = at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._db() as db:
            cursor = db.execute(
                "INSERT INTO runs (at, source, calls, errors, p99) VALUES (?, ?, ?, ?, ?)",
                (at, report.source, report.calls, report.errors, report.p99),
            )
            run = int(cursor.lastrowid or 0)
            db.executemany(
                "INSERT INTO method_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(run, m.scenario, m.method, m.calls, m.errors, m.p50, m.p90, m.p99) for m in report.methods],
            )
            db.executemany(
                "INSERT INTO test_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run,
                        t.label,
                        ",".join(t.versions),
                        t.calls,
                        t.errors,
                        t.p99,
                        t.digest,
                        json.dumps(t.answers),
                    )
                    for t in report.tests
                ],
            )
        return run

    def runs(self, last: int = 10) -> list[dict[str, Any]]:
        """The last ``last`` runs, oldest first: id, at, source, calls, errors, p99_ms."""
        with self._db() as db:
            rows = db.execute(
                "SELECT id, at, source, calls, errors, p99 FROM runs ORDER BY id DESC LIMIT ?", (last,)
            ).fetchall()
        return [
            {
                "id": r[0],
                "at": r[1],
                "source": r[2],
                "calls": r[3],
                "errors": r[4],
                "p99_ms": round(r[5] * 1000, 3),
            }
            for r in reversed(rows)
        ]

    def method_trends(self, last: int = 10) -> list[dict[str, Any]]:
        """Per scenario and method, its error rate and p99 (ms) in each of the last runs (None where it had no
        calls), aligned with :meth:`runs`."""
        ids = [r["id"] for r in self.runs(last)]
        if not ids:
            return []
        with self._db() as db:
            rows = db.execute(
                f"SELECT run, scenario, method, calls, errors, p99 FROM method_runs WHERE run IN "
                f"({','.join('?' * len(ids))}) ORDER BY scenario, method",
                ids,
            ).fetchall()
        series: dict[tuple[str, str], dict[int, tuple[int, int, float]]] = {}
        for run, scenario, method, calls, errors, p99 in rows:
            series.setdefault((scenario, method), {})[run] = (calls, errors, p99)
        return [
            {"scenario": s, "method": m, **_aligned(ids, by_run)} for (s, m), by_run in sorted(series.items())
        ]

    def test_trends(self, last: int = 10) -> list[dict[str, Any]]:
        """Per test, its error rate and p99 (ms) in each of the last runs, aligned with :meth:`runs`; the
        flaky tests first."""
        ids = [r["id"] for r in self.runs(last)]
        if not ids:
            return []
        with self._db() as db:
            rows = db.execute(
                "SELECT run, test, calls, errors, p99 FROM test_runs WHERE run IN "
                f"({','.join('?' * len(ids))})",
                ids,
            ).fetchall()
        series: dict[str, dict[int, tuple[int, int, float]]] = {}
        for run, test, calls, errors, p99 in rows:
            series.setdefault(test, {})[run] = (calls, errors, p99)
        flaky = {f["test"] for f in self.flaky(last)}
        return [
            {"test": t, "flaky": t in flaky, **_aligned(ids, by_run)}
            for t, by_run in sorted(series.items(), key=lambda kv: (kv[0] not in flaky, kv[0]))
        ]

    def flaky(self, last: int = 10) -> list[dict[str, Any]]:
        """The tests whose answers changed between two of the last runs on the same scenario versions: for
        each, the latest such change (``before``/``after`` run ids, ``versions``, ``changes`` as -/+ lines of
        ``method CODE rule``) and how many times it changed."""
        ids = [r["id"] for r in self.runs(last)]
        if not ids:
            return []
        with self._db() as db:
            rows = db.execute(
                f"SELECT run, test, versions, digest, answers FROM test_runs WHERE run IN "
                f"({','.join('?' * len(ids))}) ORDER BY test, run",
                ids,
            ).fetchall()
        flaky: dict[str, dict[str, Any]] = {}
        previous: dict[tuple[str, str], tuple[int, str, list[str]]] = {}
        for run, test, versions, digest, answers_json in rows:
            answers = json.loads(answers_json)
            before = previous.get((test, versions))
            previous[(test, versions)] = (run, digest, answers)
            if before is None or before[1] == digest:
                continue
            found = flaky.setdefault(test, {"test": test, "times": 0})
            found.update(
                before=before[0],
                after=run,
                versions=versions.split(",") if versions else [],
                changes=_changes(before[2], answers),
            )
            found["times"] += 1
        return [flaky[t] for t in sorted(flaky)]

    def view(self, last: int = 10) -> dict[str, Any]:
        """Everything the report formats and the dashboard show: runs, flaky tests, method and test trends."""
        return {
            "path": str(self.path),
            "runs": self.runs(last),
            "flaky": self.flaky(last),
            "methods": self.method_trends(last),
            "tests": self.test_trends(last),
        }


def _aligned(ids: list[int], by_run: dict[int, tuple[int, int, float]]) -> dict[str, list[Any]]:
    rates: list[float | None] = []
    p99s: list[float | None] = []
    for run in ids:
        figures = by_run.get(run)
        if figures is None:
            rates.append(None)
            p99s.append(None)
        else:
            calls, errors, p99 = figures
            rates.append(round(errors / calls, 6) if calls else 0.0)
            p99s.append(round(p99 * 1000, 3))
    return {"error_rate": rates, "p99_ms": p99s}


def _changes(before: list[str], after: list[str]) -> list[str]:
    """-/+ lines between two sorted lists of answers (as multisets)."""
    remaining = list(after)
    gone = []
    for line in before:
        if line in remaining:
            remaining.remove(line)
        else:
            gone.append(line)
    lines = [f"- {line}" for line in gone] + [f"+ {line}" for line in remaining]
    return lines or ["the same methods, statuses and rules; the requests differ"]
