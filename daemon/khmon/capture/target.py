"""The process `-p PID` names: said when it is not there, so a filter that can match nothing
does not record nothing in silence.

The filter runs in the kernel and keeps events whose mm belongs to PID or whose collapsing
thread is in PID (bpf/khmon.bpf.c), so it needs a process id (a thread group id): a pid
with no process, or the id of a thread that is not its group's leader, matches nothing.
"""

from __future__ import annotations

from pathlib import Path


def _tgid(pid: int, proc: Path) -> int | None:
    """The thread group of `pid`; None when no task has that id."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Target:
    """What -p PID found at the start of a capture, and whether its process ever showed."""

    def __init__(self, pid: int, proc: Path = Path("/proc")) -> None:
        self.pid = pid
        self.proc = proc
        self.tgid = _tgid(pid, proc)

    def at_start(self) -> str | None:
        """A warning when PID is not a running process now."""
        if self.tgid is None:
            return (f"no process {self.pid} is running: -p {self.pid} records only events of "
                    "a process with that id, should one start")
        if self.tgid != self.pid:
            return (f"{self.pid} is a thread of process {self.tgid}, and -p takes a process "
                    f"id: nothing will match (use -p {self.tgid})")
        return None

    def at_end(self, result: dict) -> str | None:
        """A warning when PID was not running at the start and never showed up since."""
        if self.tgid is not None or _tgid(self.pid, self.proc) is not None:
            return None
        if any(p["pid"] == self.pid for p in result["processes"]):
            return None
        return (f"process {self.pid} never appeared: nothing was recorded for -p {self.pid} "
                "(isolate events, which name no process, pass any filter)")
