"""The PMD correlator (khmon.model.correlate) and the grid view: PMD records from
hand-packed 7.2 function-probe and isolate records, checked against bitmaps and offsets
computed here by hand."""

from __future__ import annotations

from khdata import START_NS as START
from khdata import by_name, func_layouts_72, model_of, pack, stream_header

from khmon.capture.ringbuf import group_runs
from khmon.model.model import Model
from khmon.outputs.text import render_grid
from khmon.stream.parts import Part

LAYS = by_name(func_layouts_72())
SCAN, COL, ISO = LAYS["fn_pmd_scan"], LAYS["fn_collapse"], LAYS["mm_collapse_huge_page_isolate"]
STATUS = {v: k for k, v in COL.fmt.symbols["result"].items()}  # 7.2's scan_result by name
BITS = {"uffd_missing": 1 << 9, "uffd_wp": 1 << 12, "hugepage": 1 << 29}
MM, PMD = 0xFFFF888012345600, 0x7F12_3440_0000
# every 4th PTE empty: PTEs 3, 7, 11 ... clear, so each byte is 0b0111_0111
EVERY4TH = bytes([0x77]) * 64


def owner(**kw: int | bytes) -> dict:
    return dict(tid=37, comm=b"khugepaged", owner_tgid=4242, owner_comm=b"khmon-workload", **kw)


def scan(count: int, result: str, flags: int, address: int = PMD + 0x1234) -> bytes:
    return pack(SCAN.fmt, SCAN.index, count=count, mm=MM, address=address, vm_start=PMD,
                vm_end=PMD + (8 << 21), vm_flags=flags, result=STATUS[result], **owner())


def attempt(offset: int, order: int, result: str, ts: int, dur: int,
            bitmap: bytes = EVERY4TH, flags: int | None = None) -> bytes:
    """A collapse_huge_page record; `flags`: the VMA flags of the per-PMD call it ran in."""
    inside = {} if flags is None else {"vm_flags": flags, "in_pmd_scan": 1}
    return pack(COL.fmt, COL.index, ts=ts, mm=MM, address=PMD + offset * 4096, order=order,
                present=bitmap, duration_ns=dur, result=STATUS[result], **inside, **owner())


def isolate(status: str, ts: int, tid: int = 37) -> bytes:
    return pack(ISO.fmt, ISO.index, ts=ts, tid=tid, order=9,
                status={v: k for k, v in ISO.fmt.symbols["status"].items()}[status])


def correlate(*batches: tuple) -> list[dict]:
    """The PMD records of a stream of these batches, ended."""
    return model_of(list(LAYS.values()), list(batches), BITS).report()["pmds"]


def test_a_uffd_pmd_with_failed_attempts() -> None:
    # One PMD scanned 5 times (a record and a flush of 4 repeats), two attempts per pass:
    # order 9 at offset 0 and order 8 at offset 256, both rejected at isolate.
    uffd = BITS["uffd_missing"] | BITS["hugepage"]
    (p,) = correlate(
        (ISO, [isolate("exceed_none_pte", ts=150), isolate("exceed_none_pte", ts=350)]),
        (COL, [attempt(0, 9, "exceed_none_pte", ts=200, dur=100),
               attempt(256, 8, "exceed_none_pte", ts=400, dur=100)]),
        (SCAN, [scan(1, "failed", uffd), scan(4, "failed", uffd)]),
    )
    assert (p["pid"], p["comm"], p["address"], p["mm"]) == (
        4242, "khmon-workload", hex(PMD), hex(MM))
    assert (p["scans"], p["verdict"], p["uffd"], p["vma_flag_names"]) == (
        5, "failed", True, ["hugepage", "uffd_missing"])
    assert (p["bitmap"], p["bitmap_source"], p["present"]) == ("77" * 64, "kernel", 384)
    assert [(a["offset"], a["order"], a["isolate_status"], a["status"], a["count"],
             a["latency_ns"]) for a in p["attempts"]] == [
        (0, 9, "exceed_none_pte", "exceed_none_pte", 1, 100),
        (256, 8, "exceed_none_pte", "exceed_none_pte", 1, 100)]


def test_isolates_of_other_threads_or_times_are_not_claimed() -> None:
    (p,) = correlate((ISO, [isolate("exceed_none_pte", ts=150, tid=99),
                            isolate("exceed_none_pte", ts=50)]),
                     (COL, [attempt(0, 9, "succeeded", ts=200, dur=100)]))
    assert p["attempts"][0]["isolate_status"] is None
    assert p["attempts"][0]["status"] == "succeeded"


def test_pmds_are_told_apart_and_sorted_by_attempts() -> None:
    other = PMD + (2 << 20)
    recs = correlate((SCAN, [scan(3, "succeeded", BITS["hugepage"], address=other),
                             scan(1, "no_pte_table", 0)]),
                     (COL, [attempt(0, 9, "succeeded", ts=1, dur=1)]))
    assert [(r["address"], r["scans"], len(r["attempts"])) for r in recs] == [
        (hex(PMD), 1, 1), (hex(other), 3, 0)]
    assert recs[1]["uffd"] is False and recs[1]["bitmap"] is None


def test_grid_marks_present_ptes_and_attempted_ranges() -> None:
    (p,) = correlate((COL, [attempt(0, 9, "exceed_none_pte", ts=1, dur=1000),
                            attempt(64, 6, "succeeded", ts=2, dur=2000)]))
    out = render_grid(p)
    rows = [line[6:] for line in out[2:10]]
    assert len(rows) == 8 and all(len(r) == 64 for r in rows)
    # Row 0 is inside only A (order 9): present PTEs upper case, every 4th lower case.
    assert rows[0] == "AAAa" * 16
    # Row 1 (PTEs 64..127) is B's range (order 6, the smaller one wins).
    assert rows[1] == "BBBb" * 16
    assert out[10].startswith("  A: offset 0 order 9 (512 PTEs): exceed_none_pte")
    assert out[11].startswith("  B: offset 64 order 6 (64 PTEs): succeeded, 2.0 us mean, 1x")


def test_grid_without_bitmap_or_attempts() -> None:
    (p,) = correlate((SCAN, [scan(2, "no_pte_table", 0)]))
    rows = [line[6:] for line in render_grid(p)[2:10]]
    assert rows == ["?" * 64] * 8



def test_grid_of_an_inferred_bitmap_shows_the_unknown_ptes() -> None:
    # 7.2 orders 2..8, max_ptes_none 511, PTE 0 alone present and no bitmap source: the
    # walk's one try, (0,8), succeeded, and every range after it failed its pre-check (all
    # clear). PTEs 0..255 are unknown (`?`, or the attempt's letter in upper case).
    (p,) = correlate((COL, [attempt(0, 8, "succeeded", ts=1, dur=1)]))
    p.update(bitmap="00" * 64, bitmap_source="inferred", present=0,
             bitmap_known="00" * 32 + "ff" * 32)
    out = render_grid(p)
    assert "bitmap inferred, 0 present, 256 unknown" in out[0]
    rows = [line[6:] for line in out[2:10]]
    assert rows == ["A" * 64] * 4 + ["." * 64] * 4

def test_ptwalk_bitmap_on_6_1() -> None:
    from khdata import func_layouts_61

    from khmon.capture.ptwalk import PtWalkPlan

    lays = by_name(func_layouts_61(PtWalkPlan(72, 1, None, None, 2, None, None)))
    scan61 = lays["fn_pmd_scan"]
    result = {v: k for k, v in scan61.fmt.symbols["result"].items()}
    first_half = bytes([0xFF]) * 32 + bytes(32)  # PTEs 0..255 present
    swap = bytes(31) + bytes([0x80]) + bytes(32)  # PTE 255 is a swap entry, hand-placed
    walked = pack(scan61.fmt, scan61.index, count=7, mm=MM, address=PMD, vm_flags=0,
                  present=first_half, swap=swap, zero=bytes(64), none_ptes=255, swap_ptes=1,
                  zero_ptes=0, present_ptes=256, levels=5, zero_known=1, walk=0,
                  result=result["exceed_none_pte"], **owner())
    huge = pack(scan61.fmt, scan61.index, count=3, mm=MM, address=PMD + (2 << 20),
                walk=-7, result=result["page_pmd_mapped"], **owner())
    a, b = sorted(model_of(list(lays.values()), [(scan61, [walked, huge])], BITS).report()["pmds"],
                  key=lambda r: r["address"])
    assert (a["bitmap"], a["bitmap_source"], a["present"], a["ptes"]) == (
        "ff" * 32 + "00" * 32, "ptwalk", 256, {"none": 255, "swap": 1, "zero": 0})
    assert (a["scans"], a["verdict"]) == (7, "exceed_none_pte")
    # a walk that stopped at a huge PMD gives no bitmap, not an empty one
    assert (b["bitmap"], b["bitmap_source"], b["verdict"]) == (None, None, "page_pmd_mapped")


def test_attempts_are_grouped_into_passes() -> None:
    # Two passes of the uffd walk, each (0,9) then (0,8) then (256,8), all failing; then a
    # third pass on a changed bitmap that collapses (0,9). A pass ends where the walk stops
    # moving forward (offset back to 0 at order 9).
    full = bytes([0xFF]) * 64
    walk = [(0, 9), (0, 8), (256, 8)]
    recs = [attempt(off, order, "exceed_none_pte", ts=100 * i + 10 * k, dur=10 + i)
            for i in range(2) for k, (off, order) in enumerate(walk)]
    recs.append(attempt(0, 9, "succeeded", ts=500, dur=70, bitmap=full))
    (p,) = correlate((COL, recs))
    assert [(ps["count"], ps["bitmap"], [(a["offset"], a["order"], a["status"], a["latency_ns"])
                                         for a in ps["attempts"]]) for ps in p["passes"]] == [
        (2, "77" * 64, [(0, 9, "exceed_none_pte", 10), (0, 8, "exceed_none_pte", 10),
                        (256, 8, "exceed_none_pte", 10)]),  # mean of 10 and 11, floored
        (1, "ff" * 64, [(0, 9, "succeeded", 70)])]
    assert p["passes_dropped"] == 0


def test_passes_of_two_threads_do_not_mix() -> None:
    a37 = attempt(0, 9, "exceed_none_pte", ts=1, dur=1)
    a38 = pack(COL.fmt, COL.index, ts=2, mm=MM, address=PMD, order=9, present=EVERY4TH,
               duration_ns=1, result=STATUS["exceed_none_pte"],
               **{**owner(), "tid": 38})
    (p,) = correlate((COL, [a37, a38, attempt(0, 8, "exceed_none_pte", ts=3, dur=1)]))
    assert sorted((ps["count"], len(ps["attempts"])) for ps in p["passes"]) == [(1, 1), (1, 2)]


def test_pagemap_samples_on_a_tracepoint_only_kernel() -> None:
    # 6.18's classic mm_khugepaged_scan_pmd names the page by pfn. Two scans of one PMD
    # (a record counted 2) refused with exceed_none_pte, and the pagemap part for its page:
    # every 4th PTE empty, PTE 1 the zero page (so not in the bitmap, counted as zero).
    from khdata import layouts

    tps = by_name(layouts("6.18"))
    sp = tps["mm_khugepaged_scan_pmd"]
    status = {v: k for k, v in sp.fmt.symbols["status"].items()}
    m = model_of(list(tps.values()), [(sp, [pack(sp.fmt, sp.index, count=2, mm=MM, pfn=0x1234,
                                                 status=status["exceed_none_pte"], **owner())])],
                 end=False, pagemap_ref="pfn")
    assert m.pmds.active
    zero = bytearray(64)
    zero[0] = 0b10
    m.add(Part("P", meta={"mm": MM, "pid": 4242, "comm": "khmon-workload", "ref": 0x1234,
                          "pfn": 0x1234, "address": PMD, "present": "77" * 64, "zero": zero.hex(),
                          "swap": "00" * 64, "none": 128, "shared": 0}))
    (p,) = m.report()["pmds"]
    assert (p["pid"], p["address"], p["bitmap_source"], p["scans"], p["verdict"]) == (
        4242, hex(PMD), "pagemap", 2, "exceed_none_pte")
    assert p["bitmap"] == "75" + "77" * 63 and p["present"] == 383
    assert p["ptes"] == {"none": 128, "swap": 0, "zero": 1, "shared": 0}


def test_pagemap_never_replaces_a_better_source() -> None:
    m = model_of(list(LAYS.values()), [(COL, [attempt(0, 9, "succeeded", ts=1, dur=1)])], BITS)
    m.add(Part("P", meta={"mm": MM, "pid": 4242, "ref": 1, "pfn": 1, "address": PMD,
                          "present": "ff" * 64, "zero": "00" * 64, "swap": "00" * 64, "none": 0,
                          "shared": 0}))
    (p,) = m.report()["pmds"]
    assert (p["bitmap_source"], p["bitmap"]) == ("kernel", "77" * 64)


def test_inferred_bitmap_where_no_source_reads_the_ptes() -> None:
    # 6.1 without the PTE walk (no page_offset_base): the attempts are all there is. The one
    # try, (0,9), succeeded under max_ptes_none 0 with no swap-in, so all 512 PTEs were
    # present: the `inferred` bitmap, every bit known. Under max_ptes_none 511 the same try
    # pins nothing, and a try that swapped pages in pins nothing either.
    from khdata import func_layouts_61

    lays = by_name(func_layouts_61(None))
    col, swapin = lays["fn_collapse"], lays["mm_collapse_huge_page_swapin"]
    ok = {v: k for k, v in col.fmt.symbols["result"].items()}["succeeded"]
    collapse = pack(col.fmt, col.index, ts=200, mm=MM, address=PMD, duration_ns=100, result=ok,
                    **owner())

    def record(max_ptes_none: str, *batches: tuple) -> dict:
        m = model_of(list(lays.values()), [(lay, [data]) for lay, data in batches], BITS,
                     settings={"enabled": "madvise", "khugepaged/max_ptes_none": max_ptes_none})
        (p,) = m.report()["pmds"]
        # live views ask again and again: the inference is never stored as the PMD's bitmap
        assert m.report()["pmds"] == [p] and m.pmds.pmds[(MM, 4242, PMD)].bitmap is None
        return p

    p = record("0", (col, collapse))
    assert (p["bitmap_source"], p["bitmap"], p["bitmap_known"], p["present"]) == (
        "inferred", "ff" * 64, "ff" * 64, 512)
    assert p["passes"][0]["bitmap"] is None  # the pass itself had no bitmap to replay
    assert record("511", (col, collapse))["bitmap_source"] is None
    swapped = pack(swapin.fmt, swapin.index, ts=150, tid=37, mm=MM, swapped_in=3, referenced=3,
                   ret=1)
    p = record("0", (swapin, swapped), (col, collapse))
    assert (p["bitmap_source"], p["passes"][0]["attempts"][0]["swapped_in"]) == (None, True)


def test_interleaved_pmds_in_one_poll_keep_their_pass_bitmaps() -> None:
    # 6.1: per PMD the collapse exit comes before the scan exit that carries the walked
    # bitmap. Two PMDs collapsed within one ring-buffer poll arrive as collapse A, scan A,
    # collapse B, scan B. LiveProbes._take keeps that order (runs of one event each); fed
    # so, each pass has its own PMD's bitmap. (Grouping the poll by event, collapses first,
    # closed A's pass before scan A arrived: the CI failure of a pass without a bitmap.)
    from khdata import func_layouts_61

    from khmon.capture.ptwalk import PtWalkPlan

    lays = by_name(func_layouts_61(PtWalkPlan(72, 1, None, None, 2, None, None)))
    scan61, col = lays["fn_pmd_scan"], lays["fn_collapse"]
    result = {v: k for k, v in scan61.fmt.symbols["result"].items()}
    ok = {v: k for k, v in col.fmt.symbols["result"].items()}["succeeded"]

    def collapse(pmd: int, ts: int) -> bytes:
        return pack(col.fmt, col.index, ts=ts, mm=MM, address=pmd, duration_ns=10, result=ok,
                    **owner())

    def walked(pmd: int, ts: int, present: bytes) -> bytes:
        return pack(scan61.fmt, scan61.index, ts=ts, mm=MM, address=pmd, vm_flags=0,
                    present=present, walk=0, result=result["succeeded"], **owner())

    a, b = PMD, PMD + (2 << 20)
    full, half = bytes([0xFF]) * 64, bytes([0xFF]) * 32 + bytes(32)
    identity = type("Identity", (), {"resolve": staticmethod(lambda raw: raw)})()
    runs = group_runs([collapse(a, 10), walked(a, 11, full), collapse(b, 20),
                       walked(b, 21, half)], identity)
    assert [ev for ev, _ in runs] == [col.index, scan61.index] * 2
    m = Model(stream_header(list(lays.values()), BITS), list(lays.values()))
    for ev, data in runs:
        m.add(Part("R", event=ev, data=data))
    got = {p["address"]: [ps["bitmap"] for ps in p["passes"]] for p in m.report()["pmds"]}
    assert got == {hex(a): [full.hex()], hex(b): [half.hex()]}


# --- the streaming core: reading is pure, passes close on the stream, memory is bounded ----

def stream() -> Model:
    return Model(stream_header(list(LAYS.values()), BITS), list(LAYS.values()))


def feed(m: Model, lay: object, *recs: bytes) -> None:
    m.add(Part("R", event=lay.index, data=b"".join(recs)))


def passes(m: Model) -> list[tuple]:
    (p,) = m.report()["pmds"]
    return [(ps["count"], ps.get("open", False), [(a["offset"], a["order"])
                                                  for a in ps["attempts"]]) for ps in p["passes"]]


def test_a_read_in_the_middle_of_a_pass_changes_nothing() -> None:
    # The review's case: a read between (0,9) and (0,8) must not split the pass in two.
    m = stream()
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=100, dur=10))
    assert passes(m) == [(1, True, [(0, 9)])]  # shown open, not closed
    m.snapshot()
    feed(m, COL, attempt(0, 8, "exceed_none_pte", ts=200, dur=10))
    m.add(Part("E", meta={"mono_ns": START + 300}))
    assert passes(m) == [(1, False, [(0, 9), (0, 8)])]
    assert m.report()["wasted"]["by_reason"]["order_cascade"]["attempts"] == 1


def test_the_per_pmd_exit_ends_the_pass_and_an_idle_pass_ends_at_a_stats_tick() -> None:
    m = stream()
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=START + 100, dur=10))
    feed(m, SCAN, scan(1, "exceed_none_pte", BITS["uffd_missing"]))
    assert passes(m) == [(1, False, [(0, 9)])]  # collapse_single_pmd returned: closed
    later = START + 10_000
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=later, dur=10))
    m.add(Part("S", meta={"mono_ns": later + 1_000_000_000}))  # 1 s later: may go on
    assert passes(m) == [(1, False, [(0, 9)]), (1, True, [(0, 9)])]
    m.add(Part("S", meta={"mono_ns": later + 3_000_000_000}))  # 3 s idle: over
    assert passes(m) == [(2, False, [(0, 9)])]


def test_a_recycled_mm_is_a_new_process() -> None:
    # pid 4242 exits; its mm address comes back for pid 5151. The new process does not
    # inherit 4242's attempts, and 4242 is known to be gone.
    m = stream()
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=1, dur=1))
    new = pack(COL.fmt, COL.index, ts=2, mm=MM, address=PMD, order=9, present=EVERY4TH,
               duration_ns=1, result=STATUS["succeeded"],
               **{**owner(), "tid": 38, "owner_tgid": 5151, "owner_comm": b"newcomer"})
    feed(m, COL, new)
    r = m.report()
    got = {(p["pid"], p["comm"]): [a["status"] for a in p["attempts"]] for p in r["pmds"]}
    assert got == {(4242, "khmon-workload"): ["exceed_none_pte"], (5151, "newcomer"): ["succeeded"]}
    old = m.processes.procs[(MM, 4242)]
    assert old.exited_ns is not None and m.processes.procs[(MM, 5151)].exited_ns is None


def test_exited_processes_are_forgotten_after_their_grace() -> None:
    m = Model(stream_header(list(LAYS.values()), BITS), list(LAYS.values()), exit_grace_s=5)
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=START + 1, dur=1))
    m.add(Part("S", meta={"mono_ns": START + 1_000_000_000, "exited": [4242]}))
    assert len(m.report()["pmds"]) == 1  # still shown for a while
    m.add(Part("S", meta={"mono_ns": START + 7_000_000_000}))
    r = m.report()
    assert r["pmds"] == [] and r["processes"] == []
    assert r["model"]["pmds_evicted"] == {"exited": 1}
    assert r["model"]["processes_forgotten"] == {"exited": 1}
    # totals stay: they only ever grow
    assert r["wasted"]["by_reason"]["uffd_isolate"]["attempts"] + \
        r["wasted"]["by_reason"]["alloc_then_fail"]["attempts"] == 1


def test_pmd_records_are_capped_least_recently_active_first() -> None:
    m = Model(stream_header(list(LAYS.values()), BITS), list(LAYS.values()), pmd_cap=3)
    for i in range(5):
        feed(m, SCAN, scan(1, "exceed_none_pte", 0, address=PMD + (i << 21)))
    feed(m, SCAN, scan(1, "exceed_none_pte", 0, address=PMD + (2 << 21)))  # touch the third
    feed(m, SCAN, scan(1, "exceed_none_pte", 0, address=PMD + (9 << 21)))
    r = m.report()
    assert sorted(int(p["address"], 16) - PMD >> 21 for p in r["pmds"]) == [2, 4, 9]
    assert r["model"]["pmds_evicted"] == {"lru": 3} and r["model"]["pmds_tracked"] == 3
    assert r["scan_pmd"] == {"by_status": {}}  # fn scans are not tracepoint scans
    assert r["functions"]["pmd_scans"]["calls"] == 7  # but every scan is still counted


def test_a_tracepoint_only_stream_queues_no_isolate_events() -> None:
    # On the CI host (tracepoints only) nothing would ever claim isolate or swap-in events:
    # they are counted, never queued, however many arrive.
    from khdata import layouts

    tps = by_name(layouts("6.18"))
    iso = tps["mm_collapse_huge_page_isolate"]
    m = model_of(list(tps.values()), [], end=False)
    for _ in range(10):
        feed(m, iso, *[pack(iso.fmt, iso.index, ts=t, tid=t % 7, status=1) for t in range(10_000)])
    assert m.events[iso.index].total == 100_000
    assert not m.pmds._isolates and not m.pmds._swapins and not m.pmds.pmds
    assert len(m.processes) == 0


def test_lost_detail_is_marked_on_the_pmd_records_it_touched() -> None:
    m = stream()
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=1, dur=1))
    m.add(Part("S", meta={"mono_ns": 2, "lost_pmds": [[MM, PMD, 3], [MM, 0, 2]]}))
    m.add(Part("S", meta={"mono_ns": 3, "lost_pmds": [[MM, PMD, 5]]}))
    r = m.report()
    assert r["pmds"][0]["detail_lost"] == 5
    assert r["processes"][0]["detail_lost"] == 2


def test_settings_changes_are_epochs_that_passes_remember() -> None:
    m = stream()
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=1, dur=1))
    feed(m, SCAN, scan(1, "exceed_none_pte", 0))
    m.add(Part("S", meta={"mono_ns": START + 1_000_000_000,
                          "settings": {"enabled": "always [madvise] never",
                                       "khugepaged/max_ptes_none": "0"}}))
    feed(m, COL, attempt(0, 9, "exceed_none_pte", ts=START + 2_000_000_000, dur=1))
    m.add(Part("E", meta={"mono_ns": START + 3_000_000_000}))
    r = m.report()
    assert [ps["settings_epoch"] for ps in r["pmds"][0]["passes"]] == [0, 1]
    assert r["settings_changes"] == [{"seconds": 1.0, "epoch": 1, "settings": {
        "enabled": "always [madvise] never", "khugepaged/max_ptes_none": "0"}}]
    assert r["settings"]["khugepaged/max_ptes_none"] == "0"
