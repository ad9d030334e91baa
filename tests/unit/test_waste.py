"""Wasted work (khmon.model.waste) judged on streams of hand-packed 7.2 (and 6.1) records:
each reason's attempts, bytes and seconds worked out by hand from the records below."""

from __future__ import annotations

from khdata import by_name, func_layouts_61, func_layouts_72, layouts, model_of, pack

from khmon.capture.ptwalk import PtWalkPlan
from khmon.model.waste import REASONS
from khmon.stream.parts import Part

KiB = 1024
MiB = 1024 * KiB
LAYS = by_name(func_layouts_72())
SCAN, COL = LAYS["fn_pmd_scan"], LAYS["fn_collapse"]
STATUS = {v: k for k, v in COL.fmt.symbols["result"].items()}
BITS = {"uffd_missing": 1 << 9, "uffd_wp": 1 << 12, "hugepage": 1 << 29}
UFFD = BITS["uffd_missing"] | BITS["hugepage"]
MM, PMD = 0xFFFF888012345600, 0x7F00_0000_0000
EVERY4TH = bytes([0x77]) * 64  # PTEs 3, 7, 11 ... empty: 384 present
FULL = bytes([0xFF]) * 64
FIRST_HALF = bytes([0xFF]) * 32 + bytes(32)
OWNER = {"tid": 37, "comm": b"khugepaged", "owner_tgid": 7, "owner_comm": b"w"}


def visit(steps: list[tuple[int, int, str, int]], bitmap: bytes, flags: int = BITS["hugepage"],
          verdict: str | None = None, ts: int = 0, address: int = PMD) -> list[tuple]:
    """One khugepaged visit to a PMD on 7.2: its collapse_huge_page calls (offset, order,
    result, ns), then the per-PMD function's exit with its verdict."""
    col = [pack(COL.fmt, COL.index, ts=ts + i, mm=MM, address=address + off * 4096, order=order,
                present=bitmap, vm_flags=flags, in_pmd_scan=1, duration_ns=ns,
                result=STATUS[result], **OWNER)
           for i, (off, order, result, ns) in enumerate(steps)]
    verdict = verdict or (steps[-1][2] if steps else "exceed_none_pte")
    scan = pack(SCAN.fmt, SCAN.index, ts=ts + len(steps), mm=MM, address=address,
                vm_start=address, vm_end=address + (2 << 20), vm_flags=flags,
                result=STATUS[verdict], **OWNER)
    return ([(COL, col)] if col else []) + [(SCAN, [scan])]


def wasted(*visits: list[tuple], **kw: object) -> dict:
    batches = [b for v in visits for b in v]
    return model_of(list(LAYS.values()), batches, BITS, **kw).report()["wasted"]


def cost(w: dict, reason: str) -> tuple[int, int, float]:
    c = w["by_reason"][reason]
    return c["attempts"], c["bytes"], c["seconds"]


UFFD_WALK = [(0, 9, "exceed_none_pte", 1000), (0, 8, "exceed_none_pte", 1000),
             (256, 8, "exceed_none_pte", 1000)]


def test_uffd_walk_is_uffd_isolate_cascade_and_futile_rescan() -> None:
    # The 7.2 uffd waste on one PMD, 3 visits of: (0,9), (0,8), (256,8), all failing at isolate.
    w = wasted(*[visit(UFFD_WALK, EVERY4TH, UFFD, ts=100 * i) for i in range(3)])
    # 9 folios allocated and dropped: 3 x (2 MiB + 1 MiB + 1 MiB) = 12 MiB, 9 us.
    assert cost(w, "uffd_isolate") == (9, 12 * MiB, 9e-6)
    assert cost(w, "alloc_then_fail") == (0, 0, 0)
    # (0,8) and (256,8) lie inside the failed (0,9): 2 per pass, 1 MiB each.
    assert cost(w, "order_cascade") == (6, 6 * MiB, 6e-6)
    # 2 rescans found the same PMD and repeated a 4 MiB, 3 us pass.
    assert cost(w, "futile_rescan") == (2, 8 * MiB, 6e-6)
    assert w["by_reason"]["uffd_isolate"]["top_pmds"][0]["address"] == hex(PMD)
    assert w["by_reason"]["uffd_isolate"]["top_processes"][0]["pid"] == 7


def test_alloc_failure_costs_no_folio_and_other_failures_do() -> None:
    w = wasted(visit([(0, 9, "alloc_huge_page_failed", 500), (0, 8, "exceed_swap_pte", 2000)],
                     EVERY4TH))
    # only the order-8 try had a folio (1 MiB); the alloc failure is not "then fail"
    assert cost(w, "alloc_then_fail") == (1, MiB, 2e-6)
    assert cost(w, "uffd_isolate") == (0, 0, 0)
    # (0,8) is inside the failed (0,9): a cascade step, with its folio
    assert cost(w, "order_cascade") == (1, MiB, 2e-6)


def test_bloat_and_creep() -> None:
    # Visit 1 on the first-half bitmap collapses (0,8): full, no bloat. Visit 2 sees the PMD
    # with the first half now one mTHP and collapses (0,9), filling the 256 empty PTEs
    # (1 MiB): bloat, and creep because it covers the earlier order-8 collapse.
    w = wasted(visit([(0, 9, "exceed_none_pte", 1000), (0, 8, "succeeded", 1000)], FIRST_HALF),
               visit([(0, 9, "succeeded", 5000)], FIRST_HALF, ts=100))
    assert cost(w, "bloat") == (1, 256 * 4 * KiB, 0)
    assert cost(w, "creep") == (1, 256 * 4 * KiB, 5e-6)
    # every4th-empty collapsed at PMD order in one go: 128 zeroed pages, no creep
    w = wasted(visit([(0, 9, "succeeded", 1000)], EVERY4TH))
    assert cost(w, "bloat") == (1, 128 * 4 * KiB, 0)
    assert cost(w, "creep") == (0, 0, 0)


def test_futile_rescans_are_judged_at_each_scan_and_never_taken_back() -> None:
    # 6.1 with the PTE walk: each scan record carries its own bitmap. Two scans on one bitmap
    # (1 futile), then the bitmap changes: that scan is not futile, and the earlier futile
    # one stays counted. A verdict that is a state (page_pmd_mapped) is never futile.
    lays = by_name(func_layouts_61(PtWalkPlan(72, 1, None, None, 2, None, None)))
    scan61 = lays["fn_pmd_scan"]
    result = {v: k for k, v in scan61.fmt.symbols["result"].items()}

    def walked(present: bytes, verdict: str, count: int = 1, address: int = PMD) -> bytes:
        return pack(scan61.fmt, scan61.index, count=count, mm=MM, address=address, vm_flags=0,
                    present=present, walk=0, result=result[verdict], **OWNER)

    m = model_of(list(lays.values()), [(scan61, [walked(EVERY4TH, "exceed_none_pte"),
                                                 walked(EVERY4TH, "exceed_none_pte")])],
                 end=False)
    totals = []
    for present in (FULL, FULL):
        totals.append(m.snapshot().report["wasted"]["by_reason"]["futile_rescan"]["attempts"])
        m.add(Part("R", event=scan61.index, data=walked(present, "exceed_none_pte")))
    m.add(Part("R", event=scan61.index, data=walked(FULL, "page_pmd_mapped", 50,
                                                     address=PMD + (2 << 20))))
    totals.append(m.report()["wasted"]["by_reason"]["futile_rescan"]["attempts"])
    assert totals == [1, 1, 2]  # the FULL rescan repeats the FULL scan: one more


def test_full_pmd_collapsed_once_wastes_nothing() -> None:
    w = wasted(visit([(0, 9, "succeeded", 1000)], FULL))
    assert w["available"] is True and list(w["by_reason"]) == list(REASONS)
    assert all(c["attempts"] == 0 and c["bytes"] == 0 for c in w["by_reason"].values())


def test_without_function_probes_it_says_why() -> None:
    w = model_of(layouts("6.18"), []).report()["wasted"]
    assert w["available"] is False and "function probes" in w["why"]


def test_uffd_isolate_is_exact_when_detail_records_are_lost() -> None:
    # 3 attempts reached user space; the kernel counted 5 uffd attempts at order 9 and 2 at
    # order 8 (the ring buffer refused the rest): the totals are the kernel's, and the
    # collapse counts too. top_pmds can only name what arrived.
    m = model_of(list(LAYS.values()), visit(UFFD_WALK, EVERY4TH, UFFD), BITS, end=False)
    status = STATUS["exceed_none_pte"]
    exact = {"fn_collapse": [[9, status, 1, 5, 5000, 1000], [8, status, 1, 2, 2000, 1000]],
             "mm_collapse_huge_page": [[9, status, 2, 5, 0, 0], [8, status, 2, 2, 0, 0]]}
    m.add(Part("E", meta={"mono_ns": 10**13, "probe": {"exact": exact, "seen": {}, "lost": {}}}))
    r = m.report()
    assert cost(r["wasted"], "uffd_isolate") == (7, 5 * 2 * MiB + 2 * MiB, 7e-6)
    assert r["collapse"]["by_order"]["9"]["attempts"] == 5
    assert r["collapse"]["by_order"]["8"]["attempts"] == 2
    assert r["functions"]["collapse_huge_page"]["by_uffd"] == {"yes": 7}
    assert r["exact_counts"] is True


def test_attempts_without_vma_flags_are_said_and_bound_uffd_isolate() -> None:
    # The kernel counted 5 uffd attempts at order 9 and 3 at order 8 whose scan began before
    # the per-PMD probe attached (uffd unknown, 2): those count under alloc_then_fail and are
    # said as vma_unknown, so uffd_isolate + vma_unknown = every wasted folio of the window.
    m = model_of(list(LAYS.values()), visit(UFFD_WALK, EVERY4TH, UFFD), BITS, end=False)
    status = STATUS["exceed_none_pte"]
    exact = {"fn_collapse": [[9, status, 1, 5, 5000, 1000], [8, status, 2, 3, 3000, 1000]]}
    m.add(Part("E", meta={"mono_ns": 10**13, "probe": {"exact": exact, "seen": {}, "lost": {}}}))
    w = m.report()["wasted"]
    assert w["vma_unknown"] == {"attempts": 3, "bytes": 3 * MiB, "seconds": 3e-6}
    assert cost(w, "uffd_isolate") == (5, 5 * 2 * MiB, 5e-6)
    assert cost(w, "alloc_then_fail")[0] == 3
