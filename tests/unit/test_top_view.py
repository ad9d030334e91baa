"""khmon top's view state: sorting, filters, a selection that follows its process, the
scroll window and the layout at any terminal size."""

from __future__ import annotations

from topdata import report

from khmon.outputs.top.view import (
    COLUMNS,
    GRID,
    HEADER,
    PMDS,
    ProcRow,
    View,
    layout,
    pmds_of,
    process_rows,
    window,
)


def rows() -> list[ProcRow]:
    return [ProcRow(3, "b", 1.0, None, 10, 5, 1, 0, False),
            ProcRow(1, "a", 3.0, 2.0, 30, 5, 0, None, False),
            ProcRow(2, "c[/]", None, 9.0, 20, 7, 2, 3, True)]


def test_sort_columns_directions_and_na_last() -> None:
    v = View()
    assert v.sort_column()[1] == "ATTEMPTS"
    assert [r.pid for r in v.visible(rows())] == [2, 1, 3]  # 7, then 5 and 5 by pid
    v.sort = [c[0] for c in COLUMNS].index("attempts_rate")
    assert [r.pid for r in v.visible(rows())] == [2, 1, 3]  # None last
    v.inverted = True
    assert [r.pid for r in v.visible(rows())] == [1, 2, 3]  # still None last
    v.sort, v.inverted = 1, False  # COMM: A-Z
    assert [r.comm for r in v.visible(rows())] == ["a", "b", "c[/]"]
    v.shift_sort(-2)
    assert v.sort == len(COLUMNS) - 1


def test_filters() -> None:
    assert [r.pid for r in View(pid_filter=3).visible(rows())] == [3]
    assert [r.pid for r in View(comm_filter="[/").visible(rows())] == [2]
    assert [r.pid for r in View(comm_filter="B").visible(rows())] == [3]


def test_selection_follows_the_process_not_the_row() -> None:
    v = View()
    shown = v.visible(rows())
    v.move(shown, 1)
    assert v.proc_key == (1, "a")
    v.inverted = True
    shown = v.visible(rows())
    assert shown[v.selected_index(shown)].pid == 1
    v.move(shown, 1000)
    assert v.proc_key == shown[-1].key
    v.move(shown, -1000)
    assert v.proc_key == shown[0].key
    assert View().selected_index([]) is None


def test_pmd_selection_and_rows_of_a_real_snapshot() -> None:
    r = report()
    rs = process_rows(r, {})
    pmds = pmds_of(r, rs[0].pid)
    assert pmds and all(p["pid"] == rs[0].pid for p in pmds)
    v = View()
    v.move_pmd(pmds, 1)
    assert v.pmd_address == pmds[1]["address"]
    v.move_pmd(pmds, 99)
    assert v.pmd_address == pmds[-1]["address"]
    assert pmds_of(r, None) == [] and pmds_of({}, 5) == []
    extra = {"pid": 5, "pmds": pmds[:1]}
    assert pmds_of(r, 5, extra) == pmds[:1] and pmds_of(r, rs[0].pid, extra) == pmds
    assert process_rows(r, {})[0].uffd is not None  # function-probe data: uffd is known
    assert process_rows({**r, "functions": {"mode": None}}, {})[0].uffd is None


def test_window_moves_as_little_as_it_can() -> None:
    assert window(10, 0, 20, 5) == 0
    assert window(100, 50, 10, 45) == 45
    assert window(100, 60, 10, 45) == 51
    assert window(100, 40, 10, 45) == 40
    assert window(100, None, 10, 95) == 90


def test_layout_any_size() -> None:
    big = layout(160, 50, 0, 12)
    assert big["header"] == HEADER and big["sparks"] == 3 and big["middle"] == 12
    assert big["bottom"] == 12 and big["waste"] == 1
    assert sum(big[k] for k in ("header", "sparks", "middle", "bottom", "procs", "footer")) == 50
    small = layout(40, 12, 0, 12)
    assert small["procs"] >= 5 and small["middle"] == 0 and small["waste"] == 0
    assert sum(small[k] for k in ("header", "sparks", "middle", "bottom", "procs",
                                  "footer")) == 12
    deep = layout(160, 50, GRID, 12)
    assert deep["bottom"] > big["bottom"] and deep["procs"] == 5
    assert layout(160, 50, PMDS, 12) == big
    for w, h in ((0, 0), (1, 1), (10, 3), (300, 200)):
        assert all(v >= 0 for v in layout(w, h, GRID, 14).values())
