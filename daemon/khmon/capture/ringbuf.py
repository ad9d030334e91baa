"""Turn the kernel's deduplication records back into ordinary counted records.

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
