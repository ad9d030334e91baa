"""One record per PMD: what khugepaged saw there and what it tried.

The correlator turns the function-probe events of a stream into PMD records:
  fn_pmd_scan  (per-PMD function, exit)  mm, PMD address, VMA flags, verdict and, before the
               mTHP series, the bitmap of a BPF walk of the PTE table at entry (source
               `ptwalk`); counted, since the kernel deduplicates rescans that find the same
               PMD in the same state;
  fn_collapse  (collapse_huge_page exit) one attempt: start address, order, result, duration,
               and on the mTHP series the scan's bitmap of present PTEs (source `kernel`);
  mm_collapse_huge_page_isolate          the isolate verdict of the attempt that encloses it
               on the same thread (this tracepoint carries no mm and no address);
  mm_collapse_huge_page_swapin           fired inside an attempt that swapped pages in (the
               PTEs it made present were not present when the scan ran).
Without function probes (a tracepoint-only kernel) the capture reads each scanned PMD's PTEs
from pagemap (khmon.pagemap.PagemapSampler, source `pagemap`): its pages parts name the PMD
around the page a mm_khugepaged_scan_pmd event reported, and that event's scans and verdicts
are counted for the PMD.
Attempts are keyed by (mm, PMD) rather than by position in the stream: a rescan whose picture
is unchanged sends no record, but each of its attempts does. Plain Python over decoded
records, so it runs the same on live events, recordings and tests.

Attempts are also grouped into passes: one khugepaged visit to a PMD and the collapse_huge_page
calls it made, in order. collapse_huge_page records are never deduplicated, so a thread's
attempts arrive in call order, and within one pass both versions of the mTHP walk move
forward: a later attempt starts at a higher offset, or at the same offset one order lower.
An attempt on another PMD, or one that does not move forward, starts a new pass. A pass is
kept with the bitmap it was made on (the scan's, at the first attempt), so the simulator and
the waste detectors can replay it exactly; identical passes are counted, not repeated.

Bitmaps are 64 bytes, bit k of byte j is PTE 8j+k (the kernel's unsigned long[8] on x86-64,
dumped as bytes). In collapse_control.mthp_present_ptes a bit is set for a PTE that maps a
page: none, zero-page and swap PTEs leave it clear. A PMD no source could read gets the
`inferred` bitmap, what its passes' attempts pin (khmon.infer): `bitmap` holds the bits known
set and `bitmap_known` the mask of bits known at all; the rest are unknown.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from ..capture import plan as funcprobes
from ..geometry import BITMAP_BYTES, PAGE_SHIFT, PMD_MASK, PMD_ORDER
from ..stream.layout import EventLayout
from . import infer
from .khugepaged import settings_from_sysfs

ISOLATE = "mm_collapse_huge_page_isolate"
SWAPIN = "mm_collapse_huge_page_swapin"
SCAN_PMD = "mm_khugepaged_scan_pmd"
# Bitmap sources, best first: a better one is never replaced by a worse one.
SOURCES = ("kernel", "ptwalk", "pagemap", "inferred")


@dataclass
class _Attempt:
    count: int = 0
    latency_sum: int = 0
    latency_max: int = 0


@dataclass
class _Pass:
    count: int = 0
    latency_sums: list[int] = field(default_factory=list)  # per attempt of the pass


@dataclass
class _Pmd:
    mm: int
    address: int
    pid: int = 0
    comm: str = ""
    vm_flags: int | None = None
    verdicts: Counter[str] = field(default_factory=Counter)
    bitmap: bytes | None = None
    bitmap_source: str | None = None
    bitmaps_seen: set[bytes] = field(default_factory=set)
    # none, swap and zero-page PTEs where the source tells them apart (ptwalk)
    ptes: dict[str, int] | None = None
    # (offset, order, isolate status, result) -> counts and latency, in first-seen order
    attempts: dict[tuple[int, int, str | None, str], _Attempt] = field(default_factory=dict)
    # (bitmap, ((offset, order, result, swapped in), ...)) -> that pass's count and
    # latencies, in first-seen order
    passes: dict[tuple[bytes | None, tuple[infer.Step, ...]], _Pass] = field(
        default_factory=dict)
    passes_dropped: int = 0


# Distinct passes kept per PMD; later ones are counted in passes_dropped. A PMD rescanned in the
# same state repeats one pass (same bitmap, same attempts), so this bounds only changing PMDs.
MAX_PASSES = 16


@dataclass
class _OpenPass:
    """The pass a thread is making: its PMD, bitmap, and attempts so far."""

    pmd: _Pmd
    bitmap: bytes | None
    attempts: list[infer.Step]
    latencies: list[int]
    walked: bool = False  # bitmap taken from the scan that made this pass (ptwalk)

    def follows(self, pmd: _Pmd, offset: int, order: int) -> bool:
        """Is an attempt at (offset, order) on `pmd` the next step of this pass?"""
        last_offset, last_order = self.attempts[-1][:2]
        return pmd is self.pmd and (offset > last_offset
                                    or (offset == last_offset and order < last_order))

    def close(self) -> None:
        key = (self.bitmap, tuple(self.attempts))
        passes = self.pmd.passes
        if key not in passes and len(passes) >= MAX_PASSES:
            self.pmd.passes_dropped += 1
            return
        kept = passes.setdefault(key, _Pass(latency_sums=[0] * len(self.attempts)))
        kept.count += 1
        kept.latency_sums = [a + b for a, b in zip(kept.latency_sums, self.latencies, strict=True)]


class PmdCorrelator:
    """Feed it record batches (event index, bytes); records() gives the PMD records."""

    def __init__(self, layouts: list[EventLayout], vma_flag_bits: dict[str, int],
                 pagemap_ref: str | None = None,
                 settings: dict[str, str] | None = None) -> None:
        """`pagemap_ref`: the mm_khugepaged_scan_pmd field that names the scanned page, when
        the capture sampled pagemap (the recording's header says which). `settings`: the
        THP and khugepaged knobs at the start (khmon.sysfs.read_settings), which the
        `inferred` bitmaps are worked out under."""
        by_name = {lay.name: lay for lay in layouts}
        self.scan = by_name.get(funcprobes.PMD_SCAN)
        self.collapse = by_name.get(funcprobes.COLLAPSE)
        self.isolate = by_name.get(ISOLATE)
        self.swapin = by_name.get(SWAPIN)
        self.settings = settings or {}
        self.tp_scan = by_name.get(SCAN_PMD) if pagemap_ref and self.scan is None else None
        self.pagemap_ref = pagemap_ref
        # tracepoint scans by (mm, page, verdict), and which PMD a (mm, page) is in
        self._tp_scans: Counter[tuple[int, int, str]] = Counter()
        self._page_pmd: dict[tuple[int, int], tuple[int, int]] = {}
        self.vma_flag_bits = vma_flag_bits
        self.pmds: dict[tuple[int, int], _Pmd] = {}
        # per thread, in time order: (ts, isolate status) not yet claimed by an attempt
        self._isolates: dict[int, deque[tuple[int, str]]] = defaultdict(deque)
        # per thread, in time order: swap-in events not yet claimed by an attempt
        self._swapins: dict[int, deque[int]] = defaultdict(deque)
        # per thread: the pass it is making
        self._open: dict[int, _OpenPass] = {}

    @property
    def active(self) -> bool:
        """PMD records need PMD addresses: function probes, or pagemap samples."""
        return self.scan is not None or self.collapse is not None or self.tp_scan is not None

    def add(self, event: int, data: bytes) -> None:
        for lay, handler in ((self.scan, self._scan), (self.collapse, self._collapse),
                             (self.isolate, self._isolate), (self.swapin, self._swapin),
                             (self.tp_scan, self._tp)):
            if lay is not None and lay.index == event:
                for rec in lay.struct.iter_unpack(data):
                    handler(lay.record_type(*rec))
                return

    def _pmd(self, rec: Any) -> _Pmd:
        key = (rec.mm, rec.address & PMD_MASK)
        p = self.pmds.get(key)
        if p is None:
            p = self.pmds[key] = _Pmd(rec.mm, rec.address & PMD_MASK)
        if rec.owner_tgid and not p.pid:
            p.pid, p.comm = rec.owner_tgid, rec.owner_comm.rstrip(b"\0").decode(errors="replace")
        return p

    def _scan(self, rec: Any) -> None:
        p = self._pmd(rec)
        p.vm_flags = rec.vm_flags
        p.verdicts[self.scan.fmt.symbol("result", rec.result)] += rec.count
        if getattr(rec, "walk", None) == 0:  # the PTE walk reached the PTE table
            p.bitmap, p.bitmap_source = rec.present, "ptwalk"
            p.bitmaps_seen.add(rec.present)
            p.ptes = {"none": rec.none_ptes, "swap": rec.swap_ptes,
                      "zero": rec.zero_ptes if rec.zero_known else None}
            # Before the mTHP series the scan function calls collapse_huge_page itself, so
            # its exit (and this bitmap, walked at its entry) arrives after the pass it made.
            open_pass = self._open.get(rec.tid)
            if open_pass is not None and open_pass.pmd is p and not open_pass.walked:
                open_pass.bitmap, open_pass.walked = rec.present, True

    def _tp(self, rec: Any) -> None:
        self._tp_scans[(rec.mm, getattr(rec, self.pagemap_ref),
                        self.tp_scan.fmt.symbol("status", rec.status))] += rec.count

    def add_pages(self, meta: dict[str, Any]) -> None:
        """A pagemap sample (khmon.pagemap.PagemapSampler): the PMD's PTEs, read from user
        space right after a scan event named a page in it."""
        key = (meta["mm"], meta["address"])
        p = self.pmds.get(key)
        if p is None:
            p = self.pmds[key] = _Pmd(*key)
        if not p.pid:
            p.pid, p.comm = meta["pid"], meta.get("comm", "")
        self._page_pmd[(meta["mm"], meta["ref"])] = key
        if p.bitmap_source in SOURCES[:SOURCES.index("pagemap")]:
            return
        present, zero, swap = (int(meta[k], 16) for k in ("present", "zero", "swap"))
        # As in the kernel's bitmap: a bit per PTE that maps a page, the zero page excluded.
        p.bitmap = (present & ~zero).to_bytes(BITMAP_BYTES, "big")
        p.bitmap_source = "pagemap"
        p.bitmaps_seen.add(p.bitmap)
        p.ptes = {"none": meta["none"], "swap": swap.bit_count(), "zero": zero.bit_count(),
                  "shared": meta["shared"]}

    def _isolate(self, rec: Any) -> None:
        self._isolates[rec.tid].append((rec.ts, self.isolate.fmt.symbol("status", rec.status)))

    def _swapin(self, rec: Any) -> None:
        self._swapins[rec.tid].append(rec.ts)

    def _collapse(self, rec: Any) -> None:
        p = self._pmd(rec)
        # The isolate event of this attempt fired on this thread while it ran. A thread's
        # isolates and attempts each come in time order: older isolates match nothing now.
        start = rec.ts - rec.duration_ns
        pending = self._isolates[rec.tid]
        mine = []
        while pending and pending[0][0] <= rec.ts:
            ts, status = pending.popleft()
            if ts >= start:
                mine.append(status)
        swapins = self._swapins[rec.tid]
        swapped = False
        while swapins and swapins[0] <= rec.ts:
            swapped |= swapins.popleft() >= start
        offset = (rec.address - p.address) >> PAGE_SHIFT
        order = getattr(rec, "order", PMD_ORDER)
        result = self.collapse.fmt.symbol("result", rec.result)
        key = (offset, order, mine[-1] if mine else None, result)
        a = p.attempts.setdefault(key, _Attempt())
        a.count += rec.count
        a.latency_sum += rec.duration_ns * rec.count
        a.latency_max = max(a.latency_max, rec.duration_ns)
        present = getattr(rec, "present", None)
        if present is not None and p.bitmap_source != "ptwalk":
            p.bitmap, p.bitmap_source = present, "kernel"
            p.bitmaps_seen.add(present)
        open_pass = self._open.get(rec.tid)
        step = (offset, order, result, swapped)
        if open_pass is not None and open_pass.follows(p, offset, order):
            open_pass.attempts.append(step)
            open_pass.latencies.append(rec.duration_ns)
        else:
            if open_pass is not None:
                open_pass.close()
            self._open[rec.tid] = _OpenPass(p, p.bitmap, [step], [rec.duration_ns])

    def _close_passes(self) -> None:
        """End every thread's pass: the stream (or this window of it) is over."""
        for open_pass in self._open.values():
            open_pass.close()
        self._open.clear()

    def records(self, infer_bitmaps: bool = True) -> list[dict[str, Any]]:
        """PMD records, the ones with the most attempts first. `infer_bitmaps` False when
        the stream lost collapse or swap-in records: the `inferred` source then says nothing
        rather than something wrong."""
        self._close_passes()
        uffd = [m for name, m in self.vma_flag_bits.items() if name.startswith("uffd")]
        tp_scans: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
        for (mm, ref, verdict), n in self._tp_scans.items():
            key = self._page_pmd.get((mm, ref))
            if key is not None:
                tp_scans[key][verdict] += n
        out = []
        for key, p in self.pmds.items():
            verdicts = p.verdicts + tp_scans.get(key, Counter())
            flags = p.vm_flags
            armed = bool(any(flags & m for m in uffd)) if flags is not None and uffd else None
            # Worked out afresh for each call (live views ask repeatedly), never stored: a
            # later pass must not take a partly known bitmap for its own.
            bitmap, source = p.bitmap, p.bitmap_source
            known = self._inferred(p, bool(armed)) if bitmap is None and infer_bitmaps else None
            if known is not None:
                bitmap, source = known.present.to_bytes(BITMAP_BYTES, "little"), "inferred"
            out.append({
                "pid": p.pid or None,
                "comm": p.comm,
                "mm": hex(p.mm),
                "address": hex(p.address),
                "vma_flags": flags,
                "vma_flag_names": (sorted(n for n, m in self.vma_flag_bits.items() if flags & m)
                                   if flags is not None else None),
                "uffd": armed,
                "scans": sum(verdicts.values()),
                "verdict": verdicts.most_common(1)[0][0] if verdicts else None,
                "verdicts": dict(verdicts.most_common()),
                "bitmap": bitmap.hex() if bitmap is not None else None,
                "bitmap_source": source,
                "bitmap_known": (known.mask.to_bytes(BITMAP_BYTES, "little").hex()
                                 if known is not None else None),
                "present": bitmap_count(bitmap) if bitmap is not None else None,
                "bitmaps_seen": len(p.bitmaps_seen),
                "ptes": p.ptes,
                "attempts": [{"offset": off, "order": order, "isolate_status": iso, "status": st,
                              "count": a.count, "latency_ns": a.latency_sum // a.count,
                              "latency_ns_max": a.latency_max}
                             for (off, order, iso, st), a in p.attempts.items()],
                "passes": [{"count": ps.count, "bitmap": bm.hex() if bm is not None else None,
                            "attempts": [{"offset": off, "order": order, "status": st,
                                          "swapped_in": swapped, "latency_ns": ns // ps.count}
                                         for (off, order, st, swapped), ns
                                         in zip(steps, ps.latency_sums, strict=True)]}
                           for (bm, steps), ps in p.passes.items()],
                "passes_dropped": p.passes_dropped,
            })
        out.sort(key=lambda r: (-sum(a["count"] for a in r["attempts"]), -r["scans"],
                                r["address"]))
        return out

    def _inferred(self, p: _Pmd, uffd: bool) -> infer.Known | None:
        """What the PMD's passes pin of its bitmap (khmon.infer), under the capture's
        settings for this VMA; None when they pin nothing."""
        unread = [steps for bitmap, steps in p.passes if bitmap is None]
        if not unread:  # no attempts, or every pass had a bitmap: nothing to work out
            return None
        mask = self.vma_flag_bits.get("hugepage")
        hugepage = p.vm_flags is None or mask is None or bool(p.vm_flags & mask)
        settings = settings_from_sysfs(self.settings, vma_hugepage=hugepage, uffd=uffd)
        known = infer.merge(infer.from_pass(steps, settings) for steps in unread)
        return known if known is not None and known.mask else None


def bitmap_count(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def bitmap_bits(bitmap: bytes) -> list[bool]:
    """PTE i's bit, for i in 0..511: bit i of the little-endian integer is bit i%8 of byte i//8."""
    n = int.from_bytes(bitmap, "little")
    return [bool(n >> i & 1) for i in range(len(bitmap) * 8)]
