"""What a pass's collapse attempts imply about its PMD's bitmap: the `inferred` source.

Where no source reads a PMD's PTEs (no mthp_present_ptes in BTF, no page_offset_base for
the BPF walk, no pagemap), khugepaged's own choices still say something about them. Its v19
walk (simulate.v19_walk; before the mTHP series the same walk with PMD order alone, which is
the scan's none-PTE limit) decides at each (offset, order) it visits whether the range is
occupied enough to try, and each try returns a result. Replaying the walk with the kernel's
observed attempts as the answers gives constraints, and two kinds pin single bits:

  - a pre-check that needed a full range (max_ptes_none 0 below PMD order, or at PMD order
    when no swap-in ran) and passed: every PTE of the range is present;
  - a pre-check that needed one PTE (max_ptes_none 511) and failed: every PTE is clear
    (none, zero page or swap);
  - a collapse that succeeded where collapse_max_ptes_none() was 0 and no swap-in ran
    (mm_collapse_huge_page_swapin did not fire during it): every PTE was present.

Everything else is unknown: the result is tri-state, present / clear / unknown, as two masks.
Other outcomes carry no per-PTE fact: a failed pre-check under max_ptes_none 0 says only that
some PTE of the range is clear, and a refusal by the scan makes no attempt at all, so passes
without attempts are not replayed. The settings are the capture's (its header), so a knob
changed during a capture makes the inference of later passes unsound; a pass whose attempts
the walk cannot reproduce (another algorithm, or a result the walk does not follow) gives no
inference rather than a wrong one. The replay takes every collapse_huge_page call of the pass
to have been seen: a collapse record the ring buffer lost (the report's accounting counts it
under fn_collapse `lost`) makes a passed pre-check look failed, which under max_ptes_none 511
would pin a range clear that was not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..bitmap import span
from ..geometry import PMD_ORDER
from .khugepaged import Settings, collapse_max_ptes_none, v19_walk

# (offset, order, result, swapped_in) of one collapse_huge_page call, in call order
Step = tuple[int, int, str, bool]


@dataclass(frozen=True)
class Known:
    """Bits of a PMD's bitmap known set (`present`) and known clear (`clear`); bit i = PTE i."""

    present: int = 0
    clear: int = 0

    @property
    def mask(self) -> int:
        return self.present | self.clear


def from_pass(steps: Sequence[Step], settings: Settings) -> Known | None:
    """The bits one pass pins, or None when its attempts are not the v19 walk's for these
    settings (so nothing can be concluded) or it made none. `settings.uffd`: the VMA's."""
    if not steps:
        return None
    run = _Observed(steps, settings)
    v19_walk(run)
    if run.next != len(steps):
        return None
    return Known(run.present, run.clear)


def merge(known: Iterable[Known | None]) -> Known | None:
    """Several passes over one PMD: their facts together, minus bits they disagree on (the
    PMD changed between them)."""
    present = clear = 0
    seen = False
    for k in known:
        if k is not None:
            present, clear, seen = present | k.present, clear | k.clear, True
    if not seen:
        return None
    both = present & clear
    return Known(present & ~both, clear & ~both)


class _Observed:
    """A v19_walk run whose answers are the kernel's observed attempts."""

    def __init__(self, steps: Sequence[Step], settings: Settings) -> None:
        self.steps, self.settings = steps, settings
        self.next = 0  # the observed attempt the walk must reach next
        self.present = self.clear = 0

    def precheck(self, offset: int, order: int, need: int) -> bool:
        passed = (self.next < len(self.steps)
                  and self.steps[self.next][:2] == (offset, order))
        if passed and need >= 1 << order:
            # at PMD order swap PTEs count as occupied: only a try without swap-in pins them
            if order != PMD_ORDER or not self.steps[self.next][3]:
                self.present |= span(offset, order)
        elif not passed and need <= 1:
            self.clear |= span(offset, order)
        return passed

    def attempt(self, offset: int, order: int) -> str | None:
        _, _, result, swapped = self.steps[self.next]
        self.next += 1
        if result != "succeeded":
            return result
        if not swapped and collapse_max_ptes_none("v19", self.settings, order,
                                                  self.settings.uffd) == 0:
            self.present |= span(offset, order)
        return None

    def stop(self, reason: str) -> None:
        """The walk gave up on the PMD: an observed attempt after this one does not fit
        (from_pass checks that every one was reached)."""
