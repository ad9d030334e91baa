"""pagemap on the live kernel: read_pmd's bitmaps against the workload's known patterns, the
zero page and shared pages in this process, and PfnIndex finding each PMD from a PFN.

THP is set to enabled=never while a workload runs (restored afterwards, whatever
happens), so khugepaged cannot collapse its PMDs between the reads: a collapsed "full"
PMD would change its PFNs under PfnIndex.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from khmon.bitmap import to_bytes, to_hex
from khmon.kernel import sysfs
from khmon.kernel.pagemap import PfnIndex, read_pmd
from khmon.workload import pattern_bits

pytestmark = pytest.mark.live
PAGE = 4096
PMD = 2 << 20


def expected_bitmap(bits: list[bool]) -> bytes:
    """PTE i -> bit i % 8 of byte i // 8, computed here rather than by khmon.kernel.pagemap."""
    out = bytearray(64)
    for i, present in enumerate(bits):
        if present:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def raw_entry(pid: int, addr: int) -> int:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        return struct.unpack("<Q", f.read(8))[0]


@contextmanager
def workload(*args: str) -> Iterator[dict]:
    """Start khmon.workload with THP collapse off, yield its "ready" line; always killed
    afterwards and the setting restored."""
    with sysfs.override({"enabled": "never"}), _workload(*args) as info:
        yield info


@contextmanager
def _workload(*args: str) -> Iterator[dict]:
    proc = subprocess.Popen([sys.executable, "-m", "khmon.workload", *args],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line, f"workload did not get ready (exit code {proc.poll()})"
        info = json.loads(line)
        assert info.get("ready"), info
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


@contextmanager
def own_pmd() -> Iterator[tuple[mmap.mmap, int, int]]:
    """One PMD-aligned 2 MiB region of this process, kept small-page (MADV_NOHUGEPAGE):
    yields (map, offset of the region in the map, its address)."""
    m = mmap.mmap(-1, 2 * PMD, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        off = (-base) % PMD
        yield m, off, base + off
    finally:
        m.close()


@pytest.mark.parametrize(("pattern", "seed"), [("full", 1), ("every4th-empty", 1), ("first-half", 1),
                                               ("one-page", 1), ("random", 7)])
def test_workload_patterns(pattern: str, seed: int) -> None:
    bits = pattern_bits(pattern, seed)
    want = expected_bitmap(bits)
    with workload("--pmds", "4", "--pattern", pattern, "--seed", str(seed),
                  "--timeout", "0", "--hold", "30") as info:
        pid, start = info["pid"], int(info["start"], 16)
        pmds = [start + p * PMD for p in range(4)]
        got = [read_pmd(pid, a) for a in pmds]  # all four first: khugepaged may be near
        for p, pages in enumerate(got):
            assert pages is not None, f"PMD {p} at {pmds[p]:#x} not readable"
            if pattern != "full" and to_bytes(pages.present) == b"\xff" * 64:
                pytest.fail(f"PMD {p} at {pmds[p]:#x} reads fully present: khugepaged collapsed it "
                            "before it was read, so the pattern cannot be checked")
            assert to_bytes(pages.present) == want, f"PMD {p}: {to_hex(pages.present)} != {want.hex()}"
            assert (pages.swap, pages.zero) == (0, 0)
            assert (pages.none, pages.shared) == (512 - sum(bits), 0)

        index = PfnIndex()
        first = bits.index(True)
        for p, addr in enumerate(pmds):
            e = raw_entry(pid, addr + first * PAGE)
            assert e >> 63, f"PMD {p} PTE {first} not present"
            pfn = e & ((1 << 55) - 1)
            assert index.pmd_of(pid, pfn) == addr, f"PMD {p}: PFN {pfn:#x}"
    # The workload is gone now: nothing to read, nothing to find.
    assert read_pmd(pid, pmds[0]) is None
    assert index.pmd_of(pid, pfn) is None


def test_zero_page() -> None:
    """Written PTEs are anon pages; read-only faults map the shared zero page."""
    with own_pmd() as (m, off, addr):
        for i in range(0, 512, 2):
            m[off + i * PAGE] = 1
        for i in range(1, 512, 4):
            assert m[off + i * PAGE] == 0  # read fault: the zero page
        pages = read_pmd(os.getpid(), addr)
        assert pages is not None
        # Per byte: written bits 0, 2, 4, 6 and zero-page bits 1, 5.
        assert to_bytes(pages.present) == b"\x77" * 64, to_hex(pages.present)
        assert to_bytes(pages.zero) == b"\x22" * 64, to_hex(pages.zero)
        assert (pages.none, pages.shared, pages.n_zero) == (128, 0, 128)


def test_shared_after_fork() -> None:
    """After fork the written pages are mapped by two processes: not exclusive."""
    with own_pmd() as (m, off, addr):
        for i in range(16):
            m[off + i * PAGE] = 1
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # keep the pages mapped until the parent has looked
            os.read(r, 1)
            os._exit(0)
        try:
            pages = read_pmd(os.getpid(), addr)
        finally:
            os.write(w, b"x")
            os.waitpid(child, 0)
            os.close(r)
            os.close(w)
        assert pages is not None
        assert to_bytes(pages.present) == b"\xff\xff" + b"\x00" * 62
        assert (pages.shared, pages.none, pages.n_zero) == (16, 496, 0)
