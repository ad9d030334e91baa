"""bpfgen: the generated BPF C for the real 6.18 and 7.2 formats (text checks, no compiler)."""

from __future__ import annotations

import re

import pytest
from khdata import event_names, func_layouts_72, layouts

from khmon.capture.bpfgen import OwnerOffsets, ProbeConfig, generate, template

EVENTS_6_18 = ["mm_collapse_huge_page", "mm_collapse_huge_page_isolate",
               "mm_collapse_huge_page_swapin", "mm_khugepaged_collapse_file",
               "mm_khugepaged_scan_file", "mm_khugepaged_scan_pmd"]


@pytest.fixture(scope="module")
def src_6_18() -> str:
    return generate(layouts("6.18"), OwnerOffsets(1296, 1268, 1752), ProbeConfig(),
                    nr_cpu_ids=2)


def test_fixture_has_the_six_host_events() -> None:
    assert event_names("6.18") == EVENTS_6_18


def test_one_program_per_event(src_6_18: str) -> None:
    progs = re.findall(r"^int khmon_(\w+)\(void \*ctx\)$", src_6_18, re.M)
    assert progs == EVENTS_6_18


def test_dedup_tables_only_for_scan_events(src_6_18: str) -> None:
    maps = re.findall(r"^BPF_ARRAY\(dsets_(\w+), struct khmon_set, "
                      r"KHMON_SETS \* NR_CPU_IDS\);$", src_6_18, re.M)
    assert maps == ["mm_khugepaged_scan_file", "mm_khugepaged_scan_pmd"]
    assert "dsets_mm_collapse_huge_page" not in src_6_18


def test_dedup_hash_covers_every_key_word(src_6_18: str) -> None:
    # scan_pmd on 6.18: tid + pad (8) + body 32 = 40 bytes = 5 words; scan_file adds its
    # 64-byte file name to its 32-byte body: 8 + 32 + 64 = 104 bytes = 13 words
    for name, words in (("mm_khugepaged_scan_pmd", 5), ("mm_khugepaged_scan_file", 13)):
        prog = src_6_18[src_6_18.index(f"int khmon_{name}(void *ctx)"):]
        prog = prog[:prog.index("\n}\n")]
        assert re.findall(r"h(\d) = khmon_mix\(h\1, w\[(\d+)\]\);", prog) == [
            (str(i % 2), str(i)) for i in range(words)]
        assert f"dsets_{name}.lookup(&at)" in prog
        # this CPU's table: the array holds them CPU after CPU
        assert "u32 at = bpf_get_smp_processor_id() * KHMON_SETS + set;" in prog


def test_defines(src_6_18: str) -> None:
    generated = src_6_18[:src_6_18.index("/*")]  # the template's own defines come later
    defines = dict(re.findall(r"^#define (\w+) (\S+)$", generated, re.M))
    assert defines == {
        "NR_EVENTS": "6", "RINGBUF_PAGES": "1024", "DEDUP_SLOTS": "32768", "NR_CPU_IDS": "2",
        "DEDUP_INSTALL": "0x40000000U", "DEDUP_FLUSH": "0x80000000U", "FILTER_TGID": "0",
        "HAVE_OWNER": "1", "MM_OWNER_OFF": "1296", "TASK_TGID_OFF": "1268",
        "TASK_COMM_OFF": "1752", "UFFD_MASK": "0x0ULL",
    }
    # the defines come before the template's first use of them
    assert src_6_18.index("#define RINGBUF_PAGES") < src_6_18.index("BPF_RINGBUF_OUTPUT")


def test_config_numbers_reach_the_defines() -> None:
    src = generate(layouts("6.18"), OwnerOffsets(1, 2, 3),
                   ProbeConfig(ringbuf_pages=64, dedup_slots=128, filter_tgid=4321),
                   nr_cpu_ids=2)
    assert "#define RINGBUF_PAGES 64\n" in src
    assert "#define DEDUP_SLOTS 128\n" in src
    assert "#define FILTER_TGID 4321\n" in src


def test_no_placeholder_left(src_6_18: str) -> None:
    assert "EVENT_CODE" in template()
    assert not re.search(r"^EVENT_CODE$", src_6_18, re.M)
    # the template itself is all there (its comment still names the placeholder)
    assert "struct khmon_hdr {" in src_6_18
    assert "static __always_inline int khmon_excluded" in src_6_18


@pytest.mark.parametrize("missing", [0, 1, 2])
def test_have_owner_0_when_an_offset_is_missing(missing: int) -> None:
    offs = [1296, 1268, 1752]
    offs[missing] = None
    src = generate(layouts("6.18"), OwnerOffsets(*offs), ProbeConfig(), nr_cpu_ids=2)
    assert "#define HAVE_OWNER 0\n" in src
    assert "#define HAVE_OWNER 1\n" not in src


def test_offset_zero_is_still_usable() -> None:
    # 0 is a valid byte offset (mm_struct.owner is not first, but the rule is None, not falsy)
    assert OwnerOffsets(0, 1268, 1752).usable
    assert not OwnerOffsets(None, 1268, 1752).usable


def test_body_sizes_and_copy_offsets(src_6_18: str) -> None:
    # rec body = format bytes 8..40 for scan_pmd (hand-computed from its format: unmapped@36+4)
    assert "struct rec_mm_khugepaged_scan_pmd {\n    struct khmon_hdr h;\n    u8 b[32];\n};" \
        in src_6_18
    assert "struct rec_mm_collapse_huge_page {\n    struct khmon_hdr h;\n    u8 b[16];\n};" \
        in src_6_18
    # the mm pointer is at format offset 8, body offset 0
    assert "__builtin_memcpy(&mm, &r.b[0], 8);" in src_6_18
    assert "(char *)ctx + 8);" in src_6_18


def test_padding_zeroed_in_dedup_key_7_2() -> None:
    # 7.2 mm_khugepaged_scan: mm@8, progress@16 (4), full_scan_finished@20 (1) -> body bytes
    # 13..15 are padding and must be zeroed so equal payloads hash alike
    src = generate(layouts("7.2"), OwnerOffsets(1, 2, 3), ProbeConfig(), nr_cpu_ids=2)
    body = src[src.index("int khmon_mm_khugepaged_scan(void *ctx)"):]
    body = body[:body.index("\n}\n")]
    assert "__builtin_memset(&k.b[13], 0, 3);" in body
    assert "dsets_mm_khugepaged_scan.lookup(&at)" in body


def test_strings_copied_for_data_loc(src_6_18: str) -> None:
    # collapse_file's filename __data_loc is at format offset 44 -> body 36
    prog = src_6_18[src_6_18.index("int khmon_mm_khugepaged_collapse_file(void *ctx)"):]
    prog = prog[:prog.index("\n}\n")]
    assert "__builtin_memcpy(&loc, &r.b[36], 4);" in prog
    assert "bpf_probe_read_kernel_str(r.s[0], 64," in prog
    assert "char s[1][64];" in src_6_18


def test_generate_with_explicit_template() -> None:
    out = generate(layouts("6.18")[:1], OwnerOffsets(None, None, None), ProbeConfig(),
                   nr_cpu_ids=2, text="A\nEVENT_CODE\nB\n")
    assert out.startswith("#define NR_EVENTS 1\n")
    assert "#define MM_OWNER_OFF 0\n" in out
    assert re.search(r"^A\n/\* mm_collapse_huge_page: body = format bytes 8\.\.24 \*/", out, re.M)
    assert out.endswith("}\n\nB\n")


def test_padding_zeroed_in_dedup_key_6_1() -> None:
    # 6.1 scan_pmd: gaps at body 17..19 (after bool writable) and 36..39 (tail), by hand
    src = generate(layouts("6.1"), OwnerOffsets(1, 2, 3), ProbeConfig(), nr_cpu_ids=2)
    body = src[src.index("int khmon_mm_khugepaged_scan_pmd(void *ctx)"):]
    body = body[:body.index("\n}\n")]
    assert re.findall(r"__builtin_memset\(&k\.b\[\d+\], 0, \d+\);", body) == [
        "__builtin_memset(&k.b[17], 0, 3);", "__builtin_memset(&k.b[36], 0, 4);"]
    assert "#define NR_EVENTS 5\n" in src  # 6.1 has no mm_khugepaged_collapse_file


def _set_line(src: str, prog: str) -> str:
    body = src[src.index(f"/* {prog}: body"):]
    return re.search(r"u32 set = (.*) & \(KHMON_SETS - 1\);", body).group(1)


def test_sets_follow_the_payloads_place_in_memory(src_6_18: str) -> None:
    # classic tracepoints: scan_pmd's and scan_file's pfn at format offset 16 -> body 8
    assert _set_line(src_6_18, "mm_khugepaged_scan_pmd") == "*(u64 *)&k.b[8]"
    assert _set_line(src_6_18, "mm_khugepaged_scan_file") == "*(u64 *)&k.b[8]"
    # 7.2's mm_khugepaged_scan names no place: the hash picks the set
    src = generate(layouts("7.2"), OwnerOffsets(1, 2, 3), ProbeConfig(), nr_cpu_ids=2)
    assert _set_line(src, "mm_khugepaged_scan") == "h"
    # the per-PMD function's exit: the PMD address (body 8), one set per 2 MiB
    src = generate(func_layouts_72(), OwnerOffsets(1, 2, 3), ProbeConfig(), nr_cpu_ids=2,
                   func_mode="kfunc")
    assert _set_line(src, "fn_pmd_scan") == "(*(u64 *)&r.b[8] >> 21)"


def test_collapse_tracepoints_are_counted_exactly(src_6_18: str) -> None:
    # 6.18's mm_collapse_huge_page has status (int at format offset 20: body 12) and no order:
    # counted as PMD order, not timed, success = status 1 in its table. After -p, before
    # the ring buffer, so a record the buffer refuses is still counted.
    prog = src_6_18[src_6_18.index("int khmon_mm_collapse_huge_page(void *ctx)"):]
    prog = prog[:prog.index("\n}\n")]
    assert "__builtin_memcpy(&x_status, &r.b[12], 4);" in prog
    assert "u32 x_order = 9;" in prog
    assert "khmon_exact(ev, x_order, x_status, KHMON_UFFD_UNKNOWN, 0, 0, 1);" in prog
    assert prog.index("khmon_excluded") < prog.index("khmon_exact(") < prog.index("ringbuf_output")
    assert "khmon_lost_at(mm, 0);" in prog  # a tracepoint record names no PMD
    # deduplicated scans are not: their counts come from the dedup slots
    scan = src_6_18[src_6_18.index("int khmon_mm_khugepaged_scan_pmd(void *ctx)"):]
    assert "khmon_exact(" not in scan[:scan.index("\n}\n")]
