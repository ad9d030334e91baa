"""Shared fixtures for the unit tests: the kernels' real format files, and a record packer.

The packer writes records byte by byte from the format file's own offsets and sizes, and the
64-byte header from a hand-written struct string, so it shares no code with khmon.stream.layout:
a test that packs with this and unpacks with khmon checks khmon against the kernel's layout.
"""

from __future__ import annotations

import struct
from pathlib import Path

from khmon.kernel.btf import Scalar
from khmon.kernel.tpformat import EventFormat, parse_format
from khmon.stream.layout import EventLayout, build_layouts, header_events

DATA = Path(__file__).parent / "data"
FORMATS = DATA / "formats"
KERNELS = ("6.1", "6.18", "7.2")

# struct khmon_hdr from bpf/khmon.bpf.c, written out by hand:
# u64 ts; u32 count; u16 event; u16 cpu; u32 tid, tgid, owner_tgid, flags; char comm[16], owner_comm[16]
HDR = struct.Struct("<QIHHIIII16s16s")
assert HDR.size == 64


def format_path(kernel: str, event: str) -> Path:
    return FORMATS / kernel / f"{event}.format"


def format_text(kernel: str, event: str) -> str:
    return format_path(kernel, event).read_text()


def event_names(kernel: str) -> list[str]:
    """The events captured from that kernel, in name order (as tracefs.read_formats sorts)."""
    return sorted(p.name.removesuffix(".format") for p in (FORMATS / kernel).glob("*.format"))


def formats(kernel: str) -> list[EventFormat]:
    return [parse_format(format_text(kernel, n), "huge_memory") for n in event_names(kernel)]


def layouts(kernel: str) -> list[EventLayout]:
    return build_layouts(formats(kernel))


def by_name(lays: list[EventLayout]) -> dict[str, EventLayout]:
    return {lay.name: lay for lay in lays}


def _record_size(fmt: EventFormat) -> tuple[int, int]:
    """(body size, record size), computed here from the format: own fields end, rounded to 8."""
    own = [f for f in fmt.fields if not f.name.startswith("common_")]
    end = max(f.offset + f.size for f in own) - 8
    body = -(-end // 8) * 8
    nstr = sum(1 for f in own if f.ctype.startswith("__data_loc"))
    return body, 64 + body + 64 * nstr


def pack(fmt: EventFormat, event: int, *, count: int = 1, ts: int = 0, cpu: int = 0,
         tid: int = 0, tgid: int = 0, owner_tgid: int = 0, flags: int = 0,
         comm: bytes = b"", owner_comm: bytes = b"", strings: tuple[bytes, ...] = (),
         **values: int | bytes) -> bytes:
    """One record: header, then each named field at (format offset - 8), then the strings."""
    body, size = _record_size(fmt)
    rec = bytearray(size)
    HDR.pack_into(rec, 0, ts, count, event, cpu, tid, tgid, owner_tgid, flags, comm, owner_comm)
    for name, value in values.items():
        f = fmt.field(name)
        assert f is not None, name
        off = 64 + f.offset - 8
        if isinstance(value, bytes):  # a byte array field (a bitmap)
            assert len(value) == f.size, name
            rec[off:off + f.size] = value
        else:
            rec[off:off + f.size] = value.to_bytes(f.size, "little", signed=f.signed)
    for i, s in enumerate(strings):
        off = 64 + body + 64 * i
        rec[off:off + len(s)] = s
    return bytes(rec)


START_NS = 1_000_000_000_000
START_COUNTERS = {"thp_collapse_alloc": 10, "khugepaged/pages_collapsed": 3,
                  "khugepaged/full_scans": 7, "hugepages-64kB/stats/collapse_alloc": 0}
END_COUNTERS = {"thp_collapse_alloc": 11, "khugepaged/pages_collapsed": 4,
                "khugepaged/full_scans": 9, "hugepages-64kB/stats/collapse_alloc": 0,
                "appeared_later": 5}


def capture_header(kernel: str, release: str) -> dict:
    """What session.LiveCapture.header() writes, with fixed values."""
    lays = layouts(kernel)
    return {
        "kernel": {"release": release, "version": "#1 SMP", "machine": "x86_64"},
        "host": "testhost",
        "start_wall": "2026-11-26T10:00:00.000+00:00",
        "start_mono_ns": START_NS,
        "events": header_events(lays),
        "attached": {lay.name: None for lay in lays},
        "btf_offsets": {"mm_struct.owner": 1296, "task_struct.tgid": 1268,
                        "task_struct.comm": 1752},
        "owner_source": "mm->owner (BTF offsets)",
        "options": {"ringbuf_pages": 1024, "dedup_slots": 16384, "filter_tgid": 0, "pid": 0},
        "settings": {"enabled": "always [madvise] never"},
        "counters": dict(START_COUNTERS),
        "recorder_pid": 4242,
    }


def stats_meta(seen: dict, lost: dict, secs: float = 2.5) -> dict:
    return {"mono_ns": START_NS + int(secs * 1e9), "wall": "2026-11-26T10:00:02.500+00:00",
            "probe": {"seen": seen, "lost": lost},
            "counters": dict(END_COUNTERS)}


# Function-probe facts as BTF lists them on Debian's 6.1.0-56 and 7.2.13+deb14 kernels.
PTR = Scalar("void *", 8, False)
MM = Scalar("struct mm_struct *", 8, False)
VMA = Scalar("struct vm_area_struct *", 8, False)
ULONG = Scalar("long unsigned int", 8, False)
INT = Scalar("int", 4, True)
UINT = Scalar("unsigned int", 4, False)
CC = Scalar("struct collapse_control *", 8, False)
VMA_OFFSETS = {"vm_start": 0, "vm_end": 8, "vm_mm": 16, "vm_flags": 32}  # 6.1 and 7.2 alike

FUNCS_61 = {
    "hpage_collapse_scan_pmd": [("mm", MM), ("vma", VMA), ("address", ULONG),
                                ("mmap_locked", PTR), ("cc", CC)],
    "collapse_huge_page": [("mm", MM), ("address", ULONG), ("referenced", INT),
                           ("unmapped", INT), ("cc", CC)],
}
FUNCS_72 = {
    "collapse_single_pmd": [("addr", ULONG), ("vma", VMA), ("lock_dropped", PTR), ("cc", CC)],
    "collapse_huge_page": [("mm", MM), ("start_addr", ULONG), ("referenced", INT),
                           ("unmapped", INT), ("cc", CC), ("order", UINT)],
}


class FakeBtf:
    def __init__(self, funcs: dict) -> None:
        self.funcs = funcs

    def func_params(self, name: str) -> list | None:
        return self.funcs.get(name)

    def find(self, kind: str, name: str) -> int | None:
        """A made-up type id for each function: its position in FUNCS, from 1."""
        names = list(self.funcs)
        return names.index(name) + 1 if kind == "FUNC" and name in names else None

    def member_offset(self, struct: str, member: str) -> int | None:
        if struct == "collapse_control":
            return self.bitmap_at if member == "mthp_present_ptes" else None
        return VMA_OFFSETS.get(member) if struct == "vm_area_struct" else None

    bitmap_at: int | None = None


class FakeBtf72(FakeBtf):
    bitmap_at = 4232  # collapse_control.mthp_present_ptes on Debian's 7.2.13


def func_layouts_72() -> list[EventLayout]:
    """7.2's tracepoint layouts followed by its function-probe layouts (fentry mode)."""
    from khmon.capture import plan as funcprobes
    tps = layouts("7.2")
    status = by_name(tps)["mm_collapse_huge_page"].fmt.symbols["status"]
    return tps + funcprobes.layouts(funcprobes.plan(FakeBtf72(FUNCS_72), set(FUNCS_72)),
                                    len(tps), status)


def func_layouts_61(ptw) -> list[EventLayout]:
    """6.1's tracepoint layouts followed by its function-probe layouts, with the PTE walk."""
    from khmon.capture import plan as funcprobes
    tps = layouts("6.1")
    status = by_name(tps)["mm_collapse_huge_page"].fmt.symbols["status"]
    return tps + funcprobes.layouts(funcprobes.plan(FakeBtf(FUNCS_61), set(FUNCS_61), ptw),
                                    len(tps), status)


def stream_header(lays: list[EventLayout], flag_bits: dict[str, int] | None = None,
                  settings: dict[str, str] | None = None, pagemap_ref: str | None = None) -> dict:
    """A capture header for these layouts (function-probe ones included)."""
    h = capture_header("6.18", "test")
    h.update(events=header_events(lays), attached={lay.name: None for lay in lays},
             vma_flag_bits=dict(flag_bits or {}), pagemap_ref=pagemap_ref,
             settings=dict(settings or {"enabled": "always [madvise] never"}))
    return h


def model_of(lays: list[EventLayout], batches: list[tuple[EventLayout, list[bytes]]],
             flag_bits: dict[str, int] | None = None, end: bool = True, **kw: object):
    """A khmon Model fed these record batches (one R part each), then an end part."""
    from khmon.model.model import Model
    from khmon.stream.parts import Part

    header = stream_header(lays, flag_bits, kw.pop("settings", None), kw.pop("pagemap_ref", None))
    m = Model(header, lays, **kw)
    for lay, recs in batches:
        m.add(Part("R", event=lay.index, data=b"".join(recs)))
    if end:
        # as a capture that lost nothing: the probes saw what the records count
        m.add(Part("E", meta=stats_meta({ec.lay.name: ec.total for ec in m.events}, {})))
    return m
