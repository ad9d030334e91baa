"""Typed records of what khugepaged did: processes, PMDs, passes and attempts.

These are the model's own state, mutated only by the stream (khmon.model.correlate and
khmon.model.model); readers get JSON from to_json(), which builds fresh dicts and never
changes a record, so reading a record in the middle of a stream leaves it as it was.

A *pass* is one khugepaged visit to a PMD and the collapse_huge_page calls it made, in call
order. It is open while the visit may still be going on, and closed by the stream itself:
the per-PMD function's exit on that thread, the thread's next attempt elsewhere, a gap in
time checked at each stats part, an eviction, or the end of the stream. Closed passes are
kept deduplicated (an identical pass is counted, not repeated); an open one is shown with
`open: true`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import bitmap
from .infer import Step

# Bitmap sources, best first: a better one is never replaced by a worse one.
SOURCES = ("kernel", "ptwalk", "pagemap", "inferred")
# Distinct closed passes kept per PMD (the rest counted in passes_dropped). A PMD rescanned
# in the same state repeats one pass, so this bounds only PMDs whose state keeps changing.
MAX_PASSES = 16
# Distinct (offset, order, isolate status, result) attempt rows kept per PMD.
MAX_ATTEMPT_ROWS = 256
# Distinct bitmaps remembered per PMD (beyond it, bitmaps_seen saturates).
MAX_BITMAPS = 16


@dataclass(slots=True)
class Cost:
    """Wasted work: collapse_huge_page calls (or rescans), bytes of memory, nanoseconds."""

    attempts: int = 0
    bytes: int = 0
    ns: int = 0

    def add(self, attempts: int, nbytes: int, ns: int) -> None:
        self.attempts += attempts
        self.bytes += nbytes
        self.ns += ns

    def to_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "bytes": self.bytes, "seconds": round(self.ns / 1e9, 9)}


@dataclass(slots=True, eq=False)
class ProcessRecord:
    """One process, as the mm khugepaged works on: keyed by (mm, owner tgid), so a process
    that gets a recycled mm address is a new record, not the heir of a dead one's history."""

    mm: int
    pid: int  # mm->owner's tgid; 0 when unknown
    comm: str
    first_ns: int
    last_ns: int
    label: str = ""  # the per-comm row it counts under (khmon.model.processes.CommLabels)
    scans: int = 0
    collapse_attempts: int = 0
    collapses: int = 0
    uffd_attempts: int = 0  # collapse attempts in userfaultfd-armed VMAs (function probes)
    detail_lost: int = 0  # its records the ring buffer refused (tracepoint events)
    exited_ns: int | None = None
    pmds: dict[int, PmdRecord] = field(default_factory=dict)  # by PMD address
    waste: dict[str, Cost] = field(default_factory=dict)

    def cost(self, reason: str) -> Cost:
        """Its running cost under `reason` (created at the first charge)."""
        got = self.waste.get(reason)
        if got is None:
            got = self.waste[reason] = Cost()
        return got

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid or None,
                               "comm": self.comm if self.pid else "(owner unknown)",
                               "scans": self.scans, "collapse_attempts": self.collapse_attempts,
                               "collapses": self.collapses}
        if self.uffd_attempts:
            out["uffd_attempts"] = self.uffd_attempts
        if self.detail_lost:
            out["detail_lost"] = self.detail_lost
        if self.exited_ns is not None:
            out["exited"] = True
        return out


@dataclass(slots=True)
class AttemptStats:
    """The attempts of one (offset, order, isolate status, result) on a PMD."""

    count: int = 0
    latency_sum: int = 0
    latency_max: int = 0


@dataclass(slots=True)
class PassStats:
    """The times one identical closed pass happened, and its latencies per attempt."""

    count: int
    latency_sums: list[int]


# A closed pass's identity: the bitmap it was made on, its attempts, and the settings epoch
# (khmon.model.model.Settings history) in force when it started.
PassKey = tuple[int | None, tuple[Step, ...], int]


@dataclass(slots=True, eq=False)
class OpenPass:
    """The pass a thread is making now."""

    tid: int
    pmd: PmdRecord
    bitmap: int | None
    steps: list[Step]
    latencies: list[int]
    settings_epoch: int
    last_ns: int  # when its latest attempt ended
    walked: bool = False  # bitmap taken from the scan that made it (ptwalk)

    def follows(self, pmd: PmdRecord, offset: int, order: int) -> bool:
        """Is an attempt at (offset, order) on `pmd` this pass's next step? Both versions of
        the mTHP walk only move forward: a higher offset, or the same offset one order lower."""
        last_offset, last_order = self.steps[-1][:2]
        return pmd is self.pmd and (offset > last_offset
                                    or (offset == last_offset and order < last_order))

    @property
    def key(self) -> PassKey:
        return (self.bitmap, tuple(self.steps), self.settings_epoch)


@dataclass(slots=True, eq=False)
class PmdRecord:
    """What khugepaged saw at one PMD of one process and what it tried there.

    Most PMDs are only ever scanned, so the containers only attempts, passes, bitmaps and
    waste need are made on first use (None until then): a record of a scanned PMD is half
    the size, and half the objects the cyclic collector would walk."""

    process: ProcessRecord
    address: int
    first_ns: int
    last_ns: int
    vm_flags: int | None = None
    verdicts: Counter[str] = field(default_factory=Counter)
    bitmap: int | None = None
    bitmap_source: str | None = None
    bitmaps: list[int] | None = None  # distinct ones, at most MAX_BITMAPS
    ptes: dict[str, int | None] | None = None  # none/swap/zero(/shared) where the source tells
    attempts: dict[tuple[int, int, str | None, str], AttemptStats] | None = None
    attempts_dropped: int = 0
    passes: dict[PassKey, PassStats] | None = None
    passes_dropped: int = 0
    open_pass: OpenPass | None = None
    last_state: tuple[int, str] | None = None  # (bitmap, failing verdict) of the last scan
    filled: list[tuple[int, int, int]] | None = None  # successful collapses (for creep)
    detail_lost: int = 0  # its function-probe records the ring buffer refused
    waste: dict[str, Cost] | None = None

    def cost(self, reason: str) -> Cost:
        """Its running cost under `reason` (created at the first charge)."""
        if self.waste is None:
            self.waste = {}
        got = self.waste.get(reason)
        if got is None:
            got = self.waste[reason] = Cost()
        return got

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.process.mm, self.process.pid, self.address)

    def set_bitmap(self, bits: int, source: str) -> None:
        """Take a bitmap from `source` unless a better source already gave one."""
        if self.bitmap_source is not None and SOURCES.index(self.bitmap_source) < SOURCES.index(source):
            return
        self.bitmap, self.bitmap_source = bits, source
        if self.bitmaps is None:
            self.bitmaps = [bits]
        elif bits not in self.bitmaps and len(self.bitmaps) < MAX_BITMAPS:
            self.bitmaps.append(bits)

    def to_json(self, flag_bits: dict[str, int], inferred: tuple[int, int] | None = None
                ) -> dict[str, Any]:
        """The report's pmds[] entry. `flag_bits`: VMA flag masks by name; `inferred`:
        (present, known) bits khmon.model.infer pinned, for a PMD no source read."""
        flags = self.vm_flags
        uffd_masks = [m for name, m in flag_bits.items() if name.startswith("uffd")]
        armed = (bool(any(flags & m for m in uffd_masks)) if flags is not None and uffd_masks
                 else None)
        bits, source, known = self.bitmap, self.bitmap_source, None
        if bits is None and inferred is not None:
            bits, source, known = inferred[0], "inferred", inferred[1]
        passes = [_pass_json(bm, steps, epoch, ps.count, ps.latency_sums)
                  for (bm, steps, epoch), ps in (self.passes or {}).items()]
        op = self.open_pass
        if op is not None:
            passes.append({**_pass_json(op.bitmap, tuple(op.steps), op.settings_epoch, 1,
                                        op.latencies), "open": True})
        return {
            "pid": self.process.pid or None,
            "comm": self.process.comm,
            "mm": hex(self.process.mm),
            "address": hex(self.address),
            "vma_flags": flags,
            "vma_flag_names": (sorted(n for n, m in flag_bits.items() if flags & m)
                               if flags is not None else None),
            "uffd": armed,
            "scans": sum(self.verdicts.values()),
            "verdict": self.verdicts.most_common(1)[0][0] if self.verdicts else None,
            "verdicts": dict(self.verdicts.most_common()),
            "bitmap": bitmap.to_hex(bits) if bits is not None else None,
            "bitmap_source": source,
            "bitmap_known": bitmap.to_hex(known) if known is not None else None,
            "present": bitmap.count(bits) if bits is not None else None,
            "bitmaps_seen": len(self.bitmaps or ()),
            "ptes": dict(self.ptes) if self.ptes is not None else None,
            "attempts": [{"offset": off, "order": order, "isolate_status": iso, "status": st,
                          "count": a.count, "latency_ns": a.latency_sum // a.count,
                          "latency_ns_max": a.latency_max}
                         for (off, order, iso, st), a in (self.attempts or {}).items()],
            "attempts_dropped": self.attempts_dropped,
            "passes": passes,
            "passes_dropped": self.passes_dropped,
            "detail_lost": self.detail_lost,
        }


def _pass_json(bits: int | None, steps: tuple[Step, ...], epoch: int, count: int,
               latency_sums: list[int]) -> dict[str, Any]:
    return {"count": count, "bitmap": bitmap.to_hex(bits) if bits is not None else None,
            "settings_epoch": epoch,
            "attempts": [{"offset": off, "order": order, "status": st, "swapped_in": swapped,
                          "latency_ns": ns // count}
                         for (off, order, st, swapped), ns in zip(steps, latency_sums, strict=True)]}

