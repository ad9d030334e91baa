"""`khmon doctor`: what this kernel offers and what khmon will use, checked, not assumed.

Each check is a Check(area, item, state, detail). state is "ok", "info", "warn" or "fail";
"fail" on anything live capture needs makes doctor exit nonzero with that reason. Function
probes are tried by loading a trivial program, because BTF listing a function does not mean
the kernel lets BPF attach to it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from .capture import plan, ptwalk
from .capture.bpfgen import ProbeConfig
from .capture.live import owner_offsets
from .errors import KhmonError
from .kernel import kallsyms
from .kernel.btf import Btf
from .kernel.privilege import capture_refusal
from .kernel.sysfs import THP, read_settings, selected
from .kernel.tracefs import khugepaged_events, read_format, tracefs_root
from .stream.events import SCAN

# The per-PMD entry points the capture may probe (whichever this kernel has), then
# collapse_huge_page.
PMD_FUNCS = (*plan.PMD_ENTRY_FUNCS, plan.COLLAPSE_FUNC)
DATA_SYMBOLS = ("page_offset_base", "khugepaged_scan")
# Events the mTHP collapse series added; their absence is information, not failure.
NEWER_EVENTS = (SCAN,)


@dataclass(frozen=True)
class Check:
    area: str
    item: str
    state: str  # ok | info | warn | fail
    detail: str
    tier: str = ""  # the capability this check proves present (state ok) or absent


def _headers() -> Check:
    rel = platform.release()
    build = Path("/lib/modules") / rel / "build"
    if not build.exists():
        return Check("bcc", "kernel headers", "fail",
                     f"{build} missing: bcc cannot compile (make setup installs headers)")
    target = build.resolve()
    match = rel in target.name
    return Check("bcc", "kernel headers", "ok" if match else "info",
                 f"{build} -> {target}" + ("" if match else
                 " (not this kernel's; fine: khmon takes struct offsets from BTF)"))


def run_checks(trial: bool = True) -> list[Check]:
    """Every check, in display order. `trial` loads and attaches real programs."""
    checks: list[Check] = []
    add = checks.append
    rel = platform.release()
    add(Check("kernel", "release", "info", f"{rel} ({platform.machine()})"))
    refusal = capture_refusal()
    add(Check("kernel", "root", "ok" if refusal is None else "fail",
              f"{refusal} (run it with sudo)" if refusal else "running as root"
              if os.geteuid() == 0 else f"uid {os.geteuid()} with CAP_BPF, CAP_PERFMON and "
              "read access to tracefs"))

    btf: Btf | None = None
    try:
        btf = Btf.from_kernel()
        add(Check("btf", "/sys/kernel/btf/vmlinux", "ok", f"{btf.n_types} types"))
    except KhmonError as e:
        add(Check("btf", "/sys/kernel/btf/vmlinux", "fail", str(e)))
    if btf is not None:
        off = owner_offsets(btf)
        add(Check("btf", "mm_struct.owner", "ok" if off.mm_owner is not None else "warn",
                  f"offset {off.mm_owner}: events name the owning process" if off.mm_owner
                  is not None else "absent (no CONFIG_MEMCG): events cannot name the owner"))
        add(Check("btf", "task_struct.tgid/comm", "ok", f"offsets {off.task_tgid}/{off.task_comm}"))
        cc = btf.member_offset("collapse_control", "mthp_present_ptes")
        add(Check("btf", "collapse_control.mthp_present_ptes",
                  "ok" if cc is not None else "info", f"offset {cc}: exact per-PMD bitmaps"
                  if cc is not None else "absent (kernel predates the mTHP collapse series)",
                  "mthp_present_ptes"))

    try:
        tr = tracefs_root()
        add(Check("tracefs", "mount", "ok", str(tr)))
        names = khugepaged_events(tr)
        for name in names:
            fmt = read_format(name, tr)
            fields = ", ".join(f.name for f in fmt.own_fields)
            table = fmt.status_field
            extra = f"; {len(fmt.symbols[table])} {table} names" if table else ""
            add(Check("tracepoint", name, "ok", f"fields: {fields}{extra}"))
        for name in NEWER_EVENTS:
            if name not in names:
                add(Check("tracepoint", name, "info", "not on this kernel (mTHP collapse, 7.2+)"))
        has_order = any(read_format(n, tr).field("order") for n in names)
        add(Check("tracepoint", "order field", "ok" if has_order else "info",
                  "present: per-order collapse attempts" if has_order
                  else "absent: every collapse is PMD-sized on this kernel", "order"))
    except KhmonError as e:
        add(Check("tracefs", "tracepoints", "fail", str(e)))

    syms = kallsyms.present(PMD_FUNCS + DATA_SYMBOLS)
    for func in PMD_FUNCS:
        in_btf = btf is not None and btf.has_func(func)
        in_ksyms = func in syms
        add(Check("functions", func, "info",
                  f"BTF {'yes' if in_btf else 'no'}, kallsyms {'yes' if in_ksyms else 'no'}"
                  + ("" if in_btf or in_ksyms else " (inlined or renamed on this kernel)")))
    for sym in DATA_SYMBOLS:
        add(Check("kallsyms", sym, "ok" if sym in syms else "info", "present" if sym in syms
                  else "absent (CONFIG_KALLSYMS_ALL off, or hidden): no BPF page-table walk",
                  "kallsyms_data" if sym == "page_offset_base" else ""))

    if btf is not None:
        walk, why = ptwalk.plan_or_reason(btf, kallsyms.addresses(ptwalk.SYMBOLS))
        add(Check("bitmap", "ptwalk (BPF walk of the PTE table)", "ok" if walk else "info",
                  f"possible: mm_struct.pgd at {walk.mm_pgd}, paging {walk.paging}, zero page "
                  f"via {walk.zero_page or 'nothing (not told apart)'}" if walk else why,
                  "ptwalk"))
    checks.append(_headers())
    if trial and refusal is None:
        checks.extend(_trials(btf, syms))

    settings = read_settings()
    for key in ("enabled", "defrag", "khugepaged/scan_sleep_millisecs",
                "khugepaged/pages_to_scan", "khugepaged/max_ptes_none",
                "khugepaged/max_ptes_swap", "khugepaged/max_ptes_shared"):
        if key in settings:
            add(Check("thp", key, "info", settings[key]))
    sizes = sorted((p.name for p in THP.glob("hugepages-*kB")),
                   key=lambda n: int(n[len("hugepages-"):-2]))
    enabled = [f"{n[len('hugepages-'):]}={selected(settings.get(n + '/enabled', 'n/a'))}"
               for n in sizes]
    add(Check("thp", "mTHP sizes", "info", ", ".join(enabled) or "none"))
    stats = sorted({p.name for p in THP.glob("hugepages-*kB/stats/collapse_*")})
    add(Check("thp", "per-order collapse stats", "ok" if stats else "info",
              ", ".join(stats) if stats else "none (kernel predates per-order collapse stats)",
              "per_order_stats"))
    checks.extend(_tier_summary(tiers(checks)))
    return checks


def _tier_summary(t: dict[str, bool]) -> list[Check]:
    """The probe tiers of DESIGN.md, as this kernel allows them."""
    funcs = [k for k in ("kfunc", "kprobe") if t.get(k)]
    # The one source khmon takes bitmaps from here (khmon.pmd.SOURCES, best first).
    bitmaps = [name for name, ok in (
        ("kernel", t.get("mthp_present_ptes") and funcs),
        ("ptwalk", t.get("ptwalk") and funcs),
        ("pagemap", not funcs),
        ("inferred", funcs)) if ok][:1]
    return [
        Check("tier", "1 tracepoints", "info", "yes" if t.get("tracepoints") else
              "no" if "tracepoints" in t else "not tried (--no-trial, or no privileges for live capture)"),
        Check("tier", "2 function probes", "info", " and ".join(funcs) if funcs else
              "none: tracepoints only"),
        Check("tier", "3 bitmap sources", "info", "khmon uses " + ", ".join(bitmaps)
              + (" (pagemap: user space reads each scanned PMD's PTEs from "
                 "/proc/PID/pagemap after the event)" if not funcs else "")
              + (" (inferred: only what the collapse attempts imply; unknown PTEs stay "
                 "unknown)" if bitmaps == ["inferred"] else "")),
    ]


def _trials(btf: Btf | None, syms: set[str]) -> list[Check]:
    """Load and attach for real: the live-capture program (with a kprobe stub riding along),
    then a two-instruction fentry program through the bpf syscall."""
    from .capture.fentry import fentry_refusal
    from .capture.live import LiveCapture

    out = []
    target = next((f for f in PMD_FUNCS if (btf and btf.has_func(f)) or f in syms), None)
    kprobe_err: str | None = "not tried: the capture program did not load"
    try:
        cap = LiveCapture(ProbeConfig(ringbuf_pages=8, dedup_slots=64), with_kprobe_stub=True)
        bad = {k: v for k, v in cap.probes.attached.items() if v}
        raw = [lay.name for lay in cap.layouts if lay.raw]
        if target is not None:
            kprobe_err = cap.probes.try_kprobe(target)
        cap.probes.close()
        out.append(Check("capture", "tracepoint programs", "warn" if bad else "ok",
                         f"compiled, loaded and attached to {len(cap.probes.attached) - len(bad)}"
                         " tracepoints" + (f" (raw, arguments from BTF: {', '.join(raw)})"
                                           if raw else "")
                         + (f"; failed: {bad}" if bad else ""), "tracepoints"))
    except KhmonError as e:
        out.append(Check("capture", "tracepoint programs", "fail", str(e), "tracepoints"))
    if target is None:
        out.append(Check("probes", "kfunc/kprobe", "info", "no collapse function to try"))
        return out
    kfunc_err = fentry_refusal(target, btf.find("FUNC", target) if btf else None)
    for kind, err in (("kfunc", kfunc_err), ("kprobe", kprobe_err)):
        out.append(Check("probes", f"{kind} on {target}", "ok" if err is None else "info",
                         "works" if err is None else f"refused: {err}", kind))
    return out


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.state == "fail"]


def tiers(checks: list[Check]) -> dict[str, bool]:
    """Each capability a check established: tracepoints, order, kfunc, kprobe,
    kallsyms_data, mthp_present_ptes, per_order_stats -> available or not."""
    return {c.tier: c.state == "ok" for c in checks if c.tier}


def as_json(checks: list[Check]) -> dict:
    return {"checks": [asdict(c) for c in checks], "tiers": tiers(checks),
            "live_capture": not failures(checks)}
