"""The panels of `khmon top`, as pure functions from a snapshot's report dict to rich Text.

Nothing here reads a source, a clock or the terminal: the app hands each function the
report, the rates (khmon.outputs.top.rates), the view (khmon.outputs.top.view) and the space
it has, and draws what comes back. That is what keeps the panels testable from dicts and
the screen cheap (formatted text, not widgets rebuilt each frame).

Three rules every function keeps:
- a value the report lacks shows as N/A; a missing or odd key never raises;
- text from outside khmon (process names, status names) becomes `Text`, never markup, and
  passes through outputs.escape.printable() first, so `[/]` is drawn as `[/]` and an escape sequence as
  `\\x1b`, not obeyed;
- output fits the width and height given (long values are cut, rows beyond the height are
  not drawn), so any terminal size, 40x12 included, draws without an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.cells import set_cell_size
from rich.text import Text

from ..escape import printable
from ..text import GRID_RULER, attempt_legend, grid_cells, grid_head, human_bytes
from .rates import as_dict, as_list, dig
from .view import COLUMNS, GRID, PMDS, PROCESSES, ProcRow, View, window

NA = "N/A"
TITLE = "bold reverse"
BARS = "▁▂▃▄▅▆▇█"
PTE_STYLES = {"#": "green", ".": "bright_black", "?": "yellow"}


def num(v: Any) -> str:
    """An integer with thousands separators; N/A for anything else."""
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else NA


def rate(v: float | None) -> str:
    """A per-second rate: one decimal below 100, none above; N/A for None."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return NA
    return f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"


def per_s(v: float | None) -> str:
    """'12.5/s', or N/A."""
    return NA if v is None else f"{rate(v)}/s"


def _cell(text: str, width: int, right: bool) -> str:
    """`text` padded or cut (…) to `width` terminal cells; wide characters count twice."""
    if width <= 0:
        return ""
    if not text.isascii():
        return set_cell_size(text, width)
    if len(text) > width:
        return text[:width - 1] + "…"
    return text.rjust(width) if right else text.ljust(width)


@dataclass(frozen=True)
class Col:
    """A table column: heading, width in cells, right-aligned (numbers) or not."""

    head: str
    width: int
    right: bool = True


def _row(out: Text, cols: Sequence[Col], values: Sequence[str], style: str = "",
         styles: Sequence[str] | None = None, width: int = 10_000) -> None:
    """Append one table line to `out`, cut at `width` cells."""
    line = Text(style=style)
    for i, (c, v) in enumerate(zip(cols, values, strict=True)):
        if i:
            line.append(" ")
        line.append(_cell(v, c.width, c.right), style=(styles[i] if styles else "") or None)
    line.truncate(width)
    out.append_text(line)
    out.append("\n")


def _title(out: Text, text: str, width: int) -> None:
    out.append(_cell(printable(text), width, False), style=TITLE)
    out.append("\n")


def _finish(out: Text) -> Text:
    out.rstrip()
    return out


# --- header ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    """Where the data comes from and how that is going, for the header's first line."""

    source: str  # "daemon /run/khmon/khmon.sock (pid 123)", "local capture", "replay FILE"
    state: str  # "live", "compiling", "attached to 6 tracepoints", "daemon gone: retrying"
    problem: bool = False  # the state is shown in red
    notice: str = ""  # the latest failed refresh, kept until one succeeds


def bitmap_source(report: dict[str, Any]) -> str:
    """The bitmap source of most of the snapshot's PMD records (N/A when none has one)."""
    c = Counter(p.get("bitmap_source") for p in as_list(report.get("pmds"))
                if isinstance(p, dict) and isinstance(p.get("bitmap_source"), str))
    return str(c.most_common(1)[0][0]) if c else NA


def probe_tier(report: dict[str, Any]) -> str:
    mode = dig(report, "functions", "mode")
    attached = dig(report, "probes")
    n = sum(v is None for v in attached.values()) if isinstance(attached, dict) else None
    tps = f"{n} tracepoints" if n is not None else "tracepoints"
    return f"{tps} + {mode} function probes" if mode else f"{tps} only"


def _selected(value: Any) -> str:
    """'always [madvise] never' -> 'madvise'."""
    v = str(value) if value is not None else NA
    return v[v.index("[") + 1:v.index("]")] if "[" in v and "]" in v else v


def _mthp(settings: dict[str, Any]) -> str:
    """The mTHP sizes not set to never, smallest first: '64K:inherit 2M:inherit'."""
    sizes = []
    for k, v in settings.items():
        if k.startswith("hugepages-") and k.endswith("kB/enabled"):
            mode = _selected(v)
            try:
                kb = int(k[len("hugepages-"):-len("kB/enabled")])
            except ValueError:
                continue
            if mode != "never":
                sizes.append((kb, f"{size_name(kb)}:{mode}"))
    return " ".join(s for _, s in sorted(sizes)) or "none"


def size_name(kb: int) -> str:
    return f"{kb // 1024}M" if kb >= 1024 and kb % 1024 == 0 else f"{kb}K"


def header(report: dict[str, Any] | None, rates: dict[str, float | None], status: Status,
           frozen: bool, width: int) -> Text:
    """Three lines: source and kernel; THP and khugepaged settings; rates and the check of
    khmon's collapses against the kernel's pages_collapsed."""
    out = Text()
    line = Text("khmon top  ", style="bold")
    line.append(printable(status.state), style="bold red" if status.problem else "bold green")
    if frozen:
        line.append("  FROZEN (z)", style="bold yellow")
    if status.notice and status.notice != status.state:
        line.append("  " + printable(status.notice), style="red")
    line.append("  " + printable(status.source))
    r = report or {}
    if report is not None:
        line.append(f"  kernel {printable(str(dig(r, 'kernel', 'release') or NA))}"
                    f"  probes {probe_tier(r)}  bitmap {printable(bitmap_source(r))}"
                    f"  window {rate(dig(r, 'window', 'seconds'))} s")
        pid = dig(r, "filter", "pid")
        if pid:
            line.append(f"  pid {pid} only")
    line.truncate(width)
    out.append_text(line)
    out.append("\n")
    if report is None:
        out.append(_cell("waiting for the first snapshot ...", width, False), style="dim")
        return out
    st = as_dict(r.get("settings"))
    kh = {k: st.get(f"khugepaged/{k}", NA) for k in ("scan_sleep_millisecs", "pages_to_scan",
                                                     "max_ptes_none", "max_ptes_swap",
                                                     "max_ptes_shared")}
    cpu = rates.get("cpu")
    line = Text(f"THP {_selected(st.get('enabled'))} defrag {_selected(st.get('defrag'))}"
                f"  khugepaged sleep {kh['scan_sleep_millisecs']} ms, {kh['pages_to_scan']}"
                f" pages/scan, max_ptes none {kh['max_ptes_none']} swap {kh['max_ptes_swap']}"
                f" shared {kh['max_ptes_shared']}  mTHP {_mthp(st)}  khugepaged CPU "
                + (NA if cpu is None else f"{cpu * 100:.1f}%"))
    line.truncate(width)
    out.append_text(line)
    out.append("\n")
    line = Text(f"scans {per_s(rates.get('scans'))}  attempts {per_s(rates.get('attempts'))}"
                f"  collapses {per_s(rates.get('collapses'))}  lost ")
    lost = r.get("lost_events")
    line.append(num(lost), style="bold red" if lost else "green" if lost == 0 else "")
    line.append_text(_agreement(r))
    line.truncate(width)
    out.append_text(line)
    return out


def collapses(report: dict[str, Any]) -> int | None:
    """khmon's successful collapses, anonymous and file, as the kernel's pages_collapsed
    counts them (both kinds)."""
    vals = [dig(report, "collapse", "succeeded"), dig(report, "collapse", "file", "succeeded")]
    nums = [v for v in vals if isinstance(v, int)]
    return sum(nums) if nums else None


def _agreement(r: dict[str, Any]) -> Text:
    mine = collapses(r)
    kernel = dig(r, "kernel_counters", "delta", "khugepaged/pages_collapsed")
    out = Text(f"  collapses {num(mine)}, kernel pages_collapsed {num(kernel)} ")
    if isinstance(mine, int) and isinstance(kernel, int):
        out.append("✓" if mine == kernel else "≠", style="bold green" if mine == kernel
                   else "bold yellow")
    return out


# --- sparklines ------------------------------------------------------------------------------

SPARK_LABELS = {"collapses": "collapses/s", "attempts": "attempts/s", "lost": "lost/s"}


def sparkline(values: Iterable[float | None], width: int) -> Text:
    """The last `width` values as bars scaled to their maximum; a hole (·) for N/A."""
    vals = list(values)[-width:] if width > 0 else []
    top = max((v for v in vals if v is not None), default=0.0)
    out = Text()
    for v in vals:
        if v is None:
            out.append("·", style="bright_black")
        elif v <= 0 or top <= 0:
            out.append(BARS[0], style="bright_black")
        else:
            out.append(BARS[max(1, min(7, round(v / top * 7)))])
    return out


def sparklines(history: dict[str, Sequence[float | None]], width: int, height: int) -> Text:
    """One line per series: label, latest value, bars."""
    out = Text()
    for name in list(SPARK_LABELS)[:max(0, height)]:
        vals = history.get(name) or ()
        last = vals[-1] if vals else None
        label = f"{SPARK_LABELS[name]:<12}{rate(last):>8} "
        out.append(label[:width])
        bars = sparkline(vals, width - len(label))
        if name == "lost":
            bars.stylize("red")
        out.append_text(bars)
        out.append("\n")
    return _finish(out)


# --- collapse by order -----------------------------------------------------------------------

ORDER_COLS = (Col("ORDER", 5), Col("SIZE", 5), Col("ATT/s", 7), Col("OK/s", 7),
              Col("ATTEMPTS", 9), Col("SUCCEEDED", 9), Col("KERNEL ALLOC", 12),
              Col("MEAN", 9), Col("TOP FAILURE", 28, right=False))


def _top_failure(by_status: Any) -> str:
    if not isinstance(by_status, dict):
        return NA
    fails = [(n, c) for n, c in by_status.items() if n != "succeeded" and isinstance(c, int) and c]
    if not fails:
        return "-"
    name, n = max(fails, key=lambda kv: kv[1])
    return f"{printable(str(name))} {n:,}"


def _kernel_alloc(delta: Any, order: int | None) -> str:
    """The kernel's collapse_alloc for that order: the per-size stats file where the kernel
    has one (mTHP collapse), /proc/vmstat's thp_collapse_alloc for PMD-sized ones."""
    if not isinstance(delta, dict) or order is None:
        return NA
    v = delta.get(f"hugepages-{4 << order}kB/collapse_alloc")  # sysfs.read_counters' name
    if v is None and order == 9:
        v = delta.get("thp_collapse_alloc")
    return num(v)


def _mean(funcs: Any, key: str) -> str:
    """Mean collapse_huge_page latency of an order, in us or ms (a TCG guest takes ms)."""
    o = dig(funcs, "collapse_huge_page", "by_order", key)
    calls, secs = dig(o, "calls"), dig(o, "seconds")
    if not isinstance(calls, int) or not calls or not isinstance(secs, int | float):
        return NA
    us = secs / calls * 1e6
    return f"{us:.1f}us" if us < 1000 else f"{us / 1e3:,.1f}ms"


def orders(report: dict[str, Any], rates: dict[str, float | None], width: int,
           height: int) -> Text:
    """Collapse attempts and successes per order: rates and totals, the kernel's
    collapse_alloc for the same size, mean latency (function probes) and the top failure."""
    out = Text()
    _title(out, "Collapse by order", width)
    _row(out, ORDER_COLS, [c.head for c in ORDER_COLS], style="bold", width=width)
    col = dig(report, "collapse") or {}
    delta = dig(report, "kernel_counters", "delta")
    funcs = report.get("functions")
    by_order = dig(col, "by_order")
    rows: list[list[str]] = []
    if isinstance(by_order, dict) and by_order:
        for o, v in sorted(by_order.items(), key=lambda kv: -_order(kv[0])):
            order = _order(o)
            rows.append([str(o), size_name(4 << order) if order >= 0 else NA,
                         rate(rates.get(f"order/{o}/attempts")),
                         rate(rates.get(f"order/{o}/succeeded")), num(dig(v, "attempts")),
                         num(dig(v, "succeeded")), _kernel_alloc(delta, order if order >= 0
                                                                  else None),
                         _mean(funcs, str(o)), _top_failure(dig(v, "by_status"))])
    elif isinstance(col, dict) and col and not dig(report, "kernel", "has_order"):
        # Before the mTHP collapse series every attempt is PMD-sized: one row, order 9.
        rows.append(["9*", "2M", rate(rates.get("attempts")), rate(rates.get("collapses")),
                     num(col.get("attempts")), num(col.get("succeeded")),
                     _kernel_alloc(delta, 9), _mean(funcs, "pmd"),
                     _top_failure(col.get("by_status"))])
    f = dig(col, "file")
    if isinstance(dig(f, "attempts"), int) and f["attempts"]:
        rows.append(["file", NA, NA, NA, num(f["attempts"]), num(dig(f, "succeeded")), NA, NA,
                     _top_failure(dig(f, "by_status"))])
    for r in rows[:max(0, height - 3)]:
        _row(out, ORDER_COLS, r, width=width)
    if not rows:
        out.append(_cell("no collapse attempts yet", width, False), style="dim")
    elif rows[0][0] == "9*" and height > 3:
        out.append(_cell("* this kernel's tracepoints have no order: every attempt is "
                         "PMD-sized", width, False), style="dim")
    return _finish(out)


def _order(o: Any) -> int:
    try:
        return int(o)
    except (TypeError, ValueError):
        return -1


# --- wasted work -----------------------------------------------------------------------------

WASTE_COLS = (Col("REASON", 16, right=False), Col("ATT/s", 7), Col("ATTEMPTS", 9),
              Col("BYTES", 10), Col("SECONDS", 9))


def waste(report: dict[str, Any], rates: dict[str, float | None], width: int,
          height: int) -> Text:
    """Wasted work by reason (README: `wasted`): rate, attempts, bytes, seconds."""
    out = Text()
    _title(out, "Wasted work by reason", width)
    w = report.get("wasted")
    if not isinstance(w, dict) or not w.get("available"):
        why = dig(w, "why") if isinstance(w, dict) else None
        out.append(_cell(f"not judged: {printable(str(why or NA))}", width, False), style="dim")
        return _finish(out)
    _row(out, WASTE_COLS, [c.head for c in WASTE_COLS], style="bold", width=width)
    by = as_dict(w.get("by_reason"))
    for name, c in list(by.items())[:max(0, height - 2)]:
        secs = dig(c, "seconds")
        b = dig(c, "bytes")
        attempts = dig(c, "attempts")
        _row(out, WASTE_COLS, [printable(str(name)), rate(rates.get(f"waste/{name}")), num(attempts),
                               human_bytes(b) if isinstance(b, int | float) else NA,
                               f"{secs:,.3f}" if isinstance(secs, int | float) else NA],
             style="" if attempts else "bright_black", width=width)
    return _finish(out)


# --- processes -------------------------------------------------------------------------------

PROC_WIDTHS = {"pid": 8, "comm": 24, "scans_rate": 9, "attempts_rate": 8, "scans": 11,
               "attempts": 10, "collapses": 10, "uffd": 9}
PROC_COLS = tuple(Col(head, PROC_WIDTHS[key], numeric) for key, head, numeric in COLUMNS)


def _proc_values(r: ProcRow) -> list[str]:
    return [str(r.pid) if r.pid else "-", printable(r.comm), rate(r.scans_rate),
            rate(r.attempts_rate), num(r.scans), num(r.attempts), num(r.collapses),
            num(r.uffd)]


def processes(rows: list[ProcRow], total: int | None, view: View, width: int, height: int,
              top: int) -> tuple[Text, int]:
    """The process table, sorted and filtered by the view, the selected row highlighted;
    returns the text and the first row shown (the scroll position to keep)."""
    out = Text()
    key, head, _ = view.sort_column()
    filters = [f"pid {view.pid_filter}" if view.pid_filter is not None else "",
               f"comm ~ {view.comm_filter!r}" if view.comm_filter else ""]
    _title(out, f"Processes: {len(rows)} shown of {num(total)}; sort {head} "
           f"{'▲' if view.inverted else '▼'} (< > I)"
           + "".join(f"; {f}" for f in filters if f), width)
    heads = [c.head for c in PROC_COLS]
    styles = ["bold reverse" if COLUMNS[i][0] == key else "bold" for i in range(len(COLUMNS))]
    _row(out, PROC_COLS, heads, styles=styles, width=width)
    sel = view.selected_index(rows)
    n = max(0, height - 2)
    top = window(len(rows), sel, n, top)
    for i, r in enumerate(rows[top:top + n], start=top):
        style = ("reverse" if view.level == PROCESSES else "underline") if i == sel else (
            "bright_black" if r.exited else "")
        _row(out, PROC_COLS, _proc_values(r), style=style, width=width)
    if not rows:
        out.append(_cell("no processes" + (" match the filter" if any(filters) else " yet"),
                         width, False), style="dim")
    return _finish(out), top


# --- PMDs ------------------------------------------------------------------------------------

PMD_COLS = (Col("ADDRESS", 14, right=False), Col("SCANS", 7), Col("VERDICT", 20, right=False),
            Col("UFFD", 4, right=False), Col("PRESENT", 7), Col("SOURCE", 8, right=False),
            Col("ATTEMPTS", 8))


def _pmd_values(p: dict[str, Any]) -> list[str]:
    attempts = p.get("attempts")
    n = (sum(c for a in attempts if isinstance(c := dig(a, "count"), int))
         if isinstance(attempts, list) else None)
    uffd = p.get("uffd")
    return [printable(str(p.get("address", NA))), num(p.get("scans")),
            printable(str(p.get("verdict") or "-")),
            "yes" if uffd is True else "no" if uffd is False else NA, num(p.get("present")),
            printable(str(p.get("bitmap_source") or "-")), num(n)]


def pmd_list(pmds: list[dict[str, Any]], proc: ProcRow | None, view: View, width: int,
             height: int, top: int) -> tuple[Text, int]:
    """The selected process's PMD records (those the snapshot holds), the selected one
    highlighted once the user moved into them (Enter)."""
    out = Text()
    who = f"pid {proc.pid or '-'} {proc.comm}" if proc is not None else "no process selected"
    _title(out, f"PMDs of {who}: {len(pmds)}" + (" (Enter: into them)" if view.level ==
                                                  PROCESSES and pmds else ""), width)
    if not pmds:
        out.append(_cell("no PMD records for this process in the snapshot", width, False),
                   style="dim")
        return _finish(out), 0
    _row(out, PMD_COLS, [c.head for c in PMD_COLS], style="bold", width=width)
    addrs = [p.get("address") for p in pmds]
    sel = addrs.index(view.pmd_address) if view.pmd_address in addrs else 0
    n = max(0, height - 2)
    top = window(len(pmds), sel, n, top)
    for i, p in enumerate(pmds[top:top + n], start=top):
        style = ("reverse" if view.level >= PMDS else "underline") if i == sel else ""
        _row(out, PMD_COLS, _pmd_values(p), style=style, width=width)
    return _finish(out), top


def grid(pmd: dict[str, Any] | None, view: View, width: int, height: int) -> Text:
    """The PMD's 512 PTEs as 8 rows of 64 with its attempts lettered, the cells of
    `khmon report --grid` (outputs.text.grid_cells), coloured; then as much of the legend
    as fits (all of it, and the passes, once Enter moved into the PMD)."""
    out = Text()
    if pmd is None:
        _title(out, "PMD", width)
        out.append(_cell("no PMD selected", width, False), style="dim")
        return _finish(out)
    try:
        cells, attempts, known = grid_cells(pmd)
        head = grid_head(pmd, known)
        legend = [attempt_legend(chr(ord("A") + i), a) for i, a in enumerate(attempts)]
        if view.level == GRID:
            legend += [f"pass x{p.get('count', 1)}: " + " ".join(
                f"({dig(s, 'offset')},{dig(s, 'order')}) {dig(s, 'status')}"
                for s in as_list(p.get("attempts")))
                for p in as_list(pmd.get("passes")) if isinstance(p, dict)]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        _title(out, f"PMD {pmd.get('address', NA)}", width)
        out.append(_cell(f"N/A (a record this version cannot read: {e!r})", width, False),
                   style="dim")
        return _finish(out)
    _title(out, head, width)
    out.append(_cell("     " + GRID_RULER, width, False) + "\n", style="bright_black")
    for row in range(min(8, max(0, height - 2))):
        line = Text(f"{row * 64:4d} ", style="bright_black")
        for c in cells[row * 64:(row + 1) * 64]:
            line.append(c, style=PTE_STYLES.get(c) or ("bold cyan" if c.isupper()
                                                        else "bold red"))
        line.truncate(width)
        out.append_text(line)
        out.append("\n")
    room = max(0, height - 10)
    for text in legend[:room]:
        out.append(_cell(printable(text), width, False) + "\n")
    if len(legend) > room > 0:
        out.append(_cell(f"... {len(legend) - room} more (Enter, or a taller terminal)",
                         width, False), style="dim")
    return _finish(out)


# --- help ------------------------------------------------------------------------------------

KEYS = (
    ("q  F10  Ctrl-C", "quit (the terminal is restored first)"),
    ("h  ?", "this help (any key closes it)"),
    ("Up Down PgUp PgDn Home End", "move the selection"),
    ("Enter  Esc", "into the selected process's PMDs, into one PMD; and back out"),
    ("<  >", "sort by the column left / right of the current one"),
    ("I", "invert the sort order"),
    ("p", "show one pid only (empty: all)"),
    ("/", "show comms containing a text (empty: all)"),
    ("z", "freeze the screen (data keeps arriving; z again shows the latest)"),
    ("d", "set the refresh delay in seconds"),
    ("space  [  ]", "replay: pause or play; step one frame back, forward"),
)


def help_text() -> Text:
    out = Text("khmon top: what khugepaged tries, per order, process and PMD\n\n", style="bold")
    for keys, what in KEYS:
        out.append(f"  {keys:<28}", style="bold")
        out.append(f"{what}\n")
    out.append("\nRates are per second between two snapshots of the same stream; N/A after "
               "a restart,\na gap or before the second snapshot. Grid: # present PTE, . empty, "
               "? unknown,\nA-Z an attempted range (lower case over empty PTEs).",
               style="dim")
    return out


def footer(level: int, replay: bool, width: int, hint: str = "") -> Text:
    """The keys that do something here, or `hint` (an answer to the last key) instead."""
    if hint:
        return Text(_cell(printable(hint), width, False), style="bold yellow reverse")
    keys = ["q quit", "h help", "<> sort", "I invert", "p pid", "/ comm", "z freeze",
            "d delay", "Enter into" if level < GRID else "", "Esc out" if level else ""]
    if replay:
        keys += ["space pause", "[ ] step"]
    return Text(_cell("  ".join(k for k in keys if k), width, False), style="reverse")
