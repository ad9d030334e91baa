"""The daemon's Prometheus metrics: custom collectors that read state only when scraped.

docs/metrics.md is the contract (names, labels, sources). Three collectors, one concern each,
as node_exporter has one per file:

  SnapshotCollector  the latest khmon.model.model.Snapshot: probe health, accounting, the
                     collapse path, waste, per-comm totals. It never touches the model: a
                     snapshot is immutable, published by the pipeline's worker once a second.
  KernelCollector    the kernel's own counters and settings, read from sysfs and /proc/vmstat
                     at scrape time (khmon.kernel.sysfs), so they sit beside khmon's counts.
  ServiceCollector   the daemon's own parts (the socket API, the flight recorder), from a
                     callable the daemon provides.

Families are built from prometheus_client's *MetricFamily classes, not live Counter objects:
no `_created` series, nothing kept between scrapes, and the exposition format (text 0.0.4 or
OpenMetrics) is whatever the scraper negotiates. Label values are bounded by construction:
statuses come from the kernel's format files, orders are 2..9, reasons are khmon.model.waste's
six, and comms are the model's label budget plus "other" and "(owner unknown)". No pid and no
PMD address is ever a label.

Each collector's own success and duration are exported too (khmon_scrape_collector_*), as
node_exporter does: a sysfs file that vanished mid-scrape makes a family absent and the
collector's success 0, never a failed scrape.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__
from ..geometry import PAGE, PMD_ORDER
from ..kernel.sysfs import read_counters, read_settings, selected
from ..model.model import Snapshot
from ..model.waste import REASONS
from ..stream.events import (
    COLLAPSE,
    COLLAPSE_FILE,
    FN_COLLAPSE,
    FN_PMD_SCAN,
    SCAN_PMD,
    SUCCEEDED,
)
from ..stream.layout import layouts_from_header

NS = "khmon"
MIN_ORDER = 2  # the smallest anonymous mTHP order (16 kB with 4 kB pages)
# collapse_huge_page durations: the kernel counts log2 buckets ([2^k, 2^(k+1)) ns); these are
# the upper bounds exported, 2^10 ns (1 us) to 2^35 ns (34 s). Fixed, so a series never
# changes its bucket set; shorter calls fall in the first bucket, longer ones in +Inf.
DURATION_BOUNDS_LOG2 = range(10, 36)
PMD_EVICTION_REASONS = ("lru", "exited", "process_cap")
MODEL_DROPS = ("isolate", "swapin", "pending_scans")
LOST_REASONS = {"lost": "ringbuf_full", "missed": "recursion"}
THP_INFO_SETTINGS = ("enabled", "defrag", "shmem_enabled", "use_zero_page")
WASTE_HELP = ("Reasons overlap (one attempt can be uffd_isolate, order_cascade and "
              "futile_rescan at once): never sum across reason.")


@dataclass(frozen=True)
class DaemonFacts:
    """What does not change while the daemon runs: the capture's header and what the
    daemon was asked to do. `bcc` is the loaded bcc's version."""

    header: dict[str, Any]
    bcc: str = "unknown"
    features: dict[str, bool] = field(default_factory=dict)  # flight_recorder, tls


def probe_kinds(header: dict[str, Any]) -> dict[str, str]:
    """Each traced event's probe kind: raw_tracepoint (arguments from BTF), tracepoint, or
    the function-probe mode (kfunc, kprobe) for khmon's function events."""
    mode = (header.get("function_probes") or {}).get("mode") or "function"
    return {e["name"]: mode if "probe" in e else "raw_tracepoint" if "raw_args" in e
            else "tracepoint" for e in header.get("events", ())}


def bitmap_source(header: dict[str, Any]) -> str:
    """Where this capture's PMD bitmaps come from, best first (khmon.model.records.SOURCES):
    the kernel's mthp_present_ptes read at collapse_huge_page, the BPF PTE walk at the
    per-PMD function, user space's pagemap after a scan, or only what the attempts imply."""
    fields = {e["name"]: {f[0] for f in e.get("fields", ())} for e in header.get("events", ())}
    if "present" in fields.get(FN_COLLAPSE, ()):
        return "kernel"
    if "walk" in fields.get(FN_PMD_SCAN, ()):
        return "ptwalk"
    if header.get("pagemap_ref"):
        return "pagemap"
    return "inferred" if FN_COLLAPSE in fields or FN_PMD_SCAN in fields else "none"


def status_zeros(header: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """(order, status) of the collapse-path series exported as 0 until counted, by kind
    (and "scan" for scan_pmd's statuses, order ""), on this kernel.

    A counter series that first appears at a nonzero value hides that value from
    increase() and rate() (Prometheus takes the first sample as the baseline). So the
    successes of every kind and order (2..9 where the event has an order field, else 9) and
    every scan verdict of the format file exist from the first scrape. Failed attempts by
    status are not pre-created: the format's 32 statuses times 8 orders times 2 kinds are
    over 500 series, most of which a kernel never produces, and they doubled the time a
    scrape takes; a failure status's series is born at its first attempt (docs/metrics.md)."""
    lays = {lay.name: lay for lay in layouts_from_header(header.get("events", []))}
    out: dict[str, list[tuple[str, str]]] = {}
    for kind, name in (("anon", COLLAPSE), ("file", COLLAPSE_FILE), ("function", FN_COLLAPSE),
                       ("scan", SCAN_PMD)):
        lay = lays.get(name)
        if lay is None or not lay.fmt.status_field:
            continue
        if kind == "scan":
            out[kind] = [("", st) for st in sorted(set(
                lay.fmt.symbols[lay.fmt.status_field].values()))]
            continue
        orders = (range(MIN_ORDER, PMD_ORDER + 1) if "order" in lay.field_names
                  else [PMD_ORDER])
        out[kind] = [(str(o), SUCCEEDED) for o in orders]
    return out


def _epoch_seconds(wall: str | None) -> float | None:
    if not wall:
        return None
    try:
        return dt.datetime.fromisoformat(wall).timestamp()
    except ValueError:
        return None


def _order_label(order: str) -> str:
    """The report's order keys: a number, or "pmd" where the kernel names no order (every
    attempt is PMD-sized there)."""
    return str(PMD_ORDER) if order == "pmd" else order


class SnapshotCollector(Collector):
    """khmon's own counts, from the latest snapshot (nothing but build info before the
    first one: the probes are still being compiled)."""

    def __init__(self, latest: Callable[[], Snapshot | None], facts: DaemonFacts) -> None:
        self.latest = latest
        self.facts = facts
        self.kinds = probe_kinds(facts.header)
        self.zeros = status_zeros(facts.header)

    def describe(self) -> list[Metric]:
        return []  # families depend on the kernel: not known before a scrape

    def collect(self) -> Iterator[Metric]:
        yield self._build_info()
        snap = self.latest()
        if snap is None:
            return
        r = snap.report
        yield from self._health(snap, r)
        yield from self._collapse_path(r)
        yield from self._processes(r)

    def _build_info(self) -> Metric:
        g = GaugeMetricFamily(f"{NS}_build_info", "khmon's version, and the Python and bcc "
                              "it runs on (value 1).", labels=["version", "python", "bcc"])
        g.add_metric([__version__, platform.python_version(), self.facts.bcc], 1)
        return g

    def _health(self, snap: Snapshot, r: dict[str, Any]) -> Iterator[Metric]:
        h = self.facts.header
        fp = (h.get("function_probes") or {}).get("mode") or "none"
        g = GaugeMetricFamily(f"{NS}_kernel_info", "What the running kernel offers and khmon "
                              "uses: release, whether its collapse tracepoints have an order "
                              "field, the PMD bitmap source, the function-probe mode (value 1).",
                              labels=["release", "order_field", "bitmap_source",
                                      "function_probes"])
        g.add_metric([r["kernel"]["release"], str(bool(r["kernel"]["has_order"])).lower(),
                      bitmap_source(h), fp], 1)
        yield g
        g = GaugeMetricFamily(f"{NS}_probe_attached", "1 if the probe is attached; 0 if it "
                              "failed to attach (the daemon runs without it).",
                              labels=["probe", "kind"])
        for name, err in sorted(r["probes"].items()):
            g.add_metric([name, self.kinds.get(name, "tracepoint")], 0 if err else 1)
        yield g
        feats = {"function_probes": fp != "none", "exact_counts": bool(r["exact_counts"]),
                 "pmd_records": bool(r["wasted"].get("available")),
                 "uffd_flags": fp != "none" and any(k.startswith("uffd")
                                                    for k in h.get("vma_flag_bits") or {}),
                 **self.facts.features}
        g = GaugeMetricFamily(f"{NS}_feature_enabled", "1 if this daemon does it: "
                              "function_probes, exact_counts (in-kernel collapse counts), "
                              "pmd_records, uffd_flags, flight_recorder, tls.",
                              labels=["feature"])
        for name, on in sorted(feats.items()):
            g.add_metric([name], int(on))
        yield g

        acc = r["accounting"]
        fams = {
            "hits": CounterMetricFamily(
                f"{NS}_probe_hits", "Times the probe fired: events khmon's program handled, "
                "plus runs the kernel skipped (recursion). Counted in the kernel.",
                labels=["tracepoint"]),
            "events": CounterMetricFamily(
                f"{NS}_events", "Events in the records that reached user space (a "
                "deduplicated record counts the repeats it stands for).", labels=["tracepoint"]),
            "records": CounterMetricFamily(
                f"{NS}_ringbuf_records", "Records that crossed the ring buffer.",
                labels=["tracepoint"]),
            "lost": CounterMetricFamily(
                f"{NS}_lost_events", "Events khmon could not deliver: the ring buffer was "
                "full (ringbuf_full), or the kernel skipped the program because another BPF "
                "program ran on that CPU (recursion). Counted in the kernel.",
                labels=["tracepoint", "reason"]),
            "pending": GaugeMetricFamily(
                f"{NS}_events_pending", "Events counted in the kernel whose records the "
                "in-kernel dedup still holds: a scanned PMD's repeats wait in its slot until it "
                "is scanned again after the next epoch, another PMD takes the slot, or the "
                "capture ends. hits = events + lost + pending.", labels=["tracepoint"]),
        }
        for name, a in sorted(acc.items()):
            fams["hits"].add_metric([name], a["seen"] + a["missed"])
            fams["events"].add_metric([name], a["recorded"])
            fams["records"].add_metric([name], a["records"])
            for key, reason in LOST_REASONS.items():
                fams["lost"].add_metric([name, reason], a[key])
            fams["pending"].add_metric([name], a["unaccounted"])
        yield from fams.values()

        m = r["model"]
        yield _counter("decode_errors", "Record parts that did not fit their layout (a khmon "
                       "bug if ever nonzero).", m["decode_errors"])
        yield _gauge("pmds_tracked", "PMD records held (bounded by the model's cap).",
                     m["pmds_tracked"])
        yield _labelled(CounterMetricFamily, "pmds_evicted", "PMD records forgotten: lru (the "
                        "cap), exited (the process exited), process_cap (the process table "
                        "was full).", "reason", {k: m["pmds_evicted"].get(k, 0)
                                                  for k in (*PMD_EVICTION_REASONS,
                                                            *m["pmds_evicted"])})
        yield _gauge("processes_tracked", "Processes held (bounded).", m["processes_tracked"])
        pagemap = r.get("pagemap") or {}
        dropped = {k: m["dropped"].get(k, 0) for k in (*MODEL_DROPS, *m["dropped"])}
        if pagemap:
            dropped["pagemap_requests"] = pagemap.get("dropped", 0)
        yield _labelled(CounterMetricFamily, "model_dropped", "Detail the bounded queues "
                        "could not keep (pagemap_requests: PMD reads the pagemap source's "
                        "queue refused).", "what", dropped)
        if pagemap:
            yield _counter("pagemap_failures", "pagemap reads that failed (the process "
                           "exited, or no permission: another user's process needs "
                           "CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH).", pagemap.get("failures", 0))
            yield _counter("pagemap_unresolved", "Scanned pages the pagemap source could not "
                           "place in a PMD of their process (it no longer maps them).",
                           pagemap.get("unresolved", 0))
            yield _counter("pagemap_index_evictions", "Processes' PFN indexes the pagemap "
                           "source dropped to stay within its bounds (rebuilt when the "
                           "process is scanned again).", pagemap.get("index_evicted", 0))
        yield _counter("exact_map_full", "Exact-count updates the kernel map refused because "
                       "it was full.", r.get("exact_map_full", 0))
        yield _counter("process_label_overflow", "Distinct comms counted under "
                       'comm=other because --max-process-labels was spent.',
                       m["process_label_overflow"])
        yield _gauge("snapshot_duration_seconds", "Time the latest snapshot took to build.",
                     m.get("snapshot_seconds", 0.0))
        wall = _epoch_seconds(snap.wall)
        if wall is not None:
            yield _gauge("snapshot_timestamp_seconds", "Wall time of the latest snapshot "
                         "(published once a second: a stale value means the pipeline "
                         "stopped).", wall)

    def _collapse_path(self, r: dict[str, Any]) -> Iterator[Metric]:
        scans = {st: 0 for _o, st in self.zeros.get("scan", ())}
        yield _labelled(CounterMetricFamily, "scan_pmd", "mm_khugepaged_scan_pmd events by "
                        "verdict (the kernel's scan_result names).", "status",
                        {**scans, **r["scan_pmd"]["by_status"]})
        cells: dict[tuple[str, str, str], float] = {
            (kind, o, st): 0 for kind, rows in self.zeros.items() if kind != "scan"
            for o, st in rows}
        col = r["collapse"]
        if col["by_order"]:
            for order, o in col["by_order"].items():
                for status, n in o["by_status"].items():
                    cells["anon", order, status] = n
        else:
            for status, n in col["by_status"].items():
                cells["anon", str(PMD_ORDER), status] = n
        for status, n in col["file"]["by_status"].items():
            cells["file", str(PMD_ORDER), status] = n
        chp = r["functions"].get("collapse_huge_page")
        for order, o in (chp or {}).get("by_order", {}).items():
            for status, n in o.get("by_result", {}).items():
                cells["function", _order_label(order), status] = n
        c = CounterMetricFamily(f"{NS}_collapse_attempts", "Collapse attempts by outcome: "
                                "anon (mm_collapse_huge_page), file "
                                "(mm_khugepaged_collapse_file), function (collapse_huge_page "
                                "calls the function probes saw). order is 9 where the "
                                "kernel's event has no order field. Successes are exported "
                                "from the start (at 0); a failure status from its first "
                                "attempt.",
                                labels=["kind", "order", "status"])
        for key, n in sorted(cells.items()):
            c.add_metric(list(key), n)
        yield c
        if chp and chp.get("latency_log2_ns"):
            yield _durations(chp)
        w = r["wasted"]
        if w.get("available"):
            by = w["by_reason"]
            for what, unit, help_ in (("attempts", "", "Wasted collapse work by reason: "
                                                         "collapse_huge_page calls (futile_"
                                                         "rescan: rescans)."),
                                      ("bytes", "bytes", "Memory wasted by reason: folios "
                                       "allocated and thrown away, or zeroed pages a collapse "
                                       "added (bloat, creep)."),
                                      ("seconds", "seconds", "Time spent in the wasted "
                                       "collapse_huge_page calls, by reason.")):
                name = f"wasted_{what}" if unit else "wasted_attempts"
                yield _labelled(CounterMetricFamily, name, f"{help_} {WASTE_HELP}", "reason",
                                {reason: by.get(reason, {}).get(what, 0) for reason in REASONS})

    def _processes(self, r: dict[str, Any]) -> Iterator[Metric]:
        rows = r["by_comm"]
        simple = (("scans", "process_scans", "Scans of the comm's memory (mm_khugepaged_scan_"
                   "pmd, scan_file records)."),
                  ("collapse_attempts", "process_collapse_attempts", "Collapse attempts on "
                   "the comm's memory (mm_collapse_huge_page, collapse_file records)."),
                  ("collapses", "process_collapses", "Successful collapses of the comm's "
                   "memory."),
                  ("uffd_attempts", "process_uffd_attempts", "Collapse attempts in "
                   "userfaultfd-armed VMAs of the comm (function probes)."))
        tail = (" Labelled by the comm a process had when first seen; past "
                '--max-process-labels new comms count under comm=other.')
        for key, name, help_ in simple:
            yield _labelled(CounterMetricFamily, name, help_ + tail, "comm",
                            {comm: row.get(key, 0) for comm, row in rows.items()})
        for what, name in (("attempts", "process_wasted_attempts"),
                           ("bytes", "process_wasted_bytes")):
            c = CounterMetricFamily(f"{NS}_{name}", f"Wasted collapse {what} of the comm, by "
                                    f"reason. {WASTE_HELP}{tail}", labels=["comm", "reason"])
            for comm, row in sorted(rows.items()):
                for reason, cost in sorted(row.get("waste", {}).items()):
                    c.add_metric([comm, reason], cost[what])
            yield c


def _durations(chp: dict[str, Any]) -> Metric:
    """The kernel's log2 histogram of collapse_huge_page durations as a Prometheus
    histogram: cumulative buckets at fixed bounds, the sum from the exact durations."""
    h = HistogramMetricFamily(f"{NS}_collapse_duration_seconds", "collapse_huge_page "
                              "duration by order and outcome (function probes; counted in "
                              "the kernel in power-of-two nanosecond buckets).",
                              labels=["order", "outcome"])
    for order, outcomes in sorted(chp["latency_log2_ns"].items()):
        o = chp["by_order"].get(order, {})
        for outcome, buckets in sorted(outcomes.items()):
            counts = {int(k): n for k, n in buckets.items()}
            total = sum(counts.values())
            cum = [(_bound(k), sum(n for b, n in counts.items() if b < k))
                   for k in DURATION_BOUNDS_LOG2]
            seconds = o.get("succeeded_seconds", 0.0)
            if outcome != "succeeded":
                seconds = max(0.0, o.get("seconds", 0.0) - seconds)
            h.add_metric([_order_label(order), outcome], [*cum, ("+Inf", total)], seconds)
    return h


def _bound(k: int) -> str:
    return repr(2.0 ** k / 1e9)


def _counter(name: str, help_: str, value: float) -> Metric:
    return CounterMetricFamily(f"{NS}_{name}", help_, value=value)


def _gauge(name: str, help_: str, value: float) -> Metric:
    return GaugeMetricFamily(f"{NS}_{name}", help_, value=value)


def _labelled(cls: type, name: str, help_: str, label: str, values: dict[str, float]) -> Metric:
    fam = cls(f"{NS}_{name}", help_, labels=[label])
    for k, v in sorted(values.items()):
        fam.add_metric([k], v)
    return fam


class KernelCollector(Collector):
    """The kernel's THP counters and settings at scrape time (node_exporter's ksmd naming:
    counters get `_total`, *_millisecs become `_seconds`). A file the kernel lacks is a
    family that is absent, never a 0."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counters = read_counters()
        settings = read_settings()
        mthp: dict[str, dict[tuple[str, str], int]] = {}
        for key, v in sorted(counters.items()):
            if key.startswith("thp_"):
                yield CounterMetricFamily(f"{NS}_vmstat_{key}", f"/proc/vmstat {key}.", value=v)
            elif key.startswith("khugepaged/"):
                name = key.split("/", 1)[1]
                yield CounterMetricFamily(f"{NS}_khugepaged_{name}",
                                          f"transparent_hugepage/{key}.", value=v)
            elif key.startswith("hugepages-"):
                size_dir, _, stat = key.partition("/")  # hugepages-64kB/<stats file>
                mthp.setdefault(stat, {})[_size_labels(size_dir)] = v
        for stat, by_size in sorted(mthp.items()):
            gauge = stat.startswith("nr_")
            cls = GaugeMetricFamily if gauge else CounterMetricFamily
            fam = cls(f"{NS}_mthp_{stat}", f"transparent_hugepage/hugepages-<size>/stats/{stat}"
                      " per mTHP size.", labels=["size", "order"])
            for labels, v in sorted(by_size.items(), key=lambda kv: int(kv[0][1])):
                fam.add_metric(list(labels), v)
            yield fam
        yield from _settings(settings)


def _size_labels(size_dir: str) -> tuple[str, str]:
    """hugepages-64kB -> ("64kB", "4"): the size as sysfs names it, and its folio order."""
    size = size_dir[len("hugepages-"):]
    kb = int(size[:-2])
    return size, str(int(math.log2(kb * 1024 // PAGE)))


def _settings(settings: dict[str, str]) -> Iterator[Metric]:
    info = GaugeMetricFamily(f"{NS}_thp_setting_info", "THP settings: the bracketed choice "
                             "of each transparent_hugepage/ file (value 1).",
                             labels=["setting", "value"])
    mthp = GaugeMetricFamily(f"{NS}_mthp_enabled_info", "hugepages-<size>/enabled per mTHP "
                             "size (value 1).", labels=["size", "order", "value"])
    for key, raw in sorted(settings.items()):
        if key in THP_INFO_SETTINGS:
            info.add_metric([key, selected(raw)], 1)
        elif key.startswith("hugepages-") and key.endswith("/enabled"):
            mthp.add_metric([*_size_labels(key.split("/", 1)[0]), selected(raw)], 1)
        elif key.startswith("khugepaged/") and raw.lstrip("-").isdigit():
            name = key.split("/", 1)[1]
            value = int(raw)
            if name.endswith("_millisecs"):
                name, value = name[: -len("_millisecs")] + "_seconds", value / 1000
            yield GaugeMetricFamily(f"{NS}_khugepaged_{name}",
                                    f"transparent_hugepage/{key} (in base units).", value=value)
    yield info
    if mthp.samples:
        yield mthp


class ServiceCollector(Collector):
    """The daemon's own parts (the socket server, the flight recorder): `read()` yields
    their metric families; the daemon knows what it runs."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.read = read

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.read()


class Timed(Collector):
    """Wraps collectors with node_exporter's scrape_collector_success and _duration_seconds:
    a collector that raises yields what it had and a 0, and the scrape still succeeds."""

    def __init__(self, collectors: dict[str, Collector]) -> None:
        self.collectors = collectors

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        dur = GaugeMetricFamily(f"{NS}_scrape_collector_duration_seconds", "Time each khmon "
                                "collector took in this scrape.", labels=["collector"])
        ok = GaugeMetricFamily(f"{NS}_scrape_collector_success", "1 if the collector "
                               "finished this scrape without error.", labels=["collector"])
        for name, coll in self.collectors.items():
            t0 = time.perf_counter()
            fams: list[Metric] = []
            try:
                fams.extend(coll.collect())
                success = 1
            except (OSError, ValueError, KeyError):  # a vanished sysfs file, an odd value
                success = 0
            dur.add_metric([name], time.perf_counter() - t0)
            ok.add_metric([name], success)
            yield from fams
        yield dur
        yield ok
