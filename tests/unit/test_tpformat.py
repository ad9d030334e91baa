"""tpformat: parsing tracefs format files, checked against the kernels' own text."""

from __future__ import annotations

import re

import pytest
from khdata import KERNELS, event_names, format_text

from khmon.kernel.tpformat import parse_format, parse_symbolic_tables

SCAN_PMD = "mm_khugepaged_scan_pmd"
COLLAPSE = "mm_collapse_huge_page"

# `field:<decl>; offset:<n>; size:<n>; signed:<n>;` as the kernel prints it, read with a
# regex written here (not khmon's), so parse_format is checked against the text itself.
_LINE = re.compile(r"field:(.+?)\s*;\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d);")


def _fields_from_text(text: str) -> list[tuple[str, int, int, bool]]:
    out = []
    for decl, off, size, signed in _LINE.findall(text):
        name = re.sub(r"\[.*\]$", "", decl.strip()).split()[-1].lstrip("*")
        out.append((name, int(off), int(size), signed == "1"))
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("event", [SCAN_PMD, COLLAPSE])
def test_fields_match_format_text(kernel: str, event: str) -> None:
    text = format_text(kernel, event)
    fmt = parse_format(text, "huge_memory")
    expected = _fields_from_text(text)
    assert len(expected) >= 7  # 4 common fields and at least mm, ..., status
    assert [(f.name, f.offset, f.size, f.signed) for f in fmt.fields] == expected
    assert fmt.name == event
    assert fmt.id == int(re.search(r"^ID: (\d+)$", text, re.M).group(1))
    assert fmt.text == text


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_captured_format_parses(kernel: str) -> None:
    names = event_names(kernel)
    assert SCAN_PMD in names and COLLAPSE in names
    for name in names:
        text = format_text(kernel, name)
        fmt = parse_format(text)
        assert fmt.name == name
        assert [f.name for f in fmt.fields[:4]] == ["common_type", "common_flags",
                                                    "common_preempt_count", "common_pid"]
        assert all(f.is_common for f in fmt.fields[:4])
        assert not any(f.is_common for f in fmt.own_fields)
        assert len(fmt.fields) == text.count("\tfield:")


def test_scan_pmd_6_18_literal_values() -> None:
    fmt = parse_format(format_text("6.18", SCAN_PMD))
    assert fmt.id == 759
    status = fmt.field("status")
    assert (status.offset, status.size, status.signed, status.ctype) == (32, 4, True, "int")
    mm = fmt.field("mm")
    assert (mm.offset, mm.size, mm.signed) == (8, 8, False)
    assert mm.ctype.replace(" ", "") == "structmm_struct*"
    assert mm.ctype.endswith("*") and not status.ctype.endswith("*")
    assert fmt.field("pfn").ctype == "unsigned long"
    assert [f.name for f in fmt.own_fields] == ["mm", "pfn", "referenced", "none_or_zero",
                                                "status", "unmapped"]
    assert fmt.field("order") is None
    assert fmt.field("nonexistent") is None
    assert fmt.status_field == "status"
    assert fmt.symbol("status", 0) == "failed"
    assert fmt.symbol("status", 1) == "succeeded"
    assert fmt.symbol("status", 5) == "exceed_none_pte"
    assert fmt.symbol("status", 30) == "page_filled"
    assert len(fmt.symbols["status"]) == 31


def test_collapse_6_18_literal_values() -> None:
    fmt = parse_format(format_text("6.18", COLLAPSE))
    assert [(f.name, f.offset, f.size) for f in fmt.own_fields] == [
        ("mm", 8, 8), ("isolated", 16, 4), ("status", 20, 4)]
    assert fmt.symbol("status", 14) == "not_suitable_page_count"
    assert fmt.symbol("status", 2) == "pmd_null"


def test_collapse_6_1_literal_values() -> None:
    fmt = parse_format(format_text("6.1", COLLAPSE))
    assert fmt.id == 641
    assert [(f.name, f.offset, f.size) for f in fmt.own_fields] == [
        ("mm", 8, 8), ("isolated", 16, 4), ("status", 20, 4)]
    assert fmt.field("order") is None
    assert fmt.symbol("status", 1) == "succeeded"
    assert fmt.symbol("status", 5) == "exceed_none_pte"
    assert fmt.symbol("status", 11) == "no_writable_page"  # gone by 6.18
    assert fmt.symbol("status", 15) == "not_suitable_page_count"  # 14 on 6.18
    assert fmt.symbol("status", 29) == "store_failed"
    assert fmt.symbol("status", 30) == "unknown:30"
    assert len(fmt.symbols["status"]) == 30


def test_scan_pmd_6_1_has_writable() -> None:
    fmt = parse_format(format_text("6.1", SCAN_PMD))
    assert [(f.name, f.offset, f.size, f.signed) for f in fmt.own_fields] == [
        ("mm", 8, 8, False), ("pfn", 16, 8, False), ("writable", 24, 1, False),
        ("referenced", 28, 4, True), ("none_or_zero", 32, 4, True), ("status", 36, 4, True),
        ("unmapped", 40, 4, True)]
    assert fmt.field("writable").ctype == "bool"


def test_data_loc_signed_on_6_1() -> None:
    # 6.1 prints `signed:1` for the __data_loc filename; it is still a data_loc (u32)
    fmt = parse_format(format_text("6.1", "mm_khugepaged_scan_file"))
    fn = fmt.field("filename")
    assert fn.signed and fn.is_data_loc and fn.offset == 24


def test_collapse_7_2_has_order_and_renumbered_statuses() -> None:
    fmt = parse_format(format_text("7.2", COLLAPSE))
    order = fmt.field("order")
    assert order is not None
    assert order.ctype == "unsigned int" and order.size == 4 and not order.signed
    assert fmt.symbol("status", 1) == "succeeded"
    assert fmt.symbol("status", 2) == "no_pte_table"
    assert fmt.symbol("status", 4) == "exceed_none_pte"
    assert fmt.symbol("status", 31) == "page_dirty_or_writeback"
    # the same number means different things on 6.18 and 7.2
    old = parse_format(format_text("6.18", COLLAPSE))
    assert old.symbol("status", 4) == "page_pmd_mapped"
    assert old.symbol("status", 31) == "unknown:31"


@pytest.mark.parametrize("kernel", KERNELS)
def test_symbol_outside_table_is_unknown(kernel: str) -> None:
    fmt = parse_format(format_text(kernel, SCAN_PMD))
    assert fmt.symbol("status", 999) == "unknown:999"
    assert fmt.symbol("status", -1) == "unknown:-1"
    assert fmt.symbol("no_such_field", 1) == "unknown:1"


@pytest.mark.parametrize("kernel", KERNELS)
def test_data_loc_fields_recognised(kernel: str) -> None:
    fmt = parse_format(format_text(kernel, "mm_khugepaged_scan_file"))
    fn = fmt.field("filename")
    assert fn is not None and fn.is_data_loc
    assert fn.ctype == "__data_loc char[]"
    assert fn.size == 4
    assert [f.name for f in fmt.own_fields if f.is_data_loc] == ["filename"]
    assert fmt.status_field == "result"
    assert fmt.symbol("result", 1) == "succeeded"


def test_data_loc_offset_6_18() -> None:
    fmt = parse_format(format_text("6.18", "mm_khugepaged_collapse_file"))
    fn = fmt.field("filename")
    assert (fn.offset, fn.size, fn.is_data_loc) == (44, 4, True)
    shmem = fmt.field("is_shmem")
    assert (shmem.offset, shmem.size, shmem.ctype, shmem.is_data_loc) == (40, 1, "bool", False)


def test_event_without_table_has_no_status_field() -> None:
    fmt = parse_format(format_text("6.18", "mm_collapse_huge_page_swapin"))
    assert fmt.symbols == {}
    assert fmt.status_field is None
    assert fmt.symbol("ret", 1) == "unknown:1"


def test_array_field_declaration() -> None:
    text = ("name: fake\nID: 7\nformat:\n"
            "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
            "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n"
            "\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n"
            "\tfield:long ret;\toffset:32;\tsize:8;\tsigned:1;\n"
            '\nprint fmt: "%s %d", REC->comm, __print_symbolic(REC->ret, {-1, "neg"}, {0x10, "hex"})\n')
    fmt = parse_format(text, "sys")
    assert fmt.system == "sys" and fmt.name == "fake" and fmt.id == 7
    comm = fmt.field("comm")
    assert comm.ctype == "char[16]" and (comm.offset, comm.size) == (8, 16)
    assert not comm.is_data_loc
    assert fmt.field("name").is_data_loc
    assert fmt.field("ret").signed
    assert fmt.symbols == {"ret": {-1: "neg", 16: "hex"}}


def test_symbolic_tables_of_several_fields() -> None:
    line = ('print fmt: "%s %s", __print_symbolic(REC->a, {0, "x"}, {1, "y"}), '
            '__print_symbolic(REC->b, {2, "z"})')
    assert parse_symbolic_tables(line) == {"a": {0: "x", 1: "y"}, "b": {2: "z"}}
    assert parse_symbolic_tables('print fmt: "%d", REC->a') == {}


@pytest.mark.parametrize("text", [
    "",
    "hello world\n",
    "name: only_a_name\nID: 5\nformat:\n",
    "\tfield:int x;\toffset:0;\tsize:4;\tsigned:1;\n",  # fields but no name
    "\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
])
def test_non_format_text_raises(text: str) -> None:
    with pytest.raises(ValueError):
        parse_format(text)
