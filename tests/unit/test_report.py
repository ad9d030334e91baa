"""report and render: counts from hand-packed records of the real 6.18 and 7.2 layouts."""

from __future__ import annotations

import pytest
from khdata import END_COUNTERS, START_COUNTERS, by_name, capture_header, layouts, pack, stats_meta

from khmon.model.model import Model
from khmon.outputs.text import render_report
from khmon.stream.parts import Part


@pytest.fixture(scope="module")
def report_6_18() -> dict:
    header = capture_header("6.18", "6.18.44")
    lays = by_name(layouts("6.18"))
    scan, col = lays["mm_khugepaged_scan_pmd"], lays["mm_collapse_huge_page"]
    kw = {"tid": 50, "tgid": 50, "comm": b"khugepaged"}
    agg = Model(header)
    # scan_pmd: 1 success, 1000 repeats of exceed_none_pte (a drain), 3 more for pid 200,
    # 2 pmd_none with the owner unknown; split over two R parts
    agg.add(Part("R", event=scan.index, data=b"".join([
        pack(scan.fmt, scan.index, owner_tgid=100, owner_comm=b"workload", status=1, **kw),
        pack(scan.fmt, scan.index, count=1000, owner_tgid=100, owner_comm=b"workload",
             status=5, none_or_zero=300, **kw),
    ])))
    agg.add(Part("S", meta=stats_meta({}, {}, secs=1.0)))
    agg.add(Part("R", event=scan.index, data=b"".join([
        pack(scan.fmt, scan.index, count=3, owner_tgid=200, owner_comm=b"other", status=5, **kw),
        pack(scan.fmt, scan.index, count=2, owner_tgid=0, status=3, **kw),
    ])))
    # collapses: one success (pid 100), one not_suitable_page_count (14 on 6.18; pid 200)
    agg.add(Part("R", event=col.index, data=b"".join([
        pack(col.fmt, col.index, owner_tgid=100, owner_comm=b"workload", status=1, isolated=1,
             **kw),
        pack(col.fmt, col.index, owner_tgid=200, owner_comm=b"other", status=14, **kw),
    ])))
    agg.add(Part("E", meta=stats_meta(
        seen={"mm_khugepaged_scan_pmd": 1010, "mm_collapse_huge_page": 2,
              "mm_collapse_huge_page_isolate": 5},
        lost={"mm_khugepaged_scan_pmd": 4})))
    return agg.report(["a warning"])


def test_events(report_6_18: dict) -> None:
    assert report_6_18["events"] == {
        "mm_collapse_huge_page": 2, "mm_collapse_huge_page_isolate": 0,
        "mm_collapse_huge_page_swapin": 0, "mm_khugepaged_collapse_file": 0,
        "mm_khugepaged_scan_file": 0, "mm_khugepaged_scan_pmd": 1006}


def test_collapse(report_6_18: dict) -> None:
    c = report_6_18["collapse"]
    assert c["attempts"] == 2
    assert c["succeeded"] == 1
    assert c["by_status"] == {"succeeded": 1, "not_suitable_page_count": 1}
    assert c["by_order"] == {}
    assert c["file"] == {"attempts": 0, "succeeded": 0, "by_status": {}}


def test_scan_pmd_by_status(report_6_18: dict) -> None:
    by = report_6_18["scan_pmd"]["by_status"]
    assert by == {"exceed_none_pte": 1003, "pmd_none": 2, "succeeded": 1}
    assert list(by) == ["exceed_none_pte", "pmd_none", "succeeded"]  # most first
    assert report_6_18["by_event"]["mm_khugepaged_scan_pmd"] == {"count": 1006, "by_status": by}


def test_processes(report_6_18: dict) -> None:
    assert report_6_18["processes"] == [
        {"pid": 100, "comm": "workload", "scans": 1001, "collapse_attempts": 1, "collapses": 1},
        {"pid": 200, "comm": "other", "scans": 3, "collapse_attempts": 1, "collapses": 0},
        {"pid": None, "comm": "(owner unknown)", "scans": 2, "collapse_attempts": 0,
         "collapses": 0},
    ]


def test_kernel_counters_and_window(report_6_18: dict) -> None:
    kc = report_6_18["kernel_counters"]
    assert kc["delta"] == {"thp_collapse_alloc": 1, "khugepaged/pages_collapsed": 1,
                           "khugepaged/full_scans": 2, "hugepages-64kB/stats/collapse_alloc": 0}
    assert kc["start"] == START_COUNTERS and kc["end"] == END_COUNTERS
    assert report_6_18["window"] == {"seconds": 2.5, "start": "2026-11-26T10:00:00.000+00:00",
                                     "end": "2026-11-26T10:00:02.500+00:00", "complete": True}
    assert report_6_18["kernel"] == {"release": "6.18.44", "has_order": False,
                                     "owner_source": "mm->owner (BTF offsets)"}
    assert report_6_18["filter"] == {"pid": None}
    assert report_6_18["settings"] == {"enabled": "always [madvise] never"}
    assert report_6_18["warnings"] == ["a warning"]


def test_lost_and_accounting(report_6_18: dict) -> None:
    assert report_6_18["lost_events"] == 4
    acc = report_6_18["accounting"]
    assert acc["mm_khugepaged_scan_pmd"] == {"seen": 1010, "recorded": 1006, "records": 4,
                                             "lost": 4, "missed": 0, "unaccounted": 0}
    assert acc["mm_collapse_huge_page"] == {"seen": 2, "recorded": 2, "records": 2, "lost": 0,
                                            "missed": 0, "unaccounted": 0}
    # seen by the probes but neither recorded nor lost
    assert acc["mm_collapse_huge_page_isolate"]["unaccounted"] == 5


def test_render_6_18(report_6_18: dict) -> None:
    text = render_report(report_6_18)
    assert text.startswith("khmon report: kernel 6.18.44, window 2.50 s\n")
    assert "anon collapses: 2 attempts, 1 succeeded" in text
    assert "by status: succeeded 1, not_suitable_page_count 1" in text
    assert "no order field" in text
    assert "scan_pmd verdicts: exceed_none_pte 1003, pmd_none 2, succeeded 1" in text
    # said in words, not as a Python dict (issue 10, item 13)
    assert ("lost events: 4; the probes' counts do not balance:\n"
            "  mm_collapse_huge_page_isolate: 5 seen by the probes but neither in the counts "
            "nor counted as lost\n") in text
    assert "warning: a warning" in text
    lines = text.splitlines()
    row = next(ln for ln in lines if ln.split()[:1] == ["mm_khugepaged_scan_pmd"])
    assert row.split() == ["mm_khugepaged_scan_pmd", "1006", "4", "4"]
    proc = next(ln for ln in lines if ln.split()[:2] == ["100", "workload"])
    assert proc.split() == ["100", "workload", "1001", "1", "1"]
    assert any(ln.split() == ["-", "(owner", "unknown)", "2", "0", "0"] for ln in lines)
    counter = next(ln for ln in lines if ln.split()[:1] == ["khugepaged/full_scans"])
    assert counter.split() == ["khugepaged/full_scans", "2"]
    # zero deltas are omitted from the text
    assert "hugepages-64kB/stats/collapse_alloc" not in text


def test_incomplete_stream_uses_last_stats() -> None:
    agg = Model(capture_header("6.18", "6.18.44"))
    agg.add(Part("S", meta=stats_meta({"mm_khugepaged_scan_pmd": 3}, {}, secs=1.25)))
    r = agg.report()
    assert r["window"]["seconds"] == 1.25
    assert r["window"]["complete"] is False
    assert r["accounting"]["mm_khugepaged_scan_pmd"]["unaccounted"] == 3
    assert "(incomplete recording)" in render_report(r).splitlines()[0]


def test_no_stats_at_all() -> None:
    r = Model(capture_header("6.18", "6.18.44")).report()
    assert r["window"]["seconds"] == 0
    assert r["kernel_counters"]["delta"] == {k: 0 for k in START_COUNTERS}
    assert r["lost_events"] == 0
    assert r["processes"] == []
    assert sum(r["events"].values()) == 0


@pytest.fixture(scope="module")
def report_7_2() -> dict:
    header = capture_header("7.2", "7.2.13+deb14-amd64")
    lays = by_name(layouts("7.2"))
    col, scan, pass_ = (lays["mm_collapse_huge_page"], lays["mm_khugepaged_scan_pmd"],
                        lays["mm_khugepaged_scan"])
    own = {"owner_tgid": 300, "owner_comm": b"uffd"}
    agg = Model(header)
    agg.add(Part("R", event=col.index, data=b"".join([
        # 7.2 numbering: 4 exceed_none_pte, 13 not_suitable_page_count, 1 succeeded
        # (orders out of order on purpose: the report sorts them)
        pack(col.fmt, col.index, status=13, order=4, **own),
        pack(col.fmt, col.index, status=4, order=9, **own),
        pack(col.fmt, col.index, status=4, order=8, **own),
        pack(col.fmt, col.index, status=4, order=9, **own),
        pack(col.fmt, col.index, status=1, order=9, **own),
    ])))
    agg.add(Part("R", event=scan.index, data=b"".join([
        pack(scan.fmt, scan.index, count=7, status=1, **own),
        pack(scan.fmt, scan.index, count=2, status=2, **own),
        pack(scan.fmt, scan.index, count=1, status=31, **own),
        pack(scan.fmt, scan.index, count=1, status=77, **own),
    ])))
    agg.add(Part("R", event=pass_.index,
                 data=pack(pass_.fmt, pass_.index, count=5, progress=512, full_scan_finished=1,
                           **own)))
    agg.add(Part("E", meta=stats_meta({"mm_collapse_huge_page": 5, "mm_khugepaged_scan_pmd": 11,
                                 "mm_khugepaged_scan": 5}, {})))
    return agg.report()


def test_7_2_by_order(report_7_2: dict) -> None:
    assert report_7_2["kernel"]["has_order"] is True
    c = report_7_2["collapse"]
    assert (c["attempts"], c["succeeded"]) == (5, 1)
    assert c["by_order"] == {
        "9": {"attempts": 3, "succeeded": 1,
              "by_status": {"exceed_none_pte": 2, "succeeded": 1}},
        "8": {"attempts": 1, "succeeded": 0, "by_status": {"exceed_none_pte": 1}},
        "4": {"attempts": 1, "succeeded": 0, "by_status": {"not_suitable_page_count": 1}},
    }
    assert list(c["by_order"]) == ["9", "8", "4"]  # largest order first


def test_7_2_status_names(report_7_2: dict) -> None:
    assert report_7_2["scan_pmd"]["by_status"] == {
        "succeeded": 7, "no_pte_table": 2, "page_dirty_or_writeback": 1, "unknown:77": 1}
    assert report_7_2["collapse"]["by_status"] == {
        "exceed_none_pte": 3, "succeeded": 1, "not_suitable_page_count": 1}


def test_7_2_event_without_status(report_7_2: dict) -> None:
    assert report_7_2["events"]["mm_khugepaged_scan"] == 5
    assert report_7_2["by_event"]["mm_khugepaged_scan"] == {"count": 5, "by_status": {}}
    # the per-pass event is not a PMD scan: pid 300's scans are the 11 scan_pmd events
    assert report_7_2["processes"] == [
        {"pid": 300, "comm": "uffd", "scans": 11, "collapse_attempts": 5, "collapses": 1}]


def test_render_7_2(report_7_2: dict) -> None:
    text = render_report(report_7_2)
    assert "no order field" not in text
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("  ")
            and ln.split() and ln.split()[0] in ("9", "8", "4")}
    assert rows["9"][:3] == ["9", "3", "1"]
    assert rows["4"][:3] == ["4", "1", "0"]
    assert "scan_pmd verdicts: succeeded 7, no_pte_table 2, page_dirty_or_writeback 1, " \
           "unknown:77 1" in text
    assert "(every event the probes saw is in the counts or counted as lost)" in text


def test_pid_filter_in_report() -> None:
    h = capture_header("6.18", "6.18.44")
    h["options"]["pid"] = 1234
    r = Model(h).report()
    assert r["filter"] == {"pid": 1234}
    assert ", pid 1234 only" in render_report(r).splitlines()[0]


def test_kernel_skipped_runs_count_as_lost() -> None:
    # recursion_misses from the prog's fdinfo: events khmon never saw, counted as lost.
    header = capture_header("6.18", "6.18.44")
    agg = Model(header)
    meta = stats_meta({"mm_collapse_huge_page": 0}, {"mm_collapse_huge_page": 2})
    meta["probe"]["missed"] = {"mm_collapse_huge_page": 3}
    agg.add(Part("E", meta=meta))
    r = agg.report()
    assert r["lost_events"] == 5
    assert r["accounting"]["mm_collapse_huge_page"]["missed"] == 3


def test_a_lost_collapse_record_turns_the_inference_off() -> None:
    # 6.1 without the PTE walk, max_ptes_none 0: the one successful (0,9) try pins all 512
    # PTEs (`inferred`). Had the ring buffer lost a collapse record, a pass could look as if
    # the walk skipped ranges it tried; the report then infers nothing.
    from khdata import func_layouts_61

    from khmon.stream.layout import header_events

    lays = func_layouts_61(None)
    col = by_name(lays)["fn_collapse"]
    ok = {v: k for k, v in col.fmt.symbols["result"].items()}["succeeded"]
    header = {**capture_header("6.1", "6.1.0-56-amd64"), "events": header_events(lays),
              "settings": {"enabled": "madvise", "khugepaged/max_ptes_none": "0"}}
    data = pack(col.fmt, col.index, ts=200, mm=0x1000, address=0x7F00_0020_0000,
                duration_ns=100, result=ok, owner_tgid=321, owner_comm=b"wl")

    def pmd(lost: int) -> dict:
        agg = Model(header, lays)
        agg.add(Part("R", event=col.index, data=data))
        agg.add(Part("E", meta=stats_meta({"fn_collapse": 1 + lost}, {"fn_collapse": lost})))
        (p,) = agg.report()["pmds"]
        return p

    assert (pmd(0)["bitmap_source"], pmd(0)["bitmap_known"]) == ("inferred", "ff" * 64)
    assert (pmd(1)["bitmap_source"], pmd(1)["bitmap"]) == (None, None)
