"""The unit of an event stream: a part, as live capture yields it and a recording stores it.

Kinds:
  H  header: the kernel, every traced event's layout, BTF offsets, settings and counters at
     the start, options (khmon.capture.live.LiveCapture.header).
  R  records of one event: its index and the concatenated fixed-size records (stream.layout).
  S  stats, once a second: the in-kernel counters (seen, lost, missed, and the exact collapse
     counts), the kernel's THP counters, and what changed since the last stats part (settings,
     processes that exited, PMDs whose detail records were lost).
  E  end: the final stats, after the probes were detached and drained.
  P  pages: one PMD's PTEs as user space read them from /proc/PID/pagemap (the `pagemap`
     bitmap source on tracepoint-only kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEADER, RECORDS, STATS, END, PAGES = "H", "R", "S", "E", "P"


@dataclass
class Part:
    """One part of the stream: `meta` for H, S, E and P; `event` and `data` for R."""

    kind: str
    meta: dict = field(default_factory=dict)
    event: int = -1
    data: bytes = b""
