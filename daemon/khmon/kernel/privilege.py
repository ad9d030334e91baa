"""Whether this process may run a live capture, asked before anything privileged is read.

A bcc capture needs CAP_BPF and CAP_PERFMON (to load programs, attach them to tracepoints
and map the ring buffer; CAP_SYS_ADMIN implies both) and read access to tracefs, which is
0700 root: the event formats khmon builds its programs from live there. Root normally has
all of it; a root in a container without CAP_BPF does not, and a user given the capabilities
may. Checking first turns "not root" into one line naming what is missing, instead of the
first PermissionError on /sys/kernel/tracing/events.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KhmonError
from .tracefs import TRACEFS_CANDIDATES

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
NEEDED = "live capture needs root, or CAP_BPF, CAP_PERFMON and read access to tracefs"


def effective_caps(status: Path = Path("/proc/self/status")) -> int:
    """The CapEff mask of this process (0 when /proc does not say)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _has(caps: int, cap: int) -> bool:
    return bool(caps >> cap & 1)


def _tracefs_denied() -> Path | None:
    """The mounted tracefs this process may not read (None: readable, or not mounted, which
    tracefs.tracefs_root() reports on its own)."""
    for root in TRACEFS_CANDIDATES:
        try:
            os.listdir(root / "events")
            return None
        except PermissionError:
            return root
        except OSError:
            continue
    return None


def capture_refusal(caps: int | None = None) -> str | None:
    """What this process lacks for a live capture, as one sentence; None when it has all."""
    caps = effective_caps() if caps is None else caps
    missing = []
    if not (_has(caps, CAP_SYS_ADMIN) or (_has(caps, CAP_BPF) and _has(caps, CAP_PERFMON))):
        missing.append("CAP_BPF and CAP_PERFMON")
    denied = _tracefs_denied()
    if denied is not None:
        missing.append(f"read access to {denied}")
    if not missing:
        return None
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    return f"{NEEDED}: this process ({who}) lacks {' and '.join(missing)}"


def require_capture() -> None:
    """Raise KhmonError (exit 1) unless this process may run a live capture."""
    why = capture_refusal()
    if why is not None:
        raise KhmonError(why, "run khmon with sudo")
