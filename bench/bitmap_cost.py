"""Bitmap sources: what each costs per PMD, in the kernel (kernel.bpf_stats_enabled).

Run where the kernel allows function probes (the 6.1 and 7.2 guests:
`make vm KERNEL=6.1 CMD='.venv/bin/python bench/bitmap_cost.py'`). A workload of PMDs with
every 4th page empty is scanned and collapsed by khugepaged (scan_sleep 100 ms,
max_ptes_none 511; every knob restored on the way out) while khmon is attached, once per
configuration:
  ptwalk     the per-PMD entry walks the PTE table (kernels without the mTHP series)
  no-ptwalk  the same probes without the walk
  kernel     (mTHP series) collapse_huge_page's entry reads cc->mthp_present_ptes, always on
It prints, per BPF program, calls and mean ns per call (run_time_ns / run_cnt), and how many
PMD records got a bitmap. The two user-space sources are timed first, on any kernel (the
host included): `pagemap`, reading one PMD's 512 pagemap entries and the kpageflags of its
pages (khmon.kernel.pagemap.read_pmd) on this process's own memory, and `inferred`, replaying one
pass's attempts through the v19 walk (khmon.model.infer.from_pass), for a one-attempt pass and for
the 63-attempt pass of a userfaultfd-armed PMD. The cost of a BPF source is the difference
of its program's ns/call between configurations, read side by side from one run. Under TCG
the numbers are emulated time: compare them with each other, not with a real machine.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

from khmon.capture.bpfgen import ProbeConfig
from khmon.capture.live import LiveCapture
from khmon.geometry import PAGE, PMD_SIZE
from khmon.kernel.pagemap import read_pmd
from khmon.kernel.sysfs import override
from khmon.model import infer
from khmon.model.khugepaged import Settings, simulate
from khmon.pipeline import capture
from khmon.workload import Workloads, pattern_bits

BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
KNOBS = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100",
         "khugepaged/max_ptes_none": "511"}


def prog_stats(cap: LiveCapture) -> dict[str, tuple[int, int]]:
    """(run_cnt, run_time_ns) of every function-probe program, by name."""
    out = {}
    for name, fn in cap.probes.bpf.funcs.items():
        name = name.decode()
        if "fn_" not in name and "vmlinux" not in name:
            continue
        info = {}
        with open(f"/proc/self/fdinfo/{fn.fd}") as f:
            for line in f:
                key, _, val = line.partition(":")
                info[key.strip()] = val.strip()
        out[name] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
    return out


def measure(label: str, cfg: ProbeConfig, pmds: int) -> None:
    cap = LiveCapture(cfg)
    try:
        if cap.probes.func_mode is None:
            print(f"{label}: no function probes on this kernel ({cap.probes.func_errors})")
            return
        before = prog_stats(cap)
        work = Workloads([["--pmds", str(pmds), "--pattern", "every4th-empty"]])
        try:
            agg, _ = capture(cfg, 120, None, work, reuse=cap)
        finally:
            work.kill()
        after = prog_stats(cap)
        r = agg.report()
        sources: dict[str, int] = {}
        for p in r["pmds"]:
            sources[p["bitmap_source"] or "none"] = sources.get(p["bitmap_source"] or "none", 0) + 1
        print(f"{label} ({cap.probes.func_mode}): {len(r['pmds'])} PMD records, bitmap sources "
              f"{sources}")
        for name, (cnt, ns) in sorted(after.items()):
            c0, n0 = before.get(name, (0, 0))
            calls, spent = cnt - c0, ns - n0
            per = f"{spent / calls:,.0f} ns/call" if calls else "not called"
            print(f"  {name:<48} {calls:>8,} calls  {per}")
    finally:
        cap.probes.close()


def user_sources(pmds: int) -> None:
    """Time the user-space sources per PMD: pagemap reads and the inference."""
    m = mmap.mmap(-1, (pmds + 1) * PMD_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = (-base) % PMD_SIZE
    m.madvise(mmap.MADV_NOHUGEPAGE, off, pmds * PMD_SIZE)  # small pages, as khugepaged sees them
    written = [i for i, present in enumerate(pattern_bits("every4th-empty", 1)) if present]
    for p in range(pmds):
        for i in written:
            m[off + p * PMD_SIZE + i * PAGE] = 1
    addrs = [base + off + p * PMD_SIZE for p in range(pmds)]
    rounds = max(1, 2000 // pmds)
    t = time.perf_counter()
    for _ in range(rounds):
        pages = [read_pmd(os.getpid(), a) for a in addrs]
    per = (time.perf_counter() - t) / (rounds * pmds)
    ok = sum(1 for pg in pages if pg is not None and pg.n_present == len(written))
    print(f"pagemap (user space): {per * 1e6:,.1f} us per PMD ({ok}/{pmds} PMDs read as "
          f"written)")
    del pages, m
    every4th = int.from_bytes(bytes([0x77]) * 64, "little")
    for label, present, settings in (
            ("1-attempt pass (full PMD, PMD order)", (1 << 512) - 1,
             Settings(frozenset({9}), max_ptes_none=0)),
            ("63-attempt pass (uffd, orders 4..9)", every4th,
             Settings(frozenset(range(4, 10)), uffd=True))):
        steps = [(a.offset, a.order, "succeeded" if a.succeeded else a.reason, False)
                 for a in simulate("v19", present, settings).attempts]
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            infer.from_pass(steps, settings)
        print(f"inferred (user space): {(time.perf_counter() - t) / n * 1e6:,.1f} us per "
              f"{label}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pmds", type=int, default=16, help="workload size in 2 MiB PMDs")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bitmap_cost.py needs root (BPF, sysfs knobs)", file=sys.stderr)
        return 1
    user_sources(args.pmds)
    saved = BPF_STATS.read_text().strip()
    try:
        BPF_STATS.write_text("1")
        with override(KNOBS):
            measure("ptwalk / kernel", ProbeConfig(), args.pmds)
            measure("no-ptwalk", ProbeConfig(ptwalk=False), args.pmds)
    finally:
        BPF_STATS.write_text(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
