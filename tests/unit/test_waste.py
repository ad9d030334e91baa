"""waste.wasted over hand-built PMD records: each reason's attempts, bytes and seconds worked
out by hand from the records below."""

from __future__ import annotations

from typing import Any

from khmon.model.waste import REASONS, wasted

KiB = 1024
EVERY4TH = "77" * 64  # PTEs 3, 7, 11 ... empty: 384 present
FULL = "ff" * 64
FIRST_HALF = "ff" * 32 + "00" * 32


def step(offset: int, order: int, status: str, ns: int = 1000) -> dict[str, Any]:
    return {"offset": offset, "order": order, "status": status, "latency_ns": ns}


def pmd(passes: list[tuple[int, str, list[dict]]], uffd: bool = False,
        verdicts: dict[str, int] | None = None, pid: int = 7,
        address: str = "0x7f0000000000") -> dict[str, Any]:
    """A PMD record whose aggregated attempts are summed from its passes, as pmd.py does."""
    agg: dict[tuple, dict] = {}
    for n, _, steps in passes:
        for s in steps:
            a = agg.setdefault((s["offset"], s["order"], s["status"]),
                               {**s, "isolate_status": None, "count": 0})
            a["count"] += n
    return {"pid": pid, "comm": "w", "address": address, "uffd": uffd,
            "verdicts": verdicts or {}, "bitmaps_seen": len({b for _, b, _ in passes}),
            "attempts": list(agg.values()),
            "passes": [{"count": n, "bitmap": b, "attempts": s} for n, b, s in passes]}


def cost(w: dict, reason: str) -> tuple[int, int, float]:
    c = w["by_reason"][reason]
    return c["attempts"], c["bytes"], c["seconds"]


def test_uffd_walk_is_uffd_isolate_cascade_and_futile_rescan() -> None:
    # The 7.2 uffd waste on one PMD, 3 passes of: (0,9), (0,8), (256,8), all failing at isolate.
    walk = [step(0, 9, "exceed_none_pte"), step(0, 8, "exceed_none_pte"),
            step(256, 8, "exceed_none_pte")]
    w = wasted([pmd([(3, EVERY4TH, walk)], uffd=True, verdicts={"exceed_none_pte": 3})])
    # 9 folios allocated and dropped: 3 x (2 MiB + 1 MiB + 1 MiB) = 12 MiB, 9 us.
    assert cost(w, "uffd_isolate") == (9, 12 * 1024 * KiB, 9e-6)
    assert cost(w, "alloc_then_fail") == (0, 0, 0)
    # (0,8) and (256,8) lie inside the failed (0,9): 2 per pass, 1 MiB each.
    assert cost(w, "order_cascade") == (6, 6 * 1024 * KiB, 6e-6)
    # 2 rescans found the same PMD and repeated a 4 MiB, 3 us pass.
    assert cost(w, "futile_rescan") == (2, 8 * 1024 * KiB, 6e-6)
    assert w["by_reason"]["uffd_isolate"]["top_pmds"][0]["address"] == "0x7f0000000000"


def test_alloc_failure_costs_no_folio_and_other_failures_do() -> None:
    steps = [step(0, 9, "alloc_huge_page_failed", 500), step(0, 8, "exceed_swap_pte", 2000)]
    w = wasted([pmd([(1, EVERY4TH, steps)])])
    # only the order-8 try had a folio (1 MiB); the alloc failure is not "then fail"
    assert cost(w, "alloc_then_fail") == (1, 1024 * KiB, 2e-6)
    assert cost(w, "uffd_isolate") == (0, 0, 0)
    # (0,8) is inside the failed (0,9): a cascade step, with its folio
    assert cost(w, "order_cascade") == (1, 1024 * KiB, 2e-6)


def test_bloat_and_creep() -> None:
    # Pass 1 on the first-half bitmap collapses (0,8): full, no bloat. Pass 2 sees the PMD
    # with the first half now one mTHP and collapses (0,9), filling the 256 empty PTEs
    # (1 MiB): bloat, and creep because it covers the earlier order-8 collapse.
    w = wasted([pmd([(1, FIRST_HALF, [step(0, 9, "exceed_none_pte"), step(0, 8, "succeeded")]),
                     (1, FIRST_HALF, [step(0, 9, "succeeded", 5000)])])])
    assert cost(w, "bloat") == (1, 256 * 4 * KiB, 0)
    assert cost(w, "creep") == (1, 256 * 4 * KiB, 5e-6)
    # every4th-empty collapsed at PMD order in one go: 128 zeroed pages, no creep
    w = wasted([pmd([(1, EVERY4TH, [step(0, 9, "succeeded")])])])
    assert cost(w, "bloat") == (1, 128 * 4 * KiB, 0)
    assert cost(w, "creep") == (0, 0, 0)


def test_no_futile_rescan_when_the_bitmap_changed_or_the_verdict_is_a_state() -> None:
    w = wasted([pmd([(1, EVERY4TH, []), (1, FULL, [])], verdicts={"exceed_none_pte": 2}),
                pmd([(1, FULL, [])], verdicts={"page_pmd_mapped": 50}, address="0x7f0000200000")])
    assert cost(w, "futile_rescan") == (0, 0, 0)


def test_full_pmd_collapsed_once_wastes_nothing() -> None:
    w = wasted([pmd([(1, FULL, [step(0, 9, "succeeded")])], verdicts={"succeeded": 1})])
    assert w["available"] is True and list(w["by_reason"]) == list(REASONS)
    assert all(c["attempts"] == 0 and c["bytes"] == 0 for c in w["by_reason"].values())


def test_without_function_probes_it_says_why() -> None:
    w = wasted([], seen=False)
    assert w["available"] is False and "function probes" in w["why"]
