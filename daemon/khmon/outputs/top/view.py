"""What the person at `khmon top` chose to see: sort column, filters, selection, focus.

Pure state and the row lists derived from a snapshot, so keys can be tested without a
terminal. The selection follows a process (its pid and comm) and a PMD (its address), not a
row number, as in htop: rows reorder every refresh and the selection must stay on the thing
the user picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .rates import as_list

# (key, heading, numeric): the process table's columns, in order; < and > walk them.
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("pid", "PID", True), ("comm", "COMM", False), ("scans_rate", "SCANS/s", True),
    ("attempts_rate", "ATT/s", True), ("scans", "SCANS", True), ("attempts", "ATTEMPTS", True),
    ("collapses", "COLLAPSES", True), ("uffd", "UFFD", True))
DEFAULT_SORT = 5  # ATTEMPTS: what khugepaged tried, the reason to look at a process

PROCESSES, PMDS, GRID = 0, 1, 2  # focus levels: Enter goes down one, Esc up one


@dataclass(frozen=True)
class ProcRow:
    """One process row: the snapshot's totals with their rates (None: N/A)."""

    pid: int | None
    comm: str  # as the process set it: panels escape it for the terminal
    scans_rate: float | None
    attempts_rate: float | None
    scans: int | None
    attempts: int | None
    collapses: int | None
    uffd: int | None  # None: this kernel's probes cannot tell (no function probes)
    exited: bool

    @property
    def key(self) -> tuple[int | None, str]:
        return (self.pid, self.comm)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def process_rows(report: dict[str, Any], rates: dict[str, float | None]) -> list[ProcRow]:
    """The snapshot's processes as rows (unsorted, unfiltered). A process's uffd count is
    known only where function probes read VMA flags (N/A on a tracepoint-only kernel)."""
    funcs = report.get("functions")
    uffd_known = isinstance(funcs, dict) and bool(funcs.get("mode") or funcs.get("pmd_scans"))
    out = []
    for p in as_list(report.get("processes")):
        if not isinstance(p, dict):
            continue
        pid = _int(p.get("pid"))
        out.append(ProcRow(pid, str(p.get("comm", "")),
                           rates.get(f"proc/{pid}/scans"), rates.get(f"proc/{pid}/attempts"),
                           _int(p.get("scans")), _int(p.get("collapse_attempts")),
                           _int(p.get("collapses")),
                           _int(p.get("uffd_attempts", 0)) if uffd_known else None,
                           bool(p.get("exited"))))
    return out


@dataclass
class View:
    """The interactive choices; the app changes it on keys, panels read it."""

    sort: int = DEFAULT_SORT
    inverted: bool = False
    pid_filter: int | None = None
    comm_filter: str | None = None
    level: int = PROCESSES
    proc_key: tuple[int | None, str] | None = None  # the selected process
    pmd_address: str | None = None  # the selected PMD of that process
    frozen: bool = False

    def sort_column(self) -> tuple[str, str, bool]:
        return COLUMNS[self.sort]

    def shift_sort(self, step: int) -> None:
        self.sort = (self.sort + step) % len(COLUMNS)

    def visible(self, rows: list[ProcRow]) -> list[ProcRow]:
        """Filtered and sorted: numbers largest first and text A-Z (I inverts), N/A last
        whatever the direction, then by pid so equal rows do not swap between frames."""
        key, _, numeric = self.sort_column()
        kept = [r for r in rows
                if (self.pid_filter is None or r.pid == self.pid_filter)
                and (not self.comm_filter or self.comm_filter.lower() in r.comm.lower())]
        have = [r for r in kept if getattr(r, key) is not None]
        missing = [r for r in kept if getattr(r, key) is None]
        desc = numeric != self.inverted
        have.sort(key=lambda r: r.pid or 0)
        have.sort(key=lambda r: getattr(r, key), reverse=desc)
        missing.sort(key=lambda r: r.pid or 0)
        return have + missing

    def selected_index(self, rows: list[ProcRow]) -> int | None:
        """The selected process's row (the first row when the selection is gone)."""
        if not rows:
            return None
        for i, r in enumerate(rows):
            if r.key == self.proc_key:
                return i
        return 0

    def move(self, rows: list[ProcRow], step: int) -> None:
        """Up/down (step -1/+1), page (±height), home/end (±len)."""
        i = self.selected_index(rows)
        if i is None:
            return
        new = rows[max(0, min(len(rows) - 1, i + step))]
        if new.key != self.proc_key:
            self.proc_key, self.pmd_address = new.key, None

    def move_pmd(self, pmds: list[dict[str, Any]], step: int) -> None:
        addrs = [p.get("address") for p in pmds]
        if not addrs:
            return
        i = addrs.index(self.pmd_address) if self.pmd_address in addrs else 0
        self.pmd_address = addrs[max(0, min(len(addrs) - 1, i + step))]


def pmds_of(report: dict[str, Any], pid: int | None,
            process_pmds: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One process's PMD records, most recently active first (as sent): the answer to a
    snapshot request's `pid` when the source gave one for this pid, else those among the
    snapshot's most recent ones."""
    if pid is None:
        return []
    if isinstance(process_pmds, dict) and process_pmds.get("pid") == pid:
        return [p for p in as_list(process_pmds.get("pmds")) if isinstance(p, dict)]
    return [p for p in as_list(report.get("pmds")) if isinstance(p, dict) and p.get("pid") == pid]


def window(n: int, selected: int | None, height: int, top: int) -> int:
    """The first row to show so that the selected row is inside `height` rows, moving the
    window as little as possible from `top` (where it was)."""
    if height <= 0 or n <= height:
        return 0
    if selected is None:
        return max(0, min(top, n - height))
    if selected < top:
        return selected
    if selected >= top + height:
        return selected - height + 1
    return max(0, min(top, n - height))


HEADER, FOOTER, SPARKS = 3, 1, 3
GRID_ROWS = 12  # the grid's head, ruler, 8 rows and two legend lines
MIN_PROCS = 5  # a title, the column heads and three rows
WIDE = 120  # from this width the waste panel sits beside the orders


def layout(width: int, height: int, level: int, middle_need: int) -> dict[str, int]:
    """Rows for each panel on a terminal of that size (0: not shown). The header, the
    footer and the process table always get room; then the PMDs and grid, the order and
    waste tables (`middle_need` rows), and the sparklines, as far as the height goes.
    Inside a PMD (level GRID) the grid takes what the process table can spare."""
    avail = max(0, height - HEADER - FOOTER)
    rows = {"header": min(HEADER, height), "footer": 1 if height > HEADER else 0,
            "sparks": 0, "middle": 0, "bottom": 0, "procs": 0, "waste": int(width >= WIDE)}
    for name, want in (("bottom", GRID_ROWS), ("middle", middle_need), ("sparks", SPARKS)):
        if avail - want >= MIN_PROCS:
            rows[name] = want
            avail -= want
    if level == GRID and rows["bottom"]:
        extra = max(0, avail - MIN_PROCS)
        rows["bottom"] += extra
        avail -= extra
    rows["procs"] = avail
    return rows
