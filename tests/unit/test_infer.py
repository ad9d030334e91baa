"""infer: what a pass's attempts pin of its PMD's bitmap, on hand-worked passes, and never
a bit that contradicts the bitmap the attempts were made on (the simulator's, at random)."""

from __future__ import annotations

import random

from test_simulate import ALL, ptes

from khmon.geometry import PMD_ORDER, PTES
from khmon.model.infer import Known, from_pass, merge
from khmon.model.khugepaged import Settings, simulate

PMD_ONLY = frozenset({PMD_ORDER})
MTHP = frozenset(range(2, PMD_ORDER + 1))


def test_pmd_collapse_under_max_ptes_none_0_pins_every_pte() -> None:
    # 6.1's one try, (0,9), succeeded with max_ptes_none 0 and no swap-in: 512 present.
    s = Settings(PMD_ONLY, max_ptes_none=0)
    assert from_pass([(0, 9, "succeeded", False)], s) == Known(present=ALL)
    # With a swap-in during the try, the swapped PTEs were not present when scanned.
    assert from_pass([(0, 9, "succeeded", True)], s) == Known()
    # Under max_ptes_none 511 a PMD collapse needs one present PTE: nothing pinned.
    assert from_pass([(0, 9, "succeeded", False)], Settings(PMD_ONLY)) == Known()


def test_mthp_first_half_under_max_ptes_none_0() -> None:
    # 7.2, orders 2..9, max_ptes_none 0, PTEs 0..255 present: the walk skips (0,9) (not
    # full), tries (0,8), which succeeds; from 256 on no range is full, so it tries nothing.
    # The passed pre-check pins 0..255; failed ones under max_ptes_none 0 pin nothing.
    s = Settings(MTHP, max_ptes_none=0)
    assert [(a.offset, a.order) for a in simulate("v19", ptes((0, 256)), s).attempts] == [(0, 8)]
    assert from_pass([(0, 8, "succeeded", False)], s) == Known(present=ptes((0, 256)))


def test_failed_prechecks_under_max_ptes_none_511_pin_clear_ranges() -> None:
    # Orders 2..8 (no PMD order), max_ptes_none 511, PTE 0 alone present: (0,8) needs one
    # present PTE and succeeds; every range from 256 on fails its pre-check down to order 2,
    # so PTEs 256..511 are all clear. PTEs 1..255 stay unknown (inside a collapsed range).
    s = Settings(frozenset(range(2, 9)), max_ptes_none=511)
    assert [(a.offset, a.order) for a in simulate("v19", ptes(0), s).attempts] == [(0, 8)]
    assert from_pass([(0, 8, "succeeded", False)], s) == Known(clear=ptes((256, 512)))


def test_attempts_the_walk_cannot_make_give_nothing() -> None:
    s = Settings(MTHP, max_ptes_none=0)
    assert from_pass([(0, 8, "succeeded", False), (0, 8, "succeeded", False)], s) is None
    assert from_pass([(3, 2, "succeeded", False)], s) is None  # not an aligned offset
    assert from_pass([], s) is None  # the scan refused: nothing to replay


def test_merge_drops_bits_passes_disagree_on() -> None:
    a = Known(present=ptes((0, 8)))
    b = Known(present=ptes((0, 4)), clear=ptes((4, 12)))
    assert merge([a, None, b]) == Known(present=ptes((0, 4)), clear=ptes((8, 12)))
    assert merge([None]) is None


def test_never_contradicts_the_bitmap() -> None:
    # Random blocky PMDs, settings and uffd: the kernel (here the simulator) makes its pass,
    # and whatever the inference pins from that pass's attempts must hold in the bitmap.
    rng = random.Random(4)
    pinned = 0
    for _ in range(400):
        present = 0
        for blk in range(PTES // 16):
            r = rng.getrandbits(16)
            present |= rng.choice([0xFFFF, 0, r | rng.getrandbits(16), r & rng.getrandbits(16)]
                                  ) << (16 * blk)
        present |= ptes(rng.randrange(PTES))
        mpn = rng.choice([0, 511])
        swap = (~present & ALL & rng.getrandbits(PTES) & rng.getrandbits(PTES)
                if rng.random() < 0.3 else 0)
        orders = frozenset(o for o in range(2, 10) if rng.random() < 0.6) or PMD_ONLY
        s = Settings(orders, max_ptes_none=mpn, uffd=rng.random() < 0.2, max_ptes_swap=511)
        out = simulate("v19", present, s, swap=swap)
        steps = [(a.offset, a.order, "succeeded" if a.succeeded else a.reason, bool(swap))
                 for a in out.attempts]
        k = from_pass(steps, s)
        if not steps:
            assert k is None
            continue
        assert k is not None, (hex(present), s, steps)
        assert k.present & ~present == 0 and k.clear & present == 0, (hex(present), s)
        pinned += k.mask.bit_count()
    assert pinned > 10_000  # and it does pin bits: the check above is not vacuous
