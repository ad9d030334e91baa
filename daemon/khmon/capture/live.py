"""A live capture: probes attached to this kernel, yielding the parts of an event stream.

The stream is the same one a recording holds (khmon.stream.parts: a header, record batches,
a stats part every second, pages parts, an end part), so the model, the recorder and tests
consume live capture and recordings alike. Each record batch is decoded here once
(khmon.stream.decode) and handed on with its part, for the model to use as it is.

Around the probes' own data the capture adds what only a look at the running system can
tell, at each stats part: the in-kernel exact counts, the settings when they changed, the
owner processes that exited, and the PMDs whose detail records the ring buffer refused. At
the end the probes are detached first, then the ring buffer is consumed and the dedup slots
emptied, so the final counts are exact.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

from ..errors import EXIT_BAD_INPUT, KhmonError
from ..kernel import kallsyms
from ..kernel.btf import Btf
from ..kernel.privilege import require_capture
from ..kernel.sysfs import read_counters, read_settings
from ..kernel.tracefs import read_formats
from ..stream.decode import Batch, Decoder, comm
from ..stream.events import COLLAPSE, SCAN_PMD
from ..stream.layout import EventLayout, build_layouts, header_events, is_page_pointer
from ..stream.parts import END, PAGES, RECORDS, STATS, Part
from . import plan, ptwalk
from .bpfgen import OwnerOffsets, ProbeConfig
from .loader import LiveProbes
from .pagemap_sampler import PagemapSampler, PagemapWorker
from .procwatch import ProcessWatch

STATS_INTERVAL_S = 1.0
POLL_MS = 100


def owner_offsets(btf: Btf) -> OwnerOffsets:
    """mm_struct.owner exists only with CONFIG_MEMCG; task_struct.tgid and comm always."""
    return OwnerOffsets(
        mm_owner=btf.member_offset("mm_struct", "owner"),
        task_tgid=btf.member_offset("task_struct", "tgid"),
        task_comm=btf.member_offset("task_struct", "comm"),
    )


def kernel_layouts(btf: Btf, ptwalk_bitmaps: bool = True) -> list[EventLayout]:
    """The running kernel's khugepaged events, as khmon will trace them: raw tracepoints for
    hot events whose arguments BTF names (__bpf_trace_<event>), the format otherwise, then
    the function-probe events the kernel's BTF and kallsyms allow (which of them load is
    decided by LiveProbes)."""
    layouts = build_layouts(read_formats(),
                            lambda name: btf.func_params(f"__bpf_trace_{name}"))
    status = next((lay.fmt.symbols.get("status", {}) for lay in layouts
                   if lay.name == COLLAPSE), {})
    # One pass over /proc/kallsyms (tens of thousands of lines) for functions and data.
    syms = kallsyms.addresses((*plan.PMD_ENTRY_FUNCS, plan.COLLAPSE_FUNC, *ptwalk.SYMBOLS))
    walk = ptwalk.plan(btf, syms) if ptwalk_bitmaps else None
    funcs = plan.plan(btf, set(syms), walk)
    return layouts + plan.layouts(funcs, len(layouts), status)


def uffd_mask(flag_bits: dict[str, int]) -> int:
    """The VM_UFFD_* bits among the VMA flag bits khmon learnt (0: none known)."""
    return sum(m for name, m in flag_bits.items() if name.startswith("uffd"))


def _now_wall() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class LiveCapture:
    """Attach to every khugepaged tracepoint of the running kernel."""

    def __init__(self, cfg: ProbeConfig, with_kprobe_stub: bool = False) -> None:
        require_capture()  # before tracefs is read: one line instead of a PermissionError
        self.cfg = cfg
        btf = Btf.from_kernel()
        layouts = kernel_layouts(btf, cfg.ptwalk)
        self.owner = owner_offsets(btf)
        self.vma_flags = plan.vma_flag_bits(btf)
        if cfg.filter_tgid and not self.owner.usable:
            raise KhmonError("-p PID needs mm->owner to tell whose memory a scan is, and this "
                             "kernel's BTF has no mm_struct.owner (CONFIG_MEMCG off)",
                             "run without -p", EXIT_BAD_INPUT)
        # The kernel's counters are read just before attaching (after compiling) and after
        # detaching, so their window encloses khmon's: on a busy system their deltas may
        # exceed khmon's counts, never fall short of them.
        self.start_counters: dict[str, int] = {}
        self.probes = LiveProbes(layouts, self.owner, cfg, with_kprobe_stub,
                                 before_attach=self._read_start_counters,
                                 uffd_mask=uffd_mask(self.vma_flags))
        self.layouts = self.probes.layouts  # without function probes the kernel refused
        self.decoder = Decoder(self.layouts)
        self.pages = _pagemap_source(self.layouts, btf)
        self.watch = ProcessWatch()
        self._settings: dict[str, str] = {}

    def _read_start_counters(self) -> None:
        self.start_counters = read_counters()

    def header(self) -> dict:
        self._settings = read_settings()
        return {
            "kernel": {"release": platform.release(), "version": platform.version(),
                       "machine": platform.machine()},
            "host": platform.node(),
            "start_wall": _now_wall(),
            "start_mono_ns": _mono_ns(),
            "events": header_events(self.layouts),
            "attached": self.probes.attached,
            "btf_offsets": {"mm_struct.owner": self.owner.mm_owner,
                            "task_struct.tgid": self.owner.task_tgid,
                            "task_struct.comm": self.owner.task_comm},
            "owner_source": "mm->owner (BTF offsets)" if self.owner.usable
            else "unavailable: no mm_struct.owner in BTF (kernel without CONFIG_MEMCG)",
            "options": {**asdict(self.cfg), "pid": self.cfg.filter_tgid},
            "function_probes": {"mode": self.probes.func_mode,
                                "refused": self.probes.func_errors},
            "vma_flag_bits": self.vma_flags,
            # the scan_pmd field naming the page of each pagemap part, when there are any
            "pagemap_ref": self.pages[1].sampler.ref_field if self.pages else None,
            "settings": dict(self._settings),
            "counters": self.start_counters,
            "recorder_pid": os.getpid(),
        }

    def _stats(self) -> dict:
        probe = {**self.probes.counters(), **self.probes.exact_counts()}
        meta = {"mono_ns": _mono_ns(), "wall": _now_wall(), "probe": probe,
                "counters": read_counters()}
        settings = read_settings()
        if settings != self._settings:
            meta["settings"] = self._settings = settings
        exited = self.watch.exited()
        if exited:
            meta["exited"] = exited
        lost = self.probes.lost_pmds()
        if lost:
            meta["lost_pmds"] = lost
        if self.pages is not None:
            worker = self.pages[1]
            worker.forget(exited)
            meta["pagemap"] = {"dropped": worker.dropped, "failures": worker.failures,
                               "unresolved": worker.sampler.unresolved, "error": worker.error,
                               "index_evicted": worker.sampler.index.evicted}
        return meta

    def stream(self, header: dict, duration: float | None,
               should_stop: Callable[[], bool] = lambda: False,
               keep: bool = False) -> Iterator[tuple[Part, Batch | None]]:
        """(part, its decoded batch or None) until `duration` seconds pass or should_stop()
        is true; then detach, drain, and yield the end part. The header is the caller's
        (see header()). With `keep`, the compiled programs stay loaded for another window
        (reopen())."""
        start = header["start_mono_ns"]
        next_stats = time.monotonic() + STATS_INTERVAL_S
        if self.pages is not None:
            self.pages[1].new_window()
        try:
            while not should_stop():
                if duration is not None and (_mono_ns() - start) / 1e9 >= duration:
                    break
                yield from self._records(self.probes.poll(POLL_MS))
                yield from self._pages()
                if time.monotonic() >= next_stats:
                    next_stats += STATS_INTERVAL_S
                    self.probes.advance_epoch()
                    yield Part(STATS, meta=self._stats()), None
            yield from self._records(self.probes.detach())
            if self.pages is not None:
                self.pages[1].finish()
                yield from self._pages()
            yield Part(END, meta=self._stats()), None
        finally:
            if keep:
                self.probes.detach()
            else:
                self.probes.close()

    def parts(self, header: dict, duration: float | None,
              should_stop: Callable[[], bool] = lambda: False, keep: bool = False
              ) -> Iterator[Part]:
        """stream() without the decoded batches."""
        for part, _batch in self.stream(header, duration, should_stop, keep):
            yield part

    def _records(self, runs: list[tuple[int, bytes]]) -> Iterator[tuple[Part, Batch | None]]:
        for ev, data in runs:
            batch = self.decoder.batch(ev, data)
            if batch is not None:
                self.watch.observe(batch)
                if self.pages is not None and ev == self.pages[0].index:
                    self._request_pages(batch)
            yield Part(RECORDS, event=ev, data=data), batch

    def _request_pages(self, batch: Batch) -> None:
        """Ask the pagemap worker for the PMDs these scan records name."""
        worker = self.pages[1]
        ref = worker.sampler.ref_field
        for r in batch.rows:
            worker.request(r.mm, r.owner_tgid, getattr(r, ref), r.ts, comm(r.owner_comm))

    def _pages(self) -> Iterator[tuple[Part, None]]:
        if self.pages is not None:
            for meta in self.pages[1].results():
                yield Part(PAGES, meta=meta), None

    def reopen(self) -> None:
        """Attach again after a kept window; counts start from zero."""
        self.start_counters = read_counters()
        self.probes.attach()


def _pagemap_source(layouts: list[EventLayout], btf: Btf) -> tuple[EventLayout, PagemapWorker] | None:
    """Without function probes, PMDs are known only by the page mm_khugepaged_scan_pmd names:
    its pfn (classic tracepoint) or its struct folio/page pointer (raw tracepoint). With
    them, the function probes' own sources apply (kernel, ptwalk)."""
    by_name = {x.name: x for x in layouts}
    lay = by_name.get(SCAN_PMD)
    if lay is None or plan.PMD_SCAN in by_name or plan.COLLAPSE in by_name:
        return None
    page = lay.page_field
    if page is None:
        return None
    return lay, PagemapWorker(PagemapSampler(page.name, "pointer" if is_page_pointer(page)
                                             else "pfn", btf.struct_size("page")))
