"""Rates between two snapshots of one stream, and the capped history the sparklines draw.

A snapshot holds totals that only grow while the stream that made them lives. A rate is the
change of a total between two snapshots of the same stream divided by the stream time
between them, so it is only a rate when both come from the same stream and nothing was
missed in between. Everything else is N/A (None), never a guess:

- a new stream: another daemon (its pid or start time differ: a restart), another child;
- a gap: the source failed a refresh or reconnected since (it bumps its `epoch`);
- time that did not move forward, or a total that went down (a counter reset).

Totals are flattened into one dict of named counters (counters()), so every panel's rate
is computed by the same loop. Rates are kept per snapshot (by stream, epoch and seq), so a
replay stepped back shows the rates it showed the first time, and the same snapshot fetched
twice is not a zero rate.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ...stream.events import SCAN_FILE, SCAN_PMD

HISTORY = 300  # sparkline samples kept (5 minutes at 1 Hz)
BASES = 16  # snapshots whose counters are kept to compute rates against
SERIES = ("collapses", "attempts", "lost")


def dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]... or None when any level is missing or not a dict: how every part of
    khmon top reads a snapshot that may lack a key."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def as_dict(v: Any) -> dict[str, Any]:
    """`v` when it is a dict, else an empty one (a snapshot from an unknown daemon)."""
    return v if isinstance(v, dict) else {}


def as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _ints(pairs: Iterator[tuple[str, Any]]) -> dict[str, int]:
    return {k: v for k, v in pairs if isinstance(v, int) and not isinstance(v, bool)}


def counters(report: dict[str, Any]) -> dict[str, int]:
    """The totals of a report that rates are taken of, by flat name: scans, attempts,
    collapses, lost, order/<o>/attempts|succeeded, waste/<reason>, proc/<pid>/scans|attempts.
    A total the report lacks is absent (its rate is N/A)."""
    events = as_dict(dig(report, "events"))
    col = as_dict(dig(report, "collapse"))
    file = col.get("file")
    scans = [events.get(n) for n in (SCAN_PMD, SCAN_FILE)]

    def total(*vals: Any) -> int | None:
        nums = [v for v in vals if isinstance(v, int)]
        return sum(nums) if nums else None

    out = _ints(iter([
        ("scans", total(*scans)),
        ("attempts", total(dig(col, "attempts"), dig(file, "attempts"))),
        ("collapses", total(dig(col, "succeeded"), dig(file, "succeeded"))),
        ("lost", dig(report, "lost_events")),
    ]))
    for o, row in as_dict(col.get("by_order")).items():
        out.update(_ints(iter([(f"order/{o}/attempts", dig(row, "attempts")),
                               (f"order/{o}/succeeded", dig(row, "succeeded"))])))
    for reason, row in as_dict(dig(report, "wasted", "by_reason")).items():
        out.update(_ints(iter([(f"waste/{reason}", dig(row, "attempts"))])))
    for p in as_list(dig(report, "processes")):
        pid = dig(p, "pid")
        if isinstance(pid, int):
            out.update(_ints(iter([(f"proc/{pid}/scans", dig(p, "scans")),
                                   (f"proc/{pid}/attempts", dig(p, "collapse_attempts"))])))
    return out


@dataclass(frozen=True)
class Point:
    """What rates are computed from: one snapshot's identity, stream time and counters, and
    khugepaged's CPU time sampled when it arrived (None where it cannot be read)."""

    stream: str  # which stream: a daemon's pid and start time, a child's pid, a replay
    epoch: int  # the source's count of failed refreshes and reconnects
    seq: int
    mono_ns: int | None
    counters: dict[str, int]
    cpu_s: float | None = None  # khugepaged's CPU time
    local_s: float | None = None  # the local monotonic clock when cpu_s was read

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.stream, self.epoch, self.seq)


def rates_between(prev: Point | None, cur: Point) -> dict[str, float | None]:
    """Per-second rates of every counter of `cur` since `prev`; None (N/A) for each one
    that is not a rate (see the module docstring). `cpu` is khugepaged's CPU share (0..1
    per core)."""
    out: dict[str, float | None] = dict.fromkeys(cur.counters)
    out["cpu"] = None
    if (prev is None or prev.stream != cur.stream or prev.epoch != cur.epoch
            or cur.seq <= prev.seq or cur.mono_ns is None or prev.mono_ns is None
            or cur.mono_ns <= prev.mono_ns):
        return out
    dt = (cur.mono_ns - prev.mono_ns) / 1e9
    for k, v in cur.counters.items():
        before = prev.counters.get(k)
        if before is not None and v >= before:
            out[k] = (v - before) / dt
    if (cur.cpu_s is not None and prev.cpu_s is not None and cur.local_s is not None
            and prev.local_s is not None and cur.local_s > prev.local_s
            and cur.cpu_s >= prev.cpu_s):
        out["cpu"] = (cur.cpu_s - prev.cpu_s) / (cur.local_s - prev.local_s)
    return out


@dataclass
class RateKeeper:
    """Rates for each new snapshot against the latest earlier one of the same stream and
    epoch, and the sparkline history; both bounded. Only the counters of the last BASES
    snapshots are kept (with 1,000 processes that is 2,000 counters each): a replay
    stepped back further than that shows N/A."""

    bases: OrderedDict[tuple[str, int, int], Point] = field(default_factory=OrderedDict)
    history: dict[str, deque[float | None]] = field(
        default_factory=lambda: {s: deque(maxlen=HISTORY) for s in SERIES})

    def add(self, cur: Point) -> dict[str, float | None]:
        """The rates of `cur`; the same snapshot again, or one stepped back to, gets the
        rates it had (computed again from the same two snapshots)."""
        seen = cur.key in self.bases
        prev = max((p for p in self.bases.values()
                    if p.stream == cur.stream and p.epoch == cur.epoch and p.seq < cur.seq),
                   key=lambda p: p.seq, default=None)
        r = rates_between(prev, cur)
        if seen:
            return r
        self.bases[cur.key] = cur
        while len(self.bases) > BASES:
            self.bases.popitem(last=False)
        for s in SERIES:
            self.history[s].append(r.get(s))
        return r

    def gap(self) -> None:
        """A refresh that failed: the sparklines show a hole there."""
        for s in SERIES:
            self.history[s].append(None)
