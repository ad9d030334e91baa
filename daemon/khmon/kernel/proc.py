"""/proc/PID: is a process still the one khmon saw?

A pid alone is recycled; its start time (field 22 of /proc/PID/stat, in clock ticks since
boot) is not, so (pid, start time) names one process for as long as the machine is up.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int, root: Path) -> list[bytes] | None:
    """/proc/PID/stat from field 3 on, or None when there is no such process now."""
    try:
        stat = (root / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
    return stat[stat.rfind(b")") + 2:].split()


def start_time(pid: int, root: Path = PROC) -> int | None:
    """The process's start time, or None when there is no such process now."""
    rest = _stat(pid, root)
    try:
        return int(rest[19]) if rest is not None else None  # field 22; rest starts at field 3
    except (IndexError, ValueError):
        return None


def cpu_seconds(pid: int, root: Path = PROC) -> float | None:
    """User plus system CPU time the process (or kernel thread) has used, in seconds
    (fields 14 and 15, in clock ticks); None when there is no such process now."""
    rest = _stat(pid, root)
    try:
        return (int(rest[11]) + int(rest[12])) / TICKS if rest is not None else None
    except (IndexError, ValueError):
        return None
