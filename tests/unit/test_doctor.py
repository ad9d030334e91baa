"""doctor's tier summary: the one bitmap source khmon will use, for what a kernel allows."""

from __future__ import annotations

import pytest

from khmon.doctor import _tier_summary


@pytest.mark.parametrize("tiers, source", [
    ({"tracepoints": True, "kfunc": True, "mthp_present_ptes": True, "ptwalk": True}, "kernel"),
    ({"tracepoints": True, "kfunc": True, "ptwalk": True}, "ptwalk"),  # 6.1
    ({"tracepoints": True}, "pagemap"),  # the host: tracepoints only
    ({"tracepoints": True, "kprobe": True}, "inferred"),  # no bitmap in BTF, no direct map walk
])
def test_the_bitmap_source_is_the_best_the_kernel_allows(tiers: dict, source: str) -> None:
    (line,) = [c for c in _tier_summary(tiers) if c.item == "3 bitmap sources"]
    assert line.detail.startswith(f"khmon uses {source}")
