"""Writes the benchmark's scenario files.

``python bench/make_scenarios.py`` rewrites ``bench/scenarios/bench.yaml`` (scenarios ``static``,
``matched`` and ``stream1000``, whose 1,000 stream items are written out here rather than by hand).
``write_scale_tree`` writes the many-scenario tree of the size benchmark into a directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SCENARIOS, STREAM_COUNT

HEADER = """\
# The benchmark's scenarios (bench.v1.Echo, bench/protos/bench/v1/bench.proto).
# Written by bench/make_scenarios.py: edit that script, not this file.
"""

STATIC = """\
scenario: static
description: a static reply, selected by the scenario header
rules:
  - method: bench.v1.Echo/Say
    reply: {text: hello, n: 1}
"""

MATCHED = """\
scenario: matched
description: matching on two request fields, and a templated reply
rules:
  - method: bench.v1.Echo/Say
    when: {request: {name: bob, tenant: acme}}
    reply: {text: "hi {{ request.name }}", n: "{{ request.n + 1 }}"}
"""


def bench_yaml() -> str:
    items = "".join("      - {reply: {text: m}}\n" for _ in range(STREAM_COUNT))
    stream = (
        "scenario: stream1000\n"
        f"description: a server stream of {STREAM_COUNT:,} messages per call\n"
        "rules:\n"
        "  - method: bench.v1.Echo/Stream\n"
        "    stream:\n" + items
    )
    return HEADER + "---\n".join([STATIC, MATCHED, stream])


def write_bench_yaml(path: Path = SCENARIOS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bench_yaml())
    return path


def filler_name(i: int) -> str:
    return f"f{i:05d}"


def write_scale_tree(out: Path, scenarios: int, rules: int, per_file: int = 100) -> tuple[int, int]:
    """``scenarios`` filler scenarios holding ``rules`` rules in all, ``per_file`` scenarios a file.

    Each filler scenario has rules for Say that match on ``name`` (``u0``, ``u1``...) and a last
    catch-all Say rule, so that any call to it is answered. Returns (scenarios, rules) written.
    """
    out.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(rules, scenarios)
    written = 0
    for first in range(0, scenarios, per_file):
        docs = []
        for i in range(first, min(first + per_file, scenarios)):
            name = filler_name(i)
            count = base + (1 if i < extra else 0)
            lines = [f"scenario: {name}", "rules:"]
            for k in range(count - 1):
                lines.append(
                    f"  - {{method: bench.v1.Echo/Say, when: {{request: {{name: u{k}}}}}, "
                    f"reply: {{text: {name}-{k}, n: {k}}}}}"
                )
            lines.append(f"  - {{method: bench.v1.Echo/Say, reply: {{text: {name}, n: 1}}}}")
            docs.append("\n".join(lines) + "\n")
            written += count
        (out / f"scale-{first // per_file:04d}.yaml").write_text("---\n".join(docs))
    return scenarios, written


if __name__ == "__main__":
    print(f"wrote {write_bench_yaml()}")
