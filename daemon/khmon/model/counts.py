"""Counts per event, status, order and VMA flags, and the exact in-kernel collapse counts.

EventCounts counts the records that reached user space, weighted by each record's `count` (a
deduplicated scan stands for many events), by (status, order, VMA flags): a key set bounded
by the kernel's status table, so it does not grow with time or processes. The per-process
share goes to the process table (bounded by its own cap).

ExactCounts holds what khmon's BPF code counts in a map for every non-deduplicated event
with a status (collapse attempts above all): (order, status, userfaultfd-armed or not) ->
calls, summed and maximal duration, plus a log2 histogram of durations per (order, outcome).
Those counts do not depend on records reaching Python, so they stay equal to the kernel's
own counters when the ring buffer loses detail. They arrive cumulatively in every stats
part; the report takes, per cell, the larger of the record count and the exact count, which
is the exact count by the end of a stream and never goes down in between.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..stream.decode import Batch
from ..stream.layout import EventLayout
from .records import ProcessRecord

# ExactCounts' userfaultfd split: the attempt's VMA was armed, was not, or khmon cannot tell
# (no per-PMD function probe around the call, or the flag bits are unknown on this kernel).
UFFD_NO, UFFD_YES, UFFD_UNKNOWN = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Cell:
    """One (status, order, VMA flags) count of an event."""

    status: str | None
    order: int | None
    vm_flags: int | None
    count: int
    dur_sum: int  # ns (function probes with an exit only)
    dur_max: int


class EventCounts:
    """Weighted counts of one event's records."""

    def __init__(self, lay: EventLayout) -> None:
        self.lay = lay
        self.status = lay.fmt.status_field
        names = lay.field_names
        self.has_order = "order" in names
        self.has_flags = "vm_flags" in names
        self.has_dur = "duration_ns" in names
        self.has_mm = lay.mm_field is not None
        key = [self.status] if self.status else []
        key += ["order"] if self.has_order else []
        key += ["vm_flags"] if self.has_flags else []
        owner = [lay.mm_field.name, "owner_tgid", "owner_comm"] if self.has_mm else []
        wanted = (*key, "count", *(["duration_ns"] if self.has_dur else []), *owner)
        # Unpacked in record order (no reordering per batch); positions of each part in it.
        self.fields = lay.record_order(wanted)
        at = {name: self.fields.index(name) for name in wanted}
        self._key_at = tuple(at[n] for n in key)
        self._count_at = at["count"]
        self._dur_at = at.get("duration_ns")
        self._owner_at = tuple(at[n] for n in owner)
        self.counts: Counter[tuple] = Counter()
        self.dur_sum: Counter[tuple] = Counter()
        self.dur_max: dict[tuple, int] = {}
        self.records = 0

    def add(self, batch: Batch,
            owner: Callable[[int, int, bytes], ProcessRecord | None] | None = None,
            on_owner: Callable[[ProcessRecord, tuple, int], None] | None = None) -> None:
        """Count a batch. `owner(mm, tgid, comm)` gives the process a record belongs to;
        `on_owner(process, key, n)` is told each share (key = (status, order, flags))."""
        key_at, count_at, dur_at = self._key_at, self._count_at, self._dur_at
        owner_at = self._owner_at if owner is not None else ()
        counts, dur_sum, dur_max = self.counts, self.dur_sum, self.dur_max
        for rec, n in batch.distinct(self.fields).items():
            key = tuple(rec[i] for i in key_at)
            weight = rec[count_at] * n
            counts[key] += weight
            if dur_at is not None:
                dur = rec[dur_at]
                dur_sum[key] += dur * n
                if dur > dur_max.get(key, -1):
                    dur_max[key] = dur
            if owner_at:
                mm, tgid, raw_comm = (rec[i] for i in owner_at)
                p = owner(mm, tgid, raw_comm)
                if on_owner is not None:
                    on_owner(p, key, weight)
        self.records += batch.n_records

    def name(self, key: tuple) -> tuple[str | None, int | None, int | None]:
        """A counts key as (status name, order, VMA flags)."""
        rest = list(key)
        status = self.lay.fmt.symbol(self.status, rest.pop(0)) if self.status else None
        order = rest.pop(0) if self.has_order else None
        flags = rest.pop(0) if self.has_flags else None
        return status, order, flags

    def cells(self) -> list[Cell]:
        out = []
        for key, n in self.counts.items():
            status, order, flags = self.name(key)
            out.append(Cell(status, order, flags, n, self.dur_sum.get(key, 0),
                            self.dur_max.get(key, 0)))
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class ExactCell:
    """One cell of the in-kernel collapse counts (see bpf/khmon.bpf.c: khmon_exact)."""

    order: int | None
    status: str
    uffd: int  # UFFD_NO, UFFD_YES or UFFD_UNKNOWN
    count: int
    dur_sum: int
    dur_max: int


class ExactCounts:
    """The latest cumulative in-kernel counts, by event name (from stats parts)."""

    def __init__(self, layouts: list[EventLayout]) -> None:
        self._lays = {lay.name: lay for lay in layouts}
        self.cells: dict[str, list[ExactCell]] = {}
        self.hist: dict[str, list[tuple[int | None, bool, int, int]]] = {}
        self.present = False  # the stream carries exact counts (recordings before them do not)

    def update(self, meta: dict[str, Any]) -> None:
        """Take a stats part's `exact` and `hist` (absent in recordings before they existed)."""
        self.present = self.present or "exact" in meta
        for name, rows in (meta.get("exact") or {}).items():
            lay = self._lays.get(name)
            if lay is None or not lay.fmt.status_field:
                continue
            has_order = "order" in lay.field_names
            self.cells[name] = [
                ExactCell(order if has_order else None,
                          lay.fmt.symbol(lay.fmt.status_field, status), uffd, n, ns, mx)
                for order, status, uffd, n, ns, mx in rows]
        for name, rows in (meta.get("hist") or {}).items():
            lay = self._lays.get(name)
            if lay is None:
                continue
            has_order = "order" in lay.field_names
            self.hist[name] = [(order if has_order else None, bool(ok), bucket, n)
                               for order, ok, bucket, n in rows]

    def by_status_order(self, name: str) -> Counter[tuple[str, int | None]]:
        out: Counter[tuple[str, int | None]] = Counter()
        for c in self.cells.get(name, ()):
            out[(c.status, c.order)] += c.count
        return out
