"""The model: everything khmon knows about a stream, fed part by part, read by snapshots.

It consumes the parts of one event stream (khmon.stream.parts), whether they come from live
capture or a recording, so `khmon report FILE`, `khmon report --live` and the daemon give
the same answers for the same events. Each R part is decoded once (khmon.stream.decode) and
handed to the counters and the PMD correlator. Stats parts move the stream's clock: they
carry the in-kernel exact counts, settings changes, exited processes and PMDs whose detail
was lost, and they close passes that went idle.

Reading never changes the model: snapshot() and report() build fresh dicts. Every total only
grows. Every structure is bounded (PMD records, processes, queues), and what is dropped is
counted and reported under `model`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import heapq
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..geometry import PMD_ORDER
from ..kernel.sysfs import counter_delta
from ..stream.decode import Batch, Decoder
from ..stream.events import (
    COLLAPSE,
    COLLAPSE_FILE,
    FN_COLLAPSE,
    FN_PMD_SCAN,
    SCAN_FILE,
    SCAN_PMD,
    SUCCEEDED,
    SWAPIN,
)
from ..stream.layout import EventLayout, layouts_from_header
from ..stream.parts import END, PAGES, RECORDS, STATS, Part
from .correlate import DEFAULT_PMD_CAP, Correlator
from .counts import UFFD_UNKNOWN, UFFD_YES, Cell, EventCounts, ExactCounts
from .processes import DEFAULT_CAP as DEFAULT_PROCESS_CAP
from .processes import DEFAULT_LABELS, ProcessTable
from .records import Cost, ProcessRecord
from .waste import Waste, folio_bytes, unavailable, wasted_folio

MAX_SETTINGS_EPOCHS = 256  # settings changes remembered (older passes lose their inference)
MAX_LOST_KEYS = 16384  # (mm, PMD) loss counters followed
TOP = 20  # processes and PMDs in a snapshot


@dataclass(frozen=True)
class Snapshot:
    """What the model knew at one moment of the stream. `report` has the keys of
    `khmon report --json`, with its process and PMD lists capped to the most active."""

    seq: int
    mono_ns: int  # stream time: the latest stats part
    wall: str | None  # its wall-clock time (ISO 8601)
    report: dict[str, Any]
    processes_total: int
    pmds_total: int


class Model:
    """Feed it the parts of one stream; snapshot() and report() read it."""

    def __init__(self, header: dict, layouts: list[EventLayout] | None = None, *,
                 pmd_cap: int = DEFAULT_PMD_CAP, process_cap: int = DEFAULT_PROCESS_CAP,
                 exit_grace_s: float | None = None, process_labels: int = DEFAULT_LABELS) -> None:
        """`layouts`: the ones the header describes, when the caller has them already.
        `exit_grace_s`: how long an exited process's records stay (None: until the caps
        push them out, which is what a report of one window wants). `process_labels`: the
        comms that get a row of their own in `by_comm` (the rest count as "other")."""
        self.header = header
        self.layouts = layouts if layouts is not None else layouts_from_header(header["events"])
        self.decoder = Decoder(self.layouts)
        self.events = [EventCounts(lay) for lay in self.layouts]
        self.exact = ExactCounts(self.layouts)
        self.processes = ProcessTable(process_cap, None if exit_grace_s is None
                                      else int(exit_grace_s * 1e9), process_labels)
        self.waste = Waste()
        self.now_ns: int = header["start_mono_ns"]
        # settings epochs: (first epoch number kept, [(mono_ns, knobs)])
        self._epoch0 = 0
        self._settings: list[tuple[int, dict[str, str]]] = [(self.now_ns,
                                                             dict(header.get("settings", {})))]
        self.pmds = Correlator(self.layouts, header.get("vma_flag_bits", {}), self.processes,
                               self.waste, self._settings_at, self._epoch,
                               header.get("pagemap_ref"), pmd_cap)
        self._on_owner = [self._owner_counter(lay) for lay in self.layouts]
        self._lost_seen: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.last_stats: dict | None = None
        self.ended = False
        self.seq = 0
        self.snapshot_ns = 0  # how long the latest snapshot took to build

    # --- feeding ---------------------------------------------------------------------------

    def add(self, part: Part, batch: Batch | None = None) -> None:
        """One part of the stream. `batch`: the R part already decoded (the pipeline decodes
        once and shares the batch with the capture's own consumers)."""
        if part.kind == RECORDS:
            batch = batch or self.decoder.batch(part.event, part.data)
            if batch is not None:
                self.events[batch.layout.index].add(batch, self._owner,
                                                    self._on_owner[batch.layout.index])
                self.pmds.add(batch)
        elif part.kind == PAGES:
            self.pmds.add_pages(part.meta)
        elif part.kind in (STATS, END):
            self._stats(part.meta, part.kind == END)

    def _owner(self, mm: int, tgid: int, raw_comm: bytes) -> ProcessRecord:
        proc, forced = self.processes.get(mm, tgid, raw_comm, self.now_ns)
        for victim in forced:
            self.pmds.drop_process(victim, "process_cap")
        return proc

    def _owner_counter(self, lay: EventLayout) -> Callable[[ProcessRecord, tuple, int], None] | None:
        """How an event's counts add to its process: scans, or collapse attempts."""
        if lay.name in (SCAN_PMD, SCAN_FILE):
            def scans(p: ProcessRecord, _key: tuple, n: int) -> None:
                p.scans += n
            return scans
        if lay.name in (COLLAPSE, COLLAPSE_FILE) and lay.fmt.status_field:
            ok = {v for v, name in lay.fmt.symbols[lay.fmt.status_field].items()
                  if name == SUCCEEDED}

            def attempts(p: ProcessRecord, key: tuple, n: int) -> None:
                p.collapse_attempts += n
                if key[0] in ok:
                    p.collapses += n
            return attempts
        return None

    def _stats(self, meta: dict, end: bool) -> None:
        if not isinstance(meta.get("mono_ns"), int):
            return
        self.now_ns = max(self.now_ns, meta["mono_ns"])
        self.last_stats = meta
        self.exact.update(meta.get("probe") or {})
        if isinstance(meta.get("settings"), dict):
            self._settings.append((self.now_ns, dict(meta["settings"])))
            if len(self._settings) > MAX_SETTINGS_EPOCHS:
                del self._settings[0]
                self._epoch0 += 1
        for pid in meta.get("exited") or ():
            self.processes.exited(pid, self.now_ns)
        for mm, address, n in meta.get("lost_pmds") or ():
            key = (mm, address)
            before = self._lost_seen.get(key, 0)
            # the kernel's map is an LRU: a key it dropped and made again counts from 0
            self.pmds.mark_lost(mm, address, n - before if n >= before else n)
            self._lost_seen[key] = n
            self._lost_seen.move_to_end(key)
            if len(self._lost_seen) > MAX_LOST_KEYS:
                self._lost_seen.popitem(last=False)
        self.pmds.tick(self.now_ns)
        for p in self.processes.expire(self.now_ns):
            self.pmds.drop_process(p, "exited")
        if end:
            self.pmds.end()
            self.ended = True

    def _epoch(self) -> int:
        return self._epoch0 + len(self._settings) - 1

    def _settings_at(self, epoch: int) -> dict[str, str] | None:
        i = epoch - self._epoch0
        return self._settings[i][1] if 0 <= i < len(self._settings) else None

    # --- reading ---------------------------------------------------------------------------

    def snapshot(self, top: int = TOP) -> Snapshot:
        """The report as of now, with its lists capped to the `top` most active processes
        and PMDs: totals kept as the stream goes, one pass over the process table (bounded)
        to pick its top, the `top` most recent PMDs; never a walk over every PMD record."""
        t0 = time.perf_counter_ns()
        self.seq += 1
        procs = heapq.nlargest(top, self.processes.procs.values(), key=_activity)
        recent = []
        infer_ok = self._infer_ok()
        for p in reversed(self.pmds.pmds.values()):  # most recently active last in the table
            if len(recent) >= top:
                break
            recent.append(self.pmds.record_json(p, infer_ok))
        report = self._report(procs, recent, [])
        self.snapshot_ns = time.perf_counter_ns() - t0
        report["model"]["snapshot_seconds"] = self.snapshot_ns / 1e9
        return Snapshot(self.seq, self.now_ns, (self.last_stats or {}).get("wall"), report,
                        len(self.processes), len(self.pmds.pmds))

    def pmd_json(self, pid: int, address: int) -> dict[str, Any] | None:
        """One PMD's full record (any mm of that pid), or None if not held."""
        for proc in self.processes.procs.values():
            p = proc.pmds.get(address) if proc.pid == pid else None
            if p is not None:
                return self.pmds.record_json(p, self._infer_ok())
        return None

    def report(self, warnings: list[str] | None = None) -> dict[str, Any]:
        """The whole report: every process and every PMD record still held."""
        procs = sorted(self.processes.procs.values(),
                       key=lambda p: (-p.collapses, -p.scans, p.pid or 0))
        return self._report(procs, self.pmds.records(self._infer_ok()), warnings or [])

    def _accounting(self) -> dict[str, dict[str, int]]:
        probe = (self.last_stats or {}).get("probe") or {}
        seen, lost, missed = (probe.get(k) or {} for k in ("seen", "lost", "missed"))
        out = {}
        for ec in self.events:
            n = ec.lay.name
            a = {"seen": seen.get(n, 0), "recorded": ec.total, "records": ec.records,
                 "lost": lost.get(n, 0), "missed": missed.get(n, 0)}
            a["unaccounted"] = a["seen"] - a["recorded"] - a["lost"]
            out[n] = a
        return out

    def _infer_ok(self) -> bool:
        """An attempt the ring buffer lost would make the inference pin PTEs wrongly
        (khmon.model.infer): then it pins nothing."""
        acc = self._accounting()
        return all(not a["lost"] and not a["unaccounted"] for name, a in acc.items()
                   if name in (FN_COLLAPSE, SWAPIN))

    def _report(self, procs: list[ProcessRecord], pmds: list[dict[str, Any]],
                warnings: list[str]) -> dict[str, Any]:
        h = self.header
        end = self.last_stats or {}
        cells = {ec.lay.name: ec.cells() for ec in self.events}
        events = {ec.lay.name: ec.total for ec in self.events}
        accounting = self._accounting()
        start_counters = h.get("counters", {})
        end_counters = end.get("counters", start_counters)
        lost = sum(a["lost"] + a["missed"] for a in accounting.values())
        exact_waste = self._exact_waste()
        return {
            "kernel": {"release": h["kernel"]["release"],
                       "has_order": any(ec.has_order for ec in self.events),
                       "owner_source": h.get("owner_source", "unknown")},
            "window": {"seconds": round((self.now_ns - h["start_mono_ns"]) / 1e9, 3),
                       "start": h.get("start_wall"), "end": end.get("wall"),
                       "complete": self.ended},
            "filter": {"pid": (h.get("options") or {}).get("pid") or None},
            "settings": dict(self._settings[-1][1]),
            "settings_changes": [{"seconds": round((ns - h["start_mono_ns"]) / 1e9, 3),
                                  "epoch": self._epoch0 + i, "settings": dict(s)}
                                 for i, (ns, s) in enumerate(self._settings) if i or self._epoch0],
            "probes": dict(h.get("attached") or {}),
            "events": events,
            "collapse": _collapse(self._exact_cells(COLLAPSE, cells.get(COLLAPSE, [])),
                                  self._exact_cells(COLLAPSE_FILE, cells.get(COLLAPSE_FILE, []))),
            "exact_counts": self.exact.present,
            # updates of the exact counts the kernel map refused (full): those counts fall short
            "exact_map_full": int((end.get("probe") or {}).get("exact_full") or 0),
            # the pagemap source's reads (dropped, failures, unresolved, the first error), when
            # the capture sampled pagemap (khmon.capture.pagemap_sampler)
            "pagemap": end.get("pagemap"),
            "scan_pmd": {"by_status": _by_status(cells.get(SCAN_PMD, []))},
            "by_event": {name: {"count": events[name], "by_status": _by_status(cs)}
                         for name, cs in cells.items()},
            "processes": [p.to_json() for p in procs],
            "by_comm": {label: {**{k: v for k, v in row.items() if k != "waste"},
                                "waste": {r: c.to_json() for r, c in row["waste"].items()}}
                        for label, row in self.processes.by_comm().items()},
            "functions": self._functions(cells),
            "pmds": pmds,
            "wasted": (self.waste.to_json(self.processes.procs.values(), exact_waste)
                       if self.pmds.active else unavailable()),
            "kernel_counters": {"start": start_counters, "end": end_counters,
                                "delta": counter_delta(start_counters, end_counters)},
            "lost_events": lost,
            "accounting": accounting,
            "model": {"pmds_tracked": len(self.pmds.pmds), "pmd_cap": self.pmds.cap,
                      "pmds_evicted": dict(self.pmds.evicted),
                      "processes_tracked": len(self.processes),
                      "processes_forgotten": dict(self.processes.forgotten),
                      "process_labels": self.processes.labels.budget,
                      "process_label_overflow": self.processes.labels.overflow,
                      "dropped": dict(self.pmds.dropped),
                      "open_passes": len(self.pmds.open),
                      "decode_errors": self.decoder.errors},
            "warnings": list(warnings),
        }

    def _exact_cells(self, name: str, cells: list[Cell]) -> list[Cell]:
        """An event's (status, order) counts: per cell the larger of the records' count and
        the kernel's exact one (equal at the end of a stream, exact when records were lost)."""
        exact = self.exact.by_status_order(name)
        if not self.exact.present:
            return cells
        mine: Counter[tuple[str | None, int | None]] = Counter()
        for c in cells:
            mine[(c.status, c.order)] += c.count
        return [Cell(status, order, None, max(mine.get((status, order), 0),
                                              exact.get((status, order), 0)), 0, 0)
                for status, order in {*mine, *exact}]

    def _exact_waste(self) -> dict[str, Cost] | None:
        """uffd_isolate and alloc_then_fail as the kernel counted them (fn_collapse), and
        `vma_unknown`: the wasted folios among them whose VMA flags the probes did not see
        (counted under alloc_then_fail; an attempt in a scan that began before the per-PMD
        probe attached has no flags), so a reader can bound uffd_isolate from above."""
        if not self.exact.present:
            return None
        cells = self.exact.cells.get(FN_COLLAPSE, [])
        out = {"uffd_isolate": Cost(), "alloc_then_fail": Cost(), "vma_unknown": Cost()}
        for c in cells:
            if wasted_folio(c.status):
                cost = (c.count, c.count * folio_bytes(c.order if c.order is not None
                                                       else PMD_ORDER), c.dur_sum)
                out["uffd_isolate" if c.uffd == UFFD_YES else "alloc_then_fail"].add(*cost)
                if c.uffd == UFFD_UNKNOWN:
                    out["vma_unknown"].add(*cost)
        return out

    def _functions(self, cells: dict[str, list[Cell]]) -> dict[str, Any]:
        """What the function probes saw: collapse_huge_page calls with their results and time
        (the kernel's exact counts where the stream has them), and per-PMD scans by VMA flag."""
        fp = self.header.get("function_probes", {})
        out: dict[str, Any] = {"mode": fp.get("mode"), "refused": fp.get("refused", {})}
        calls = cells.get(FN_COLLAPSE, [])
        exact = self.exact.cells.get(FN_COLLAPSE)
        rows = ([(c.order, c.status, c.count, c.dur_sum, c.dur_max, c.uffd) for c in exact]
                if exact is not None else
                [(c.order, c.status, c.count, c.dur_sum, c.dur_max, None) for c in calls])
        if rows:
            by_order: dict[str, dict[str, Any]] = {}
            results: Counter[str] = Counter()
            uffd: Counter[str] = Counter()
            for order, status, n, ns, mx, armed in rows:
                o = by_order.setdefault(str(order if order is not None else "pmd"),
                                        {"calls": 0, "succeeded": 0, "seconds": 0.0, "max_ns": 0,
                                         "succeeded_seconds": 0.0, "by_result": Counter()})
                o["calls"] += n
                o["succeeded"] += n if status == SUCCEEDED else 0
                o["seconds"] += ns / 1e9
                o["succeeded_seconds"] += ns / 1e9 if status == SUCCEEDED else 0.0
                o["by_result"][status] += n
                o["max_ns"] = max(o["max_ns"], mx)
                results[status] += n
                if armed is not None:
                    uffd[{0: "no", 1: "yes"}.get(armed, "unknown")] += n
            for o in by_order.values():  # per order and result: what the exporter labels
                o["by_result"] = dict(o["by_result"].most_common())
            out["collapse_huge_page"] = {
                "calls": sum(results.values()),
                "by_result": dict(results.most_common()),
                "seconds": sum(r[3] for r in rows) / 1e9,
                "by_order": dict(sorted(by_order.items(), key=lambda kv: kv[0])),
                "exact": exact is not None,
            }
            if uffd:
                out["collapse_huge_page"]["by_uffd"] = dict(uffd)
            hist = self.exact.hist.get(FN_COLLAPSE)
            if hist:
                out["collapse_huge_page"]["latency_log2_ns"] = _histogram(hist)
        scans = cells.get(FN_PMD_SCAN, [])
        if scans:
            bits = self.header.get("vma_flag_bits", {})
            masks = [m for name, m in bits.items() if name.startswith("uffd")]
            out["pmd_scans"] = {
                "calls": sum(c.count for c in scans),
                "by_vma_flag": {name: sum(c.count for c in scans if (c.vm_flags or 0) & m)
                                for name, m in bits.items()},
                "uffd_armed": (sum(c.count for c in scans if any((c.vm_flags or 0) & m
                                                                   for m in masks))
                               if masks else None),
            }
        return out


def settle() -> None:
    """Collect the cycles of the last second, and take what survives out of the collector's
    reach. The process that owns the model calls this after each snapshot (khmon.pipeline).

    The model's records live long (a PMD record for as long as it is active), and CPython's
    automatic full collections walk every live container: with a full PMD table they take a
    tenth of a second and more, several times a second (docs/benchmarks.md, the soak),
    stalling the thread that drains the ring buffer. So the owner takes the collector over:
    automatic collection off (from the first call), then once a second a young-generation
    collection (it walks only what was made since the last call) and gc.freeze(), which
    moves the survivors to the permanent generation. Model records make no garbage cycles
    (an eviction unlinks a record from its process, its open pass and the top lists), so
    reference counting frees them.

    Then glibc's free memory is handed back (malloc_trim): an evicted record's larger blocks
    (dict tables, lists past 512 bytes) are freed into malloc's heap, which otherwise keeps
    the high-water mark of every burst resident. It costs about 0.25 ms with a full table;
    without it the soak's resident set rose 11% after warm-up, with it 3%
    (docs/benchmarks.md)."""
    gc.disable()
    gc.collect(1)
    gc.freeze()
    _trim_heap()


def _load_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where the C library has none (musl)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def trim_heap() -> None:
        trim(0)
    return trim_heap


_trim_heap = _load_trim()


def _activity(p: ProcessRecord) -> tuple[int, int]:
    """Most recently active first, then the busiest."""
    return (p.last_ns // 1_000_000_000, p.scans + p.collapse_attempts)


def _histogram(rows: Iterable[tuple[int | None, bool, int, int]]) -> dict[str, dict[str, dict[str, int]]]:
    """latency_log2_ns.<order>.<succeeded|failed>.<k> = calls that took [2^k, 2^(k+1)) ns."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for order, ok, bucket, n in sorted(rows, key=lambda r: (r[0] or 0, r[1], r[2])):
        o = out.setdefault(str(order if order is not None else "pmd"), {})
        o.setdefault("succeeded" if ok else "failed", {})[str(bucket)] = n
    return out


def _by_status(cells: Iterable[Cell]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for x in cells:
        if x.status is not None:
            c[x.status] += x.count
    return dict(c.most_common())


def _collapse(anon: list[Cell], file: list[Cell]) -> dict[str, Any]:
    by_order: dict[str, dict[str, Any]] = {}
    for r in anon:
        if r.order is None:
            continue
        o = by_order.setdefault(str(r.order), {"attempts": 0, "succeeded": 0, "by_status": {}})
        o["attempts"] += r.count
        o["succeeded"] += r.count if r.status == SUCCEEDED else 0
        o["by_status"][r.status] = o["by_status"].get(r.status, 0) + r.count
    for o in by_order.values():
        o["by_status"] = dict(sorted(o["by_status"].items(), key=lambda kv: -kv[1]))
    return {
        "attempts": sum(r.count for r in anon),
        "succeeded": sum(r.count for r in anon if r.status == SUCCEEDED),
        "by_status": _by_status(anon),
        "by_order": dict(sorted(by_order.items(), key=lambda kv: -int(kv[0]))),
        "file": {"attempts": sum(r.count for r in file),
                 "succeeded": sum(r.count for r in file if r.status == SUCCEEDED),
                 "by_status": _by_status(file)},
    }
