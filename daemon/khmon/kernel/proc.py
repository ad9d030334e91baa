"""/proc/PID: is a process still the one khmon saw?

A pid alone is recycled; its start time (field 22 of /proc/PID/stat, in clock ticks since
boot) is not, so (pid, start time) names one process for as long as the machine is up.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def start_time(pid: int, root: Path = PROC) -> int | None:
    """The process's start time, or None when there is no such process now."""
    try:
        stat = (root / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may hold spaces or ')': split after the last ')'.
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[19])  # field 22; rest starts at field 3
    except (IndexError, ValueError):
        return None
