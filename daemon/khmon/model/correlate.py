"""One record per PMD: what khugepaged saw there and what it tried, kept bounded.

The correlator turns the function-probe events of a stream into PMD records
(khmon.model.records):
  fn_pmd_scan  (per-PMD function, exit)  mm, PMD address, VMA flags, verdict and, before the
               mTHP series, the bitmap of a BPF walk of the PTE table at entry (source
               `ptwalk`); counted, since the kernel deduplicates rescans that find the same
               PMD in the same state. Its arrival also ends the thread's pass on that PMD:
               the per-PMD function has returned, so that visit made all its attempts;
  fn_collapse  (collapse_huge_page exit) one attempt: start address, order, result, duration,
               the VMA flags of the per-PMD call it ran in, and on the mTHP series the scan's
               bitmap of present PTEs (source `kernel`);
  mm_collapse_huge_page_isolate          the isolate verdict of the attempt that encloses it
               on the same thread (this tracepoint carries no mm and no address);
  mm_collapse_huge_page_swapin           fired inside an attempt that swapped pages in (the
               PTEs it made present were not present when the scan ran).
Without function probes (a tracepoint-only kernel) the capture reads each scanned PMD's PTEs
from pagemap (source `pagemap`): its pages parts name the PMD around the page a
mm_khugepaged_scan_pmd event reported, and that event's scans and verdicts go to the PMD
(those that arrive before the pages part wait for it, bounded).

Attempts are grouped into passes (khmon.model.records): a thread's attempts arrive in call
order (collapse records are never deduplicated), and within one pass the walk only moves
forward, so an attempt on another PMD, or one that does not move forward, starts a new pass.

Memory is bounded: at most `cap` PMD records (least recently active evicted first, their
open passes closed), the process table's cap (khmon.model.processes), isolate and swap-in
events queued only where attempts can claim them and at most QUEUE per thread, threads
followed at most MAX_THREADS. Everything dropped is counted. Plain Python over decoded
records: it runs the same on live events, recordings and tests.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

from .. import bitmap
from ..geometry import PAGE_SHIFT, PMD_MASK, PMD_ORDER
from ..stream.decode import Batch
from ..stream.events import FN_COLLAPSE, FN_PMD_SCAN, ISOLATE, SCAN_PMD, SWAPIN
from ..stream.layout import EventLayout
from . import infer
from .khugepaged import settings_from_sysfs
from .processes import ProcessTable
from .records import (
    MAX_ATTEMPT_ROWS,
    MAX_PASSES,
    AttemptStats,
    OpenPass,
    PassStats,
    PmdRecord,
    ProcessRecord,
)
from .waste import Waste

# A pass with no attempt for this long (stream time) is over: checked at each stats part.
PASS_GAP_NS = 2_000_000_000
# Default cap on PMD records: about 100 MB of them (docs/benchmarks.md has the measurement).
DEFAULT_PMD_CAP = 100_000
MAX_THREADS = 4096
QUEUE = 64  # isolate / swap-in events queued per thread
MAX_PENDING = 65536  # tracepoint scans waiting for their pagemap sample, by (mm, page)


class Correlator:
    """Feed it decoded batches, pages parts and ticks; records() gives the PMD records."""

    def __init__(self, layouts: list[EventLayout], flag_bits: dict[str, int],
                 processes: ProcessTable, waste: Waste, settings: Callable[[int], dict | None],
                 epoch: Callable[[], int], pagemap_ref: str | None = None,
                 cap: int = DEFAULT_PMD_CAP) -> None:
        """`settings(epoch)`: the THP and khugepaged knobs in force in a settings epoch
        (None if forgotten), under which `inferred` bitmaps are worked out; `epoch()` the
        current one. `pagemap_ref`: the mm_khugepaged_scan_pmd field that names the scanned
        page, when the capture sampled pagemap."""
        by_name = {lay.name: lay for lay in layouts}
        self.scan = by_name.get(FN_PMD_SCAN)
        self.collapse = by_name.get(FN_COLLAPSE)
        # Isolate and swap-in events are only claimed by attempts: without the collapse
        # probe nothing would ever take them off their queues.
        self.isolate = by_name.get(ISOLATE) if self.collapse else None
        self.swapin = by_name.get(SWAPIN) if self.collapse else None
        self.tp_scan = by_name.get(SCAN_PMD) if pagemap_ref and self.scan is None else None
        self.pagemap_ref = pagemap_ref
        self.flag_bits = flag_bits
        self._uffd_mask = sum(m for name, m in flag_bits.items() if name.startswith("uffd"))
        self.processes = processes
        self.waste = waste
        self.settings = settings
        self.epoch = epoch
        self.cap = cap
        self.pmds: OrderedDict[tuple[int, int, int], PmdRecord] = OrderedDict()
        self.open: OrderedDict[int, OpenPass] = OrderedDict()  # by thread
        # per thread, in time order: (ts, isolate status) and (ts, None) of swap-ins not yet
        # claimed by an attempt
        self._isolates: OrderedDict[int, deque[tuple[int, str | None]]] = OrderedDict()
        self._swapins: OrderedDict[int, deque[tuple[int, str | None]]] = OrderedDict()
        self._page_pmd: OrderedDict[tuple[int, int], tuple[int, int, int]] = OrderedDict()
        self._pending: OrderedDict[tuple[int, int], Counter[str]] = OrderedDict()
        self.evicted: Counter[str] = Counter()  # PMD records: "lru", "exited", "process_cap"
        self.dropped: Counter[str] = Counter()  # "isolate", "swapin", "pending_scans"
        self._handlers: dict[int, Callable[[Any], None]] = {
            lay.index: fn for lay, fn in ((self.scan, self._scan), (self.collapse, self._collapse),
                                          (self.isolate, self._isolate),
                                          (self.swapin, self._swapin), (self.tp_scan, self._tp))
            if lay is not None}
        col = self.collapse
        self._col_order = col is not None and "order" in col.field_names
        self._col_present = col is not None and "present" in col.field_names
        self._col_flags = col is not None and "in_pmd_scan" in col.field_names
        self._walk = self.scan is not None and "walk" in self.scan.field_names

    @property
    def active(self) -> bool:
        """PMD records need PMD addresses: function probes, or pagemap samples."""
        return self.scan is not None or self.collapse is not None or self.tp_scan is not None

    def add(self, batch: Batch) -> None:
        handler = self._handlers.get(batch.layout.index)
        if handler is not None:
            for rec in batch.rows:
                handler(rec)

    # --- records ---------------------------------------------------------------------------

    def _pmd(self, mm: int, pid: int, comm: bytes | str, address: int, now_ns: int) -> PmdRecord:
        proc, forced = self.processes.get(mm, pid, comm, now_ns)
        for victim in forced:
            self.drop_process(victim, "process_cap")
        addr = address & PMD_MASK
        key = (mm, pid, addr)
        p = proc.pmds.get(addr)
        if p is not None:
            self.pmds.move_to_end(key)
            p.last_ns = max(p.last_ns, now_ns)
            return p
        p = proc.pmds[addr] = self.pmds[key] = PmdRecord(proc, addr, now_ns, now_ns)
        while len(self.pmds) > self.cap:
            self._evict(next(iter(self.pmds.values())), "lru")
        return p

    def _evict(self, p: PmdRecord, why: str) -> None:
        if p.open_pass is not None:
            self._close(p.open_pass)
        del self.pmds[p.key]
        p.process.pmds.pop(p.address, None)
        self.waste.forget(p)
        self.evicted[why] += 1

    def drop_process(self, proc: ProcessRecord, why: str) -> None:
        """Forget a process's PMD records (it exited, or the process table is full)."""
        for p in list(proc.pmds.values()):
            self._evict(p, why)

    def mark_lost(self, mm: int, address: int, n: int) -> None:
        """`n` more records about (mm, PMD at `address`) were refused by the ring buffer:
        the PMD's record says so; a tracepoint record (address 0) names only the process."""
        proc = self.processes.owner(mm)
        if proc is None:
            return
        if not address:
            proc.detail_lost += n
            return
        p = proc.pmds.get(address & PMD_MASK)
        if p is not None:
            p.detail_lost += n

    # --- events -----------------------------------------------------------------------------

    def _scan(self, rec: Any) -> None:
        p = self._pmd(rec.mm, rec.owner_tgid, rec.owner_comm, rec.address, rec.ts)
        p.vm_flags = rec.vm_flags
        verdict = self.scan.fmt.symbol("result", rec.result)
        p.verdicts[verdict] += rec.count
        walked = None
        if self._walk and rec.walk == 0:  # the PTE walk reached the PTE table
            walked = bitmap.from_bytes(rec.present)
            p.set_bitmap(walked, "ptwalk")
            p.ptes = {"none": rec.none_ptes, "swap": rec.swap_ptes,
                      "zero": rec.zero_ptes if rec.zero_known else None}
        op = self.open.get(rec.tid)
        if op is not None and op.pmd is p:
            # Before the mTHP series the scan function calls collapse_huge_page itself, so
            # its exit (and this bitmap, walked at its entry) arrives after the pass it made.
            if walked is not None and not op.walked:
                op.bitmap, op.walked = walked, True
            self._close(op)  # the per-PMD function returned: this visit is over
        self.waste.rescan(p, verdict, rec.count)

    def _tp(self, rec: Any) -> None:
        ref = getattr(rec, self.pagemap_ref)
        verdict = self.tp_scan.fmt.symbol("status", rec.status)
        key = self._page_pmd.get((rec.mm, ref))
        p = self.pmds.get(key) if key is not None else None
        if p is not None:
            self.pmds.move_to_end(key)
            p.verdicts[verdict] += rec.count
            self.waste.rescan(p, verdict, rec.count)
            return
        pending = self._pending.get((rec.mm, ref))
        if pending is None:
            pending = self._pending[(rec.mm, ref)] = Counter()
            if len(self._pending) > MAX_PENDING:
                _, gone = self._pending.popitem(last=False)
                self.dropped["pending_scans"] += sum(gone.values())
        pending[verdict] += rec.count

    def add_pages(self, meta: dict[str, Any]) -> None:
        """A pagemap sample: the PMD's PTEs, read from user space right after a scan event
        named a page in it (khmon.capture.pagemap_sampler)."""
        mm, ref = meta["mm"], meta["ref"]
        p = self._pmd(mm, meta["pid"], meta.get("comm", ""), meta["address"], meta.get("ts", 0))
        self._page_pmd[(mm, ref)] = p.key
        self._page_pmd.move_to_end((mm, ref))
        if len(self._page_pmd) > 2 * self.cap:
            self._page_pmd.popitem(last=False)
        present, zero, swap = (bitmap.from_hex(meta[k]) for k in ("present", "zero", "swap"))
        if p.bitmap_source in (None, "pagemap", "inferred"):
            # As in the kernel's bitmap: a bit per PTE that maps a page, the zero page excluded.
            p.set_bitmap(present & ~zero, "pagemap")
            p.ptes = {"none": meta["none"], "swap": bitmap.count(swap), "zero": bitmap.count(zero),
                      "shared": meta["shared"]}
        for verdict, n in (self._pending.pop((mm, ref), None) or {}).items():
            p.verdicts[verdict] += n
            self.waste.rescan(p, verdict, n)

    def _isolate(self, rec: Any) -> None:
        self._queue(self._isolates, rec.tid, (rec.ts, self.isolate.fmt.symbol("status", rec.status)),
                    "isolate")

    def _swapin(self, rec: Any) -> None:
        self._queue(self._swapins, rec.tid, (rec.ts, None), "swapin")

    def _queue(self, queues: OrderedDict[int, deque[tuple[int, str | None]]], tid: int,
               item: tuple[int, str | None], what: str) -> None:
        q = queues.get(tid)
        if q is None:
            q = queues[tid] = deque(maxlen=QUEUE)
            if len(queues) > MAX_THREADS:
                _, gone = queues.popitem(last=False)
                self.dropped[what] += len(gone)
        else:
            queues.move_to_end(tid)
        if len(q) == QUEUE:
            self.dropped[what] += 1
        q.append(item)

    @staticmethod
    def _claim(queues: OrderedDict[int, deque[tuple[int, str | None]]], tid: int, start: int,
               end: int) -> list[tuple[int, str | None]]:
        """Items of thread `tid` stamped within [start, end]; older ones are dropped (a
        thread's events and attempts each come in time order: they match nothing now)."""
        q = queues.get(tid)
        mine = []
        while q and q[0][0] <= end:
            item = q.popleft()
            if item[0] >= start:
                mine.append(item)
        return mine

    def _collapse(self, rec: Any) -> None:
        p = self._pmd(rec.mm, rec.owner_tgid, rec.owner_comm, rec.address, rec.ts)
        start = rec.ts - rec.duration_ns
        isolated = self._claim(self._isolates, rec.tid, start, rec.ts)
        swapped = bool(self._claim(self._swapins, rec.tid, start, rec.ts))
        offset = (rec.address - p.address) >> PAGE_SHIFT
        order = rec.order if self._col_order else PMD_ORDER
        result = self.collapse.fmt.symbol("result", rec.result)
        key = (offset, order, isolated[-1][1] if isolated else None, result)
        if p.attempts is None:
            p.attempts = {}
        a = p.attempts.get(key)
        if a is None and len(p.attempts) < MAX_ATTEMPT_ROWS:
            a = p.attempts[key] = AttemptStats()
        if a is None:
            p.attempts_dropped += rec.count
        else:
            a.count += rec.count
            a.latency_sum += rec.duration_ns * rec.count
            a.latency_max = max(a.latency_max, rec.duration_ns)
        if self._col_present:
            p.set_bitmap(bitmap.from_bytes(rec.present), "kernel")
        flags = p.vm_flags
        if self._col_flags and rec.in_pmd_scan:
            flags = rec.vm_flags  # the VMA of the per-PMD call this attempt ran in
            if p.vm_flags is None:
                p.vm_flags = flags
        uffd = flags is not None and bool(flags & self._uffd_mask)
        if uffd:
            p.process.uffd_attempts += rec.count
        self.waste.attempt(p, order, result, rec.duration_ns, uffd)
        step = (offset, order, result, swapped)
        op = self.open.get(rec.tid)
        if op is not None and op.follows(p, offset, order):
            op.steps.append(step)
            op.latencies.append(rec.duration_ns)
            op.last_ns = rec.ts
            self.open.move_to_end(rec.tid)
            return
        if op is not None:
            self._close(op)
        op = OpenPass(rec.tid, p, p.bitmap, [step], [rec.duration_ns], self.epoch(), rec.ts)
        self.open[rec.tid] = p.open_pass = op
        if len(self.open) > MAX_THREADS:
            self._close(next(iter(self.open.values())))

    def _close(self, op: OpenPass) -> None:
        if self.open.get(op.tid) is op:
            del self.open[op.tid]
        p = op.pmd
        if p.open_pass is op:
            p.open_pass = None
        key = op.key
        if p.passes is None:
            p.passes = {}
        kept = p.passes.get(key)
        repeated = kept is not None
        if kept is None and len(p.passes) < MAX_PASSES:
            kept = p.passes[key] = PassStats(0, [0] * len(op.steps))
        if kept is None:
            p.passes_dropped += 1
        else:
            kept.count += 1
            kept.latency_sums = [a + b for a, b in zip(kept.latency_sums, op.latencies, strict=True)]
        self.waste.pass_closed(op, repeated)

    # --- the stream's clock ----------------------------------------------------------------

    def tick(self, now_ns: int) -> None:
        """A stats part at `now_ns`: passes idle for PASS_GAP_NS are over."""
        for op in [op for op in self.open.values() if now_ns - op.last_ns > PASS_GAP_NS]:
            self._close(op)

    def end(self) -> None:
        """The stream ended: every pass is over."""
        for op in list(self.open.values()):
            self._close(op)

    # --- reading (never changes a record) ---------------------------------------------------

    def records(self, infer_bitmaps: bool = True) -> list[dict[str, Any]]:
        """Every PMD record as JSON, the ones with the most attempts first. `infer_bitmaps`
        False when the stream lost collapse or swap-in records: the `inferred` source then
        says nothing rather than something wrong."""
        out = [self.record_json(p, infer_bitmaps) for p in self.pmds.values()]
        out.sort(key=lambda r: (-sum(a["count"] for a in r["attempts"]), -r["scans"],
                                r["address"]))
        return out

    def record_json(self, p: PmdRecord, infer_bitmaps: bool = True) -> dict[str, Any]:
        known = self._inferred(p) if p.bitmap is None and infer_bitmaps else None
        return p.to_json(self.flag_bits, known)

    def _inferred(self, p: PmdRecord) -> tuple[int, int] | None:
        """What the PMD's closed passes pin of its bitmap (khmon.model.infer), each under the
        settings in force when it was made; None when they pin nothing."""
        unread = [(steps, epoch) for bits, steps, epoch in p.passes or () if bits is None]
        if not unread:
            return None
        hugepage_mask = self.flag_bits.get("hugepage")
        hugepage = p.vm_flags is None or hugepage_mask is None or bool(p.vm_flags & hugepage_mask)
        uffd = p.vm_flags is not None and bool(p.vm_flags & self._uffd_mask)
        found = []
        for steps, epoch in unread:
            knobs = self.settings(epoch)
            if knobs is not None:
                found.append(infer.from_pass(steps, settings_from_sysfs(
                    knobs, vma_hugepage=hugepage, uffd=uffd)))
        known = infer.merge(found)
        return (known.present, known.mask) if known is not None and known.mask else None
