"""GripMock's Go ``text/template`` strings -> virtsvc's Jinja2 templates.

Only the expression subset GripMock's stubs use is translated: actions made of the request fields
(``.Request``, ``.Requests``, ``.MessageIndex``, ``.Headers``), literals, parentheses, pipes and the helper
functions (``index len split join extract sum mul avg min max div floor ceil round add sub mod upper lower
title uuid now``, the faker keys, ``uuid2int64``/``uuid2base64``). Control actions (``if``, ``range``,
``with``, variables) raise :class:`GoTemplateError`, which the importer reports at the stub's line.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GoTemplateError", "has_actions", "load_time_value", "translate"]

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<open>\()|(?P<close>\))|(?P<pipe>\|)|(?P<assign>:?=)
    | (?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<var>\$[A-Za-z0-9_]*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    )""",
    re.X,
)
_ROOTS = {"Request": "request", "Requests": "requests", "MessageIndex": "index", "Headers": "metadata"}
_CONTROL = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}

# faker keys -> the Jinja expression of a value of that kind (``fake(kind)`` draws from Faker, seeded
# per session); arguments, where a key takes them, are appended by _faker
_FAKER: dict[str, str] = {
    "Person.FirstName": 'fake("first_name")',
    "Person.LastName": 'fake("last_name")',
    "Person.Name": 'fake("name")',
    "Person.Username": 'fake("user_name")',
    "Contact.Email": 'fake("email")',
    "Contact.Phone": 'fake("phone")',
    "Geo.City": 'fake("city")',
    "Geo.Country": 'fake("country")',
    "Geo.Latitude": 'fake("latitude")',
    "Geo.Longitude": 'fake("longitude")',
    "Address.City": 'fake("city")',
    "Address.Street": 'fake("street")',
    "Address.PostCode": 'fake("postcode")',
    "Network.IPv4": 'fake("ipv4")',
    "Network.URL": 'fake("url")',
    "Network.UserAgent": 'fake("user_agent")',
    "Company.Company": 'fake("company")',
    "Commerce.ProductName": 'fake("product")',
    "Commerce.CurrencyShort": 'fake("currency_code")',
    "Text.Paragraph": 'fake("paragraph")',
    "Text.Sentence": 'fake("sentence")',
    "Text.Word": 'fake("word")',
    "DateTime.Date": 'fake("date")',
    "DateTime.PastDate": 'fake("past_date")',
    "DateTime.FutureDate": 'fake("future_date")',
    "Identity.UUID": "uuid()",
}
_FAKER_RANGES = {
    "Number.IntRange": "randint({0}, {1})",
    "Commerce.Price": "randint({0} * 100, {1} * 100) / 100",
}


class GoTemplateError(ValueError):
    """A Go template construct with no translation."""


def has_actions(text: str) -> bool:
    return "{{" in text


def load_time_value(function: str, argument: str) -> object:
    """What GripMock's load-time ``uuid2int64``/``uuid2base64`` make of a UUID's text."""
    try:
        raw = uuid.UUID(argument).bytes
    except ValueError:
        raise GoTemplateError(f"{function}: {argument!r} is not a UUID") from None
    if function == "uuid2int64":  # each half little-endian, as GripMock packs them
        high, low = struct.unpack("<qq", raw)
        return {"high": high, "low": low}
    return base64.b64encode(raw).decode("ascii")


def translate(text: str) -> str:
    """``text`` with each ``{{ action }}`` turned into its Jinja2 equivalent; literal text kept as is."""
    out: list[str] = []
    pos = 0
    for m in _ACTION.finditer(text):
        literal = text[pos : m.start()]
        if m.group(1):
            literal = literal.rstrip()
        out.append(_literal(literal))
        out.append("{{ " + _Parser(m.group(2)).translate() + " }}")
        pos = m.end()
        if m.group(3):
            rest = text[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(_literal(text[pos:]))
    return "".join(out)


def _literal(text: str) -> str:
    if "{%" in text or "{#" in text or "}}" in text:
        return "{{ " + json.dumps(text) + " }}"
    return text


@dataclass
class _Token:
    kind: str
    text: str


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source.strip()
        self.tokens = self._tokens(self.source)
        self.pos = 0

    def _tokens(self, source: str) -> list[_Token]:
        tokens: list[_Token] = []
        pos = 0
        while pos < len(source):
            if source[pos:].strip() == "":
                break
            m = _TOKEN.match(source, pos)
            if m is None or m.end() == pos:
                raise GoTemplateError(f"cannot read {source[pos:].strip()!r} in {{{{ {self.source} }}}}")
            kind = m.lastgroup or ""
            tokens.append(_Token(kind, m.group(kind)))
            pos = m.end()
        return tokens

    def translate(self) -> str:
        if not self.tokens:
            raise GoTemplateError("an empty {{ }} action")
        first = self.tokens[0]
        if first.kind == "ident" and first.text in _CONTROL:
            raise GoTemplateError(f"{{{{ {first.text} }}}} actions are not translated (only expressions are)")
        if first.kind == "var" or any(t.kind == "var" for t in self.tokens):
            raise GoTemplateError(f"template variables are not translated: {{{{ {self.source} }}}}")
        expr = self.pipeline()
        if self.pos != len(self.tokens):
            raise GoTemplateError(f"unexpected {self.tokens[self.pos].text!r} in {{{{ {self.source} }}}}")
        return expr

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def pipeline(self) -> str:
        expr = self.command(None)
        while (tok := self.peek()) is not None and tok.kind == "pipe":
            self.pos += 1
            expr = self.command(expr)
        return expr

    def command(self, piped: str | None) -> str:
        tok = self.peek()
        if tok is None:
            raise GoTemplateError(f"an expression is missing in {{{{ {self.source} }}}}")
        if tok.kind == "ident" and tok.text not in ("true", "false", "nil"):
            self.pos += 1
            args = self.arguments()
            if piped is not None:
                args.append(piped)
            return _call(tok.text, args)
        value = self.term()
        if piped is not None or self.arguments():
            raise GoTemplateError(f"{value} is not a function, in {{{{ {self.source} }}}}")
        return value

    def arguments(self) -> list[str]:
        args: list[str] = []
        while (tok := self.peek()) is not None and tok.kind not in ("close", "pipe"):
            args.append(self.term())
        return args

    def term(self) -> str:
        tok = self.peek()
        assert tok is not None
        self.pos += 1
        if tok.kind == "open":
            inner = self.pipeline()
            close = self.peek()
            if close is None or close.kind != "close":
                raise GoTemplateError(f"a ')' is missing in {{{{ {self.source} }}}}")
            self.pos += 1
            nxt = self.peek()
            if nxt is not None and nxt.kind == "field" and nxt.text != ".":
                self.pos += 1
                return _base(inner) + nxt.text
            return f"({inner})" if _top_level(inner, " ") else inner
        if tok.kind == "field":
            return _field(tok.text)
        if tok.kind == "str":
            return json.dumps(json.loads(tok.text))
        if tok.kind == "raw":
            return json.dumps(tok.text[1:-1])
        if tok.kind == "num":
            return tok.text
        if tok.kind == "ident":
            if tok.text in ("true", "false"):
                return tok.text
            if tok.text == "nil":
                return "none"
            return _call(tok.text, [])  # a function of no arguments as an operand (uuid, now, faker keys)
        raise GoTemplateError(f"unexpected {tok.text!r} in {{{{ {self.source} }}}}")


def _field(chain: str) -> str:
    if chain == ".":
        raise GoTemplateError("`.` (the whole context) is not translated; name a field such as .Request.id")
    root, *rest = chain[1:].split(".")
    name = _ROOTS.get(root)
    if name is None:
        raise GoTemplateError(
            f"unknown template field .{root} (GripMock's are {', '.join('.' + r for r in _ROOTS)})"
        )
    return ".".join([name, *rest])


def _top_level(expr: str, chars: str) -> bool:
    """Whether ``expr`` has one of ``chars`` outside brackets and string literals."""
    depth, quote = 0, ""
    for i, c in enumerate(expr):
        if quote:
            if c == quote and expr[i - 1] != "\\":
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c in chars:
            return True
    return False


def _operand(expr: str) -> str:
    """``expr`` ready to be an operand of an operator or a filter's input."""
    return f"({expr})" if _top_level(expr, " ") else expr


def _base(expr: str) -> str:
    """``expr`` ready for ``.attr``, ``[key]`` or ``.method()`` after it."""
    return f"({expr})" if _top_level(expr, " |+-*/%") else expr


def _nary(op: str) -> Callable[[list[str]], str]:
    def make(args: list[str]) -> str:
        if len(args) < 2:
            raise GoTemplateError(f"expects two arguments or more, got {len(args)}")
        return f" {op} ".join(_operand(a) for a in args)

    return make


def _filter(name: str, list_form: Callable[[list[str]], str] | None = None) -> Callable[[list[str]], str]:
    """A filter of one argument (``len x`` -> ``x|length``); with more arguments ``list_form``."""

    def make(args: list[str]) -> str:
        if len(args) == 1:
            return f"{_operand(args[0])}|{name}"
        if list_form is None:
            raise GoTemplateError(f"expects 1 argument, got {len(args)}")
        return list_form(args)

    return make


def _arity(n: int, make: Callable[..., str]) -> Callable[[list[str]], str]:
    def check(args: list[str]) -> str:
        if len(args) != n:
            raise GoTemplateError(f"expects {n} argument{'s' if n != 1 else ''}, got {len(args)}")
        return make(*args)

    return check


def _index(args: list[str]) -> str:
    if len(args) < 2:
        raise GoTemplateError(f"expects a collection and a key, got {len(args)} arguments")
    return _base(args[0]) + "".join(f"[{a}]" for a in args[1:])


def _avg(args: list[str]) -> str:
    if len(args) == 1:
        xs = _operand(args[0])
        return f"({xs}|sum) / ({xs}|length) if {xs} else 0"
    return f"({' + '.join(_operand(a) for a in args)}) / {len(args)}"


def _listed(name: str) -> Callable[[list[str]], str]:
    return lambda args: "[" + ", ".join(args) + f"]|{name}"


_FUNCTIONS: dict[str, Callable[[list[str]], str]] = {
    "index": _index,
    "len": _filter("length"),
    "split": _arity(2, lambda s, sep: f"{_base(s)}.split({sep})"),
    "join": _arity(2, lambda xs, sep: f"{_operand(xs)}|join({sep})"),
    "extract": _arity(2, lambda xs, name: f"{_operand(xs)}|map(attribute={name})|list"),
    "sum": _filter("sum", _nary("+")),
    "mul": _filter("product", _nary("*")),
    "avg": _avg,
    "min": _filter("min", _listed("min")),
    "max": _filter("max", _listed("max")),
    "div": _arity(2, lambda a, b: f"{_operand(a)} / {_operand(b)} if {_operand(b)} else 0"),
    "add": _nary("+"),
    "sub": _arity(2, lambda a, b: f"{_operand(a)} - {_operand(b)}"),
    "mod": _arity(2, lambda a, b: f"{_operand(a)} % {_operand(b)} if {_operand(b)} else 0"),
    "floor": _arity(1, lambda x: f'{_operand(x)}|round(0, "floor")'),
    "ceil": _arity(1, lambda x: f'{_operand(x)}|round(0, "ceil")'),
    "round": _arity(1, lambda x: f"{_operand(x)}|round"),
    "upper": _filter("upper"),
    "lower": _filter("lower"),
    "title": _filter("title"),
    "uuid": _arity(0, lambda: "uuid()"),
    "now": _arity(0, lambda: "now()"),
}


def _call(name: str, args: list[str]) -> str:
    if name.startswith("faker."):
        return _faker(name.removeprefix("faker."), args)
    if name in ("uuid2int64", "uuid2base64"):
        if len(args) != 1 or not args[0].startswith('"'):
            raise GoTemplateError(f"{name} expects one UUID literal")
        return json.dumps(load_time_value(name, json.loads(args[0])))
    make = _FUNCTIONS.get(name)
    if make is None:
        known = ", ".join(sorted([*_FUNCTIONS, "faker.*", "uuid2int64", "uuid2base64"]))
        raise GoTemplateError(f"unknown template function {name!r} (translated: {known})")
    try:
        return make(args)
    except GoTemplateError as exc:
        raise GoTemplateError(f"{name} {exc}") from None


def _faker(key: str, args: list[str]) -> str:
    if key in _FAKER_RANGES:
        if len(args) != 2:
            raise GoTemplateError(f"faker.{key} expects a low and a high bound, got {len(args)} arguments")
        return _FAKER_RANGES[key].format(*args)
    expr = _FAKER.get(key)
    if expr is None:
        known = ", ".join(f"faker.{k}" for k in sorted([*_FAKER, *_FAKER_RANGES]))
        raise GoTemplateError(f"unknown faker key faker.{key} (translated: {known})")
    return expr  # arguments (Text.Paragraph 1, Text.Sentence 10) set sizes virtsvc's kinds fix
