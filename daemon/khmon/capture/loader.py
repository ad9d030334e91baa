"""The probe loader: the only module that imports bcc.

It compiles the generated C (bpfgen), attaches one program per khugepaged tracepoint, and
hands everything else over as plain data for khmon.capture.ringbuf to make into the stream:
ring-buffer records, the dedup slots, the in-kernel counters and the exact-count maps. An
attach failure is data: `attached` records, per event, None or the error.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ..errors import KhmonError
from ..kernel.privilege import require_capture
from ..kernel.tracefs import SYSTEM
from ..stream.layout import EventLayout
from .bpfgen import OwnerOffsets, ProbeConfig, generate
from .fentry import fentry_refusal, refusals, trampoline_would_block
from .ringbuf import Resolver, exact_rows, group_runs, slot_repeats

# Kernel headers of another version than the running one warn in ways that do not matter:
# khmon takes nothing from them but bcc's helper definitions and struct pt_regs.
CFLAGS = ["-Wno-macro-redefined", "-Wno-ignored-attributes", "-Wno-duplicate-decl-specifier"]
POLL_BATCH = 16384  # records taken per poll at most


def nr_cpu_ids() -> int:
    """One more than the highest possible CPU id (bcc reads /sys/devices/system/cpu/possible):
    the number of per-CPU dedup tables the generated program needs."""
    from bcc.utils import get_possible_cpus

    return max(get_possible_cpus()) + 1


def bcc_version() -> str:
    """The loaded bcc's version (the exporter's khmon_build_info says what produced it)."""
    try:
        from bcc.version import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


def _import_bcc():
    try:
        from bcc import BPF
    except ImportError as e:
        raise KhmonError("cannot import bcc (Debian's python3-bpfcc)",
                         "run make setup, or apt-get install python3-bpfcc") from e
    return BPF


class LiveProbes:
    """Compiled and attached khmon programs for the given events."""

    def __init__(self, layouts: list[EventLayout], owner: OwnerOffsets, cfg: ProbeConfig,
                 with_kprobe_stub: bool = False,
                 before_attach: Callable[[], None] = lambda: None, uffd_mask: int = 0) -> None:
        """Compile, load and attach. before_attach() runs between compiling (half a minute
        or more in a TCG guest) and attaching: where the caller reads the kernel's counters,
        so their window is khmon's. `uffd_mask`: VM_UFFD_* bits, for the exact counts."""
        require_capture()  # root, or the capabilities and tracefs access (kernel.privilege)
        # doctor's kprobe trial rides along in the same program: compiling takes ~30 s in a
        # TCG guest, so every compile saved counts.
        stub = "\nint khmon_kprobe_stub(void *ctx) { return 0; }\n" if with_kprobe_stub else ""
        BPF = _import_bcc()
        self.nr_cpu_ids = nr_cpu_ids()
        # Function probes: fentry/fexit where the kernel loads them, else kprobes, else none
        # (a failed fentry load fails the whole object, so each choice is a compile).
        has_funcs = any(lay.func is not None for lay in layouts)
        self.func_errors: dict[str, str] = {}
        self.func_mode: str | None = None
        for mode in (("kfunc", "kprobe", None) if has_funcs else (None,)):
            self.source = generate(layouts, owner, cfg, nr_cpu_ids=self.nr_cpu_ids,
                                   func_mode=mode, uffd_mask=uffd_mask) + stub
            refused = refusals.get(self.source) if mode == "kfunc" else None
            if mode == "kfunc" and refused is None:
                refused = _kfunc_obstacle(layouts)
            if refused is not None:  # this very program was refused since boot: skip a compile
                self.func_errors[mode or ""] = refused
                continue
            try:
                self.bpf = BPF(text=self.source.encode(), cflags=CFLAGS)
            except Exception as e:  # bcc raises bare Exception on compile and load errors
                if mode is None:
                    raise KhmonError(f"BPF compile/load failed: {str(e).splitlines()[0]}",
                                     "run khmon doctor; kernel headers for bcc come from make "
                                     "setup") from e
                self.func_errors[mode] = _err_text(e)
                if mode == "kfunc":  # an fentry refusal is the kernel's, not a fluke
                    refusals.put(self.source, self.func_errors[mode])
                continue
            self.func_mode = mode
            break
        if self.func_mode == "kfunc":
            # bcc attaches fentry programs as it loads them; windows attach them in attach().
            for lay in layouts:
                if lay.func is not None:
                    self._detach_func(lay)
        self.layouts = [lay for lay in layouts if lay.func is None or self.func_mode]
        self._pending: list[bytes] = []
        self._poll_cap = sys.maxsize  # detach() consumes everything
        self.bpf[b"events"].open_ring_buffer(self._on_record)
        self.resolver = Resolver()
        self._epoch = 0
        self._left_in_slots: dict[str, int] = defaultdict(int)  # per hot event, cumulative
        self._base: dict[str, dict[str, int]] = {}
        self._lost_at: dict[tuple[int, int], int] = {}  # last values read from lost_at
        self.attached: dict[str, str | None] = {}
        before_attach()
        self.attach()
        funcs = [lay for lay in self.layouts if lay.func is not None]
        if funcs and all(self.attached[lay.name] for lay in funcs):
            # Compiled but not attachable (no CONFIG_KPROBES): tracepoints only.
            self.func_errors[self.func_mode or ""] = str(self.attached[funcs[0].name])
            self.func_mode = None
            for lay in funcs:
                del self.attached[lay.name]
            self.layouts = [lay for lay in self.layouts if lay.func is None]

    def attach(self) -> None:
        """Attach every program; the in-kernel counters count from here. Called again after
        detach() to open another window without recompiling (slow in TCG guests)."""
        # Counters count from before the first program can run: a base read after attaching
        # would subtract events whose records are nonetheless delivered. The dedup tables
        # are empty here (new, or emptied by detach()).
        self.advance_epoch()
        self._base = self._raw_counters()
        for table in (b"exact", b"lost_at"):  # these count from zero in each window
            self.bpf[table].clear()
        self._lost_at.clear()
        self.attached = {}
        for lay in self.layouts:
            try:
                fn = f"khmon_{lay.name}".encode()
                if lay.func is not None:
                    with _quiet_stderr():  # libbcc prints refusals itself; they are data here
                        self._attach_func(lay)
                elif lay.raw:
                    self.bpf.attach_raw_tracepoint(tp=lay.name.encode(), fn_name=fn)
                else:
                    self.bpf.attach_tracepoint(tp=f"{SYSTEM}:{lay.name}".encode(), fn_name=fn)
                self.attached[lay.name] = None
            except Exception as e:
                self.attached[lay.name] = _err_text(e)
        if not any(v is None for lay in self.layouts if lay.func is None
                   for v in [self.attached[lay.name]]):
            self.bpf.cleanup()
            raise KhmonError("could not attach to any khugepaged tracepoint: "
                             + "; ".join(f"{k}: {v}" for k, v in self.attached.items()),
                             "run khmon doctor")
        self.detached = False

    def _kfunc_name(self, func: str, exit_: bool = False) -> bytes:
        """The name bcc gave the fentry (fexit) program of `func`: its KFUNC_PROBE macro makes
        kfunc__<func> or, in later versions, kfunc__vmlinux__<func>. bcc loads kfunc programs
        when it compiles, so they are in bpf.funcs."""
        kind = b"kretfunc__" if exit_ else b"kfunc__"
        names = [n for n in self.bpf.funcs
                 if n.startswith(kind) and (n == kind + func.encode()
                                            or n.endswith(b"__" + func.encode()))]
        return names[0] if names else kind + func.encode()

    def _attach_func(self, lay: EventLayout) -> None:
        f = lay.func
        if self.func_mode == "kfunc":
            if (why := trampoline_would_block()) is not None:  # set to 0 since the compile
                raise RuntimeError(why)
            self.bpf.attach_kfunc(fn_name=self._kfunc_name(f.func))
            if f.exit:
                self.bpf.attach_kretfunc(fn_name=self._kfunc_name(f.func, exit_=True))
        else:
            self.bpf.attach_kprobe(event=f.func.encode(), fn_name=f"khmon_{lay.name}".encode())
            if f.exit:
                self.bpf.attach_kretprobe(event=f.func.encode(),
                                          fn_name=f"khmon_ret_{lay.name}".encode())

    def _detach_func(self, lay: EventLayout) -> None:
        f = lay.func
        with contextlib.suppress(Exception):
            if self.func_mode == "kfunc":
                self.bpf.detach_kfunc(fn_name=self._kfunc_name(f.func))
                if f.exit:
                    self.bpf.detach_kretfunc(fn_name=self._kfunc_name(f.func, exit_=True))
            else:
                self.bpf.detach_kprobe(event=f.func.encode())
                if f.exit:
                    self.bpf.detach_kretprobe(event=f.func.encode())

    def _on_record(self, _ctx, data, size) -> int:
        self._pending.append(ctypes.string_at(data, size))
        # A negative return makes libbpf stop consuming (this record is kept): without it a
        # poll returns only once the buffer is empty, never while producers outpace us.
        return -1 if len(self._pending) >= self._poll_cap else 0

    def poll(self, timeout_ms: int) -> list[tuple[int, bytes]]:
        """Records that arrived, as (event index, records) runs in ring-buffer order: at most
        POLL_BATCH per call, so the caller's loop (durations, stats, Ctrl-C) keeps running
        under any load."""
        self._poll_cap = len(self._pending) + POLL_BATCH
        try:
            # Woken early only by a burst (khmon_rb_flags): on the timer, what arrived is
            # taken without a wakeup, which poll alone would leave in the buffer.
            self.bpf.ring_buffer_poll(timeout_ms)
            self.bpf.ring_buffer_consume()
        finally:
            self._poll_cap = sys.maxsize
        return self._take()

    def _take(self) -> list[tuple[int, bytes]]:
        pending, self._pending = self._pending, []
        return group_runs(pending, self.resolver)

    def advance_epoch(self) -> None:
        """Make the next repeat of every deduplicated payload report the repeats counted
        before it (a flush record), so live counts lag by at most one epoch per payload."""
        self._epoch += 1
        self.bpf[b"epoch"][ctypes.c_int(0)] = ctypes.c_ulonglong(self._epoch)

    def _empty_slots(self) -> dict[int, bytes]:
        """After detaching: the repeats still counted in the dedup slots, as counted records,
        and the slots emptied (their installs forgotten) for a later window."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out: dict[int, bytes] = {}
        for lay in self.layouts:
            if not lay.hot or self.attached.get(lay.name, "absent") is not None:
                continue
            table = self.bpf[f"dsets_{lay.name}".encode()]
            sets_per_cpu = len(table) // self.nr_cpu_ids  # CPU after CPU (bpfgen)
            slots = ((int(getattr(k, "value", k)),  # batch lookups yield ints
                      [(v.fp, v.ec) for v in ways.w]) for k, ways in _items(table))
            recs, left, used = slot_repeats(lay.index, slots, sets_per_cpu, self.resolver, now)
            self._left_in_slots[lay.name] += left
            if recs:
                out[lay.index] = b"".join(recs)
            for at in used:
                table.clearitem(ctypes.c_int(at))
        self.resolver.forget()
        return out

    def exact_counts(self) -> dict[str, Any]:
        """The exact-count maps since attach(): {"exact": {event: rows}, "hist": {event:
        rows}, "exact_full": n} (khmon.capture.ringbuf.exact_rows)."""
        per_cpu = ((int(getattr(k, "value", k)), sum(v.n for v in vals), sum(v.ns for v in vals),
                    max((v.max for v in vals), default=0))
                   for k, vals in _items(self.bpf[b"exact"]))
        exact, hist = exact_rows(per_cpu, {lay.index: lay.name for lay in self.layouts})
        full = int(self.bpf[b"exact_full"].sum(ctypes.c_int(0)).value)
        return {"exact": exact, "hist": hist, "exact_full": full}

    def lost_pmds(self) -> list[list[int]]:
        """[mm, PMD address (0: none named), records lost in all] for the keys of `lost_at`
        that changed since the last call."""
        out = []
        for k, v in _items(self.bpf[b"lost_at"]):
            key, n = (int(k.mm), int(k.addr)), int(getattr(v, "value", v))
            if self._lost_at.get(key) != n:
                self._lost_at[key] = n
                out.append([*key, n])
        if len(self._lost_at) > 4 * 4096:  # the map is an LRU of 4096: forget what it dropped
            self._lost_at.clear()
        return out

    def _raw_counters(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for table in ("seen", "lost"):
            t = self.bpf[table.encode()]
            out[table] = {lay.name: int(t.sum(ctypes.c_int(lay.index)).value)
                          for lay in self.layouts}
        # Repeats the BPF code never flushed are counted when detach() empties the slots;
        # repeats whose install record was never delivered are lost.
        for lay in self.layouts:
            out["seen"][lay.name] += self._left_in_slots[lay.name]
            out["lost"][lay.name] += self.resolver.orphaned[lay.index]
        out["missed"] = {lay.name: self._recursion_misses(lay.name) for lay in self.layouts}
        return out

    def _recursion_misses(self, name: str) -> int:
        """Runs of this event's program the kernel skipped because a BPF program was already
        running on that CPU (prog->stats, in the prog fd's fdinfo since 5.12). khmon never saw
        those events, so they are lost too, counted by the kernel rather than by khmon."""
        lay = next(lay for lay in self.layouts if lay.name == name)
        if lay.func is None:
            progs = [f"khmon_{name}".encode()]
        elif self.func_mode == "kfunc":
            progs = [self._kfunc_name(lay.func.func), self._kfunc_name(lay.func.func, True)]
        else:
            progs = [f"khmon_{name}".encode(), f"khmon_ret_{name}".encode()]
        total = 0
        for prog in progs:
            fn = self.bpf.funcs.get(prog)
            if fn is None:
                continue
            try:
                with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                    total += next((int(line.split()[1]) for line in f
                                   if line.startswith("recursion_misses:")), 0)
            except OSError:
                pass
        return total

    def counters(self) -> dict[str, dict[str, int]]:
        """The exact in-kernel counters since attach(), summed over CPUs, per event name."""
        raw = self._raw_counters()
        return {table: {name: n - self._base[table][name] for name, n in vals.items()}
                for table, vals in raw.items()}

    def detach(self) -> list[tuple[int, bytes]]:
        """Stop new events, then collect what is still in the ring buffer and, after it, the
        repeats still counted in the dedup slots (as poll() does, runs in order)."""
        if self.detached:
            return []
        for lay in self.layouts:
            if lay.func is not None:
                self._detach_func(lay)
            elif self.attached.get(lay.name) is None:
                with contextlib.suppress(Exception):
                    if lay.raw:
                        self.bpf.detach_raw_tracepoint(tp=lay.name.encode())
                    else:
                        self.bpf.detach_tracepoint(tp=f"{SYSTEM}:{lay.name}".encode())
        self.detached = True
        self.bpf.ring_buffer_consume()
        return self._take() + list(self._empty_slots().items())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bpf.cleanup()

    def try_kprobe(self, func: str) -> str | None:
        """Attach the kprobe stub (with_kprobe_stub) to `func` and detach it: None if the
        kernel allowed it, else its error. Tried, not guessed (CONFIG_KPROBES may be off)."""
        with _quiet_stderr():
            try:
                self.bpf.attach_kprobe(event=func.encode(), fn_name=b"khmon_kprobe_stub")
                self.bpf.detach_kprobe(event=func.encode())
                return None
            except Exception as e:  # the error is the answer
                return _err_text(e)


def _items(table: Any) -> Any:
    """A map's (key, value) pairs: one batch syscall where the kernel has batch ops (5.6+),
    else one lookup per key."""
    try:
        return table.items_lookup_batch()
    except Exception:  # no batch ops on this kernel (bcc raises bare Exception)
        return table.items()


def _kfunc_obstacle(layouts: list[EventLayout]) -> str | None:
    """Why the fentry/fexit variant cannot work here, found without compiling it: a function
    the kernel refuses fentry on fails the whole object, so the kernel is asked first."""
    funcs = [lay.func for lay in layouts if lay.func is not None]
    return next((err for f in funcs
                 if (err := fentry_refusal(f.func, f.btf_id, f.exit)) is not None), None)




def _err_text(e: Exception) -> str:
    """bcc's errors end with the line that says why; the rest is context."""
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


@contextlib.contextmanager
def _quiet_stderr():
    """libbcc and libbpf print to fd 2 directly; a refused trial probe is expected here."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
