"""Function probes (tier 2): the per-PMD entry and collapse_huge_page, where the kernel allows.

Tracepoints do not say which PMD khugepaged scanned, in which VMA, or how long a collapse
took. Function probes do: on the per-PMD function (collapse_single_pmd on 7.2,
hpage_collapse_scan_pmd on 6.1-6.18, collapse_scan_pmd where a kernel has it uninlined) khmon
records at entry the mm, the PMD address and the VMA's start, end and flags, and at exit the
verdict (its return value); these are deduplicated like scan events, so a rescan that finds
the same PMD in the same state is counted, not sent. On collapse_huge_page entry and exit it
records the start address, the order (an argument since the mTHP collapse series), the
present-PTE bitmap the scan left in collapse_control (mthp_present_ptes, same series), the
result and the duration.

Everything is read from the running kernel: which function exists (BTF and kallsyms), each
argument's position (BTF parameter names), struct offsets (BTF), the userfaultfd flag bits
(BTF's VMA_*_BIT enum on 7.2, else the running kernel's own headers). This module only plans;
bpfgen writes the C, and probes.py tries fentry first and kprobes second.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

from ..geometry import BITMAP_BYTES
from ..kernel.btf import Btf
from ..kernel.tpformat import EventFormat
from ..stream.events import FN_COLLAPSE, FN_PMD_SCAN, FUNC_SYSTEM
from ..stream.layout import EventLayout, fields_at
from .ptwalk import PTBITS, PtWalkPlan

SYSTEM = FUNC_SYSTEM
PMD_SCAN, COLLAPSE = FN_PMD_SCAN, FN_COLLAPSE
# Per-PMD entry candidates, newest first (the mTHP series renamed and then split the scan).
PMD_ENTRY_FUNCS = ("collapse_single_pmd", "collapse_scan_pmd", "hpage_collapse_scan_pmd")
COLLAPSE_FUNC = "collapse_huge_page"
ADDRESS_PARAMS = ("address", "addr", "start_addr")
VMA_FLAG_NAMES = ("UFFD_MISSING", "UFFD_WP", "UFFD_MINOR", "HUGEPAGE")
# The mTHP collapse series' bitmap of present PTEs: unsigned long[8] on x86-64, one bit per PTE
# of the PMD (bit k of byte j is PTE 8j+k), filled by the scan before collapse_huge_page.
BITMAP_MEMBER = "mthp_present_ptes"


@dataclass(frozen=True)
class Capture:
    """One recorded field: an argument, or a u64 read at an offset from a pointer argument."""

    field: str
    arg: int  # index of the function argument
    deref: int | None = None  # byte offset read from the argument (a pointer), if any
    size: int = 8
    signed: bool = False


@dataclass(frozen=True)
class FuncProbe:
    """A khmon event produced by probing a kernel function."""

    event: str
    func: str
    nargs: int
    captures: tuple[Capture, ...]
    exit: bool  # pair entry with exit: result (the return value), and duration_ns unless hot
    mm: Capture | None  # how to find the mm, for the owning process
    hot: bool = False  # once per PMD scanned: deduplicated in the kernel
    ptwalk: PtWalkPlan | None = None  # walk the PMD's PTE table at entry (khmon.ptwalk)
    btf_id: int | None = None  # the function's BTF type id, what an fentry program attaches to


# struct khmon_ptbits (khmon.ptwalk) as record fields, then the walk's return code.
PTWALK_FIELDS = (("present", "u8[64]", 64, False), ("swap", "u8[64]", 64, False),
                 ("zero", "u8[64]", 64, False), ("none_ptes", "u16", 2, False),
                 ("swap_ptes", "u16", 2, False), ("zero_ptes", "u16", 2, False),
                 ("present_ptes", "u16", 2, False), ("levels", "u16", 2, False),
                 ("zero_known", "u16", 2, False), ("pad0", "u16", 2, False),
                 ("pad1", "u16", 2, False), ("pmd_entry", "u64", 8, False),
                 ("walk", "int", 4, True))
assert sum(size for _, _, size, _ in PTWALK_FIELDS[:-1]) == PTBITS.size
# A collapse attempt's VMA: the flags of the per-PMD call it ran in, and whether it ran in one.
ENCLOSING_VMA_FIELDS = (("vm_flags", "u64", 8, False), ("in_pmd_scan", "u32", 4, False))


def _find(btf: Btf, kallsyms: set[str], names: tuple[str, ...]) -> tuple[str, list] | None:
    for name in names:
        params = btf.func_params(name)
        if params is not None and name in kallsyms:
            return name, params
    return None


def plan(btf: Btf, kallsyms: set[str], ptwalk: PtWalkPlan | None = None) -> list[FuncProbe]:
    """The function probes this kernel allows; empty when it has none of the functions.
    `ptwalk`: walk each scanned PMD's PTE table for its bitmap, where collapse_control does
    not carry one (kernels before the mTHP collapse series)."""
    has_bitmap = btf.member_offset("collapse_control", BITMAP_MEMBER) is not None
    vma = {m: btf.member_offset("vm_area_struct", m) for m in ("vm_start", "vm_end", "vm_flags",
                                                                 "vm_mm")}
    out: list[FuncProbe] = []
    found = _find(btf, kallsyms, PMD_ENTRY_FUNCS)
    if found and None not in vma.values():
        func, params = found
        names = [p for p, _ in params]
        addr = next((names.index(n) for n in ADDRESS_PARAMS if n in names), None)
        if "vma" in names and addr is not None:
            v = names.index("vma")
            mm = (Capture("mm", names.index("mm")) if "mm" in names
                  else Capture("mm", v, vma["vm_mm"]))
            out.append(FuncProbe(PMD_SCAN, func, len(params), (
                mm, Capture("address", addr), Capture("vm_start", v, vma["vm_start"]),
                Capture("vm_end", v, vma["vm_end"]), Capture("vm_flags", v, vma["vm_flags"]),
            ), exit=True, mm=mm, hot=True, ptwalk=None if has_bitmap else ptwalk,
                btf_id=btf.find("FUNC", func)))
    found = _find(btf, kallsyms, (COLLAPSE_FUNC,))
    if found:
        func, params = found
        names = [p for p, _ in params]
        addr = next((names.index(n) for n in ADDRESS_PARAMS if n in names), None)
        if "mm" in names and addr is not None:
            mm = Capture("mm", names.index("mm"))
            caps = [mm, Capture("address", addr)]
            if "order" in names:
                caps.append(Capture("order", names.index("order"), size=4))
            bitmap = btf.member_offset("collapse_control", BITMAP_MEMBER)
            if bitmap is not None and "cc" in names:
                caps.append(Capture("present", names.index("cc"), bitmap, size=BITMAP_BYTES))
            out.append(FuncProbe(COLLAPSE, func, len(params), tuple(caps), exit=True, mm=mm,
                                 btf_id=btf.find("FUNC", func)))
    return out


def layouts(probes: list[FuncProbe], first_index: int, result_names: dict[int, str]
            ) -> list[EventLayout]:
    """Record layouts of the function events, numbered after the tracepoint events.
    collapse results are enum scan_result, named by the tracepoints' status table."""
    out = []
    in_scan = any(p.event == PMD_SCAN for p in probes)
    for i, p in enumerate(probes):
        specs = [(c.field, _ctype(c), c.size, c.signed) for c in p.captures]
        specs += list(PTWALK_FIELDS) if p.ptwalk else []
        if p.event == COLLAPSE and in_scan:
            # filled at exit from the per-PMD call's stash (bpfgen._enclosing_vma)
            specs += list(ENCLOSING_VMA_FIELDS)
        symbols = {}
        if p.exit:
            specs += [] if p.hot else [("duration_ns", "u64", 8, False)]
            specs += [("result", "int", 4, True)]
            symbols = {"result": dict(result_names)}
        fmt = EventFormat(SYSTEM, p.event, -1, fields_at(specs), symbols, "")
        out.append(EventLayout(first_index + i, fmt, hot=p.hot, func=p))
    return out


def _ctype(c: Capture) -> str:
    if c.field == "mm":
        return "struct mm_struct *"
    return {8: "u64", 4: "u32"}.get(c.size, f"u8[{c.size}]")


def vma_flag_bits(btf: Btf, release: str | None = None) -> dict[str, int]:
    """VM_UFFD_MISSING, VM_UFFD_WP, VM_UFFD_MINOR and VM_HUGEPAGE as masks, by lower-case
    name, from BTF's VMA_<NAME>_BIT enum (7.2) or else the running kernel's own headers
    (include/linux/mm.h), and only when those headers are this kernel's. A flag missing from
    the result is one khmon could not learn on this kernel; it is never guessed."""
    out: dict[str, int] = {}
    for name in VMA_FLAG_NAMES:
        bit = btf.enum_value(f"VMA_{name}_BIT")
        if bit is not None:
            out[name.lower()] = 1 << bit
    if len(out) == len(VMA_FLAG_NAMES):
        return out
    release = release or platform.release()
    mods = Path("/lib/modules") / release
    if release not in (mods / "build").resolve().name:
        return out
    text = ""
    for half in ("source", "build"):
        try:
            text = (mods / half / "include/linux/mm.h").read_text()
            break
        except OSError:
            continue
    try:
        autoconf = (mods / "build/include/generated/autoconf.h").read_text()
    except OSError:
        autoconf = ""
    for name in VMA_FLAG_NAMES:
        m = re.search(rf"^#\s*define\s+VM_{name}\s+(0x[0-9a-fA-F]+)\b", text, re.M)
        if m:
            out.setdefault(name.lower(), int(m.group(1), 16))
            continue
        b = re.search(rf"^#\s*define\s+VM_{name}_BIT\s+(\d+)\b", text, re.M)
        # VM_UFFD_MINOR is VM_NONE unless the architecture supports minor faults.
        if b and (name != "UFFD_MINOR" or
                  "CONFIG_HAVE_ARCH_USERFAULTFD_MINOR 1" in autoconf):
            out.setdefault(name.lower(), 1 << int(b.group(1)))
    return out
