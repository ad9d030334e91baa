"""THP settings that live tests ask for, in khmon.kernel.sysfs.override's form."""

from __future__ import annotations

from collections.abc import Container

from khmon.kernel import sysfs


def mthp_knobs(orders: Container[int]) -> dict[str, str]:
    """hugepages-<N>kB/enabled: inherit for the given orders, never for the others (only the
    sizes this kernel has; 8kB, order 1, is not a collapse order and may be read-only)."""
    knobs = {}
    for d in sorted(sysfs.THP.glob("hugepages-*kB")):
        order = (int(d.name[len("hugepages-"):-2]) // 4).bit_length() - 1
        if order >= 2 and (d / "enabled").exists():
            knobs[f"{d.name}/enabled"] = "inherit" if order in orders else "never"
    return knobs
