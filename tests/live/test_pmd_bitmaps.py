"""Per-PMD records against patterns the workload wrote: each PMD's bitmap must equal the
pattern, from the best source the kernel allows (`kernel` on the mTHP series, `ptwalk`
before it), and collapse_huge_page calls per order must equal the kernel's per-order
collapse_alloc counters. On a kernel without function probes there are no PMD records,
and the report says so."""

from __future__ import annotations

import os

import pytest

from khmon.capture.live import LiveCapture
from khmon.workload import PMD_SIZE, pattern_bits

pytestmark = pytest.mark.live

# (pattern, seed): every PTE pattern the workload knows, the random one seeded.
PATTERNS = [("full", 1), ("every4th-empty", 1), ("first-half", 1), ("one-page", 1),
            ("random", 7)]
PMDS = 2


def _expected_source() -> set[str]:
    tiers = set(os.environ.get("KHMON_EXPECT_TIERS", "").split(","))
    if "mthp_present_ptes" in tiers:
        return {"kernel"}
    if "ptwalk" in tiers:
        return {"ptwalk"}
    return {"kernel", "ptwalk"}


def _pagemap_only(report: dict) -> None:
    """Without function probes, PMD records come from pagemap samples alone: no attempts
    (collapse_huge_page's tracepoint names no address)."""
    assert all(p["bitmap_source"] == "pagemap" and not p["attempts"] for p in report["pmds"])


def _hex(bits: list[bool]) -> str:
    """The bitmap as the report writes it, computed here: byte j holds PTEs 8j..8j+7,
    PTE 8j+k in bit k."""
    return bytes(sum(1 << k for k in range(8) if bits[8 * j + k]) for j in range(64)).hex()


def test_pmd_bitmaps_equal_the_patterns(live_capture: LiveCapture, run_workloads) -> None:
    # max_ptes_none 511: every pattern passes the scan, so each PMD is walked in full (and
    # collapsed at PMD order, which on the mTHP series is where the kernel's bitmap is read).
    report, works = run_workloads(
        [["--pmds", str(PMDS), "--pattern", p, "--seed", str(seed)] for p, seed in PATTERNS],
        knobs={"khugepaged/max_ptes_none": "511"})
    if live_capture.probes.func_mode is None:
        _pagemap_only(report)
        assert report["functions"]["refused"]
        return
    pmds = {(p["pid"], int(p["address"], 16)): p for p in report["pmds"]}
    source = _expected_source()
    for (pattern, seed), w in zip(PATTERNS, works, strict=True):
        want = _hex(pattern_bits(pattern, seed))
        for i in range(PMDS):
            addr = int(w["start"], 16) + i * PMD_SIZE
            rec = pmds.get((w["pid"], addr))
            assert rec is not None, f"{pattern}: no PMD record for {addr:#x}"
            assert rec["bitmap_source"] in source, (pattern, rec)
            assert rec["bitmap"] == want, (pattern, hex(addr), rec["bitmap"])
            assert rec["present"] == sum(pattern_bits(pattern, seed))
            assert rec["vma_flag_names"] and "hugepage" in rec["vma_flag_names"]
            assert rec["uffd"] is False


def test_attempts_per_order_match_collapse_alloc(live_capture: LiveCapture,
                                                 run_workloads) -> None:
    report, (w,) = run_workloads([["--pmds", "4", "--pattern", "every4th-empty"]],
                                 knobs={"khugepaged/max_ptes_none": "511"})
    assert w["collapsed_pmds"] == 4
    if live_capture.probes.func_mode is None:
        _pagemap_only(report)
        return
    mine = [p for p in report["pmds"] if p["pid"] == w["pid"]]
    assert len(mine) == 4
    by_order: dict[int, int] = {}
    for p in report["pmds"]:
        for a in p["attempts"]:
            by_order[a["order"]] = by_order.get(a["order"], 0) + a["count"]
    # Each of the workload's PMDs: one attempt, at offset 0, PMD order, that succeeded.
    for p in mine:
        assert [(a["offset"], a["order"], a["status"], a["count"]) for a in p["attempts"]] == [
            (0, 9, "succeeded", 1)], p
        assert p["attempts"][0]["latency_ns"] > 0
    delta = report["kernel_counters"]["delta"]
    for order, n in by_order.items():
        stat = f"hugepages-{4 << order}kB/stats/collapse_alloc"
        if stat in delta:  # per-order stats (the mTHP series): one folio per attempt
            assert delta[stat] == n, (order, n, delta[stat])
    assert sum(by_order.values()) == delta["thp_collapse_alloc"]


def test_refused_pmds_have_bitmaps_too(live_capture: LiveCapture, run_workloads) -> None:
    # max_ptes_none 0: khugepaged refuses every PMD that has an empty PTE, so no collapse
    # attempt carries the kernel's bitmap. Their bitmaps come from the PTE walk (6.1), or on a
    # tracepoint-only kernel from pagemap, read right after the scan event (the pages stay
    # where the workload put them, so the read sees the pattern). On the mTHP series (7.2)
    # there is no bitmap for them: the kernel's comes only with an attempt.
    patterns = [("every4th-empty", 1), ("first-half", 1), ("one-page", 1), ("random", 7)]
    report, works = run_workloads(
        [["--pmds", str(PMDS), "--pattern", p, "--seed", str(seed)] for p, seed in patterns],
        knobs={"khugepaged/max_ptes_none": "0"})
    tiers = set(os.environ.get("KHMON_EXPECT_TIERS", "").split(","))
    funcs = live_capture.probes.func_mode is not None
    assert (live_capture.pages is None) == funcs
    source = "ptwalk" if "ptwalk" in tiers else None if funcs else "pagemap"
    pmds = {(p["pid"], int(p["address"], 16)): p for p in report["pmds"]}
    for (pattern, seed), w in zip(patterns, works, strict=True):
        for i in range(PMDS):
            addr = int(w["start"], 16) + i * PMD_SIZE
            rec = pmds.get((w["pid"], addr))
            assert rec is not None, f"{pattern}: no PMD record for {addr:#x}"
            assert rec["bitmap_source"] == source, rec
            if source is not None:
                assert rec["bitmap"] == _hex(pattern_bits(pattern, seed)), (pattern, rec)
            # scanned and refused (the scan may stop before the empty PTEs: 6.1 once said
            # page_not_in_lru for pages still in a per-CPU LRU batch), never collapsed
            assert rec["scans"] >= 1 and rec["verdict"] not in (None, "succeeded"), rec
            assert rec["attempts"] == []
        assert w["collapsed_pmds"] == 0
    assert report["wasted"]["available"] is True
