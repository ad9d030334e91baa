"""PromQL read the way Prometheus reads it (promql-parser, a port of Prometheus's own parser), for
rules about queries: which metrics an expression reads, under which functions and aggregations.

promql_parser.walk() gives a node but not its ancestors, and the rules need both (a counter must
sit directly inside rate(); a waste metric must keep `reason` in every aggregation above it), so
`nodes` walks the tree itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import promql_parser as pp

ROOT = Path(__file__).resolve().parents[2]


def children(node: object) -> list[object]:
    if isinstance(node, pp.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pp.AggregateExpr):
        return [c for c in (node.param, node.expr) if c is not None]
    if isinstance(node, pp.Call):
        return list(node.args)
    if isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
        return [node.expr]
    if isinstance(node, pp.MatrixSelector):
        return [node.vector_selector]
    return []


def nodes(expr: object, parents: tuple[object, ...] = ()) -> Iterator[tuple[object, tuple[object, ...]]]:
    """Every node with its ancestors, root first."""
    yield expr, parents
    for c in children(expr):
        yield from nodes(c, (*parents, expr))


def selectors(expr: object) -> Iterator[tuple[pp.VectorSelector, tuple[object, ...]]]:
    for n, parents in nodes(expr):
        if isinstance(n, pp.VectorSelector):
            yield n, parents


def metric_names(expr: object) -> set[str]:
    """The metric names an expression reads, by name or by an exact __name__ matcher."""
    names = set()
    for s, _ in selectors(expr):
        if s.name:
            names.add(s.name)
        for m in s.matchers.matchers:
            if m.name == "__name__" and m.op == pp.MatchOp.Equal:
                names.add(m.value)
    return names


def matchers(s: pp.VectorSelector) -> dict[str, tuple[pp.MatchOp, str]]:
    return {m.name: (m.op, m.value) for m in s.matchers.matchers}


def function_name(node: object) -> str | None:
    return node.func.name if isinstance(node, pp.Call) else None


@dataclass(frozen=True)
class Family:
    """A metric family of docs/metrics.md: its name (a regex where the doc writes <name>) and type."""

    pattern: re.Pattern[str]
    type: str  # counter, gauge, histogram, info gauge

    def names(self, name: str) -> bool:
        if self.type == "histogram":
            return any(self.pattern.fullmatch(name.removesuffix(s)) and name.endswith(s)
                       for s in ("_bucket", "_sum", "_count"))
        return bool(self.pattern.fullmatch(name))


def documented_families(doc: Path = ROOT / "docs" / "metrics.md") -> list[Family]:
    """The families in docs/metrics.md's tables (| `name` | type | ...): the daemon's contract."""
    out = []
    for line in doc.read_text().splitlines():
        m = re.match(r"\|\s*`(khmon_[a-z0-9_<>]+)`\s*\|\s*([a-z]+)", line)
        if m:
            pattern = re.sub(r"<[a-z]+>", "[a-z0-9_]+", m.group(1))  # names hold no other metacharacter
            out.append(Family(re.compile(pattern), m.group(2)))
    return out


# Series Prometheus writes itself for every target.
SYNTHETIC = {"up": "gauge", "scrape_duration_seconds": "gauge", "scrape_samples_scraped": "gauge"}


def metric_type(name: str, families: list[Family]) -> str | None:
    """counter, gauge or histogram for a documented (or synthetic) series name; None if unknown.
    An exact family wins over a templated one (khmon_mthp_<stat> is also a pattern for
    khmon_mthp_collapse_alloc_total, which the <stat>_total family types as a counter)."""
    if name in SYNTHETIC:
        return SYNTHETIC[name]
    exact = [f for f in families if "[" not in f.pattern.pattern and f.names(name)]
    match = exact or [f for f in families if f.names(name)]
    if not match:
        return None
    kinds = {f.type for f in match}
    if "histogram" in kinds:
        return "histogram"
    if "counter" in kinds or name.endswith("_total"):
        return "counter"
    return match[0].type
