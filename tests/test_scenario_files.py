"""Scenario files: loading, validation messages (exact ``file:line: message`` texts) and compilation."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from _protos_fixture import compile_catalog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtsvc.contracts import Catalog
from virtsvc.errors import ConfigError, ScenarioError
from virtsvc.scenarios import yamltree as _yaml
from virtsvc.scenarios.latency import Fixed, LogNormal, Uniform
from virtsvc.scenarios.loader import check_paths, compile_rules, compile_sources, compile_text, load_sources
from virtsvc.scenarios.located import LocatedDict, LocatedList, Problems
from virtsvc.scenarios.model import Fault, Location


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    return compile_catalog(tmp_path_factory.mktemp("protos"))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory, so that relative paths (and messages) are short and exact."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, text: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def check(cat: Catalog, *paths: str) -> list[str]:
    return [str(p) for p in check_paths([Path(p) for p in paths], cat)]


def one_file(cat: Catalog, text: str, name: str = "s.yaml") -> list[str]:
    write(name, text)
    return check(cat, name)


# -- every message of `virtsvc check` --------------------------------------------------------------------


def test_yaml_syntax_error(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Ping
            reply: {a: [1}
        """
    assert one_file(cat, text) == [
        "s.yaml:4: YAML syntax error: while parsing a flow sequence, expected ',' or ']', but got '}'"
    ]


def test_unknown_method(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Reserv
            reply: {}
        """
    assert one_file(cat, text) == [
        's.yaml:3: unknown method "shop.v1.Inventory/Reserv"; did you mean "shop.v1.Inventory/Reserve"?'
    ]


def test_unknown_field_in_reply_and_in_when_request(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Reserve
            when:
              request: {skuu: ABC-1}
            reply:
              reservation_idd: r-1
        """
    assert one_file(cat, text) == [
        's.yaml:5: when.request.skuu: unknown field "skuu" of shop.v1.ReserveRequest; did you mean "sku"?',
        's.yaml:7: reply.reservation_idd: unknown field "reservation_idd" of shop.v1.ReserveResponse; '
        'did you mean "reservation_id" or "reservationId"?',
    ]


def test_unknown_rule_key_with_did_you_mean(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Ping
            replly: {}
        """
    # The misspelt answer is the one problem: no extra "the rule has nothing to do".
    assert one_file(cat, text) == ['s.yaml:4: unknown rule key "replly"; did you mean "reply"?']


def test_unknown_keys_at_every_level(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rule: []
        ---
        scenario: b
        rules:
          - method: shop.v1.Payments/Charge
            sequence:
              - replyy: {}
              - when: {}
                reply: {}
            status: {code: UNAVAILABLE}
          - method: shop.v1.Payments/Refund
            status: {code: UNAVAILABLE, mesage: x}
        """
    assert one_file(cat, text) == [
        's.yaml:1: missing "rules:" (the list of rules)',
        's.yaml:2: unknown scenario key "rule"; did you mean "rules"?',
        's.yaml:8: unknown step key "replyy"; did you mean "reply"?',
        's.yaml:9: unknown step key "when"; when belongs to the rule, not to a sequence item',
        "s.yaml:11: status: a sequence rule answers from its items; move status into the sequence",
        's.yaml:13: unknown status key "mesage"; did you mean "message"?',
    ]


def test_unknown_operator(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Reserve
            when: {request: {qty: {$gtt: 0}}}
            reply: {}
        """
    assert one_file(cat, text) == [
        's.yaml:4: when.request.qty.$gtt: unknown operator "$gtt"; did you mean "$gt" or "$gte"?'
    ]


def test_wrong_value_types(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        version: [1]
        rules:
          - method: shop.v1.Inventory/Reserve
            when: {metadata: {x: y}}
            times: two
            priority: high
            reply: {}
          - method: shop.v1.Inventory/Reserve
            when: [a]
            times: 0
            reply: {}
        """
    assert one_file(cat, text) == [
        "s.yaml:2: version: expected an integer or text, got a list",
        's.yaml:6: times: expected a positive integer, got "two"',
        's.yaml:7: priority: expected an integer, got "high"',
        "s.yaml:10: when: expected a mapping of conditions (request:, metadata:), got a list",
        "s.yaml:11: times: expected a positive integer, got 0",
    ]


def test_unknown_enum_value(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Payments/Charge
            reply: {charge_id: c-1, outcome: APROVED}
        """
    assert one_file(cat, text) == [
        's.yaml:4: reply.outcome: unknown value "APROVED" of enum shop.v1.ChargeResponse.Outcome; '
        "expected one of OUTCOME_UNSPECIFIED, APPROVED, DECLINED, REVIEW"
    ]


def test_bad_status_names(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "1"}}
            status: UNAVAILBLE
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "2"}}
            status: {code: 42}
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "3"}}
            status: {code: BROKEN}
          - method: shop.v1.Payments/Charge
            status: {message: x}
        """
    assert one_file(cat, text) == [
        's.yaml:5: status: unknown status code "UNAVAILBLE"; did you mean "UNAVAILABLE"?',
        "s.yaml:8: status.code: unknown status code 42; codes are 0 (OK) to 16 (UNAUTHENTICATED)",
        's.yaml:11: status.code: unknown status code "BROKEN"; the codes are OK, CANCELLED, UNKNOWN, '
        "INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, "
        "RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, "
        "UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED",
        "s.yaml:13: status: a status needs a code, e.g. code: UNAVAILABLE",
    ]


def test_bad_durations(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "1"}}
            delay: 25 ms
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "2"}}
            delay: -5ms
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "3"}}
            delay: {uniform: [50ms, 10ms]}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "4"}}
            delay: {lognormal: {median: 20ms, p99: 10ms}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "5"}}
            delay: {unifrom: [1s, 2s]}
            reply: {}
          - method: shop.v1.Inventory/Ping
            delay: [1s]
            reply: {}
        """
    assert one_file(cat, text) == [
        's.yaml:5: delay: bad duration "25 ms"; use e.g. 25ms, 1.5s, 2m',
        's.yaml:9: delay: a duration cannot be negative, got "-5ms"',
        's.yaml:13: delay.uniform: low "50ms" is above high "10ms"',
        's.yaml:17: delay.lognormal: p99 "10ms" must be above the median "20ms"',
        's.yaml:21: delay: unknown delay model "unifrom"; did you mean "uniform"?',
        "s.yaml:24: delay: expected a duration (e.g. 25ms) or one delay model (fixed, uniform, normal, "
        "lognormal, percentiles, backoff), got a list",
    ]


def test_bad_delay_models(cat: Catalog, workdir: Path) -> None:
    """Each model's bad parameters are reported at the line of the parameter, with the near miss named."""
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "1"}}
            delay: {normal: {mean: 20ms, stdev: 5ms}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "2"}}
            delay: {normal: {mean: 20ms, stddev: 0ms}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "3"}}
            delay:
              percentiles:
                p50: 12ms
                p90: 10ms
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "4"}}
            delay:
              percentiles: {p50: 12ms, median: 20ms}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "5"}}
            delay: {percentiles: {p50: 12ms, p999: 1s}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "6"}}
            delay:
              backoff:
                initial: 100ms
                factor: 0.5
                max: 2s
                jitter: 1.5
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "7"}}
            delay: {backoff: {initial: 1s, max: 100ms}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "8"}}
            delay: {backof: {initial: 1s, max: 2s}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "9"}}
            delay: {backoff: {initial: 1s, maximum: 2s}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            when: {metadata: {x: "10"}}
            delay: {lognormal: {median: 20ms, p99: [1s]}}
            reply: {}
          - method: shop.v1.Inventory/Ping
            delay: {fixed: 25ms, uniform: [1ms, 2ms]}
            reply: {}
        """
    assert one_file(cat, text) == [
        's.yaml:5: delay.normal: unknown normal key "stdev"; did you mean "stddev"?',
        "s.yaml:9: delay.normal.stddev: must be above zero (for one value, use a duration)",
        's.yaml:16: delay.percentiles: p90 "10ms" is below p50 "12ms": delays cannot fall as the '
        "percentile grows",
        's.yaml:21: delay.percentiles: "median" is not a percentile; use p50 for the median',
        's.yaml:25: delay.percentiles: "p999" is not a percentile; keys from p0 to p100 (p99.9 too), '
        "e.g. {p50: 12ms, p90: 40ms, p99: 180ms}",
        "s.yaml:32: delay.backoff.factor: must be at least 1 (a backoff grows), got 0.5",
        "s.yaml:34: delay.backoff.jitter: must be from 0 to 1 (a share of the delay), got 1.5",
        's.yaml:38: delay.backoff: max "100ms" is below initial "1s"',
        's.yaml:42: delay: unknown delay model "backof"; did you mean "backoff"?',
        's.yaml:46: delay.backoff: unknown backoff key "maximum"; did you mean "max"?',
        "s.yaml:50: delay.lognormal.p99: expected a duration (e.g. 25ms), got a list",
        "s.yaml:53: delay: give exactly one model of fixed, uniform, normal, lognormal, percentiles, backoff",
    ]


def test_bad_after(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "1"}}
            sequence: [{reply: {}}]
            after: cylce
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "2"}}
            sequence: [{reply: {}}]
            after: loop
          - method: shop.v1.Payments/Charge
            reply: {}
            after: cycle
        """
    assert one_file(cat, text) == [
        's.yaml:6: after: unknown value "cylce"; did you mean "cycle"? '
        "(use repeat_last (the default), cycle or fail)",
        's.yaml:10: after: unknown value "loop"; use repeat_last (the default), cycle or fail',
        "s.yaml:13: after: only a sequence has an after (what happens past its end)",
    ]


def test_bad_scenario_name(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: Checkout Happy
        rules: []
        ---
        scenario: 7
        extends: -base
        rules: []
        ---
        rules: []
        """
    assert one_file(cat, text) == [
        's.yaml:1: scenario: bad scenario name "Checkout Happy"; a name matches [a-z0-9][a-z0-9._-]* '
        '(e.g. "checkout-happy")',
        "s.yaml:4: scenario: bad scenario name 7; a name matches [a-z0-9][a-z0-9._-]*",
        's.yaml:5: extends: bad scenario name "-base"; a name matches [a-z0-9][a-z0-9._-]* (e.g. "base")',
        's.yaml:8: missing "scenario:" (the scenario\'s name, e.g. scenario: checkout-happy)',
    ]


def test_template_syntax_error(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Payments/Refund
            reply:
              refund_id: "{{ request.charge_id "
            headers: {x-id: "{% if %}"}
        """
    assert one_file(cat, text) == [
        "s.yaml:5: reply.refund_id: template error: unexpected end of template, expected 'end of print "
        "statement'",
        "s.yaml:6: headers.x-id: template error: Expected an expression, got 'end of statement block'",
    ]


def test_stream_and_each_request_on_the_wrong_method_kind(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/Reserve
            stream: [{reply: {}}]
          - method: shop.v1.Inventory/BulkUpdate
            stream: [{reply: {}}]
          - method: shop.v1.Inventory/Watch
            each_request: {reply: {}}
          - method: shop.v1.Inventory/GetItem
            each_request: {reply: {}}
        """
    assert one_file(cat, text) == [
        "s.yaml:4: stream: shop.v1.Inventory/Reserve is unary; stream needs a server-streaming or bidi "
        "method",
        "s.yaml:6: stream: shop.v1.Inventory/BulkUpdate is client-streaming; stream needs a server-streaming "
        "or bidi method",
        "s.yaml:8: each_request: shop.v1.Inventory/Watch is server-streaming; each_request needs a bidi "
        "method",
        "s.yaml:10: each_request: shop.v1.Inventory/GetItem is unary; each_request needs a bidi method",
    ]


def test_unreachable_rule(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Inventory/GetItem
            when: {request: {sku: A}}
            reply: {sku: A}
          - method: /shop.v1.Inventory/GetItem
            reply: {sku: any}
          - method: shop.v1.Inventory/GetItem
            when: {request: {sku: B}}
            reply: {sku: B}
          - method: shop.v1.Inventory/GetItem
            priority: 5
            when: {request: {sku: C}}
            reply: {sku: C}
          - method: shop.v1.Inventory/Ping
            times: 1
            reply: {}
          - method: shop.v1.Inventory/Ping
            reply: {}
        """
    # Priority 5 is tried before the catch-all, so it is reachable even though it is written after it.
    assert one_file(cat, text) == [
        "s.yaml:8: rule is unreachable: the rule at s.yaml:6 answers every call to shop.v1.Inventory/GetItem "
        "first"
    ]


def test_duplicate_scenario_names_across_files(cat: Catalog, workdir: Path) -> None:
    write("scenarios/a.yaml", "scenario: shop\nrules: []\n")
    write("scenarios/sub/b.yaml", "# the same name again\n\nscenario: shop\nrules: []\n")
    assert check(cat, "scenarios") == [
        'scenarios/a.yaml:1: duplicate scenario name "shop": also defined at scenarios/sub/b.yaml:3',
        'scenarios/sub/b.yaml:3: duplicate scenario name "shop": also defined at scenarios/a.yaml:1',
    ]


def test_unknown_extends_and_cycles(cat: Catalog, workdir: Path) -> None:
    write("a.yaml", "scenario: child\nextends: bsae\nrules: []\n")
    write("b.yaml", "scenario: base\nrules: []\n---\nscenario: x\nextends: y\n---\nscenario: y\nextends: x\n")
    assert check(cat, "a.yaml", "b.yaml") == [
        'a.yaml:2: extends: unknown scenario "bsae"; did you mean "base"?',
        "b.yaml:5: extends: the scenarios extend each other in a cycle: x -> y -> x",
        "b.yaml:8: extends: the scenarios extend each other in a cycle: y -> x -> y",
    ]


def test_one_file_with_five_problems_reports_all_five(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: five
        rules:
          - method: shop.v1.Inventory/Reserve
            times: two
            reply: {reservation_idd: r}
          - method: shop.v1.Payments/Charge
            status: UNAVAILBLE
            delay: 25 ms
          - method: shop.v1.Inventory/Nope
            reply: {}
        """
    problems = one_file(cat, text)
    assert problems == [
        's.yaml:4: times: expected a positive integer, got "two"',
        's.yaml:5: reply.reservation_idd: unknown field "reservation_idd" of shop.v1.ReserveResponse; '
        'did you mean "reservation_id" or "reservationId"?',
        's.yaml:7: status: unknown status code "UNAVAILBLE"; did you mean "UNAVAILABLE"?',
        's.yaml:8: delay: bad duration "25 ms"; use e.g. 25ms, 1.5s, 2m',
        's.yaml:9: unknown method "shop.v1.Inventory/Nope"; the methods of shop.v1.Inventory are Reserve, '
        "GetItem, ListItems, Watch, BulkUpdate, Ping",
    ]
    with pytest.raises(ScenarioError) as info:
        compile_sources(load_sources([Path("s.yaml")]), cat)
    assert str(info.value) == "\n".join(problems)


def test_answer_combinations(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "1"}}
            status: UNAVAILABLE
            reply: {charge_id: c}
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "2"}}
            fault: drop
            reply: {}
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "3"}}
            sequence: [{reply: {}}, {}]
            reply: {}
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "4"}}
            delay: 5ms
          - method: shop.v1.Payments/Charge
            when: {metadata: {x: "5"}}
            handler: module.fn
          - method: shop.v1.Inventory/Watch
            stream:
              - {reply: {sku: A}, status: OK}
              - {delay: 5ms}
            each_request: {}
          - method: shop.v1.Payments/Charge
            fault: dorp
        """
    assert one_file(cat, text) == [
        "s.yaml:6: reply: a failing call carries no reply (status is UNAVAILABLE); drop the reply, or answer "
        "and fail on successive calls with a sequence",
        "s.yaml:10: reply: a fault replaces the answer; remove the reply or the fault",
        "s.yaml:13: sequence[1] has nothing to do: give it a reply, status, fault, stream or passthrough",
        "s.yaml:14: reply: a sequence rule answers from its items; move reply into the sequence",
        "s.yaml:15: the rule has nothing to do: give it a reply, status, fault, sequence, stream, "
        "each_request, passthrough or (in Python) a handler",
        "s.yaml:20: handler: a handler is a Python function; only Python scenarios (scenario.handler) "
        "set one",
        "s.yaml:23: stream[0].status: a stream's final status goes next to stream:, at the rule level",
        "s.yaml:24: stream[1]: a stream item needs a reply (the message to send)",
        "s.yaml:25: each_request: shop.v1.Inventory/Watch is server-streaming; each_request needs a bidi "
        "method",
        "s.yaml:25: each_request: use either stream or each_request, not both",
        's.yaml:27: fault: unknown fault "dorp"; did you mean "drop"? (use drop, garbage or reset)',
    ]


def test_status_details_and_metadata_problems(cat: Catalog, workdir: Path) -> None:
    text = """\
        scenario: a
        rules:
          - method: shop.v1.Payments/Refund
            when: {metadata: {x: "1"}}
            status:
              code: UNAVAILABLE
              details:
                - {"@type": google.rpc.RetryInf}
                - {"@type": google.rpc.RetryInfo, retryDelay: soon}
                - {reason: x}
          - method: shop.v1.Payments/Refund
            status: {code: OK, details: [{"@type": google.rpc.RetryInfo}]}
            headers: {grpc-x: a, "bad key": b, x-bin: "!!!", X-Dup: a, x-dup: b}
        """
    assert one_file(cat, text) == [
        's.yaml:8: status.details[0]: unknown message type "google.rpc.RetryInf"; did you mean '
        '"google.rpc.RetryInfo" or "google.rpc.RequestInfo" or "google.rpc.ResourceInfo"?',
        "s.yaml:9: status.details[1] (google.rpc.RetryInfo): Failed to parse retryDelay field: "
        'Duration must end with letter "s": soon.',
        's.yaml:10: status.details[2]: each detail is a mapping with an "@type", e.g. '
        '{"@type": type.googleapis.com/google.rpc.ErrorInfo, reason: ...}',
        "s.yaml:12: status.details: an OK status carries no details",
        's.yaml:13: headers.x-bin: a -bin key carries bytes, written as base64 text; "!!!" is not base64',
        's.yaml:13: headers: "bad key" is not a valid metadata key (letters, digits, "_", "." and "-" only)',
        's.yaml:13: headers: "grpc-x" is reserved for gRPC itself (keys starting grpc-)',
        's.yaml:13: headers: "x-dup" is given twice (keys are not case-sensitive)',
    ]


def test_not_a_scenario(cat: Catalog, workdir: Path) -> None:
    write("empty.yaml", "# nothing yet\n")
    write("list.yaml", "- method: shop.v1.Inventory/Ping\n")
    write("rules.yaml", "scenario: a\nrules:\n  - 3\n  - {reply: {}}\n")
    assert check(cat, "empty.yaml", "list.yaml", "rules.yaml") == [
        "empty.yaml: no scenario in this file (expected a mapping with scenario: and rules:)",
        "list.yaml:1: expected a scenario (a mapping with scenario: and rules:), got a list",
        "rules.yaml:3: rules[0]: expected a rule (a mapping with method: ...), got 3",
        "rules.yaml:4: the rule has no method: add e.g. method: shop.v1.Inventory/Reserve",
    ]


# -- a valid file with every feature --------------------------------------------------------------------

FULL = """\
scenario: checkout-happy
version: 3
description: every feature of the format
extends: base
rules:
  - method: shop.v1.Inventory/Reserve
    when:
      request: {sku: ABC-1, qty: {$gt: 0}}
      metadata: {x-tenant: acme}
    times: 2
    priority: 10
    delay: 25ms
    reply: {reservation_id: "r-{{ request.sku }}", qty_reserved: 2}
    headers: {x-served-by: virtsvc, X-Blob-Bin: aGVsbG8=}
    trailers: {x-trace: abc}
  - method: /shop.v1.Payments/Charge
    delay: {uniform: [10ms, 50ms]}
    headers: {x-seq: "yes"}
    sequence:
      - status: {code: UNAVAILABLE, message: try later,
                 details: [{"@type": type.googleapis.com/google.rpc.RetryInfo, retryDelay: 0.5s}]}
      - reply: {charge_id: c-1, outcome: APPROVED}
        delay: {lognormal: {median: 20ms, p99: 200ms}}
        headers: {x-seq: "no", x-last: "1"}
    after: cycle
  - method: shop.v1.Inventory/Watch
    stream:
      - {reply: {sku: A}, delay: 5ms}
      - {reply: {sku: B}}
    status: {code: OK}
  - method: shop.v1.Orders/Track
    each_request: {reply: {text: "echo {{ request.text }}"}}
  - method: shop.v1.Inventory/Reserve
    fault: drop
  - method: shop.v1.Payments/Refund
    status: {code: 5, message: "no charge {{ request.charge_id }}"}
    delay: 1.5s
  - method: shop.v1.Inventory/Watch
    when: {metadata: {x-fail: "1"}}
    priority: 1
    stream: [{reply: {sku: C}}, {fault: reset, delay: 500us}]
    status: {code: unavailable, message: gone}
  - method: shop.v1.Payments/Charge
    when: {metadata: {x-once: "1"}}
    priority: 1
    sequence: [{reply: {charge_id: only}}]
    after: fail
---
scenario: base
rules:
  - method: shop.v1.Inventory/Ping
    reply:
    delay: 2m
"""


def test_a_valid_file_with_every_feature_compiles(cat: Catalog, workdir: Path) -> None:
    write("full.yaml", FULL)
    assert check(cat, "full.yaml") == []
    happy, base = compile_sources(load_sources([Path("full.yaml")]), cat)

    assert (happy.name, happy.version, happy.description, happy.extends) == (
        "checkout-happy", 3, "every feature of the format", "base",
    )  # fmt: skip
    assert happy.location == Location("full.yaml", 1)
    assert not happy.from_script
    reserve, charge, watch, track, drop, refund, watch_fail, once = happy.rules
    assert [r.key for r in happy.rules] == [str(i) for i in range(8)]
    assert all(r.scenario == "checkout-happy" for r in happy.rules)

    assert reserve.method == "shop.v1.Inventory/Reserve"
    assert reserve.location == Location("full.yaml", 6)
    assert (reserve.times, reserve.priority, reserve.after) == (2, 10, "repeat_last")
    assert reserve.when is not None and reserve.when.needs_request
    (step,) = reserve.steps
    assert step.delay is not None and step.delay == Fixed(0.025)
    assert step.body is not None and step.body.static is None  # a template
    assert [k for k, _ in step.headers] == ["x-served-by", "x-blob-bin"]
    assert [v.static for _, v in step.headers] == ["virtsvc", "aGVsbG8="]
    assert [(k, v.static) for k, v in step.trailers] == [("x-trace", "abc")]

    assert charge.method == "shop.v1.Payments/Charge" and charge.after == "cycle" and charge.is_sequence
    first, second = charge.steps
    assert first.location == Location("full.yaml", 20) and second.location == Location("full.yaml", 22)
    assert first.body is None and first.status is not None
    assert first.status.code is grpc.StatusCode.UNAVAILABLE
    assert first.status.message is not None and first.status.message.static == "try later"
    (detail,) = first.status.details
    packed = any_pb2.Any.FromString(detail)
    retry = error_details_pb2.RetryInfo()
    assert packed.Unpack(retry)
    assert retry.retry_delay == duration_pb2.Duration(nanos=500_000_000)
    assert first.delay == Uniform(0.01, 0.05)
    assert [(k, v.static) for k, v in first.headers] == [("x-seq", "yes")]  # the rule's default
    assert isinstance(second.delay, LogNormal)
    assert second.delay.mu == pytest.approx(math.log(0.02))
    assert second.delay.sigma == pytest.approx((math.log(0.2) - math.log(0.02)) / 2.3263, rel=1e-4)
    assert [(k, v.static) for k, v in second.headers] == [("x-seq", "no"), ("x-last", "1")]
    assert second.body is not None and second.body.static is not None
    assert second.status is None

    (wstep,) = watch.steps
    assert wstep.status is None  # OK is the default final status
    assert wstep.stream is not None and len(wstep.stream) == 2
    assert [s.location.line for s in wstep.stream] == [28, 29]
    assert wstep.stream[0].delay == Fixed(0.005)
    assert wstep.stream[1].delay is None

    (tstep,) = track.steps
    assert tstep.each_request is not None and tstep.each_request.body is not None
    assert tstep.each_request.body.needs_request

    assert drop.steps[0].fault is Fault.DROP and drop.steps[0].body is None
    assert refund.steps[0].status is not None and refund.steps[0].status.code is grpc.StatusCode.NOT_FOUND
    assert refund.steps[0].delay == Fixed(1.5)

    (fstep,) = watch_fail.steps
    assert fstep.status is not None and fstep.status.code is grpc.StatusCode.UNAVAILABLE
    assert fstep.stream is not None and fstep.stream[1].fault is Fault.RESET
    assert isinstance(fstep.stream[1].delay, Fixed) and fstep.stream[1].delay.value == pytest.approx(0.0005)

    assert once.after == "fail" and once.is_sequence and len(once.steps) == 1

    (ping,) = base.rules
    assert ping.steps[0].delay == Fixed(120.0)
    assert ping.steps[0].body is not None and ping.steps[0].body.static == b""


def test_json_files_and_tab_indented_json(cat: Catalog, workdir: Path) -> None:
    write(
        "s.json",
        '{\n\t"scenario": "j",\n\t"rules": [\n\t\t{"method": "shop.v1.Inventory/Ping",\n'
        '\t\t "replyy": {}}\n\t]\n}\n',
    )
    assert check(cat, "s.json") == ['s.json:5: unknown rule key "replyy"; did you mean "reply"?']


# -- loading ---------------------------------------------------------------------------------------------


def test_load_sources_walks_directories_sorted_and_skips_helpers(workdir: Path) -> None:
    write("sc/b.yaml", "scenario: b\nrules: []\n")
    write("sc/a/z.json", '{"scenario": "z", "rules": []}')
    write("sc/a.yml", "scenario: a\nrules: []\n")
    write("sc/_helper.py", "raise SystemExit(1)\n")
    write("sc/.hidden/x.yaml", "nope: [\n")
    write("sc/notes.txt", "not a scenario\n")
    sources = load_sources([Path("sc")])
    assert [s.file for s in sources] == ["sc/a.yml", "sc/a/z.json", "sc/b.yaml"]
    assert [s.kind for s in sources] == ["yaml", "yaml", "yaml"]


def test_missing_and_unsupported_paths(cat: Catalog, workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^nope: no such file or directory$"):
        load_sources([Path("nope")])
    write("x.txt", "")
    with pytest.raises(ConfigError, match=r"x\.txt: not a scenario file"):
        load_sources([Path("x.txt")])
    assert check(cat, "nope") == ["nope: no such file or directory"]


def test_yaml_guards(cat: Catalog, workdir: Path) -> None:
    deep = "scenario: a\nrules: " + "[" * 150 + "]" * 150 + "\n"
    laughs = "scenario: a\nrules: []\nlol0: &l0 [a, a, a, a, a, a, a, a, a, a]\n"
    for i in range(1, 8):
        laughs += f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n"
    write("deep.yaml", deep)
    write("laughs.yaml", laughs)
    write("dup.yaml", "scenario: a\nrules: []\nscenario: b\n")
    write("self.yaml", "scenario: a\nrules: &r [*r]\n")
    write("tag.yaml", "scenario: !!python/name:os.system a\nrules: []\n")
    assert check(cat, "deep.yaml", "laughs.yaml", "dup.yaml", "self.yaml", "tag.yaml") == [
        "deep.yaml:2: nesting deeper than 100 levels; a scenario never needs that much",
        'dup.yaml:3: duplicate key "scenario" (first on line 1)',
        "laughs.yaml:8: the document expands to more than 1,000,000 values (YAML aliases repeating "
        "aliases?); refusing to load it",
        "self.yaml:2: a YAML alias refers to a mapping or list that contains it",
        'tag.yaml:1: the YAML tag "!!python/name:os.system" is not supported here (plain mappings, lists '
        "and scalars only)",
    ]


def test_oversized_file_is_refused_before_reading(cat: Catalog, workdir: Path) -> None:
    with open("big.yaml", "wb") as f:
        f.truncate(_yaml.MAX_BYTES + 1)
    assert check(cat, "big.yaml") == ["big.yaml: file is too large (16,777,217 bytes; the limit is 16 MiB)"]


def test_located_nodes_know_their_lines() -> None:
    problems = Problems()
    docs = _yaml.load_text(
        "a: 1\nb:\n  - x\n  - {y: 2}\nc: 2024-01-01\nd: !!binary aGVs\n bG8=\n---\n<<: {m: 1}\nz: 2\n",
        "f.yaml",
        problems,
    )
    assert not problems
    first, second = docs
    assert isinstance(first, LocatedDict) and first.key_lines == {"a": 1, "b": 2, "c": 5, "d": 6}
    assert isinstance(first["b"], LocatedList) and first["b"].item_lines == [3, 4]
    assert first["b"][1].line == 4
    assert first["c"] == "2024-01-01"  # timestamps stay text (proto3 JSON)
    assert first["d"] == "aGVsbG8="  # binary stays base64 text (proto3 JSON bytes)
    assert second == {"m": 1, "z": 2}


def test_check_plain_refuses_self_reference_and_depth() -> None:
    loop: list[Any] = []
    loop.append(loop)
    deep: Any = {}
    for _ in range(120):
        deep = {"x": deep}
    assert _yaml.check_plain(loop) == "the data refers to itself (a dict or list that contains itself)"
    assert _yaml.check_plain(deep) == "nesting deeper than 100 levels"
    shared = [1, 2]
    assert _yaml.check_plain({"a": shared, "b": shared}) is None


# -- compile_text and compile_rules ------------------------------------------------------------------------


def test_compile_text_checks_extends_against_known(cat: Catalog) -> None:
    text = "scenario: new\nextends: base\nrules:\n  - {method: shop.v1.Inventory/Ping, reply: {}}\n"
    (scenario,) = compile_text(text, cat, known=["base"])
    assert scenario.location == Location("<admin>", 1) and scenario.rules[0].location == Location(
        "<admin>", 4
    )
    with pytest.raises(ScenarioError) as info:
        compile_text(text, cat, known=["bsae", "other"])
    assert str(info.value) == '<admin>:2: extends: unknown scenario "base"; did you mean "bsae"?'
    with pytest.raises(ScenarioError) as info:
        compile_text("scenario: base\nextends: new\nrules: []\n", cat, known={"new": "base"})
    assert (
        str(info.value)
        == "<admin>:2: extends: the scenarios extend each other in a cycle: base -> new -> base"
    )
    with pytest.raises(ScenarioError) as info:
        compile_text("", cat, origin="put")
    assert str(info.value) == "put: no scenario in the text (expected a mapping with scenario: and rules:)"


def test_compile_rules_from_text_and_from_dicts(cat: Catalog) -> None:
    listed = "- method: shop.v1.Inventory/Ping\n  reply: {}\n- method: shop.v1.Inventory/Ping\n  reply: {}\n"
    with pytest.raises(ScenarioError) as info:
        compile_rules(listed, cat, "shop", "<admin>", "s:1:")
    assert str(info.value) == (
        "<admin>:3: rule is unreachable: the rule at <admin>:1 answers every call to "
        "shop.v1.Inventory/Ping first"
    )
    rules = compile_rules(
        "rules:\n  - {method: shop.v1.Inventory/Ping, times: 1, reply: {}}\n", cat, "shop", "<admin>", "s:1:"
    )
    assert [(r.key, r.scenario, r.times, r.location) for r in rules] == [
        ("s:1:0", "shop", 1, Location("<admin>", 2))
    ]

    def handler(request: Any, context: Any) -> dict[str, Any]:
        return {}

    data = [
        {"method": "shop.v1.Orders/GetOrder", "handler": handler, "$location": "tests/test_x.py:12"},
        {"method": "shop.v1.Inventory/GetItem", "reply": {"sku": "x"}, "delay": 0.25},
    ]
    first, second = compile_rules(data, cat, "shop", "<inline>", "inline:")
    assert (
        first.handler is handler and first.steps == () and first.location == Location("tests/test_x.py", 12)
    )
    assert first.key == "inline:0" and second.key == "inline:1"
    assert second.steps[0].delay == Fixed(0.25)
    with pytest.raises(ScenarioError) as info:
        compile_rules(
            [{"method": "shop.v1.Inventory/Ping", "$location": "t.py:7", "times": "2"}], cat, "s", "x", ""
        )
    assert str(info.value) == (
        "t.py:7: the rule has nothing to do: give it a reply, status, fault, sequence, stream, "
        "each_request, passthrough or (in Python) a handler\n"
        't.py:7: times: expected a positive integer, got "2"'
    )
    with pytest.raises(ScenarioError) as info:
        compile_rules(
            [{"method": "shop.v1.Orders/GetOrder", "handler": handler, "delay": "5ms"}], cat, "s", "x", ""
        )
    assert str(info.value) == "x: delay: a handler rule answers with its handler alone; remove delay"
    with pytest.raises(ScenarioError) as info:
        compile_rules("scenario: x\nrules: []\n", cat, "s", "<admin>", "")
    assert str(info.value) == '<admin>:1: unknown key "scenario"; session rules take only rules:'


# -- hypothesis: nothing but ScenarioError ------------------------------------------------------------------

VOCABULARY = [
    "scenario", "version", "description", "extends", "rules", "method", "when", "times", "priority", "delay",
    "reply", "status", "headers", "trailers", "sequence", "after", "stream", "each_request", "fault",
    "handler", "code", "message", "details", "@type", "uniform", "lognormal", "median", "p99", "request",
    "normal", "percentiles", "backoff", "fixed", "p50", "initial", "factor", "jitter",
    "metadata", "$gt", "$eq", "$in", "$regex", "sku", "qty", "reservation_id", "text", "x-tenant", "labels",
    "hold_for", "region", "x-a-bin", "grpc-x", "<<",
]  # fmt: skip
SCALARS = [
    "shop.v1.Inventory/Reserve", "shop.v1.Inventory/Watch", "shop.v1.Orders/Track",
    "/shop.v1.Payments/Charge",
    "UNAVAILABLE", "OK", "ok", "25ms", "1.5s", "-1s", "25 ms", "{{ request.sku }}", "{{", "{% for %}", "drop",
    "garbage", "repeat_last", "cycle", "fail", "type.googleapis.com/google.rpc.RetryInfo", "google.rpc.Nope",
    "0.5s", "REGION_EU", "a", "", "aGVsbG8=", "1e999", "nan",
]  # fmt: skip

keys = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=8), st.integers(-3, 3), st.booleans())
scalars = st.one_of(
    st.sampled_from(SCALARS),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)
structured = st.one_of(
    st.fixed_dictionaries(
        {"code": st.one_of(st.sampled_from(["UNAVAILABLE", "OK", "nope", "14"]), st.integers(-1, 20))},
        optional={
            "message": scalars,
            "details": st.lists(
                st.dictionaries(st.sampled_from(["@type", "retryDelay", "reason", "x"]), scalars, max_size=3),
                max_size=2,
            ),
        },
    ),
    st.fixed_dictionaries({"uniform": st.lists(scalars, max_size=3)}),
    st.fixed_dictionaries({"lognormal": st.dictionaries(st.sampled_from(["median", "p99", "x"]), scalars)}),
    st.fixed_dictionaries({"normal": st.dictionaries(st.sampled_from(["mean", "stddev", "x"]), scalars)}),
    st.fixed_dictionaries(
        {
            "percentiles": st.dictionaries(
                st.sampled_from(["p0", "p50", "p99.9", "p100", "p101", "x"]), scalars
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "backoff": st.dictionaries(
                st.sampled_from(["initial", "factor", "max", "jitter", "x"]),
                st.one_of(scalars, st.floats(0, 10)),
            )
        }
    ),
    st.lists(
        st.dictionaries(st.sampled_from(["reply", "status", "delay", "fault", "stream"]), values), max_size=3
    ),
)
METHODS = ["shop.v1.Inventory/Reserve", "shop.v1.Inventory/Watch", "shop.v1.Inventory/BulkUpdate",
           "shop.v1.Orders/Track", "shop.v1.Payments/Charge"]  # fmt: skip
rule_dicts = st.one_of(
    st.dictionaries(st.sampled_from(VOCABULARY), values, max_size=6),
    st.builds(
        lambda method, extra: {"method": method, **extra},
        st.sampled_from(METHODS),
        st.dictionaries(st.sampled_from(VOCABULARY), st.one_of(values, structured), max_size=5),
    ),
)
documents = st.one_of(
    values,
    st.fixed_dictionaries(
        {"scenario": st.sampled_from(["a", "b", "Bad", 3]), "rules": st.lists(rule_dicts, max_size=4)},
        optional={"extends": st.sampled_from(["a", "b", "zz"]), "version": values},
    ),
)


def _dump(docs: list[Any]) -> str:
    try:
        return yaml.safe_dump_all(docs, sort_keys=False)
    except yaml.YAMLError:  # keys PyYAML cannot write
        return "scenario: x\n"


@settings(
    max_examples=int(os.environ.get("VIRTSVC_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(docs=st.lists(documents, min_size=1, max_size=3), junk=st.one_of(st.none(), st.text(max_size=40)))
def test_random_documents_compile_or_raise_scenario_error(
    cat: Catalog, docs: list[Any], junk: str | None
) -> None:
    text = junk if junk is not None else _dump(docs)
    for compile_one in (
        lambda: compile_text(text, cat, known=["base"]),
        lambda: compile_rules(text, cat, "s", "<admin>", "k"),
        lambda: compile_rules([d for d in docs if isinstance(d, dict)], cat, "s", "<inline>", "k"),
    ):
        try:
            compile_one()
        except ScenarioError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert problem.line >= 0 and problem.message
