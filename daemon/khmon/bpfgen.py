"""Generate khmon's BPF C from the running kernel's tracepoint formats and BTF offsets.

bpf/khmon.bpf.c is one named text with explicit placeholders (the bcc tools convention);
this module fills them. Per event it emits a body struct sized from the format file, and a
program that copies the trace entry with one bpf_probe_read_kernel. Scan events also get a
dedup hash map keyed on (thread, payload); their padding bytes are zeroed so equal payloads
make equal keys. Pure string work: no bcc here, so tests can read the generated C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .layout import COMMON_SIZE, STR_LEN, EventLayout

BPF_SOURCE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "bpf" / "khmon.bpf.c",  # a checkout
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
    dedup_entries: int = 16384
    filter_tgid: int = 0


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


def _mm_expr(lay: EventLayout, src: str) -> list[str]:
    if lay.mm_field is None:
        return ["    u64 mm = 0;"]
    off = lay.mm_field.offset - COMMON_SIZE
    return ["    u64 mm = 0;", f"    __builtin_memcpy(&mm, &{src}.b[{off}], 8);"]


def _event_code(lay: EventLayout) -> str:
    n, idx = lay.name, lay.index
    strs = f"    char s[{len(lay.strings)}][{STR_LEN}];\n" if lay.strings else ""
    lines = [
        f"/* {n}: body = format bytes {COMMON_SIZE}..{COMMON_SIZE + lay.body_size} */",
        f"struct rec_{n} {{\n    struct khmon_hdr h;\n    u8 b[{lay.body_size}];\n{strs}}};",
    ]
    if not lay.hot:
        lines += [
            f"int khmon_{n}(void *ctx)",
            "{",
            f"    struct rec_{n} r = {{}};",
            f"    u32 ev = {idx};",
            f"    bpf_probe_read_kernel(r.b, sizeof(r.b), (char *)ctx + {COMMON_SIZE});",
            *_copy_strings(lay, "r"),
            *_mm_expr(lay, "r"),
            "    khmon_fill_hdr(&r.h, ev, mm);",
            "    if (khmon_excluded(&r.h, mm))",
            "        return 0;",
            "    seen.increment(ev);",
            "    if (events.ringbuf_output(&r, sizeof(r), 0) != 0)",
            "        lost.increment(ev);",
            "    return 0;",
            "}",
        ]
        return "\n".join(lines) + "\n"
    if lay.raw:
        # TP_PROTO arguments, each a u64 in ctx->args[]; keep the low `size` bytes.
        sig = f"int khmon_{n}(struct bpf_raw_tracepoint_args *ctx)"
        fill = [f"    {{ u64 a = ctx->args[{i}]; "
                f"__builtin_memcpy(&k.b[{f.offset - COMMON_SIZE}], &a, {f.size}); }}"
                for i, f in enumerate(lay.fields)]
    else:
        # The trace entry, read in one go; its padding zeroed so equal payloads are equal keys.
        sig = f"int khmon_{n}(void *ctx)"
        fill = [f"    bpf_probe_read_kernel(k.b, sizeof(k.b), (char *)ctx + {COMMON_SIZE});",
                *(f"    __builtin_memset(&k.b[{off}], 0, {length});" for off, length in lay.gaps),
                *_copy_strings(lay, "k")]
    lines += [
        f"struct dkey_{n} {{\n    u32 tid;\n    u32 pad;\n    u8 b[{lay.body_size}];\n{strs}}};",
        f"struct dval_{n} {{\n    u64 repeats;\n    u32 excluded;\n    u32 pad;\n"
        f"    struct rec_{n} rec;\n}};",
        f"BPF_HASH(dedup_{n}, struct dkey_{n}, struct dval_{n}, DEDUP_ENTRIES);",
        sig,
        "{",
        f"    struct dkey_{n} k = {{}};",
        f"    u32 ev = {idx};",
        "    k.tid = (u32)bpf_get_current_pid_tgid();",
        *fill,
        f"    struct dval_{n} *v = dedup_{n}.lookup(&k);",
        "    if (v) {",
        "        if (v->excluded)",
        "            return 0;",
        "        seen.increment(ev);",
        "        __sync_fetch_and_add(&v->repeats, 1);",
        "        return 0;",
        "    }",
        f"    struct dval_{n} nv = {{}};",
        "    __builtin_memcpy(nv.rec.b, k.b, sizeof(k.b));",
        *(["    __builtin_memcpy(nv.rec.s, k.s, sizeof(k.s));"] if lay.strings else []),
        *_mm_expr(lay, "k"),
        "    khmon_fill_hdr(&nv.rec.h, ev, mm);",
        "    nv.excluded = khmon_excluded(&nv.rec.h, mm);",
        f"    if (dedup_{n}.insert(&k, &nv) != 0)",
        "        dedup_full.increment(ev);",
        "    if (nv.excluded)",
        "        return 0;",
        "    seen.increment(ev);",
        "    if (events.ringbuf_output(&nv.rec, sizeof(nv.rec), 0) != 0)",
        "        lost.increment(ev);",
        "    return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


def generate(layouts: list[EventLayout], owner: OwnerOffsets, cfg: ProbeConfig,
             text: str | None = None) -> str:
    """The complete BPF C for these events, placeholders filled."""
    text = template() if text is None else text
    values = {
        "NR_EVENTS": str(len(layouts)),
        "RINGBUF_PAGES": str(cfg.ringbuf_pages),
        "DEDUP_ENTRIES": str(cfg.dedup_entries),
        "FILTER_TGID": str(cfg.filter_tgid),
        "HAVE_OWNER": "1" if owner.usable else "0",
        "MM_OWNER_OFF": str(owner.mm_owner or 0),
        "TASK_TGID_OFF": str(owner.task_tgid or 0),
        "TASK_COMM_OFF": str(owner.task_comm or 0),
    }
    defines = "".join(f"#define {key} {val}\n" for key, val in values.items())
    code = "\n".join(_event_code(lay) for lay in layouts)
    return defines + re.sub(r"^EVENT_CODE$", lambda _: code, text, count=1, flags=re.M)
