"""What comes out of the kernel, made into stream data: plain Python, tested without bcc.

The loader (khmon.capture.loader) hands over raw bytes: ring-buffer records, the dedup
tables' slots after detaching, and the exact-count map. This module turns them into the
stream's records and counts:
  - Resolver: the kernel's dedup install/flush records back into ordinary counted records;
  - group_runs: records in ring-buffer order as runs of one event each;
  - slot_repeats: repeats still counted in the dedup slots, as counted records;
  - exact_rows: the `exact` map's keys and per-CPU values as the stats part's rows.

Deduplication:

khmon's BPF code sends the first occurrence of a scan payload in a per-CPU dedup slot in
full (an install record: `flags` = DEDUP_INSTALL | slot) and later only bare headers that
count its repeats (flush records: `flags` = DEDUP_FLUSH | slot, `count` = repeats). The
Resolver keeps the last install record of every (event, CPU, slot) and answers each flush
with a copy of it carrying the flush's timestamp and count, so everything downstream
(recordings, reports) sees one record format with a `count`. Plain Python: no bcc.

Ring-buffer records from one CPU arrive in the order its programs wrote them, so a flush
always finds the install it belongs to. A flush that does not (its install was refused by a
full ring buffer, which the BPF code prevents by not installing) is counted in `orphaned`
and reported as lost rather than dropped silently.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable

from ..stream.layout import (
    CPU_OFFSET,
    DEDUP_FLUSH,
    DEDUP_INSTALL,
    DEDUP_SLOT_MASK,
    EVENT_INDEX_OFFSET,
    FLAGS_OFFSET,
    HEADER_STRUCT,
)

# ts (u64) and count (u32) open the header; a flush rewrites both in the install's copy.
_TS_COUNT = struct.Struct("<" + HEADER_STRUCT.format[1:3])
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_NO_FLAGS = bytes(4)


class Resolver:
    """Install and flush records in, counted records out."""

    def __init__(self) -> None:
        self._installed: dict[tuple[int, int, int], bytes] = {}
        self.orphaned: Counter[int] = Counter()  # per event index: repeats with no install

    def resolve(self, rec: bytes) -> bytes | None:
        """The record to pass on for `rec` as it came from the ring buffer, or None."""
        flags = _U32.unpack_from(rec, FLAGS_OFFSET)[0]
        if not flags & (DEDUP_INSTALL | DEDUP_FLUSH):
            return rec
        key = (_U16.unpack_from(rec, EVENT_INDEX_OFFSET)[0], _U16.unpack_from(rec, CPU_OFFSET)[0],
               flags & DEDUP_SLOT_MASK)
        if flags & DEDUP_INSTALL:
            rec = rec[:FLAGS_OFFSET] + _NO_FLAGS + rec[FLAGS_OFFSET + 4:]
            self._installed[key] = rec
            return rec
        ts, count = _TS_COUNT.unpack_from(rec, 0)
        return self.repeats(key, ts, count)

    def repeats(self, key: tuple[int, int, int], ts: int, count: int) -> bytes | None:
        """A record standing for `count` repeats of what is installed at key (event, CPU,
        slot), stamped `ts`; None, counted in `orphaned`, when nothing is."""
        base = self._installed.get(key)
        if base is None:
            self.orphaned[key[0]] += count
            return None
        out = bytearray(base)
        _TS_COUNT.pack_into(out, 0, ts, count)
        return bytes(out)

    def forget(self) -> None:
        """The kernel's tables were emptied (between windows): no install stands any more."""
        self._installed.clear()


def group_runs(raw: list[bytes], resolver: Resolver) -> list[tuple[int, bytes]]:
    """Records as they came from the ring buffer -> (event index, records) runs in arrival
    order. Consecutive records of an event are joined (decoded in one pass), but never
    reordered across events: a thread's collapse, scan and isolate records must reach the
    correlator in the order the thread made them (grouping a whole poll by event once closed
    a collapse pass before its scan record could give it its bitmap)."""
    runs: list[tuple[int, list[bytes]]] = []
    for rec in raw:
        got = resolver.resolve(rec)
        if got is None:
            continue
        ev = _U16.unpack_from(got, EVENT_INDEX_OFFSET)[0]
        if runs and runs[-1][0] == ev:
            runs[-1][1].append(got)
        else:
            runs.append((ev, [got]))
    return [(ev, b"".join(recs)) for ev, recs in runs]


# struct khmon_slot (bpf/khmon.bpf.c): the payload's hash, then epoch | excluded | count.
SLOT_EXCLUDED = 1 << 32
SLOT_COUNT_MASK = (1 << 32) - 1


def slot_repeats(event: int, slots: Iterable[tuple[int, list[tuple[int, int]]]], sets_per_cpu: int,
                 resolver: Resolver, now_ns: int) -> tuple[list[bytes], int, list[int]]:
    """After detaching: the repeats still counted in one hot event's dedup table.

    `slots`: (array index, [(fp, ec) per way]) of the table, every CPU's sets CPU after CPU.
    Returns the counted records standing for them, how many repeats they hold, and the array
    indices in use (to be emptied for a later window)."""
    out: list[bytes] = []
    left = 0
    used = []
    for at, ways in slots:
        cpu, set_index = divmod(at, sets_per_cpu)
        busy = False
        for way, (fp, ec) in enumerate(ways):
            if not fp:
                continue
            busy = True
            n = ec & SLOT_COUNT_MASK
            if n and not ec & SLOT_EXCLUDED:
                rec = resolver.repeats((event, cpu, set_index * len(ways) + way), now_ns, n)
                if rec is not None:
                    out.append(rec)
                    left += n
        if busy:
            used.append(at)
    return out, left, sorted(used)


# The `exact` map's key (bpf/khmon.bpf.c): a histogram bit, the event, the order, then either
# status and uffd, or success and the log2 bucket.
X_HIST = 1 << 30


def exact_rows(items: Iterable[tuple[int, int, int, int]], names: dict[int, str]
               ) -> tuple[dict[str, list[list[int]]], dict[str, list[list[int]]]]:
    """(key, n, ns, max) summed over CPUs -> the stats part's `exact` and `hist`:
    exact[event] = [[order, status, uffd, n, ns, max_ns]], hist[event] = [[order, ok,
    log2 bucket, n]], sorted, for the events in `names` (event index -> name)."""
    exact: dict[str, list[list[int]]] = {}
    hist: dict[str, list[list[int]]] = {}
    for key, n, ns, mx in items:
        name = names.get(key >> 22 & 0xFF)
        if name is None or not n:
            continue
        order = key >> 17 & 31
        if key & X_HIST:
            hist.setdefault(name, []).append([order, key >> 16 & 1, key & 63, n])
        else:
            exact.setdefault(name, []).append([order, key >> 9 & 0xFF, key >> 7 & 3, n, ns, mx])
    for rows in (*exact.values(), *hist.values()):
        rows.sort()
    return exact, hist
