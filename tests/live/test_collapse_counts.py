"""khmon's counts against the kernel's own, on real khugepaged work (host kernel)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.live
PMDS = 16


def test_succeeded_collapses_equal_pages_collapsed_and_collapse_alloc(run_workloads) -> None:
    report, (w,) = run_workloads([["--pmds", str(PMDS), "--pattern", "full"]])
    delta = report["kernel_counters"]["delta"]
    c = report["collapse"]
    # Ground truth 1: the workload's own smaps says every PMD it populated was collapsed.
    assert w["collapsed_pmds"] == PMDS
    # Ground truth 2: the kernel's counters over the same window (system-wide, like khmon).
    assert c["succeeded"] == delta["khugepaged/pages_collapsed"]
    # thp_collapse_alloc counts every folio allocated for a collapse, failed ones too:
    # attempts minus those that failed to allocate.
    alloc_failed = c["by_status"].get("alloc_huge_page_failed", 0)
    assert c["attempts"] - alloc_failed == delta["thp_collapse_alloc"]
    if c["attempts"] == c["succeeded"]:
        assert c["succeeded"] == delta["thp_collapse_alloc"]
    # The workload's own collapses are attributed to it, by pid and comm.
    mine = next(p for p in report["processes"] if p["pid"] == w["pid"])
    assert mine["comm"] == w["comm"] == "khmon-workload"
    assert mine["collapses"] == PMDS
    assert mine["scans"] >= PMDS
    assert report["lost_events"] == 0
    assert all(a["unaccounted"] == 0 for a in report["accounting"].values())


def test_scan_verdicts_equal_vmstat_exceed_counters(run_workloads) -> None:
    # Half of each PMD empty and max_ptes_none=255: every scan must refuse with
    # exceed_none_pte, which the kernel also counts in thp_scan_exceed_none_pte.
    report, (w,) = run_workloads(
        [["--pmds", "8", "--pattern", "first-half"]],
        knobs={"khugepaged/max_ptes_none": "255"})
    delta = report["kernel_counters"]["delta"]
    verdicts = report["scan_pmd"]["by_status"]
    assert verdicts.get("exceed_none_pte", 0) == delta["thp_scan_exceed_none_pte"]
    mine = next(p for p in report["processes"] if p["pid"] == w["pid"])
    assert mine["scans"] >= 8  # the workload waited for 2 full passes: each PMD scanned
    assert mine["collapses"] == 0
    assert w["collapsed_pmds"] == 0
    # Deduplication: repeated identical scans are counted, not sent one by one.
    acc = report["accounting"]["mm_khugepaged_scan_pmd"]
    assert acc["seen"] == acc["recorded"] + acc["lost"]
