"""funcprobes: which functions khmon probes and how, from BTF facts read off the 6.1 and 7.2
guest kernels (tests/vm), and the C generated for fentry and kprobe modes."""

from __future__ import annotations

from khdata import layouts

from khmon.bpfgen import OwnerOffsets, ProbeConfig, generate
from khmon.btf import Scalar
from khmon.funcprobes import COLLAPSE, PMD_SCAN, Capture, plan
from khmon.funcprobes import layouts as func_layouts

PTR = Scalar("void *", 8, False)
MM = Scalar("struct mm_struct *", 8, False)
VMA = Scalar("struct vm_area_struct *", 8, False)
ULONG = Scalar("long unsigned int", 8, False)
INT = Scalar("int", 4, True)
UINT = Scalar("unsigned int", 4, False)
CC = Scalar("struct collapse_control *", 8, False)
VMA_OFFSETS = {"vm_start": 0, "vm_end": 8, "vm_mm": 16, "vm_flags": 32}  # 6.1 and 7.2 alike

# As BTF lists them on Debian's 6.1.0-56 and 7.2.13+deb14 kernels.
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

    def member_offset(self, struct: str, member: str) -> int | None:
        return VMA_OFFSETS.get(member) if struct == "vm_area_struct" else None


def test_plan_on_6_1() -> None:
    probes = plan(FakeBtf(FUNCS_61), set(FUNCS_61))
    scan, col = probes
    assert (scan.event, scan.func, scan.exit) == (PMD_SCAN, "hpage_collapse_scan_pmd", False)
    assert scan.captures == (Capture("mm", 0), Capture("address", 2), Capture("vm_start", 1, 0),
                             Capture("vm_end", 1, 8), Capture("vm_flags", 1, 32))
    assert (col.event, col.func, col.exit, col.nargs) == (COLLAPSE, "collapse_huge_page", True, 5)
    assert [c.field for c in col.captures] == ["mm", "address"]  # no order argument on 6.1


def test_plan_on_7_2_reads_mm_through_the_vma() -> None:
    scan, col = plan(FakeBtf(FUNCS_72), set(FUNCS_72))
    assert scan.func == "collapse_single_pmd"
    assert scan.captures[0] == Capture("mm", 1, 16)  # vma->vm_mm
    assert scan.captures[1] == Capture("address", 0)
    assert col.captures[-1] == Capture("order", 5, size=4)


def test_functions_missing_from_kallsyms_are_not_probed() -> None:
    assert plan(FakeBtf(FUNCS_72), set()) == []
    assert [p.func for p in plan(FakeBtf(FUNCS_72), {"collapse_huge_page"})] == [
        "collapse_huge_page"]


def test_generated_c_for_fentry_and_kprobes() -> None:
    tps = layouts("6.18")
    fl = func_layouts(plan(FakeBtf(FUNCS_72), set(FUNCS_72)), len(tps), {1: "succeeded"})
    assert [lay.index for lay in fl] == [len(tps), len(tps) + 1]
    col = fl[1]
    assert [f.name for f in col.fields] == ["mm", "address", "order", "duration_ns", "result"]
    assert col.fmt.symbol("result", 1) == "succeeded"
    owner = OwnerOffsets(1296, 1268, 1752)
    kf = generate(tps + fl, owner, ProbeConfig(), func_mode="kfunc")
    assert "int kfunc__vmlinux__collapse_single_pmd(unsigned long long *ctx)" in kf
    assert "int kretfunc__vmlinux__collapse_huge_page(unsigned long long *ctx)" in kf
    assert "int ret = (int)ctx[6];" in kf  # fexit: the return value follows the 6 arguments
    assert "(void *)(ctx[1] + 16)" in kf  # mm = vma->vm_mm
    kp = generate(tps + fl, owner, ProbeConfig(), func_mode="kprobe")
    assert "int khmon_ret_fn_collapse(struct pt_regs *ctx)" in kp
    assert "PT_REGS_RC(ctx)" in kp and "PT_REGS_PARM6(ctx)" in kp
    none = generate(tps + fl, owner, ProbeConfig(), func_mode=None)
    assert "fn_collapse" not in none and "#define NR_EVENTS 8" in none
