"""The report: counts per event, status, order and process over a window, beside the
kernel's own counters for the same window.

The Aggregator consumes the parts of an event stream (recording.Part: header, record
batches, stats, end), whether they come from a recording or straight from the probes, so
`khmon report FILE` and `khmon report --live` give the same answers for the same events.
Records are unpacked in batches with struct.iter_unpack and counted with one dict update per
record, weighted by each record's `count` (a deduplicated scan stands for many events).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from .layout import EventLayout, layouts_from_header
from .recording import Part
from .sysfs import counter_delta

SCAN_PMD = "mm_khugepaged_scan_pmd"
SCAN_FILE = "mm_khugepaged_scan_file"
COLLAPSE = "mm_collapse_huge_page"
COLLAPSE_FILE = "mm_khugepaged_collapse_file"
SUCCEEDED = "succeeded"


class _EventCounts:
    """Weighted counts of one event's records by (owner tgid, owner comm, status, order)."""

    def __init__(self, lay: EventLayout) -> None:
        self.lay = lay
        self.status = lay.fmt.status_field
        self.has_order = "order" in lay.field_names
        key = ["owner_tgid", "owner_comm"]
        if self.status:
            key.append(self.status)
        if self.has_order:
            key.append("order")
        # Unpack only count and the key fields; the tuples come out in record order.
        wanted = ("count", *key)
        self.unpack = lay.projection(wanted)
        order = [n for n, _off, _code in lay.items if n in wanted]
        self.i_count = order.index("count")
        self.key_at = [order.index(n) for n in key]
        self.counts: Counter[tuple] = Counter()
        self.records = 0

    def add(self, data: bytes) -> None:
        # Counting identical tuples runs in C; only distinct ones reach the Python loop.
        distinct = Counter(self.unpack.iter_unpack(data))
        counts, i_count, key_at = self.counts, self.i_count, self.key_at
        for rec, n in distinct.items():
            counts[tuple(rec[i] for i in key_at)] += rec[i_count] * n
        self.records += len(data) // self.lay.size

    def rows(self) -> list[tuple[int, str, str | None, int | None, int]]:
        """(owner_tgid, owner_comm, status name, order, count) rows."""
        out = []
        for key, n in self.counts.items():
            tgid, comm = key[0], key[1].rstrip(b"\0").decode(errors="replace")
            status = self.lay.fmt.symbol(self.status, key[2]) if self.status else None
            order = key[-1] if self.has_order else None
            out.append((tgid, comm, status, order, n))
        return out


class Aggregator:
    """Builds the report from the parts of one event stream."""

    def __init__(self, header: dict, layouts: list[EventLayout] | None = None) -> None:
        """`layouts`: the ones the header describes, when the caller has them already."""
        self.header = header
        self.layouts = layouts if layouts is not None else layouts_from_header(header["events"])
        self.events = [_EventCounts(lay) for lay in self.layouts]
        self.last_stats: dict | None = None
        self.ended = False

    def add(self, part: Part) -> None:
        if part.kind == "R":
            self.events[part.event].add(part.data)
        elif part.kind in ("S", "E"):
            self.last_stats = part.meta
            self.ended = self.ended or part.kind == "E"

    def result(self, warnings: list[str] | None = None) -> dict[str, Any]:
        h = self.header
        end = self.last_stats or {}
        rows = {ec.lay.name: ec.rows() for ec in self.events}
        events = {name: sum(r[-1] for r in rs) for name, rs in rows.items()}
        probe = end.get("probe", {})
        lost = probe.get("lost", {})
        missed = probe.get("missed", {})
        seen = probe.get("seen", {})
        accounting = {
            ec.lay.name: {
                "seen": seen.get(ec.lay.name, 0),
                "recorded": events[ec.lay.name],
                "records": ec.records,
                "lost": lost.get(ec.lay.name, 0),
                "missed": missed.get(ec.lay.name, 0),
                "dedup_full": probe.get("dedup_full", {}).get(ec.lay.name, 0),
            }
            for ec in self.events
        }
        for a in accounting.values():
            a["unaccounted"] = a["seen"] - a["recorded"] - a["lost"]
        start_counters = h.get("counters", {})
        end_counters = end.get("counters", start_counters)
        window = (end.get("mono_ns", h["start_mono_ns"]) - h["start_mono_ns"]) / 1e9
        return {
            "kernel": {
                "release": h["kernel"]["release"],
                "has_order": any(ec.has_order for ec in self.events),
                "owner_source": h.get("owner_source", "unknown"),
            },
            "window": {"seconds": round(window, 3), "start": h.get("start_wall"),
                       "end": end.get("wall"), "complete": self.ended},
            "filter": {"pid": h.get("options", {}).get("pid") or None},
            "settings": h.get("settings", {}),
            "events": events,
            "collapse": _collapse(rows.get(COLLAPSE, []), rows.get(COLLAPSE_FILE, [])),
            "scan_pmd": {"by_status": _by_status(rows.get(SCAN_PMD, []))},
            "by_event": {name: {"count": events[name], "by_status": _by_status(rs)}
                         for name, rs in rows.items()},
            "processes": _processes(rows),
            "kernel_counters": {"start": start_counters, "end": end_counters,
                                "delta": counter_delta(start_counters, end_counters)},
            # Refused by the ring buffer, plus probe runs the kernel skipped (recursion).
            "lost_events": sum(lost.values()) + sum(missed.values()),
            "accounting": accounting,
            "warnings": list(warnings or []),
        }


def _by_status(rows: list) -> dict[str, int]:
    c: Counter[str] = Counter()
    for _tgid, _comm, status, _order, n in rows:
        if status is not None:
            c[status] += n
    return dict(c.most_common())


def _collapse(anon: list, file: list) -> dict[str, Any]:
    by_order: dict[str, dict[str, Any]] = {}
    for _tgid, _comm, status, order, n in anon:
        if order is None:
            continue
        o = by_order.setdefault(str(order), {"attempts": 0, "succeeded": 0, "by_status": {}})
        o["attempts"] += n
        o["succeeded"] += n if status == SUCCEEDED else 0
        o["by_status"][status] = o["by_status"].get(status, 0) + n
    return {
        "attempts": sum(r[-1] for r in anon),
        "succeeded": sum(r[-1] for r in anon if r[2] == SUCCEEDED),
        "by_status": _by_status(anon),
        "by_order": dict(sorted(by_order.items(), key=lambda kv: -int(kv[0]))),
        "file": {"attempts": sum(r[-1] for r in file),
                 "succeeded": sum(r[-1] for r in file if r[2] == SUCCEEDED),
                 "by_status": _by_status(file)},
    }


def _processes(rows: dict[str, list]) -> list[dict[str, Any]]:
    procs: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"comm": "", "scans": 0, "collapse_attempts": 0, "collapses": 0})
    for name, kind in ((SCAN_PMD, "scan"), (SCAN_FILE, "scan"), (COLLAPSE, "collapse"),
                       (COLLAPSE_FILE, "collapse")):
        for tgid, comm, status, _order, n in rows.get(name, []):
            p = procs[tgid]
            p["comm"] = p["comm"] or comm
            if kind == "scan":
                p["scans"] += n
            else:
                p["collapse_attempts"] += n
                p["collapses"] += n if status == SUCCEEDED else 0
    out = [{"pid": tgid or None, **p} for tgid, p in procs.items()]
    for p in out:
        if p["pid"] is None:
            p["comm"] = "(owner unknown)"
    out.sort(key=lambda p: (-p["collapses"], -p["scans"], p["pid"] or 0))
    return out
