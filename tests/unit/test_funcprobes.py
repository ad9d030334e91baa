"""funcprobes: which functions khmon probes and how, from BTF facts read off the 6.1 and 7.2
guest kernels (tests/vm), and the C generated for fentry and kprobe modes."""

from __future__ import annotations

from khdata import FUNCS_61, FUNCS_72, FakeBtf, FakeBtf72, layouts

from khmon.capture.bpfgen import OwnerOffsets, ProbeConfig, generate
from khmon.capture.plan import COLLAPSE, PMD_SCAN, Capture, plan
from khmon.capture.plan import layouts as func_layouts
from khmon.capture.ptwalk import PtWalkPlan


def test_plan_on_6_1() -> None:
    probes = plan(FakeBtf(FUNCS_61), set(FUNCS_61))
    scan, col = probes
    # the per-PMD probe has an exit (the verdict) and is deduplicated like a scan event
    assert (scan.event, scan.func, scan.exit, scan.hot) == (
        PMD_SCAN, "hpage_collapse_scan_pmd", True, True)
    assert scan.captures == (Capture("mm", 0), Capture("address", 2), Capture("vm_start", 1, 0),
                             Capture("vm_end", 1, 8), Capture("vm_flags", 1, 32))
    assert (col.event, col.func, col.exit, col.nargs) == (COLLAPSE, "collapse_huge_page", True, 5)
    # no order argument and no bitmap in collapse_control on 6.1
    assert [c.field for c in col.captures] == ["mm", "address"]


def test_plan_on_7_2_reads_mm_through_the_vma() -> None:
    scan, col = plan(FakeBtf(FUNCS_72), set(FUNCS_72))
    assert scan.func == "collapse_single_pmd"
    assert scan.captures[0] == Capture("mm", 1, 16)  # vma->vm_mm
    assert scan.captures[1] == Capture("address", 0)
    assert col.captures[-1] == Capture("order", 5, size=4)
    assert not col.hot
    *_, bitmap = plan(FakeBtf72(FUNCS_72), set(FUNCS_72))[1].captures
    assert bitmap == Capture("present", 4, 4232, size=64)  # cc->mthp_present_ptes, 64 bytes


def test_functions_missing_from_kallsyms_are_not_probed() -> None:
    assert plan(FakeBtf(FUNCS_72), set()) == []
    assert [p.func for p in plan(FakeBtf(FUNCS_72), {"collapse_huge_page"})] == [
        "collapse_huge_page"]


def test_generated_c_for_fentry_and_kprobes() -> None:
    tps = layouts("6.18")
    fl = func_layouts(plan(FakeBtf72(FUNCS_72), set(FUNCS_72)), len(tps), {1: "succeeded"})
    assert [lay.index for lay in fl] == [len(tps), len(tps) + 1]
    scan, col = fl
    assert [f.name for f in scan.fields] == ["mm", "address", "vm_start", "vm_end", "vm_flags",
                                             "result"]
    assert scan.hot and not col.hot
    assert [f.name for f in col.fields] == ["mm", "address", "order", "present", "vm_flags",
                                            "in_pmd_scan", "duration_ns", "result"]
    present = col.fmt.field("present")
    assert (present.offset, present.size) == (8 + 20, 64)  # after mm, address, order: unaligned
    assert col.fmt.symbol("result", 1) == "succeeded"
    owner = OwnerOffsets(1296, 1268, 1752)
    kf = generate(tps + fl, owner, ProbeConfig(), nr_cpu_ids=2, func_mode="kfunc",
                  uffd_mask=(1 << 9) | (1 << 12))
    assert "#define UFFD_MASK 0x1200ULL" in kf
    assert "KFUNC_PROBE(collapse_single_pmd)\n{" in kf
    assert "KRETFUNC_PROBE(collapse_huge_page)\n{" in kf
    assert "int ret = (int)ctx[6];" in kf  # fexit: the return value follows the 6 arguments
    assert "(void *)(ctx[1] + 16)" in kf  # mm = vma->vm_mm
    assert "bpf_probe_read_kernel(&s.b[20], 64, (void *)(ctx[4] + 4232));" in kf  # the bitmap
    # the per-PMD exit deduplicates on (thread, fields + verdict) instead of sending
    pmd_exit = kf[kf.index("KRETFUNC_PROBE(collapse_single_pmd)"):]
    pmd_exit = pmd_exit[:pmd_exit.index("\n}\n")]
    assert "int ret = (int)ctx[4];" in pmd_exit and "dsets_fn_pmd_scan.lookup(&at)" in pmd_exit
    # the collapse exit takes its VMA's flags from the per-PMD call's stash (offset 32 of its
    # body: mm, address, vm_start, vm_end, then vm_flags), into its record (offset 84 of
    # fn_collapse: after the bitmap at 20..84), and counts itself exactly, uffd split, timed
    col_exit = kf[kf.index("KRETFUNC_PROBE(collapse_huge_page)"):]
    col_exit = col_exit[:col_exit.index("\n}\n")]
    assert "struct fstash_fn_pmd_scan *ps = fstash_fn_pmd_scan.lookup(&tid);" in col_exit
    assert "__builtin_memcpy(&vmf, &ps->b[32], 8);" in col_exit
    assert "__builtin_memcpy(&r.b[88], &vmf, 8);" in col_exit
    assert "uffd = (vmf & UFFD_MASK) ? KHMON_UFFD_YES : KHMON_UFFD_NO;" in col_exit
    assert "khmon_exact(ev, x_order, x_status, uffd, dur, 1, 1);" in col_exit
    assert col_exit.index("khmon_exact(") < col_exit.index("events.ringbuf_output")
    assert "khmon_lost_at(mm, (*(u64 *)&r.b[8] & ~((1ULL << 21) - 1)));" in col_exit
    kp = generate(tps + fl, owner, ProbeConfig(), nr_cpu_ids=2, func_mode="kprobe")
    assert "int khmon_ret_fn_collapse(struct pt_regs *ctx)" in kp
    assert "PT_REGS_RC(ctx)" in kp and "PT_REGS_PARM6(ctx)" in kp
    none = generate(tps + fl, owner, ProbeConfig(), nr_cpu_ids=2, func_mode=None)
    assert "fn_collapse" not in none and "#define NR_EVENTS 8" in none


PTW = PtWalkPlan(72, 0xFFFFFFFFAD215740, 0xFFFFFFFFAD000010, None, 0xFFFFFFFFAD000020, None, None)


def test_ptwalk_only_where_collapse_control_has_no_bitmap() -> None:
    scan61 = plan(FakeBtf(FUNCS_61), set(FUNCS_61), PTW)[0]
    assert scan61.ptwalk == PTW
    scan72 = plan(FakeBtf72(FUNCS_72), set(FUNCS_72), PTW)[0]
    assert scan72.ptwalk is None  # 7.2 has mthp_present_ptes: the kernel's own bitmap wins


def test_ptwalk_fields_and_generated_call() -> None:
    tps = layouts("6.1")
    scan, _col = func_layouts(plan(FakeBtf(FUNCS_61), set(FUNCS_61), PTW), len(tps),
                              {1: "succeeded"})
    at = {f.name: (f.offset, f.size) for f in scan.fields}
    # struct khmon_ptbits lands 8-aligned right after the five u64 captures (format offset 48)
    assert at["present"] == (48, 64) and at["swap"] == (112, 64) and at["zero"] == (176, 64)
    assert at["none_ptes"] == (240, 2) and at["pmd_entry"] == (256, 8)
    assert at["walk"] == (264, 4) and at["result"] == (268, 4)
    src = generate([*tps, scan], OwnerOffsets(1, 2, 3), ProbeConfig(), nr_cpu_ids=2,
                   func_mode="kprobe")
    assert "static __always_inline int khmon_ptwalk(" in src
    assert "khmon_ptwalk(pw_mm, pw_addr, (struct khmon_ptbits *)&s.b[40]);" in src
    # the exit hashes the record in place: thread id, then every whole word of the body
    # (word 0, then body word 32 is key word 33: the second lane)
    assert "h0 = khmon_mix(h0, (u64)tid);" in src
    assert "h1 = khmon_mix(h1, *(u64 *)&r.b[256]);" in src
