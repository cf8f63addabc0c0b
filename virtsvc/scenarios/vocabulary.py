"""The words of a scenario: the keys a scenario, a rule and a step may hold.

One vocabulary serves the YAML/JSON loader, the Python ``Scenario`` builder and the test-side rule builders,
so a key added here is known (and suggested in did-you-mean messages) everywhere at once.
"""

from __future__ import annotations

__all__ = [
    "AFTER_VALUES",
    "CLOCKS",
    "EACH_REQUEST_KEYS",
    "EFFECT_KEYS",
    "ITEM_ANSWERS",
    "PER_MESSAGE_KEYS",
    "RULE_ANSWER_KEYS",
    "RULE_KEYS",
    "SCENARIO_KEYS",
    "STATUS_KEYS",
    "STEP_ANSWERS",
    "STEP_KEYS",
    "STREAM_ITEM_KEYS",
    "VERIFY_VALUES",
]

SCENARIO_KEYS = (
    "scenario",
    "version",
    "description",
    "extends",
    "passthrough",
    "unmatched",
    "clock",
    "data",
    "rules",
)
RULE_KEYS = (
    "method", "when", "times", "priority", "reply", "status", "fault", "sequence", "after", "stream",
    "each_request", "handler", "delay", "headers", "trailers", "contract", "passthrough", "examples",
    "verify", "per_message", "replies", "id", "effects",
)  # fmt: skip
# what a per-message rule (a bidi method's messages matched one by one) may hold besides method and when
PER_MESSAGE_KEYS = (
    "method", "when", "times", "priority", "per_message", "reply", "replies", "stream", "status", "delay",
    "contract", "examples", "verify", "id", "effects",
)  # fmt: skip
STEP_KEYS = ("reply", "status", "fault", "stream", "delay", "headers", "trailers", "passthrough")
STREAM_ITEM_KEYS = ("reply", "delay", "fault", "open")  # {open: true}: held open for the test, last
EACH_REQUEST_KEYS = ("reply", "status", "delay")
EFFECT_KEYS = ("put", "remove", "remove_self")  # what an effect does to the session's rules
STATUS_KEYS = ("code", "message", "details")
AFTER_VALUES = ("repeat_last", "cycle", "fail")
CLOCKS = ("wall", "virtual")  # a scenario's `clock:`: its sessions on wall or on virtual time
VERIFY_VALUES = ("shape", "exact")  # how `virtsvc verify` compares a real answer with the rule's
# what a rule's own step does
STEP_ANSWERS = ("reply", "status", "fault", "stream", "each_request", "passthrough")
ITEM_ANSWERS = ("reply", "status", "fault", "stream", "passthrough")  # what a sequence item does
RULE_ANSWER_KEYS = (*STEP_ANSWERS, "sequence", "handler", "replies")  # any of these makes a rule answer
