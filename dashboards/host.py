"""The khmon host detail dashboard: one row per selected instance, settings changes annotated.

A test machine's question is usually "what did khugepaged do on this box while I changed that
knob": so the row repeats per instance (each copy reads exactly one daemon), the settings are
drawn over time, and every settings change is an annotation on every panel. Panels shared with
the overview are taken from it by title, so a query is written once.
"""

from __future__ import annotations

from dataclasses import replace

from . import overview
from .panels import MTHP_SIZES, Dashboard, Panel, Query, Row, prometheus_annotation, sel

UID = "khmon-host"
KNOBS = (  # metric, khugepaged file
    ("khmon_khugepaged_scan_sleep_seconds", "scan_sleep_millisecs"),
    ("khmon_khugepaged_alloc_sleep_seconds", "alloc_sleep_millisecs"),
    ("khmon_khugepaged_pages_to_scan", "pages_to_scan"),
    ("khmon_khugepaged_max_ptes_none", "max_ptes_none"),
    ("khmon_khugepaged_max_ptes_swap", "max_ptes_swap"),
    ("khmon_khugepaged_max_ptes_shared", "max_ptes_shared"),
    ("khmon_khugepaged_defrag", "defrag"),
)


def pick(title: str, **changes: object) -> Panel:
    """The overview's panel of that title, resized or otherwise changed for this dashboard."""
    for p in overview.DASHBOARD.panels():
        if p.title == title:
            return replace(p, **changes)  # type: ignore[arg-type]
    raise KeyError(title)


def knob_changes() -> str:
    """One series per khugepaged knob that changed within $__rate_interval, labelled with the
    knob's sysfs name. changes() drops the metric name, so each knob gets its own label_replace;
    the window is at least the step plus one scrape, so no change falls between two steps."""
    terms = [f'label_replace(changes({sel(metric)}[$__rate_interval]) > 0, "setting", "{name}", "", "")'
             for metric, name in KNOBS]
    return " or ".join(terms)


def choice_changes() -> str:
    """THP and mTHP settings are info series (value 1, the choice in a label): a new choice is a
    new series, present now but not one window ago."""
    return " or ".join(f"({sel(m)} unless {sel(m)} offset $__rate_interval)"
                       for m in ("khmon_thp_setting_info", "khmon_mthp_enabled_info"))


def settings_row() -> tuple[Panel, ...]:
    sleeps = tuple(Query(f"max({sel(m)})", name) for m, name in KNOBS[:2])
    counts = tuple(Query(f"max({sel(m)})", name) for m, name in KNOBS[2:6])
    return (
        Panel("timeseries", "khugepaged sleeps over time", (
            "khugepaged/scan_sleep_millisecs and alloc_sleep_millisecs, in seconds, as the daemon read "
            "them at each scrape. Changes are annotated on every panel."), "s", sleeps, w=8, min=0),
        Panel("timeseries", "khugepaged scan limits over time", (
            "khugepaged/pages_to_scan, max_ptes_none, max_ptes_swap and max_ptes_shared as the daemon "
            "read them at each scrape."), "none", counts, w=8, min=0),
        Panel("stat", "mTHP sizes enabled", (
            "hugepages-<size>/enabled for each mTHP size the kernel has (khmon_mthp_enabled_info): "
            "always, inherit (from transparent_hugepage/enabled), madvise or never."),
            "none", (Query(f"max by (size, value) ({sel('khmon_mthp_enabled_info')})", "{{size}}: {{value}}",
                           instant=True),), w=8, text_mode="name", needs=MTHP_SIZES),
    )


def _row() -> Row:
    return Row("$instance", (
        pick("Kernel", w=12, h=5),
        pick("Probes attached", w=12, h=5),
        *settings_row(),
        pick("THP settings", w=12),
        pick("Snapshot age", w=6, h=4),
        pick("Comms counted as other", w=6, h=4),
        pick("Scans by verdict", w=12),
        pick("Collapse attempts by outcome", w=12),
        pick("Succeeded collapses: khmon and the kernel's pages_collapsed", w=16),
        pick("Succeeded collapses over the range", w=8),
        pick("Collapse attempts per order", w=12),
        pick("Kernel: collapse folio allocations per size", w=12),
        pick("collapse_huge_page latency p50 and p99 per order", w=12),
        pick("Wasted attempts per reason", w=12),
        pick("Lost events by tracepoint and reason", w=12),
        pick("Top comms by collapse attempts", w=12),
    ), repeat="instance")


DASHBOARD = Dashboard(
    UID, "khmon host detail",
    "One khmon daemon per row (the row repeats for each selected instance): what khugepaged did on "
    "that machine, its settings over time, and an annotation at every settings change (one that "
    "lasted less than a scrape interval is in no sample, and shows nowhere). Metrics: "
    "docs/metrics.md; alerts: docs/runbooks.md.",
    (_row(),),
    annotations=(
        prometheus_annotation("khugepaged settings changed", knob_changes(),
                              "khugepaged/{{setting}} changed", "on {{instance}}", "orange"),
        prometheus_annotation("THP settings changed", choice_changes(),
                              "{{setting}}{{size}} = {{value}}", "on {{instance}}", "purple"),
    ),
)
