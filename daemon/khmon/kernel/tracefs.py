"""Where tracefs is, and which khugepaged tracepoints this kernel has.

khmon traces every event of the huge_memory system that belongs to khugepaged's collapse
path: names starting with mm_khugepaged_ (scan_pmd, scan_file, collapse_file, and
mm_khugepaged_scan from the mTHP collapse series) or mm_collapse_huge_page (the collapse and
its isolate and swapin steps). The set is read from tracefs, never assumed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KhmonError
from .tpformat import EventFormat, parse_format

SYSTEM = "huge_memory"
EVENT_PREFIXES = ("mm_khugepaged_", "mm_collapse_huge_page")
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


# tracefs is mode 0700 root, so its events cannot even be looked at without privileges.
NOT_READABLE_FIX = ("run khmon as root, or with CAP_BPF, CAP_PERFMON and read access to "
                    "tracefs")


def tracefs_root() -> Path:
    """The mounted tracefs; raises KhmonError with the mount command when there is none, and
    saying it needs root when it is there but this process may not read it."""
    for root in TRACEFS_CANDIDATES:
        try:
            if (root / "events").is_dir():
                return root
        except PermissionError as e:
            raise KhmonError(f"cannot read {root}: {e.strerror}: tracefs is readable only by "
                             "root", NOT_READABLE_FIX) from e
    raise KhmonError(
        "tracefs is not mounted",
        "mount it: mount -t tracefs nodev /sys/kernel/tracing (make setup does this)",
    )


def khugepaged_events(root: Path | None = None) -> list[str]:
    """Names of the khugepaged tracepoints this kernel has, sorted."""
    root = root or tracefs_root()
    system = root / "events" / SYSTEM
    try:
        names = sorted(
            e for e in os.listdir(system)
            if e.startswith(EVENT_PREFIXES) and (system / e / "format").is_file()
        )
    except (FileNotFoundError, NotADirectoryError) as e:
        raise KhmonError(
            f"this kernel has no {SYSTEM} tracepoints ({system} is missing)",
            "khmon needs CONFIG_TRANSPARENT_HUGEPAGE=y and tracepoints (CONFIG_TRACEPOINTS)",
        ) from e
    except OSError as e:
        raise KhmonError(f"cannot read {system}: {e.strerror}", NOT_READABLE_FIX) from e
    if not names:
        raise KhmonError(f"no khugepaged events under {system}",
                         "khmon needs a kernel with khugepaged tracepoints (4.x or later)")
    return names


def read_format(name: str, root: Path | None = None) -> EventFormat:
    """Parse events/huge_memory/<name>/format."""
    root = root or tracefs_root()
    path = root / "events" / SYSTEM / name / "format"
    try:
        text = path.read_text()
    except OSError as e:
        raise KhmonError(f"cannot read {path}: {e.strerror}", NOT_READABLE_FIX) from e
    return parse_format(text, SYSTEM)


def read_formats(root: Path | None = None) -> list[EventFormat]:
    """Every khugepaged event's parsed format, in name order."""
    root = root or tracefs_root()
    return [read_format(n, root) for n in khugepaged_events(root)]
