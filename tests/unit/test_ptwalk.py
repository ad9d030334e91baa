"""ptwalk: the plan from fake BTF and kallsyms, and the generated C run for real.

c_code()'s C is compiled with the host's C compiler against a stand-in for bcc (the
per-CPU array, bpf_probe_read_kernel reading a fake kernel memory), and run on page tables
built here by hand: 4- and 5-level walks, every early exit, and the per-PTE classes. The
BPF verifier side of the same C is checked in a real 6.1 kernel by tests/vm/ptwalk_probe.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from khmon.capture import ptwalk
from khmon.capture.ptwalk import PtWalkPlan, c_code, decode, plan, plan_or_reason
from khmon.kernel.kallsyms import addresses as kallsyms_addresses

MM_PGD = 72  # Debian 6.1.0-56's BTF
# Addresses as 6.1's kallsyms lists them (randomized by KASLR, so any value will do).
KALLSYMS_61 = {"page_offset_base": 0xFFFFFFFF92E15740, "__pgtable_l5_enabled": 0xFFFFFFFF92E1575C,
               "physical_mask": 0xFFFFFFFF92E2DF20, "zero_pfn": 0xFFFFFFFF93A4C3D8,
               "empty_zero_page": 0xFFFFFFFF93A2E000, "phys_base": 0xFFFFFFFF92E16010}


class FakeBtf:
    def __init__(self, offsets: dict[tuple[str, str], int]) -> None:
        self.offsets = offsets

    def member_offset(self, struct_name: str, member: str) -> int | None:
        return self.offsets.get((struct_name, member))


BTF = FakeBtf({("mm_struct", "pgd"): MM_PGD})


def without(*names: str) -> dict[str, int]:
    return {k: v for k, v in KALLSYMS_61.items() if k not in names}


# ---------------------------------------------------------------------------------------
# plan()


def test_plan_on_6_1() -> None:
    p = plan(BTF, KALLSYMS_61, machine="x86_64")
    assert p == PtWalkPlan(MM_PGD, KALLSYMS_61["page_offset_base"],
                           KALLSYMS_61["__pgtable_l5_enabled"], KALLSYMS_61["physical_mask"],
                           KALLSYMS_61["zero_pfn"], KALLSYMS_61["empty_zero_page"],
                           KALLSYMS_61["phys_base"])
    assert p.zero_page == "zero_pfn"
    assert "5" in p.paging


def test_4_level_only_kernel_has_no_l5_read() -> None:
    p = plan(BTF, without("__pgtable_l5_enabled"), machine="x86_64")
    assert p is not None and p.pgtable_l5_enabled is None and p.paging == "4 levels"
    c = c_code(p)
    assert "#define KHMON_PTW_SYM_PGTABLE_L5_ENABLED" not in c
    assert "__pgtable_l5_enabled: not in kallsyms: 4-level paging" in c
    c5 = c_code(plan(BTF, KALLSYMS_61, machine="x86_64"))
    assert f"#define KHMON_PTW_SYM_PGTABLE_L5_ENABLED {KALLSYMS_61['__pgtable_l5_enabled']:#x}ULL" in c5


def test_missing_page_offset_base_gives_none_and_a_reason() -> None:
    p, why = plan_or_reason(BTF, without("page_offset_base"), machine="x86_64")
    assert p is None and "page_offset_base" in why and "KALLSYMS_ALL" in why
    assert plan(BTF, without("page_offset_base"), machine="x86_64") is None


def test_other_reasons() -> None:
    assert "mm_struct.pgd" in plan_or_reason(FakeBtf({}), KALLSYMS_61, machine="x86_64")[1]
    assert "x86-64 only" in plan_or_reason(BTF, KALLSYMS_61, machine="aarch64")[1]
    hidden = dict.fromkeys(KALLSYMS_61, 0)  # what a non-root reader of /proc/kallsyms sees
    assert "hides addresses" in plan_or_reason(BTF, hidden, machine="x86_64")[1]
    assert plan_or_reason(BTF, KALLSYMS_61, machine="x86_64")[1] == ""


def test_lookup_may_be_a_callable() -> None:
    assert plan(BTF, KALLSYMS_61.get, machine="x86_64") == plan(BTF, KALLSYMS_61, machine="x86_64")


def test_zero_page_sources() -> None:
    p = plan(BTF, without("zero_pfn"), machine="x86_64")
    assert p is not None and p.zero_page == "empty_zero_page"
    c = c_code(p)
    assert "#define KHMON_PTW_SYM_EMPTY_ZERO_PAGE" in c and "#define KHMON_PTW_SYM_PHYS_BASE" in c
    none = plan(BTF, without("zero_pfn", "phys_base"), machine="x86_64")
    assert none is not None and none.zero_page == ""
    assert "KHMON_PTW_SYM_EMPTY_ZERO_PAGE 0x" not in c_code(none)
    # zero_pfn wins: the fallback's symbols are not compiled in.
    assert "#define KHMON_PTW_SYM_EMPTY_ZERO_PAGE" not in c_code(plan(BTF, KALLSYMS_61,
                                                                      machine="x86_64"))


def test_kallsyms_addresses_reads_vmlinux_symbols(tmp_path: Path) -> None:
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff92e15740 D page_offset_base\n"
                 "ffffffffc0a01000 d zero_pfn\t[somemod]\n"
                 "ffffffff93a4c3d8 B zero_pfn\n"
                 "ffffffff81682940 t hpage_collapse_scan_pmd\n")
    got = kallsyms_addresses(["page_offset_base", "zero_pfn", "phys_base"], str(f))
    assert got == {"page_offset_base": 0xFFFFFFFF92E15740, "zero_pfn": 0xFFFFFFFF93A4C3D8}
    assert kallsyms_addresses(["x"], str(tmp_path / "missing")) == {}


def test_c_code_shape() -> None:
    c = c_code(plan(BTF, KALLSYMS_61, machine="x86_64"))
    assert ("static __always_inline int khmon_ptwalk(u64 mm, u64 address, "
            "struct khmon_ptbits *out)") in c
    assert ptwalk.C_STRUCT in c
    assert "BPF_PERCPU_ARRAY(khmon_ptw_scratch, struct khmon_ptw_page, 1);" in c
    assert f"#define KHMON_PTW_MM_PGD {MM_PGD}" in c
    for name, rc in (("E_PMD_HUGE", ptwalk.E_PMD_HUGE), ("E_PMD_NONE", ptwalk.E_PMD_NONE)):
        assert f"#define KHMON_PTW_{name} ({rc})" in c


def test_decode_bit_order() -> None:
    present = bytearray(64)
    present[1] = 0b100  # PTE 8*1 + 2
    raw = ptwalk.PTBITS.pack(bytes(present), bytes(64), b"\xff" * 64, 511, 0, 512, 1, 4, 1,
                             0, 0, 0x1234)
    b = decode(raw)
    assert [i for i, x in enumerate(b.present) if x] == [10]
    assert all(b.zero) and not any(b.swap)
    assert (b.none, b.nswap, b.nzero, b.npresent, b.levels, b.zero_known, b.pmd) == (
        511, 0, 512, 1, 4, True, 0x1234)
    assert ptwalk.PTBITS.size == 216


# ---------------------------------------------------------------------------------------
# The C, run: page tables in a fake kernel memory

HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef int32_t s32;
typedef uint64_t u64;
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#define BASE %(base)#xULL
#define SIZE %(size)d
static unsigned char arena[SIZE];  /* kernel address BASE + x is arena[x] */
static long bpf_probe_read_kernel(void *dst, u32 size, const void *src)
{
    u64 a = (u64)src;
    if (a < BASE || a + size > BASE + SIZE) {
        memset(dst, 0, size);
        return -14;
    }
    memcpy(dst, arena + (a - BASE), size);
    return 0;
}
#define BPF_PERCPU_ARRAY(name, type, n) \
    static type name##_value; \
    static type *name##_lookup(u32 *key) { return *key < (n) ? &name##_value : 0; } \
    static struct { type *(*lookup)(u32 *); } name = { name##_lookup };
%(code)s
int main(int argc, char **argv)
{
    struct khmon_ptbits out;
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(arena, 1, SIZE, f) != SIZE)
        return 2;
    int rc = khmon_ptwalk(strtoull(argv[2], 0, 0), strtoull(argv[3], 0, 0), &out);
    fwrite(&rc, sizeof(rc), 1, stdout);
    fwrite(&out, sizeof(out), 1, stdout);
    return 0;
}
"""

BASE = 0x10_0000_0000  # the fake direct map: page_offset_base's value
PAGE = 4096
SIZE = 16 * PAGE
SYMS = {"page_offset_base": 0x0, "__pgtable_l5_enabled": 0x8, "physical_mask": 0x10,
        "zero_pfn": 0x18, "phys_base": 0x20}
MM = 0x100  # the mm_struct
PGD, P4D, PUD, PMD, PTE = (p * PAGE for p in (1, 2, 3, 4, 5))
ZERO_PHYS = 7 * PAGE
TABLE = 0x67  # present, rw, user, accessed, dirty: _PAGE_TABLE
# A PMD's address whose index differs at every level (5-level paging: a 56-bit address).
ADDRESS = 0x0AB << 48 | 0x1CD << 39 | 0x0EF << 30 | 0x123 << 21


def idx(address: int, shift: int) -> int:
    return address >> shift & 511


def fake_plan(*, l5: bool = True, zero: str = "zero_pfn", physical_mask: bool = True
              ) -> PtWalkPlan:
    a = {k: BASE + v for k, v in SYMS.items()}
    return PtWalkPlan(MM_PGD, a["page_offset_base"], a["__pgtable_l5_enabled"] if l5 else None,
                      a["physical_mask"] if physical_mask else None,
                      a["zero_pfn"] if zero == "zero_pfn" else None,
                      ptwalk.START_KERNEL_MAP + ZERO_PHYS if zero == "empty_zero_page" else None,
                      a["phys_base"] if zero == "empty_zero_page" else None)


class Memory:
    """Fake kernel memory: symbol values, an mm, and page tables for ADDRESS."""

    def __init__(self, levels: int = 4, cbit: int = 0) -> None:
        self.mem = bytearray(SIZE)
        self.cbit = cbit  # an SME-style encryption bit set in every table entry
        self.u64(SYMS["page_offset_base"], BASE)
        self.u64(SYMS["__pgtable_l5_enabled"], 1 if levels == 5 else 0)
        self.u64(SYMS["physical_mask"], ((1 << 52) - 1) & ~cbit)
        self.u64(SYMS["zero_pfn"], ZERO_PHYS // PAGE)
        self.u64(SYMS["phys_base"], 0)
        self.u64(MM + MM_PGD, BASE + PGD)
        if levels == 5:
            self.entry(PGD, idx(ADDRESS, 48), P4D | TABLE)
            self.entry(P4D, idx(ADDRESS, 39), PUD | TABLE)
        else:
            self.entry(PGD, idx(ADDRESS, 39), PUD | TABLE)
        self.entry(PUD, idx(ADDRESS, 30), PMD | TABLE)
        self.entry(PMD, idx(ADDRESS, 21), PTE | TABLE)

    def u64(self, at: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, at, value)

    def entry(self, table: int, index: int, value: int) -> None:
        self.u64(table + index * 8, value | (self.cbit if value else 0))

    def pte(self, i: int, value: int) -> None:
        self.u64(PTE + i * 8, value)


class Walker:
    """Compiles the harness once per plan, and runs it on a fake memory."""

    def __init__(self, cc: str, workdir: Path) -> None:
        self.cc, self.dir, self.built = cc, workdir, {}

    def __call__(self, p: PtWalkPlan, memory: Memory, mm: int = BASE + MM,
                 address: int = ADDRESS) -> tuple[int, ptwalk.PtBits]:
        exe = self.built.get(p)
        if exe is None:
            n = len(self.built)
            src, exe = self.dir / f"walk{n}.c", self.dir / f"walk{n}"
            src.write_text(HARNESS % {"base": BASE, "size": SIZE, "code": c_code(p)})
            cmd = [self.cc, "-O2", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
                   "-o", str(exe), str(src)]
            built = subprocess.run(cmd, capture_output=True, text=True)
            assert built.returncode == 0, built.stderr
            self.built[p] = exe
        img = self.dir / "memory"
        img.write_bytes(memory.mem)
        out = subprocess.run([str(exe), str(img), hex(mm), hex(address)], check=True,
                             capture_output=True).stdout
        assert len(out) == 4 + ptwalk.PTBITS.size  # the C struct is the layout PTBITS decodes
        return struct.unpack_from("<i", out)[0], decode(out, 4)


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Walker:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to run the generated C with")
    return Walker(cc, tmp_path_factory.mktemp("ptwalk"))


# Per-PTE classes, as 6.1's pte_present / pte_none / is_swap_pte / is_zero_pfn see them.
NX = 1 << 63
PTE_CASES = {
    0: (0x12345000 | 0x67 | NX, "p"),  # present, NX set (bit 63 is not PFN)
    1: (0x23456000 | 0x100 | 0x60, "p"),  # PROT_NONE: bit 0 clear, _PAGE_PROTNONE set
    2: (ZERO_PHYS | 0x25, "z"),  # the zero page, read-only
    3: (0x60, "n"),  # Knights Landing erratum bits only: pte_none
    4: (0x7FF0_0000_0000_0200, "s"),  # swap entry: bits 0 and 8 clear, nonzero
    5: (0x4, "s"),  # a pte marker-like value: nonzero, not present
    511: (0x3FFFF000 | 0x67, "p"),
}


def fill(memory: Memory) -> list[str]:
    want = ["n"] * 512
    for i, (value, kind) in PTE_CASES.items():
        memory.pte(i, value)
        want[i] = kind
    for i in range(64, 128, 3):  # a run of plain present PTEs across bytes
        memory.pte(i, (0x40000 + i) << 12 | 0x67)
        want[i] = "p"
    return want


def check(b: ptwalk.PtBits, want: list[str], zero_known: bool = True) -> None:
    assert b.present == [c in "pz" for c in want]
    assert b.swap == [c == "s" for c in want]
    assert b.zero == [c == "z" and zero_known for c in want]
    assert (b.npresent, b.none, b.nswap, b.nzero) == (
        sum(c in "pz" for c in want), want.count("n"), want.count("s"),
        want.count("z") if zero_known else 0)
    assert b.zero_known == zero_known


@pytest.mark.parametrize("levels", [4, 5])
def test_walk_classifies_every_pte(walk: Walker, levels: int) -> None:
    memory = Memory(levels)
    want = fill(memory)
    rc, b = walk(fake_plan(), memory)
    assert rc == ptwalk.OK, ptwalk.describe(rc)
    check(b, want)
    assert b.levels == levels
    assert b.pmd == PTE | TABLE


def test_4_level_plan_never_reads_l5(walk: Walker) -> None:
    memory = Memory(4)
    memory.u64(SYMS["__pgtable_l5_enabled"], 1)  # ignored: the plan has no such symbol
    want = fill(memory)
    rc, b = walk(fake_plan(l5=False), memory)
    assert rc == ptwalk.OK and b.levels == 4
    check(b, want)


def test_zero_page_from_empty_zero_page_and_phys_base(walk: Walker) -> None:
    memory = Memory()
    want = fill(memory)
    rc, b = walk(fake_plan(zero="empty_zero_page"), memory)
    assert rc == ptwalk.OK
    check(b, want)
    rc, b = walk(fake_plan(zero=""), memory)
    assert rc == ptwalk.OK
    check(b, want, zero_known=False)


def test_physical_mask_strips_an_encryption_bit(walk: Walker) -> None:
    cbit = 1 << 47
    memory = Memory(5, cbit=cbit)
    want = fill(memory)
    memory.pte(2, ZERO_PHYS | cbit | 0x25)  # the zero page, seen through the C-bit
    rc, b = walk(fake_plan(), memory)
    assert rc == ptwalk.OK
    check(b, want)


@pytest.mark.parametrize(("levels", "table", "index_shift", "value", "rc"), [
    (5, PGD, 48, 0, ptwalk.E_PGD),
    (4, PGD, 39, 0, ptwalk.E_P4D),
    (5, P4D, 39, PUD | 0x66, ptwalk.E_P4D),  # present bit clear
    (4, PUD, 30, 0, ptwalk.E_PUD),
    (4, PUD, 30, 0x40000000 | 0xE7, ptwalk.E_PUD_HUGE),
    (4, PMD, 21, 0, ptwalk.E_PMD_NONE),
    (4, PMD, 21, 0x60, ptwalk.E_PMD_NONE),  # erratum bits only: pmd_none
    (4, PMD, 21, 0x40000000 | 0xE7, ptwalk.E_PMD_HUGE),  # a THP
    (4, PMD, 21, 0x40000000 | 0x1E6, ptwalk.E_PMD_HUGE),  # a THP being split: PSE, no P
    (4, PMD, 21, 0x7FF0_0000_0000_0000, ptwalk.E_PMD_NOT_PRESENT),  # a migration entry
])
def test_walk_stops_where_there_is_no_pte_table(walk: Walker, levels: int, table: int,
                                                index_shift: int, value: int, rc: int) -> None:
    memory = Memory(levels)
    fill(memory)
    memory.entry(table, idx(ADDRESS, index_shift), value)
    got, b = walk(fake_plan(), memory)
    assert got == rc, ptwalk.describe(got)
    assert not any(b.present) and b.npresent == 0  # no bitmap, not an empty one
    assert b.pmd == ((value | memory.cbit if value else 0) if table == PMD else 0)


def test_unreadable_memory(walk: Walker) -> None:
    memory = Memory()
    rc, _b = walk(fake_plan(), memory, mm=0x1000)  # mm outside kernel memory
    assert rc == ptwalk.E_READ
    memory.u64(SYMS["page_offset_base"], 0)
    assert walk(fake_plan(), memory)[0] == ptwalk.E_READ
