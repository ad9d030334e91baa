"""Grafana's side of a dashboard, for tests: its targets, variables and annotations, and their
PromQL with the variables expanded the way Grafana 11 expands them before Prometheus sees it.

No Grafana server can be had on these machines, so this module is what stands in for one. It
follows Grafana's Prometheus data source (pkg/promlib) and its interval code:

- $__interval: the time range over the panel's maxDataPoints, rounded to one of Grafana's nice
  intervals, never below the minimum interval (the data source's timeInterval, which the
  provisioning sets to the scrape interval); formatted as Grafana formats it ("1s", "2m");
- the step of a range query is that interval (never finer than range / 11000);
- $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), formatted as a Go
  duration ("4s", "1m1s");
- $__range: the time range in whole seconds ("93s");
- a multi-value or include-All variable inside a regex matcher: each value regex-escaped
  (Grafana writes two backslashes, so the PromQL string holds one), several joined as (a|b);
  All is the variable's custom allValue, verbatim.

    for t in targets(doc):
        expr = expand(t.expr, Context(range_s=90, scrape_s=1, max_points=t.max_points, values=...))
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Grafana's roundInterval (packages/grafana-data/src/datetime/rangeutil.ts and
# pkg/components/intervalv2): below each bound (ms), the interval it rounds to.
_ROUND = [
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
    (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
    (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
    (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000),
    (32400000, 21600000), (86400000, 43200000), (604800000, 86400000), (1814400000, 604800000),
    (3628800000, 2592000000),
]
SAFE_RESOLUTION = 11000  # Prometheus refuses more points than this per series
ALL = object()  # a variable's value when All is selected


def round_interval_ms(ms: float) -> int:
    for bound, rounded in _ROUND:
        if ms < bound:
            return rounded
    return 31536000000


def format_interval(ms: int) -> str:
    """Grafana's gtime.FormatInterval: the largest whole unit, truncated ("90s" -> "1m")."""
    for unit, size in (("y", 31536000000), ("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{max(ms, 1)}ms"


def go_duration(ms: int) -> str:
    """Go's time.Duration.String() for whole milliseconds ("4s", "1m1s", "1h0m0s", "500ms")."""
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    h, rest = divmod(ms, 3600000)
    m, rest = divmod(rest, 60000)
    s = f"{rest // 1000}" + (f".{rest % 1000:03d}".rstrip("0") if rest % 1000 else "")
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


@dataclass(frozen=True)
class Context:
    """One panel's query context: the dashboard's time range, the scrape interval (the data
    source's timeInterval), the panel's maxDataPoints and the variables' current values."""

    range_s: float
    scrape_s: float
    max_points: int
    values: Mapping[str, Sequence[str] | object] = field(default_factory=dict)  # name -> [..] or ALL
    all_values: Mapping[str, str] = field(default_factory=dict)  # name -> allValue

    @property
    def interval_ms(self) -> int:
        """$__interval in ms (the frontend's query.interval)."""
        return max(round_interval_ms(self.range_s * 1000 / self.max_points), round(self.scrape_s * 1000))

    @property
    def step_ms(self) -> int:
        """The step of the range query the backend sends."""
        return max(self.interval_ms, round_interval_ms(self.range_s * 1000 / SAFE_RESOLUTION))

    @property
    def rate_interval_ms(self) -> int:
        scrape = round(self.scrape_s * 1000)
        return max(self.interval_ms + scrape, 4 * scrape)


def regex_escape(value: str) -> str:
    """Grafana's prometheusSpecialRegexEscape, as the text it puts in the query."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")


def expand(expr: str, ctx: Context) -> str:
    """`expr` with Grafana's global and template variables replaced, as Prometheus receives it."""
    range_s = round(ctx.range_s)
    builtins = {
        "__rate_interval_ms": str(ctx.rate_interval_ms),
        "__rate_interval": go_duration(ctx.rate_interval_ms),
        "__interval_ms": str(ctx.step_ms),
        "__interval": format_interval(ctx.step_ms),
        "__range_ms": str(round(ctx.range_s * 1000)),
        "__range_s": str(range_s),
        "__range": f"{range_s}s",
    }

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in builtins:
            return builtins[name]
        if name not in ctx.values:
            raise KeyError(f"variable ${name} has no value in this context ({expr!r})")
        v = ctx.values[name]
        if v is ALL:
            return ctx.all_values[name]
        assert isinstance(v, Sequence) and not isinstance(v, str), v
        escaped = [regex_escape(x) for x in v]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    return _VAR.sub(one, expr)  # \w+ is greedy: $__rate_interval_ms is never read as $__rate_interval


@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    dashboard: str  # uid
    panel_id: int
    panel_title: str
    ref: str
    expr: str
    instant: bool
    fmt: str
    max_points: int | None
    panel: dict[str, Any]
    repeat: str | None = None  # the variable its row repeats over: one value per copy


    @property
    def name(self) -> str:
        return f"{self.dashboard}/{self.panel_id}{self.ref} {self.panel_title}"


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, including the panels of collapsed rows."""
    for p in doc.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc.get("panels", []) if p.get("type") == "row"]


def targets(doc: dict[str, Any]) -> list[Target]:
    """Every panel target. A panel after an expanded row belongs to that row (Grafana's
    classic layout), and a row with `repeat` gives each copy one value of the variable."""
    out = []
    repeat = None
    for top in doc.get("panels", []):
        if top.get("type") == "row":
            repeat = top.get("repeat")
            inner = top.get("panels", [])  # a collapsed row keeps its panels inside
        else:
            inner = [top]
        for p in inner:
            for t in p.get("targets", []):
                out.append(Target(doc["uid"], p["id"], p["title"], t["refId"], t["expr"],
                                  bool(t.get("instant")) and not t.get("range"),
                                  t.get("format", "time_series"), p.get("maxDataPoints"), p, repeat))
    return out


def variables(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in doc.get("templating", {}).get("list", [])}


def prometheus_annotations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The annotation queries that run PromQL (not Grafana's built-in one)."""
    return [a for a in doc.get("annotations", {}).get("list", []) if not a.get("builtIn")]


_LABEL_VALUES = re.compile(r"label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)")


def label_values_query(query: str) -> tuple[str | None, str]:
    """(series selector or None, label) of a `label_values(...)` variable query."""
    m = _LABEL_VALUES.fullmatch(query.strip())
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group("match"), m.group("label")


def aligned(start: float, end: float, step_ms: int) -> tuple[float, float]:
    """A range query's start and end aligned down to the step, as Grafana's backend sends them."""
    step = step_ms / 1000
    return math.floor(start / step) * step, math.floor(end / step) * step
