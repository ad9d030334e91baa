"""The byte layout of khmon's event records, shared by the BPF generator and the decoder.

A record is a fixed 64-byte header written by khmon's BPF code, then the event's own fields
copied verbatim from the kernel's trace entry (so each field sits at its format-file offset
minus the 8-byte common header), then one fixed-size NUL-padded buffer per __data_loc string.
Because the body layout *is* the kernel's, a recording carries the format files and any
machine can decode it.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..kernel.btf import Scalar
from ..kernel.tpformat import EventFormat, Field, parse_format

COMMON_SIZE = 8  # common_type, common_flags, common_preempt_count, common_pid
STR_LEN = 64  # bytes kept of each __data_loc string (file names)

# The header, in C (bpf/khmon.bpf.c: struct khmon_hdr) and Python (struct module) form.
HEADER_FIELDS = (
    ("ts", "Q"),  # bpf_ktime_get_ns(): CLOCK_MONOTONIC, ns
    ("count", "I"),  # kernel events this record stands for: 1, or the repeats of a flush
    ("event", "H"),  # index into the recording's event table
    ("cpu", "H"),
    ("tid", "I"),  # the collapsing thread: khugepaged, or a MADV_COLLAPSE caller
    ("tgid", "I"),  # its process
    ("owner_tgid", "I"),  # the process owning the mm (mm->owner->tgid); 0 when unknown
    ("flags", "I"),  # 0 in recordings; on the wire, DEDUP_INSTALL/DEDUP_FLUSH | slot
    ("comm", "16s"),  # the collapsing thread's comm
    ("owner_comm", "16s"),  # comm of the task mm->owner points at
)
HEADER_STRUCT = struct.Struct("<" + "".join(code for _, code in HEADER_FIELDS))
HEADER_SIZE = HEADER_STRUCT.size
HEADER_NAMES = tuple(name for name, _ in HEADER_FIELDS)


def _header_offset(name: str) -> int:
    codes = [code for n, code in HEADER_FIELDS[:HEADER_NAMES.index(name)]]
    return struct.calcsize("<" + "".join(codes))


EVENT_INDEX_OFFSET = _header_offset("event")
CPU_OFFSET = _header_offset("cpu")
FLAGS_OFFSET = _header_offset("flags")
# Ring-buffer records of deduplicated (hot) events name the per-CPU dedup slot they concern
# in `flags` (see bpf/khmon.bpf.c and khmon.dedup): an install record is the first occurrence
# of a payload in that slot, a flush record is a bare header counting its repeats since.
DEDUP_INSTALL = 1 << 30
DEDUP_FLUSH = 1 << 31
DEDUP_SLOT_MASK = (1 << 24) - 1
assert HEADER_SIZE == 64

_INT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}


def _code(f: Field) -> str:
    """struct-module code for a field: integers by size and signedness, arrays as bytes."""
    if f.is_data_loc:
        return "I"
    if "[" in f.ctype or f.size not in _INT_CODES:
        return f"{f.size}s"
    code = _INT_CODES[f.size]
    return code if f.signed else code.upper()


def is_page_pointer(f: Field) -> bool:
    """A `struct folio *` or `struct page *` field: a pointer into vmemmap, not a pfn."""
    return f.ctype.replace(" ", "") in ("structfolio*", "structpage*")


@dataclass(frozen=True)
class EventLayout:
    """How one event's records are laid out, and how to turn them into typed tuples."""

    index: int
    fmt: EventFormat
    hot: bool  # deduplicated in the kernel: one record per distinct payload, then counts
    raw: bool = False  # a raw tracepoint: fields are the TP_PROTO arguments (see raw_format)
    func: Any = None  # a funcprobes.FuncProbe: an event khmon makes from function probes

    @property
    def name(self) -> str:
        return self.fmt.name

    @cached_property
    def fields(self) -> tuple[Field, ...]:
        return tuple(sorted(self.fmt.own_fields, key=lambda f: f.offset))

    @cached_property
    def body_size(self) -> int:
        end = max(f.offset + f.size for f in self.fields) - COMMON_SIZE
        return (end + 7) // 8 * 8

    @cached_property
    def strings(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.is_data_loc)

    @cached_property
    def size(self) -> int:
        return HEADER_SIZE + self.body_size + STR_LEN * len(self.strings)

    @cached_property
    def gaps(self) -> tuple[tuple[int, int], ...]:
        """(body offset, length) of the padding between fields, zeroed in dedup keys."""
        gaps, pos = [], 0
        for f in self.fields:
            start = f.offset - COMMON_SIZE
            if start > pos:
                gaps.append((pos, start - pos))
            pos = max(pos, start + f.size)
        if pos < self.body_size:
            gaps.append((pos, self.body_size - pos))
        return tuple(gaps)

    @cached_property
    def mm_field(self) -> Field | None:
        """The `struct mm_struct *` field that names the owning process, when the event has one."""
        return next((f for f in self.fields if f.ctype.replace(" ", "") == "structmm_struct*"),
                    None)

    @cached_property
    def page_field(self) -> Field | None:
        """The field naming the page an event is about (mm_khugepaged_scan_pmd's scanned page):
        its pfn, or a struct folio/page pointer (is_page_pointer tells which)."""
        return next((f for f in self.fields
                     if f.size == 8 and (f.name == "pfn" or is_page_pointer(f))), None)

    @cached_property
    def field_names(self) -> tuple[str, ...]:
        body = tuple(f.name for f in self.fields)
        strs = tuple(f"{f.name}_str" for f in self.strings)
        return HEADER_NAMES + body + strs

    @cached_property
    def items(self) -> tuple[tuple[str, int, str], ...]:
        """(name, byte offset in the record, struct code) of every field, in record order."""
        out, pos = [], 0
        for name, code in HEADER_FIELDS:
            out.append((name, pos, code))
            pos += struct.calcsize("<" + code)
        for f in self.fields:
            out.append((f.name, HEADER_SIZE + f.offset - COMMON_SIZE, _code(f)))
        base = HEADER_SIZE + self.body_size
        out.extend((f"{f.name}_str", base + i * STR_LEN, f"{STR_LEN}s")
                   for i, f in enumerate(self.strings))
        return tuple(out)

    def projection(self, names: tuple[str, ...] | None = None) -> struct.Struct:
        """A struct unpacking whole records into just the named fields, in record order,
        the rest skipped as padding (all fields when names is None). Unpacking fewer fields
        is most of what makes replay fast. Built once per set of names."""
        cache = self.__dict__.setdefault("_projections", {})
        got = cache.get(names)
        if got is None:
            got = cache[names] = self._projection(names)
        return got

    def record_order(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """`names` in the order projection(names) yields them."""
        cache = self.__dict__.setdefault("_orders", {})
        got = cache.get(names)
        if got is None:
            want = set(names)
            got = cache[names] = tuple(n for n, _off, _code in self.items if n in want)
        return got

    def _projection(self, names: tuple[str, ...] | None) -> struct.Struct:
        parts, pos = [], 0
        for name, off, code in self.items:
            if names is not None and name not in names:
                continue
            if off > pos:
                parts.append(f"{off - pos}x")
            parts.append(code)
            pos = off + struct.calcsize("<" + code)
        if pos < self.size:
            parts.append(f"{self.size - pos}x")
        return struct.Struct("<" + "".join(parts))

    @cached_property
    def struct(self) -> struct.Struct:
        """Unpacks one whole record, header, body and strings, into one flat tuple."""
        return self.projection()

    @cached_property
    def record_type(self) -> type:
        """A namedtuple named after the event, with the header and the kernel's field names."""
        return namedtuple(self.name, self.field_names)


def is_hot(name: str) -> bool:
    """Scan events fire once per PMD or file range scanned (over a million a second at full
    speed); they are deduplicated in the kernel. Collapse events are rare and kept in order."""
    return name.startswith("mm_khugepaged_scan")


def raw_format(fmt: EventFormat, params: list[tuple[str, Scalar | None]] | None
               ) -> EventFormat | None:
    """The event as a raw tracepoint sees it: its TP_PROTO arguments (from the BTF of
    __bpf_trace_<event>, whose first parameter is the tracepoint's private data) laid out
    with natural alignment where the format's fields would be. The format's symbol tables
    still name the values.

    None when a raw tracepoint would lose something: unnamed or non-scalar arguments, a
    string field (a raw tracepoint sees the pointer, not the text), or a status field with
    no argument of the same name. A raw tracepoint skips the kernel's trace-entry
    marshalling, which costs a hot event more than khmon's whole program.
    """
    if not params or any(f.is_data_loc for f in fmt.own_fields):
        return None
    args = params[1:]
    if any(not name or scalar is None for name, scalar in args):
        return None
    if not set(fmt.symbols) <= {name for name, _ in args}:
        return None
    specs = [(name, s.ctype, s.size, s.signed) for name, s in args if s is not None]
    common = tuple(f for f in fmt.fields if f.is_common)
    return dataclasses.replace(fmt, fields=common + fields_at(specs))


def fields_at(specs: list[tuple[str, str, int, bool]]) -> tuple[Field, ...]:
    """Fields (name, ctype, size, signed) laid out with natural alignment where a trace
    entry's own fields start (after its 8-byte common header), as a C struct would (a byte
    array aligned to 1, scalars to their size)."""
    fields, pos = [], COMMON_SIZE
    for name, ctype, size, signed in specs:
        align = 1 if "[" in ctype else size
        pos = (pos + align - 1) // align * align
        fields.append(Field(name, ctype, pos, size, signed))
        pos += size
    return tuple(fields)


def build_layouts(formats: list[EventFormat],
                  params_of: Callable[[str], list[tuple[str, Scalar | None]] | None]
                  = lambda _name: None) -> list[EventLayout]:
    """Layouts for the traced events; hot events become raw tracepoints where params_of
    (BTF's __bpf_trace_<event> parameters) allows."""
    out = []
    for i, f in enumerate(formats):
        hot = is_hot(f.name)
        raw = raw_format(f, params_of(f.name)) if hot else None
        out.append(EventLayout(i, raw or f, hot, raw is not None))
    return out


def layouts_from_header(events: list[dict]) -> list[EventLayout]:
    """Rebuild the layouts a recording was made with from the format files its header keeps
    (and, for raw tracepoints, the argument layout it used)."""
    out = []
    for i, e in enumerate(events):
        raw = e.get("raw_args")
        if e.get("format"):
            fmt = parse_format(e["format"], e.get("system", ""))
            if raw is not None:
                common = tuple(f for f in fmt.fields if f.is_common)
                fmt = dataclasses.replace(fmt, fields=common + tuple(Field(*a) for a in raw))
        else:  # a function-probe event: its fields and value names are in the header
            symbols = {k: {int(n): v for n, v in t.items()} for k, t in e["symbols"].items()}
            fmt = EventFormat(e["system"], e["name"], -1, tuple(Field(*a) for a in e["fields"]),
                              symbols, "")
        out.append(EventLayout(i, fmt, bool(e["hot"]), raw is not None,
                               e.get("probe") or None))
    return out


def header_events(layouts: list[EventLayout]) -> list[dict]:
    """The header's description of the traced events: enough to decode every record."""
    out = []
    for lay in layouts:
        e = {"name": lay.name, "system": lay.fmt.system, "hot": lay.hot, "format": lay.fmt.text}
        fields = [[f.name, f.ctype, f.offset, f.size, f.signed] for f in lay.fields]
        if lay.raw:
            e["raw_args"] = fields
        if lay.func is not None:
            e.update(fields=fields, symbols=lay.fmt.symbols,
                     probe=f"{lay.func.func}{' entry+exit' if lay.func.exit else ' entry'}")
        out.append(e)
    return out
