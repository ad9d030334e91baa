"""simulate: the mTHP collapse decision of the v17 (stack) and v19 (linear walk, Linux 7.2)
series, on hand-worked PMDs. Each case shows the walk it expects, worked from the kernel
code quoted in khmon/model/khugepaged.py; replay (khmon.outputs.whatif) on hand-built
PMD records."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from khmon.geometry import PMD_ORDER, PTES
from khmon.model.khugepaged import (
    ALGORITHMS,
    Attempt,
    Outcome,
    Settings,
    max_order_from_offset,
    settings_from_sysfs,
    simulate,
)
from khmon.outputs import whatif

ALL = (1 << PTES) - 1
# every 4th PTE empty: PTEs 3, 7, 11 ... clear, so each byte is 0b0111_0111 (as in test_pmd)
EVERY4TH = int.from_bytes(bytes([0x77]) * 64, "little")
MTHP = frozenset(range(2, PMD_ORDER + 1))  # 16K .. 2M


def per_order(o: Outcome) -> dict[int, int]:
    """collapse_huge_page calls per order in one pass."""
    return dict(Counter(a.order for a in o.attempts))


def ptes(*spans: int | tuple[int, int]) -> int:
    """A bitmap with the given PTEs set: an int is one PTE, (a, b) is PTEs a..b-1."""
    out = 0
    for s in spans:
        a, b = (s, s + 1) if isinstance(s, int) else s
        out |= ((1 << (b - a)) - 1) << a
    return out


def walk(o: Outcome) -> list[tuple[int, int]]:
    return [(a.offset, a.order) for a in o.attempts]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_full_pmd_pmd_only(algo: str) -> None:
    # 512 present, orders {9}: the scan passes (no none PTE), the pre-check at (0, 9) is
    # 512 >= 512 - 511, collapse_huge_page succeeds: one PMD collapse, nothing to fill.
    o = simulate(algo, ALL, Settings(frozenset({PMD_ORDER})))
    assert o.attempts == [Attempt(0, 9, True, None)]
    assert o.collapses == [(0, 9)]
    assert o.bloat_ptes == 0
    assert o.scan_failure is None and o.stopped is None


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_uffd_every_4th_matches_7_2(algo: str) -> None:
    # The FACTS experiment: uffd-armed VMA, PTEs 3, 7, 11 ... empty (384 present),
    # max_ptes_none=511, orders 4..9 (64K..2M).
    # Scan: mTHP orders are enabled, so max_ptes_none is lifted to 511 and the 128 none PTEs
    # pass even though the VMA is uffd-armed. Pre-check (NULL vma): any range with one present
    # PTE qualifies (threshold (1 << order) - ((1 << order) - 1) = 1). Isolate (with the vma):
    # max_ptes_none 0, and every range of >= 4 PTEs holds an empty PTE -> exceed_none_pte.
    # Walk: (0,9) (0,8) ... (0,4) fail, 4 is the lowest enabled order -> next offset 16,
    # order __ffs(16) = 4; (16,4) fails -> offset 32, order 5: (32,5) (32,4) -> 48 ... so
    # each naturally aligned block of each order is tried once: 512 >> order attempts.
    e = EVERY4TH
    assert e.bit_count() == 384
    o = simulate(algo, e, Settings(frozenset(range(4, 10)), uffd=True))
    per_pass = per_order(o)
    assert per_pass == {9: 1, 8: 2, 7: 4, 6: 8, 5: 16, 4: 32}
    assert walk(o)[:11] == [(0, 9), (0, 8), (0, 7), (0, 6), (0, 5), (0, 4), (16, 4), (32, 5),
                            (32, 4), (48, 4), (64, 6)]
    assert all(not a.succeeded and a.reason == "exceed_none_pte" for a in o.attempts)
    assert o.collapses == [] and o.bloat_ptes == 0
    # 7.2.13's collapse_alloc stats after ~8 s: 64K 1824, 128K 912, 256K 456, 512K 228,
    # 1M 114, 2M 58 = 57 whole passes (1824 / 32) plus the 58th begun at order 9.
    facts = {4: 1824, 5: 912, 6: 456, 7: 228, 8: 114, 9: 58}
    assert {k: 57 * v for k, v in per_pass.items()} == {**facts, 9: 57}
    # khmon's 7.2 run with orders down to 16K: orders 9..2, 1, 2, 4 ... 128 per pass.
    o2 = simulate(algo, e, Settings(MTHP, uffd=True))
    assert per_order(o2) == {9: 1, 8: 2, 7: 4, 6: 8, 5: 16, 4: 32, 3: 64, 2: 128}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_first_half_max_ptes_none_0(algo: str) -> None:
    # PTEs 0..255 present, max_ptes_none=0, orders 2..9.
    # Scan: lifted to 511, 256 none pass. (0,9): PMD limit is the sysfs 0, 256 < 512, no
    # attempt -> order 8. (0,8): mTHP with 0 -> 0, 256 >= 256 -> collapse, succeeds ->
    # offset 256, order 8. Everything from 256 on is empty: no range reaches 1 << order,
    # so no further attempt (v17: the (256,8) subtree is popped without attempts).
    o = simulate(algo, ptes((0, 256)), Settings(MTHP, max_ptes_none=0))
    assert o.attempts == [Attempt(0, 8, True, None)]
    assert o.collapses == [(0, 8)] and o.bloat_ptes == 0


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_one_page(algo: str) -> None:
    one = ptes(0)
    # max_ptes_none=511: the pre-check at (0,9) needs 1 present -> PMD collapse, 511 PTEs
    # filled with zeroed pages, whether or not mTHP orders are enabled.
    for orders in (frozenset({9}), MTHP):
        o = simulate(algo, one, Settings(orders))
        assert o.attempts == [Attempt(0, 9, True, None)] and o.bloat_ptes == 511
    # max_ptes_none=0, PMD only: the scan keeps the limit 0 and stops at PTE 1.
    o = simulate(algo, one, Settings(frozenset({9}), max_ptes_none=0))
    assert o.scan_failure == "exceed_none_pte" and o.attempts == []
    # max_ptes_none=0 with mTHP: the scan passes (lifted to 511) but every range needs all
    # its PTEs present and the smallest, (0,2), has 1 of 4: no attempt at all.
    o = simulate(algo, one, Settings(MTHP, max_ptes_none=0))
    assert o.scan_failure is None and o.attempts == []
    # uffd, 511: (0,9) ... (0,2) each pass the pre-check (1 present) and fail at isolate on
    # PTE 1; (4,2), (8,3) ... hold nothing, so no more attempts.
    o = simulate(algo, one, Settings(MTHP, uffd=True))
    assert walk(o) == [(0, o_) for o_ in range(9, 1, -1)]
    assert {a.reason for a in o.attempts} == {"exceed_none_pte"}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_v17_review_diagram(algo: str) -> None:
    # The review's diagram: a failed (offset, order) becomes the halves [offset, mid_offset)
    # and [mid_offset, offset + nr) at order - 1; mid_offset is pushed first, so the left half
    # is popped first. All PTEs present but 511, uffd, orders 7..9:
    # (0,9) fails (PTE 511 empty) -> halves (0,8) and (256,8); (0,8) is full -> succeeds;
    # (256,8) fails -> (256,7) full, succeeds; (384,7) fails; order 6 is not enabled, so
    # nothing below is attempted (v17 pops down to order 2 without attempts; v19 sees no
    # lower enabled order and moves to offset 512).
    o = simulate(algo, ALL & ~ptes(511), Settings(frozenset({7, 8, 9}), uffd=True))
    assert [(a.offset, a.order, a.succeeded) for a in o.attempts] == [
        (0, 9, False), (0, 8, True), (256, 8, False), (256, 7, True), (384, 7, False)]
    assert o.collapses == [(0, 8), (256, 7)] and o.bloat_ptes == 0
    # Right half only, max_ptes_none=0: the left subtree is walked first without attempts,
    # then (256,8) collapses.
    o = simulate(algo, ptes((256, 512)), Settings(MTHP, max_ptes_none=0))
    assert o.attempts == [Attempt(256, 8, True, None)]


def test_v17_v19_differ_on_unsupported_max_ptes_none() -> None:
    # PTEs 0..127 present, max_ptes_none=256 (neither 0 nor 511), orders 2..9.
    # Both: (0,9) pre-check 128 < 512 - 256, no attempt.
    # v17: pops (0,8), enabled; collapse_max_ptes_none -> -EINVAL -> "return collapsed":
    #   mTHP collapse is off for the whole PMD.
    # v19: mTHP treats 256 as 0: (0,8) 128 < 256; (0,7) 128 >= 128 -> collapse; the rest empty.
    s = Settings(MTHP, max_ptes_none=256)
    v17 = simulate("v17", ptes((0, 128)), s)
    assert v17.attempts == [] and v17.stopped == "invalid_ptes_none"
    v19 = simulate("v19", ptes((0, 128)), s)
    assert v19.attempts == [Attempt(0, 7, True, None)] and v19.stopped is None


def test_v17_v19_differ_on_swap_at_pmd_order() -> None:
    # PTE 0 swapped out, 1..511 present, max_ptes_none=0, orders 2..9. The scan passes
    # (1 swap <= 64, 511 referenced >= 256).
    # v17: the pre-check counts the bitmap only: (0,9) 511 < 512, (0,8) 255 < 256 ...
    #   (0,2) 3 < 4; then (4,2) full -> collapse (swap-in finds no swap PTE in 4..7), and
    #   (8,3) (16,4) ... (256,8) likewise: seven mTHPs, PTEs 0..3 left as they are.
    # v19 (with the swap fixup): (0,9) counts 511 + 1 unmapped >= 512 -> collapse, PTE 0 is
    #   swapped in: one PMD, as on kernels before the series.
    present, swap = ALL & ~ptes(0), ptes(0)
    s = Settings(MTHP, max_ptes_none=0)
    v17 = simulate("v17", present, s, swap=swap)
    assert v17.collapses == [(4, 2), (8, 3), (16, 4), (32, 5), (64, 6), (128, 7), (256, 8)]
    assert all(a.succeeded for a in v17.attempts)
    v19 = simulate("v19", present, s, swap=swap)
    assert v19.attempts == [Attempt(0, 9, True, None)] and v19.bloat_ptes == 0
    # PMD order alone: v17 never attempts the collapse the scan allowed, v19 does.
    pmd = Settings(frozenset({9}), max_ptes_none=0)
    assert simulate("v17", present, pmd, swap=swap).attempts == []
    assert simulate("v19", present, pmd, swap=swap).collapses == [(0, 9)]


def test_v17_v19_same_walk_otherwise() -> None:
    # With max_ptes_none 0 or 511 and no swap at PMD order, the stack's pre-order walk
    # (left half before right) and the linear walk visit the same (offset, order) in the same
    # order: a failure tries the left half next in both; a success at (o, k) goes on to
    # o + 2^k at order __ffs(o + 2^k), which is the right sibling the stack pops next.
    rng = random.Random(72)
    for _ in range(300):
        # blocks of 16 PTEs, each full, empty, dense or sparse, so that both full ranges
        # (max_ptes_none=0 collapses) and holes appear at every order
        present = 0
        for blk in range(PTES // 16):
            r = rng.getrandbits(16)
            kind = rng.choice([0xFFFF, 0, r | rng.getrandbits(16), r & rng.getrandbits(16)])
            present |= kind << (16 * blk)
        present |= ptes(rng.randrange(PTES))  # never empty: the scan needs a referenced page
        shared = present & rng.getrandbits(PTES) & rng.getrandbits(PTES) & rng.getrandbits(PTES)
        mpn = rng.choice([0, 511])
        swap = (~present & ALL & rng.getrandbits(PTES) & rng.getrandbits(PTES)) if mpn else 0
        orders = frozenset(o for o in range(2, 10) if rng.random() < 0.6) or frozenset({9})
        s = Settings(orders, max_ptes_none=mpn, uffd=rng.random() < 0.3, max_ptes_swap=511)
        a, b = (simulate(algo, present, s, swap=swap, shared=shared) for algo in ALGORITHMS)
        assert a == b, (hex(present), s)


def test_uffd_pmd_only_stops_at_scan_mthp_does_not() -> None:
    # The review's point: with PMD order alone the scan applies the uffd rule
    # (max_ptes_none 0) and stops at the first empty PTE; with any mTHP order it lifts the
    # limit to 511 and every attempt gets as far as isolate.
    o = simulate("v19", EVERY4TH, Settings(frozenset({9}), uffd=True))
    assert o.scan_failure == "exceed_none_pte" and o.attempts == []
    o = simulate("v19", EVERY4TH, Settings(frozenset({8, 9}), uffd=True))
    assert walk(o) == [(0, 9), (0, 8), (256, 8)]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_shared_rejected_below_pmd_order(algo: str) -> None:
    # Full PMD, PTE 0 shared, orders 2..8 (no PMD): max_ptes_shared is 0 below PMD order,
    # so (0,8) (0,7) ... (0,2) fail at isolate; (4,2) (8,3) ... (256,8) succeed.
    o = simulate(algo, ALL, Settings(frozenset(range(2, 9))), shared=ptes(0))
    assert walk(o)[:7] == [(0, k) for k in range(8, 1, -1)]
    assert {a.reason for a in o.attempts[:7]} == {"exceed_shared_pte"}
    assert o.collapses == [(4, 2), (8, 3), (16, 4), (32, 5), (64, 6), (128, 7), (256, 8)]
    # At PMD order one shared page is within max_ptes_shared (256): one PMD collapse.
    assert simulate(algo, ALL, Settings(MTHP), shared=ptes(0)).collapses == [(0, 9)]


def test_swap_below_pmd_order_and_scan_limits() -> None:
    # PTE 5 swapped out, everything else present, max_ptes_none=511, orders 2..8:
    # (0,8) ... (0,3) hold PTE 5 -> swap-in bails with exceed_swap_pte; (0,2) = PTEs 0..3
    # collapses; (4,2) holds PTE 5 and fails; (8,3) (16,4) ... (256,8) collapse.
    present, swap = ALL & ~ptes(5), ptes(5)
    o = simulate("v19", present, Settings(frozenset(range(2, 9))), swap=swap)
    assert [(a.offset, a.order, a.reason) for a in o.attempts][:8] == (
        [(0, k, "exceed_swap_pte") for k in range(8, 2, -1)]
        + [(0, 2, None), (4, 2, "exceed_swap_pte")])
    assert o.collapses[1:] == [(8, 3), (16, 4), (32, 5), (64, 6), (128, 7), (256, 8)]
    # More swap PTEs than max_ptes_swap: the scan fails, nothing is attempted.
    o = simulate("v19", ALL & ~ptes((0, 65)), Settings(MTHP), swap=ptes((0, 65)))
    assert o.scan_failure == "exceed_swap_pte"
    # Swap PTEs with fewer than 256 referenced pages: lack_referenced_page.
    o = simulate("v19", ptes((1, 200)), Settings(MTHP), swap=ptes(0))
    assert o.scan_failure == "lack_referenced_page"


def test_inputs() -> None:
    assert simulate("v19", ALL, Settings(frozenset())).scan_failure == "vma_check"
    with pytest.raises(ValueError, match="unknown algorithm"):
        simulate("v18", ALL, Settings(frozenset({9})))
    with pytest.raises(ValueError, match="both present and swap"):
        simulate("v19", ALL, Settings(frozenset({9})), swap=ptes(0))
    with pytest.raises(ValueError, match="shared PTEs must be present"):
        simulate("v19", ptes(1), Settings(frozenset({9})), shared=ptes(0))
    with pytest.raises(ValueError, match="cannot be collapsed"):
        simulate("v19", ALL, Settings(frozenset({1, 9})))
    with pytest.raises(ValueError, match="512-bit"):
        simulate("v19", 1 << PTES, Settings(frozenset({9})))


def test_max_order_from_offset() -> None:
    # __ffs(offset) capped at 9; offset 0 is PMD order.
    assert [max_order_from_offset(o) for o in (0, 4, 16, 48, 256, 384, 2)] == [9, 2, 4, 4, 8, 7, 1]


def test_attempts_per_order_with_a_shared_page() -> None:
    o = simulate("v19", ALL, Settings(frozenset(range(2, 9))), shared=ptes(0))
    # orders 8..3 once each at offset 0, order 2 twice (0 and 4), then the 6 successes at 3..8
    assert per_order(o) == {8: 2, 7: 2, 6: 2, 5: 2, 4: 2, 3: 2, 2: 2}


def test_settings_from_sysfs_6_1() -> None:
    # 6.1: no hugepages-* directories, so PMD order only, from the top-level file.
    six1 = {"enabled": "always [madvise] never", "defrag": "always defer [madvise] never",
            "khugepaged/max_ptes_none": "511", "khugepaged/max_ptes_swap": "64",
            "khugepaged/max_ptes_shared": "256", "khugepaged/pages_to_scan": "4096"}
    assert settings_from_sysfs(six1) == Settings(frozenset({9}))
    # madvise mode, VMA without MADV_HUGEPAGE: nothing to collapse.
    assert settings_from_sysfs(six1, vma_hugepage=False).orders == frozenset()
    never = {**six1, "enabled": "always madvise [never]", "khugepaged/max_ptes_none": "0"}
    s = settings_from_sysfs(never, uffd=True)
    assert s == Settings(frozenset(), max_ptes_none=0, uffd=True)


def test_settings_from_sysfs_7_2() -> None:
    # The FACTS setup: top-level madvise, 64kB..1024kB inherit, 2048kB inherit; 8kB (order 1)
    # and 16kB/32kB never. inherit -> madvise -> enabled for a MADV_HUGEPAGE VMA.
    seven2 = {"enabled": "always [madvise] never", "khugepaged/max_ptes_none": "511",
              "khugepaged/max_ptes_swap": "64", "khugepaged/max_ptes_shared": "256",
              "hugepages-8kB/enabled": "always [inherit] madvise never",
              "hugepages-16kB/enabled": "always inherit madvise [never]",
              "hugepages-32kB/enabled": "always inherit madvise [never]",
              **{f"hugepages-{k}kB/enabled": "always [inherit] madvise never"
                 for k in (64, 128, 256, 512, 1024, 2048)}}
    assert settings_from_sysfs(seven2).orders == frozenset(range(4, 10))
    assert settings_from_sysfs(seven2, vma_hugepage=False).orders == frozenset()
    # A size's own always beats the top-level madvise for a VMA without MADV_HUGEPAGE; the
    # PMD order's own file wins over the top-level one.
    mixed = {**seven2, "hugepages-16kB/enabled": "[always] inherit madvise never",
             "hugepages-2048kB/enabled": "always inherit madvise [never]"}
    assert settings_from_sysfs(mixed).orders == frozenset({2, 4, 5, 6, 7, 8})
    assert settings_from_sysfs(mixed, vma_hugepage=False).orders == frozenset({2})
    # Top-level always: every inherit size is on even without MADV_HUGEPAGE.
    always = {**seven2, "enabled": "[always] madvise never"}
    assert settings_from_sysfs(always, vma_hugepage=False).orders == frozenset(range(4, 10))


def replay(pmds: list[dict], algo: str, s: Settings, **kw: bool) -> dict:
    """whatif.replay with one set of settings for every pass."""
    return whatif.replay(pmds, algo, lambda _epoch: s, **kw)


def _pass(o: Outcome, bitmap: int, count: int = 1) -> dict:
    """A pmds[] pass record of the kernel doing what `o` predicts."""
    return {"count": count, "bitmap": bitmap.to_bytes(64, "little").hex(),
            "attempts": [{"offset": a.offset, "order": a.order,
                          "status": "succeeded" if a.succeeded else a.reason, "latency_ns": 1}
                         for a in o.attempts]}


def test_replay_matches_the_kernel_and_tallies_it() -> None:
    uffd = Settings(frozenset(range(4, 10)))
    o = simulate("v19", EVERY4TH, Settings(uffd.orders, uffd=True))
    full = simulate("v19", ALL, uffd)
    pmds = [{"pid": 1, "address": "0x200000", "uffd": True, "passes": [_pass(o, EVERY4TH, 57)]},
            {"pid": 1, "address": "0x400000", "uffd": False, "passes": [_pass(full, ALL)]},
            {"pid": 1, "address": "0x600000", "uffd": False, "passes": [], "bitmap": None}]
    r = replay(pmds, "v19", uffd)
    assert (r["passes"], r["matched"], r["mismatched"], r["pmds_without_bitmap"]) == (2, 2, 0, 1)
    # one pass per (PMD, bitmap), whatever its count: 63 uffd attempts + the full PMD's one
    assert r["kernel"] == r["predicted"]
    assert r["kernel"]["attempts_by_order"] == {"9": 2, "8": 2, "7": 4, "6": 8, "5": 16, "4": 32}
    assert r["kernel"]["collapses_by_order"] == {"9": 1}
    assert r["kernel"]["bloat_bytes"] == 0


def test_replay_what_if_and_mismatch() -> None:
    # The kernel stopped after order 8 on a uffd PMD (as v19 would without 12/14): mismatch.
    o = simulate("v19", EVERY4TH, Settings(frozenset(range(4, 10)), uffd=True))
    cut = _pass(o, EVERY4TH)
    cut["attempts"] = cut["attempts"][:2]
    r = replay([{"pid": 1, "address": "0x200000", "uffd": True, "passes": [cut]}], "v19",
               Settings(frozenset(range(4, 10))))
    assert (r["matched"], r["mismatched"]) == (0, 1)
    assert [s[:2] for s in r["mismatches"][0]["kernel"]] == [[0, 9], [0, 8]]
    assert len(r["mismatches"][0]["predicted"]) == 63
    # What if only PMD order were enabled, with max_ptes_none 511, on a non-uffd PMD seen
    # refused (bitmap, no attempts): one collapse at order 9 filling 128 empty PTEs.
    r = replay([{"pid": 1, "address": "0x200000", "uffd": False, "passes": [],
                 "bitmap": "77" * 64}], "v19", Settings(frozenset({9})))
    assert r["predicted"]["collapses_by_order"] == {"9": 1}
    assert r["predicted"]["bloat_bytes"] == 128 * 4096
    assert r["kernel"]["attempts"] == 0 and r["mismatched"] == 1


def test_replay_pass_cut_short_by_the_mm_exiting() -> None:
    # The kernel walked (0,9) (0,8) then the process exited: the next try failed
    # revalidation (no_process_for_page) and ended the walk. Up to there it is the model's.
    o = simulate("v19", EVERY4TH, Settings(frozenset(range(4, 10)), uffd=True))
    cut = _pass(o, EVERY4TH)
    cut["attempts"] = cut["attempts"][:3]
    cut["attempts"][-1]["status"] = "no_process_for_page"
    r = replay([{"pid": 1, "address": "0x200000", "uffd": True, "passes": [cut]}], "v19",
               Settings(frozenset(range(4, 10))))
    assert (r["matched"], r["cut_short"], r["mismatched"]) == (0, {"no_process_for_page": 1}, 0)


def test_replay_takes_the_first_pass_on_each_bitmap() -> None:
    # Pass 1 collapses (0,8) of the first-half PMD; pass 2, same bitmap, finds that range a
    # large folio already (pte_mapped_hugepage): the model sees order-0 pages only, so only
    # the first pass is replayed and the collapses tally once.
    half = ptes((0, 256))
    s = Settings(frozenset(range(2, 10)), max_ptes_none=0)
    o = simulate("v19", half, s)
    again = _pass(o, half)
    again["attempts"] = [{**a, "status": "pte_mapped_hugepage"} for a in again["attempts"]]
    r = replay([{"pid": 1, "address": "0x200000", "uffd": False,
                 "passes": [_pass(o, half), again]}], "v19", s)
    assert (r["passes"], r["matched"]) == (1, 1)
    assert r["kernel"]["collapses_by_order"] == r["predicted"]["collapses_by_order"] == {"8": 1}


def test_replay_scan_refusals_the_model_assumes_away_are_cut_short() -> None:
    # A full PMD, max_ptes_none 0, PMD order: the model predicts (0,9). A kernel that refused
    # every scan because the pages were still in a per-CPU LRU batch made no attempt; that is
    # cut short by page_not_in_lru. Refused for a reason the model predicts, it is a mismatch.
    s = Settings(frozenset({9}), max_ptes_none=0)
    full = ALL.to_bytes(64, "little").hex()

    def pmd(verdicts: dict[str, int]) -> dict:
        return {"pid": 1, "address": "0x200000", "uffd": False, "passes": [], "attempts": [],
                "bitmap": full, "verdicts": verdicts}

    r = replay([pmd({"page_not_in_lru": 3})], "v19", s)
    assert (r["matched"], r["cut_short"], r["mismatched"]) == (0, {"page_not_in_lru": 1}, 0)
    r = replay([pmd({"exceed_none_pte": 1})], "v19", s)
    assert (r["matched"], r["mismatched"]) == (0, 1)
    assert r["mismatches"][0]["verdicts"] == {"exceed_none_pte": 1}
    # a scan that succeeded and still led to no attempt is not explained away either
    r = replay([pmd({"page_not_in_lru": 1, "succeeded": 1})], "v19", s)
    assert r["mismatched"] == 1


def test_replay_attempts_without_a_bitmap_are_not_called_no_attempt() -> None:
    # The PMD has a bitmap (a later scan's) and attempts, but none of its passes had one:
    # replaying "no attempts" against the model would invent a mismatch. Counted instead.
    s = Settings(frozenset({9}), max_ptes_none=0)
    pmd = {"pid": 1, "address": "0x200000", "uffd": False,
           "bitmap": ALL.to_bytes(64, "little").hex(), "verdicts": {"succeeded": 1},
           "attempts": [{"offset": 0, "order": 9, "status": "succeeded", "count": 1}],
           "passes": [{"count": 1, "bitmap": None,
                       "attempts": [{"offset": 0, "order": 9, "status": "succeeded"}]}]}
    r = replay([pmd], "v19", s)
    assert (r["passes"], r["passes_without_bitmap"], r["mismatched"]) == (0, 1, 0)


def test_replay_without_attempts_seen_predicts_only() -> None:
    # A pagemap recording (no function probes): the bitmaps are real, the attempts invisible.
    # The model's predictions for them are the answer; nothing is compared.
    s = Settings(frozenset(range(4, 10)), max_ptes_none=0)
    half = ptes((0, 256)).to_bytes(64, "little").hex()
    r = replay([{"pid": 1, "address": "0x200000", "uffd": False, "passes": [], "attempts": [],
                 "bitmap": half, "verdicts": {"exceed_none_pte": 2}}], "v19", s,
               attempts_seen=False)
    assert (r["passes"], r["kernel"], r["matched"], r["mismatched"]) == (1, None, None, None)
    assert r["predicted"]["collapses_by_order"] == {"8": 1}
