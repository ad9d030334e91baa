"""The `ptwalk` bitmap source: a BPF walk of a PMD's PTE table, for x86-64 kernels that
predate the mTHP collapse series (whose collapse_control carries the bitmap itself).

At khugepaged's per-PMD entry (hpage_collapse_scan_pmd on 6.1, via a kprobe) the BPF program
walks mm->pgd -> p4d -> pud -> pmd -> the PTE page for the PMD's address and records which of
the 512 PTEs are present, swap entries or the zero page. Page tables are read through the
direct map (virtual = page_offset_base + physical), with bpf_probe_read_kernel.

Nothing the kernel can tell is hard-coded: mm_struct.pgd's offset comes from BTF; the
addresses of page_offset_base, __pgtable_l5_enabled (5-level paging, CONFIG_X86_5LEVEL),
physical_mask (CONFIG_DYNAMIC_PHYSICAL_MASK: memory encryption bits), zero_pfn (or
empty_zero_page and phys_base) come from /proc/kallsyms, and their values are read in BPF
at run time. What stays fixed is the x86-64 page-table format itself (arch/x86/include/asm/
pgtable_types.h): 9 index bits per level, the PFN in bits 12..51 and the flag bits below.
The entry tests follow 6.1's pgtable.h: pte_present is _PAGE_PRESENT | _PAGE_PROTNONE,
pte_none ignores the Knights Landing erratum bits (dirty, accessed), a swap PTE is neither.

This module is pure Python: plan() gathers the facts, c_code() writes the C for bcc.
"""

from __future__ import annotations

import platform
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..geometry import PTES
from ..kernel.btf import Btf

SYMBOLS = ("page_offset_base", "__pgtable_l5_enabled", "physical_mask", "zero_pfn",
           "empty_zero_page", "phys_base")

# x86-64 page-table entry format (arch/x86/include/asm/pgtable_types.h).
PAGE_PRESENT = 1 << 0
PAGE_ACCESSED = 1 << 5
PAGE_DIRTY = 1 << 6
PAGE_PSE = 1 << 7
PAGE_PROTNONE = 1 << 8  # _PAGE_BIT_GLOBAL, which user PTEs never set
KNL_ERRATUM_MASK = PAGE_DIRTY | PAGE_ACCESSED
PFN_MASK = ((1 << 52) - 1) & ~((1 << 12) - 1)  # bits 12..51, before physical_mask
START_KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map (page_64_types.h): a constant

# khmon_ptwalk()'s return codes.
OK = 0
E_READ = -1
E_PGD = -2
E_P4D = -3
E_PUD = -4
E_PUD_HUGE = -5
E_PMD_NONE = -6
E_PMD_HUGE = -7
E_PMD_NOT_PRESENT = -8
E_SCRATCH = -9
_CODES = {"E_READ": E_READ, "E_PGD": E_PGD, "E_P4D": E_P4D, "E_PUD": E_PUD,
          "E_PUD_HUGE": E_PUD_HUGE, "E_PMD_NONE": E_PMD_NONE, "E_PMD_HUGE": E_PMD_HUGE,
          "E_PMD_NOT_PRESENT": E_PMD_NOT_PRESENT, "E_SCRATCH": E_SCRATCH}
RESULTS = {
    OK: "ok",
    E_READ: "a kernel read failed",
    E_PGD: "PGD entry not present",
    E_P4D: "P4D entry not present",
    E_PUD: "PUD entry not present",
    E_PUD_HUGE: "PUD maps a 1 GiB page",
    E_PMD_NONE: "PMD is none (no page table)",
    E_PMD_HUGE: "PMD maps a huge page (PSE set)",
    E_PMD_NOT_PRESENT: "PMD not present (swap or migration entry)",
    E_SCRATCH: "per-CPU scratch map lookup failed",
}

# struct khmon_ptbits as c_code() defines it.
PTBITS = struct.Struct("<64s64s64s8HQ")
C_STRUCT = """\
struct khmon_ptbits {
    u8 present[64];   /* bit k of byte j: PTE 8j+k is present (pte_present) */
    u8 swap[64];      /* ... is a swap entry: neither none nor present */
    u8 zero[64];      /* ... is present and maps the zero page */
    u16 none, nswap, nzero, npresent;  /* population counts */
    u16 levels;       /* paging levels walked (4 or 5), 0 if the walk did not start */
    u16 zero_known;   /* 1 if zero-page detection ran (the zero page's PFN was read) */
    u16 _pad[2];
    u64 pmd;          /* the raw PMD entry; 0 if the walk stopped above the PMD */
};"""


@dataclass(frozen=True)
class PtWalkPlan:
    """What khmon_ptwalk() needs from this kernel: a BTF offset and kallsyms addresses."""

    mm_pgd: int  # offsetof(struct mm_struct, pgd)
    page_offset_base: int  # &page_offset_base (unsigned long)
    pgtable_l5_enabled: int | None  # &__pgtable_l5_enabled (unsigned int); None: 4-level only
    physical_mask: int | None  # &physical_mask (phys_addr_t); None: bits 12..51 as they are
    zero_pfn: int | None  # &zero_pfn (unsigned long), what is_zero_pfn() compares with
    empty_zero_page: int | None  # fallback for the zero page: its kernel-image address ...
    phys_base: int | None  # ... turned physical with phys_base (unsigned long)

    @property
    def zero_page(self) -> str:
        """How the zero page's PFN is found: 'zero_pfn', 'empty_zero_page' or '' (not)."""
        if self.zero_pfn is not None:
            return "zero_pfn"
        if self.empty_zero_page is not None and self.phys_base is not None:
            return "empty_zero_page"
        return ""

    @property
    def paging(self) -> str:
        return "4 or 5 levels (read at run time)" if self.pgtable_l5_enabled else "4 levels"


@dataclass(frozen=True)
class PtBits:
    """One decoded struct khmon_ptbits."""

    present: list[bool]
    swap: list[bool]
    zero: list[bool]
    none: int
    nswap: int
    nzero: int
    npresent: int
    levels: int
    zero_known: bool
    pmd: int


def bits(data: bytes) -> list[bool]:
    """A 64-byte bitmap as 512 booleans, PTE 0 first (bit k of byte j = PTE 8j+k)."""
    return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(len(data) * 8)]


def decode(data: bytes, offset: int = 0) -> PtBits:
    present, swap, zero, none, nswap, nzero, npresent, levels, zk, _p1, _p2, pmd = \
        PTBITS.unpack_from(data, offset)
    return PtBits(bits(present), bits(swap), bits(zero), none, nswap, nzero, npresent, levels,
                  bool(zk), pmd)


def describe(rc: int) -> str:
    return RESULTS.get(rc, f"unknown result {rc}")


Lookup = Mapping[str, int] | Callable[[str], int | None]


def plan_or_reason(btf: Btf, kallsyms_lookup: Lookup, machine: str | None = None
                   ) -> tuple[PtWalkPlan | None, str]:
    """(plan, '') when this kernel allows the walk, else (None, why not) for khmon doctor."""
    machine = machine or platform.machine()
    if machine != "x86_64":
        return None, f"the page-table walk is x86-64 only (this is {machine})"
    look = kallsyms_lookup.get if isinstance(kallsyms_lookup, Mapping) else kallsyms_lookup
    pgd = btf.member_offset("mm_struct", "pgd")
    if pgd is None:
        return None, "BTF has no mm_struct.pgd"
    addr = {name: look(name) for name in SYMBOLS}
    if addr["page_offset_base"] is None:
        return None, ("kallsyms lacks page_offset_base (CONFIG_KALLSYMS_ALL off, or a fixed "
                      "direct map without CONFIG_DYNAMIC_MEMORY_LAYOUT)")
    if addr["page_offset_base"] == 0:
        return None, "kallsyms hides addresses (not root, or kernel.kptr_restrict=2)"
    got = {k: v or None for k, v in addr.items()}  # 0: hidden, treated as absent
    return PtWalkPlan(pgd, addr["page_offset_base"], got["__pgtable_l5_enabled"],
                      got["physical_mask"], got["zero_pfn"], got["empty_zero_page"],
                      got["phys_base"]), ""


def plan(btf: Btf, kallsyms_lookup: Lookup, machine: str | None = None) -> PtWalkPlan | None:
    """The walk's plan, or None when this kernel does not allow it (plan_or_reason says why)."""
    return plan_or_reason(btf, kallsyms_lookup, machine)[0]


def _sym(name: str, addr: int | None, why: str = "not in kallsyms") -> str:
    if addr is None:
        return f"/* {name}: {why} */"
    return f"#define KHMON_PTW_SYM_{name.strip('_').upper()} {addr:#x}ULL"


def c_code(p: PtWalkPlan) -> str:
    """C for bcc: struct khmon_ptbits, a per-CPU scratch page, and
    `/* x, as a value LLVM cannot see through (so it cannot fold tests back into branches). */
static __always_inline u64 khmon_ptw_opaque(u64 x)
{{
    asm volatile("" : "+r"(x));
    return x;
}}

/* 1 if x != 0, else 0, without a branch. */
static __always_inline u64 khmon_ptw_nz(u64 x)
{{
    return (x | khmon_ptw_opaque(-x)) >> 63;
}}

static __always_inline int khmon_ptwalk(u64 mm, u64 address, struct khmon_ptbits *out)`
    which returns 0 (out filled) or one of the negative RESULTS codes."""
    fallback = "not used (zero_pfn is)" if p.zero_page == "zero_pfn" else "not in kallsyms"
    use_fallback = p.zero_page == "empty_zero_page"
    syms = "\n".join([
        _sym("page_offset_base", p.page_offset_base),
        _sym("__pgtable_l5_enabled", p.pgtable_l5_enabled, "not in kallsyms: 4-level paging"),
        _sym("physical_mask", p.physical_mask),
        _sym("zero_pfn", p.zero_pfn),
        _sym("empty_zero_page", p.empty_zero_page if use_fallback else None, fallback),
        _sym("phys_base", p.phys_base if use_fallback else None, fallback),
    ])
    codes = "\n".join(f"#define KHMON_PTW_{name} ({rc})  /* {RESULTS[rc]} */"
                      for name, rc in _CODES.items())
    return f"""\
/* khmon ptwalk (generated by khmon.ptwalk): walk an mm's page tables to a PMD's PTE page. */
#define KHMON_PTW_MM_PGD {p.mm_pgd}
{syms}
#define KHMON_PTW_PFN_MASK {PFN_MASK:#x}ULL
#define KHMON_PTW_PRESENT {PAGE_PRESENT:#x}ULL
#define KHMON_PTW_PSE {PAGE_PSE:#x}ULL
#define KHMON_PTW_PROTNONE_BIT {PAGE_PROTNONE.bit_length() - 1}  /* pte_present: bit 0 or this */
#define KHMON_PTW_KNL_ERRATUM {KNL_ERRATUM_MASK:#x}ULL
#define KHMON_PTW_START_KERNEL_MAP {START_KERNEL_MAP:#x}ULL
{codes}

{C_STRUCT}

struct khmon_ptw_page {{
    u64 pte[{PTES}];
}};
BPF_PERCPU_ARRAY(khmon_ptw_scratch, struct khmon_ptw_page, 1);

/* The table entry for `index` in the table at kernel virtual address `table`. */
static __always_inline int khmon_ptw_entry(u64 table, u64 index, u64 *e)
{{
    return bpf_probe_read_kernel(e, sizeof(*e), (void *)(table + (index & 511) * 8));
}}

/* x, as a value LLVM cannot see through (so it cannot fold tests back into branches). */
static __always_inline u64 khmon_ptw_opaque(u64 x)
{{
    asm volatile("" : "+r"(x));
    return x;
}}

/* 1 if x != 0, else 0, without a branch. */
static __always_inline u64 khmon_ptw_nz(u64 x)
{{
    return (x | khmon_ptw_opaque(-x)) >> 63;
}}

static __always_inline int khmon_ptwalk(u64 mm, u64 address, struct khmon_ptbits *out)
{{
    u64 pob = 0, pfn_mask = KHMON_PTW_PFN_MASK, table = 0, e = 0, zero = ~0ULL;
    u32 l5 = 0, key = 0;

    __builtin_memset(out, 0, sizeof(*out));
    if (bpf_probe_read_kernel(&pob, sizeof(pob), (void *)KHMON_PTW_SYM_PAGE_OFFSET_BASE) || !pob)
        return KHMON_PTW_E_READ;
#ifdef KHMON_PTW_SYM_PHYSICAL_MASK
    {{
        u64 pm = 0;
        if (bpf_probe_read_kernel(&pm, sizeof(pm), (void *)KHMON_PTW_SYM_PHYSICAL_MASK) == 0 && pm)
            pfn_mask &= pm;
    }}
#endif
#ifdef KHMON_PTW_SYM_PGTABLE_L5_ENABLED
    if (bpf_probe_read_kernel(&l5, sizeof(l5), (void *)KHMON_PTW_SYM_PGTABLE_L5_ENABLED))
        return KHMON_PTW_E_READ;
#endif
    if (bpf_probe_read_kernel(&table, sizeof(table), (void *)(mm + KHMON_PTW_MM_PGD)) || !table)
        return KHMON_PTW_E_READ;
    out->levels = l5 ? 5 : 4;
    if (l5) {{
        /* pgd_present() is real only with 5 levels; with 4 the PGD entry is the P4D entry. */
        if (khmon_ptw_entry(table, address >> 48, &e))
            return KHMON_PTW_E_READ;
        if (!(e & KHMON_PTW_PRESENT))
            return KHMON_PTW_E_PGD;
        table = pob + (e & pfn_mask);
    }}
    if (khmon_ptw_entry(table, address >> 39, &e))
        return KHMON_PTW_E_READ;
    if (!(e & KHMON_PTW_PRESENT))
        return KHMON_PTW_E_P4D;
    table = pob + (e & pfn_mask);
    if (khmon_ptw_entry(table, address >> 30, &e))
        return KHMON_PTW_E_READ;
    if (!(e & KHMON_PTW_PRESENT))
        return KHMON_PTW_E_PUD;
    if (e & KHMON_PTW_PSE)
        return KHMON_PTW_E_PUD_HUGE;
    table = pob + (e & pfn_mask);
    if (khmon_ptw_entry(table, address >> 21, &e))
        return KHMON_PTW_E_READ;
    out->pmd = e;
    if (!(e & ~KHMON_PTW_KNL_ERRATUM))
        return KHMON_PTW_E_PMD_NONE;
    /* pmd_trans_huge, or a huge PMD being split (present bit clear, PSE kept) */
    if (e & KHMON_PTW_PSE)
        return KHMON_PTW_E_PMD_HUGE;
    if (!(e & KHMON_PTW_PRESENT))
        return KHMON_PTW_E_PMD_NOT_PRESENT;

    struct khmon_ptw_page *pg = khmon_ptw_scratch.lookup(&key);
    if (!pg)
        return KHMON_PTW_E_SCRATCH;
    if (bpf_probe_read_kernel(pg, sizeof(*pg), (void *)(pob + (e & pfn_mask))))
        return KHMON_PTW_E_READ;

#if defined(KHMON_PTW_SYM_ZERO_PFN)
    {{
        u64 zpfn = 0;
        if (bpf_probe_read_kernel(&zpfn, sizeof(zpfn), (void *)KHMON_PTW_SYM_ZERO_PFN) == 0 && zpfn) {{
            zero = (zpfn << 12) & pfn_mask;
            out->zero_known = 1;
        }}
    }}
#elif defined(KHMON_PTW_SYM_EMPTY_ZERO_PAGE) && defined(KHMON_PTW_SYM_PHYS_BASE)
    {{
        u64 pb = 0;
        if (bpf_probe_read_kernel(&pb, sizeof(pb), (void *)KHMON_PTW_SYM_PHYS_BASE) == 0) {{
            zero = (KHMON_PTW_SYM_EMPTY_ZERO_PAGE - KHMON_PTW_START_KERNEL_MAP + pb) & pfn_mask;
            out->zero_known = 1;
        }}
    }}
#endif

    /* Branch-free per PTE: a branch per test would fork the verifier's state 8 times per
       byte of bitmap. khmon_ptw_opaque keeps LLVM from folding the bit arithmetic back
       into comparisons, which BPF (no setcc) can only do with branches. Per PTE, one word
       holds present at bit 0, none at bit 16 and zero at bit 32: summed, it counts all
       three (16-bit lanes, counts <= 512); shifted by k and or-ed, it makes the bytes.
       A swap entry is neither none nor present: its byte is ~(present | none). */
    u64 counts = 0;
#pragma clang loop unroll(disable)
    for (u32 j = 0; j < {PTES // 8}; j++) {{
        u64 bytes = 0;
#pragma unroll
        for (u32 k = 0; k < 8; k++) {{
            u64 v = pg->pte[j * 8 + k];
            u64 isp = (v | khmon_ptw_opaque(v >> KHMON_PTW_PROTNONE_BIT)) & 1;  /* pte_present */
            u64 isn = khmon_ptw_nz(v & ~KHMON_PTW_KNL_ERRATUM) ^ 1;  /* pte_none */
            u64 isz = isp & ~khmon_ptw_nz((v & pfn_mask) ^ zero);  /* is_zero_pfn */
            u64 w = isp | (isn << 16) | (isz << 32);
            counts += w;
            bytes |= w << k;
        }}
        out->present[j] = bytes;
        out->swap[j] = ~(bytes | (bytes >> 16));
        out->zero[j] = bytes >> 32;
    }}
    out->npresent = counts & 0xffff;
    out->none = (counts >> 16) & 0xffff;
    out->nzero = (counts >> 32) & 0xffff;
    out->nswap = {PTES} - out->npresent - out->none;
    return 0;
}}
"""
