"""`khmon simulate`: replay a stream's PMD records through the model of khugepaged's
collapse decision (khmon.model.khugepaged) and say where the kernel and the model differ.

With the recording's own settings (per pass: the settings in force when the pass was made)
every pass should match; with other settings or the other algorithm the differences are the
"what if" answer. This is an output: it reads the report's pmds[] records, never the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .. import bitmap
from ..bitmap import weight
from ..geometry import PAGE
from ..model.khugepaged import Attempt, Outcome, Settings, simulate


def replay(pmds: Iterable[Mapping[str, Any]], algo: str,
           settings: Callable[[int | None], Settings], attempts_seen: bool = True
           ) -> dict[str, Any]:
    """Run every captured bitmap of a report's pmds[] through the model; say where it differs.

    The unit is one pass per (PMD, bitmap): the first pass the correlator kept on each bitmap
    (with the kernel's attempts, in call order), and for a PMD the scan refused (a bitmap, no
    attempts) that bitmap once, with no attempts. `settings(epoch)`: the settings to replay a
    pass made in that settings epoch with (the pass's `settings_epoch`; None for a PMD the scan
    refused, which has no pass: the latest); `uffd` is taken per PMD from the record. A pass
    matches when the kernel's (offset, order) sequence equals the prediction's;
    with the kernel's own settings every pass should match, and with others the differences
    are the what-if answer. A kernel pass that ended on a result the model assumes away
    (OUTSIDE_THE_MODEL), or a scan refused for such a reason (a page off the LRU, locked or
    pinned), and agrees with the prediction up to there is `cut_short`, by that result.
    Not replayed, and counted: PMDs without a bitmap, and PMDs with attempts none of whose
    passes has a bitmap (`passes_without_bitmap`: comparing those to "no attempts" would be
    false). `attempts_seen` False (a recording without function probes: bitmaps from pagemap,
    attempts invisible) gives the predictions alone; nothing is compared.
    """
    kernel = _Tally()
    predicted = _Tally()
    matched = 0
    cut: dict[str, int] = {}  # passes the kernel ended early, by the status that ended them
    mismatches: list[dict[str, Any]] = []
    no_bitmap = no_pass_bitmap = 0
    for pmd in pmds:
        # The first pass made on each bitmap: later ones on the same bitmap find the ranges it
        # collapsed already large folios (pte_mapped_hugepage), which the model does not see.
        # Open passes are not over yet: nothing to compare them with.
        firsts: dict[str, tuple[list, int | None]] = {}
        for p in pmd.get("passes") or ():
            if p["bitmap"] and not p.get("open"):
                firsts.setdefault(p["bitmap"], (p["attempts"], p.get("settings_epoch")))
        passes = [(hexmap, attempts, epoch) for hexmap, (attempts, epoch) in firsts.items()]
        if not passes and pmd.get("bitmap"):
            if pmd.get("attempts") and attempts_seen:
                no_pass_bitmap += 1
                continue
            passes = [(pmd["bitmap"], [], None)]
        if not passes:
            no_bitmap += 1
            continue
        for hexmap, attempts, epoch in passes:
            present = bitmap.from_hex(hexmap)
            out = simulate(algo, present, replace(settings(epoch), uffd=bool(pmd.get("uffd"))))
            predicted.add(out)
            if not attempts_seen:
                continue
            kernel.add_kernel(attempts, present)
            seq_k = [[a["offset"], a["order"]] for a in attempts]
            seq_p = [[a.offset, a.order] for a in out.attempts]
            if seq_k == seq_p:
                matched += 1
            elif (seq_k == seq_p[:len(seq_k)] and (ended := _ended_outside_the_model(
                    attempts, pmd.get("verdicts") or {})) is not None):
                cut[ended] = cut.get(ended, 0) + 1
            elif len(mismatches) < MAX_MISMATCHES:
                mismatches.append({
                    "pid": pmd.get("pid"), "address": pmd.get("address"), "bitmap": hexmap,
                    "verdicts": pmd.get("verdicts"),
                    "kernel": [[a["offset"], a["order"], a["status"]] for a in attempts],
                    "predicted": [[a.offset, a.order, "succeeded" if a.succeeded else a.reason]
                                  for a in out.attempts],
                    "predicted_scan_failure": out.scan_failure})
    total = predicted.passes
    compared = {"kernel": kernel.as_dict(), "matched": matched, "cut_short": cut,
                "mismatched": total - matched - sum(cut.values()), "mismatches": mismatches,
                } if attempts_seen else {"kernel": None, "matched": None, "cut_short": {},
                                         "mismatched": None, "mismatches": []}
    latest = settings(None)
    return {"algo": algo, "settings": {"orders": sorted(latest.orders),
                                       "max_ptes_none": latest.max_ptes_none,
                                       "max_ptes_swap": latest.max_ptes_swap,
                                       "max_ptes_shared": latest.max_ptes_shared},
            "passes": total, "pmds_without_bitmap": no_bitmap,
            "passes_without_bitmap": no_pass_bitmap, "attempts_seen": attempts_seen,
            "predicted": predicted.as_dict(), **compared}


def _ended_outside_the_model(attempts: list[Mapping[str, Any]],
                             verdicts: Mapping[str, int]) -> str | None:
    """The result that ended a kernel pass early for a reason the model assumes away: its
    last attempt's (OUTSIDE_THE_MODEL), or, for a PMD the scan refused outright, the scan's
    verdict when no scan of it succeeded and none failed for a reason the model predicts."""
    if attempts:
        last = attempts[-1]["status"]
        return last if last in OUTSIDE_THE_MODEL else None
    if not verdicts or any(v == "succeeded" or v in MODELLED_SCAN_FAILURES for v in verdicts):
        return None
    return max(verdicts, key=lambda v: verdicts[v])


MAX_MISMATCHES = 20  # listed in full; the rest are counted
# Results of collapse_huge_page() that the model assumes away (the mm exiting, the VMA or the
# PMD changed under khugepaged: hugepage_vma_revalidate(), find_pmd_or_thp_or_none()), as the
# tracepoints name them. They end the v19 walk ("default: goto done"), so a kernel pass that
# ends on one of them is compared up to there and counted as cut short, not as a mismatch:
# a workload exiting mid-pass does that.
OUTSIDE_THE_MODEL = frozenset({"no_process_for_page", "vma_null", "vma_check_failed",
                               "not_suitable_address_range", "pmd_null", "pmd_none",
                               "no_pte_table", "page_pmd_mapped"})
# The scan failures the model predicts (_scan_pmd). Any other refusal of a scan (a page off
# the LRU, locked, or with extra references; the PMD gone) is outside the model.
MODELLED_SCAN_FAILURES = frozenset({"exceed_none_pte", "exceed_swap_pte", "exceed_shared_pte",
                                    "vma_check_failed"})


@dataclass
class _Tally:
    """Attempts, collapses per order and bloat over replayed passes."""

    passes: int = 0
    attempts: dict[int, int] = field(default_factory=dict)
    collapses: dict[int, int] = field(default_factory=dict)
    bloat_ptes: int = 0

    def add(self, out: Outcome) -> None:
        self.passes += 1
        for a in out.attempts:
            self.attempts[a.order] = self.attempts.get(a.order, 0) + 1
        for _, order in out.collapses:
            self.collapses[order] = self.collapses.get(order, 0) + 1
        self.bloat_ptes += out.bloat_ptes

    def add_kernel(self, attempts: list[Mapping[str, Any]], present: int) -> None:
        """The kernel's pass as an Outcome: its attempts, and bloat from its bitmap."""
        out = Outcome()
        for a in attempts:
            ok = a["status"] == "succeeded"
            out.attempts.append(Attempt(a["offset"], a["order"], ok, None if ok else a["status"]))
            if ok:
                nr = 1 << a["order"]
                out.collapses.append((a["offset"], a["order"]))
                out.bloat_ptes += nr - weight(present, a["offset"], nr)
        self.add(out)

    def as_dict(self) -> dict[str, Any]:
        def by_order(d: dict[int, int]) -> dict[str, int]:
            return {str(o): d[o] for o in sorted(d, reverse=True)}

        return {"attempts": sum(self.attempts.values()), "attempts_by_order": by_order(self.attempts),
                "collapses": sum(self.collapses.values()),
                "collapses_by_order": by_order(self.collapses),
                "bloat_bytes": self.bloat_ptes * PAGE}


