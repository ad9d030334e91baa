"""khmon's Prometheus alert rules, written to dashboards/alerts.yml by dashboards.generate.

Each alert has a summary, a description and a runbook paragraph in docs/runbooks.md (anchor =
the alert's name in lower case); tests/service/promtool/alerts_test.yml feeds each one
hand-written series that must make it fire and series that must keep it quiet. Selectors use
job="khmon", the job name of the scrape configuration this package ships
(dashboards/provisioning/prometheus.yml); a lab that names the job differently changes JOB and
runs `make dashboards`.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

JOB_NAME = "khmon"
JOB = f'job="{JOB_NAME}"'
RUNBOOKS = "docs/runbooks.md"
# uffd_isolate waste above this many wasted collapse attempts per second, for WASTE_FOR.
UFFD_WASTE_PER_SECOND = 1
ALLOC_FAIL_RATIO = 0.1


def _expr(text: str) -> str:
    return textwrap.dedent(text).strip()


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name, "expr": self.expr, "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "description": self.description,
                            "runbook": f"{RUNBOOKS}#{self.name.lower()}"},
        }


_SUCCEEDED = f'khmon_collapse_attempts_total{{{JOB},kind=~"anon|file",status="succeeded"}}'
_PAGES_COLLAPSED = f"khmon_khugepaged_pages_collapsed_total{{{JOB}}}"
_ALLOC = f"khmon_vmstat_thp_collapse_alloc_total{{{JOB}}}"
_ALLOC_FAILED = f"khmon_vmstat_thp_collapse_alloc_failed_total{{{JOB}}}"

ALERTS: tuple[Alert, ...] = (
    Alert(
        "KhmonDown", f"up{{{JOB}}} == 0", "2m", "warning",
        "khmon on {{ $labels.instance }} cannot be scraped",
        "Prometheus has failed to scrape khmon's /metrics on {{ $labels.instance }} for 2 minutes: "
        "nothing khugepaged does on that machine is being recorded.",
    ),
    Alert(
        "KhmonNotScraped", f"absent(up{{{JOB}}})", "10m", "warning",
        "Prometheus scrapes no khmon target",
        "No target of job khmon has been scraped for 10 minutes: the scrape configuration lost "
        "its khmon targets, or service discovery finds none.",
    ),
    Alert(
        "KhmonPipelineStalled", f"time() - khmon_snapshot_timestamp_seconds{{{JOB}}} > 30", "2m", "warning",
        "khmon on {{ $labels.instance }} serves a snapshot {{ $value | humanizeDuration }} old",
        "The daemon on {{ $labels.instance }} answers scrapes, but its latest snapshot is "
        "{{ $value | humanizeDuration }} old: its capture pipeline has stopped, so its counts no "
        "longer move.",
    ),
    Alert(
        "KhmonProbeNotAttached", f"khmon_probe_attached{{{JOB}}} == 0", "5m", "warning",
        "khmon probe {{ $labels.probe }} is not attached on {{ $labels.instance }}",
        "The {{ $labels.kind }} probe {{ $labels.probe }} failed to attach on {{ $labels.instance }} "
        "and the daemon runs without it: the events it would have counted are missing from every "
        "count that comes from it.",
    ),
    Alert(
        "KhmonLostEvents",
        _expr(f"""
            sum by (job, instance, tracepoint, reason) (
              rate(khmon_lost_events_total{{{JOB}}}[2m])
            ) > 0
        """), "10m", "warning",
        "khmon on {{ $labels.instance }} keeps losing {{ $labels.tracepoint }} events",
        "For 10 minutes khmon on {{ $labels.instance }} has lost {{ $value | humanize }} "
        "{{ $labels.tracepoint }} events per second ({{ $labels.reason }}). Counts marked exact in "
        "docs/metrics.md are still right; per-record detail (scan verdicts, per-process and per-PMD "
        "counts, waste outside uffd_isolate and alloc_then_fail) falls short by that much.",
    ),
    Alert(
        "KhmonCollapseCountMismatch",
        _expr(f"""
            abs(
                (
                  sum by (job, instance) (increase({_SUCCEEDED}[15m]))
                  or
                  sum by (job, instance) (0 * increase({_PAGES_COLLAPSED}[15m]))
                )
              - on (job, instance)
                sum by (job, instance) (increase({_PAGES_COLLAPSED}[15m]))
            )
            > on (job, instance)
              2 + 0.01 * sum by (job, instance) (increase({_PAGES_COLLAPSED}[15m]))
        """), "20m", "warning",
        "khmon's collapse count disagrees with the kernel's on {{ $labels.instance }}",
        "Over the last 15 minutes khmon's count of succeeded collapses on {{ $labels.instance }} and "
        "the kernel's khugepaged/pages_collapsed differ by {{ $value | humanize }} (more than 2 + 1% "
        "of the kernel's, for 20 minutes). They count the same thing, so khmon missed or invented "
        "collapses, or something collapsed that pages_collapsed does not count (MADV_COLLAPSE).",
    ),
    Alert(
        "KhmonUffdIsolateWaste",
        _expr(f"""
            sum by (job, instance) (
              rate(khmon_wasted_attempts_total{{{JOB},reason="uffd_isolate"}}[5m])
            ) > {UFFD_WASTE_PER_SECOND}
        """), "10m", "warning",
        "khugepaged wastes folios on userfaultfd-armed memory on {{ $labels.instance }}",
        "For 10 minutes, {{ $value | humanize }} collapse attempts per second on {{ $labels.instance }} "
        "allocated a folio in a userfaultfd-armed VMA, took mmap_write_lock, and were rejected by "
        "__collapse_huge_page_isolate, which allows no empty PTE under userfaultfd: the folio is "
        f"thrown away. Threshold: {UFFD_WASTE_PER_SECOND} attempt per second.",
    ),
    Alert(
        "KhmonCollapseAllocFailing",
        _expr(f"""
            (
                sum by (job, instance) (rate({_ALLOC_FAILED}[10m]))
              /
                (
                    sum by (job, instance) (rate({_ALLOC}[10m]))
                  + sum by (job, instance) (rate({_ALLOC_FAILED}[10m]))
                )
            ) > {ALLOC_FAIL_RATIO}
            and on (job, instance)
            sum by (job, instance) (increase({_ALLOC_FAILED}[10m])) >= 5
        """), "15m", "warning",
        "khugepaged cannot allocate huge pages on {{ $labels.instance }}",
        "On {{ $labels.instance }}, {{ $value | humanizePercentage }} of khugepaged's collapse folio "
        "allocations failed over 10 minutes (/proc/vmstat thp_collapse_alloc_failed against "
        f"thp_collapse_alloc; alerting above {ALLOC_FAIL_RATIO:.0%} and at least 5 failures): memory "
        "is too fragmented or too full for khugepaged to get huge pages.",
    ),
)


def rules() -> dict[str, Any]:
    """The rules file, as data (Prometheus's rule_files format)."""
    return {"groups": [{"name": "khmon", "rules": [a.rule() for a in ALERTS]}]}
