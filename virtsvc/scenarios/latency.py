"""Latency models: how long a rule's answer waits, compiled once from its ``delay:`` and sampled per call.

``delay:`` takes a duration (``25ms``) or one model::

    {fixed: 25ms}
    {uniform: [10ms, 50ms]}
    {normal: {mean: 40ms, stddev: 10ms}}                  # truncated at 0: never negative
    {lognormal: {median: 20ms, p99: 200ms}}
    {percentiles: {p50: 12ms, p90: 40ms, p99: 180ms}}     # interpolated between the percentiles given
    {backoff: {initial: 100ms, factor: 2, max: 2s, jitter: 0.1}}   # grows with the rule's n-th call

Every draw is a pure function of its names: a uniform number from a hash of (scenario, session, rule, the
call's number in the session, the draw's number in the call), turned into seconds by the model's inverse
distribution function. So a rerun of a session sees the same delays, on any store and in any process, with
no generator state to share between replicas; and the statistics are exact (a truncated normal is sampled
by its truncated inverse, not by rejection).

Empirical percentiles: between two given percentiles the delay is linear in the percentile. Below the
lowest given one it falls linearly to 0 at p0 (give ``p0`` for a floor): zero is the one bound every latency
has, so the shape invents nothing else. Above the highest one it stays at that delay (give ``p100`` for a
longer tail): nothing recorded says how far the tail goes, so none is invented.

Backoff: the n-th call of the rule in the session waits ``min(max, initial * factor ** (n - 1))``, times a
jitter factor drawn uniformly in ``[1 - jitter, 1 + jitter]``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, ClassVar

from virtsvc import _text
from virtsvc.scenarios.located import Site

__all__ = [
    "LONGEST",
    "MODELS",
    "Backoff",
    "Delay",
    "Empirical",
    "Fixed",
    "LogNormal",
    "Normal",
    "Uniform",
    "compile_delay",
    "draw",
]

#: seconds (about four months): a longer delay waits this long, as a wait cannot take more (a client's
#: deadline ends it first anyway)
LONGEST = 1e7
MODELS = ("fixed", "uniform", "normal", "lognormal", "percentiles", "backoff")
NORMAL_KEYS = ("mean", "stddev")
LOGNORMAL_KEYS = ("median", "p99")
BACKOFF_KEYS = ("initial", "factor", "max", "jitter")
_STANDARD = NormalDist()
_Z99 = _STANDARD.inv_cdf(0.99)
_PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
_HINT = (
    "use a duration or one of {fixed: D}, {uniform: [low, high]}, {normal: {mean: M, stddev: S}}, "
    "{lognormal: {median: M, p99: P}}, {percentiles: {p50: A, p99: B}}, "
    "{backoff: {initial: D, factor: F, max: M, jitter: J}}"
)

#: ``(value, site, node, key, path) -> seconds`` (None: reported): the loader's duration parser
Duration = Callable[[Any, Site, Any, Any, str], "float | None"]


def draw(*names: object) -> float:
    """A number in (0, 1), uniform over its names' hashes and the same for the same names everywhere."""
    digest = hashlib.blake2b("\0".join(map(str, names)).encode(), digest_size=8).digest()
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) / 2.0**53  # 53 bits: a double's, never 0 nor 1


class Delay:
    """A latency model: ``seconds(u, attempt)`` turns a uniform draw ``u`` in (0, 1) into a delay."""

    __slots__ = ()
    kind: ClassVar[str]
    random: ClassVar[bool] = True  # False: the same delay on every call, no draw needed
    by_attempt: ClassVar[bool] = False  # True: the rule counts its calls, the n-th is the attempt

    def seconds(self, u: float, attempt: int = 1) -> float:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Fixed(Delay):
    kind: ClassVar[str] = "fixed"
    random: ClassVar[bool] = False
    value: float

    def seconds(self, u: float, attempt: int = 1) -> float:
        return self.value


@dataclass(frozen=True, slots=True)
class Uniform(Delay):
    kind: ClassVar[str] = "uniform"
    low: float
    high: float

    def seconds(self, u: float, attempt: int = 1) -> float:
        return self.low + (self.high - self.low) * u


@dataclass(frozen=True, slots=True)
class Normal(Delay):
    """Normal, truncated at 0: drawn from the upper part of the distribution, so it keeps its shape."""

    kind: ClassVar[str] = "normal"
    mean: float
    stddev: float

    def seconds(self, u: float, attempt: int = 1) -> float:
        dist = NormalDist(self.mean, self.stddev)
        below = dist.cdf(0.0)  # the share cut off; at most a half, as the mean is not negative
        return max(0.0, dist.inv_cdf(below + (1.0 - below) * u))


@dataclass(frozen=True, slots=True)
class LogNormal(Delay):
    kind: ClassVar[str] = "lognormal"
    mu: float  # of ln(seconds)
    sigma: float

    @classmethod
    def from_median_p99(cls, median: float, p99: float) -> LogNormal:
        mu = math.log(median)
        return cls(mu, (math.log(p99) - mu) / _Z99)

    def seconds(self, u: float, attempt: int = 1) -> float:
        return math.exp(self.mu + self.sigma * _STANDARD.inv_cdf(u))


@dataclass(frozen=True, slots=True)
class Empirical(Delay):
    """Recorded percentiles, linear between them (see the module's docstring for below and above them)."""

    kind: ClassVar[str] = "percentiles"
    quantiles: tuple[float, ...]  # increasing, from 0
    values: tuple[float, ...]  # seconds, not decreasing

    def seconds(self, u: float, attempt: int = 1) -> float:
        qs, vs = self.quantiles, self.values
        i = bisect.bisect_right(qs, u)
        if i >= len(qs):
            return vs[-1]
        q0, q1 = qs[i - 1], qs[i]
        return vs[i - 1] + (vs[i] - vs[i - 1]) * (u - q0) / (q1 - q0)


@dataclass(frozen=True, slots=True)
class Backoff(Delay):
    kind: ClassVar[str] = "backoff"
    by_attempt: ClassVar[bool] = True
    initial: float
    factor: float
    max: float
    jitter: float

    def base(self, attempt: int) -> float:
        """The delay of the ``attempt``-th call before jitter (no float overflow however many calls)."""
        if self.factor == 1.0 or attempt <= 1:
            return min(self.max, self.initial)
        if (attempt - 1) * math.log(self.factor) >= math.log(self.max / self.initial):
            return self.max
        return min(self.max, self.initial * self.factor ** (attempt - 1))

    def seconds(self, u: float, attempt: int = 1) -> float:
        return self.base(attempt) * (1.0 + self.jitter * (2.0 * u - 1.0))


# -- compiling ``delay:`` ------------------------------------------------------------------------------


def compile_delay(value: Any, site: Site, node: Any, key: Any, path: str, duration: Duration) -> Delay | None:
    """The model ``node[key]`` (``value``) describes; None after reporting its problems at their lines."""
    if not isinstance(value, Mapping):
        seconds = duration(value, site, node, key, path)
        return Fixed(seconds) if seconds is not None else None
    inner = Site(site.file, site.problems, site.line_of(node, key)).at(value)
    if len(value) != 1 or next(iter(value)) not in MODELS:
        extra = [k for k in value if k not in MODELS]
        if extra:
            inner.error(value, extra[0], f"{path}: " + _unknown(extra[0], MODELS, "delay model", _HINT))
        else:
            inner.error(value, None, f"{path}: give exactly one model of " + ", ".join(MODELS))
        return None
    kind = next(iter(value))
    c = _Compiler(inner, value, kind, f"{path}.{kind}", duration)
    return c.run()


@dataclass
class _Compiler:
    site: Site
    node: Mapping[Any, Any]  # {kind: args}
    kind: str
    path: str
    duration: Duration

    def run(self) -> Delay | None:
        args = self.node[self.kind]
        return getattr(self, "_" + self.kind)(args)

    def error(self, node: Any, key: Any, message: str) -> None:
        self.site.error(node, key, message)

    def _seconds(self, node: Any, key: Any, path: str) -> float | None:
        value = node[key]
        if isinstance(value, (Mapping, list)):  # the loader's message would offer models here
            self.error(node, key, f"{path}: expected a duration (e.g. 25ms), got {_show(value)}")
            return None
        return self.duration(value, self.site, node, key, path)

    def _fields(self, args: Any, known: tuple[str, ...], required: tuple[str, ...], shape: str) -> bool:
        """Whether ``args`` is a mapping with the ``required`` keys and no unknown one (each reported)."""
        if not isinstance(args, Mapping):
            self.error(self.node, self.kind, f"{self.path}: expected {shape}, got {_show(args)}")
            return False
        ok = True
        for k in args:
            if k not in known:
                self.error(args, k, f"{self.path}: " + _unknown(k, known, f"{self.kind} key", f"use {shape}"))
                ok = False
        missing = [k for k in required if k not in args]
        if missing and ok:  # else a did-you-mean has named the missing key already
            self.error(self.node, self.kind, f"{self.path}: missing {', '.join(missing)} (expected {shape})")
            ok = False
        return ok

    def _fixed(self, args: Any) -> Delay | None:
        seconds = self._seconds(self.node, self.kind, self.path)
        return Fixed(seconds) if seconds is not None else None

    def _uniform(self, args: Any) -> Delay | None:
        if not isinstance(args, list) or len(args) != 2:
            self.error(
                self.node, self.kind, f"{self.path}: expected [low, high], two durations, got {_show(args)}"
            )
            return None
        low = self._seconds(args, 0, f"{self.path}[0]")
        high = self._seconds(args, 1, f"{self.path}[1]")
        if low is None or high is None:
            return None
        if low > high:
            self.error(
                self.node, self.kind, f"{self.path}: low {_show(args[0])} is above high {_show(args[1])}"
            )
            return None
        return Uniform(low, high)

    def _normal(self, args: Any) -> Delay | None:
        if not self._fields(args, NORMAL_KEYS, NORMAL_KEYS, "{mean: M, stddev: S}"):
            return None
        mean = self._seconds(args, "mean", f"{self.path}.mean")
        stddev = self._seconds(args, "stddev", f"{self.path}.stddev")
        if mean is None or stddev is None:
            return None
        if stddev <= 0:
            self.error(
                args, "stddev", f"{self.path}.stddev: must be above zero (for one value, use a duration)"
            )
            return None
        return Normal(mean, stddev)

    def _lognormal(self, args: Any) -> Delay | None:
        if not self._fields(args, LOGNORMAL_KEYS, LOGNORMAL_KEYS, "{median: M, p99: P}"):
            return None
        median = self._seconds(args, "median", f"{self.path}.median")
        p99 = self._seconds(args, "p99", f"{self.path}.p99")
        if median is None or p99 is None:
            return None
        if median <= 0:
            self.error(args, "median", f"{self.path}.median: must be above zero")
            return None
        if p99 <= median:
            self.error(
                args,
                "p99",
                f"{self.path}: p99 {_show(args['p99'])} must be above the median {_show(args['median'])}",
            )
            return None
        return LogNormal.from_median_p99(median, p99)

    def _percentiles(self, args: Any) -> Delay | None:
        shape = "{p50: 12ms, p90: 40ms, p99: 180ms}"
        if not isinstance(args, Mapping) or not args:
            self.error(
                self.node,
                self.kind,
                f"{self.path}: expected percentiles and delays, e.g. {shape}, got {_show(args)}",
            )
            return None
        points: list[tuple[float, float, str]] = []
        for k in args:
            match = _PERCENTILE.fullmatch(k) if isinstance(k, str) else None
            q = float(match.group(1)) if match else -1.0
            if not 0 <= q <= 100:
                hint = (
                    "use p50 for the median"
                    if k == "median"
                    else f"keys from p0 to p100 (p99.9 too), e.g. {shape}"
                )
                self.error(args, k, f"{self.path}: {_show(k)} is not a percentile; {hint}")
                return None
            seconds = self._seconds(args, k, f"{self.path}.{k}")
            if seconds is None:
                return None
            points.append((q / 100.0, seconds, k))
        points.sort()
        for (_, low, low_key), (_, high, high_key) in itertools.pairwise(points):
            if high < low:
                self.error(
                    args,
                    high_key,
                    f"{self.path}: {high_key} {_show(args[high_key])} is below {low_key} "
                    f"{_show(args[low_key])}: delays cannot fall as the percentile grows",
                )
                return None
        if points[0][0] > 0:
            points.insert(0, (0.0, 0.0, "p0"))
        return Empirical(tuple(q for q, _, _ in points), tuple(v for _, v, _ in points))

    def _backoff(self, args: Any) -> Delay | None:
        shape = "{initial: 100ms, factor: 2, max: 2s, jitter: 0.1}"
        if not self._fields(args, BACKOFF_KEYS, ("initial", "max"), shape):
            return None
        initial = self._seconds(args, "initial", f"{self.path}.initial")
        top = self._seconds(args, "max", f"{self.path}.max")
        factor = self._number(args, "factor", 2.0)
        jitter = self._number(args, "jitter", 0.0)
        if initial is None or top is None or factor is None or jitter is None:
            return None
        ok = True
        if initial <= 0:
            self.error(args, "initial", f"{self.path}.initial: must be above zero")
            ok = False
        if factor < 1:
            self.error(
                args,
                "factor",
                f"{self.path}.factor: must be at least 1 (a backoff grows), got {_show(args['factor'])}",
            )
            ok = False
        if not 0 <= jitter <= 1:
            self.error(
                args,
                "jitter",
                f"{self.path}.jitter: must be from 0 to 1 (a share of the delay), got {args['jitter']}",
            )
            ok = False
        if ok and top < initial:
            self.error(
                args,
                "max",
                f"{self.path}: max {_show(args['max'])} is below initial {_show(args['initial'])}",
            )
            ok = False
        return Backoff(initial, factor, top, jitter) if ok else None

    def _number(self, args: Mapping[Any, Any], key: str, default: float) -> float | None:
        if key not in args:
            return default
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.error(args, key, f"{self.path}.{key}: expected a number, got {_show(value)}")
            return None
        return float(value)


def _unknown(key: Any, vocabulary: tuple[str, ...], what: str, hint: str) -> str:
    text = f"unknown {what} {_show(key)}"
    close = _text.closest(key, vocabulary, n=1) if isinstance(key, str) else []
    return text + "; " + (_text.alternatives(close) if close else hint)


def _show(value: Any) -> str:
    """As the loader shows values: text quoted, collections by kind."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "nothing (null)"
    return _text.show(value, 60)
