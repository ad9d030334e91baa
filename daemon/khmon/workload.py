"""A workload that makes khugepaged do known work: PMD-aligned anonymous memory with a chosen
pattern of present pages, faulted in as small pages and then handed to khugepaged with
madvise(MADV_HUGEPAGE).

It is the ground truth for live tests and the demo: the test knows how many PMDs were fully
populated, and /proc/self/smaps (AnonHugePages) says how many the kernel collapsed. Run as
`python -m khmon.workload`; it prints one JSON line when its memory is ready and one when done.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from .geometry import PAGE, PMD_SIZE, PTES
from .kernel.sysfs import KHUGEPAGED

COMM = b"khmon-workload"
PR_SET_NAME = 15

PATTERNS: dict[str, Callable[[int, random.Random], bool]] = {
    "full": lambda i, _r: True,
    "every4th-empty": lambda i, _r: i % 4 != 3,
    "first-half": lambda i, _r: i < PTES // 2,
    "one-page": lambda i, _r: i == 0,
    "random": lambda _i, r: r.random() < 0.5,
}


def pattern_bits(pattern: str, seed: int = 1) -> list[bool]:
    """Which of a PMD's PTEs the workload populates, PTE 0 first."""
    rng = random.Random(seed)
    return [PATTERNS[pattern](i, rng) for i in range(PTES)]


def _set_comm(name: bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def anon_huge_kb(start: int, length: int) -> int:
    """AnonHugePages (kB) of this process's mappings inside [start, start+length)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < start + length and hi > start
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


# userfaultfd(2) on x86-64, and the two ioctls of linux/userfaultfd.h it needs.
SYS_USERFAULTFD = 323
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # struct uffdio_api {u64 api, features, ioctls}
UFFDIO_REGISTER = 0xC020AA00  # struct uffdio_register {u64 start, len, mode, ioctls}
UFFDIO_REGISTER_MODE_MISSING = 1


def _uffd_register(start: int, length: int) -> int:
    """Arm [start, start+length) with userfaultfd in missing mode; returns the uffd."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    api = (ctypes.c_uint64 * 3)(UFFD_API, 0, 0)
    reg = (ctypes.c_uint64 * 4)(start, length, UFFDIO_REGISTER_MODE_MISSING, 0)
    for req, arg in ((UFFDIO_API, api), (UFFDIO_REGISTER, reg)):
        if libc.ioctl(fd, ctypes.c_ulong(req), ctypes.byref(arg)) != 0:
            raise OSError(ctypes.get_errno(), f"ioctl {req:#x}")
    return fd


def full_scans() -> int:
    """khugepaged/full_scans: completed passes of khugepaged over every registered mm."""
    return int((KHUGEPAGED / "full_scans").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pmds", type=int, default=16, help="number of 2 MiB regions")
    ap.add_argument("--pattern", choices=sorted(PATTERNS), default="full")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random pattern")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for khugepaged before giving up")
    ap.add_argument("--full-scans", type=int, default=2,
                    help="wait until khugepaged has finished this many full passes over all "
                    "mm's after madvise (2 guarantees every PMD was scanned at least once)")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="seconds to keep the memory after the wait (for scans to repeat)")
    ap.add_argument("--delay", type=float, default=0.0,
                    help="seconds to wait before touching memory (lets a tracer attach first)")
    ap.add_argument("--uffd", action="store_true",
                    help="register the regions with userfaultfd (missing mode) before "
                    "madvise: the VMA is then userfaultfd-armed")
    ap.add_argument("--wait-signal", action="store_true",
                    help="wait for SIGUSR1 before touching memory (lets a tracer that needs "
                    "this pid, like khmon record -p, attach first)")
    ap.add_argument("--comm", default=COMM.decode(),
                    help="the process name to take (prctl PR_SET_NAME; the kernel keeps 15 "
                    "bytes): a test's hostile name such as '[/]'")
    args = ap.parse_args(argv)
    _set_comm(args.comm.encode())
    if args.wait_signal:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        print(json.dumps({"waiting": True, "pid": os.getpid()}), flush=True)
        signal.sigwait({signal.SIGUSR1})
    time.sleep(args.delay)

    length = args.pmds * PMD_SIZE
    m = mmap.mmap(-1, length + PMD_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = (-base) % PMD_SIZE  # first 2 MiB boundary inside the mapping
    # Small pages first: no MADV_HUGEPAGE yet, so faults cannot allocate huge pages
    # (THP enabled=madvise), leaving the collapse to khugepaged.
    m.madvise(mmap.MADV_NOHUGEPAGE, off, length)
    bits = pattern_bits(args.pattern, args.seed)
    for p in range(args.pmds):
        for i, present in enumerate(bits):
            if present:
                m[off + p * PMD_SIZE + i * PAGE] = 1
    start = base + off
    uffd = _uffd_register(start, length) if args.uffd else None
    m.madvise(mmap.MADV_HUGEPAGE, off, length)
    print(json.dumps({"ready": True, "pid": os.getpid(), "comm": args.comm,
                      "start": hex(start), "pmds": args.pmds, "pattern": args.pattern}),
          flush=True)
    want_kb = args.pmds * PMD_SIZE // 1024 if args.pattern == "full" else 0
    scans_from = full_scans()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and (
            anon_huge_kb(start, length) < want_kb or full_scans() - scans_from < args.full_scans):
        time.sleep(0.1)
    time.sleep(args.hold)
    huge = anon_huge_kb(start, length)
    print(json.dumps({"done": True, "collapsed_pmds": huge * 1024 // PMD_SIZE}), flush=True)
    # Unmap before closing the userfaultfd: closing it disarms the VMA, and khugepaged would
    # then be free to try the region as a plain MADV_HUGEPAGE one (an attempt no test expects).
    m.close()
    if uffd is not None:
        os.close(uffd)
    return 0


class Workloads:
    """Workload processes started once a capture is attached, for the demo and live tests.

    Use as the capture's should_stop: the first call starts them (so nothing they cause
    happens before the probes are attached); the capture stops when all have exited.
    """

    def __init__(self, runs: list[list[str]]) -> None:
        self.runs = runs
        self.procs: list[subprocess.Popen[str]] = []

    def __call__(self) -> bool:
        if not self.procs:
            self.procs = [subprocess.Popen([sys.executable, "-m", "khmon.workload", *args],
                                           stdout=subprocess.PIPE, text=True)
                          for args in self.runs]
        return all(p.poll() is not None for p in self.procs)

    def results(self) -> list[dict]:
        """Each workload's JSON lines merged: pid, comm, start, pmds, collapsed_pmds ..."""
        out = []
        for p in self.procs:
            text = p.communicate()[0] if p.poll() is not None or p.stdout else ""
            merged: dict = {}
            for line in text.splitlines():
                if line.strip():
                    merged.update(json.loads(line))
            out.append(merged)
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
