"""How virtsvc words its messages: did-you-mean suggestions and values shown to a person.

One place, so that every message suggests alike (same cutoff: an unrelated name is never offered) and shows
values alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["alternatives", "closest", "describe", "did_you_mean", "quoted_list", "show"]

CUTOFF = 0.6  # difflib's own default: below it, suggestions are more often unrelated than helpful


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates close enough to ``word`` to be what was meant, best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=CUTOFF)


def did_you_mean(word: str, candidates: Iterable[str], *, n: int = 1, quote: str = "'") -> str:
    """``"; did you mean 'x'?"`` (or ``'x' or 'y'``), or ``""`` when nothing is close."""
    close = closest(word, candidates, n=n)
    return "; " + alternatives(close, quote=quote) if close else ""


def alternatives(close: Iterable[str], *, quote: str = '"') -> str:
    """``did you mean "x" or "y"?`` for names already found close."""
    return "did you mean " + " or ".join(f"{quote}{c}{quote}" for c in close) + "?"


def quoted_list(names: Iterable[str], empty: str = "none") -> str:
    """``a, b, c`` (or ``empty``)."""
    listed = ", ".join(names)
    return listed or empty


def show(value: Any, limit: int = 200) -> str:
    """A value as a person reads it in a message: JSON-like, strings quoted, cut at ``limit`` chars."""
    import json

    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """``Type: message`` (or just ``Type``) for an exception nobody expected."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
