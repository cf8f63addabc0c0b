"""Reply bodies and text templates: validated and compiled at load, rendered per call in a sandbox.

A reply body is written as proto3 JSON whose string values may be Jinja2 templates. At load the whole body
is validated against the output message type (field names, value types, enum names, oneofs, well-known
types) and split into a *skeleton* (every static part, already serialised) and *leaves* (the templated
values); every look-up of a request field a template makes (``request.lines[0].sku``, loop variables over
``requests`` included) is checked against the method's input type (:func:`request_type`). A render parses
the skeleton, evaluates only the leaves and sets them by direct field access: for a three-field reply that
build step measured ~3 us against ~65 us with ``json_format.ParseDict``.

Templates run in an immutable Jinja2 sandbox, tightened further: output, string and list sizes are bounded,
``range`` is bounded, and every loop iteration and call draws on a per-render step budget, so a template
cannot hang a server or exhaust its memory by the usual means (:mod:`virtsvc.scenarios.sandbox`).
"""

from __future__ import annotations

import datetime as _dt
import json
import operator
import random
import uuid as _uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from jinja2 import nodes
from jinja2.environment import Template
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.exceptions import TemplateError as JinjaError
from jinja2.meta import find_undeclared_variables
from jinja2.runtime import Context, Undefined

from virtsvc import _text
from virtsvc.errors import ConversionError, Refusal, TemplateError
from virtsvc.scenarios import fakes
from virtsvc.scenarios.data import DataUse, pick, session_data
from virtsvc.scenarios.fields import (
    EMPTY,
    INT64_TYPES,
    INT_RANGES,
    JSON_TYPES,
    SPECIAL_TYPES,
    UNDEFINED,
    F,
    View,
    convert_scalar,
    element_default,
    fill_message,
    is_map,
    make_view,
    map_key,
    message_class,
    message_info,
    named_fields,
    oneof_message,
    set_field,
    set_map_value,
    show,
    special_type,
    suggest,
    takes_null,
    to_str,
    type_name,
)
from virtsvc.scenarios.located import Site
from virtsvc.scenarios.model import Call, MessageTemplate, TextTemplate, to_json
from virtsvc.scenarios.protojson import message_to_json
from virtsvc.scenarios.sandbox import (
    ENV,
    GLOBALS,
    MAX_INT_BITS,
    MAX_TEXT,
    close_budget,
    open_budget,
    too_long,
)

__all__ = [
    "MAX_TEXT",
    "ConversionError",
    "DataTemplate",
    "TemplateError",
    "compile_data",
    "compile_message",
    "compile_text",
    "has_template",
    "is_template",
    "now",
    "request_type",
    "static_text",
]

CONTEXT_NAMES = frozenset(
    {"request", "requests", "metadata", "session", "index", "uuid", "now", "randint", "data", "pick", "fake"}
)
_REQUEST_NAMES = frozenset({"request", "requests"})


def now() -> str:
    """The current UTC time as RFC 3339 text; templates read the wall clock only here."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def rfc3339(seconds: float) -> str:
    """Epoch seconds as RFC 3339 UTC text, as ``now()`` writes it."""
    moment = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def is_template(value: Any) -> bool:
    """Whether a string holds Jinja2 syntax (anything else is a literal)."""
    return isinstance(value, str) and ("{{" in value or "{%" in value or "{#" in value)


# Per-call memos (request views, rendered bodies) live in the call object's own dict, under these keys.
_FIRST_VIEW = "_virtsvc_first_view"
_ALL_VIEWS = "_virtsvc_all_views"


def _first_view(call: Call) -> View:
    memo = call.__dict__
    view: View | None = memo.get(_FIRST_VIEW)
    if view is None:
        # Fields left at their default come from the view's __missing__, so only set fields convert.
        # The JSON form the matchers already made (make_view copies, never changes it).
        view = memo[_FIRST_VIEW] = make_view(call.method.input, call.request_json)
    return view


def _all_views(call: Call) -> list[View]:
    """Views of every request so far; a stream that grows is decoded incrementally, not all over again."""
    views: list[View] = call.__dict__.setdefault(_ALL_VIEWS, [])
    if len(views) < len(call.raw_requests):
        desc, messages = call.method.input, call.request_messages
        views.extend(make_view(desc, message_to_json(msg)) for msg in messages[len(views) :])
    return views


def _context(call: Call, index: int, names: frozenset[str]) -> dict[str, Any]:
    """The variables a template uses, and only those (building ``request`` decodes the request)."""
    ctx: dict[str, Any] = dict(GLOBALS)
    if "request" in names:
        ctx["request"] = _first_view(call)
    if "requests" in names:
        ctx["requests"] = list(_all_views(call))
    if "metadata" in names:
        ctx["metadata"] = dict(call.metadata)
    if "session" in names:
        ctx["session"] = {"id": call.session.id, "calls": call.session.calls}
    if "index" in names:
        ctx["index"] = index
    if "uuid" in names or "randint" in names:
        rng = call.session.rng
        ctx["uuid"] = lambda: str(_uuid.UUID(int=rng.getrandbits(128), version=4))
        ctx["randint"] = lambda a, b: rng.randint(a, b)
    if "now" in names:
        clock = getattr(call.session, "clock", None)  # a session on virtual time reads its own clock
        if clock is None:
            ctx["now"] = (
                now  # looked up per render, so replacing virtsvc.scenarios.templates.now takes effect
            )
        else:
            ctx["now"] = lambda: rfc3339(clock.now())
    if "data" in names:
        ctx["data"] = session_data(call)
    if "pick" in names:
        ctx["pick"] = pick(call.session.rng)
    if "fake" in names:
        ctx["fake"] = fakes.fake(call.session.rng)
    return ctx


def generation_context(rng: random.Random, index: int, data: Any) -> dict[str, Any]:
    """The variables of a generated data set's override templates: no call, the record's own generator."""
    ctx: dict[str, Any] = dict(GLOBALS)
    ctx["data"] = data
    ctx["index"] = index
    ctx["pick"] = pick(rng)
    ctx["fake"] = fakes.fake(rng)
    ctx["uuid"] = lambda: str(_uuid.UUID(int=rng.getrandbits(128), version=4))
    ctx["randint"] = lambda a, b: rng.randint(a, b)
    return ctx


UNDEFINED.append(Undefined)
_KNOWN_NAMES = CONTEXT_NAMES | frozenset(GLOBALS)

# --------------------------------------------------------------------------------------------------------
# compiled templates


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ConversionError):
        return exc.message
    if isinstance(exc, (JinjaError, SecurityError)):
        text = exc.message or type(exc).__name__
    elif isinstance(exc, RecursionError):
        text = "template recursion too deep"
    elif isinstance(exc, MemoryError):
        text = "out of memory"
    else:
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, (TypeError, ValueError, ArithmeticError)):
            text = f"{type(exc).__name__}: {text}"
    return text.rstrip(".")


class _Evaluator:
    """Something that yields a value from a context: one template, or a JSON tree with templates inside."""

    names: frozenset[str]

    def evaluate(self, ctx: dict[str, Any]) -> Any:
        raise NotImplementedError


class _Compiled(_Evaluator):
    """One template string: a single ``{{ expr }}`` yields the value itself, anything else yields text."""

    __slots__ = ("collections", "lookups", "names", "native", "records_of", "source", "template")

    def __init__(
        self,
        source: str,
        template: Template,
        native: bool,
        names: frozenset[str],
        lookups: tuple[_Lookup, ...] = (),
        collections: tuple[str, ...] = (),
        records_of: str | None = None,
    ) -> None:
        self.source = source
        self.template = template  # native: a template that stores the expression's value as "result"
        self.native = native
        self.names = names
        self.lookups = lookups  # the request fields it names, checked against a method's input at load
        self.collections = collections  # the data collections it names (data.items)
        self.records_of = records_of  # the collection whose records the one expression yields, if any

    def evaluate(self, ctx: dict[str, Any]) -> Any:
        t = self.template
        # A Context built directly over ``ctx`` (which already holds the globals): Template.new_context
        # copies the globals' ChainMap on every call, three times the cost of the evaluation itself.
        context = Context(ENV, ctx, t.name, t.blocks)
        if self.native:
            for _ in t.root_render_func(context):
                pass
            value = context.vars["result"]
            if isinstance(value, Undefined):
                str(value)  # raises the undefined/security error with its message
            if isinstance(value, str) and len(value) > MAX_TEXT:
                raise too_long()
            return value
        parts: list[str] = []
        total = 0
        # Streamed, so a template that prints without end is stopped at the bound, not when memory runs out.
        for piece in t.root_render_func(context):
            total += len(piece)
            if total > MAX_TEXT:
                raise too_long("rendered text")
            parts.append(piece)
        return "".join(parts)


class _Tree(_Evaluator):
    """A JSON tree (for Struct/Value/ListValue/Any fields) whose strings may be templates."""

    __slots__ = ("names", "tree")

    def __init__(self, tree: Any, names: frozenset[str]) -> None:
        self.tree = tree
        self.names = names

    def evaluate(self, ctx: dict[str, Any]) -> Any:
        return _eval_tree(self.tree, ctx)


def _eval_tree(tree: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(tree, _Evaluator):
        return tree.evaluate(ctx)
    if isinstance(tree, dict):
        return {k: _eval_tree(v, ctx) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_eval_tree(v, ctx) for v in tree]
    return tree


@lru_cache(maxsize=8192)
def _compile_source(source: str) -> _Compiled | _Fast:
    # Cached: compiling is pure, and the same template text comes back in every test that declares the
    # same inline rule (Jinja's parse + compile is most of the cost of a per-test session's rules).
    """Compiles one template string; raises TemplateSyntaxError or a ValueError naming an unknown variable."""
    ast = ENV.parse(source)
    undeclared = find_undeclared_variables(ast)
    unknown = sorted(undeclared - _KNOWN_NAMES)
    if unknown:
        name = unknown[0]
        hint = suggest(name, sorted(_KNOWN_NAMES)) or "; the names are " + ", ".join(sorted(CONTEXT_NAMES))
        raise ValueError(f'unknown name "{name}"{hint}')
    names = frozenset(undeclared & CONTEXT_NAMES)
    # Before compiling: the code generator rewrites the loops of the tree it is given.
    lookups = _request_lookups(ast) if names & _REQUEST_NAMES else ()
    expr = _single_expression(ast)
    collections, records_of = _data_refs(ast, expr) if "data" in names else ((), None)
    if expr is not None:
        # what Environment.compile_expression does, from the expression already parsed
        body = [nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)]
        template = ENV.from_string(nodes.Template(body, lineno=1))
        compiled = _Compiled(source, template, True, names, lookups, collections, records_of)
    else:
        compiled = _Compiled(source, ENV.from_string(ast), False, names, lookups, collections)
    return _fast_path(ast, compiled) or compiled


_MISSING = object()


class _Fallback(Exception):
    """The fast evaluator met a value or an operation only Jinja knows how to handle."""


_Fn = Callable[[dict[str, Any]], Any]


class _Fast(_Evaluator):
    """A template made of text and simple expressions, evaluated by Python closures instead of Jinja.

    The commonest templates are plain look-ups (``r-{{ request.sku }}``) and a little arithmetic or joining
    on them (``{{ request.n + 1 }}``, ``{{ a ~ "-" ~ b }}``, ``x if c else y``): compiled at load into
    closures over our own request/metadata/session mappings, they cost a few dict look-ups. Anything off the
    plain path (a missing key, a value that is not a string, number, bool or None, an operation the sandbox
    guards) raises _Fallback and the compiled Jinja template runs instead, so results and errors stay
    Jinja's own.
    """

    __slots__ = ("collections", "fallback", "lookups", "names", "native", "parts", "records_of")

    def __init__(self, parts: tuple[str | _Fn, ...], fallback: _Compiled) -> None:
        self.parts = parts
        self.fallback = fallback
        self.names = fallback.names
        self.native = fallback.native
        self.lookups = fallback.lookups
        self.collections = fallback.collections
        self.records_of = fallback.records_of

    def evaluate(self, ctx: dict[str, Any]) -> Any:
        try:
            if self.native:
                value = self.parts[0](ctx)  # type: ignore[operator]
                if type(value) is str and len(value) > MAX_TEXT:
                    raise _Fallback
                return value
            texts: list[str] = []
            for part in self.parts:
                if type(part) is str:
                    texts.append(part)
                else:
                    texts.append(_text_of(part(ctx)))  # type: ignore[operator]
            text = "".join(texts)
            if len(text) > MAX_TEXT:
                raise _Fallback
            return text
        except _Fallback:
            return self.fallback.evaluate(ctx)


_SCALARS = (str, int, float, bool, type(None))
_FAST_ROOTS = frozenset({"request", "requests", "metadata", "session", "index"})


def _text_of(value: Any) -> str:
    if type(value) is str:
        return value
    if type(value) in (int, float, bool):
        return str(value)
    raise _Fallback


def _number(value: Any) -> int | float:
    if type(value) is int or type(value) is float:
        return value
    raise _Fallback


def _scalar(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
    raise _Fallback


def _fast_path(ast: nodes.Template, fallback: _Compiled) -> _Fast | None:
    """The closure form of a template made of text and simple expressions only, else None."""
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts: list[str | _Fn] = []
    for node in ast.body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            parts.append(node.data)
            continue
        fn = _fast_expr(node)
        if fn is None:
            return None
        parts.append(fn)
    if fallback.native:
        parts = [p for p in parts if not isinstance(p, str) or p.strip()]
        if len(parts) != 1 or isinstance(parts[0], str):
            return None
    return _Fast(tuple(parts), fallback)


def _fast_expr(node: nodes.Node) -> _Fn | None:
    """A closure computing ``node`` as Jinja would (or raising _Fallback), None for unsupported nodes."""
    if isinstance(node, nodes.Const):
        value = node.value
        if type(value) not in _SCALARS:
            return None
        return lambda ctx: value
    if isinstance(node, (nodes.Name, nodes.Getattr, nodes.Getitem)):
        return _fast_lookup(node)
    if isinstance(node, (nodes.Add, nodes.Sub, nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Mod)):
        left, right = _fast_expr(node.left), _fast_expr(node.right)
        if left is None or right is None:
            return None
        return _fast_binop(type(node).__name__, left, right)
    if isinstance(node, (nodes.Neg, nodes.Pos, nodes.Not)):
        inner = _fast_expr(node.node)
        if inner is None:
            return None
        if isinstance(node, nodes.Not):
            return lambda ctx: not _scalar(inner(ctx))
        if isinstance(node, nodes.Neg):
            return lambda ctx: -_number(inner(ctx))
        return lambda ctx: +_number(inner(ctx))
    if isinstance(node, (nodes.And, nodes.Or)):
        left, right = _fast_expr(node.left), _fast_expr(node.right)
        if left is None or right is None:
            return None
        if isinstance(node, nodes.And):
            return lambda ctx: _scalar(left(ctx)) and right(ctx)
        return lambda ctx: _scalar(left(ctx)) or right(ctx)
    if isinstance(node, nodes.CondExpr):
        if node.expr2 is None:  # Jinja gives an undefined value there
            return None
        test, yes, no = _fast_expr(node.test), _fast_expr(node.expr1), _fast_expr(node.expr2)
        if test is None or yes is None or no is None:
            return None
        return lambda ctx: yes(ctx) if _scalar(test(ctx)) else no(ctx)
    if isinstance(node, nodes.Concat):
        return _fast_concat(node)
    if isinstance(node, nodes.Compare):
        return _fast_compare(node)
    return None


def _fast_lookup(node: nodes.Name | nodes.Getattr | nodes.Getitem) -> _Fn | None:
    """``request.a["b"][0]``: item-first, as the sandbox looks up attributes of mappings."""
    keys: list[str | int] = []
    cur: nodes.Node = node
    while isinstance(cur, (nodes.Getattr, nodes.Getitem)):
        if isinstance(cur, nodes.Getattr):
            keys.append(cur.attr)
        elif isinstance(cur.arg, nodes.Const) and type(cur.arg.value) in (str, int):
            keys.append(cur.arg.value)
        else:
            return None
        cur = cur.node
    if not isinstance(cur, nodes.Name) or cur.name not in _FAST_ROOTS:
        return None
    if any(isinstance(k, str) and k.startswith("_") for k in keys):
        return None
    name, path = cur.name, tuple(reversed(keys))

    def lookup(ctx: dict[str, Any]) -> Any:
        value = ctx.get(name, _MISSING)
        if value is _MISSING:
            raise _Fallback
        for key in path:
            kind = type(value)  # exact types first: the Mapping ABC check is the slow part
            if kind is View or kind is dict or isinstance(value, Mapping):
                if key in value:
                    value = value[key]
                    continue
                # A field by its JSON name (request.orderId), as the view's __missing__ resolves it
                field = value.info.fields.get(key) if kind is View else None
                if field is None or field.name not in value:
                    raise _Fallback
                value = dict.__getitem__(value, field.name)
            elif type(key) is int and type(value) is list and -len(value) <= key < len(value):
                value = value[key]
            else:
                raise _Fallback
        return value

    return lookup


def _fast_binop(op: str, left: _Fn, right: _Fn) -> _Fn:
    if op == "Add":

        def add(ctx: dict[str, Any]) -> Any:
            a, b = left(ctx), right(ctx)
            if type(a) is str and type(b) is str:
                if len(a) + len(b) > MAX_TEXT:
                    raise _Fallback
                return a + b
            return _number(a) + _number(b)

        return add
    if op == "Sub":
        return lambda ctx: _number(left(ctx)) - _number(right(ctx))
    if op == "Mul":

        def mul(ctx: dict[str, Any]) -> Any:
            a, b = _number(left(ctx)), _number(right(ctx))
            if type(a) is int and type(b) is int and a.bit_length() + b.bit_length() > MAX_INT_BITS:
                raise _Fallback
            return a * b

        return mul
    python = {"Div": operator.truediv, "FloorDiv": operator.floordiv, "Mod": operator.mod}[op]

    def divide(ctx: dict[str, Any]) -> Any:
        a, b = _number(left(ctx)), _number(right(ctx))
        if not b:
            raise _Fallback  # Jinja's own error for a division by zero
        return python(a, b)

    return divide


def _fast_concat(node: nodes.Concat) -> _Fn | None:
    fns = [_fast_expr(n) for n in node.nodes]
    pieces = tuple(fn for fn in fns if fn is not None)
    if len(pieces) != len(fns):
        return None

    def concat(ctx: dict[str, Any]) -> str:
        text = "".join([_text_of(fn(ctx)) for fn in pieces])
        if len(text) > MAX_TEXT:
            raise _Fallback
        return text

    return concat


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "lteq": operator.le,
    "gt": operator.gt,
    "gteq": operator.ge,
}


def _fast_compare(node: nodes.Compare) -> _Fn | None:
    first = _fast_expr(node.expr)
    ops: list[tuple[Callable[[Any, Any], bool], bool, _Fn]] = []
    for operand in node.ops:
        test, fn = _COMPARISONS.get(operand.op), _fast_expr(operand.expr)
        if test is None or fn is None:
            return None
        ops.append((test, operand.op in ("eq", "ne"), fn))
    if first is None:
        return None

    def compare(ctx: dict[str, Any]) -> bool:
        a = _scalar(first(ctx))
        for test, equality, fn in ops:  # a < b < c is (a < b) and (b < c), each operand computed once
            b = _scalar(fn(ctx))
            if not equality and not (
                (type(a) is str and type(b) is str) or (type(a) in (int, float) and type(b) in (int, float))
            ):
                raise _Fallback  # Jinja's TypeError for ordering mixed types
            if not test(a, b):
                return False
            a = b
        return True

    return compare


def _single_expression(ast: nodes.Template) -> nodes.Expr | None:
    """The expression of a template that is just ``{{ expr }}`` (whitespace around allowed), else None."""
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    exprs = [n for n in ast.body[0].nodes if not (isinstance(n, nodes.TemplateData) and not n.data.strip())]
    if len(exprs) == 1 and not isinstance(exprs[0], nodes.TemplateData):
        return exprs[0]
    return None


def _compile_at(source: str, site: Site, node: Any, key: Any, path: str) -> _Compiled | _Fast | None:
    try:
        compiled = _compile_source(source)
    except TemplateSyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno and exc.lineno > 1 else ""
        site.error(node, key, f"{path}: template error: {(exc.message or 'syntax error').rstrip('.')}{where}")
    except (JinjaError, SecurityError, ValueError, RecursionError) as exc:
        site.error(node, key, f"{path}: template error: {_error_text(exc)}")
    else:
        uses = _data_uses.get()
        if uses is not None:
            line = site.line_of(node, key)
            uses.extend(DataUse(name, site.file, line, path=path) for name in compiled.collections)
        desc = _request_type.get()
        if desc is None or not compiled.lookups:
            return compiled
        wrong = [text for text in (_check_lookup(look, desc) for look in compiled.lookups) if text]
        for text in dict.fromkeys(wrong):  # the same mistake twice in one template: said once
            site.error(node, key, f"{path}: {text}")
        return None if wrong else compiled
    return None


def _run(path: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs a render step under the step budget; every failure becomes a TemplateError naming ``path``."""
    opened = open_budget()
    try:
        return fn(*args)
    except (TemplateError, Refusal):  # a refusal: a record looked up by a key that is not there
        raise
    except ConversionError as exc:
        raise TemplateError(str(exc) if exc.path else f"{path}: {exc.message}") from None
    except Exception as exc:
        raise TemplateError(f"{path}: {_error_text(exc)}") from None
    finally:
        if opened:
            close_budget()


# -- request fields named by templates, checked against the method's input type at load

# The input type of the method whose rule is being compiled: the loader sets it (request_type) around a
# rule, so replies, statuses and metadata of files, admin text and session rules are all checked alike.
_request_type: ContextVar[Descriptor | None] = ContextVar("virtsvc_request_type", default=None)


@contextmanager
def request_type(descriptor: Descriptor | None) -> Iterator[None]:
    """Templates compiled inside check their ``request.x`` / ``requests[i].x`` look-ups against
    ``descriptor`` (a method's input type): a field it does not have is a located problem."""
    token = _request_type.set(descriptor)
    try:
        yield
    finally:
        _request_type.reset(token)


# -- data collections named by templates, and the message types their records fill (for virtsvc check)

_data_uses: ContextVar[list[DataUse] | None] = ContextVar("virtsvc_data_uses", default=None)


@contextmanager
def data_uses() -> Iterator[list[DataUse]]:
    """Collects, for templates compiled inside, every ``data.<collection>`` they name and the message type
    a template that yields records fills (``reply: "{{ data.items[request.sku] }}"`` fills the output)."""
    found: list[DataUse] = []
    token = _data_uses.set(found)
    try:
        yield found
    finally:
        _data_uses.reset(token)


# Filters after which a value is still made of the collection's records.
_RECORD_FILTERS = frozenset(
    {"list", "first", "last", "sort", "unique", "reject", "rejectattr", "select", "selectattr", "reverse",
     "random"}
)  # fmt: skip


def _collection_named(node: nodes.Node) -> str | None:
    """``data.items`` or ``data["items"]``: the collection's name."""
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) and node.node.name == "data":
        return node.attr
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and node.node.name == "data"
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        return node.arg.value
    return None


def _data_refs(ast: nodes.Template, expr: nodes.Expr | None) -> tuple[tuple[str, ...], str | None]:
    """The collections a template names, and the one whose records its single expression yields."""
    if any(n.name == "data" and n.ctx != "load" for n in ast.find_all(nodes.Name)):
        return (), None  # a template that assigns ``data`` itself means something else by it
    names = [c for n in ast.find_all((nodes.Getattr, nodes.Getitem)) if (c := _collection_named(n))]
    records_of = None
    node: Any = expr
    while node is not None:
        named = _collection_named(node)
        if named is not None:
            records_of = named
            break
        if isinstance(node, nodes.Filter) and node.name in _RECORD_FILTERS:
            node = node.node
        elif isinstance(node, nodes.Getitem):
            node = node.node  # data.items[key], (data.items|list)[0], data.items[:3]
        elif isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name) and node.node.name == "pick":
            node = node.args[0] if node.args else None
        elif (
            isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr) and node.node.attr == "get"
        ):
            node = node.node.node  # data.items.get(key)
        else:
            node = None
    return tuple(dict.fromkeys(names)), records_of


def _fills(ev: Any, desc: Descriptor | None, site: Site, node: Any, key: Any, path: str) -> None:
    """Notes that a template yielding records of a collection fills a message of type ``desc``."""
    uses = _data_uses.get()
    records_of = getattr(ev, "records_of", None)
    if uses is None or records_of is None or desc is None or desc.full_name in SPECIAL_TYPES:
        return
    uses.append(DataUse(records_of, site.file, site.line_of(node, key), desc, path))


def compile_tree(value: Any, site: Site, node: Any, key: Any, path: str) -> Any:
    """A JSON tree whose strings may be templates (a generated data set's override): an evaluator with
    ``names``, False when it holds no template, None (with located problems) when one is wrong."""
    return _Builder(site).evaluator(value, True, node, key, path)


def evaluate_tree(evaluator: Any, ctx: dict[str, Any], path: str) -> Any:
    """The tree's value in ``ctx`` (see :func:`generation_context`); TemplateError naming ``path``."""
    return _run(path, evaluator.evaluate, ctx)


# One step of a look-up: ("attr", name) for .name, ("key", name) for ["name"], ("index", text) for any
# other subscript (a number, a variable: fine on a list), ("stop", "") where nothing more can be known.
_LookupStep = tuple[str, str]


@dataclass(frozen=True)
class _Lookup:
    """``request.lines[0].sku`` as written: the root it starts from, its steps, and how to show it."""

    root: str  # "request" (one message) or "requests" (a list of them)
    steps: tuple[_LookupStep, ...]
    start: int  # steps before this one are a loop's iterable, checked (and reported) as a look-up of its own
    shown: str  # the variable the look-up starts from, as written (``request``, or a loop variable)
    line: int  # line within the template


_Scope = dict[str, tuple[str, tuple[_LookupStep, ...]]]


def _request_lookups(ast: nodes.Template) -> tuple[_Lookup, ...]:
    """Every look-up rooted at ``request`` or ``requests`` (or at a loop variable over one of their lists)."""
    stored = {n.name for n in ast.find_all(nodes.Name) if n.ctx != "load"}
    # A template that assigns ``request`` itself (set, a loop, a macro parameter) means something else by it.
    scope: _Scope = {root: (root, ()) for root in _REQUEST_NAMES if root not in stored}
    out: list[_Lookup] = []
    if scope:
        _walk(ast, scope, out)
    return tuple(out)


def _chain(node: nodes.Node) -> tuple[nodes.Node, list[_LookupStep], list[nodes.Node]]:
    """The base of ``a.b["c"][i]``, its steps in order, and the subscript expressions to walk on."""
    steps: list[_LookupStep] = []
    args: list[nodes.Node] = []
    while isinstance(node, (nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            steps.append(("attr", node.attr))
        else:
            arg = node.arg
            if isinstance(arg, nodes.Const) and isinstance(arg.value, str):
                steps.append(("key", arg.value))
            elif isinstance(arg, nodes.Const) and type(arg.value) is int:
                steps.append(("index", str(arg.value)))
            elif isinstance(arg, nodes.Slice):
                steps.append(("stop", ""))  # a slice of a list: what follows is not checked
                args.append(arg)
            else:
                steps.append(("index", arg.name if isinstance(arg, nodes.Name) else "..."))
                args.append(arg)
        node = node.node
    steps.reverse()
    return node, steps, args


def _resolve(node: nodes.Node, scope: _Scope) -> tuple[str, tuple[_LookupStep, ...], str, int] | None:
    """(root, steps, shown, start) of a plain look-up on a name in scope, else None."""
    base, steps, _ = _chain(node)
    if isinstance(base, nodes.Name) and base.ctx == "load" and base.name in scope:
        root, prefix = scope[base.name]
        return root, prefix + tuple(steps), base.name, len(prefix)
    return None


def _walk(node: nodes.Node, scope: _Scope, out: list[_Lookup]) -> None:
    if isinstance(node, (nodes.Getattr, nodes.Getitem)):
        found = _resolve(node, scope)
        if found is not None:
            root, steps, shown, start = found
            out.append(_Lookup(root, steps, start, shown, node.lineno))
            for arg in _chain(node)[2]:
                _walk(arg, scope, out)
            return
    if isinstance(node, nodes.For):
        _walk(node.iter, scope, out)
        inner = dict(scope)
        target = node.target
        for name in [target, *target.find_all(nodes.Name)]:
            if isinstance(name, nodes.Name):
                inner.pop(name.name, None)
        iterable = _resolve(node.iter, scope)  # a loop over requests, or over a list field of them
        if iterable is not None and isinstance(target, nodes.Name):
            reassigned = any(
                n.name == target.name and n.ctx != "load" for b in node.body for n in b.find_all(nodes.Name)
            )
            if not reassigned:
                root, steps, _, _ = iterable
                inner[target.name] = (root, (*steps, ("index", "")))
        for child in node.body:
            _walk(child, inner, out)
        if node.test is not None:
            _walk(node.test, inner, out)
        for child in node.else_:
            _walk(child, scope, out)
        return
    for child in node.iter_child_nodes():
        _walk(child, scope, out)


def _show_step(step: _LookupStep) -> str:
    kind, value = step
    if kind == "attr":
        return f".{value}"
    if kind == "key":
        return f"[{json.dumps(value)}]"
    return f"[{value}]"


def _check_lookup(look: _Lookup, descriptor: Descriptor) -> str | None:
    """What is wrong with one look-up on requests of ``descriptor``, or None (also when nothing is known)."""
    # Where the walk stands: a message type, or a list whose elements are of that type (None: not messages).
    desc: Descriptor | None = descriptor
    is_list = look.root == "requests"
    if not is_list and descriptor.full_name in SPECIAL_TYPES and descriptor.full_name != EMPTY:
        return None  # a request that is itself a well-known type has its special JSON form, not fields
    for i, step in enumerate(look.steps):
        kind, name = step
        if kind == "stop":
            return None
        if is_list:
            if kind != "index":
                return None  # a list's method (or its own error at run time)
            is_list = False
            if desc is None:
                return None
            continue
        assert desc is not None
        if kind == "index":
            return None  # a message under a computed key: cannot be known here
        info = message_info(desc)
        field = info.fields.get(name)
        if field is None:
            if kind == "attr" and hasattr(dict, name):
                return None  # request.get(...), request.items(): the mapping's own methods
            if i < look.start:
                return None  # the loop's iterable, reported as a look-up of its own
            shown = look.shown + "".join(_show_step(s) for s in look.steps[look.start : i + 1])
            close = _text.closest(name, info.fields)
            if close:
                hint = f" ({_text.alternatives(close)})"
            elif info.names:
                hint = "; its fields are " + ", ".join(info.names)
            else:
                hint = "; it has no fields"
            where = f" (line {look.line})" if look.line > 1 else ""
            return f'{shown}: {desc.full_name} has no field "{name}"{hint}{where}'
        if is_map(field):
            return None  # any key may be there
        mt = field.message_type
        if mt is not None and mt.full_name in SPECIAL_TYPES:
            return None  # a well-known type: its JSON form (text, a JSON tree) is not its fields
        if field.is_repeated:
            desc, is_list = mt, True
        elif mt is not None:
            desc = mt
        else:
            return None  # a scalar: what follows is its own methods (request.sku.upper())
    return None


# -- text templates


@dataclass(frozen=True)
class _StaticText:
    static: str
    needs_request = False

    def render(self, call: Call, index: int) -> str:
        return self.static


class _TextTemplate:
    static: str | None = None

    def __init__(self, compiled: _Compiled | _Fast, path: str) -> None:
        self._compiled = compiled
        self._path = path
        self.needs_request = bool(compiled.names & _REQUEST_NAMES)

    def render(self, call: Call, index: int) -> str:
        def go() -> str:
            value = self._compiled.evaluate(_context(call, index, self._compiled.names))
            return (
                to_str(value, False, "")
                if not isinstance(value, (Mapping, list, tuple))
                else show(value, MAX_TEXT)
            )

        return _run(self._path, go)


def static_text(s: str) -> TextTemplate:
    """A text that is used as is."""
    return _StaticText(s)


def compile_text(value: Any, site: Site, node: Any, key: Any, path: str) -> TextTemplate | None:
    """A status message or header/trailer value: text (numbers and booleans count as text) or a template."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        site.error(node, key, f"{path}: expected text, got {show(value)}")
        return None
    if not is_template(value):
        return _StaticText(value)
    compiled = _compile_at(value, site, node, key, path)
    return None if compiled is None else _TextTemplate(compiled, path)


# -- reply bodies


_Nav = Callable[[Any], Any]
_Assign = Callable[[Any, Any], None]


@dataclass(frozen=True)
class _Leaf:
    steps: tuple[_Nav, ...]  # from the root message to the message holding the value
    assign: _Assign
    evaluator: _Evaluator
    path: str

    def apply(self, msg: Message, ctx: dict[str, Any]) -> None:
        target: Any = msg
        for step in self.steps:
            target = step(target)
        try:
            value = self.evaluator.evaluate(ctx)
            self.assign(target, value)
        except (TemplateError, Refusal):
            raise
        except ConversionError as exc:
            raise TemplateError(str(exc) if exc.path else f"{self.path}: {exc.message}") from None
        except Exception as exc:
            raise TemplateError(f"{self.path}: {_error_text(exc)}") from None


def _step_field(name: str) -> _Nav:
    return lambda m: getattr(m, name)


def _step_index(name: str, i: int) -> _Nav:
    return lambda m: getattr(m, name)[i]


def _step_key(name: str, k: Any) -> _Nav:
    return lambda m: getattr(m, name)[k]


def _assign_field(field: FieldDescriptor, path: str) -> _Assign:
    def assign(target: Any, value: Any) -> None:
        set_field(target, field, value, False, path)

    if field.is_repeated or field.message_type is not None:
        return assign
    # Singular text and integer fields given a value of their own type (what templates mostly yield):
    # set directly; anything else converts (or fails) through set_field.
    name = field.name
    if field.type == F.TYPE_STRING:

        def assign_text(target: Any, value: Any) -> None:
            if type(value) is str:
                setattr(target, name, value)
            else:
                assign(target, value)

        return assign_text
    if field.type in INT_RANGES:
        lo, hi, _ = INT_RANGES[field.type]

        def assign_int(target: Any, value: Any) -> None:
            if type(value) is int and lo <= value <= hi:
                setattr(target, name, value)
            else:
                assign(target, value)

        return assign_int
    return assign


def _assign_root(path: str) -> _Assign:
    def assign(target: Any, value: Any) -> None:
        target.Clear()
        if isinstance(value, Message) and value.DESCRIPTOR.full_name == target.DESCRIPTOR.full_name:
            target.MergeFromString(value.SerializeToString())
        elif value is not None:
            fill_message(target, value, False, path)

    return assign


def _assign_element(field: FieldDescriptor, i: int, path: str) -> _Assign:
    if field.message_type is not None:

        def assign_msg(target: Any, value: Any) -> None:
            sub = getattr(target, field.name)[i]
            sub.Clear()
            if value is not None:
                fill_message(sub, value, False, path)

        return assign_msg

    def assign(target: Any, value: Any) -> None:
        getattr(target, field.name)[i] = convert_scalar(field, value, False, path)

    return assign


def _assign_map_value(field: FieldDescriptor, key: Any, path: str) -> _Assign:
    kf = field.message_type.fields_by_name["key"]
    vf = field.message_type.fields_by_name["value"]

    def assign(target: Any, value: Any) -> None:
        set_map_value(getattr(target, field.name), kf, vf, key, value, False, path)

    return assign


def _placeholder(field: FieldDescriptor) -> Any:
    if field.enum_type is not None:
        return 0
    value = element_default(field)
    if field.type in INT64_TYPES:
        return 0
    if field.type == F.TYPE_BYTES:
        return b""
    return value


class _Builder:
    """Walks a reply body once: reports problems, fills the static skeleton, collects templated leaves."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.leaves: list[_Leaf] = []

    def evaluator(
        self, value: Any, json_tree: bool, node: Any, key: Any, path: str
    ) -> _Evaluator | bool | None:
        """The evaluator for a templated value; False when the value holds no template."""
        if is_template(value):
            return _compile_at(value, self.site, node, key, path)
        if json_tree and _has_template(value):
            names: set[str] = set()
            ok = True

            def walk(v: Any, parent: Any, k: Any, p: str) -> Any:
                nonlocal ok
                if is_template(v):
                    c = _compile_at(v, self.site, parent, k, p)
                    if c is None:
                        ok = False
                        return None
                    names.update(c.names)
                    return c
                if isinstance(v, Mapping):
                    return {kk: walk(vv, v, kk, f"{p}.{kk}") for kk, vv in v.items()}
                if isinstance(v, list):
                    return [walk(vv, v, i, f"{p}[{i}]") for i, vv in enumerate(v)]
                return v

            tree = walk(value, node, key, path)
            return _Tree(tree, frozenset(names)) if ok else None
        return False

    def message(self, msg: Message, value: Mapping[Any, Any], path: str, steps: tuple[_Nav, ...]) -> None:
        oneofs: dict[str, str] = {}
        for key, field, v, kpath in named_fields(msg.DESCRIPTOR, value, path, self.site):
            oneof = field.containing_oneof
            if oneof is not None and v is not None:
                if oneof.name in oneofs:
                    self.site.error(
                        value, key, f"{kpath}: {oneof_message(oneofs[oneof.name], key, oneof.name)}"
                    )
                    continue
                oneofs[oneof.name] = key
            self.field(msg, field, v, value, key, kpath, steps)

    def field(self, msg: Message, field: FieldDescriptor, v: Any, node: Any, key: Any, path: str,
              steps: tuple[_Nav, ...]) -> None:  # fmt: skip
        if v is None and not takes_null(field):
            return
        special = special_type(field)
        ev = self.evaluator(v, special in JSON_TYPES and not field.is_repeated, node, key, path)
        if ev is not False:
            if ev is not None:
                assert isinstance(ev, _Evaluator)
                _fills(ev, field.message_type, self.site, node, key, path)
                self.leaves.append(_Leaf(steps, _assign_field(field, path), ev, path))
            return
        if is_map(field):
            self.map_field(msg, field, v, node, key, path, steps)
        elif field.is_repeated:
            self.list_field(msg, field, v, node, key, path, steps)
        elif field.message_type is not None and special is None and isinstance(v, Mapping):
            sub = getattr(msg, field.name)
            sub.SetInParent()  # present even if every field inside is templated and renders a default
            self.message(sub, v, path, (*steps, _step_field(field.name)))
        else:
            try:
                set_field(msg, field, v, True, path)
            except ConversionError as exc:
                self.site.error(node, key, str(exc))

    def list_field(self, msg: Message, field: FieldDescriptor, v: Any, node: Any, key: Any, path: str,
                   steps: tuple[_Nav, ...]) -> None:  # fmt: skip
        if not isinstance(v, list):
            self.site.error(node, key, f"{path}: expected a list ({type_name(field)}), got {show(v)}")
            return
        container = getattr(msg, field.name)
        special = special_type(field)
        is_msg = field.message_type is not None
        for i, item in enumerate(v):
            ipath = f"{path}[{i}]"
            ev = self.evaluator(item, special in JSON_TYPES, v, i, ipath)
            if ev is not False:
                # a placeholder keeps the indexes of the skeleton aligned with the list as written
                container.add() if is_msg else container.append(_placeholder(field))
                if ev is not None:
                    assert isinstance(ev, _Evaluator)
                    _fills(ev, field.message_type, self.site, v, i, ipath)
                    self.leaves.append(_Leaf(steps, _assign_element(field, i, ipath), ev, ipath))
            elif is_msg and special is None and isinstance(item, Mapping):
                self.message(container.add(), item, ipath, (*steps, _step_index(field.name, i)))
            else:
                try:
                    if is_msg:
                        fill_message(container.add(), item, True, ipath)
                    else:
                        container.append(convert_scalar(field, item, True, ipath))
                except ConversionError as exc:
                    self.site.error(v, i, str(exc))

    def map_field(self, msg: Message, field: FieldDescriptor, v: Any, node: Any, key: Any, path: str,
                  steps: tuple[_Nav, ...]) -> None:  # fmt: skip
        if not isinstance(v, Mapping):
            self.site.error(node, key, f"{path}: expected a mapping ({type_name(field)}), got {show(v)}")
            return
        container = getattr(msg, field.name)
        kf = field.message_type.fields_by_name["key"]
        vf = field.message_type.fields_by_name["value"]
        special = special_type(vf)
        for mk, mv in v.items():
            epath = f"{path}.{mk}"
            try:
                k = map_key(kf, mk, epath)
            except ConversionError as exc:
                self.site.error(v, mk, str(exc))
                continue
            ev = self.evaluator(mv, special in JSON_TYPES, v, mk, epath)
            if ev is not False:
                if ev is not None:
                    assert isinstance(ev, _Evaluator)
                    self.leaves.append(_Leaf(steps, _assign_map_value(field, k, epath), ev, epath))
            elif vf.message_type is not None and special is None and isinstance(mv, Mapping):
                self.message(container[k], mv, epath, (*steps, _step_key(field.name, k)))
            else:
                try:
                    set_map_value(container, kf, vf, mk, mv, True, epath)
                except ConversionError as exc:
                    self.site.error(v, mk, str(exc))


class DataTemplate:
    """Plain data (a rule an effect puts) whose strings may be templates: ``render`` gives the data with
    each template evaluated (a single ``{{ expr }}`` keeps its value's type, a number stays a number)."""

    def __init__(self, tree: Any, names: frozenset[str], path: str) -> None:
        self._tree = tree
        self._names = names
        self._path = path

    def render(self, call: Call, index: int) -> Any:
        return _run(self._path, lambda: _eval_tree(self._tree, _context(call, index, self._names)))


def compile_data(value: Any, site: Site, path: str) -> DataTemplate | None:
    """Compiles every template string in ``value`` (problems located at their keys); None on a problem."""
    before = len(site.problems.items)
    names: set[str] = set()

    def walk(node: Any, parent: Any, key: Any, where: str) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(v, node, k, f"{where}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, node, i, f"{where}[{i}]") for i, v in enumerate(node)]
        if is_template(node):
            compiled = _compile_at(node, site, parent, key, where)
            if compiled is not None:
                names.update(compiled.names)
            return compiled
        return node

    tree = walk(value, None, None, path)
    if len(site.problems.items) != before:
        return None
    return DataTemplate(tree, frozenset(names), path)


def has_template(value: Any) -> bool:
    """Whether any string in ``value`` (data of dicts and lists) holds a template."""
    return _has_template(value)


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return is_template(value)
    if isinstance(value, Mapping):
        return any(_has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_template(v) for v in value)
    return False


class _StaticMessage:
    """A body without templates: serialised once, at load."""

    needs_request = False

    def __init__(self, data: bytes, json_body: dict[str, Any]) -> None:
        self.static: bytes | None = data
        self._data = data
        self._json = json_body

    def render(self, call: Call, index: int) -> bytes:
        return self._data

    def render_json(self, call: Call, index: int) -> dict[str, Any]:
        return json.loads(json.dumps(self._json))  # a copy the caller may change


class _TemplatedMessage:
    """A body with templated leaves over a pre-serialised skeleton."""

    static: bytes | None = None

    def __init__(self, cls: type[Message], skeleton: bytes, leaves: tuple[_Leaf, ...], path: str) -> None:
        self._cls = cls
        self._skeleton = skeleton
        self._leaves = leaves
        self._path = path
        self._names = frozenset().union(*(leaf.evaluator.names for leaf in leaves))
        self.needs_request = bool(self._names & _REQUEST_NAMES)
        self._memo_key = f"_virtsvc_body_{id(self)}"

    def build(self, call: Call, index: int) -> Message:
        """The rendered message, once per (call, index): the bytes sent and the JSON journalled agree."""
        # Only the latest message per template is kept, so a long bidi stream does not pile them up.
        memo = call.__dict__
        last = memo.get(self._memo_key)
        if last is not None and last[0] == index:
            return last[1]
        msg: Message = _run(self._path, self._fill, call, index)
        memo[self._memo_key] = (index, msg)
        return msg

    def _fill(self, call: Call, index: int) -> Message:
        out = self._cls()
        if self._skeleton:
            out.ParseFromString(self._skeleton)
        ctx = _context(call, index, self._names)
        for leaf in self._leaves:
            leaf.apply(out, ctx)
        return out

    def render(self, call: Call, index: int) -> bytes:
        return self.build(call, index).SerializeToString(deterministic=True)

    def render_json(self, call: Call, index: int) -> dict[str, Any]:
        return to_json(self.build(call, index))


def compile_message(
    value: Any, descriptor: Descriptor, site: Site, path: str = "reply"
) -> MessageTemplate | None:
    """Validates and compiles a reply body for ``descriptor``; None (with located problems) if it is wrong."""
    before = len(site.problems.items)
    cls = message_class(descriptor)
    root = cls()
    builder = _Builder(site)
    if isinstance(value, str) and is_template(value):
        compiled = _compile_at(value, site, value, None, path)
        if compiled is not None:
            if not compiled.native:
                site.error(
                    value,
                    None,
                    f"{path}: a whole {descriptor.full_name} is one expression such as "
                    '"{{ record }}", not text',
                )
            else:
                _fills(compiled, descriptor, site, value, None, path)
                builder.leaves.append(_Leaf((), _assign_root(path), compiled, path))
    elif value is None:
        pass
    elif isinstance(value, Mapping) and descriptor.full_name not in SPECIAL_TYPES:
        builder.message(root, value, path, ())
    else:
        try:
            fill_message(root, value, True, path)
        except ConversionError as exc:
            site.error(value, None, str(exc))
    if len(site.problems.items) > before:
        return None
    data = root.SerializeToString(deterministic=True)
    if not builder.leaves:
        return _StaticMessage(data, to_json(root))
    return _TemplatedMessage(cls, data, tuple(builder.leaves), path)
