#!/usr/bin/env python3
"""ptwalk_probe.py — prove khmon.capture.ptwalk on a real kernel: a kprobe on khugepaged's per-PMD
scan entry walks the PMD's PTE table in BPF, and every walk must match the workload's pattern.

    tests/vm/run.sh 6.1 '.venv/bin/python tests/vm/ptwalk_probe.py [--zram]'

For each of the workload patterns (full, every4th-empty, first-half, one-page, random) it
runs `python -m khmon.workload --pmds 4 --pattern P`, and for every PMD of the workload
checks that the first walk succeeded (the PMD was a page table when khugepaged first
scanned it) and that every successful walk's present bitmap equals
khmon.workload.pattern_bits(P, seed) exactly, with no swap or zero-page PTEs. Walks of a
PMD khugepaged has already collapsed must say so (huge PMD), not give a bitmap.

A last case, run by this script itself, checks the zero-page and swap bitmaps against
/proc/self/pagemap and /proc/kpageflags: pages only read map the zero page, some written
pages are paged out (MADV_PAGEOUT) to a zram swap device, which --zram sets up (and takes
down) for the run; without swap the paged-out pages stay present and swap is untested.

khugepaged knobs and kernel.bpf_stats_enabled are restored on exit. Exits 0 on PASS.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "daemon"))

from khmon.capture import ptwalk  # noqa: E402
from khmon.kernel import kallsyms  # noqa: E402
from khmon.workload import PMD_SIZE, PTES, anon_huge_kb, full_scans, pattern_bits  # noqa: E402

PATTERNS = ("full", "every4th-empty", "first-half", "one-page", "random")
SEED = 7
PMDS = 4
FUNC = "hpage_collapse_scan_pmd"
KNOBS = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "0",
         "khugepaged/pages_to_scan": "4096"}
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
PAGE = mmap.PAGESIZE
MADV_PAGEOUT = 21
KPF_ZERO_PAGE = 24

# struct ptw_event below: header, then struct khmon_ptbits.
EVENT_HDR = struct.Struct("<QQQIiQ")

PROGRAM = r"""
#include <uapi/linux/ptrace.h>
%(ptwalk)s
struct ptw_event {
    u64 ts, mm, address;
    u32 tgid;
    s32 rc;
    u64 walk_ns;
    struct khmon_ptbits bits;
};
BPF_RINGBUF_OUTPUT(ptw_events, 4096);
BPF_ARRAY(ptw_target, u32, 1);
BPF_ARRAY(ptw_lost, u64, 1);

int ptw_probe(struct pt_regs *ctx)
{
    u64 mm = PT_REGS_PARM1(ctx), address = PT_REGS_PARM3(ctx), owner = 0;
    u32 tgid = 0, key = 0;
    bpf_probe_read_kernel(&owner, sizeof(owner), (void *)(mm + %(mm_owner)d));
    if (owner)
        bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)(owner + %(task_tgid)d));
    u32 *target = ptw_target.lookup(&key);
    if (!target || !*target || *target != tgid)
        return 0;
    struct ptw_event *e = ptw_events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        u64 *lost = ptw_lost.lookup(&key);
        if (lost)
            __sync_fetch_and_add(lost, 1);
        return 0;
    }
    e->mm = mm;
    e->address = address;
    e->tgid = tgid;
    u64 t0 = bpf_ktime_get_ns();
    e->rc = khmon_ptwalk(mm, address, &e->bits);
    e->ts = bpf_ktime_get_ns();
    e->walk_ns = e->ts - t0;
    ptw_events.ringbuf_submit(e, 0);
    return 0;
}
"""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# The zero-page/swap workload (this script, run as a child with --child-zero-swap)


def _pagemap_truth(start: int, npmds: int) -> list[str]:
    """Per PMD, one character per PTE: 'z' zero page, 'p' present, 's' swap, 'n' none."""
    out = []
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        for p in range(npmds):
            pm.seek((start + p * PMD_SIZE) // PAGE * 8)
            ents = struct.unpack(f"<{PTES}Q", pm.read(PTES * 8))
            row = []
            for ent in ents:
                if ent >> 63 & 1:
                    pfn = ent & ((1 << 55) - 1)
                    kf.seek(pfn * 8)
                    flags = struct.unpack("<Q", kf.read(8))[0]
                    row.append("z" if flags >> KPF_ZERO_PAGE & 1 else "p")
                elif ent >> 62 & 1:
                    row.append("s")
                else:
                    row.append("n")
            out.append("".join(row))
    return out


def child_zero_swap(npmds: int, timeout: float) -> int:
    """PTE i of each PMD: i%4 == 0 read (zero page), 1 written, 2 written then paged out,
    3 untouched. Prints {"ready", "pid", "start", "truth"} and waits for 2 full scans."""
    length = npmds * PMD_SIZE
    m = mmap.mmap(-1, length + PMD_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = (-base) % PMD_SIZE
    m.madvise(mmap.MADV_NOHUGEPAGE, off, length)
    for p in range(npmds):
        for i in range(PTES):
            at = off + p * PMD_SIZE + i * PAGE
            if i % 4 == 0:
                _ = m[at]
            elif i % 4 in (1, 2):
                m[at] = 1
    for p in range(npmds):
        for i in range(2, PTES, 4):
            with contextlib.suppress(OSError):
                m.madvise(MADV_PAGEOUT, off + p * PMD_SIZE + i * PAGE, PAGE)
    start = base + off
    truth = _pagemap_truth(start, npmds)
    m.madvise(mmap.MADV_HUGEPAGE, off, length)
    print(json.dumps({"ready": True, "pid": os.getpid(), "start": hex(start), "pmds": npmds,
                      "truth": truth}), flush=True)
    scans_from, deadline = full_scans(), time.monotonic() + timeout
    while time.monotonic() < deadline and full_scans() - scans_from < 2:
        time.sleep(0.1)
    print(json.dumps({"done": True,
                      "collapsed_pmds": anon_huge_kb(start, length) * 1024 // PMD_SIZE}),
          flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# Setup and teardown


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    try:
        old = BPF_STATS.read_text().strip()
        BPF_STATS.write_text("1")
    except OSError:
        yield
        return
    try:
        yield
    finally:
        BPF_STATS.write_text(old)


@contextlib.contextmanager
def zram_swap(enable: bool) -> Iterator[bool]:
    """A 64 MiB zram swap device for the run, if asked for and none exists; True if swap is on."""
    if not enable:
        yield bool(Path("/proc/swaps").read_text().count("\n") > 1)
        return
    dev = Path("/sys/block/zram0")
    if dev.exists():
        log("zram0 exists already: not touching it")
        yield bool(Path("/proc/swaps").read_text().count("\n") > 1)
        return
    loaded = on = False
    try:
        subprocess.run(["modprobe", "zram", "num_devices=1"], check=True)
        loaded = True
        (dev / "disksize").write_text("64M")
        subprocess.run(["mkswap", "/dev/zram0"], check=True, capture_output=True)
        subprocess.run(["swapon", "/dev/zram0"], check=True)
        on = True
        log("swap: 64 MiB zram0 on")
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"swap: could not set up zram ({e}); swap bitmap untested")
    try:
        yield on
    finally:
        if on:
            subprocess.run(["swapoff", "/dev/zram0"], check=False)
        if loaded:
            with contextlib.suppress(OSError):
                (dev / "reset").write_text("1")
            subprocess.run(["rmmod", "zram"], check=False)


# ---------------------------------------------------------------------------------------
# Checking


class Walks:
    """Events from the ring buffer, per tgid."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, int, int, ptwalk.PtBits]] = []

    def __call__(self, _ctx: object, data: int, size: int) -> int:
        raw = ctypes.string_at(data, size)
        _ts, _mm, address, tgid, rc, walk_ns = EVENT_HDR.unpack_from(raw)
        self.events.append((tgid, address, rc, walk_ns, ptwalk.decode(raw, EVENT_HDR.size)))
        return 0

    def of(self, pid: int) -> list[tuple[int, int, int, ptwalk.PtBits]]:
        return [(a, rc, ns, b) for t, a, rc, ns, b in self.events if t == pid]


def check_pmds(name: str, walks: list, start: int, expect: list[list[str]],
               zero_known: bool) -> tuple[bool, list[str]]:
    """expect: per PMD, per PTE one of 'p', 'z', 's', 'n'. Returns (ok, lines)."""
    ok, lines = True, []
    for p, want in enumerate(expect):
        addr = start + p * PMD_SIZE
        mine = [(rc, b) for a, rc, _ns, b in walks if a == addr]
        rcs = Counter(ptwalk.describe(rc) if rc else "bitmap" for rc, _b in mine)
        bad = []
        if not mine:
            bad.append("never walked")
        elif mine[0][0] != 0:
            bad.append(f"first walk: {ptwalk.describe(mine[0][0])}")
        want_p = [c in "pz" for c in want]
        want_s = [c == "s" for c in want]
        want_z = [c == "z" for c in want] if zero_known else [False] * PTES
        for rc, b in mine:
            if rc == ptwalk.OK:
                diffs = [i for i in range(PTES) if b.present[i] != want_p[i]]
                if diffs:
                    bad.append(f"present differs at {len(diffs)} PTEs (first {diffs[:8]})")
                if b.swap != want_s:
                    bad.append(f"swap bitmap differs ({sum(b.swap)} set, {sum(want_s)} expected)")
                if b.zero != want_z:
                    bad.append(f"zero bitmap differs ({sum(b.zero)} set, {sum(want_z)} expected)")
                counts = (b.npresent, b.none, b.nswap, b.nzero)
                expect_counts = (sum(want_p), want.count("n"), sum(want_s), sum(want_z))
                if counts != expect_counts:
                    bad.append(f"counts present/none/swap/zero {counts} != {expect_counts}")
                if b.levels not in (4, 5):
                    bad.append(f"levels {b.levels}")
            elif rc != ptwalk.E_PMD_HUGE:
                bad.append(f"walk failed: {ptwalk.describe(rc)}")
            if bad:
                break
        ok &= not bad
        detail = ", ".join(f"{k} x{v}" for k, v in sorted(rcs.items()))
        lines.append(f"  {name} PMD {p} @ {addr:#x}: {'ok' if not bad else 'FAIL'} "
                     f"({detail})" + (f": {'; '.join(bad)}" if bad else ""))
    return ok, lines


def run_workload(bpf, walks: Walks, argv: list[str], timeout: float) -> tuple[dict, list]:
    """Start a workload, aim the probe at its pid, poll until it exits; (its JSON, walks)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    target = bpf[b"ptw_target"]
    target[target.Key(0)] = target.Leaf(proc.pid)
    deadline = time.monotonic() + timeout + 60
    while proc.poll() is None and time.monotonic() < deadline:
        bpf.ring_buffer_poll(20)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    for _ in range(3):
        bpf.ring_buffer_poll(100)
    target[target.Key(0)] = target.Leaf(0)
    info: dict = {}
    for line in out.splitlines():
        if line.strip():
            info.update(json.loads(line))
    return info, walks.of(proc.pid)


def prog_stats(bpf) -> dict[str, int]:
    fd = bpf.funcs[b"ptw_probe"].fd
    out = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("run_time_ns", "run_cnt", "verified_insns", "prog_id"):
            out[k] = int(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zram", action="store_true", help="set up a zram swap device for the run")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--child-zero-swap", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_zero_swap:
        return child_zero_swap(PMDS, args.timeout)

    from bcc import BPF

    from khmon.capture.loader import CFLAGS
    from khmon.kernel import sysfs
    from khmon.kernel.btf import Btf

    btf = Btf.from_kernel()
    plan, why = ptwalk.plan_or_reason(btf, kallsyms.addresses(ptwalk.SYMBOLS))
    if plan is None:
        log(f"FAIL: no ptwalk plan on this kernel: {why}")
        return 1
    pm = f"@ {plan.physical_mask:#x}" if plan.physical_mask else "absent"
    log(f"plan: mm_struct.pgd at {plan.mm_pgd}, page_offset_base @ {plan.page_offset_base:#x}, "
        f"paging {plan.paging}, physical_mask {pm}, "
        f"zero page via {plan.zero_page or 'nothing (undetected)'}")
    owner, tgid = btf.member_offset("mm_struct", "owner"), btf.member_offset("task_struct", "tgid")
    if owner is None or tgid is None:
        log("FAIL: this probe needs mm_struct.owner (CONFIG_MEMCG) to aim at the workload")
        return 1
    src = PROGRAM % {"ptwalk": ptwalk.c_code(plan), "mm_owner": owner, "task_tgid": tgid}
    t0 = time.monotonic()
    bpf = BPF(text=src.encode(), cflags=CFLAGS)
    bpf.attach_kprobe(event=FUNC.encode(), fn_name=b"ptw_probe")
    insns = len(bpf.dump_func(b"ptw_probe")) // 8
    log(f"compiled, loaded and attached a kprobe on {FUNC} in {time.monotonic() - t0:.1f} s "
        f"({insns} BPF instructions)")
    walks = Walks()
    bpf[b"ptw_events"].open_ring_buffer(walks)

    results: list[tuple[str, bool]] = []
    lines: list[str] = []
    all_walks: list = []
    with bpf_stats(), sysfs.override(KNOBS), zram_swap(args.zram) as swap_on:
        stats_from = prog_stats(bpf)
        for pattern in PATTERNS:
            argv = [sys.executable, "-m", "khmon.workload", "--pmds", str(PMDS), "--pattern",
                    pattern, "--seed", str(SEED), "--timeout", str(args.timeout)]
            info, mine = run_workload(bpf, walks, argv, args.timeout)
            if "start" not in info:
                results.append((pattern, False))
                lines.append(f"  {pattern}: workload did not start: {info}")
                continue
            bits = pattern_bits(pattern, SEED)
            want = ["".join("p" if b else "n" for b in bits)] * PMDS
            ok, out = check_pmds(pattern, mine, int(info["start"], 16), want, plan.zero_page != "")
            lines += out
            lines.append(f"  {pattern}: {len(mine)} walks, {sum(bits)} present per PMD, "
                         f"collapsed {info.get('collapsed_pmds')}/{PMDS}")
            results.append((pattern, ok))
            all_walks += mine
        argv = [sys.executable, str(Path(__file__).resolve()), "--child-zero-swap",
                "--timeout", str(args.timeout)]
        info, mine = run_workload(bpf, walks, argv, args.timeout)
        if "truth" in info:
            truth = info["truth"]
            kinds = Counter("".join(truth))
            ok, out = check_pmds("zero/swap", mine, int(info["start"], 16), truth,
                                 plan.zero_page != "")
            lines += out
            lines.append(f"  zero/swap: {len(mine)} walks; per pagemap/kpageflags over {PMDS} PMDs: "
                         f"{kinds['p']} present, {kinds['z']} zero page, {kinds['s']} swap, "
                         f"{kinds['n']} none; swap device {'on' if swap_on else 'off'}")
            if not kinds["z"]:
                lines.append("  zero/swap: no zero-page PTEs were made: zero detection untested")
            if not kinds["s"]:
                lines.append("  zero/swap: no swap PTEs were made: swap detection untested")
            results.append(("zero/swap", ok))
            all_walks += mine
        else:
            results.append(("zero/swap", False))
            lines.append(f"  zero/swap: workload did not start: {info}")
        stats_to = prog_stats(bpf)
    lost_map = bpf[b"ptw_lost"]
    lost = lost_map[lost_map.Key(0)].value

    log("\n".join(lines))
    cnt = stats_to.get("run_cnt", 0) - stats_from.get("run_cnt", 0)
    ns = stats_to.get("run_time_ns", 0) - stats_from.get("run_time_ns", 0)
    walk_ns = sorted(ns_ for _a, rc, ns_, _b in all_walks if rc == ptwalk.OK)
    huge_ns = sorted(ns_ for _a, rc, ns_, _b in all_walks if rc == ptwalk.E_PMD_HUGE)
    log(f"cost: verified_insns {stats_to.get('verified_insns')}, {insns} instructions; "
        f"bpf_stats run_cnt {cnt}, run_time_ns {ns}"
        + (f" = {ns / cnt:.0f} ns per call (whole program, kprobe hits of other mms included)"
           if cnt else ""))
    if walk_ns:
        log(f"cost: in-program ktime around khmon_ptwalk: full walk median "
            f"{walk_ns[len(walk_ns) // 2]} ns (n={len(walk_ns)})"
            + (f", huge-PMD early exit median {huge_ns[len(huge_ns) // 2]} ns (n={len(huge_ns)})"
               if huge_ns else ""))
    levels = Counter(b.levels for _a, rc, _ns, b in all_walks if rc == ptwalk.OK)
    log(f"walks checked: {sum(levels.values())} bitmaps, paging levels seen {dict(levels)}; "
        f"{len(all_walks)} walks in all; ring buffer: {lost} events lost (lost walks go "
        "unchecked; every PMD's first walk must be among those seen)")
    failed = [name for name, ok in results if not ok]
    log(("PASS" if not failed else "FAIL") + f": ptwalk on {os.uname().release}: "
        + ", ".join(f"{name} {'ok' if ok else 'FAIL'}" for name, ok in results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
