"""layout: record sizes, padding and unpacking, against hand-computed layouts of real formats."""

from __future__ import annotations

import pytest
from khdata import HDR, KERNELS, by_name, format_text, layouts, pack

from khmon.kernel.tpformat import parse_format
from khmon.stream.layout import (
    HEADER_NAMES,
    HEADER_SIZE,
    HEADER_STRUCT,
    build_layouts,
    header_events,
    is_hot,
    layouts_from_header,
)


def test_header_matches_the_c_struct() -> None:
    # struct khmon_hdr in bpf/khmon.bpf.c, field by field
    assert HEADER_SIZE == 64
    assert HEADER_STRUCT.format == HDR.format
    assert HEADER_NAMES == ("ts", "count", "event", "cpu", "tid", "tgid", "owner_tgid", "flags",
                            "comm", "owner_comm")


# (event, body_size, record size, gaps) worked out by hand from the 6.18 format files.
SIZES_6_18 = [
    # mm@8 pfn@16 referenced@24 none_or_zero@28 status@32 unmapped@36 -> ends at 40, body 32
    ("mm_khugepaged_scan_pmd", 32, 96, ()),
    # mm@8 isolated@16 status@20 -> ends at 24, body 16
    ("mm_collapse_huge_page", 16, 80, ()),
    # pfn@8 none_or_zero@16 referenced@20 status@24 -> ends at 28, body 24, 4 bytes tail pad
    ("mm_collapse_huge_page_isolate", 24, 88, ((20, 4),)),
    ("mm_collapse_huge_page_swapin", 24, 88, ((20, 4),)),
    # mm@8 pfn@16 filename@24 present@28 swap@32 result@36 -> body 32, one string
    ("mm_khugepaged_scan_file", 32, 64 + 32 + 64, ()),
    # ... is_shmem@40 (1 byte) filename@44 nr@48 result@52 -> body 48, one string;
    # is_shmem ends at body offset 33, filename starts at 36: a 3-byte gap
    ("mm_khugepaged_collapse_file", 48, 64 + 48 + 64, ((33, 3),)),
]


@pytest.mark.parametrize(("event", "body", "size", "gaps"), SIZES_6_18)
def test_sizes_and_gaps_6_18(event: str, body: int, size: int, gaps: tuple) -> None:
    lay = by_name(layouts("6.18"))[event]
    assert lay.body_size == body
    assert lay.size == size
    assert lay.struct.size == size
    assert lay.gaps == gaps


def test_scan_pmd_6_1_gaps() -> None:
    # 6.1: writable@24 (1 byte), referenced@28 ... unmapped@40 -> ends at 44 (body 36), body 40;
    # gaps: body 17..19 after writable, 36..39 at the end
    lay = by_name(layouts("6.1"))["mm_khugepaged_scan_pmd"]
    assert (lay.body_size, lay.size, lay.gaps) == (40, 104, ((17, 3), (36, 4)))
    rec = pack(lay.fmt, lay.index, count=9, writable=1, referenced=2, none_or_zero=3, status=15,
               unmapped=4)
    r = lay.record_type(*lay.struct.unpack(rec))
    assert (r.writable, r.referenced, r.none_or_zero, r.status, r.unmapped) == (1, 2, 3, 15, 4)
    assert lay.fmt.symbol("status", r.status) == "not_suitable_page_count"


def test_7_2_scan_event_layout() -> None:
    # mm@8 progress@16 (4) full_scan_finished@20 (1) -> ends at 21 (body 13), body 16
    lay = by_name(layouts("7.2"))["mm_khugepaged_scan"]
    assert lay.hot
    assert (lay.body_size, lay.size, lay.gaps) == (16, 80, ((13, 3),))
    assert lay.fmt.status_field is None


def test_scan_pmd_hot_collapse_not() -> None:
    lays = by_name(layouts("6.18"))
    assert lays["mm_khugepaged_scan_pmd"].hot and lays["mm_khugepaged_scan_file"].hot
    assert not lays["mm_collapse_huge_page"].hot
    assert not lays["mm_khugepaged_collapse_file"].hot
    assert is_hot("mm_khugepaged_scan")  # the 7.2 per-pass event
    assert not is_hot("mm_collapse_huge_page_isolate")


def test_mm_field() -> None:
    lays = by_name(layouts("6.18"))
    assert lays["mm_khugepaged_scan_pmd"].mm_field.offset == 8
    assert lays["mm_collapse_huge_page_isolate"].mm_field is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_size_invariants(kernel: str) -> None:
    for lay in layouts(kernel):
        own = [f for f in lay.fmt.fields if not f.name.startswith("common_")]
        strings = [f for f in own if f.ctype.startswith("__data_loc")]
        last_end = max(f.offset + f.size for f in own) - 8
        assert lay.struct.size == 64 + lay.body_size + 64 * len(strings), lay.name
        assert lay.size == lay.struct.size
        assert lay.body_size % 8 == 0
        assert last_end <= lay.body_size < last_end + 8, lay.name
        # the gaps are exactly the body bytes no field covers
        covered = set()
        for f in own:
            covered.update(range(f.offset - 8, f.offset - 8 + f.size))
        gap_bytes = {b for off, n in lay.gaps for b in range(off, off + n)}
        assert gap_bytes == set(range(lay.body_size)) - covered, lay.name
        assert sum(n for _, n in lay.gaps) == lay.body_size - len(covered)


@pytest.mark.parametrize("kernel", KERNELS)
def test_indices_follow_input_order(kernel: str) -> None:
    lays = layouts(kernel)
    assert [lay.index for lay in lays] == list(range(len(lays)))


def test_unpack_scan_pmd_by_name() -> None:
    lay = by_name(layouts("6.18"))["mm_khugepaged_scan_pmd"]
    rec = pack(lay.fmt, lay.index, count=1000, ts=123456789, cpu=1, tid=44, tgid=44,
               owner_tgid=100, comm=b"khugepaged", owner_comm=b"workload",
               mm=0xFFFF888012345000, pfn=0x1234, referenced=3, none_or_zero=-2,
               status=5, unmapped=7)
    assert len(rec) == 96
    r = lay.record_type(*lay.struct.unpack(rec))
    assert r.ts == 123456789 and r.count == 1000 and r.event == lay.index and r.cpu == 1
    assert r.tid == 44 and r.tgid == 44 and r.owner_tgid == 100 and r.flags == 0
    assert r.comm == b"khugepaged" + b"\0" * 6
    assert r.owner_comm.rstrip(b"\0") == b"workload"
    assert r.mm == 0xFFFF888012345000
    assert r.pfn == 0x1234
    assert r.referenced == 3
    assert r.none_or_zero == -2  # signed:1 in the format
    assert r.status == 5
    assert r.unmapped == 7
    assert lay.field_names.index("status") == len(HEADER_NAMES) + 4
    assert type(r).__name__ == "mm_khugepaged_scan_pmd"


def test_unpack_collapse_file_with_gap_and_string() -> None:
    lay = by_name(layouts("6.18"))["mm_khugepaged_collapse_file"]
    rec = bytearray(pack(lay.fmt, lay.index, owner_tgid=9, mm=0xABC, hpfn=0x200, index=512,
                         addr=0x7F0000200000, is_shmem=1, filename=(4 << 16) | 56, nr=512,
                         result=1, strings=(b"/dev/shm/x",)))
    # bytes in the gap must be skipped, whatever they hold
    rec[64 + 33:64 + 36] = b"\xee\xee\xee"
    r = lay.record_type(*lay.struct.unpack(bytes(rec)))
    assert r.is_shmem == 1
    assert r.filename == (4 << 16) | 56
    assert r.nr == 512 and r.result == 1
    assert r.addr == 0x7F0000200000 and r.index == 512 and r.hpfn == 0x200
    assert r.filename_str.rstrip(b"\0") == b"/dev/shm/x"
    assert len(r.filename_str) == 64
    assert lay.field_names[-1] == "filename_str"


def test_unpack_collapse_7_2_order() -> None:
    lay = by_name(layouts("7.2"))["mm_collapse_huge_page"]
    rec = pack(lay.fmt, lay.index, owner_tgid=1, mm=1, isolated=1, status=4, order=9)
    r = lay.record_type(*lay.struct.unpack(rec))
    assert (r.status, r.order, r.isolated) == (4, 9, 1)


def test_iter_unpack_several_records() -> None:
    lay = by_name(layouts("6.18"))["mm_collapse_huge_page"]
    data = b"".join(pack(lay.fmt, lay.index, owner_tgid=t, status=s)
                    for t, s in ((1, 1), (2, 14), (3, 0)))
    got = [(r[lay.field_names.index("owner_tgid")], r[lay.field_names.index("status")])
           for r in lay.struct.iter_unpack(data)]
    assert got == [(1, 1), (2, 14), (3, 0)]


def test_header_events_round_trip() -> None:
    lays = layouts("6.18")
    events = header_events(lays)
    assert events[0]["format"] == format_text("6.18", lays[0].name)
    assert events[0]["system"] == "huge_memory"
    back = layouts_from_header(events)
    assert [(b.name, b.index, b.hot, b.size) for b in back] == [
        (a.name, a.index, a.hot, a.size) for a in lays]


def test_build_layouts_keeps_given_order() -> None:
    fmts = [parse_format(format_text("6.18", n)) for n in
            ("mm_collapse_huge_page", "mm_khugepaged_scan_pmd")]
    lays = build_layouts(fmts)
    assert [(x.index, x.name, x.hot) for x in lays] == [
        (0, "mm_collapse_huge_page", False), (1, "mm_khugepaged_scan_pmd", True)]
