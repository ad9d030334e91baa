"""Function probes (fentry/fexit or kprobes) where the kernel allows them, checked against
the tracepoints of the same window and against a userfaultfd-armed workload."""

from __future__ import annotations

import os

import pytest

from khmon.capture.live import LiveCapture

pytestmark = pytest.mark.live


def _expected() -> set[str]:
    return {t for t in os.environ.get("KHMON_EXPECT_TIERS", "").split(",") if t}


def test_function_tier_is_what_the_kernel_allows(live_capture: LiveCapture) -> None:
    mode = live_capture.probes.func_mode
    if "kfunc" in _expected():
        # fentry/fexit where the kernel allows them (Debian's 6.1 and 7.2): the cheaper tier
        assert mode == "kfunc", live_capture.probes.func_errors
    elif "kprobe" in _expected():
        assert mode == "kprobe" and "kfunc" in live_capture.probes.func_errors
    if "tracepoints_only" in _expected():
        assert mode is None
        assert set(live_capture.probes.func_errors) == {"kfunc", "kprobe"}
    if mode is None:
        assert not any(lay.func for lay in live_capture.layouts)


def _tracepoints_only(report: dict) -> None:
    """Without function probes the report says so, and why, instead of inventing data."""
    f = report["functions"]
    assert f["mode"] is None
    assert f["refused"] and all(f["refused"].values())
    assert "collapse_huge_page" not in f and "pmd_scans" not in f
    assert not any(name.startswith("fn_") for name in report["events"])


def test_collapse_calls_match_the_tracepoint(live_capture: LiveCapture, run_workloads) -> None:
    report, (w,) = run_workloads([["--pmds", "8", "--pattern", "full"]])
    assert w["collapsed_pmds"] == 8
    if live_capture.probes.func_mode is None:
        _tracepoints_only(report)
        return
    fn = report["functions"]["collapse_huge_page"]
    # Every collapse_huge_page call fires mm_collapse_huge_page once, with the same result.
    assert fn["calls"] == report["collapse"]["attempts"] >= 8
    assert fn["by_result"].get("succeeded", 0) == report["collapse"]["succeeded"]
    assert report["collapse"]["succeeded"] == report["kernel_counters"]["delta"][
        "khugepaged/pages_collapsed"]
    assert fn["seconds"] > 0
    scans = report["functions"]["pmd_scans"]
    mine = next(p for p in report["processes"] if p["pid"] == w["pid"])
    assert scans["calls"] >= mine["scans"] > 0
    assert scans["by_vma_flag"]["hugepage"] >= mine["scans"]  # MADV_HUGEPAGE VMAs


def test_userfaultfd_armed_vma_is_flagged(live_capture: LiveCapture, run_workloads) -> None:
    report, (w,) = run_workloads(
        [["--pmds", "4", "--pattern", "every4th-empty", "--uffd"]])
    mine = next(p for p in report["processes"] if p["pid"] == w["pid"])
    assert mine["scans"] >= 4 and mine["collapses"] == 0
    if live_capture.probes.func_mode is None:
        _tracepoints_only(report)
        return
    scans = report["functions"]["pmd_scans"]
    # Ground truth: the workload armed its VMA; every scan of its PMDs is in a uffd VMA.
    assert scans["uffd_armed"] >= mine["scans"] >= 4
    assert scans["by_vma_flag"]["uffd_missing"] >= mine["scans"]
    assert w["collapsed_pmds"] == 0
