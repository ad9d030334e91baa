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
from typing import Any, NamedTuple

from ..capture import plan as funcprobes
from ..kernel.sysfs import counter_delta
from ..stream.layout import EventLayout, layouts_from_header
from ..stream.recording import Part
from .correlate import SCAN_PMD, SWAPIN, PmdCorrelator
from .waste import wasted

SCAN_FILE = "mm_khugepaged_scan_file"
COLLAPSE = "mm_collapse_huge_page"
COLLAPSE_FILE = "mm_khugepaged_collapse_file"
SUCCEEDED = "succeeded"


class Row(NamedTuple):
    """Counts of one event for one combination of owner, status, order and VMA flags."""

    tgid: int
    comm: str
    status: str | None
    order: int | None
    vm_flags: int | None
    count: int
    dur_sum: int  # ns, summed over the events (function probes with an exit only)
    dur_max: int


class _EventCounts:
    """Weighted counts of one event's records by (owner tgid, owner comm, status, order, VMA
    flags), with durations summed where the event has them."""

    def __init__(self, lay: EventLayout) -> None:
        self.lay = lay
        self.status = lay.fmt.status_field
        names = lay.field_names
        self.has_order = "order" in names
        self.has_flags = "vm_flags" in names
        self.has_dur = "duration_ns" in names
        key = ["owner_tgid", "owner_comm"]
        key += [self.status] if self.status else []
        key += ["order"] if self.has_order else []
        key += ["vm_flags"] if self.has_flags else []
        # Unpack only count, the key fields and durations; tuples come out in record order.
        wanted = ("count", *key, *(["duration_ns"] if self.has_dur else []))
        self.unpack = lay.projection(wanted)
        order = [n for n, _off, _code in lay.items if n in wanted]
        self.i_count = order.index("count")
        self.i_dur = order.index("duration_ns") if self.has_dur else None
        self.key_at = [order.index(n) for n in key]
        self.counts: Counter[tuple] = Counter()
        self.dur_sum: Counter[tuple] = Counter()
        self.dur_max: dict[tuple, int] = {}
        self.records = 0

    def add(self, data: bytes) -> None:
        # Counting identical tuples runs in C; only distinct ones reach the Python loop.
        distinct = Counter(self.unpack.iter_unpack(data))
        counts, i_count, key_at, i_dur = self.counts, self.i_count, self.key_at, self.i_dur
        for rec, n in distinct.items():
            key = tuple(rec[i] for i in key_at)
            counts[key] += rec[i_count] * n
            if i_dur is not None:
                self.dur_sum[key] += rec[i_dur] * n
                self.dur_max[key] = max(self.dur_max.get(key, 0), rec[i_dur])
        self.records += len(data) // self.lay.size

    def rows(self) -> list[Row]:
        out = []
        for key, n in self.counts.items():
            rest = list(key[2:])
            status = self.lay.fmt.symbol(self.status, rest.pop(0)) if self.status else None
            order = rest.pop(0) if self.has_order else None
            flags = rest.pop(0) if self.has_flags else None
            out.append(Row(key[0], key[1].rstrip(b"\0").decode(errors="replace"), status,
                           order, flags, n, self.dur_sum.get(key, 0),
                           self.dur_max.get(key, 0)))
        return out


class Aggregator:
    """Builds the report from the parts of one event stream."""

    def __init__(self, header: dict, layouts: list[EventLayout] | None = None) -> None:
        """`layouts`: the ones the header describes, when the caller has them already."""
        self.header = header
        self.layouts = layouts if layouts is not None else layouts_from_header(header["events"])
        self.events = [_EventCounts(lay) for lay in self.layouts]
        self.pmds = PmdCorrelator(self.layouts, header.get("vma_flag_bits", {}),
                                  header.get("pagemap_ref"), header.get("settings"))
        self.last_stats: dict | None = None
        self.ended = False

    def add(self, part: Part) -> None:
        if part.kind == "R":
            self.events[part.event].add(part.data)
            if self.pmds.active:
                self.pmds.add(part.event, part.data)
        elif part.kind == "P":
            self.pmds.add_pages(part.meta)
        elif part.kind in ("S", "E"):
            self.last_stats = part.meta
            self.ended = self.ended or part.kind == "E"

    def result(self, warnings: list[str] | None = None) -> dict[str, Any]:
        h = self.header
        end = self.last_stats or {}
        rows = {ec.lay.name: ec.rows() for ec in self.events}
        events = {name: sum(r.count for r in rs) for name, rs in rows.items()}
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
            }
            for ec in self.events
        }
        for a in accounting.values():
            a["unaccounted"] = a["seen"] - a["recorded"] - a["lost"]
        start_counters = h.get("counters", {})
        end_counters = end.get("counters", start_counters)
        window = (end.get("mono_ns", h["start_mono_ns"]) - h["start_mono_ns"]) / 1e9
        # An attempt the ring buffer lost (or one whose count cannot be placed) would make
        # the inference pin PTEs wrongly (khmon.infer): then it pins nothing.
        whole = all(not a["lost"] and not a["unaccounted"] for name, a in accounting.items()
                    if name in (funcprobes.COLLAPSE, SWAPIN))
        pmds = self.pmds.records(infer_bitmaps=whole)
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
            "functions": _functions(h, rows),
            # One record per PMD the function probes saw (none without function probes).
            "pmds": pmds,
            "wasted": wasted(pmds, self.pmds.active),
            "kernel_counters": {"start": start_counters, "end": end_counters,
                                "delta": counter_delta(start_counters, end_counters)},
            # Refused by the ring buffer, plus probe runs the kernel skipped (recursion).
            "lost_events": sum(lost.values()) + sum(missed.values()),
            "accounting": accounting,
            "warnings": list(warnings or []),
        }


def _by_status(rows: list[Row]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for r in rows:
        if r.status is not None:
            c[r.status] += r.count
    return dict(c.most_common())


def _collapse(anon: list[Row], file: list[Row]) -> dict[str, Any]:
    by_order: dict[str, dict[str, Any]] = {}
    for r in anon:
        if r.order is None:
            continue
        o = by_order.setdefault(str(r.order), {"attempts": 0, "succeeded": 0, "by_status": {}})
        o["attempts"] += r.count
        o["succeeded"] += r.count if r.status == SUCCEEDED else 0
        o["by_status"][r.status] = o["by_status"].get(r.status, 0) + r.count
    return {
        "attempts": sum(r.count for r in anon),
        "succeeded": sum(r.count for r in anon if r.status == SUCCEEDED),
        "by_status": _by_status(anon),
        "by_order": dict(sorted(by_order.items(), key=lambda kv: -int(kv[0]))),
        "file": {"attempts": sum(r.count for r in file),
                 "succeeded": sum(r.count for r in file if r.status == SUCCEEDED),
                 "by_status": _by_status(file)},
    }


def _functions(h: dict, rows: dict[str, list[Row]]) -> dict[str, Any]:
    """What the function probes saw: collapse_huge_page calls with their results and time,
    and per-PMD scans by VMA flag (userfaultfd-armed or not)."""
    fp = h.get("function_probes", {})
    out: dict[str, Any] = {"mode": fp.get("mode"), "refused": fp.get("refused", {})}
    calls = rows.get(funcprobes.COLLAPSE, [])
    if calls:
        by_order: dict[str, dict[str, Any]] = {}
        for r in calls:
            o = by_order.setdefault(str(r.order if r.order is not None else "pmd"),
                                    {"calls": 0, "succeeded": 0, "seconds": 0.0, "max_ns": 0})
            o["calls"] += r.count
            o["succeeded"] += r.count if r.status == SUCCEEDED else 0
            o["seconds"] += r.dur_sum / 1e9
            o["max_ns"] = max(o["max_ns"], r.dur_max)
        out["collapse_huge_page"] = {
            "calls": sum(r.count for r in calls),
            "by_result": _by_status(calls),
            "seconds": sum(r.dur_sum for r in calls) / 1e9,
            "by_order": by_order,
        }
    scans = rows.get(funcprobes.PMD_SCAN, [])
    if scans:
        bits = h.get("vma_flag_bits", {})
        by_flag = {name: sum(r.count for r in scans if (r.vm_flags or 0) & mask)
                   for name, mask in bits.items()}
        uffd = [mask for name, mask in bits.items() if name.startswith("uffd")]
        out["pmd_scans"] = {
            "calls": sum(r.count for r in scans),
            "by_vma_flag": by_flag,
            "uffd_armed": (sum(r.count for r in scans if any((r.vm_flags or 0) & m
                                                               for m in uffd))
                           if uffd else None),
        }
    return out


def _processes(rows: dict[str, list[Row]]) -> list[dict[str, Any]]:
    procs: dict[int, dict[str, Any]] = defaultdict(
        lambda: {"comm": "", "scans": 0, "collapse_attempts": 0, "collapses": 0})
    for name, kind in ((SCAN_PMD, "scan"), (SCAN_FILE, "scan"), (COLLAPSE, "collapse"),
                       (COLLAPSE_FILE, "collapse")):
        for r in rows.get(name, []):
            p = procs[r.tgid]
            p["comm"] = p["comm"] or r.comm
            if kind == "scan":
                p["scans"] += r.count
            else:
                p["collapse_attempts"] += r.count
                p["collapses"] += r.count if r.status == SUCCEEDED else 0
    out = [{"pid": tgid or None, **p} for tgid, p in procs.items()]
    for p in out:
        if p["pid"] is None:
            p["comm"] = "(owner unknown)"
    out.sort(key=lambda p: (-p["collapses"], -p["scans"], p["pid"] or 0))
    return out
