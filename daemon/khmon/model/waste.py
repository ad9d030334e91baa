"""Wasted collapse work: detectors over PMD records, each with a stable reason name and a cost.

Each detector reads the report's pmds[] records (khmon.pmd: attempts, passes, verdicts, uffd,
bitmaps) and names work khugepaged did that could not pay off. Cost comes in three measures:
  attempts  collapse_huge_page calls (or, for futile_rescan, PMD scans);
  bytes     memory: folio bytes allocated and thrown away, or for bloat/creep the empty PTEs a
            collapse filled (zeroed pages nobody asked for);
  seconds   time spent in those collapse_huge_page calls (their measured durations).
Reasons overlap on purpose: a uffd attempt that cascades down the orders in a rescan counts
under uffd_isolate, order_cascade and futile_rescan, because each names a different fix.

The reasons and the kernel code paths they stand for (mm/khugepaged.c):
  uffd_isolate     collapse_huge_page() in a userfaultfd-armed VMA that allocated its folio
                   (alloc_charge_folio()), took mmap_write_lock and failed later, normally in
                   __collapse_huge_page_isolate(), which refuses any none PTE under uffd
                   (collapse_max_ptes_none() is 0 there) after the scan let it through: with
                   mTHP orders enabled collapse_scan_pmd() lifts max_ptes_none to 511.
  alloc_then_fail  the same in any other VMA: a folio allocated and charged, then the collapse
                   failed (isolate, __collapse_huge_page_swapin(), the copy, a revalidation).
                   Failures of the allocation itself (alloc_huge_page_failed) cost no folio.
  futile_rescan    khugepaged_scan_mm_slot() coming back to a PMD that collapse_scan_pmd()
                   (hpage_collapse_scan_pmd() before 7.2) had already refused, finding the same
                   PTEs and reaching the same failing verdict. Counted per rescan; bytes and
                   seconds are those of the attempts such rescans repeated.
  order_cascade    mthp_collapse() retrying lower orders inside a range whose collapse failed
                   (v19: "goto next_order"; v17: pushing both halves): failed attempts inside
                   the range of an earlier failed attempt of the same pass.
  bloat            a successful collapse_huge_page() whose range held none or zero-page PTEs:
                   __collapse_huge_page_copy() fills them with zeroed pages (max_ptes_none).
  creep            a collapse over a range that an earlier, lower-order collapse of the same
                   PMD had filled: the mTHP "creep" the series' max_ptes_none rules guard
                   against (a collapse adds none PTEs' worth of memory, which a later scan
                   counts as present and promotes again). Bytes: the empty PTEs it filled.

What the detectors cannot see is said, not guessed: without function probes there are no PMD
records (the report says why), and bloat/creep need a bitmap for the pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..geometry import PAGE
from .khugepaged import bitmap_from_hex, weight

REASONS = ("uffd_isolate", "alloc_then_fail", "futile_rescan", "order_cascade", "bloat", "creep")
SUCCEEDED = "succeeded"
# collapse_huge_page results that come before a folio exists: nothing was allocated.
NO_FOLIO = frozenset({"alloc_huge_page_failed"})
# Scan verdicts that are a PMD's state, not a failed try: already a huge page, or no PTE table.
NOT_A_FAILURE = frozenset({SUCCEEDED, "page_pmd_mapped", "pmd_null", "pmd_none", "no_pte_table"})
TOP = 5  # processes and PMDs listed per reason


@dataclass
class Cost:
    attempts: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, attempts: int, nbytes: int, ns: int) -> None:
        self.attempts += attempts
        self.bytes += nbytes
        self.seconds += ns / 1e9

    def as_dict(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "bytes": self.bytes, "seconds": round(self.seconds, 9)}


@dataclass
class _Reason:
    total: Cost = field(default_factory=Cost)
    by_process: dict[tuple[int | None, str], Cost] = field(default_factory=dict)
    by_pmd: dict[tuple[int | None, str], Cost] = field(default_factory=dict)

    def add(self, pmd: dict[str, Any], attempts: int, nbytes: int, ns: int) -> None:
        if not (attempts or nbytes or ns):
            return
        self.total.add(attempts, nbytes, ns)
        self.by_process.setdefault((pmd["pid"], pmd["comm"]), Cost()).add(attempts, nbytes, ns)
        self.by_pmd.setdefault((pmd["pid"], pmd["address"]), Cost()).add(attempts, nbytes, ns)

    def as_dict(self) -> dict[str, Any]:
        def top(costs: dict[Any, Cost], names: tuple[str, str]) -> list[dict[str, Any]]:
            ranked = sorted(costs.items(), key=lambda kv: (-kv[1].seconds, -kv[1].bytes,
                                                           -kv[1].attempts))
            return [{names[0]: k[0], names[1]: k[1], **c.as_dict()} for k, c in ranked[:TOP]]

        return {**self.total.as_dict(),
                "top_processes": top(self.by_process, ("pid", "comm")),
                "top_pmds": top(self.by_pmd, ("pid", "address"))}


def folio_bytes(order: int) -> int:
    return PAGE << order


def _empty_ptes(bitmap: str | None, offset: int, order: int) -> int | None:
    """None/zero/swap PTEs in [offset, offset + 2^order) of a pass's bitmap (None: unknown)."""
    if bitmap is None:
        return None
    return (1 << order) - weight(bitmap_from_hex(bitmap), offset, 1 << order)


def _wasted_folio(a: dict[str, Any]) -> bool:
    """Did this attempt allocate a folio and then fail?"""
    return a["status"] != SUCCEEDED and a["status"] not in NO_FOLIO


def _attempt_costs(pmd: dict[str, Any], r: dict[str, _Reason]) -> None:
    """uffd_isolate and alloc_then_fail, from the aggregated attempts (exact counts)."""
    reason = r["uffd_isolate"] if pmd.get("uffd") else r["alloc_then_fail"]
    for a in pmd["attempts"]:
        if _wasted_folio(a):
            n = a["count"]
            reason.add(pmd, n, n * folio_bytes(a["order"]), n * a["latency_ns"])


def _pass_steps(pmd: dict[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """(pass, times seen) for the passes kept with the record."""
    for p in pmd.get("passes") or ():
        yield p, p["count"]


def _cascade(pmd: dict[str, Any], r: _Reason) -> None:
    for p, n in _pass_steps(pmd):
        failed: list[tuple[int, int]] = []  # ranges [start, end) of failed attempts so far
        for a in p["attempts"]:
            start, end = a["offset"], a["offset"] + (1 << a["order"])
            ok = a["status"] == SUCCEEDED
            if not ok and any(s <= start and end <= e for s, e in failed):
                r.add(pmd, n, n * folio_bytes(a["order"]) if _wasted_folio(a) else 0,
                      n * a["latency_ns"])
            if not ok:
                failed.append((start, end))


def _bloat_and_creep(pmd: dict[str, Any], bloat: _Reason, creep: _Reason) -> None:
    filled: list[tuple[int, int, int]] = []  # (start, end, order) of earlier successful collapses
    for p, n in _pass_steps(pmd):
        for a in p["attempts"]:
            if a["status"] != SUCCEEDED:
                continue
            start, order = a["offset"], a["order"]
            end = start + (1 << order)
            empty = _empty_ptes(p["bitmap"], start, order)
            if empty:
                bloat.add(pmd, n, n * empty * PAGE, 0)
            if any(start <= s and e <= end and o < order for s, e, o in filled):
                creep.add(pmd, n, n * (empty or 0) * PAGE, n * a["latency_ns"])
            filled.append((start, end, order))


def _futile(pmd: dict[str, Any], r: _Reason) -> None:
    """Rescans that found the PMD as before: every scan beyond the first with a failing verdict,
    provided the PMD showed one bitmap all along (a changed bitmap is a new state, not a
    futile rescan; without a bitmap source the scans alone cannot prove it unchanged)."""
    if pmd.get("bitmaps_seen", 0) != 1:
        return
    for verdict, scans in (pmd.get("verdicts") or {}).items():
        if verdict in NOT_A_FAILURE or scans < 2:
            continue
        # The rescans repeated the attempts of a pass, when the verdict came from one.
        per_pass = next((p for p, _ in _pass_steps(pmd)), None)
        nbytes = ns = 0
        if per_pass is not None:
            nbytes = sum(folio_bytes(a["order"]) for a in per_pass["attempts"] if _wasted_folio(a))
            ns = sum(a["latency_ns"] for a in per_pass["attempts"])
        repeats = scans - 1
        r.add(pmd, repeats, repeats * nbytes, repeats * ns)


def wasted(pmds: Iterable[dict[str, Any]], seen: bool = True) -> dict[str, Any]:
    """The report's `wasted`: by_reason.<reason>.attempts|bytes|seconds with top processes and
    PMDs. `seen` is False when nothing saw PMDs (no function probes, no pagemap samples):
    then the report says so instead of printing zeros."""
    if not seen:
        return {"available": False, "why": "no function probes and no pagemap samples in this "
                "capture, so no PMD records to judge (khmon doctor: kfunc/kprobe)",
                "by_reason": {}}
    r = {name: _Reason() for name in REASONS}
    for pmd in pmds:
        _attempt_costs(pmd, r)
        _futile(pmd, r["futile_rescan"])
        _cascade(pmd, r["order_cascade"])
        _bloat_and_creep(pmd, r["bloat"], r["creep"])
    return {"available": True, "by_reason": {name: reason.as_dict() for name, reason in r.items()}}
