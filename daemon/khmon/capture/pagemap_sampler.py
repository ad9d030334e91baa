"""The `pagemap` bitmap source: on a kernel that offers only tracepoints, read each scanned
PMD's PTEs from /proc/PID/pagemap right after the event that named it.

A tracepoint-only kernel names the PMD only by a page in it: mm_khugepaged_scan_pmd's pfn
(the classic tracepoint) or its struct folio pointer (the raw one). PagemapSampler turns
that into the PMD's address (khmon.kernel.pagemap.PfnIndex) and reads its 512 PTEs.
PagemapWorker runs the reads on a thread of their own, behind a bounded queue, so a large
process's pagemap never stalls the thread that drains the ring buffer: a request the queue
cannot take is dropped and counted, never waited for.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import bitmap
from ..errors import KhmonError
from ..kernel.pagemap import PROC, PfnIndex, read_pmd

# x86-64 places vmemmap (the struct page array) at a PUD-aligned (1 GiB) base, with or without
# KASLR (arch/x86/mm/kaslr.c rounds every randomised region to PUD_SIZE). A struct page
# pointer's offset within its GiB is therefore (pfn * sizeof(struct page)) mod 1 GiB, which
# names the pfn up to multiples of 1 GiB / sizeof(struct page).
VMEMMAP_ALIGN = 1 << 30
MAX_VMEMMAP_WRAPS = 64  # pfn candidates tried per pointer: machines up to 64 x 64 GiB


class PagemapSampler:
    """The `pagemap` bitmap source: for each PMD a scan event names, read its PTEs from user
    space right after the event.

    A tracepoint-only kernel names the PMD only by a page in it (`kind`): its pfn (the
    classic mm_khugepaged_scan_pmd) or its struct folio pointer (the raw tracepoint). A
    pointer becomes pfn candidates (VMEMMAP_ALIGN, `page_struct` bytes per struct page from
    BTF); the owning process's PfnIndex says which candidate it maps and where. Each
    (process, mm, page) is sampled once per capture window (a rescan of an unchanged PMD
    names the same page); a page the process no longer maps yields nothing, counted in
    `unresolved`: a best effort, named as such by the record's bitmap_source.
    """

    MAX_SEEN = 1 << 16  # (process, mm, page) remembered before starting over

    KINDS = ("pfn", "pointer")

    def __init__(self, ref_field: str, kind: str, page_struct: int | None = None,
                 root: Path = PROC) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown page reference kind {kind!r}")
        self.ref_field = ref_field
        self.kind = kind
        self.page_struct = page_struct
        self.root = root
        self.index = PfnIndex(root)
        self._seen: set[tuple[int, int, int]] = set()
        self.unresolved = 0

    def new_window(self) -> None:
        """Forget what was sampled: a new capture window samples every PMD again (processes
        come and go, and a new one can have an old one's mm address and layout)."""
        self._seen.clear()
        self.index = PfnIndex(self.root)
        self.unresolved = 0

    def _pfns(self, ref: int) -> Iterable[int]:
        if self.kind == "pfn":
            return (ref,)
        if not self.page_struct or VMEMMAP_ALIGN % self.page_struct:
            return ()
        step = VMEMMAP_ALIGN // self.page_struct
        low = ref % VMEMMAP_ALIGN // self.page_struct
        return (low + k * step for k in range(MAX_VMEMMAP_WRAPS))

    def wanted(self, mm: int, pid: int, ref: int) -> bool:
        """Should page `ref` of `pid` be sampled? Once per (process, mm, page) and window:
        a rescan of an unchanged PMD names the same page."""
        if not pid or not ref or (pid, mm, ref) in self._seen:
            return False
        if len(self._seen) >= self.MAX_SEEN:
            self._seen.clear()
        self._seen.add((pid, mm, ref))
        return True

    def sample(self, mm: int, pid: int, ref: int) -> dict | None:
        """The PMD around page `ref` of process `pid`, once per window; None otherwise."""
        return self.read(mm, pid, ref) if self.wanted(mm, pid, ref) else None

    def read(self, mm: int, pid: int, ref: int) -> dict | None:
        """Read the PMD around page `ref` of process `pid` now (None: not resolved)."""
        for pfn in self._pfns(ref):
            addr = self.index.pmd_of(pid, pfn)
            if addr is None:
                continue
            pages = read_pmd(pid, addr, self.root)
            if pages is None:
                break
            return {"mm": mm, "pid": pid, "ref": ref, "pfn": pfn, "address": addr,
                    "present": bitmap.to_hex(pages.present), "swap": bitmap.to_hex(pages.swap),
                    "zero": bitmap.to_hex(pages.zero), "none": pages.none, "shared": pages.shared}
        self.unresolved += 1
        return None


class PagemapWorker:
    """PagemapSampler.read on its own thread. request() never blocks; results() takes
    what has been read so far, as pages-part metadata."""

    QUEUE = 4096

    def __init__(self, sampler: PagemapSampler, queue_size: int = QUEUE) -> None:
        self.sampler = sampler
        self._requests: queue.Queue[tuple[int, int, int, int, str] | None] = queue.Queue(queue_size)
        self._results: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.dropped = 0  # requests the full queue refused
        self.failures = 0  # reads that failed (permission denied ...); the first one says why
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        # Processes that exited, for the worker to drop from the sampler's index (the index
        # is the worker's alone while it runs; deque appends and pops are thread-safe).
        self._exited: deque[int] = deque(maxlen=self.QUEUE)

    def request(self, mm: int, pid: int, ref: int, ts: int, comm: str) -> None:
        if not self.sampler.wanted(mm, pid, ref):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="khmon-pagemap", daemon=True)
            self._thread.start()
        try:
            self._requests.put_nowait((mm, pid, ref, ts, comm))
        except queue.Full:
            self.dropped += 1

    def forget(self, pids: Iterable[int]) -> None:
        """These processes exited: their PFN indexes go (on the worker's thread when it
        runs, before its next read)."""
        self._exited.extend(pids)
        if self._thread is None:
            self._forget_exited()

    def _forget_exited(self) -> None:
        while self._exited:
            self.sampler.index.forget(self._exited.popleft())

    def _run(self) -> None:
        while (req := self._requests.get()) is not None:
            self._forget_exited()
            mm, pid, ref, ts, comm = req
            try:
                got = self.sampler.read(mm, pid, ref)
            except (OSError, KhmonError) as e:  # a failed read must not end the capture
                got = None
                self.failures += 1
                self.error = self.error or str(e)
            if got is not None:
                got["ts"], got["comm"] = ts, comm
                self._results.put(got)

    def results(self) -> Iterable[dict[str, Any]]:
        while True:
            try:
                yield self._results.get_nowait()
            except queue.Empty:
                return

    def finish(self, timeout: float = 5.0) -> None:
        """Read what was asked for (up to `timeout`), then stop the thread."""
        if self._thread is None:
            return
        self._requests.put(None)
        self._thread.join(timeout)
        self._thread = None

    def new_window(self) -> None:
        """A new capture window samples every PMD again (the thread is stopped between
        windows, so the sampler is not in use)."""
        self.finish()
        self.sampler.new_window()
