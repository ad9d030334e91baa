"""Is the recorder of a recording still running? Then a missing end part means "still being
written", not "the recorder was killed".

The header names the recorder (recorder_pid), the host and the CLOCK_MONOTONIC time it
started (start_mono_ns). The pid counts only on the same host, in the same boot (the start
time is not in the future), if the process with that pid started before the recording did
(a pid reused later belongs to another process) and if it is a `khmon record`.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

SLACK_NS = 1_000_000_000  # /proc's start time is in clock ticks, and suspend shifts clocks


def _started_mono_ns(pid: int, proc: Path) -> int | None:
    """When the process started, on CLOCK_MONOTONIC (its /proc start time is boot time)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None
    suspended = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.clock_gettime_ns(
        time.CLOCK_MONOTONIC)
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK") - suspended


def running_recorder(header: dict, proc: Path = Path("/proc")) -> int | None:
    """The pid of the header's recorder if it is still running here, else None."""
    pid, start = header.get("recorder_pid"), header.get("start_mono_ns")
    if not pid or header.get("host") != platform.node():
        return None
    if start > time.clock_gettime_ns(time.CLOCK_MONOTONIC):
        return None  # another boot
    started = _started_mono_ns(pid, proc)
    if started is None or started > start + SLACK_NS:
        return None
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"record" not in argv or not any(a.endswith(b"khmon") for a in argv):
        return None
    return pid
