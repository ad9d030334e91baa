"""Per-PMD present-PTE bitmaps read from /proc/PID/pagemap: the user-space fallback source.

For every PMD khugepaged scans, khmon wants a bitmap of which of its 512 PTEs were present
(the mTHP collapse series keeps the same thing in the kernel as mthp_present_ptes). Where BPF
can read the page table (kprobes or fentry on the scan functions) it takes the bitmap there;
on kernels that offer only the huge_memory tracepoints it cannot, so user space reads the
PMD's pagemap entries right after the event instead. That is a second look, not the kernel's
own view: the page table may have changed in between (a fault, a collapse, an unmap), which
is why the result is a best effort and why `None` (not an exception) means "gone".

Tracepoint-only kernels also give the scanned folio's PFN (mm_khugepaged_scan_pmd's `pfn`)
but not its virtual address, so `PfnIndex` maps a PFN back to the PMD that maps it.

Layout (x86-64, 4 KiB pages): a PMD covers 2 MiB = 512 PTEs; pagemap holds one
little-endian u64 per page at offset (addr / 4096) * 8 with
  bit 63 present, bit 62 swapped (any non-present, non-none PTE: swap, migration and
  guard-region markers; khugepaged counts all of them as "unmapped" too), bit 61 file page
  or shared anon, bit 56 mapped exclusively, bits 0-54 the PFN (zero unless CAP_SYS_ADMIN).
/proc/kpageflags holds one u64 of KPF_* flags per PFN; KPF_ZERO_PAGE (bit 24) marks the
shared zero page (and the huge zero folio), whichever PFN it happens to have.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import bitmap
from ..errors import KhmonError
from ..geometry import PAGE, PMD_MASK, PMD_SIZE, PTES

ENTRY = 8  # bytes per pagemap / kpageflags entry

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61
PM_MMAP_EXCLUSIVE = 1 << 56
PM_PFN_MASK = (1 << 55) - 1
KPF_ZERO_PAGE = 1 << 24

PROC = Path("/proc")
# kpageflags reads for PFNs closer than this are merged into one pread.
_KPF_GAP = 64


def _table(test: Callable[[int], bool], yes: int = 1, no: int = 0) -> bytes:
    """A bytes.translate table for an entry's last byte (its bits 56-63)."""
    return bytes(yes if test(b << 56) else no for b in range(256))


# Last byte -> 1 or 0: is the entry present? (PfnIndex's scan, with bytes.find)
_PRESENT_BYTE = _table(lambda e: bool(e & PM_PRESENT))
# Last byte -> ASCII '1' or '0', for read_pmd's bitmaps.
_IS_PRESENT = _table(lambda e: bool(e & PM_PRESENT), ord("1"), ord("0"))
_IS_SWAP = _table(lambda e: not e & PM_PRESENT and bool(e & PM_SWAP), ord("1"), ord("0"))
_IS_EXCLUSIVE_ANON = _table(lambda e: bool(e & PM_PRESENT and e & PM_MMAP_EXCLUSIVE and not e & PM_FILE),
                            ord("1"), ord("0"))
# Errors that mean the process (or its mm) went away between the event and the read.
_GONE = (errno.ENOENT, errno.ESRCH)


def _denied(path: Path) -> KhmonError:
    return KhmonError(f"cannot read {path}: permission denied",
                      "run khmon as root (pagemap PFNs and kpageflags need CAP_SYS_ADMIN)")


def _hidden(path: Path) -> KhmonError:
    return KhmonError(f"{path} shows present pages without page frame numbers",
                      "run khmon as root (the kernel zeroes PFNs without CAP_SYS_ADMIN)")


@dataclass(frozen=True, slots=True)
class PmdPages:
    """What one PMD's 512 PTEs held when pagemap was read.

    Bitmaps are 64 bytes, bit k of byte j is PTE 8j+k: the kernel's unsigned long[8] on
    x86-64 dumped little-endian, so they compare byte for byte with a BPF-side bitmap.

    Zero-page PTEs are in `present` *and* in `zero`: they are pte_present, and the kernel's
    mthp_present_ptes sets a bit for every pte_present PTE. khugepaged itself counts them
    with the empty ones against max_ptes_none (its none_or_zero), so its view of "none" is
    `none + n_zero`. They are not counted in `shared` (pagemap never marks the zero page
    exclusive, yet it is not a shared folio in khugepaged's max_ptes_shared sense).
    """

    present: int  # pte_present PTEs, zero-page ones included (khmon.bitmap's ints)
    swap: int  # non-present, non-none PTEs (swap, migration, markers)
    zero: int  # present PTEs mapping the shared zero page
    none: int  # PTEs neither present nor swapped
    shared: int  # present, not zero page, not mapped exclusively (pagemap bit 56 clear)

    @property
    def n_present(self) -> int:
        return bitmap.count(self.present)

    @property
    def n_swap(self) -> int:
        return bitmap.count(self.swap)

    @property
    def n_zero(self) -> int:
        return bitmap.count(self.zero)


def _gone(path: Path, e: OSError) -> None:
    """The answer to an OSError on a /proc file: None when the process is gone, khmon's
    one-line error when access is denied, else the error itself."""
    if isinstance(e, PermissionError):
        raise _denied(path) from e
    if e.errno not in _GONE:
        raise e
    return None


def _open(path: Path) -> int | None:
    """A /proc file opened for reading; None when the process is gone."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return _gone(path, e)


def _pread(path: Path, size: int, offset: int) -> bytes | None:
    """One pread of a /proc file; None when the process is gone."""
    fd = _open(path)
    if fd is None:
        return None
    try:
        return os.pread(fd, size, offset)
    except OSError as e:
        return _gone(path, e)
    finally:
        os.close(fd)


def _zero_pfns(root: Path, pfns: Iterable[int]) -> set[int]:
    """Which of these PFNs are the zero page, by KPF_ZERO_PAGE in kpageflags.

    Nearby PFNs are fetched with one pread, so a PMD costs a few syscalls, not 512.
    """
    path = root / "kpageflags"
    todo = sorted(set(pfns))
    if not todo:
        return set()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError as e:
        raise _denied(path) from e
    except FileNotFoundError as e:
        raise KhmonError(f"no {path}", "the kernel needs CONFIG_PROC_PAGE_MONITOR") from e
    zero: set[int] = set()
    try:
        i = 0
        while i < len(todo):
            j = i
            while j + 1 < len(todo) and todo[j + 1] - todo[j] <= _KPF_GAP:
                j += 1
            first = todo[i]
            data = os.pread(fd, (todo[j] - first + 1) * ENTRY, first * ENTRY)
            for pfn in todo[i:j + 1]:
                at = (pfn - first) * ENTRY
                if at + ENTRY <= len(data):  # past max_pfn the file just ends
                    (flags,) = struct.unpack_from("<Q", data, at)
                    if flags & KPF_ZERO_PAGE:
                        zero.add(pfn)
            i = j + 1
    finally:
        os.close(fd)
    return zero


@dataclass(frozen=True, slots=True)
class Vma:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    inode: int
    name: str

    @property
    def anonymous(self) -> bool:
        """Private or named anonymous memory, the kind khugepaged's scan_pmd handles."""
        return self.inode == 0 and (self.name in ("", "[heap]", "[stack]")
                                    or self.name.startswith("[anon:"))


def read_maps(pid: int, root: Path = PROC) -> list[Vma] | None:
    """The process's VMAs, or None when it is gone."""
    path = root / str(pid) / "maps"
    try:
        text = path.read_text()
    except OSError as e:
        return _gone(path, e)
    vmas = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        vmas.append(Vma(int(lo, 16), int(hi, 16), int(parts[4]),
                        parts[5].strip() if len(parts) > 5 else ""))
    return vmas


def read_pmd(pid: int, pmd_addr: int, root: Path = PROC) -> PmdPages | None:
    """The PTEs of the PMD at `pmd_addr` (2 MiB aligned) in process `pid`.

    None when the process is gone (or has no mm any more) or no VMA overlaps the PMD: both
    happen routinely between a khugepaged event and this read. Raises KhmonError when the
    kernel refuses the read (not root), ValueError for an unaligned address (a caller bug).
    """
    if pmd_addr < 0 or pmd_addr % PMD_SIZE:
        raise ValueError(f"PMD address {pmd_addr:#x} is not 2 MiB aligned")
    path = root / str(pid) / "pagemap"
    raw = _pread(path, PTES * ENTRY, pmd_addr // PAGE * ENTRY)
    if raw is None or len(raw) < PTES * ENTRY:  # gone, or past the end of user space
        return None
    # Each entry's last byte holds bits 56-63; one translate per bitmap turns the 512 of
    # them into '0'/'1' digits, PTE 0 last after reversing, which int() reads as the bitmap.
    top = raw[ENTRY - 1::ENTRY]
    present = int(top.translate(_IS_PRESENT)[::-1], 2)
    swap = int(top.translate(_IS_SWAP)[::-1], 2)
    # An exclusive anon page is a normal anon folio; the zero page is never one (pagemap
    # gives it neither bit 56 nor, having no folio, bit 61), so only the rest of the present
    # pages need a kpageflags lookup.
    exclusive = int(top.translate(_IS_EXCLUSIVE_ANON)[::-1], 2)
    maybe_zero: dict[int, int] = {}  # PTE index -> PFN
    rest = present & ~exclusive
    while rest:
        i = (rest & -rest).bit_length() - 1
        rest &= rest - 1
        maybe_zero[i] = struct.unpack_from("<Q", raw, i * ENTRY)[0] & PM_PFN_MASK
    if not present and not swap:
        # All empty: an unpopulated PMD inside a VMA, or nothing mapped there at all.
        vmas = read_maps(pid, root)
        if vmas is None or not any(v.start < pmd_addr + PMD_SIZE and v.end > pmd_addr for v in vmas):
            return None
    if 0 in maybe_zero.values():
        raise _hidden(path)
    zero_pfns = _zero_pfns(root, maybe_zero.values())
    zero = 0
    for i, pfn in maybe_zero.items():
        if pfn in zero_pfns:
            zero |= 1 << i
    n_present = bitmap.count(present)
    return PmdPages(present=present, swap=swap, zero=zero,
                    none=PTES - n_present - bitmap.count(swap),
                    shared=n_present - bitmap.count(exclusive) - bitmap.count(zero))


class _Runs:
    """A process's present pages as runs of consecutive PFNs at consecutive addresses,
    sorted by PFN: three flat arrays (24 bytes a run) instead of a dict entry per page, and
    a PMD-mapped THP is one run instead of 512 entries."""

    __slots__ = ("addrs", "built", "lens", "pages", "pfns")

    def __init__(self, pfns: array, addrs: array, lens: array, built: float) -> None:
        order = sorted(range(len(pfns)), key=pfns.__getitem__)
        self.pfns = array("Q", (pfns[i] for i in order))
        self.addrs = array("Q", (addrs[i] for i in order))
        self.lens = array("Q", (lens[i] for i in order))
        self.pages = sum(lens)
        self.built = built

    def __len__(self) -> int:
        return len(self.pfns)

    def addr_of(self, pfn: int) -> int | None:
        i = bisect_right(self.pfns, pfn) - 1
        if i < 0 or pfn >= self.pfns[i] + self.lens[i]:
            return None
        return self.addrs[i] + (pfn - self.pfns[i]) * PAGE


class PfnIndex:
    """Which PMD of a process maps a given PFN: pfn -> virtual address, per process.

    Built from one pass over the process's anonymous VMAs (only their 2 MiB-aligned PMDs,
    the only ones khugepaged's scan_pmd looks at), reading pagemap `chunk` bytes at a time
    and keeping present entries only, so mostly-empty memory costs little beyond the
    kernel's walk. A hit is re-checked against the live pagemap entry (the page may have
    been freed and reused elsewhere); a miss rebuilds that process's index, at most once
    per `min_rebuild` seconds, since its memory keeps changing.

    The indexes live as long as a daemon, so they are bounded: exited processes are
    forgotten (forget()), and beyond `max_processes` indexes or `max_runs` runs in all (24
    bytes each) the least recently used are dropped, counted in `evicted`. A dropped index
    is only a cache miss: it is rebuilt when its process is scanned again.
    """

    MAX_PROCESSES = 256
    MAX_RUNS = 1 << 21  # 48 MiB of runs

    def __init__(self, root: Path = PROC, *, chunk: int = 1 << 20, min_rebuild: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 max_processes: int = MAX_PROCESSES, max_runs: int = MAX_RUNS) -> None:
        self.root = root
        self.chunk = max(ENTRY, chunk - chunk % ENTRY)
        self.min_rebuild = min_rebuild
        self.clock = clock
        self.max_processes, self.max_runs = max_processes, max_runs
        self._runs: OrderedDict[int, _Runs] = OrderedDict()  # least recently used first
        self.evicted = 0  # indexes dropped to stay within the bounds

    def pmd_of(self, pid: int, pfn: int) -> int | None:
        """The 2 MiB-aligned address of the PMD mapping `pfn` in `pid`, or None.

        None for a PFN the process does not map (now), a process that is gone, or the
        tracepoint's "no folio" value (-1).
        """
        if not 0 < pfn <= PM_PFN_MASK:
            return None
        runs = self._runs.get(pid)
        if runs is not None:
            self._runs.move_to_end(pid)
            addr = runs.addr_of(pfn)
            if addr is not None and self._maps(pid, addr, pfn):
                return addr & PMD_MASK
            if self.clock() - runs.built < self.min_rebuild:
                return None
        if self.refresh(pid) is None:
            return None
        addr = self._runs[pid].addr_of(pfn)
        return None if addr is None else addr & PMD_MASK

    def refresh(self, pid: int) -> int | None:
        """Rebuild `pid`'s index now; returns the number of present pages indexed, or None
        (and forgets the process) when it is gone."""
        runs = self._build(pid)
        self.forget(pid)
        if runs is None:
            return None
        self._runs[pid] = runs
        # Never the index just built: one process larger than max_runs is still indexed.
        while len(self._runs) > 1 and (len(self._runs) > self.max_processes
                                       or self.runs > self.max_runs):
            self._runs.popitem(last=False)
            self.evicted += 1
        return runs.pages

    def forget(self, pid: int) -> None:
        """Drop a process's index (it exited)."""
        self._runs.pop(pid, None)

    @property
    def runs(self) -> int:
        """Runs held, over every process (at most max_processes of them)."""
        return sum(map(len, self._runs.values()))

    def __len__(self) -> int:
        return len(self._runs)

    def _maps(self, pid: int, addr: int, pfn: int) -> bool:
        """Does `addr` still map `pfn`?"""
        raw = _pread(self.root / str(pid) / "pagemap", ENTRY, addr // PAGE * ENTRY)
        if not raw or len(raw) < ENTRY:
            return False
        (e,) = struct.unpack("<Q", raw)
        return bool(e & PM_PRESENT) and e & PM_PFN_MASK == pfn

    def _build(self, pid: int) -> _Runs | None:
        built = self.clock()
        vmas = read_maps(pid, self.root)
        if vmas is None:
            return None
        path = self.root / str(pid) / "pagemap"
        fd = _open(path)
        if fd is None:
            return None
        pfns, addrs, lens = array("Q"), array("Q"), array("Q")
        last_pfn = last_addr = -1
        try:
            for v in vmas:
                lo, hi = -(-v.start // PMD_SIZE) * PMD_SIZE, v.end // PMD_SIZE * PMD_SIZE
                if not v.anonymous or hi <= lo:
                    continue
                for at in range(lo, hi, self.chunk // ENTRY * PAGE):
                    data = os.pread(fd, min(self.chunk, (hi - at) // PAGE * ENTRY), at // PAGE * ENTRY)
                    # Bit 63 lives in each entry's last byte: slice those out, turn them
                    # into 1 (present) or 0, and let bytes.find skip the empty stretches.
                    flags = data[ENTRY - 1::ENTRY].translate(_PRESENT_BYTE)
                    first = flags.find(1)
                    while first >= 0:
                        end = flags.find(0, first)
                        end = len(flags) if end < 0 else end
                        n = end - first
                        addr = at + first * PAGE
                        for e in struct.unpack_from(f"<{n}Q", data, first * ENTRY):
                            pfn = e & PM_PFN_MASK
                            if pfn == 0:
                                raise _hidden(path)
                            if pfn == last_pfn + 1 and addr == last_addr + PAGE:
                                lens[-1] += 1
                            else:
                                pfns.append(pfn)
                                addrs.append(addr)
                                lens.append(1)
                            last_pfn, last_addr = pfn, addr
                            addr += PAGE
                        first = flags.find(1, end)
        except OSError as e:
            return _gone(path, e)
        finally:
            os.close(fd)
        return _Runs(pfns, addrs, lens, built)
