"""Text rendering of a report dict (khmon.model.model.Model.report, or a snapshot's
report) for people. JSON is the same dict; this module only formats it."""

from __future__ import annotations

import string
from typing import Any

from .. import bitmap
from .escape import printable


def _table(headers: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    """Aligned columns. Widths are those the cells will have on the terminal, escaped
    (outputs.streams escapes every line it prints), so a process name holding control
    characters does not push its row out of line."""
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    shown = [[len(printable(c)) for c in r] for r in cells]
    widths = [max(r[i] for r in shown) for i in range(len(headers))]
    out = []
    for r, n in zip(cells, shown, strict=True):
        parts = [r[0] + " " * (widths[0] - n[0])]
        parts += [" " * (w - k) + c for c, k, w in zip(r[1:], n[1:], widths[1:], strict=True)]
        out.append(indent + "  ".join(parts).rstrip())
    return out


def _statuses(by_status: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in by_status.items()) or "none"


def render_report(r: dict[str, Any], grids: int = 0) -> str:
    """The report as text; `grids`: draw that many PMDs (most attempts first) as grids."""
    k, w = r["kernel"], r["window"]
    lines = [
        f"khmon report: kernel {k['release']}, window {w['seconds']:.2f} s"
        + ("" if w["complete"] else " (incomplete recording)")
        + (f", pid {r['filter']['pid']} only" if r["filter"]["pid"] else ""),
        f"process attribution: {k['owner_source']}",
        "",
        "events (records: what crossed the ring buffer; scans are deduplicated in the kernel)",
    ]
    acc = r["accounting"]
    lines += _table(["tracepoint", "events", "records", "lost"],
                    [[n, c, acc[n]["records"], acc[n]["lost"] + acc[n].get("missed", 0)]
                     for n, c in r["events"].items()])
    c = r["collapse"]
    lines += ["", f"anon collapses: {c['attempts']} attempts, {c['succeeded']} succeeded",
              f"  by status: {_statuses(c['by_status'])}"]
    if c["by_order"]:
        lines += _table(["order", "attempts", "succeeded", "by status"],
                        [[o, v["attempts"], v["succeeded"], _statuses(v["by_status"])]
                         for o, v in c["by_order"].items()])
    elif not k["has_order"]:
        lines.append("  by order: this kernel's tracepoints have no order field "
                     "(pre-mTHP collapse: every attempt is PMD-sized)")
    f = c["file"]
    if f["attempts"]:
        lines.append(f"file/shmem collapses: {f['attempts']} attempts, {f['succeeded']} "
                     f"succeeded ({_statuses(f['by_status'])})")
    lines += ["", f"scan_pmd verdicts: {_statuses(r['scan_pmd']['by_status'])}"]
    if r["processes"]:
        lines += ["", "processes (owner of the scanned mm)"]
        lines += _table(["pid", "comm", "scans", "attempts", "collapses"],
                        [[p["pid"] or "-", p["comm"], p["scans"], p["collapse_attempts"],
                          p["collapses"]] for p in r["processes"][:15]])
        if len(r["processes"]) > 15:
            lines.append(f"  ... {len(r['processes']) - 15} more (see --json)")
    lines += ["", *_functions(r["functions"])]
    lines += _pmds(r.get("pmds", []), grids)
    lines += _wasted(r.get("wasted", {}))
    delta = {n: v for n, v in r["kernel_counters"]["delta"].items() if v}
    lines += ["", "kernel counters, change over the window (zero ones omitted; all in --json)"]
    lines += _table(["counter", "delta"], [[n, v] for n, v in delta.items()]) if delta else [
        "  none"]
    lines += ["", *_lost(r)]
    lines += [f"warning: {wmsg}" for wmsg in r["warnings"]]
    return "\n".join(lines)


def _lost(r: dict[str, Any]) -> list[str]:
    """Lost events, and what the probes' counts say where seen != recorded + lost.

    A complete window balances for every tracepoint (the end part comes after the drain).
    A recording cut short ends its counters at its last stats part, while records kept
    arriving after it and the kernel still held some at the cut: there the difference is
    said for what it is, not claimed to be zero."""
    unacc = {n: a["unaccounted"] for n, a in r["accounting"].items() if a["unaccounted"]}
    if r["window"]["complete"]:
        head = f"lost events: {r['lost_events']}" + (
            "; the probes' counts do not balance:" if unacc else
            " (every event the probes saw is in the counts or counted as lost)")
        more = "seen by the probes but neither in the counts nor counted as lost"
        fewer = "in the counts beyond what the probes saw"
    else:
        head = (f"lost events: {r['lost_events']} by the last stats part, at "
                f"{r['window']['seconds']:.1f} s; after it unknown (the recording was cut "
                "short, see the warning)" + (":" if unacc else ""))
        more = "seen by the probes by then that never reached the recording (lost in the cut)"
        fewer = "recorded beyond what the probes had seen by then (events after it)"
    return [head, *(f"  {name}: {abs(n)} {more if n > 0 else fewer}"
                    for name, n in unacc.items())]


def _functions(f: dict[str, Any]) -> list[str]:
    if not f.get("mode"):
        refused = " and ".join(f.get("refused", {})) or "nothing"
        return [f"function probes: none on this kernel, tracepoints only ({refused} refused; "
                "why in --json functions.refused)"]
    lines = [f"function probes ({f['mode']})"]
    c = f.get("collapse_huge_page")
    if c:
        lines.append(f"  collapse_huge_page: {c['calls']} calls, {c['seconds'] * 1e3:.3f} ms in "
                     f"all; results: {_statuses(c['by_result'])}")
        lines += _table(["order", "calls", "succeeded", "ms", "max us"],
                        [[o, v["calls"], v["succeeded"], f"{v['seconds'] * 1e3:.3f}",
                          f"{v['max_ns'] / 1e3:.1f}"] for o, v in c["by_order"].items()])
    p = f.get("pmd_scans")
    if p:
        flags = ", ".join(f"{k} {v}" for k, v in p["by_vma_flag"].items()) or "flag bits unknown"
        lines.append(f"  per-PMD scans: {p['calls']}; in VMAs with {flags}")
    return lines


def _pmds(pmds: list[dict[str, Any]], grids: int) -> list[str]:
    if not pmds:
        return []
    lines = ["", f"PMD records: {len(pmds)} (all in --json pmds)"]
    lines += _table(["pid", "address", "scans", "verdict", "uffd", "present", "source", "attempts"],
                    [[p["pid"] or "-", p["address"], p["scans"], p["verdict"] or "-",
                      {True: "yes", False: "no", None: "?"}[p["uffd"]],
                      "-" if p["present"] is None else p["present"], p["bitmap_source"] or "-",
                      sum(a["count"] for a in p["attempts"])] for p in pmds[:10]])
    for p in pmds[:grids]:
        lines += ["", *render_grid(p)]
    return lines


def _wasted(w: dict[str, Any]) -> list[str]:
    if not w.get("available"):
        return ["", f"wasted work: not judged ({w['why']})"] if w else []
    rows = [[name, c["attempts"], human_bytes(c["bytes"]), f"{c['seconds'] * 1e3:.3f}",
             ", ".join(f"{p['pid'] or '-'} {p['comm']}" for p in c["top_processes"][:3])]
            for name, c in w["by_reason"].items() if c["attempts"] or c["bytes"]]
    if not rows:
        return ["", "wasted work: none found"]
    return ["", "wasted work (reasons overlap; what each means: README, --json wasted)",
            *_table(["reason", "attempts", "bytes", "ms", "top processes"], rows)]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def grid_cells(pmd: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], list[bool] | None]:
    """A PMD's 512 PTE cells, the attempts they letter (A, B, ... in order) and which PTEs
    are known (None: all of them, or none when there is no bitmap). The cell rules are
    render_grid's; `khmon top` colours the same cells.

    `#` a present PTE, `.` an empty one, `?` one no source knows (no bitmap, or an
    `inferred` one that does not pin it). A PTE inside an attempted range shows that
    attempt's letter instead (the smallest range covering it): upper case where the PTE is
    present, lower case where it is not.
    """
    bits = bitmap.bits_list(bitmap.from_hex(pmd["bitmap"])) if pmd["bitmap"] else None
    known = (bitmap.bits_list(bitmap.from_hex(pmd["bitmap_known"])) if pmd.get("bitmap_known")
             else [bits is not None] * 512)
    cells = ["?" if not k else "#" if b else "." for b, k in zip(bits or [False] * 512, known,
                                                                  strict=True)]
    span = [513] * 512
    attempts = pmd["attempts"][:len(string.ascii_uppercase)]
    for letter, a in zip(string.ascii_uppercase, attempts, strict=False):
        size = 1 << a["order"]
        for i in range(a["offset"], min(a["offset"] + size, 512)):
            if size < span[i]:
                span[i] = size
                present = bits[i] if known[i] else True
                cells[i] = letter if present else letter.lower()
    return cells, attempts, known if pmd.get("bitmap_known") else None


def render_grid(pmd: dict[str, Any]) -> list[str]:
    """A PMD's 512 PTEs as 8 rows of 64, with its attempted ranges marked (grid_cells).
    The legend under the grid names each attempt: offset, order, isolate status, result,
    latency and how often it was tried."""
    cells, attempts, known = grid_cells(pmd)
    out = [grid_head(pmd, known), "      " + GRID_RULER]
    out += [f"  {row * 64:3d} " + "".join(cells[row * 64:(row + 1) * 64]) for row in range(8)]
    out += ["  " + attempt_legend(letter, a)
            for letter, a in zip(string.ascii_uppercase, attempts, strict=False)]
    return out


GRID_RULER = "".join(str(c // 8) if c % 8 == 0 else " " for c in range(64))


def grid_head(pmd: dict[str, Any], known: list[bool] | None) -> str:
    """The line over a PMD's grid: where it is, whose, its scans, verdict and bitmap."""
    return (f"PMD {pmd['address']} pid {pmd['pid'] or '-'} {pmd['comm']}: "
            f"{pmd['scans']} scans, verdict {pmd['verdict'] or '-'}, bitmap "
            f"{pmd['bitmap_source'] or 'unknown'}"
            + (f", {pmd['present']} present" if pmd["present"] is not None else "")
            + (f", {known.count(False)} unknown" if known is not None else "")
            + (", userfaultfd-armed" if pmd["uffd"] else ""))


def attempt_legend(letter: str, a: dict[str, Any]) -> str:
    """One attempt of a grid's legend: 'A: offset 0 order 9 (512 PTEs): ...'."""
    return (f"{letter}: offset {a['offset']} order {a['order']} "
            f"({1 << a['order']} PTEs): {a['status']}"
            + (f" (isolate: {a['isolate_status']})" if a["isolate_status"] else "")
            + f", {a['latency_ns'] / 1e3:.1f} us mean, {a['count']}x")


def render_simulation(r: dict[str, Any]) -> str:
    """`khmon simulate`: the model's predictions beside the kernel's, per order."""
    st = r["settings"]
    what = f"what if: {', '.join(r['what_if'])}" if r["what_if"] else "the recording's own settings"
    lines = [f"simulated {r['algo']} on {r['passes']} passes (one per PMD and bitmap), {what}: "
             f"orders {','.join(map(str, st['orders'])) or 'none'}, max_ptes_none "
             f"{st['max_ptes_none']}, max_ptes_swap {st['max_ptes_swap']}, max_ptes_shared "
             f"{st['max_ptes_shared']}"]
    if r["pmds_without_bitmap"]:
        lines.append(f"  {r['pmds_without_bitmap']} PMDs had no bitmap and were not replayed")
    if r["passes_without_bitmap"]:
        lines.append(f"  {r['passes_without_bitmap']} PMDs had attempts but no bitmap for any "
                     "of their passes and were not replayed")
    k, p = r["kernel"], r["predicted"]
    order_keys = sorted({o for t in (k, p) if t for o in (*t["attempts_by_order"],
                                                           *t["collapses_by_order"])},
                        key=int, reverse=True)
    if k is None:  # no function probes: the recording's attempts are unknown
        lines.append("  the recording saw no attempts (no function probes): predictions only")
        lines += ["", *_table(["order", "predicted attempts", "predicted collapses"],
                              [[o, p["attempts_by_order"].get(o, 0),
                                p["collapses_by_order"].get(o, 0)] for o in order_keys])]
        lines += ["", f"attempts: predicted {p['attempts']}; bloat: predicted "
                  f"{human_bytes(p['bloat_bytes'])}"]
        return "\n".join(lines)
    lines += ["", *_table(["order", "kernel attempts", "predicted", "kernel collapses",
                           "predicted"],
                          [[o, k["attempts_by_order"].get(o, 0), p["attempts_by_order"].get(o, 0),
                            k["collapses_by_order"].get(o, 0), p["collapses_by_order"].get(o, 0)]
                           for o in order_keys])]
    lines += ["", f"attempts: kernel {k['attempts']}, predicted {p['attempts']}; bloat: kernel "
              f"{human_bytes(k['bloat_bytes'])}, predicted {human_bytes(p['bloat_bytes'])}",
              f"passes whose attempt sequence the model reproduced: {r['matched']} of "
              f"{r['passes']}"
              + (f"; cut short by the kernel where the model cannot follow: {r['cut_short']}"
                 if r["cut_short"] else "")]
    for m in r["mismatches"][:5]:
        lines.append(f"  differs: pid {m['pid'] or '-'} PMD {m['address']}: kernel "
                     f"{_seq(m['kernel'])}"
                     + (f" (scan: {', '.join(m['verdicts'])})" if m.get("verdicts") else "")
                     + f", predicted {_seq(m['predicted'])}"
                     + (f" (scan refuses: {m['predicted_scan_failure']})"
                        if m["predicted_scan_failure"] else ""))
    if r["mismatched"] > 5:
        lines.append(f"  ... {r['mismatched'] - 5} more (--json mismatches lists "
                     f"{len(r['mismatches'])})")
    return "\n".join(lines)


def _seq(steps: list[list[Any]]) -> str:
    """[[0, 9, "succeeded"], [0, 8, ...]] -> '(0,9) (0,8)', long walks shortened."""
    text = " ".join(f"({s[0]},{s[1]})" for s in steps[:8]) or "no attempt"
    return text + (f" ... {len(steps)} in all" if len(steps) > 8 else "")
