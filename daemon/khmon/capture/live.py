"""A live capture: probes attached to this kernel, yielding the parts of an event stream.

The stream is the same one a recording holds (recording.Part: a header, record batches,
a stats part every second, an end part), so recorders, reports and tests consume live
capture and recordings alike. At the end the probes are detached first, then the ring
buffer is consumed and the dedup slots emptied, so the final counts are exact.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from ..errors import EXIT_BAD_INPUT, KhmonError
from ..kernel.btf import Btf
from ..kernel.pagemap import PagemapSampler
from ..kernel.privilege import require_capture
from ..kernel.sysfs import read_counters, read_settings
from ..kernel.tracefs import read_formats
from ..model.correlate import SCAN_PMD
from ..model.model import Aggregator
from ..stream.layout import EventLayout, build_layouts, header_events, is_page_pointer
from ..stream.recording import Part, Writer
from . import plan as funcprobes
from . import ptwalk
from .bpfgen import OwnerOffsets, ProbeConfig
from .loader import LiveProbes

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
                   if lay.name == "mm_collapse_huge_page"), {})
    # One pass over /proc/kallsyms (tens of thousands of lines) for functions and data.
    syms = ptwalk.kallsyms_addresses((*funcprobes.PMD_ENTRY_FUNCS, funcprobes.COLLAPSE_FUNC,
                                      *ptwalk.SYMBOLS))
    walk = ptwalk.plan(btf, syms) if ptwalk_bitmaps else None
    funcs = funcprobes.plan(btf, set(syms), walk)
    return layouts + funcprobes.layouts(funcs, len(layouts), status)


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
        self.vma_flags = funcprobes.vma_flag_bits(btf)
        if cfg.filter_tgid and not self.owner.usable:
            raise KhmonError("-p PID needs mm->owner to tell whose memory a scan is, and this "
                             "kernel's BTF has no mm_struct.owner (CONFIG_MEMCG off)",
                             "run without -p", EXIT_BAD_INPUT)
        # The kernel's counters are read just before attaching (after compiling) and after
        # detaching, so their window encloses khmon's: on a busy system their deltas may
        # exceed khmon's counts, never fall short of them.
        self.start_counters: dict[str, int] = {}
        self.probes = LiveProbes(layouts, self.owner, cfg, with_kprobe_stub,
                                 before_attach=self._read_start_counters)
        self.layouts = self.probes.layouts  # without function probes the kernel refused
        self.pages = _pagemap_source(self.layouts, btf)

    def _read_start_counters(self) -> None:
        self.start_counters = read_counters()

    def header(self) -> dict:
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
            "pagemap_ref": self.pages[1].ref_field if self.pages else None,
            "settings": read_settings(),
            "counters": self.start_counters,
            "recorder_pid": os.getpid(),
        }

    def _stats(self) -> dict:
        return {"mono_ns": _mono_ns(), "wall": _now_wall(), "probe": self.probes.counters(),
                "counters": read_counters()}

    def parts(self, header: dict, duration: float | None,
              should_stop: Callable[[], bool] = lambda: False,
              keep: bool = False) -> Iterator[Part]:
        """Record batches and stats until `duration` seconds pass or should_stop() is true;
        then detach, drain, and yield the end part. The header is the caller's (see header()).
        With `keep`, the compiled programs stay loaded for another window (reopen())."""
        start = header["start_mono_ns"]
        next_stats = time.monotonic() + STATS_INTERVAL_S
        if self.pages is not None:
            self.pages[1].new_window()
        try:
            while not should_stop():
                if duration is not None and (_mono_ns() - start) / 1e9 >= duration:
                    break
                for ev, data in self.probes.poll(POLL_MS):
                    yield Part("R", event=ev, data=data)
                    if self.pages is not None and ev == self.pages[0].index:
                        yield from self._sample_pages(data)
                if time.monotonic() >= next_stats:
                    next_stats += STATS_INTERVAL_S
                    self.probes.advance_epoch()
                    yield Part("S", meta=self._stats())
            for ev, data in self.probes.detach():
                yield Part("R", event=ev, data=data)
            yield Part("E", meta=self._stats())
        finally:
            if keep:
                self.probes.detach()
            else:
                self.probes.close()

    def _sample_pages(self, data: bytes) -> Iterator[Part]:
        """Pagemap parts for the PMDs these scan records name, read right now."""
        lay, sampler = self.pages
        for rec in lay.struct.iter_unpack(data):
            r = lay.record_type(*rec)
            got = sampler.sample(r.mm, r.owner_tgid, getattr(r, sampler.ref_field))
            if got is not None:
                got["ts"] = r.ts
                got["comm"] = r.owner_comm.rstrip(b"\0").decode(errors="replace")
                yield Part("P", meta=got)

    def reopen(self) -> None:
        """Attach again after a kept window; counts start from zero."""
        self.start_counters = read_counters()
        self.probes.attach()


def capture(cfg: ProbeConfig, duration: float | None, out: Path | None,
            should_stop: Callable[[], bool] = lambda: False,
            on_stats: Callable[[dict, dict, int], None] | None = None,
            reuse: LiveCapture | None = None,
            ) -> tuple[Aggregator, list[str]]:
    """Run a live capture into an Aggregator, and into a recording when `out` is given.

    on_stats(header, stats, bytes_written) is called at every stats part (progress lines).
    `reuse`: an already compiled LiveCapture (cfg is then ignored) that stays loaded after.
    Returns the aggregator and the warnings (probes that could not attach).
    """
    if reuse is not None:
        if reuse.probes.detached:
            reuse.reopen()
        cap = reuse
    else:
        cap = LiveCapture(cfg)
    header = cap.header()
    agg = Aggregator(header, cap.layouts)
    writer = Writer(out, header) if out else None
    warnings = [f"could not attach {k}: {v}" for k, v in cap.probes.attached.items() if v]
    try:
        for part in cap.parts(header, duration, should_stop, keep=reuse is not None):
            agg.add(part)
            if writer:
                writer.add(part)
            if on_stats and part.kind == "S":
                on_stats(header, part.meta, writer.bytes_written if writer else 0)
    finally:
        if writer:
            writer.close()
    return agg, warnings


def _pagemap_source(layouts: list[EventLayout], btf: Btf) -> tuple[EventLayout, PagemapSampler] | None:
    """Without function probes, PMDs are known only by the page mm_khugepaged_scan_pmd names:
    its pfn (classic tracepoint) or its struct folio/page pointer (raw tracepoint). With
    them, the function probes' own sources apply (kernel, ptwalk)."""
    by_name = {x.name: x for x in layouts}
    lay = by_name.get(SCAN_PMD)
    if lay is None or funcprobes.PMD_SCAN in by_name or funcprobes.COLLAPSE in by_name:
        return None
    page = lay.page_field
    if page is None:
        return None
    return lay, PagemapSampler(page.name, "pointer" if is_page_pointer(page) else "pfn",
                               btf.struct_size("page"))
