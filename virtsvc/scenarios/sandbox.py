"""The Jinja2 sandbox templates render in: immutable, with bounded output, strings, lists and ``range``,
and a per-render budget of loop iterations, calls and wall-clock time that every step draws on, so a
template cannot hang a server or exhaust its memory by the usual means.

``BUDGET`` holds the render in progress's budget (per thread); :mod:`virtsvc.scenarios.templates` sets it
around each render.
"""

from __future__ import annotations

import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from jinja2 import nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Environment
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, StrictUndefined, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from virtsvc.scenarios.fields import View, suggest

__all__ = [
    "BUDGET",
    "ENV",
    "GLOBALS",
    "MAX_INT_BITS",
    "MAX_RANGE",
    "MAX_SECONDS",
    "MAX_STEPS",
    "MAX_TEXT",
    "close_budget",
    "open_budget",
    "too_long",
]

MAX_TEXT = 1 << 20  # a rendered string (and any string built while rendering) is at most 1 MiB
MAX_RANGE = 100_000  # range() length, like jinja2.sandbox.MAX_RANGE
MAX_STEPS = 1_000_000  # loop iterations + calls per render: bounds the time a render can take
MAX_SECONDS = 1.0  # wall-clock bound of one render, checked at every loop iteration and call
MAX_INT_BITS = 1 << 16  # integers built by * and ** (Python would happily start on 2 ** 1000000000)

BUDGET = threading.local()


def open_budget() -> bool:
    """Starts a render's budget, unless one is running (a render within a render shares it): whether it
    started one, to close."""
    if getattr(BUDGET, "left", None) is not None:
        return False
    BUDGET.left = MAX_STEPS
    BUDGET.deadline = time.monotonic() + MAX_SECONDS
    return True


def close_budget() -> None:
    BUDGET.left = None


def _step(n: int = 1) -> None:
    left = getattr(BUDGET, "left", None)
    if left is None:
        return
    left -= n
    if left < 0:
        raise SecurityError(f"template too expensive: more than {MAX_STEPS:,} loop iterations and calls")
    BUDGET.left = left
    # Steps are cheap to count but not all cost the same (a filter over a million items): a clock too.
    if time.monotonic() > BUDGET.deadline:
        raise SecurityError(f"template too slow: rendering took more than {MAX_SECONDS:g} s")


def too_long(what: str = "string") -> SecurityError:
    return SecurityError(f"{what} longer than {MAX_TEXT:,} characters (1 MiB)")


def _weight(value: Any, depth: int = 0) -> int:
    """Rough size of a list or tuple, counting the text inside it (so ``[big] * n`` is seen as big)."""
    if isinstance(value, (str, bytes)):
        return len(value) + 1
    if isinstance(value, (list, tuple)) and depth < 8:
        return 1 + sum(_weight(v, depth + 1) for v in value)
    return 1


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: Any) -> None:
    if isinstance(fmt, str):
        for m in _PERCENT.finditer(fmt):
            for g in m.groups():
                if g == "*" or (g and int(g) > MAX_TEXT):
                    raise too_long("formatted string")


def _check_format_spec(fmt: str) -> bool:
    """Whether ``fmt.format(...)`` stays within the size bound (widths are checked, nested specs refused)."""
    try:
        parts = list(string.Formatter().parse(fmt))
    except ValueError:
        return True  # str.format raises the same error itself
    for _, _, spec, _ in parts:
        if spec and ("{" in spec or any(int(n) > MAX_TEXT for n in re.findall(r"\d+", spec))):
            return False
    return True


def _join_size(items: Sequence[Any], sep: Any) -> int:
    total = len(sep) * max(len(items) - 1, 0) if isinstance(sep, (str, bytes)) else 0
    for item in items:
        total += len(item) if isinstance(item, (str, bytes)) else len(str(item))
        if total > MAX_TEXT:
            break
    return total


class _GuardedCodeGenerator(CodeGenerator):
    """Routes every ``for`` loop through the step budget and ``~`` through the size bound."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            it = loop.iter
            if not (isinstance(it, nodes.Call) and isinstance(it.node, nodes.EnvironmentAttribute)):
                loop.iter = nodes.Call(
                    nodes.EnvironmentAttribute("virtsvc_loop"), [it], [], None, None, lineno=loop.lineno
                )
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.virtsvc_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with item-first lookups on mappings and bounds on time and size."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False)
        for name in ("lipsum", "cycler", "joiner", "namespace"):
            self.globals.pop(name, None)  # not needed; namespace() would let loops accumulate state
        self.globals["range"] = _safe_range
        self.filters.update(_GUARDED_FILTERS)

    # (a) ``request.items`` is the field "items", not dict.items
    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
            if isinstance(obj, View) and not hasattr(dict, attribute):
                return self._no_field(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, View) and isinstance(argument, str) and argument not in obj:
            try:
                return obj[argument]
            except KeyError:
                return self._no_field(obj, argument)
        return super().getitem(obj, argument)

    def _no_field(self, view: View, name: str) -> Undefined:
        desc = view.info.descriptor
        hint = suggest(name, view.info.fields)
        return self.undefined(hint=f'{desc.full_name} has no field "{name}"{hint}', obj=view, name=name)

    # (b) time: calls and loop iterations draw on the step budget; size: growing methods are bounded
    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _step()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        elif isinstance(owner, int) and getattr(__obj, "__name__", "") == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            if isinstance(length, int) and length > MAX_TEXT:
                raise too_long("bytes")
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (right, left) if isinstance(left, int) and not isinstance(right, int) else (left, right)
            if isinstance(n, int) and n > 0:
                if isinstance(seq, (str, bytes)) and len(seq) * n > MAX_TEXT:
                    raise too_long()
                if isinstance(seq, (list, tuple)) and _weight(seq) * n > MAX_TEXT:
                    raise too_long("list")
                if isinstance(seq, int) and seq.bit_length() + n.bit_length() > MAX_INT_BITS:
                    raise SecurityError(f"integer result larger than {MAX_INT_BITS} bits")
        elif operator == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and abs(left) > 1
                and left.bit_length() * right > MAX_INT_BITS
            ):
                raise SecurityError(f"integer result larger than {MAX_INT_BITS} bits")
        elif operator == "+":
            if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
                if len(left) + len(right) > MAX_TEXT:
                    raise too_long()
            elif (
                isinstance(left, (list, tuple))
                and isinstance(right, (list, tuple))
                and _weight(left) + _weight(right) > MAX_TEXT
            ):
                raise too_long("list")
        elif operator == "%":
            _check_percent(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and not _check_format_spec(value.__self__):

            def refuse(*args: Any, **kwargs: Any) -> str:
                raise too_long("formatted string")

            return refuse
        return wrapped

    def virtsvc_loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _step()
            yield item

    def virtsvc_concat(self, parts: Iterable[Any]) -> str:
        texts = [str(p) for p in parts]
        if sum(map(len, texts)) > MAX_TEXT:
            raise too_long()
        return "".join(texts)


def _safe_range(*args: int) -> range:
    try:
        rng = range(*args)
        n = len(rng)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise SecurityError(f"range() with more than {MAX_RANGE:,} items")
    return rng


def _check_str_method(
    owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """Refuses str/bytes method calls whose result would pass the size bound, before they allocate it."""
    size = 0
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        size = width if isinstance(width, int) else 0
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        size = len(owner) + tabs * (tab if isinstance(tab, int) else 0)
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        if isinstance(old, type(owner)) and isinstance(new, type(owner)):
            hits = owner.count(old) if old else len(owner) + 1  # type: ignore[arg-type]
            if isinstance(count, int) and count >= 0:
                hits = min(hits, count)
            size = len(owner) + hits * (len(new) - len(old))
    elif name == "join" and args:
        items = list(args[0])
        size = _join_size(items, owner)
        args = (items, *args[1:])
    elif name in ("translate", "maketrans"):
        raise SecurityError(f"{type(owner).__name__}.{name}() is not available in templates")
    if size > MAX_TEXT:
        raise too_long()
    return args


def _f_center(value: Any, width: int = 80) -> str:
    if isinstance(width, int) and width > MAX_TEXT:
        raise too_long()
    return FILTERS["center"](value, width)


def _f_indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    w = width if isinstance(width, int) else len(str(width))
    if len(text) + (text.count("\n") + 1) * max(w, 0) > MAX_TEXT:
        raise too_long()
    return FILTERS["indent"](s, width, first, blank)


@pass_environment
def _f_wordwrap(env: Environment, s: Any, width: int = 79, break_long_words: bool = True,
                wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:  # fmt: skip
    text = str(s)
    sep = wrapstring if wrapstring is not None else env.newline_sequence
    if len(text) + (len(text) + 1) * len(str(sep)) > MAX_TEXT:
        raise too_long()
    return FILTERS["wordwrap"](env, s, width, break_long_words, wrapstring, break_on_hyphens)


@pass_eval_context
def _f_replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, o, n = str(s), str(old), str(new)
    hits = text.count(o) if o else len(text) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    if len(text) + hits * (len(n) - len(o)) > MAX_TEXT:
        raise too_long()
    return FILTERS["replace"](eval_ctx, s, old, new, count)


def _f_format(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_percent(str(value))
    return FILTERS["format"](value, *args, **kwargs)


@pass_eval_context
def _f_join(
    eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None
) -> str:
    items = list(value)
    if attribute is None and _join_size(items, str(d)) > MAX_TEXT:
        raise too_long()
    result = FILTERS["join"](eval_ctx, items, d, attribute)
    if len(result) > MAX_TEXT:
        raise too_long()
    return result


def _f_product(values: Iterable[Any]) -> Any:
    """``[2, 3]|product``: the numbers multiplied (1 for none), within the bound on integers' size."""
    result: Any = 1
    for value in values:
        result = result * value
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise SecurityError(f"integer result larger than {MAX_INT_BITS} bits")
    return result


def _bounded_count(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(value: Any, count: int, fill_with: Any = None) -> Any:
        if isinstance(count, int) and count > MAX_RANGE:
            raise SecurityError(f"{name}() with more than {MAX_RANGE:,} parts")
        return original(value, count, fill_with)

    return guarded


_GUARDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _f_center,
    "indent": _f_indent,
    "wordwrap": _f_wordwrap,
    "replace": _f_replace,
    "format": _f_format,
    "join": _f_join,
    "product": _f_product,
    "batch": _bounded_count("batch", FILTERS["batch"]),
    "slice": _bounded_count("slice", FILTERS["slice"]),
}

ENV = _Sandbox()
GLOBALS = dict(ENV.globals)  # range and dict
