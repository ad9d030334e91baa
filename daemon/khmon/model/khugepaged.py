"""What khugepaged would try on one PMD: a model of the mTHP collapse decision.

khmon shows what khugepaged did to a PMD; this module says what it should have done, so a
report can put the two side by side ("compare") and answer "what if" questions (other
settings, the other version of the series) from a recorded bitmap alone.

Two versions of Nico Pache's series "mm/khugepaged: introduce mTHP collapse support" are
modelled, chosen with `algo`:

  v17  [PATCH mm-unstable v17 11/14], 2026-05-11, quoted with its review (Wei Yang) in
       shared/reference/mthp-collapse-v17-review.txt: mthp_collapse() pops (offset, order)
       pairs off a stack and, on failure, pushes the two halves one order down. Its
       collapse_max_ptes_none(), collapse_max_ptes_shared/swap() and the mTHP swap-in bail
       are from v17 "mm/khugepaged: generalize __collapse_huge_page_* for mTHP support"
       (same date, as quoted in Lance Yang's review of it).
  v19  [PATCH mm-unstable v19 11/14] <20260605161422.213817-12-npache@redhat.com> and
       v19 12/14 "mm/khugepaged: avoid unnecessary mTHP collapse attempts"
       (2026-06-05): the linear walk over offsets that Linux 7.2 carries; v19's posting of
       the helpers patch makes collapse_max_ptes_none() default other values to 0. Plus
       one fixup agreed on the list after v19 (Lance Yang, 2026-06-06..09, "Looks broken
       for swap PTEs in PMD collapse"): at PMD order, swap PTEs count as occupied in the
       pre-check. See v19_walk() for why it is assumed to be in 7.2.

Both versions share the scan (collapse_scan_pmd()) and the per-attempt outcome
(collapse_huge_page()); they differ in the walk and in collapse_max_ptes_none().

Inputs are 512-bit ints, bit i = PTE i of the PMD: `present` is the kernel's
collapse_control.mthp_present_ptes (a PTE mapping a page; none, zero-page and swap PTEs
leave it clear), `swap` the swap PTEs, `shared` the present PTEs whose folio is mapped by
more than one process (folio_maybe_mapped_shared()).

Modelling assumptions (what the kernel can do that the model cannot see):
  - one pass over the PMD, khugepaged context (cc->is_khugepaged), anonymous VMA;
  - no allocation or memcg charge failure, no race with faults, munmap or migration
    (hugepage_vma_revalidate() and check_pmd_still_valid() pass), no extra folio
    references (no GUP pins, so no SCAN_PAGE_COUNT), folios lock and isolate from the LRU;
  - every present page is an order-0 folio (no SCAN_PTE_MAPPED_HUGEPAGE) and young, so the
    scan's referenced count is the number of present PTEs;
  - zero-page PTEs are counted as none (the kernel's pte_none_or_zero() does the same);
  - no PTE carries the uffd-wp bit (SCAN_PTE_UFFD_WP), swap-in of swap PTEs at PMD order
    succeeds, and swapped-in pages are not shared;
  - the VMA's enabled orders are given (Settings.orders); the model does not re-derive
    thp_vma_allowable_orders() beyond settings_from_sysfs().
A failure reason is the first check that fails walking the range's PTEs in order, as
__collapse_huge_page_isolate() does; the real kernel may fail earlier on a present PTE for
a reason the model does not see (the 7.2 uffd experiment reports not_suitable_page_count at
some lower orders). Both reasons send the walk to the next order, so the attempts are the same.

Reasons are the kernel's enum scan_result names, lower case without SCAN_. For the ones the
model predicts (exceed_none_pte, exceed_swap_pte, exceed_shared_pte, lack_referenced_page)
they equal the tracepoints' status strings; "vma_check" is "vma_check_failed" there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..bitmap import weight
from ..geometry import PAGE, PMD_ORDER, PTES
from ..kernel.sysfs import selected

# Lowest mTHP order: anon folios of order 0 and 1 are not THPs (THP_ORDERS_ALL_ANON).
KHUGEPAGED_MIN_MTHP_ORDER = 2
# HPAGE_PMD_NR - 1: the one non-zero max_ptes_none that mTHP collapse supports.
KHUGEPAGED_MAX_PTES_LIMIT = PTES - 1
ALGORITHMS: tuple[str, ...] = ("v17", "v19")
_ALL = (1 << PTES) - 1

# v19 mthp_collapse(): the results after which it tries the next lower order at the same
# offset (11/14 listed alloc_huge_page_fail; 12/14 added the rest), and those after which
# it moves on to the next offset. Any other result ends work on the whole PMD ("done").
V19_NEXT_ORDER = frozenset({
    "alloc_huge_page_fail", "lack_referenced_page", "exceed_none_pte", "exceed_swap_pte",
    "exceed_shared_pte", "page_lock", "page_count", "page_null", "del_page_lru",
    "pte_non_present", "pte_uffd_wp", "page_lazyfree",
})
V19_NEXT_OFFSET = frozenset({"pte_mapped_hugepage"})


@dataclass(frozen=True)
class Settings:
    """The inputs of khugepaged's decision that are not in the PMD itself."""

    orders: frozenset[int]  # enabled collapse orders (PMD_ORDER included if PMD-size THP is)
    max_ptes_none: int = 511
    max_ptes_swap: int = 64
    max_ptes_shared: int = 256
    uffd: bool = False  # VMA armed with userfaultfd (missing/wp/minor)


@dataclass(frozen=True)
class Attempt:
    """One collapse_huge_page() call and its predicted result."""

    offset: int  # PTE index within the PMD
    order: int
    succeeded: bool
    reason: str | None  # scan_result name of the failure, None on success


@dataclass
class Outcome:
    """One pass of khugepaged over one PMD."""

    attempts: list[Attempt] = field(default_factory=list)  # in the order the kernel makes them
    collapses: list[tuple[int, int]] = field(default_factory=list)  # (offset, order) that succeed
    bloat_ptes: int = 0  # none PTEs inside collapsed ranges (filled with zeroed pages)
    # Why collapse_scan_pmd() failed, so mthp_collapse() never ran; None when it passed.
    scan_failure: str | None = None
    # Why mthp_collapse() gave up on the rest of the PMD early; None when it walked it all.
    stopped: str | None = None


def _bit(bits: int, i: int) -> bool:
    return bool(bits >> i & 1)


def collapse_max_ptes_none(algo: str, settings: Settings, order: int, uffd_vma: bool) -> int | None:
    """collapse_max_ptes_none(cc, vma, order): none/zero PTEs a collapse at `order` may fill.

    `uffd_vma` is `vma && userfaultfd_armed(vma)`: true only where the kernel passes the VMA
    (the scan and __collapse_huge_page_isolate()); mthp_collapse() passes NULL, which is why
    a uffd-armed VMA passes its pre-check and is only rejected at isolate.

    Both versions: uffd -> 0; PMD order -> the sysfs value; mTHP with the value 511
    (KHUGEPAGED_MAX_PTES_LIMIT) -> (1 << order) - 1, so one present PTE is enough; mTHP
    with 0 -> 0, so the range must be full. They differ for any other value: v17 (04/14)
    returns -EINVAL (None here), and its mthp_collapse() then stops ("max_ptes_none < 0:
    return collapsed"); v19 warns once and returns 0 ("defaulting to 0").
    """
    if uffd_vma:
        return 0
    mpn = settings.max_ptes_none
    if order == PMD_ORDER:
        return mpn
    if mpn == KHUGEPAGED_MAX_PTES_LIMIT:
        return (1 << order) - 1
    if mpn == 0:
        return 0
    return None if algo == "v17" else 0


def unhonoured_max_ptes_none(algo: str, settings: Settings) -> str | None:
    """What mTHP collapse makes of a max_ptes_none other than 0 and 511 (see
    collapse_max_ptes_none), when mTHP orders are enabled; None when it honours it."""
    mpn = settings.max_ptes_none
    mthp = sorted(o for o in settings.orders if o < PMD_ORDER)
    if mpn in (0, KHUGEPAGED_MAX_PTES_LIMIT) or not mthp:
        return None
    what = ("treats it as 0 there (v19 warns once and defaults to 0)" if algo == "v19" else
            "stops there (v17's collapse_max_ptes_none() returns -EINVAL and mthp_collapse() "
            "gives up on the PMD)")
    return (f"max_ptes_none {mpn}: mTHP collapse honours only 0 and "
            f"{KHUGEPAGED_MAX_PTES_LIMIT}, so at orders {','.join(map(str, mthp))} {algo} "
            f"{what}; only PMD-order collapse uses {mpn}")


def _scan_pmd(present: int, swap: int, shared: int, settings: Settings) -> tuple[str | None, int]:
    """collapse_scan_pmd(): may khugepaged go on to mthp_collapse(), and the `unmapped` count.

    The limits are the PMD order's (collapse_max_ptes_*(cc, vma, HPAGE_PMD_ORDER)), applied
    to the whole PMD, except that "if (enabled_orders != BIT(HPAGE_PMD_ORDER)) max_ptes_none
    = KHUGEPAGED_MAX_PTES_LIMIT": with any mTHP order enabled the scan lets every none PTE
    through (and with it a uffd-armed VMA) so that it can fill the bitmap. The scan then ends
    with SCAN_LACK_REFERENCED_PAGE if "!referenced || (unmapped && referenced <
    HPAGE_PMD_NR / 2)"; every present page is taken to be young.
    """
    # PMD order: the same in both versions (the sysfs value, or 0 for a uffd-armed VMA).
    max_none = collapse_max_ptes_none("v19", settings, PMD_ORDER, settings.uffd)
    if settings.orders != {PMD_ORDER}:
        max_none = KHUGEPAGED_MAX_PTES_LIMIT
    none = unmapped = nshared = referenced = 0
    for i in range(PTES):
        if _bit(swap, i):
            unmapped += 1
            if unmapped > settings.max_ptes_swap:
                return "exceed_swap_pte", unmapped
        elif not _bit(present, i):
            none += 1
            if none > max_none:
                return "exceed_none_pte", unmapped
        else:
            if _bit(shared, i):
                nshared += 1
                if nshared > settings.max_ptes_shared:
                    return "exceed_shared_pte", unmapped
            referenced += 1
    if not referenced or (unmapped and referenced < PTES // 2):
        return "lack_referenced_page", unmapped
    return None, unmapped


def _collapse_huge_page(algo: str, present: int, swap: int, shared: int, settings: Settings,
                        offset: int, order: int, unmapped: int) -> str | None:
    """collapse_huge_page(mm, address, referenced, unmapped, cc, order): None on success.

    The checks that can fail under the module's assumptions, in the kernel's order:
    1. __collapse_huge_page_swapin(), run when the scan's PMD-wide `unmapped` is non-zero:
       below PMD order it fails at the first swap PTE of the range with
       SCAN_EXCEED_SWAP_PTE ("TODO: Support swapin without leading to further mTHP
       collapses"); at PMD order it swaps the pages in.
    2. __collapse_huge_page_isolate() over the range's PTEs in order, with
       collapse_max_ptes_none(cc, vma, order) (0 for a uffd-armed VMA) and
       collapse_max_ptes_shared(cc, order) (0 below PMD order): the first none PTE over the
       limit gives SCAN_EXCEED_NONE_PTE, the first shared page over it SCAN_EXCEED_SHARED_PTE.
    """
    nr = 1 << order
    if unmapped and order != PMD_ORDER and weight(swap, offset, nr):
        return "exceed_swap_pte"
    max_none = collapse_max_ptes_none(algo, settings, order, settings.uffd)
    if max_none is None:  # v17's isolate: "if (max_ptes_none < 0) return SCAN_INVALID_PTES_NONE"
        return "invalid_ptes_none"
    max_shared = settings.max_ptes_shared if order == PMD_ORDER else 0
    none = nshared = 0
    for i in range(offset, offset + nr):
        if _bit(present, i) or _bit(swap, i):  # swap PTEs were swapped in at step 1
            if _bit(shared, i):
                nshared += 1
                if nshared > max_shared:
                    return "exceed_shared_pte"
        else:
            none += 1
            if none > max_none:
                return "exceed_none_pte"
    return None


class WalkRun(Protocol):
    """What a walk asks of the pass it makes: the settings, the pre-check's answer, the
    result of a collapse_huge_page() call, and where it gave up."""

    settings: Settings

    def precheck(self, offset: int, order: int, need: int) -> bool: ...

    def attempt(self, offset: int, order: int) -> str | None: ...

    def stop(self, reason: str) -> None: ...


class _Run:
    """One simulated pass: the PMD, the settings, and what has been tried so far. The walks
    (_v17, v19_walk) ask it two things, so khmon.infer can drive the same v19 walk with the
    kernel's observed attempts instead of a bitmap."""

    def __init__(self, algo: str, present: int, swap: int, shared: int, settings: Settings,
                 unmapped: int) -> None:
        self.algo, self.present, self.swap, self.shared = algo, present, swap, shared
        self.settings, self.unmapped = settings, unmapped
        self.out = Outcome()

    def precheck(self, offset: int, order: int, need: int) -> bool:
        """mthp_collapse()'s pre-check: at least `need` occupied PTEs in the range (v19 adds
        the scan's swap PTEs at PMD order, see v19_walk)."""
        occupied = weight(self.present, offset, 1 << order)
        if order == PMD_ORDER and self.algo == "v19":
            occupied += self.unmapped
        return occupied >= need

    def attempt(self, offset: int, order: int) -> str | None:
        """Call collapse_huge_page() and record the attempt; None on success."""
        reason = _collapse_huge_page(self.algo, self.present, self.swap, self.shared,
                                     self.settings, offset, order, self.unmapped)
        self.out.attempts.append(Attempt(offset, order, reason is None, reason))
        if reason is None:
            nr = 1 << order
            self.out.collapses.append((offset, order))
            self.out.bloat_ptes += nr - weight(self.present | self.swap, offset, nr)
        return reason

    def stop(self, reason: str) -> None:
        """mthp_collapse() gave up on the rest of the PMD."""
        self.out.stopped = reason


def _v17(run: WalkRun) -> None:
    """v17 mthp_collapse(): binary recursion with an explicit stack, as quoted in the review.

        collapse_mthp_stack_push(cc, &stack_size, 0, HPAGE_PMD_ORDER);
        while (stack_size) {
            range = collapse_mthp_stack_pop(cc, &stack_size);
            if (!test_bit(order, &enabled_orders)) goto next_order;
            max_ptes_none = collapse_max_ptes_none(cc, NULL, order);
            if (max_ptes_none < 0) return collapsed;
            nr_occupied_ptes = collapse_mthp_count_present(cc, offset, nr_ptes);
            if (nr_occupied_ptes >= nr_ptes - max_ptes_none) {
                ret = collapse_huge_page(mm, collapse_address, referenced, unmapped, cc, order);
                if (ret == SCAN_SUCCEED) { collapsed += nr_ptes; continue; }
            }
        next_order:
            if (order > KHUGEPAGED_MIN_MTHP_ORDER) {
                push(mid_offset, order - 1); push(offset, order - 1);
            }
        }

    The right half is pushed first, so the left half is popped first: a depth-first,
    left-to-right (pre-order) walk. Halves are pushed whether or not a lower order is
    enabled, and for a disabled order, down to order 2; they are popped and skipped without
    an attempt. Every failure pushes the halves (v17 12/14 later lists the results that do;
    it differs only for results this model never predicts). The occupied count is the
    bitmap's alone, so swap PTEs do not count even at PMD order.
    """
    s = run.settings
    stack = [(0, PMD_ORDER)]
    while stack:
        offset, order = stack.pop()
        nr = 1 << order
        if order in s.orders:
            max_none = collapse_max_ptes_none("v17", s, order, uffd_vma=False)
            if max_none is None:
                run.stop("invalid_ptes_none")
                return
            if run.precheck(offset, order, nr - max_none) and run.attempt(offset, order) is None:
                continue
        if order > KHUGEPAGED_MIN_MTHP_ORDER:
            stack.append((offset + nr // 2, order - 1))
            stack.append((offset, order - 1))


def max_order_from_offset(offset: int) -> int:
    """max_order_from_offset(): the highest naturally aligned order at `offset`, at most PMD's.

        if (offset == 0) return HPAGE_PMD_ORDER;
        return min_t(unsigned int, __ffs(offset), HPAGE_PMD_ORDER);
    """
    if offset == 0:
        return PMD_ORDER
    return min((offset & -offset).bit_length() - 1, PMD_ORDER)


def v19_walk(run: WalkRun) -> None:
    """v19 mthp_collapse() (11/14 with 12/14): a linear walk over the PMD.

        while (offset < HPAGE_PMD_NR) {
            nr_ptes = 1UL << order;
            if (!test_bit(order, &enabled_orders)) goto next_order;
            max_ptes_none = collapse_max_ptes_none(cc, NULL, order);
            nr_occupied_ptes = bitmap_weight_from(cc->mthp_present_ptes, offset, offset + nr_ptes);
            if (nr_occupied_ptes >= nr_ptes - max_ptes_none) {
                ret = collapse_huge_page(mm, collapse_address, referenced, unmapped, cc, order);
                switch (ret) {
                case SCAN_SUCCEED: case SCAN_PTE_MAPPED_HUGEPAGE: goto next_offset;
                case SCAN_ALLOC_HUGE_PAGE_FAIL: ... case SCAN_EXCEED_NONE_PTE: ...: goto next_order;
                default: goto done;
                }
            }
        next_order:
            if (order > KHUGEPAGED_MIN_MTHP_ORDER && (enabled_orders & GENMASK(order - 1, 0))) {
                order--; continue;
            }
        next_offset:
            offset += nr_ptes;
            order = max_order_from_offset(offset);
        }

    Assumed fixup (not in the v19 posting): at PMD order the pre-check adds the scan's
    `unmapped` (swap PTEs) to the occupied count. As posted, max_ptes_none=0 with one swap
    PTE and 511 present never attempts the PMD collapse that the scan allowed (a regression
    from pre-series kernels). Lance Yang proposed "if (is_pmd_order(order))
    nr_occupied_ptes += unmapped;", Nico Pache and David Hildenbrand agreed to take it as a
    fixup (thread of v19 11/14, 2026-06-09). This model takes it to be in 7.2; with swap=0,
    or with max_ptes_none=511, the result is the same either way.
    """
    s = run.settings
    offset, order = 0, PMD_ORDER
    lower = {o: any(k < o for k in s.orders) for o in range(PMD_ORDER + 1)}
    while offset < PTES:
        nr = 1 << order
        if order in s.orders:
            max_none = collapse_max_ptes_none("v19", s, order, uffd_vma=False)
            assert max_none is not None  # v19 never returns -EINVAL
            if run.precheck(offset, order, nr - max_none):
                reason = run.attempt(offset, order)
                if reason is None or reason in V19_NEXT_OFFSET:
                    offset += nr
                    order = max_order_from_offset(offset)
                    continue
                if reason not in V19_NEXT_ORDER:
                    run.stop(reason)
                    return
        if order > KHUGEPAGED_MIN_MTHP_ORDER and lower[order]:
            order -= 1
            continue
        offset += nr
        order = max_order_from_offset(offset)


_WALKS = {"v17": _v17, "v19": v19_walk}


def simulate(algo: str, present: int, settings: Settings, swap: int = 0, shared: int = 0) -> Outcome:
    """One khugepaged pass over a PMD: collapse_scan_pmd(), then mthp_collapse() if it passed.

    `present`, `swap` and `shared` are 512-bit ints, bit i = PTE i (see the module docstring);
    swap PTEs are not present, shared PTEs are present. With no order enabled khugepaged
    does not scan the VMA at all; the outcome says "vma_check".
    """
    if algo not in _WALKS:
        raise ValueError(f"unknown algorithm {algo!r}: expected one of {', '.join(ALGORITHMS)}")
    for name, bits in (("present", present), ("swap", swap), ("shared", shared)):
        if not 0 <= bits <= _ALL:
            raise ValueError(f"{name} must be a {PTES}-bit bitmap")
    if present & swap:
        raise ValueError("a PTE cannot be both present and swap")
    if shared & ~present:
        raise ValueError("shared PTEs must be present")
    bad = [o for o in settings.orders if not KHUGEPAGED_MIN_MTHP_ORDER <= o <= PMD_ORDER]
    if bad:
        raise ValueError(f"orders {sorted(bad)} cannot be collapsed to "
                         f"(anon mTHP orders are {KHUGEPAGED_MIN_MTHP_ORDER}..{PMD_ORDER})")
    if not settings.orders:
        return Outcome(scan_failure="vma_check")
    failure, unmapped = _scan_pmd(present, swap, shared, settings)
    if failure is not None:
        return Outcome(scan_failure=failure)
    run = _Run(algo, present, swap, shared, settings, unmapped)
    _WALKS[algo](run)
    return run.out


def _order_of_size(name: str) -> int | None:
    """'hugepages-64kB' -> 4 (64 KiB / 4 KiB = 2^4 pages); None if not a power of two."""
    kb = int(name[len("hugepages-"):-2])
    pages, rem = divmod(kb * 1024, PAGE)
    if rem or pages & (pages - 1):
        return None
    return pages.bit_length() - 1


def settings_from_sysfs(settings: Mapping[str, str], vma_hugepage: bool = True,
                        uffd: bool = False) -> Settings:
    """Settings from khmon.sysfs.read_settings() output, as recordings store it.

    An order is enabled for the VMA when its hugepages-<N>kB/enabled selects "always", or
    "madvise" and the VMA has MADV_HUGEPAGE (`vma_hugepage`), or "inherit" and the top-level
    enabled would enable it; that is thp_vma_allowable_orders() for khugepaged, minus the
    VMA checks. PMD order reads hugepages-2048kB/enabled where it exists, else the top-level
    file; a kernel without hugepages-* directories (before mTHP, 6.7 and older) can only
    collapse PMDs. Sizes outside the anon mTHP orders (8kB, order 1; PUD sizes) are ignored.
    """

    def on(value: str) -> bool:
        return value == "always" or (value == "madvise" and vma_hugepage)

    top = selected(settings.get("enabled", "never"))
    orders: set[int] = set()
    for key, value in settings.items():
        if not (key.startswith("hugepages-") and key.endswith("kB/enabled")):
            continue
        order = _order_of_size(key.split("/", 1)[0])
        if order is None or not KHUGEPAGED_MIN_MTHP_ORDER <= order <= PMD_ORDER:
            continue
        choice = selected(value)
        if on(top if choice == "inherit" else choice):
            orders.add(order)
    if f"hugepages-{(PAGE << PMD_ORDER) // 1024}kB/enabled" not in settings and on(top):
        orders.add(PMD_ORDER)

    def num(name: str, default: int) -> int:
        return int(settings.get(f"khugepaged/{name}", default))

    return Settings(orders=frozenset(orders), max_ptes_none=num("max_ptes_none", 511),
                    max_ptes_swap=num("max_ptes_swap", 64), max_ptes_shared=num("max_ptes_shared", 256),
                    uffd=uffd)
