"""The khmon overview dashboard: every daemon the job and instance variables select, in rows.

Each panel's query uses only metrics of docs/metrics.md. Counters are read as rates over
$__rate_interval, or as increases over $__range where a panel gives totals for the time
range. Waste reasons overlap (one attempt can count under three), so every waste query keeps
`reason` in its grouping and no panel adds reasons together.
"""

from __future__ import annotations

from .panels import (
    FUNCTION_PROBES,
    ORDER_FIELD,
    PMD_RECORDS,
    Dashboard,
    Panel,
    Query,
    Row,
    increase,
    mthp_stat,
    rate,
    sel,
)

UID = "khmon-overview"
ATTEMPTS = "khmon_collapse_attempts_total"
# mm_collapse_huge_page and mm_khugepaged_collapse_file: one count per collapse attempt.
# kind="function" counts the same calls again, from the function probes, and stays out.
TRACEPOINT_KINDS = 'kind=~"anon|file"'
SUCCEEDED = 'status="succeeded"'
ANON = 'kind="anon"'
ATTACHED = {"0": ("not attached", "red"), "1": ("attached", "green")}
ENABLED = {"0": ("off", "text"), "1": ("on", "green")}
WASTE_FAMILIES = (
    ("khmon_wasted_attempts_total", "Wasted attempts per reason", "ops",
     "Collapse attempts that did work for nothing, per second, by reason."),
    ("khmon_wasted_bytes_total", "Wasted memory per reason", "Bps",
     "Memory per second: folios allocated and thrown away (uffd_isolate, alloc_then_fail, "
     "futile_rescan, order_cascade) or zero-filled pages a collapse added (bloat, creep)."),
    ("khmon_wasted_seconds_total", "Time in wasted collapse_huge_page calls", "percentunit",
     "Seconds spent in those collapse_huge_page calls per second: 100% is one CPU busy all the time."),
)


def per_instance(metric: str, *matchers: str) -> str:
    """A counter's rate summed per daemon (the series have no other labels, or they are summed)."""
    return f"sum by (instance) ({rate(metric, *matchers)})"


def agreement_succeeded() -> str:
    return per_instance(ATTEMPTS, TRACEPOINT_KINDS, SUCCEEDED)


def agreement_kernel() -> str:
    return per_instance("khmon_khugepaged_pages_collapsed_total")


def agreement_totals() -> tuple[str, str]:
    """khmon's succeeded collapses and the kernel's pages_collapsed over the time range."""
    return (f"sum by (instance) ({increase(ATTEMPTS, TRACEPOINT_KINDS, SUCCEEDED)})",
            f"sum by (instance) ({increase('khmon_khugepaged_pages_collapsed_total')})")


def health() -> Row:
    return Row("Health", (
        Panel("stat", "Probes attached", (
            "One value per probe: attached, or not attached (the daemon runs without a probe that "
            "failed to attach; its events are then missing from every count). khmon_probe_attached."),
            "none", (Query(f"min by (probe, kind) ({sel('khmon_probe_attached')})", "{{probe}} ({{kind}})",
                           instant=True),),
            w=8, h=8, mappings=ATTACHED, text_mode="value_and_name",
            thresholds=((None, "red"), (1, "green"))),
        Panel("timeseries", "Lost events by tracepoint and reason", (
            "Events khmon could not deliver, per second: ringbuf_full (the ring buffer refused the "
            "record) or recursion (the kernel skipped the program). Counts marked exact in "
            "docs/metrics.md stay right; counts from records fall short by these."),
            "cps", (Query(f"sum by (tracepoint, reason) ({rate('khmon_lost_events_total')})",
                          "{{tracepoint}} {{reason}}"),), w=8, min=0),
        Panel("timeseries", "Probe hits against events + lost", (
            "Per tracepoint, the times the probe fired beside the events that reached user space "
            "plus the events lost. The in-kernel dedup holds a scanned PMD's repeats until it is "
            "flushed (khmon_events_pending, beside), so the second line lags the first by at most "
            "those; a gap that keeps growing is a khmon bug."),
            "cps", (
                Query(f"sum by (tracepoint) ({rate('khmon_probe_hits_total')})", "{{tracepoint}} hits"),
                Query(f"sum by (tracepoint) ({rate('khmon_events_total')} or "
                      f"{rate('khmon_lost_events_total')})", "{{tracepoint}} events + lost"),
            ), w=8, min=0),
        Panel("timeseries", "Events pending in the kernel's dedup", (
            "Events counted in the kernel whose records the in-kernel dedup still holds "
            "(khmon_events_pending): hits = events + lost + pending. Flushed at the next scan of "
            "the PMD after an epoch (every second), or when another PMD takes the slot."),
            "none", (Query(f"sum by (tracepoint) ({sel('khmon_events_pending')})", "{{tracepoint}}"),),
            w=8, min=0),
        Panel("stat", "Collectors", (
            "Whether each of the daemon's collectors finished the latest scrape without error "
            "(khmon_scrape_collector_success): a failed one leaves its families out of the scrape."),
            "none", (Query(f"min by (collector) ({sel('khmon_scrape_collector_success')})", "{{collector}}",
                           instant=True),), w=4, h=8, mappings={"0": ("failed", "red"), "1": ("ok", "green")},
            text_mode="value_and_name", thresholds=((None, "red"), (1, "green"))),
        Panel("table", "khmon build", "khmon_build_info: version of khmon, Python and bcc per daemon.",
              "none", (Query(f"max by (instance, version, python, bcc) ({sel('khmon_build_info')})",
                             instant=True, fmt="table"),), w=8, h=6),
        Panel("table", "Kernel", (
            "khmon_kernel_info: the kernel release, whether its tracepoints carry the mTHP order "
            "field, where PMD bitmaps come from, and which function probes khmon uses."),
            "none", (Query(f"max by (instance, release, order_field, bitmap_source, function_probes) "
                           f"({sel('khmon_kernel_info')})", instant=True, fmt="table"),), w=10, h=6),
        Panel("stat", "Features", "khmon_feature_enabled: what this daemon does.", "none",
              (Query(f"min by (feature) ({sel('khmon_feature_enabled')})", "{{feature}}", instant=True),),
              w=6, h=6, mappings=ENABLED, text_mode="value_and_name"),
        Panel("timeseries", "Scrape and snapshot duration", (
            "How long Prometheus's scrape of the daemon took (scrape_duration_seconds) and how long "
            "the daemon's latest snapshot took to build (khmon_snapshot_duration_seconds)."),
            "s", (Query(f"max by (instance) ({sel('scrape_duration_seconds')})", "{{instance}} scrape"),
                  Query(f"max by (instance) ({sel('khmon_snapshot_duration_seconds')})",
                        "{{instance}} snapshot")), w=8, min=0),
        Panel("stat", "Snapshot age", (
            "Seconds since the daemon built its latest snapshot (time() - "
            "khmon_snapshot_timestamp_seconds). More than a few seconds: its pipeline stopped."),
            "s", (Query(f"max by (instance) (time() - {sel('khmon_snapshot_timestamp_seconds')})",
                        "{{instance}}", instant=True),),
            w=4, thresholds=((None, "green"), (10, "orange"), (30, "red"))),
        Panel("timeseries", "Dropped detail and decode errors", (
            "Detail the model's bounded queues could not keep (khmon_model_dropped_total by what), "
            "exact-count updates refused by a full kernel map, and record parts that did not fit "
            "their layout (a khmon bug if ever above zero), per second."),
            "cps", (Query(f"sum by (what) ({rate('khmon_model_dropped_total')})", "dropped {{what}}"),
                    Query(f"sum({rate('khmon_exact_map_full_total')})", "exact map full"),
                    Query(f"sum({rate('khmon_decode_errors_total')})", "decode errors")), w=12, min=0),
    ))


def khugepaged() -> Row:
    settings = (
        ("khmon_khugepaged_scan_sleep_seconds", "scan_sleep", "s"),
        ("khmon_khugepaged_alloc_sleep_seconds", "alloc_sleep", "s"),
        ("khmon_khugepaged_pages_to_scan", "pages_to_scan", "none"),
        ("khmon_khugepaged_max_ptes_none", "max_ptes_none", "none"),
        ("khmon_khugepaged_max_ptes_swap", "max_ptes_swap", "none"),
        ("khmon_khugepaged_max_ptes_shared", "max_ptes_shared", "none"),
    )
    stats = tuple(
        Panel("stat", name, f"khugepaged/{name}{'_millisecs, in seconds' if unit == 's' else ''}, "
              "per instance, as the daemon read it at the latest scrape.", unit,
              (Query(f"max by (instance) ({sel(metric)})", "{{instance}}", instant=True),), w=3, h=4)
        for metric, name, unit in settings)
    return Row("khugepaged", (
        Panel("timeseries", "Scans by verdict", (
            "mm_khugepaged_scan_pmd events per second by the kernel's verdict (its scan_result "
            "names): succeeded means the PMD was handed to collapse."),
            "ops", (Query(f"sum by (status) ({rate('khmon_scan_pmd_total')})", "{{status}}"),),
            w=8, stack=True, min=0),
        Panel("timeseries", "Collapse attempts and successes", (
            "Collapse attempts per second (mm_collapse_huge_page for anonymous memory, "
            "mm_khugepaged_collapse_file for files and shmem) and those that succeeded. Counted in "
            "the kernel: exact even when records are lost."),
            "ops", (Query(f"sum by (kind) ({rate(ATTEMPTS, TRACEPOINT_KINDS)})", "{{kind}} attempts"),
                    Query(f"sum by (kind) ({rate(ATTEMPTS, TRACEPOINT_KINDS, SUCCEEDED)})",
                          "{{kind}} succeeded")), w=8, min=0),
        Panel("timeseries", "Collapse attempts by outcome", (
            "Collapse attempts per second by the kernel's status: why the attempts that did not "
            "succeed failed (exceed_none_pte at isolate, alloc_huge_page_failed, ...)."),
            "ops", (Query(f"sum by (status) ({rate(ATTEMPTS, TRACEPOINT_KINDS)})", "{{status}}"),),
            w=8, stack=True, min=0),
        Panel("timeseries", "Collapse success ratio", (
            "Succeeded collapse attempts over all attempts, per instance. No value where nothing "
            "was attempted."),
            "percentunit", (Query(f"{per_instance(ATTEMPTS, TRACEPOINT_KINDS, SUCCEEDED)} / "
                                  f"{per_instance(ATTEMPTS, TRACEPOINT_KINDS)}", "{{instance}}"),),
            w=8, min=0),
        Panel("timeseries", "Succeeded collapses: khmon and the kernel's pages_collapsed", (
            "khmon's succeeded collapse attempts beside the kernel's own khugepaged/pages_collapsed, "
            "per second. They must agree: a gap that stays open means khmon missed or invented "
            "collapses (alert KhmonCollapseCountMismatch). Known exceptions: MADV_COLLAPSE collapses "
            "fire the tracepoint but are not in pages_collapsed, and on the mTHP series the kernel "
            "counts one per PMD where khmon counts each collapsed folio."),
            "ops", (Query(agreement_succeeded(), "{{instance}} khmon succeeded"),
                    Query(agreement_kernel(), "{{instance}} kernel pages_collapsed")), w=10, min=0),
        Panel("stat", "Succeeded collapses over the range", (
            "The same two counts as totals over the dashboard's time range, and their difference "
            "(0 when they agree)."),
            "none", (Query(agreement_totals()[0], "{{instance}} khmon", instant=True),
                     Query(agreement_totals()[1], "{{instance}} kernel", instant=True),
                     Query(f"{agreement_totals()[0]} - {agreement_totals()[1]}", "{{instance}} difference",
                           instant=True)), w=6, text_mode="value_and_name"),
        Panel("timeseries", "Full scans", (
            "khugepaged/full_scans per second: completed passes over every mm registered with "
            "khugepaged."),
            "ops", (Query(per_instance("khmon_khugepaged_full_scans_total"), "{{instance}}"),),
            w=8, min=0),
        *stats,
        Panel("stat", "defrag", "khugepaged/defrag: whether khugepaged may reclaim and compact to "
              "allocate its huge pages.", "none",
              (Query(f"max by (instance) ({sel('khmon_khugepaged_defrag')})", "{{instance}}", instant=True),),
              w=3, h=4, mappings=ENABLED),
        Panel("stat", "THP settings", (
            "transparent_hugepage/{enabled,defrag,shmem_enabled,use_zero_page}: the bracketed "
            "choice of each (khmon_thp_setting_info)."),
            "none", (Query(f"max by (setting, value) ({sel('khmon_thp_setting_info')})",
                           "{{setting}}: {{value}}", instant=True),), w=6, h=4, text_mode="name"),
    ))


def mthp() -> Row:
    latency = "khmon_collapse_duration_seconds_bucket"
    return Row("mTHP by order", (
        Panel("timeseries", "Collapse attempts per order", (
            "mm_collapse_huge_page attempts per second by order (9 is a whole PMD, 2 MiB on x86-64). "
            "Where the tracepoint has no order field every attempt is order 9."),
            "ops", (Query(f"sum by (order) ({rate(ATTEMPTS, ANON)})", "order {{order}}"),),
            w=8, min=0),
        Panel("timeseries", "Successful collapses per order", (
            "mm_collapse_huge_page attempts that succeeded, per second, by order."),
            "ops", (Query(f"sum by (order) ({rate(ATTEMPTS, ANON, SUCCEEDED)})", "order {{order}}"),),
            w=8, min=0),
        Panel("timeseries", "Kernel: collapse folio allocations per size", (
            "The kernel's own hugepages-<size>/stats/collapse_alloc and collapse_alloc_failed per "
            "second: folios allocated for collapse, per size. Each attempt at order o allocates one "
            "folio of 4 KiB << o, so these match the attempts per order beside it."),
            "ops", (Query(f"sum by (size) ({rate('khmon_mthp_collapse_alloc_total')})", "{{size}}",
                          needs=mthp_stat("collapse_alloc")),
                    Query(f"sum by (size) ({rate('khmon_mthp_collapse_alloc_failed_total')})",
                          "{{size}} failed", needs=mthp_stat("collapse_alloc_failed"))), w=8, min=0),
        Panel("heatmap", "collapse_huge_page latency", (
            "How long collapse_huge_page calls took, all orders together: calls per second in each "
            "power-of-two duration bucket (khmon_collapse_duration_seconds)."),
            "s", (Query(f"sum by (le) ({rate(latency)})", "{{le}}", fmt="heatmap"),),
            w=12, h=9, needs=FUNCTION_PROBES),
        Panel("timeseries", "collapse_huge_page latency p50 and p99 per order", (
            "Median and 99th percentile of collapse_huge_page's duration by order, from the "
            "power-of-two buckets (so within a factor of two)."),
            "s", tuple(Query(f"histogram_quantile({q}, sum by (order, le) ({rate(latency)}))",
                             f"{name} order {{{{order}}}}") for q, name in ((0.5, "p50"), (0.99, "p99"))),
            w=12, h=9, needs=FUNCTION_PROBES),
        Panel("timeseries", "Collapse attempts per order, by outcome", (
            "Attempts per second by order and the kernel's status: where a cascade of orders "
            "fails (mTHP collapse tries the orders from the largest down)."),
            "ops", (Query(f"sum by (order, status) ({rate(ATTEMPTS, ANON)})",
                          "order {{order}} {{status}}"),), w=24, h=8, needs=ORDER_FIELD, min=0),
    ))


def waste() -> Row:
    rates = tuple(
        Panel("timeseries", title, f"{text} Reasons overlap (one attempt can count under three) and are "
              "never added together.", unit,
              (Query(f"sum by (reason) ({rate(metric)})", "{{reason}}"),), w=8, needs=PMD_RECORDS, min=0)
        for metric, title, unit, text in WASTE_FAMILIES)
    totals = Panel("table", "Waste over the range, per reason", (
        "Attempts, bytes and seconds of wasted collapse work over the dashboard's time range, one row "
        "per reason. uffd_isolate: in a userfaultfd-armed VMA a folio was allocated and "
        "__collapse_huge_page_isolate threw it away; alloc_then_fail: the same elsewhere; "
        "futile_rescan: rescans of an unchanged PMD with the same failing verdict; order_cascade: "
        "failed attempts inside an earlier failed range; bloat and creep: zero-filled pages added."),
        "none", tuple(Query(f"sum by (reason) ({increase(metric)})", instant=True, fmt="table")
                      for metric, *_ in WASTE_FAMILIES), w=24, h=7, needs=PMD_RECORDS, merge=True,
        columns={"A": ("attempts", "none"), "B": ("wasted", "bytes"), "C": ("seconds", "s")})
    return Row("Wasted work", (*rates, totals))


def processes() -> Row:
    def top(metric: str, title: str, text: str, needs: str | None = None) -> Panel:
        return Panel("bargauge", title, text, "none", (
            Query(f"topk(10, sum by (comm) ({increase(metric)}))", "{{comm}}", instant=True),),
            w=8, h=9, needs=needs)

    return Row("Processes", (
        top("khmon_process_collapse_attempts_total", "Top comms by collapse attempts",
            "The ten comms whose memory khugepaged tried to collapse most over the time range "
            "(the owner of the mm, by comm: khmon never labels by pid)."),
        top("khmon_process_scans_total", "Top comms by scans",
            "The ten comms whose PMDs khugepaged scanned most over the time range."),
        Panel("bargauge", "Top comms by wasted memory, per reason", (
            "For each waste reason, the ten comms whose collapses wasted most memory over the time "
            "range. Reasons overlap: a comm can appear under several."),
            "bytes", (Query(f"topk by (reason) (10, sum by (comm, reason) "
                            f"({increase('khmon_process_wasted_bytes_total')}))", "{{comm}} ({{reason}})",
                            instant=True),), w=8, h=9, needs=PMD_RECORDS),
        Panel("stat", "Comms counted as other", (
            "Distinct comms counted under comm=\"other\" over the time range because the daemon's "
            "label budget (--max-process-labels) was spent (khmon_process_label_overflow_total)."),
            "none", (Query(f"sum by (instance) ({increase('khmon_process_label_overflow_total')})",
                           "{{instance}}", instant=True),), w=8, h=4,
            thresholds=((None, "green"), (1, "orange"))),
        Panel("stat", "Processes and PMDs tracked", (
            "Processes and PMD records the daemon holds now (khmon_processes_tracked, "
            "khmon_pmds_tracked)."),
            "none", (Query(f"sum by (instance) ({sel('khmon_processes_tracked')})", "{{instance}} processes",
                           instant=True),
                     Query(f"sum by (instance) ({sel('khmon_pmds_tracked')})", "{{instance}} PMDs",
                           instant=True)), w=8, h=4, text_mode="value_and_name"),
        Panel("timeseries", "PMD records evicted", (
            "PMD records the daemon forgot, per second, by reason (lru, exited, process_cap)."),
            "ops", (Query(f"sum by (reason) ({rate('khmon_pmds_evicted_total')})", "{{reason}}"),),
            w=8, h=4, needs=PMD_RECORDS, min=0),
    ))


def beyond() -> Row:
    def per_size(stat_name: str, legend: str) -> Query:
        return Query(f"sum by (size) ({rate(f'khmon_mthp_{stat_name}_total')})", f"{{{{size}}}} {legend}",
                     needs=mthp_stat(stat_name))

    return Row("THP beyond collapse", (
        Panel("timeseries", "THP faults and fallbacks", (
            "Huge pages allocated at fault time and faults that fell back to small pages "
            "(/proc/vmstat thp_fault_alloc, thp_fault_fallback), per second."),
            "ops", (Query(per_instance("khmon_vmstat_thp_fault_alloc_total"), "{{instance}} alloc"),
                    Query(per_instance("khmon_vmstat_thp_fault_fallback_total"), "{{instance}} fallback")),
            w=12, min=0),
        Panel("timeseries", "Anonymous faults per size", (
            "Per mTHP size, folios allocated at fault time and faults that fell back "
            "(hugepages-<size>/stats/anon_fault_alloc, anon_fault_fallback), per second."),
            "ops", (per_size("anon_fault_alloc", "alloc"), per_size("anon_fault_fallback", "fallback")),
            w=12, min=0),
        Panel("timeseries", "Splits", (
            "Huge pages split into small ones (/proc/vmstat thp_split_page, thp_split_pmd) and "
            "per size (hugepages-<size>/stats/split), per second."),
            "ops", (Query(per_instance("khmon_vmstat_thp_split_page_total"), "{{instance}} split_page"),
                    Query(per_instance("khmon_vmstat_thp_split_pmd_total"), "{{instance}} split_pmd"),
                    per_size("split", "split")), w=12, min=0),
        Panel("timeseries", "Swap-out per size", (
            "Per size, folios swapped out whole and those split to be swapped out "
            "(hugepages-<size>/stats/swpout, swpout_fallback), per second."),
            "ops", (per_size("swpout", "swpout"), per_size("swpout_fallback", "swpout_fallback")),
            w=12, min=0),
    ))


DASHBOARD = Dashboard(
    UID, "khmon overview",
    "khugepaged and mTHP collapse as khmon sees them, beside the kernel's own counters, for every "
    "khmon daemon the job and instance variables select. Metrics: docs/metrics.md; alerts: "
    "docs/runbooks.md.",
    (health(), khugepaged(), mthp(), waste(), processes(), beyond()),
)
