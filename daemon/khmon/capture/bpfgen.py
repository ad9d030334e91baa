"""Generate khmon's BPF C from the running kernel's tracepoint formats and BTF offsets.

bpf/khmon.bpf.c is one named text with explicit placeholders (the bcc tools convention);
this module fills them. Per event it emits a body struct sized from the format file, and a
program that copies the trace entry with one bpf_probe_read_kernel. Scan events also get a
per-CPU dedup table of 4-way sets: a slot holds the 64-bit hash of (thread, payload), computed
over the key's words (their padding bytes zeroed so equal payloads hash alike), and the set
follows the payload's place in memory where it names one (_set_index). Pure string work: no bcc here,
so tests can read the generated C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..geometry import PAGE_SHIFT, PMD_ORDER
from ..kernel.tpformat import Field
from ..stream.events import FN_PMD_SCAN, SUCCEEDED
from ..stream.layout import (
    COMMON_SIZE,
    DEDUP_FLUSH,
    DEDUP_INSTALL,
    STR_LEN,
    EventLayout,
    is_page_pointer,
)
from .ptwalk import c_code as ptwalk_c

BPF_SOURCE_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "bpf" / "khmon.bpf.c",  # a checkout
    Path("/usr/share/khmon/bpf/khmon.bpf.c"),
)


@dataclass(frozen=True)
class OwnerOffsets:
    """Byte offsets from BTF used to name the process owning an mm; None where missing."""

    mm_owner: int | None  # struct mm_struct.owner (CONFIG_MEMCG only)
    task_tgid: int | None  # struct task_struct.tgid
    task_comm: int | None  # struct task_struct.comm

    @property
    def usable(self) -> bool:
        return None not in (self.mm_owner, self.task_tgid, self.task_comm)


@dataclass(frozen=True)
class ProbeConfig:
    ringbuf_pages: int = 1024
    # Per CPU and scan event, 16 bytes each (512 KiB), a power of two. 4,096 PMDs rescanned in
    # a loop fill half the ways, and about one set in 6,000 holds more than four payloads;
    # 65,536 slots would halve the repeats sent alone but cost TLB misses on every event.
    dedup_slots: int = 32768
    filter_tgid: int = 0
    ptwalk: bool = True  # the ptwalk bitmap source, where the kernel has no bitmap of its own


def template() -> str:
    for path in BPF_SOURCE_CANDIDATES:
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError("bpf/khmon.bpf.c not found next to the khmon package")


def _copy_strings(lay: EventLayout, dst: str) -> list[str]:
    out = []
    for i, f in enumerate(lay.strings):
        off = f.offset - COMMON_SIZE
        out += [
            "    {",
            "        u32 loc = 0;",
            f"        __builtin_memcpy(&loc, &{dst}.b[{off}], 4);",
            f"        bpf_probe_read_kernel_str({dst}.s[{i}], {STR_LEN}, "
            "(void *)((char *)ctx + (loc & 0xffff)));",
            "    }",
        ]
    return out


def _mm_expr(lay: EventLayout, body: str) -> list[str]:
    if lay.mm_field is None:
        return ["    u64 mm = 0;"]
    off = lay.mm_field.offset - COMMON_SIZE
    return ["    u64 mm = 0;", f"    __builtin_memcpy(&mm, &{body}[{off}], 8);"]


def _ptwalk_call(lay: EventLayout, dst: str) -> list[str]:
    """Walk the PMD's PTE table (khmon.ptwalk) into the record's bitmap fields."""
    at = {f.name: f.offset - COMMON_SIZE for f in lay.fields}
    return [
        "    {",
        "        u64 pw_mm = 0, pw_addr = 0;",
        f"        __builtin_memcpy(&pw_mm, &{dst}.b[{at['mm']}], 8);",
        f"        __builtin_memcpy(&pw_addr, &{dst}.b[{at['address']}], 8);",
        f"        int walk = khmon_ptwalk(pw_mm, pw_addr, (struct khmon_ptbits *)&{dst}.b["
        f"{at['present']}]);",
        f"        __builtin_memcpy(&{dst}.b[{at['walk']}], &walk, 4);",
        "    }",
    ]


def _arg(mode: str, i: int) -> str:
    """Function argument i: fentry programs get a u64 array, kprobes the saved registers."""
    return f"ctx[{i}]" if mode == "kfunc" else f"PT_REGS_PARM{i + 1}(ctx)"


def _fill(lay: EventLayout, mode: str, dst: str) -> list[str]:
    """C statements that fill {dst}.b (and {dst}.s) with the event's fields."""
    if lay.func is not None:
        out = []
        for c, f in zip(lay.func.captures, lay.fields, strict=False):
            off = f.offset - COMMON_SIZE
            if c.deref is None:
                out.append(f"    {{ u64 a = {_arg(mode, c.arg)}; "
                           f"__builtin_memcpy(&{dst}.b[{off}], &a, {f.size}); }}")
            else:
                out.append(f"    bpf_probe_read_kernel(&{dst}.b[{off}], {f.size}, "
                           f"(void *)({_arg(mode, c.arg)} + {c.deref}));")
        if lay.func.ptwalk is not None:
            out += _ptwalk_call(lay, dst)
        return out
    if lay.raw:
        # TP_PROTO arguments, each a u64 in ctx->args[]; keep the low `size` bytes.
        return [f"    {{ u64 a = ctx->args[{i}]; "
                f"__builtin_memcpy(&{dst}.b[{f.offset - COMMON_SIZE}], &a, {f.size}); }}"
                for i, f in enumerate(lay.fields)]
    # The trace entry, read in one go; its padding zeroed so equal payloads are equal keys.
    return [f"    bpf_probe_read_kernel({dst}.b, sizeof({dst}.b), (char *)ctx + {COMMON_SIZE});",
            *(f"    __builtin_memset(&{dst}.b[{off}], 0, {length});" for off, length in lay.gaps),
            *_copy_strings(lay, dst)]


def _sig(lay: EventLayout, mode: str, exit_: bool = False) -> str:
    n = lay.name
    if lay.func is not None:
        if mode == "kfunc":
            # bcc's own macros name the program as the installed bcc expects (kfunc__<func>
            # in 0.26, kfunc__vmlinux__<func> later): it finds the BTF target by that name.
            return f"{'KRETFUNC_PROBE' if exit_ else 'KFUNC_PROBE'}({lay.func.func})"
        return f"int khmon_{'ret_' if exit_ else ''}{n}(struct pt_regs *ctx)"
    if lay.raw:
        return f"int khmon_{n}(struct bpf_raw_tracepoint_args *ctx)"
    return f"int khmon_{n}(void *ctx)"


def _field_at(lay: EventLayout, name: str) -> Field | None:
    return next((f for f in lay.fields if f.name == name), None)


def _read_int(lay: EventLayout, name: str, buf: str, var: str, ctype: str) -> list[str]:
    """C that copies an integer field of the body into a new variable (0 if absent)."""
    f = _field_at(lay, name)
    if f is None:
        return [f"    {ctype} {var} = 0;"]
    return [f"    {ctype} {var} = 0;",
            f"    __builtin_memcpy(&{var}, &{buf}[{f.offset - COMMON_SIZE}], {min(f.size, 8)});"]


def ok_value(lay: EventLayout) -> int:
    """The status value this event names success with; -1 if it has none."""
    table = lay.fmt.symbols.get(lay.fmt.status_field or "", {})
    return next((v for v, name in table.items() if name == SUCCEEDED), -1)


def counted_exactly(lay: EventLayout) -> bool:
    """Events counted in the kernel's `exact` map: rare ones (not deduplicated) with a
    status, collapse attempts above all."""
    return not lay.hot and lay.fmt.status_field is not None


def _emit(lay: EventLayout, uffd: str = "KHMON_UFFD_UNKNOWN", dur: str | None = None) -> list[str]:
    """Fill the header, apply -p, count exactly (where the event has a status), send; a
    record the ring buffer refuses is counted lost, against its (mm, PMD) too."""
    out = ["    khmon_fill_hdr(&r.h, ev, mm);",
           "    if (khmon_excluded(&r.h, mm))",
           "        return 0;"]
    if counted_exactly(lay):
        order = "" if _field_at(lay, "order") else f"    u32 x_order = {PMD_ORDER};"
        out += [*_read_int(lay, lay.fmt.status_field, "r.b", "x_status", "int"),
                *(_read_int(lay, "order", "r.b", "x_order", "u32") if not order else [order]),
                f"    khmon_exact(ev, x_order, x_status, {uffd}, {dur or 0}, {int(dur is not None)}, "
                f"{ok_value(lay)});"]
    return [*out,
            "    seen.increment(ev);",
            "    if (events.ringbuf_output(&r, sizeof(r), khmon_rb_flags()) != 0) {",
            "        lost.increment(ev);",
            f"        khmon_lost_at(mm, {_address_expr(lay, 'r.b')});",
            "    }",
            "    return 0;",
            "}"]


def _address_expr(lay: EventLayout, buf: str) -> str:
    """The PMD an event names, as a C expression (0 for events that name none)."""
    f = _field_at(lay, "address")
    if f is None or f.size != 8:
        return "0"
    return f"(*(u64 *)&{buf}[{f.offset - COMMON_SIZE}] & ~((1ULL << {PAGE_SHIFT + PMD_ORDER}) - 1))"


def _event_code(lay: EventLayout, mode: str, scan: EventLayout | None = None) -> str:
    """The C of one event. `scan`: the per-PMD function's event, whose entry stash a
    collapse_huge_page exit reads for its VMA (it is generated first)."""
    n, idx = lay.name, lay.index
    strs = f"    char s[{len(lay.strings)}][{STR_LEN}];\n" if lay.strings else ""
    lines = [
        f"/* {n}: body = format bytes {COMMON_SIZE}..{COMMON_SIZE + lay.body_size} */",
        f"struct rec_{n} {{\n    struct khmon_hdr h;\n    u8 b[{lay.body_size}];\n{strs}}};",
    ]
    if lay.func is not None and lay.func.exit:
        return "\n".join(lines + _exit_pair(lay, mode, scan)) + "\n"
    if not lay.hot:
        lines += [_sig(lay, mode), "{", f"    struct rec_{n} r = {{}};", f"    u32 ev = {idx};",
                  *_fill(lay, mode, "r"), *_mm_expr(lay, "r.b"), *_emit(lay)]
        return "\n".join(lines) + "\n"
    lines += [
        *_dedup_key(lay),
        _sig(lay, mode),
        "{",
        f"    struct dkey_{n} k = {{}};",
        f"    u32 ev = {idx};",
        "    k.tid = (u32)bpf_get_current_pid_tgid();",
        *_fill(lay, mode, "k"),
        *_dedup_tail(lay, [f"w[{i}]" for i in range(_key_size(lay) // 8)]),
    ]
    return "\n".join(lines) + "\n"


def _key_size(lay: EventLayout) -> int:
    """sizeof(struct dkey_<event>): thread id, padding, body and strings, in whole words."""
    return -(-(8 + lay.body_size + len(lay.strings) * STR_LEN) // 8) * 8


def _dedup_key(lay: EventLayout) -> list[str]:
    """The key of a deduplicated event, (thread, payload), and its per-CPU table of sets."""
    n = lay.name
    strs = f"    char s[{len(lay.strings)}][{STR_LEN}];\n" if lay.strings else ""
    return [f"struct dkey_{n} {{\n    u32 tid;\n    u32 pad;\n    u8 b[{lay.body_size}];\n{strs}"
            "} __attribute__((aligned(8)));", *_dedup_sets(lay)]


def _dedup_sets(lay: EventLayout) -> list[str]:
    """One plain array holding every CPU's table, CPU after CPU (KHMON_SETS sets each). A
    per-CPU array would cost a second dependent load on every event: its lookup reads the
    element's per-CPU pointer from a table of them before the set itself, and at full scan
    speed both miss the cache. Each CPU still touches only its own sets."""
    return [f"BPF_ARRAY(dsets_{lay.name}, struct khmon_set, KHMON_SETS * NR_CPU_IDS);"]


# Shift that makes neighbouring struct pages (folios) neighbouring sets: any value is correct,
# this one suits 64-byte struct pages. Only where the table is touched changes, not what it holds.
PAGE_PTR_SHIFT = 6


def _set_index(lay: EventLayout, buf: str) -> str:
    """The C expression of a payload's set. khugepaged walks memory in address order, so where
    the payload names its place (the PMD address, a pfn, a folio pointer) the set follows it:
    consecutive PMDs touch consecutive cache lines of the table, which the CPU prefetches,
    instead of a random line each (a cache and TLB miss per event at full scan speed). Other
    events use the hash. Either way the slot is found by the full 64-bit fingerprint."""
    def at(f: Field) -> str:
        return f"*(u64 *)&{buf}[{f.offset - COMMON_SIZE}]"

    address = next((f for f in lay.fields if f.name == "address" and f.size == 8), None)
    if address is not None:
        return f"({at(address)} >> {PAGE_SHIFT + PMD_ORDER})"
    page = lay.page_field
    if page is not None:
        return f"({at(page)} >> {PAGE_PTR_SHIFT})" if is_page_pointer(page) else at(page)
    return "h"


def _dedup_tail(lay: EventLayout, words: list[str], record_ready: bool = False) -> list[str]:
    """Hash the key `words` (C expressions of u64s), then count a repeat, or send the
    payload and install it in a slot. The record `r` is built from key `k` unless
    `record_ready` (it holds the body already)."""
    n = lay.name
    build = [] if record_ready else [
        f"    struct rec_{n} r = {{}};",
        "    __builtin_memcpy(r.b, k.b, sizeof(k.b));",
        *(["    __builtin_memcpy(r.s, k.s, sizeof(k.s));"] if lay.strings else []),
    ]
    return [
        *(["    u64 *w = (u64 *)&k;"] if not record_ready else []),
        # Two lanes, alternate words: half the chain of dependent multiplies
        # (docs/benchmarks.md). Each step is a bijection, so keys that differ in one word
        # never collide; the lanes meet rotated, then the finaliser mixes them.
        "    u64 h0 = 0x9e3779b97f4a7c15ULL, h1 = 0xc2b2ae3d27d4eb4fULL;",
        *(f"    h{i % 2} = khmon_mix(h{i % 2}, {w});" for i, w in enumerate(words)),
        "    u64 h = khmon_fmix(h0 ^ ((h1 << 32) | (h1 >> 32)));",
        f"    u32 set = {_set_index(lay, 'r.b' if record_ready else 'k.b')} "
        "& (KHMON_SETS - 1);",
        "    h |= 1;  /* 0 marks an empty slot */",
        "    u32 at = bpf_get_smp_processor_id() * KHMON_SETS + set;",
        f"    struct khmon_set *st = dsets_{n}.lookup(&at);",
        "    u32 way = 0;",
        "    if (!st) {  /* a CPU id beyond NR_CPU_IDS: counted, never silently dropped */",
        "        khmon_add(ev, 1, 1);",
        "        return 0;",
        "    }",
        "    int got = khmon_repeat(st, set, h, khmon_epoch(), ev, &way);",
        "    if (got == KHMON_REPEAT)",
        "        return 0;",
        *build,
        *_mm_expr(lay, "r.b"),
        "    khmon_fill_hdr(&r.h, ev, mm);",
        "    u64 excluded = khmon_excluded(&r.h, mm) ? KHMON_EXCLUDED : 0;",
        "    if (!excluded) {",
        "        if (got == KHMON_INSTALL)",
        "            r.h.flags = DEDUP_INSTALL | (set * KHMON_WAYS + way);",
        "        khmon_add(ev, 1, 0);",
        "        if (events.ringbuf_output(&r, sizeof(r), khmon_rb_flags()) != 0) {",
        "            /* Not installed: its repeats would have no record to count against. */",
        "            khmon_add(ev, 1, 1);",
        f"            khmon_lost_at(mm, {_address_expr(lay, 'r.b')});",
        "            return 0;",
        "        }",
        "    }",
        "    if (got == KHMON_SEND)",
        "        return 0;",
        "    struct khmon_slot *slot = &st->w[way & (KHMON_WAYS - 1)];",
        "    slot->fp = h;",
        "    slot->ec = (khmon_epoch() << KHMON_EPOCH_SHIFT) | excluded;",
        "    return 0;",
        "}",
    ]


def _enclosing_vma(lay: EventLayout, scan: EventLayout | None) -> list[str]:
    """For a collapse_huge_page exit: the VMA flags of the per-PMD call it ran in (its
    entry's stash, keyed by thread), into the record, and whether that VMA is
    userfaultfd-armed (`uffd`). collapse_huge_page takes no VMA, and on 7.2 the per-PMD
    exit comes after the attempts, so the stash is the only place to learn it in time."""
    vmf, inside = _field_at(lay, "vm_flags"), _field_at(lay, "in_pmd_scan")
    scan_flags = _field_at(scan, "vm_flags") if scan is not None else None
    if vmf is None or inside is None or scan is None or scan_flags is None:
        return ["    u32 uffd = KHMON_UFFD_UNKNOWN;"]
    at = scan_flags.offset - COMMON_SIZE
    return [
        "    u32 uffd = KHMON_UFFD_UNKNOWN;",
        "    {",
        f"        struct fstash_{scan.name} *ps = fstash_{scan.name}.lookup(&tid);",
        "        if (ps) {",
        "            u64 vmf = 0;",
        "            u32 one = 1;",
        f"            __builtin_memcpy(&vmf, &ps->b[{at}], 8);",
        f"            __builtin_memcpy(&r.b[{vmf.offset - COMMON_SIZE}], &vmf, 8);",
        f"            __builtin_memcpy(&r.b[{inside.offset - COMMON_SIZE}], &one, 4);",
        "            if (UFFD_MASK)",
        "                uffd = (vmf & UFFD_MASK) ? KHMON_UFFD_YES : KHMON_UFFD_NO;",
        "        }",
        "    }",
    ]


def _exit_pair(lay: EventLayout, mode: str, scan: EventLayout | None) -> list[str]:
    """Entry stashes the captured fields per thread; exit adds the result (and the duration)
    and sends, or, for a hot event, deduplicates."""
    n, idx = lay.name, lay.index
    res = next(f for f in lay.fields if f.name == "result").offset - COMMON_SIZE
    ret = f"ctx[{lay.func.nargs}]" if mode == "kfunc" else "PT_REGS_RC(ctx)"
    if lay.hot:
        # The key is (thread, body with the verdict), hashed straight from the record:
        # a second copy of a body this size would not fit the 512-byte BPF stack.
        full, rem = divmod(lay.body_size, 8)
        words = ["(u64)tid", *(f"*(u64 *)&r.b[{8 * i}]" for i in range(full))]
        tail = []
        if rem:
            tail = ["    u64 last = 0;", f"    __builtin_memcpy(&last, &r.b[{8 * full}], {rem});"]
            words.append("last")
        # The record is built in a per-CPU scratch slot, not on the stack: with PTE-walk
        # bitmaps it is over 300 bytes, and with the hash and the helpers' frames it would
        # not fit the 512-byte BPF stack (LLVM then exits the loading process).
        exit_body = [
            "    u32 zero = 0;",
            f"    struct rec_{n} *rp = scratch_{n}.lookup(&zero);",
            "    if (!rp)",
            "        return 0;",
            "#define r (*rp)",
            "    __builtin_memset(&r.h, 0, sizeof(r.h));",
            "    __builtin_memcpy(r.b, s->b, sizeof(r.b));",
            f"    fstash_{n}.delete(&tid);",
            f"    int ret = (int){ret};",
            f"    __builtin_memcpy(&r.b[{res}], &ret, 4);",
            *tail,
            *_dedup_tail(lay, words, record_ready=True),
            "#undef r",
        ]
    else:
        dur = next(f for f in lay.fields if f.name == "duration_ns").offset - COMMON_SIZE
        exit_body = [
            f"    struct rec_{n} r = {{}};",
            "    __builtin_memcpy(r.b, s->b, sizeof(r.b));",
            "    u64 dur = bpf_ktime_get_ns() - s->ts;",
            f"    int ret = (int){ret};",
            f"    __builtin_memcpy(&r.b[{dur}], &dur, 8);",
            f"    __builtin_memcpy(&r.b[{res}], &ret, 4);",
            f"    fstash_{n}.delete(&tid);",
            *_enclosing_vma(lay, scan),
            *_mm_expr(lay, "r.b"),
            *_emit(lay, uffd="uffd", dur="dur"),
        ]
    return [
        *([*_dedup_sets(lay), f"BPF_PERCPU_ARRAY(scratch_{n}, struct rec_{n}, 1);"]
          if lay.hot else []),
        f"struct fstash_{n} {{\n    u64 ts;\n    u8 b[{lay.body_size}];\n}};",
        f"BPF_HASH(fstash_{n}, u32, struct fstash_{n}, 4096);",
        _sig(lay, mode),
        "{",
        f"    struct fstash_{n} s = {{}};",
        "    u32 tid = (u32)bpf_get_current_pid_tgid();",
        *_fill(lay, mode, "s"),
        "    s.ts = bpf_ktime_get_ns();",
        f"    fstash_{n}.update(&tid, &s);",
        "    return 0;",
        "}",
        _sig(lay, mode, exit_=True),
        "{",
        "    u32 tid = (u32)bpf_get_current_pid_tgid();",
        f"    struct fstash_{n} *s = fstash_{n}.lookup(&tid);",
        "    if (!s)",
        "        return 0;",
        f"    u32 ev = {idx};",
        *exit_body,
    ]


def generate(layouts: list[EventLayout], owner: OwnerOffsets, cfg: ProbeConfig, *,
             nr_cpu_ids: int, text: str | None = None, func_mode: str | None = None,
             uffd_mask: int = 0) -> str:
    """The complete BPF C for these events, placeholders filled. Function-probe events are
    generated as fentry/fexit (func_mode "kfunc") or kprobes ("kprobe"), and left out when
    func_mode is None. `nr_cpu_ids`: one more than the highest possible CPU id (the dedup
    tables hold one table per CPU). `uffd_mask`: the VM_UFFD_* bits of vm_flags on this
    kernel (capture.plan.vma_flag_bits), 0 when unknown."""
    text = template() if text is None else text
    values = {
        "NR_EVENTS": str(len(layouts)),
        "RINGBUF_PAGES": str(cfg.ringbuf_pages),
        "DEDUP_SLOTS": str(cfg.dedup_slots),
        "NR_CPU_IDS": str(nr_cpu_ids),
        "DEDUP_INSTALL": f"{DEDUP_INSTALL:#x}U",
        "DEDUP_FLUSH": f"{DEDUP_FLUSH:#x}U",
        "FILTER_TGID": str(cfg.filter_tgid),
        "HAVE_OWNER": "1" if owner.usable else "0",
        "MM_OWNER_OFF": str(owner.mm_owner or 0),
        "TASK_TGID_OFF": str(owner.task_tgid or 0),
        "TASK_COMM_OFF": str(owner.task_comm or 0),
        "UFFD_MASK": f"{uffd_mask:#x}ULL",
    }
    defines = "".join(f"#define {key} {val}\n" for key, val in values.items())
    funcs = [lay for lay in layouts if lay.func is not None and func_mode]
    scan = next((lay for lay in funcs if lay.name == FN_PMD_SCAN), None)
    assert scan is None or funcs.index(scan) == 0, "the per-PMD probe's stash must come first"
    code = "\n".join(_event_code(lay, func_mode or "", scan) for lay in layouts
                     if lay.func is None or func_mode)
    walks = {lay.func.ptwalk for lay in layouts if func_mode and lay.func and lay.func.ptwalk}
    code = "".join(ptwalk_c(w) + "\n" for w in walks) + code
    return defines + re.sub(r"^EVENT_CODE$", lambda _: code, text, count=1, flags=re.M)
