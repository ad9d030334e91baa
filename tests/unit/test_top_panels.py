"""khmon top's panels, from snapshot dicts: what they show, N/A for what is missing, hostile
names drawn as text, and every size drawing without an error."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text
from topdata import HOSTILE, frames, hostile, report

from khmon.outputs.escape import printable
from khmon.outputs.text import render_grid
from khmon.outputs.top import panels
from khmon.outputs.top.rates import Point, RateKeeper, counters
from khmon.outputs.top.view import GRID, PMDS, View, pmds_of, process_rows

STATUS = panels.Status("daemon /run/khmon/khmon.sock (pid 1)", "live")


def rates_of(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    k = RateKeeper()
    k.add(Point("s", 0, 1, 1_000_000_000, counters(a)))
    return k.add(Point("s", 0, 2, 2_000_000_000, counters(b)))


def draw(text: Text, width: int = 200) -> str:
    """The text as a terminal shows it: rendered by rich, not just .plain."""
    c = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    c.print(text, overflow="crop", no_wrap=True)
    return c.export_text()


def every_panel(rep: dict[str, Any] | None, w: int, h: int) -> list[Text]:
    r = rep or {}
    view = View()
    rows = view.visible(process_rows(r, {}))
    pmds = pmds_of(r, rows[0].pid if rows else None)
    return [panels.header(rep, {}, STATUS, True, w), panels.sparklines({}, w, h),
            panels.orders(r, {}, w, h), panels.waste(r, {}, w, h),
            panels.processes(rows, None, view, w, h, 0)[0],
            panels.pmd_list(pmds, rows[0] if rows else None, view, w, h, 0)[0],
            panels.grid(pmds[0] if pmds else None, view, w, h), panels.footer(0, True, w),
            panels.help_text()]


def test_header_shows_source_kernel_settings_rates_and_agreement() -> None:
    f = frames()
    r = f[-1]
    r["kernel_counters"]["delta"]["khugepaged/pages_collapsed"] = r["collapse"]["succeeded"]
    text = draw(panels.header(r, rates_of(f[-2], r), STATUS, False, 240))
    lines = text.splitlines()
    assert "daemon /run/khmon/khmon.sock (pid 1)" in lines[0] and "live" in lines[0]
    assert "kernel test" in lines[0] and "bitmap kernel" in lines[0]
    assert "THP madvise" in lines[1] and "max_ptes none 511" in lines[1]
    assert "mTHP 16K:inherit 32K:inherit" in lines[1]
    assert f"collapses {r['collapse']['succeeded']:,}, kernel pages_collapsed" in lines[2]
    assert lines[2].rstrip().endswith("✓")
    assert "scans N/A" not in lines[2] and "/s" in lines[2]


def test_header_marks_disagreement_and_lost_events_in_red() -> None:
    r = report()
    r["kernel_counters"]["delta"]["khugepaged/pages_collapsed"] = r["collapse"]["succeeded"] + 1
    r["lost_events"] = 7
    t = panels.header(r, {}, STATUS, False, 240)
    assert "≠" in t.plain and "lost 7" in t.plain
    lost = t.plain.index("lost 7") + len("lost ")
    assert any(s.start <= lost < s.end and "red" in str(s.style) for s in t.spans)


def test_header_without_a_snapshot_and_with_an_empty_one() -> None:
    assert "waiting for the first snapshot" in panels.header(None, {}, STATUS, False, 100).plain
    t = panels.header({}, {}, STATUS, False, 300).plain
    assert "kernel N/A" in t and "lost N/A" in t and "scans N/A" in t and "CPU N/A" in t


def test_orders_per_order_rows_with_kernel_alloc_latency_and_top_failure() -> None:
    f = frames()
    r = f[-1]
    r["kernel_counters"]["delta"]["hugepages-2048kB/collapse_alloc"] = 3
    lines = draw(panels.orders(r, rates_of(f[-2], r), 160, 20)).splitlines()
    assert lines[0].startswith("Collapse by order") and "KERNEL ALLOC" in lines[1]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert set(rows) == {str(o) for o in range(2, 10)}
    o9 = r["collapse"]["by_order"]["9"]
    assert rows["9"][1] == "2M" and rows["9"][4] == f"{o9['attempts']:,}"
    assert rows["9"][6] == "3"  # the per-size collapse_alloc
    assert rows["8"][6] == "N/A"  # no such stats file in this snapshot
    mean = r["functions"]["collapse_huge_page"]["by_order"]["9"]
    assert rows["9"][7] == f"{mean['seconds'] / mean['calls'] * 1e6:.1f}us"
    assert "exceed_none_pte" in lines[2]


def test_orders_on_a_kernel_without_order_fields() -> None:
    r = {"kernel": {"has_order": False},
         "collapse": {"attempts": 16, "succeeded": 16, "by_status": {"succeeded": 16},
                      "by_order": {}, "file": {"attempts": 0}},
         "kernel_counters": {"delta": {"thp_collapse_alloc": 16}}}
    text = draw(panels.orders(r, {}, 160, 10))
    row = text.splitlines()[2].split()
    assert row[:2] == ["9*", "2M"] and row[4:7] == ["16", "16", "16"] and row[-1] == "-"
    assert "no order" in text


def test_waste_rows_and_unavailable() -> None:
    f = frames()
    text = draw(panels.waste(f[-1], rates_of(f[-2], f[-1]), 80, 10))
    assert "uffd_isolate" in text and "MiB" in text
    t = panels.waste({"wasted": {"available": False, "why": "no [function] probes"}}, {}, 80, 5)
    assert "not judged: no [function] probes" in t.plain


def test_processes_sorted_selected_and_na_rates() -> None:
    r = report()
    view = View()
    rows = view.visible(process_rows(r, {}))
    attempts = [x.attempts for x in rows]
    assert attempts == sorted(attempts, reverse=True)
    view.proc_key = rows[2].key
    text, _top = panels.processes(rows, 99, view, 120, 10, 0)
    lines = text.plain.splitlines()
    assert "6 shown of 99" in lines[0] and "sort ATTEMPTS" in lines[0]
    assert lines[4].split()[0] == str(rows[2].pid)
    assert "N/A" in lines[2]  # no rates from a single snapshot
    sel = [s for s in text.spans if "reverse" in str(s.style) and s.start > len(lines[0]) + 1]
    assert sel and text.plain[sel[-1].start:sel[-1].end].split()[0] == str(rows[2].pid)


def test_processes_scroll_keeps_the_selection_in_view() -> None:
    rows = View().visible(process_rows(report(processes=30), {}))
    view = View(proc_key=rows[25].key)
    text, top = panels.processes(rows, None, view, 120, 7, 0)
    assert top == 21 and str(rows[25].pid) in text.plain.splitlines()[-1]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_comms_are_drawn_literally_as_text(name: str) -> None:
    r = report()
    r["processes"][0]["comm"] = name
    for p in r["pmds"]:
        p["comm"] = name
    rows = process_rows(r, {})
    view = View(proc_key=rows[0].key, level=GRID)
    pmds = pmds_of(r, rows[0].pid)
    texts = [panels.processes(rows, None, view, 160, 20, 0)[0],
             panels.pmd_list(pmds, rows[0], view, 160, 20, 0)[0],
             panels.grid(pmds[0] if pmds else r["pmds"][0], view, 160, 20)]
    shown = printable(name)
    assert "\x1b" not in shown and "\t" not in shown
    for t in texts:
        out = draw(t)
        assert "\x1b" not in out
        assert shown[:15] in out or shown in out


def test_grid_cells_are_report_grids() -> None:
    r = report()
    pmd = next(p for p in r["pmds"] if p["attempts"] and p["bitmap"])
    t = panels.grid(pmd, View(level=PMDS), 120, 30).plain.splitlines()
    ours = [ln[5:] for ln in t[2:10]]
    theirs = [ln[6:] for ln in render_grid(pmd)[2:10]]
    assert ours == theirs
    assert any(ln.startswith("A: offset 0 order 9") for ln in t)


def test_grid_without_bitmap_or_with_a_broken_record() -> None:
    r = report()
    pmd = next(p for p in r["pmds"] if not p["bitmap"])
    assert "?" * 64 in panels.grid(pmd, View(), 100, 12).plain
    assert "N/A" in panels.grid({"address": "0x1"}, View(), 100, 12).plain
    assert "no PMD selected" in panels.grid(None, View(), 100, 12).plain


def test_sparkline_scales_and_shows_holes() -> None:
    t = panels.sparkline([None, 0.0, 1.0, 7.0, None], 10).plain
    assert t == "·▁▂█·"
    assert panels.sparkline([1.0] * 50, 5).plain == "█" * 5


@pytest.mark.parametrize(("w", "h"), [(160, 50), (40, 12), (1, 1), (0, 0), (3, 200)])
def test_every_panel_fits_any_size(w: int, h: int) -> None:
    for rep in (hostile(report()), {}, None):
        for t in every_panel(rep, w, h)[:-1]:  # not the help: a screen of its own, clipped
            lines = t.plain.splitlines()
            assert all(len(line) <= w for line in lines)


def _mangle(d: Any, rng: random.Random) -> Any:
    """Drop keys and swap values for wrong types, at random, all the way down."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            roll = rng.random()
            if roll < 0.1:
                continue
            out[k] = rng.choice([None, "x", 3, -1, [], {}, True]) if roll < 0.2 else _mangle(v, rng)
        return out
    if isinstance(d, list):
        return [_mangle(x, rng) for x in d]
    return d


@pytest.mark.parametrize("seed", range(40))
def test_mangled_snapshots_never_raise(seed: int) -> None:
    rep = _mangle(copy.deepcopy(report()), random.Random(seed))
    for t in every_panel(rep, 160, 50):
        assert isinstance(t, Text)
    rates_of(_mangle(report(), random.Random(seed + 100)), rep)
