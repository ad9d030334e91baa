"""Wasted collapse work: detectors fed by the stream, each with a stable reason and a cost.

Cost comes in three measures:
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

Every total only grows: a cost is added when the stream shows it (an attempt, a scan, a
closed pass) and never taken back, so totals can be exported as counters. uffd_isolate and
alloc_then_fail are also counted in the kernel (khmon.model.counts.ExactCounts): their
totals are the larger of the two, which is the kernel's at the end of a stream even when
detail records were lost. futile_rescan is judged at each scan against the PMD's previous
scan (same bitmap, same failing verdict), so a later bitmap does not undo earlier rescans.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import bitmap
from ..geometry import PAGE
from ..stream.events import SUCCEEDED
from .records import Cost, OpenPass, PmdRecord, ProcessRecord

REASONS = ("uffd_isolate", "alloc_then_fail", "futile_rescan", "order_cascade", "bloat", "creep")
# collapse_huge_page results that come before a folio exists: nothing was allocated.
NO_FOLIO = frozenset({"alloc_huge_page_failed"})
# Scan verdicts that are a PMD's state, not a failed try: already a huge page, or no PTE table.
NOT_A_FAILURE = frozenset({SUCCEEDED, "page_pmd_mapped", "pmd_null", "pmd_none", "no_pte_table"})
TOP = 5  # processes and PMDs listed per reason
_CANDIDATES = 8 * TOP  # PMDs followed per reason for its top list
MAX_FILLED = 64  # successful collapses remembered per PMD for creep


def folio_bytes(order: int) -> int:
    return PAGE << order


def wasted_folio(status: str) -> bool:
    """Did an attempt with this result allocate a folio and then fail?"""
    return status != SUCCEEDED and status not in NO_FOLIO


def _rank(c: Cost) -> tuple[int, int, int]:
    return (c.ns, c.bytes, c.attempts)


class Waste:
    """The totals by reason, and who the costs belong to."""

    def __init__(self) -> None:
        self.totals = {r: Cost() for r in REASONS}
        # per reason: PMD key -> record, the PMDs with the largest costs (bounded)
        self._top: dict[str, dict[tuple[int, int, int], PmdRecord]] = {r: {} for r in REASONS}
        self._floor: dict[str, tuple[int, int, int]] = dict.fromkeys(REASONS, (0, 0, 0))

    def charge(self, reason: str, pmd: PmdRecord, attempts: int, nbytes: int, ns: int) -> None:
        if not (attempts or nbytes or ns):
            return
        self.totals[reason].add(attempts, nbytes, ns)
        pmd.process.cost(reason).add(attempts, nbytes, ns)
        mine = pmd.cost(reason)
        mine.add(attempts, nbytes, ns)
        top = self._top[reason]
        key = pmd.key
        if key in top or len(top) < _CANDIDATES:
            top[key] = pmd
            return
        # Costs only grow, so the smallest candidate cost seen last is a lower bound of the
        # smallest now: a PMD not above it cannot enter, and costs no scan of the list.
        rank = _rank(mine)
        if rank <= self._floor[reason]:
            return
        low_key, low = min(top.items(), key=lambda kv: _rank(kv[1].waste[reason]))
        self._floor[reason] = _rank(low.waste[reason])
        if rank > self._floor[reason]:
            del top[low_key]
            top[key] = pmd

    def forget(self, pmd: PmdRecord) -> None:
        """An evicted PMD leaves the top lists (its costs stay in the totals)."""
        for top in self._top.values():
            top.pop(pmd.key, None)

    # --- detectors ------------------------------------------------------------------------

    def attempt(self, pmd: PmdRecord, order: int, status: str, latency_ns: int,
                uffd: bool) -> None:
        """One collapse_huge_page call: uffd_isolate or alloc_then_fail if it threw a folio
        away. `uffd`: its VMA was userfaultfd-armed."""
        if wasted_folio(status):
            self.charge("uffd_isolate" if uffd else "alloc_then_fail", pmd, 1,
                        folio_bytes(order), latency_ns)

    def rescan(self, pmd: PmdRecord, verdict: str, scans: int) -> None:
        """`scans` scans of the PMD ended with `verdict`: the ones that found it as the scan
        before did (same bitmap, same failing verdict) are futile rescans."""
        if verdict in NOT_A_FAILURE or pmd.bitmap is None:
            pmd.last_state = None
            return
        state = (pmd.bitmap, verdict)
        futile = scans if pmd.last_state == state else scans - 1
        pmd.last_state = state
        if futile > 0:
            self.charge("futile_rescan", pmd, futile, 0, 0)

    def pass_closed(self, op: OpenPass, repeated: bool) -> None:
        """A pass ended. `repeated`: an identical pass (same bitmap, same attempts) was seen
        on this PMD before, so this one repeated its attempts: their folios and time are the
        futile rescan's cost."""
        pmd = op.pmd
        failed: list[tuple[int, int]] = []
        for (offset, order, status, _swapped), ns in zip(op.steps, op.latencies, strict=True):
            end = offset + (1 << order)
            ok = status == SUCCEEDED
            folio = folio_bytes(order) if wasted_folio(status) else 0
            if repeated:
                self.charge("futile_rescan", pmd, 0, folio, ns)
            if not ok:
                if any(s <= offset and end <= e for s, e in failed):
                    self.charge("order_cascade", pmd, 1, folio, ns)
                failed.append((offset, end))
                continue
            empty = ((1 << order) - bitmap.weight(op.bitmap, offset, 1 << order)
                     if op.bitmap is not None else None)
            if empty:
                self.charge("bloat", pmd, 1, empty * PAGE, 0)
            filled = pmd.filled if pmd.filled is not None else []
            if any(offset <= s and e <= end and o < order for s, e, o in filled):
                self.charge("creep", pmd, 1, (empty or 0) * PAGE, ns)
            if len(filled) < MAX_FILLED:
                filled.append((offset, end, order))
                pmd.filled = filled

    # --- reading --------------------------------------------------------------------------

    def to_json(self, processes: Iterable[ProcessRecord],
                exact: dict[str, Cost] | None = None) -> dict[str, Any]:
        """wasted.by_reason.<reason>: attempts, bytes, seconds, top processes and PMDs.
        `exact`: the in-kernel totals of uffd_isolate and alloc_then_fail, and of the wasted
        folios whose VMA the probes did not see (wasted.vma_unknown)."""
        procs = list(processes)
        out: dict[str, Any] = {}
        for reason in REASONS:
            total = self.totals[reason]
            k = (exact or {}).get(reason)
            if k is not None:
                total = Cost(max(total.attempts, k.attempts), max(total.bytes, k.bytes),
                             max(total.ns, k.ns))
            owners = sorted((p for p in procs if reason in p.waste),
                            key=lambda p: _rank(p.waste[reason]), reverse=True)[:TOP]
            pmds = sorted(self._top[reason].values(), key=lambda p: _rank(p.waste[reason]),
                          reverse=True)[:TOP]
            out[reason] = {**total.to_json(),
                           "top_processes": [{"pid": p.pid or None, "comm": p.comm,
                                              **p.waste[reason].to_json()} for p in owners],
                           "top_pmds": [{"pid": p.process.pid or None, "address": hex(p.address),
                                         **p.waste[reason].to_json()} for p in pmds]}
        result: dict[str, Any] = {"available": True, "by_reason": out}
        if exact is not None:
            result["vma_unknown"] = exact["vma_unknown"].to_json()
        return result


def unavailable() -> dict[str, Any]:
    return {"available": False, "why": "no function probes and no pagemap samples in this "
            "capture, so no PMD records to judge (khmon doctor: kfunc/kprobe)",
            "by_reason": {}}
