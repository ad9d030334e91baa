"""pagemap: per-PMD bitmaps and the PFN index against fake /proc trees.

The fake trees hold real-format files: PID/pagemap and kpageflags with one little-endian u64
per page / PFN at offset index * 8 (sparse files), and a PID/maps in the kernel's format.
Expected bitmaps are written out by hand: bit k of byte j is PTE 8j+k.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest

from khmon.bitmap import to_bytes, to_hex
from khmon.capture.pagemap_sampler import PagemapSampler, PagemapWorker
from khmon.errors import KhmonError
from khmon.kernel import pagemap
from khmon.kernel.pagemap import PfnIndex, read_pmd

PID = 4242
BASE = 0x4000_0000  # 1 GiB: low, so the sparse pagemap file stays small
PMD = 2 << 20
PRESENT = 1 << 63
SWAPPED = 1 << 62
FILE = 1 << 61
EXCL = 1 << 56
SOFT_DIRTY = 1 << 55  # set on holes of a fresh VMA: must not read as present
KPF_ZERO = 1 << 24
KPF_ANON = 1 << 12
ZERO_PFN = 0x777  # deliberately not the x86 zero page's usual PFN


def anon(pfn: int) -> int:
    """A present, exclusively mapped anonymous page."""
    return PRESENT | EXCL | pfn


def make_proc(tmp_path: Path, entries: dict[int, int], *, kpf: dict[int, int] | None = None,
              maps: list[tuple[int, int, int, str]] | None = None, pid: int = PID,
              span: tuple[int, int] = (BASE, BASE + 4 * PMD)) -> Path:
    """A fake /proc: pagemap covering `span` (SOFT_DIRTY holes unless `entries` says
    otherwise), the given maps lines (start, end, inode, name) and kpageflags."""
    root = tmp_path / "proc"
    d = root / str(pid)
    d.mkdir(parents=True)
    lo, hi = span
    with open(d / "pagemap", "wb") as f:
        f.seek(lo // 4096 * 8)
        f.write(struct.pack("<Q", SOFT_DIRTY) * ((hi - lo) // 4096))
        for addr, value in entries.items():
            f.seek(addr // 4096 * 8)
            f.write(struct.pack("<Q", value))
    lines = [f"{s:012x}-{e:012x} rw-p 00000000 {'08:01' if ino else '00:00'} {ino:<10d} {name}".rstrip()
             for s, e, ino, name in (maps if maps is not None else [(BASE, BASE + 4 * PMD, 0, "")])]
    (d / "maps").write_text("".join(line + "\n" for line in lines))
    with open(root / "kpageflags", "wb") as f:
        f.seek(0x20_0000 * 8)  # the file covers PFNs up to 2M, like a real one up to max_pfn
        f.write(b"\0" * 8)
        for pfn, flags in (kpf or {}).items():
            f.seek(pfn * 8)
            f.write(struct.pack("<Q", flags))
    return root


def pte(i: int, pmd: int = 0) -> int:
    return BASE + pmd * PMD + i * 4096


# --- read_pmd -------------------------------------------------------------------------------

def test_full(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(i): anon(0x10000 + i) for i in range(512)})
    got = read_pmd(PID, BASE, root)
    assert got is not None
    assert to_bytes(got.present) == b"\xff" * 64
    assert to_bytes(got.swap) == b"\x00" * 64
    assert to_bytes(got.zero) == b"\x00" * 64
    assert (got.none, got.shared, got.n_present, got.n_swap, got.n_zero) == (0, 0, 512, 0, 0)
    assert to_hex(got.present) == "ff" * 64


def test_every_fourth_empty(tmp_path: Path) -> None:
    # PTEs 3, 7, 11 ... empty: each byte has bits 0,1,2,4,5,6 set = 0b0111_0111.
    root = make_proc(tmp_path, {pte(i): anon(0x10000 + i) for i in range(512) if i % 4 != 3})
    got = read_pmd(PID, BASE, root)
    assert got is not None
    assert to_bytes(got.present) == b"\x77" * 64
    assert got.none == 128
    assert to_hex(got.present) == "77" * 64


def test_first_half(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(i): anon(0x10000 + i) for i in range(256)})
    got = read_pmd(PID, BASE, root)
    assert got is not None
    assert to_bytes(got.present) == b"\xff" * 32 + b"\x00" * 32
    assert got.none == 256


def test_one_page_in_the_second_pmd(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(0, pmd=1): anon(0x12345)})
    got = read_pmd(PID, BASE + PMD, root)
    assert got is not None
    assert to_bytes(got.present) == b"\x01" + b"\x00" * 63
    assert to_hex(got.present) == "01" + "00" * 63
    assert got.none == 511
    # The neighbouring PMD is mapped but empty: a result, not None.
    empty = read_pmd(PID, BASE, root)
    assert empty is not None
    assert to_bytes(empty.present) == b"\x00" * 64 and empty.none == 512


def test_swapped_entries(tmp_path: Path) -> None:
    # PTEs 0-3 present; 8, 9 and 511 swapped (swap type 1, offsets in bits 5-54).
    entries = {pte(i): anon(0x10000 + i) for i in range(4)}
    entries |= {pte(i): SWAPPED | (i << 5) | 1 for i in (8, 9, 511)}
    root = make_proc(tmp_path, entries)
    got = read_pmd(PID, BASE, root)
    assert got is not None
    assert to_bytes(got.present) == b"\x0f" + b"\x00" * 63
    assert to_bytes(got.swap) == b"\x00\x03" + b"\x00" * 61 + b"\x80"
    assert (got.none, got.n_swap, got.shared) == (505, 3, 0)


def test_zero_page_is_present_and_marked(tmp_path: Path) -> None:
    # PTEs 0-4 and 6 are anon pages, PTE 5 and 9 map the zero page (present, neither
    # exclusive nor file: what pagemap shows for it), kpageflags says which PFN it is.
    entries = {pte(i): anon(0x10000 + i) for i in (0, 1, 2, 3, 4, 6)}
    entries |= {pte(5): PRESENT | ZERO_PFN, pte(9): PRESENT | ZERO_PFN}
    root = make_proc(tmp_path, entries, kpf={ZERO_PFN: KPF_ZERO, 0x10000: KPF_ANON})
    got = read_pmd(PID, BASE, root)
    assert got is not None
    assert to_bytes(got.present) == b"\x7f\x02" + b"\x00" * 62
    assert to_bytes(got.zero) == b"\x20\x02" + b"\x00" * 62
    assert (got.n_zero, got.shared, got.none) == (2, 0, 504)


def test_shared_entry(tmp_path: Path) -> None:
    # PTE 100 is an anon page mapped by another process too (no bit 56), PTE 200 a file
    # page: both shared; neither is the zero page (kpageflags says anon / nothing).
    entries = {pte(i): anon(0x10000 + i) for i in range(8)}
    entries |= {pte(100): PRESENT | 0x20000, pte(200): PRESENT | FILE | EXCL | 0x30000}
    root = make_proc(tmp_path, entries, kpf={0x20000: KPF_ANON})
    got = read_pmd(PID, BASE, root)
    assert got is not None
    # PTE 100 is byte 12 bit 4; PTE 200 is byte 25 bit 0.
    want = bytearray(64)
    want[0], want[12], want[25] = 0xFF, 0x10, 0x01
    assert to_bytes(got.present) == bytes(want)
    assert to_bytes(got.zero) == b"\x00" * 64
    assert (got.shared, got.none) == (2, 502)


def test_vanished_process(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(0): anon(0x10000)})
    assert read_pmd(PID + 1, BASE, root) is None


def test_process_without_mm_reads_empty(tmp_path: Path) -> None:
    # An exited (zombie) process's pagemap opens but reads 0 bytes.
    root = make_proc(tmp_path, {})
    (root / str(PID) / "pagemap").write_bytes(b"")
    assert read_pmd(PID, BASE, root) is None


def test_unmapped_range(tmp_path: Path) -> None:
    # pagemap reads all-zero past the VMA; maps says nothing is there.
    root = make_proc(tmp_path, {}, span=(BASE, BASE + 8 * PMD))
    assert read_pmd(PID, BASE + 5 * PMD, root) is None


def test_unaligned_address_is_a_bug(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {})
    with pytest.raises(ValueError):
        read_pmd(PID, BASE + 4096, root)


def test_hidden_pfns_are_an_error(tmp_path: Path) -> None:
    # Without CAP_SYS_ADMIN the kernel reports PFN 0 for every page.
    root = make_proc(tmp_path, {pte(0): PRESENT})
    with pytest.raises(KhmonError, match="run khmon as root"):
        read_pmd(PID, BASE, root)


def test_permission_denied_is_a_khmon_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_proc(tmp_path, {pte(0): anon(0x10000)})
    real_open = os.open

    def deny(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if str(path).endswith("pagemap"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(pagemap.os, "open", deny)
    with pytest.raises(KhmonError) as err:
        read_pmd(PID, BASE, root)
    assert "permission denied" in err.value.problem
    assert "root" in err.value.fix


# --- PfnIndex ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


FILE_VMA = (BASE + 4 * PMD, BASE + 6 * PMD, 1234, "/usr/lib/libfoo.so")
SMALL_VMA = (BASE + 6 * PMD, BASE + 6 * PMD + 0x10000, 0, "")
INDEX_MAPS = [(BASE, BASE + 4 * PMD, 0, ""), FILE_VMA, SMALL_VMA]


def index_entries() -> dict[int, int]:
    entries = {pte(0, 0): anon(0x5000), pte(7, 2): anon(0x5001)}  # one run each
    entries |= {pte(i, 3): anon(0x8000 + i) for i in range(512)}  # one run of 512
    entries[pte(3, 4)] = PRESENT | FILE | 0x6000  # file VMA: not indexed
    entries[pte(1, 6)] = anon(0x6001)  # anon, but smaller than a PMD: not indexed
    return entries


@pytest.mark.parametrize("chunk", [1 << 20, 64])  # 64 bytes: runs cross chunk boundaries
def test_index_finds_the_pmd(tmp_path: Path, chunk: int) -> None:
    root = make_proc(tmp_path, index_entries(), maps=INDEX_MAPS, span=(BASE, BASE + 7 * PMD))
    idx = PfnIndex(root, chunk=chunk)
    assert idx.pmd_of(PID, 0x5000) == BASE
    assert idx.pmd_of(PID, 0x5001) == BASE + 2 * PMD
    assert idx.pmd_of(PID, 0x8000) == BASE + 3 * PMD
    assert idx.pmd_of(PID, 0x8000 + 300) == BASE + 3 * PMD
    assert idx.pmd_of(PID, 0x8000 + 511) == BASE + 3 * PMD
    assert idx.refresh(PID) == 514


def test_index_misses(tmp_path: Path) -> None:
    root = make_proc(tmp_path, index_entries(), maps=INDEX_MAPS, span=(BASE, BASE + 7 * PMD))
    idx = PfnIndex(root)
    assert idx.pmd_of(PID, 0x6000) is None  # file page
    assert idx.pmd_of(PID, 0x6001) is None  # VMA too small for a PMD
    assert idx.pmd_of(PID, 0x7FFF) is None  # just before a run
    assert idx.pmd_of(PID, 0x8000 + 512) is None  # just after it
    assert idx.pmd_of(PID, -1) is None  # the tracepoint's "no folio"
    assert idx.pmd_of(PID, (1 << 64) - 1) is None
    assert idx.pmd_of(PID + 1, 0x5000) is None  # no such process
    assert idx.refresh(PID + 1) is None


def test_index_rebuilds_at_most_once_a_second(tmp_path: Path) -> None:
    root = make_proc(tmp_path, index_entries(), maps=INDEX_MAPS, span=(BASE, BASE + 7 * PMD))
    clock = Clock()
    idx = PfnIndex(root, clock=clock)
    assert idx.pmd_of(PID, 0x5000) == BASE
    # The process faults in a new page in PMD 1 and moves PFN 0x5000 to PMD 2.
    with open(root / str(PID) / "pagemap", "r+b") as f:
        for addr, value in ((pte(9, 1), anon(0x9000)), (pte(0, 0), 0), (pte(100, 2), anon(0x5000))):
            f.seek(addr // 4096 * 8)
            f.write(struct.pack("<Q", value))
    clock.now += 0.5
    assert idx.pmd_of(PID, 0x9000) is None  # miss, but built 0.5 s ago: no rebuild
    assert idx.pmd_of(PID, 0x5000) is None  # stale hit is caught, no rebuild either
    clock.now += 0.6
    assert idx.pmd_of(PID, 0x9000) == BASE + PMD
    assert idx.pmd_of(PID, 0x5000) == BASE + 2 * PMD


def test_index_hidden_pfns_are_an_error(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(0): PRESENT | EXCL})
    with pytest.raises(KhmonError, match="run khmon as root"):
        PfnIndex(root).pmd_of(PID, 0x5000)


def test_maps_parsing(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {}, maps=[(BASE, BASE + PMD, 0, "[heap]"), FILE_VMA,
                                         (BASE + 8 * PMD, BASE + 9 * PMD, 0, "[anon:jemalloc]"),
                                         (BASE + 9 * PMD, BASE + 10 * PMD, 0, "[vdso]")])
    vmas = pagemap.read_maps(PID, root)
    assert vmas is not None
    assert [(v.start, v.end, v.inode, v.name, v.anonymous) for v in vmas] == [
        (BASE, BASE + PMD, 0, "[heap]", True),
        (BASE + 4 * PMD, BASE + 6 * PMD, 1234, "/usr/lib/libfoo.so", False),
        (BASE + 8 * PMD, BASE + 9 * PMD, 0, "[anon:jemalloc]", True),
        (BASE + 9 * PMD, BASE + 10 * PMD, 0, "[vdso]", False),
    ]
    assert pagemap.read_maps(PID + 1, root) is None


# --- PagemapSampler ---------------------------------------------------------------------------

VMEMMAP = 0xFFFF_EA00_0000_0000  # x86-64's vmemmap_base without KASLR: 1 GiB aligned


def test_sampler_turns_a_folio_pointer_into_the_pmd_around_it(tmp_path: Path) -> None:
    # The second PMD, every 4th PTE empty; its PTE 5 maps pfn 0x10005. A raw tracepoint
    # names that page by its struct page pointer, vmemmap + pfn * 64.
    root = make_proc(tmp_path, {pte(i, 1): anon(0x10000 + i) for i in range(512) if i % 4 != 3})
    s = PagemapSampler("folio", "pointer", 64, root)
    got = s.sample(0xAA, PID, VMEMMAP + 0x10005 * 64)
    assert got is not None
    assert (got["pid"], got["pfn"], got["address"]) == (PID, 0x10005, BASE + PMD)
    assert (got["present"], got["none"], got["shared"]) == ("77" * 64, 128, 0)
    # the same page again: sampled once per capture
    assert s.sample(0xAA, PID, VMEMMAP + 0x10005 * 64) is None
    # a page the process does not map, and no owner: nothing, the first counted
    assert s.sample(0xAA, PID, VMEMMAP + 0x99999 * 64) is None
    assert s.sample(0xAA, 0, VMEMMAP + 0x10001 * 64) is None
    assert s.unresolved == 1


def test_sampler_with_a_pfn_field(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(i): anon(0x20000 + i) for i in range(256)})
    got = PagemapSampler("pfn", "pfn", None, root).sample(0xBB, PID, 0x20010)
    assert got is not None and got["address"] == BASE
    assert got["present"] == "ff" * 32 + "00" * 32



def test_index_is_bounded_and_forgets_exited_processes(tmp_path: Path) -> None:
    """Least recently used indexes go beyond max_processes or max_runs, counted; an exited
    process's index goes uncounted; a dropped index is rebuilt on the next scan."""
    pids = (PID, PID + 1, PID + 2)
    root = tmp_path / "proc"
    for i, pid in enumerate(pids):
        make_proc(tmp_path, {pte(j): anon(0x1000 * (i + 1) + 2 * j) for j in range(3)}, pid=pid)
    idx = PfnIndex(root, max_processes=2)
    assert idx.pmd_of(PID, 0x1000) == BASE and idx.pmd_of(PID + 1, 0x2000) == BASE
    assert idx.pmd_of(PID, 0x1002) == BASE  # PID is now the most recently used
    assert idx.pmd_of(PID + 2, 0x3000) == BASE
    assert (len(idx), idx.runs, idx.evicted) == (2, 6, 1)  # PID + 1 went: 3 runs each
    idx.forget(PID)
    assert (len(idx), idx.runs, idx.evicted) == (1, 3, 1)
    assert idx.pmd_of(PID + 1, 0x2000) == BASE  # rebuilt
    small = PfnIndex(root, max_runs=4)
    for pid, pfn in zip(pids, (0x1000, 0x2000, 0x3000), strict=True):
        assert small.pmd_of(pid, pfn) == BASE
    assert (len(small), small.runs, small.evicted) == (1, 3, 2)  # one process's 3 runs fit
    tiny = PfnIndex(root, max_runs=1)  # never the index just built: it is still used
    assert tiny.pmd_of(PID, 0x1000) == BASE and len(tiny) == 1


class BlockingSampler(PagemapSampler):
    """Reads wait for `go`, and say on which thread they ran."""

    def __init__(self, root: Path) -> None:
        super().__init__("pfn", "pfn", None, root)
        self.go = threading.Event()
        self.threads: set[str] = set()

    def read(self, mm: int, pid: int, ref: int) -> dict | None:
        self.threads.add(threading.current_thread().name)
        assert self.go.wait(10)
        return super().read(mm, pid, ref)


def test_pagemap_worker_reads_off_the_callers_thread_with_a_bounded_queue(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(i, p): anon(0x10000 + 512 * p + i)
                                for p in range(4) for i in range(512)})
    sampler = BlockingSampler(root)
    worker = PagemapWorker(sampler, queue_size=2)
    worker.request(0xAA, PID, 0x10000, 1, "a")  # taken by the worker, which then waits
    deadline = time.monotonic() + 10
    while not sampler.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    for p in range(1, 4):  # two fit the queue, the third is refused and counted
        worker.request(0xAA, PID, 0x10000 + 512 * p, 2, "a")
    assert worker.dropped == 1 and list(worker.results()) == []
    sampler.go.set()
    worker.finish()
    got = list(worker.results())
    assert sorted(r["address"] for r in got) == [BASE, BASE + PMD, BASE + 2 * PMD]
    assert sampler.threads == {"khmon-pagemap"} != {threading.current_thread().name}
    assert got[0]["comm"] == "a" and got[0]["present"] == "ff" * 64


def test_pagemap_worker_forgets_exited_processes(tmp_path: Path) -> None:
    root = make_proc(tmp_path, {pte(i): anon(0x10000 + i) for i in range(512)})
    worker = PagemapWorker(PagemapSampler("pfn", "pfn", None, root))
    worker.request(0xAA, PID, 0x10000, 1, "a")
    worker.finish()
    assert len(worker.sampler.index) == 1
    worker.forget([PID])  # no thread runs: at once
    assert len(worker.sampler.index) == 0
    worker.request(0xAA, PID, 0x10001, 1, "a")
    worker.forget([PID])  # the thread runs: before its next read
    worker.request(0xAA, PID, 0x10002, 1, "a")
    worker.finish()
    assert len(list(worker.results())) == 3 and len(worker.sampler.index) == 1
    assert not worker._exited
