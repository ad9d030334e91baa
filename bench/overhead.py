"""Live overhead: how much attaching khmon slows khugepaged at full speed, next to bpftrace.

Setup (FACTS.md, "Event rates on the host kernel"): THP enabled=madvise, khugepaged
scan_sleep_millisecs=0, pages_to_scan=65536, max_ptes_none=0, and one workload process
(`python -m khmon.workload --pmds 4096 --pattern one-page`): an 8 GiB MADV_HUGEPAGE region
with one page per PMD, so every PMD scan fails fast (exceed_none_pte) and khugepaged does
nothing but scan, over a million mm_khugepaged_scan_pmd events a second. Every knob is
restored and the workload killed on the way out, whatever happens.

Measured, in alternating rounds (the order rotates every round), over a fixed window each:
  none      nothing attached
  khmon     an in-process khmon.capture.live.LiveCapture, its parts consumed by a report
            model exactly as `khmon report --live` does (khmon.pipeline)
  bpftrace  bpftrace -e 'tracepoint:huge_memory:mm_khugepaged_scan_pmd { @ = count(); }'
  daemon    `khmon daemon` as khmon.service runs it (its own process, the flight recorder on),
            its /metrics endpoint scraped every second by this process
Each window starts once the tracer is attached (and has settled for a second).

With the daemon mode, after the rounds, a soak of --daemon-soak seconds (default 600): one
daemon under the same full-speed khugepaged, scraped every second, its RSS right after
attach and at the end, its CPU share, and the scrape durations (client side, the whole
response) over the soak. Targets: daemon/bpftrace >= 1, RSS at the end <= 1.1 x RSS after
attach, scrapes <= 50 ms.

How to read the output:
  full_scans/s     delta of khugepaged/full_scans over the window divided by its length:
                   passes over all registered mm's, so higher is better (less overhead)
  scans/kh-cpu-s   full_scans per second of CPU khugepaged itself got: the same number
                   corrected for CPU stolen by other processes on a busy machine
  khmon/none, khmon/bpftrace   ratios of the medians; the target is khmon/bpftrace >= 1
  seen/s, records/s, lost      khmon's in-kernel `seen` counter, the records its Python
                   side received (installs and resolved flushes from the ring buffer, and the
                   slots emptied after detaching), and `lost` (ring buffer full)
  khmon CPU%       CPU time of the khmon process (this one) over the window, of one core
  irq_work/s       IRQ work interrupts (/proc/interrupts IWI) on khugepaged's CPU when pinned
                   (else on all): each ring-buffer wakeup of a reader is one, on the CPU
                   whose program woke it
A window is flagged (and left out of the medians when clean windows exist) if another
process had MADV_HUGEPAGE memory (it would share khugepaged's passes) or a knob changed.

With --pin (e.g. --pin auto, --pin 0,1 or --pin all), every round is run once per listed
CPU with khugepaged pinned to it (its affinity restored at exit), and the medians and the
target are given per CPU; `auto` is CPU 0 and the last CPU, the two cases that differ.
bpftrace's cost depends on where khugepaged runs: libbpf opens a tracepoint's perf event on
CPU 0 alone (perf_event_open(..., pid -1, cpu 0)), and when khugepaged runs on CPU 0 each
event is also delivered to that perf event after the program (perf_tp_event,
perf_swevent_event in profiles of those windows). khmon's raw tracepoint has no perf event,
so its cost is the same on every CPU. Unpinned, the rounds mix both cases, and the medians
depend on where the scheduler happened to put khugepaged.

Then, unless --no-bpf-stats, a short phase with kernel.bpf_stats_enabled=1 (restored after)
prints run_time_ns / run_cnt of the program each tracer attached to mm_khugepaged_scan_pmd:
the in-kernel cost per event. Needs root and bpftrace. Run: .venv/bin/python bench/overhead.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from khmon.capture.bpfgen import ProbeConfig
from khmon.capture.live import LiveCapture
from khmon.kernel.sysfs import KHUGEPAGED, khugepaged_pid, override
from khmon.pipeline import LivePipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for tests.support
from tests.support.daemon import running_daemon  # the real daemon, in its own process

KNOBS = {
    "enabled": "madvise",
    "khugepaged/scan_sleep_millisecs": "0",
    "khugepaged/pages_to_scan": "65536",
    "khugepaged/max_ptes_none": "0",
}
TRACEPOINT = "mm_khugepaged_scan_pmd"
BPFTRACE_PROG = f"tracepoint:huge_memory:{TRACEPOINT} {{ @ = count(); }}"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
SETTLE_S = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# The machine: khugepaged's counters and who else is registered with it


def full_scans() -> int:
    return int((KHUGEPAGED / "full_scans").read_text())


def irq_work(cpu: int | None) -> int:
    """IRQ work interrupts (/proc/interrupts IWI) on `cpu`, or on all CPUs: a ring-buffer
    reader's wakeup is one, taken on the CPU of the program that woke it."""
    for line in Path("/proc/interrupts").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "IWI":
            counts = [int(x) for x in rest.split() if x.isdigit()]
            return counts[cpu] if cpu is not None else sum(counts)
    return 0


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the comm (which may hold spaces and parentheses): the state is
    [0], the parent pid [1], utime and stime [11] and [12]. Raises OSError once it exits."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_ticks(pid: int | None) -> int:
    """utime + stime of a task, in clock ticks (0 when unknown)."""
    if pid is None:
        return 0
    try:
        fields = stat_fields(pid)
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def hugepage_users(exclude: set[int]) -> list[str]:
    """Other processes with an MADV_HUGEPAGE mapping (VmFlags 'hg'): with enabled=madvise,
    exactly the mm's khugepaged would also scan, changing the full_scans rate."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in exclude:
            continue
        try:
            smaps = (p / "smaps").read_text()
        except OSError:
            continue
        n = len(re.findall(r"^VmFlags:.* hg", smaps, re.M))
        if n:
            with contextlib.suppress(OSError):
                out.append(f"{p.name}:{(p / 'comm').read_text().strip()}({n} VMAs)")
    return out


def ancestors() -> set[int]:
    """This process and the ones that started it, up to init (a test run, a shell, a guest's
    init under tests/vm, whose command line names khmon's cache): not "other" runs."""
    out, pid = set(), os.getpid()
    while pid >= 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(stat_fields(pid)[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def other_khmon(exclude: set[int]) -> list[str]:
    """Other processes that run khmon or its tests: they write the same sysfs knobs."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in exclude:
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("khmon" in cmd or "pytest" in cmd) and "bench/overhead.py" not in cmd \
                and not _touches_no_knobs(cmd):
            out.append(f"{p.name}:{cmd.strip()[:60]}")
    return out


def _touches_no_knobs(cmd: str) -> bool:
    """A khmon process that reads a recording (khmon top --replay and its feed), or a
    flock still waiting to start one: neither writes a knob (a khmon top left over by a
    test would otherwise keep the benchmark from ever starting)."""
    return "--replay" in cmd or cmd.startswith("flock ")


def knob_changes() -> list[str]:
    thp = KHUGEPAGED.parent
    out = []
    for rel, want in KNOBS.items():
        got = (thp / rel).read_text().strip()
        if got != want and f"[{want}]" not in got:
            out.append(f"{rel}={got}")
    return out


class KnobFight(RuntimeError):
    """Someone else wrote the knobs mid-run (a live test?): stop rather than fight."""


class Workload:
    """khmon.workload: 4096 PMDs, one page each, held until killed."""

    def __init__(self, pmds: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "khmon.workload", "--pmds", str(pmds), "--pattern", "one-page",
             "--timeout", "0", "--hold", "86400"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"workload exited ({self.proc.wait()}) before it was ready")
        self.pid = int(json.loads(line)["pid"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------------------
# One measurement window


@dataclass
class Window:
    mode: str
    round: int
    cpu: int | None = None  # the CPU khugepaged was pinned to (--pin), else None
    seconds: float = 0.0
    scans: int = 0
    kh_cpu_s: float = 0.0
    flags: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.scans / self.seconds if self.seconds else 0.0

    @property
    def per_cpu(self) -> float:
        return self.scans / self.kh_cpu_s if self.kh_cpu_s else 0.0


class Meter:
    """Starts and stops the window: full_scans, khugepaged CPU and our own CPU."""

    def __init__(self, ctx: Context, w: Window) -> None:
        self.ctx, self.w = ctx, w
        self.t0 = self.s0 = self.k0 = self.i0 = 0
        self.c0 = 0.0
        self.last_check = 0.0

    def start(self) -> None:
        self._check("before")
        self.t0, self.s0 = time.monotonic(), full_scans()
        self.k0, self.c0 = cpu_ticks(self.ctx.kh_pid), time.process_time()
        self.i0 = irq_work(self.w.cpu)

    def stop(self) -> None:
        t1, s1 = time.monotonic(), full_scans()
        k1, c1 = cpu_ticks(self.ctx.kh_pid), time.process_time()
        self.w.seconds, self.w.scans = t1 - self.t0, s1 - self.s0
        self.w.kh_cpu_s = (k1 - self.k0) / CLK_TCK
        self.w.extra["self_cpu_pct"] = 100 * (c1 - self.c0) / self.w.seconds
        self.w.extra["irq_work_per_s"] = (irq_work(self.w.cpu) - self.i0) / self.w.seconds
        self._check("after")

    def tick(self) -> None:
        """Called about once a second inside the window: catch users that come and go."""
        now = time.monotonic()
        if now - self.last_check >= 1.0:
            self.last_check = now
            self._check("during")

    def _check(self, when: str) -> None:
        others = hugepage_users(self.ctx.exclude)
        if others:
            msg = f"other MADV_HUGEPAGE users {', '.join(others)}"
            if not any(msg in f for f in self.w.flags):
                self.w.flags.append(f"{when}: {msg}")
        changed = knob_changes()
        if changed and not any("knobs changed" in f for f in self.w.flags):
            self.w.flags.append(f"{when}: knobs changed {', '.join(changed)}")


@dataclass
class Context:
    window_s: float
    kh_pid: int | None
    exclude: set[int]


def sleep_window(ctx: Context, m: Meter) -> None:
    end = m.t0 + ctx.window_s
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.25))
        m.tick()


def run_none(ctx: Context, w: Window) -> None:
    time.sleep(SETTLE_S)
    m = Meter(ctx, w)
    m.start()
    sleep_window(ctx, m)
    m.stop()


def start_bpftrace() -> subprocess.Popen[str]:
    """bpftrace's count() on the scan event, returned once it says it is attaching."""
    proc = subprocess.Popen(["bpftrace", "-e", BPFTRACE_PROG], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Attaching"):
            return proc
    raise RuntimeError(f"bpftrace exited ({proc.wait()}) before attaching")


def run_bpftrace(ctx: Context, w: Window) -> None:
    proc = start_bpftrace()
    try:
        wait_attached(proc.pid)
        attached = time.monotonic()
        time.sleep(SETTLE_S)
        m = Meter(ctx, w)
        m.start()
        sleep_window(ctx, m)
        m.stop()
        proc.send_signal(signal.SIGINT)
        lasted = time.monotonic() - attached
        try:
            out = proc.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:  # seen under load: its window still counts
            out = ""
            w.extra["note"] = "bpftrace took over 120 s to exit after SIGINT (killed)"
        hit = re.search(r"^@: (\d+)", out, re.M)
        if hit:
            w.extra["events_per_s"] = int(hit.group(1)) / lasted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def attached_capture() -> LiveCapture:
    """khmon's LiveCapture with its default configuration, refused unless the scan program
    attached: a capture goes on without a tracepoint it could not attach (doctor and the
    report say so), which here would measure a khmon that traces nothing."""
    cap = LiveCapture(ProbeConfig())
    why = cap.probes.attached.get(TRACEPOINT, "absent")
    if why is not None:
        cap.probes.close()
        raise RuntimeError(f"khmon did not attach to {TRACEPOINT}: {why}")
    return cap


def run_khmon(ctx: Context, w: Window) -> None:
    """khmon as `khmon report --live` runs it: a LivePipeline (capture, decode and model on
    its worker thread) while the main thread waits."""
    cap = attached_capture()
    run = LivePipeline(cap)
    m = Meter(ctx, w)
    attached = time.monotonic()
    phase: dict = {"state": "settle", "r0": 0, "c0": None}

    def records() -> int:
        return sum(ec.records for ec in run.model.events)

    def should_stop() -> bool:
        now = time.monotonic()
        if phase["state"] == "settle" and now - attached >= SETTLE_S:
            phase.update(state="window", r0=records(), c0=cap.probes.counters())
            m.start()
        elif phase["state"] == "window":
            m.tick()
        if phase["state"] == "window" and now - m.t0 >= ctx.window_s:
            m.stop()
            c1 = cap.probes.counters()
            c0 = phase["c0"]
            for name in ("seen", "lost"):
                w.extra[f"{name}_per_s"] = (sum(c1[name].values())
                                            - sum(c0[name].values())) / w.seconds
            w.extra["records_per_s"] = (records() - phase["r0"]) / w.seconds
            phase["state"] = "done"
        return phase["state"] == "done"

    r = run.start().wait(should_stop, tick=0.05).report([])
    w.extra["lost_total"] = r["lost_events"]
    w.extra["unaccounted"] = sum(a["unaccounted"] for a in r["accounting"].values())


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (/proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def scrape(url: str) -> float:
    """GET the endpoint and read the whole response; seconds it took."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()
    return time.perf_counter() - t0


def hits(url: str) -> int:
    """khmon_probe_hits_total of the scan event, from the daemon's own exposition."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^khmon_probe_hits_total{{tracepoint="{TRACEPOINT}"}} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def daemon_cpu_s(pid: int) -> float:
    return cpu_ticks(pid) / CLK_TCK


@contextlib.contextmanager
def bench_daemon() -> Iterator:
    """khmon daemon as the unit runs it: its own process, the flight recorder on (in a temp
    dir, capped at 256 MiB so a long run cannot fill the disk); stopped with SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="khmon-bench-") as tmp, \
            running_daemon("--record-max-bytes", "256M", record_dir=Path(tmp) / "rec") as d:
        if f'probe="{TRACEPOINT}"}} 1.0' not in d.metrics():
            raise RuntimeError(f"khmon daemon did not attach to {TRACEPOINT}")
        yield d


def run_daemon(ctx: Context, w: Window) -> None:
    """The daemon attached, its endpoint scraped every second during the window."""
    with bench_daemon() as d:
        time.sleep(SETTLE_S)
        m = Meter(ctx, w)
        m.start()
        c0, h0 = daemon_cpu_s(d.pid), hits(d.url)
        durations = []
        end = m.t0 + ctx.window_s
        while (left := end - time.monotonic()) > 0:
            durations.append(scrape(d.url))
            time.sleep(max(0.0, min(left, 1.0) - durations[-1]))
            m.tick()
        m.stop()
        w.extra.update(daemon_cpu_pct=100 * (daemon_cpu_s(d.pid) - c0) / w.seconds,
                       seen_per_s=(hits(d.url) - h0) / w.seconds,
                       scrape_ms=1000 * statistics.median(durations),
                       scrape_ms_max=1000 * max(durations))


def daemon_soak(seconds: float) -> None:
    """One daemon for `seconds` under full-speed khugepaged, scraped every second: RSS
    right after attach and at the end, CPU share, scrape durations."""
    print(f"\ndaemon soak: {seconds:.0f} s, khugepaged at full speed, /metrics every second",
          flush=True)
    with bench_daemon() as d:
        rss0, t0, c0 = rss_bytes(d.pid), time.monotonic(), daemon_cpu_s(d.pid)
        s0, h0 = full_scans(), hits(d.url)
        durations: list[float] = []
        peak = rss0
        while (now := time.monotonic()) - t0 < seconds:
            durations.append(scrape(d.url))
            peak = max(peak, rss_bytes(d.pid))
            if len(durations) % 60 == 0:
                print(f"  {now - t0:5.0f} s: RSS {rss_bytes(d.pid) / 2**20:.1f} MiB, "
                      f"scrape {1000 * durations[-1]:.1f} ms", flush=True)
            time.sleep(max(0.0, 1.0 - durations[-1]))
        wall = time.monotonic() - t0
        rss1, cpu = rss_bytes(d.pid), daemon_cpu_s(d.pid) - c0
        scans, seen = full_scans() - s0, hits(d.url) - h0
    ms = sorted(1000 * x for x in durations)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(f"  RSS after attach {rss0 / 2**20:.1f} MiB, after {wall:.0f} s {rss1 / 2**20:.1f} MiB "
          f"(x{rss1 / rss0:.3f}; peak {peak / 2**20:.1f} MiB): "
          f"{'MET' if rss1 <= 1.1 * rss0 else 'MISSED'} (target <= 1.1x)")
    print(f"  daemon CPU {100 * cpu / wall:.1f}% of one core; {seen / wall:,.0f} events seen/s; "
          f"khugepaged {scans / wall:.1f} full_scans/s")
    print(f"  scrape (whole response, {len(ms)} scrapes): median {statistics.median(ms):.1f} ms, "
          f"p99 {p99:.1f} ms, max {ms[-1]:.1f} ms: {'MET' if p99 <= 50 else 'MISSED'} "
          "(target <= 50 ms)")


# Modes by name; a scratch script may add its own (see the report for prototypes).
MODES: dict[str, Callable[[Context, Window], None]] = {
    "none": run_none,
    "khmon": run_khmon,
    "bpftrace": run_bpftrace,
    "daemon": run_daemon,
}
TRACERS = ("khmon", "daemon")  # what the target compares with bpftrace


# ---------------------------------------------------------------------------------------
# In-kernel cost per event (kernel.bpf_stats_enabled)


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    old = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1")
    try:
        yield
    finally:
        BPF_STATS.write_text(old)


def prog_ids(pid: int) -> list[int]:
    """IDs of the BPF programs process `pid` attached to the scan_pmd tracepoint."""
    out = subprocess.run(["bpftool", "perf", "show", "-j"], capture_output=True, text=True,
                         check=True).stdout
    return [e["prog_id"] for e in json.loads(out or "[]")
            if e.get("pid") == pid and e.get("tracepoint") == TRACEPOINT]


def wait_attached(pid: int, timeout: float = 20.0) -> list[int]:
    """Poll until `pid` has a program on the tracepoint (bpftrace prints 'Attaching' first)."""
    deadline = time.monotonic() + timeout
    while not (ids := prog_ids(pid)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} attached nothing to {TRACEPOINT} in {timeout:.0f} s")
        time.sleep(0.1)
    return ids


def prog_stats(ids: list[int]) -> tuple[int, int]:
    ns = cnt = 0
    for i in ids:
        out = subprocess.run(["bpftool", "prog", "show", "id", str(i), "-j"],
                             capture_output=True, text=True, check=True).stdout
        info = json.loads(out)
        ns += info.get("run_time_ns", 0)
        cnt += info.get("run_cnt", 0)
    return ns, cnt


def cost_khmon(seconds: float) -> tuple[int, int]:
    cap = attached_capture()
    run = LivePipeline(cap)
    ids = prog_ids(os.getpid())
    t0 = time.monotonic()
    result = (0, 0)

    def stop() -> bool:
        nonlocal result
        if time.monotonic() - t0 >= seconds:
            result = prog_stats(ids)
            return True
        return False

    run.start().wait(stop, tick=0.05)
    return result


def cost_bpftrace(seconds: float) -> tuple[int, int]:
    proc = start_bpftrace()
    try:
        ids = wait_attached(proc.pid)
        time.sleep(seconds)
        return prog_stats(ids)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


COSTS: dict[str, Callable[[float], tuple[int, int]]] = {
    "khmon": cost_khmon,
    "bpftrace": cost_bpftrace,
}


# ---------------------------------------------------------------------------------------


def pinned_cpus(spec: str | None) -> list[int | None]:
    """The CPUs named by --pin ([None]: not pinned); each must be one this process may use."""
    if spec is None:
        return [None]
    usable = sorted(os.sched_getaffinity(0))
    if spec == "all":
        return usable
    if spec == "auto":  # where bpftrace's perf event is (CPU 0), and a CPU without one
        return sorted({usable[0], usable[-1]})
    try:
        cpus = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise ValueError("expected CPU numbers separated by commas, 'all' or 'auto'") from None
    bad = sorted(set(cpus) - set(usable))
    if bad or not cpus:
        raise ValueError(f"not CPUs of this machine: {bad or spec!r} (online: {usable})")
    return cpus


def wait_quiet(exclude: set[int], timeout: float) -> list[str]:
    """Wait for other MADV_HUGEPAGE users and other khmon runs to go away; return those
    still there."""
    deadline = time.monotonic() + timeout

    def busy() -> list[str]:
        return hugepage_users(exclude) + other_khmon(exclude)

    others = busy()
    if others and timeout > 0:
        print(f"waiting up to {timeout:.0f} s for other MADV_HUGEPAGE users and khmon runs: "
              f"{', '.join(others)}", flush=True)
    while others and time.monotonic() < deadline:
        time.sleep(2)
        others = busy()
    return others


def median_of(ws: list[Window], attr: str) -> float:
    clean = [w for w in ws if not w.flags] or ws
    return statistics.median(getattr(w, attr) for w in clean)


def report_pinned(windows: list[Window], modes: list[str]) -> dict[str, bool | None]:
    """Medians and <tracer>/bpftrace per pinned CPU; a tracer's target holds only if it holds
    on every CPU (None when there is nothing to compare)."""
    cpus = sorted({w.cpu for w in windows if w.cpu is not None})
    tracers = [t for t in TRACERS if t in modes]
    print("\nper pinned CPU (medians of full_scans/s over unflagged windows):")
    print(f"  {'cpu':>3} " + " ".join(f"{m:>10}" for m in modes)
          + "".join(f"  {t}/bpftrace" for t in tracers))
    met: dict[str, bool | None] = dict.fromkeys(tracers)
    for cpu in cpus:
        med = {m: median_of(ws, "rate") for m in modes
               if (ws := [w for w in windows if w.cpu == cpu and w.mode == m])}
        cells = " ".join(f"{med.get(m, 0.0):10.1f}" for m in modes)
        ratios = []
        for t in tracers:
            ratio = "n/a"
            if med.get("bpftrace") and t in med:
                r = med[t] / med["bpftrace"]
                ratio = f"{r:.3f}"
                met[t] = (met[t] is not False) and r >= 1
            ratios.append(f"{ratio:>{len(t) + 11}}")
        print(f"  {cpu:>3} {cells}" + "".join(f"  {r}" for r in ratios))
    return met


def report(windows: list[Window], modes: list[str]) -> None:
    print("\nper window:")
    print(f"  {'round':>5} {'mode':<10} {'cpu':>3} {'seconds':>7} {'full_scans':>10} {'scans/s':>9} "
          f"{'scans/kh-cpu-s':>14}  notes")
    for w in windows:
        notes = []
        if "daemon_cpu_pct" in w.extra:
            notes.append(f"seen {w.extra['seen_per_s']:,.0f}/s daemon cpu "
                         f"{w.extra['daemon_cpu_pct']:.1f}% scrape {w.extra['scrape_ms']:.1f} ms "
                         f"(max {w.extra['scrape_ms_max']:.1f})")
        elif "seen_per_s" in w.extra:
            notes.append(f"seen {w.extra['seen_per_s']:,.0f}/s records {w.extra['records_per_s']:,.0f}/s "
                         f"lost {w.extra['lost_per_s']:,.0f}/s cpu {w.extra['self_cpu_pct']:.1f}%")
        if "events_per_s" in w.extra:
            notes.append(f"bpftrace count {w.extra['events_per_s']:,.0f}/s")
        notes.append(f"irq_work {w.extra.get('irq_work_per_s', 0):,.0f}/s")
        notes += ["FLAGGED: " + f for f in w.flags]
        cpu = "-" if w.cpu is None else str(w.cpu)
        print(f"  {w.round:>5} {w.mode:<10} {cpu:>3} {w.seconds:7.2f} {w.scans:10d} {w.rate:9.1f} "
              f"{w.per_cpu:14.1f}  {'; '.join(notes)}")

    by = {m: [w for w in windows if w.mode == m] for m in modes}
    print("\nmedians (over unflagged windows where there are any):")
    print(f"  {'mode':<10} {'windows':>7} {'flagged':>7} {'full_scans/s':>12} {'scans/kh-cpu-s':>14}")
    for m, ws in by.items():
        print(f"  {m:<10} {len(ws):7d} {sum(1 for w in ws if w.flags):7d} "
              f"{median_of(ws, 'rate'):12.1f} {median_of(ws, 'per_cpu'):14.1f}")

    def ratio(a: str, b: str, attr: str) -> str:
        if a not in by or b not in by or not median_of(by[b], attr):
            return "n/a"
        return f"{median_of(by[a], attr) / median_of(by[b], attr):.3f}"

    print("\nratios of medians (full_scans/s, and per khugepaged CPU-second):")
    for a, b in (("khmon", "none"), ("khmon", "bpftrace"), ("daemon", "none"),
                 ("daemon", "bpftrace"), ("bpftrace", "none")):
        if a in by and b in by:
            print(f"  {a}/{b}: {ratio(a, b, 'rate')}  (per kh-cpu-s {ratio(a, b, 'per_cpu')})")
    ds = [w for w in by.get("daemon", []) if "daemon_cpu_pct" in w.extra]
    if ds:
        print(f"\ndaemon (median over its windows): events seen "
              f"{statistics.median(w.extra['seen_per_s'] for w in ds):,.0f}/s, its CPU "
              f"{statistics.median(w.extra['daemon_cpu_pct'] for w in ds):.1f}% of one core, "
              f"scrape {statistics.median(w.extra['scrape_ms'] for w in ds):.1f} ms "
              f"(max {max(w.extra['scrape_ms_max'] for w in ds):.1f} ms)")
    for m in modes:
        ks = [w for w in by.get(m, []) if "records_per_s" in w.extra]
        if not ks:
            continue

        def med(key: str, ks: list[Window] = ks) -> float:
            return statistics.median(w.extra[key] for w in ks)

        print(f"\n{m} (median over its windows): events seen {med('seen_per_s'):,.0f}/s, "
              f"records sent {med('records_per_s'):,.0f}/s, lost {med('lost_per_s'):,.0f}/s, "
              f"process CPU {med('self_cpu_pct'):.1f}% "
              f"of one core; lost over whole captures: {sum(w.extra['lost_total'] for w in ks)}, "
              f"unaccounted: {sum(w.extra['unaccounted'] for w in ks)}")
    bt = [w.extra["events_per_s"] for w in by.get("bpftrace", []) if "events_per_s" in w.extra]
    if bt:
        print(f"bpftrace count(): median {statistics.median(bt):,.0f} events/s")
    met = report_pinned(windows, modes) if any(w.cpu is not None for w in windows) else {}
    for tracer in TRACERS:
        target = ratio(tracer, "bpftrace", "rate")
        if met.get(tracer) is not None:
            print(f"\ntarget {tracer} >= bpftrace on every pinned CPU: "
                  f"{'MET' if met[tracer] else 'MISSED'} "
                  f"(all windows pooled: {tracer}/bpftrace = {target})")
        elif not met and target != "n/a":
            print(f"\ntarget {tracer} >= bpftrace: {'MET' if float(target) >= 1 else 'MISSED'} "
                  f"({tracer}/bpftrace = {target})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=10.0, help="seconds per window")
    ap.add_argument("--pmds", type=int, default=4096, help="workload size in 2 MiB PMDs")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--quiet-timeout", type=float, default=120.0,
                    help="seconds to wait for other MADV_HUGEPAGE users to exit first")
    ap.add_argument("--retries", type=int, default=2,
                    help="times a flagged window is measured again (after waiting for quiet)")
    ap.add_argument("--no-bpf-stats", action="store_true", help="skip the ns/event phase")
    ap.add_argument("--cost-seconds", type=float, default=5.0)
    ap.add_argument("--daemon-soak", type=float, default=600.0, metavar="SECONDS",
                    help="with the daemon mode: one daemon this long after the rounds, for "
                    "its RSS over time, CPU share and scrape durations (0: none)")
    ap.add_argument("--pin", metavar="CPUS",
                    help="pin khugepaged to each of these CPUs in turn, every round "
                    "(comma-separated, 'all', or 'auto': the first and the last); "
                    "results per CPU")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        cpus = pinned_cpus(args.pin)
    except ValueError as e:
        print(f"--pin {args.pin}: {e}", file=sys.stderr)
        return 2
    pinned = cpus != [None]
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the knobs are restored and the workload
    # killed by the finally blocks below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if os.geteuid() != 0:
        print("overhead.py needs root (sysfs knobs, BPF)", file=sys.stderr)
        return 1
    if "bpftrace" in modes and not shutil.which("bpftrace"):
        print("bpftrace not found: apt-get install bpftrace", file=sys.stderr)
        return 1
    unknown = set(modes) - set(MODES)
    if unknown:
        print(f"unknown modes: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    windows: list[Window] = []
    work: Workload | None = None
    # Other users first (a live test run changes the same knobs): wait before touching any,
    # and refuse to start while one runs (we would save its temporary values, then restore them).
    mine = ancestors()
    wait_quiet(mine, args.quiet_timeout)
    running = other_khmon(mine)
    if running:
        print(f"refusing to start: other khmon runs change the same knobs: {', '.join(running)}",
              file=sys.stderr)
        return 3
    aborted = None
    with override(KNOBS) as saved:
        print(f"knobs set: {KNOBS} (saved, restored at exit: {saved})")
        # Looked up only now: the thread exists only while THP is enabled, and setting
        # `enabled` (never -> madvise) starts a new one.
        kh_pid = khugepaged_pid()
        if pinned and kh_pid is None:
            print("--pin: no khugepaged thread found", file=sys.stderr)
            return 1
        kh_affinity = os.sched_getaffinity(kh_pid) if kh_pid is not None else set()
        try:
            work = Workload(args.pmds)
            exclude = mine | {work.pid}
            ctx = Context(args.window, kh_pid, exclude)
            print(f"workload pid {work.pid}: {args.pmds} PMDs x 2 MiB, one page each; "
                  f"khugepaged pid {kh_pid}")
            still = wait_quiet(exclude, 0)
            if still:
                print(f"WARNING: still registered with khugepaged: {', '.join(still)}; "
                      "their windows are flagged")
            s0 = full_scans()
            time.sleep(2)
            print(f"warm-up: {(full_scans() - s0) / 2:.0f} full_scans/s", flush=True)
            try:
                for r, cpu in ((r, cpu) for r in range(args.rounds) for cpu in cpus):
                    if cpu is not None:
                        os.sched_setaffinity(kh_pid, {cpu})
                    order = modes[r % len(modes):] + modes[:r % len(modes)]
                    where = "" if cpu is None else f" cpu {cpu}"
                    for mode in order:
                        for attempt in range(1 + args.retries):
                            w = Window(mode, r + 1, cpu)
                            MODES[mode](ctx, w)
                            windows.append(w)
                            print(f"  round {r + 1}{where} {mode:<10} {w.rate:8.1f} full_scans/s"
                                  + (" (flagged)" if w.flags else ""), flush=True)
                            if any("knobs changed" in f for f in w.flags):
                                raise KnobFight("; ".join(w.flags))
                            if not w.flags or attempt == args.retries:
                                break
                            wait_quiet(exclude, args.quiet_timeout)  # then measure it again
            except KnobFight as e:
                aborted = f"ABORTED: another process rewrote the knobs mid-run ({e})"
                print(aborted)
            report(windows, modes)
            if "daemon" in modes and args.daemon_soak > 0 and not aborted:
                if pinned:
                    os.sched_setaffinity(kh_pid, kh_affinity)
                daemon_soak(args.daemon_soak)

            if not args.no_bpf_stats and not aborted:
                print(f"\nin-kernel cost of the {TRACEPOINT} program "
                      f"(kernel.bpf_stats_enabled=1, {args.cost_seconds:.0f} s each):")
                with bpf_stats():
                    for name, fn in COSTS.items():
                        if name not in modes:
                            continue
                        ns, cnt = fn(args.cost_seconds)
                        per = f"{ns / cnt:.1f} ns/event" if cnt else "no runs"
                        print(f"  {name:<10} run_cnt {cnt:,} run_time_ns {ns:,}: {per}", flush=True)
        finally:
            if work is not None:
                work.kill()
            if pinned:
                os.sched_setaffinity(kh_pid, kh_affinity)
    print(f"\nknobs restored: {', '.join(f'{k}={v}' for k, v in saved.items())}")
    if aborted:
        print(aborted + "; check the knobs above are what they should be", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
