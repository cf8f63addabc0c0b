"""Recorded interactions -> scenario rules that answer the same calls the same way.

- A request becomes an exact ``when.request`` on the fields present (the first message of a client or bidi
  stream); a request with no field set matches every call, so it goes after the method's other rules.
  Rules of one method are ordered most specific first, so a request never meets a rule recorded for a
  request with fewer fields before its own.
- Answers become ``reply``, ``stream``, ``status`` (with details), ``headers`` and ``trailers``; with
  ``keep_latency`` the observed duration becomes ``delay``.
- Identical requests with different answers become one rule with a ``sequence`` of them, in order.
- Every rule carries ``contract:``, its method's contract fingerprint, when a catalog is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from virtsvc.record.interactions import Interaction
from virtsvc.record.redact import Redaction

__all__ = ["answer_of", "request_key", "to_rules"]


def _leaves(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_leaves(v) for v in value.values())
    return 1


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def request_key(method: str, request: dict[str, Any]) -> tuple[str, str]:
    """What makes two recorded calls the same call: the method and the matcher's request."""
    return method, _canonical(request)


def _delay(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


def answer_of(item: Interaction, redaction: Redaction, keep_latency: bool) -> dict[str, Any]:
    """The answer keys of one interaction (a rule's own, or one sequence item)."""
    out: dict[str, Any] = {}
    if keep_latency and item.duration > 0:
        out["delay"] = _delay(item.duration)
    if item.headers:
        out["headers"] = redaction.metadata(item.headers)
    replies = [redaction.reply(r) for r in item.replies]
    streaming = item.kind in ("server_streaming", "bidi_streaming")
    if streaming:
        out["stream"] = [{"reply": r} for r in replies]
    elif item.code == "OK":
        out["reply"] = replies[0] if replies else {}
    if item.code != "OK":
        status: dict[str, Any] = {"code": item.code}
        if item.message:
            status["message"] = item.message
        if item.details:
            status["details"] = item.details
        out["status"] = status
    if item.trailers:
        out["trailers"] = redaction.metadata(item.trailers)
    return out


def to_rules(
    interactions: Iterable[Interaction],
    *,
    redaction: Redaction | None = None,
    keep_latency: bool = False,
    fingerprint: Callable[[str], str | None] | None = None,
) -> list[dict[str, Any]]:
    """Scenario rules (plain data, in file order) answering the interactions' calls as recorded."""
    redaction = redaction or Redaction()
    groups: dict[tuple[str, str], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for item in interactions:
        request = redaction.request(item.requests[0]) if item.requests else {}
        key = request_key(item.method, request)
        answers = groups.setdefault(key, (request, []))[1]
        answers.append(answer_of(item, redaction, keep_latency))
    order: dict[str, list[dict[str, Any]]] = {}  # method -> its rules, methods in first-seen order
    for (method, _), (request, answers) in groups.items():
        rule: dict[str, Any] = {"method": method}
        contract = fingerprint(method) if fingerprint is not None else None
        if contract:
            rule["contract"] = contract
        if request:
            rule["when"] = {"request": request}
        # Latency varies from call to call: answers that differ only in it are one answer.
        distinct = {_canonical({k: v for k, v in a.items() if k != "delay"}) for a in answers}
        if len(distinct) == 1:
            rule.update(answers[0])
        else:
            rule["sequence"] = answers
        order.setdefault(method, []).append(rule)
    out: list[dict[str, Any]] = []
    for rules in order.values():
        # Most fields first (stable): a subset matcher must never come before the rule of a fuller request.
        rules.sort(key=lambda r: -_leaves(r.get("when", {}).get("request", {})) if "when" in r else 1)
        out.extend(rules)
    return out
