"""The `khmon` command line: doctor, record, report, simulate, demo, top.

Exit codes: 0 success; 1 the environment cannot do it (no root, no tracepoints, BPF refused);
2 bad input (bad option values, a corrupt or foreign recording). Every such failure prints one
line, `khmon: error: <problem> (<fix>)`, and no traceback.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from . import __version__
from .capture.bpfgen import ProbeConfig
from .capture.stop import StopFlag
from .capture.target import Target
from .daemon import DEFAULT_SOCKET, MAX_PMDS, MAX_PMDS_HELP
from .daemon import command as daemon_command
from .entry import EXIT_INTERRUPTED
from .errors import EXIT_BAD_INPUT, EXIT_FAIL, KhmonError
from .kernel.privilege import require_capture
from .model.correlate import DEFAULT_PMD_CAP
from .model.model import Model
from .outputs.streams import OUTPUT_ERRNOS, out, out_json, say, stdout_failed
from .outputs.text import render_report, render_simulation
from .pipeline import replay
from .stream.recording import Reader, check_output

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    help="Live eBPF observability for Linux khugepaged and mTHP collapse.\n\n"
    "Start with `khmon doctor` (what this kernel offers), then `khmon report --live "
    "--duration 30` or `khmon record -o run.khrec` and `khmon report run.khrec`.",
)

T = TypeVar("T")

# Pids are below pid_max, and pid_max is at most PID_MAX_LIMIT (4194304 on 64-bit kernels).
PID_MAX = 4194304 - 1
PidOpt = Annotated[int, typer.Option("--pid", "-p", min=0, max=PID_MAX,
                                     help="Only events whose mm belongs to this process "
                                     "(or collapsed by one of its threads); 0: all.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]
EbpfOpt = Annotated[bool, typer.Option("--ebpf", hidden=True,
                                       help="Print the generated BPF C and exit.")]
# The ring buffer's size in bytes is the map's max_entries, a u32 the kernel wants a power of
# two: 2^31 bytes, 524288 pages of 4 KiB, is the largest it can be.
RINGBUF_MAX_PAGES = (1 << 31) // 4096
RingOpt = Annotated[int, typer.Option("--ringbuf-pages", min=1, max=RINGBUF_MAX_PAGES,
                                      help="Ring buffer size in pages (a power of two, at most "
                                      "524288: 2 GiB, the largest power of two a BPF map's "
                                      "u32 size holds).")]
MaxPmdsOpt = Annotated[int, typer.Option("--max-pmds", min=MAX_PMDS[0], max=MAX_PMDS[1],
                                         help=MAX_PMDS_HELP)]
# At least one set of 4 ways (bpf/khmon.bpf.c); at most 16 MiB of slots per CPU and event.
DedupOpt = Annotated[int, typer.Option("--dedup-slots", min=4, max=1 << 20,
                                       help="Dedup slots per CPU for each scan event (a power "
                                       "of two, 4 to 1048576, 16 bytes each): enough for the "
                                       "PMDs khugepaged rescans, or repeats are sent again.")]


def _error_line(e: KhmonError) -> int:
    """Say the error in its one line; its exit code."""
    say(f"khmon: error: {e}")
    return e.exit_code


def _finite(value: float | None) -> float | None:
    """click's FloatRange lets nan and inf through (every comparison with nan is false)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number of seconds")
    return value


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body; turn KhmonError into one line on stderr and its exit code."""
    try:
        return fn()
    except KhmonError as e:
        raise typer.Exit(_error_line(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None  # main() says so


def _config(pid: int, ringbuf_pages: int, dedup_slots: int) -> ProbeConfig:
    for opt, n in (("--ringbuf-pages", ringbuf_pages), ("--dedup-slots", dedup_slots)):
        if n & (n - 1):
            raise KhmonError(f"{opt} {n} is not a power of two", "use 64, 256, 1024 ...",
                             EXIT_BAD_INPUT)
    return ProbeConfig(ringbuf_pages=ringbuf_pages, dedup_slots=dedup_slots, filter_tgid=pid)


def _capture(cfg: ProbeConfig, duration: float | None, out: Path | None,
             should_stop: Callable[[], bool], progress: bool,
             max_pmds: int = DEFAULT_PMD_CAP) -> tuple[Model, list[str]]:
    """A live capture (khmon.pipeline: capture, decode and model on a worker thread) with a
    progress line on stderr every 5 s. A -p PID that is not a running process is warned
    about before the compile, and (in the warnings, which the commands list at the end)
    after it if that process never appeared."""
    from .capture.live import LiveCapture
    from .pipeline import LivePipeline

    target = Target(cfg.filter_tgid) if cfg.filter_tgid else None
    early = target.at_start() if target else None
    if early:
        say(f"khmon: warning: {early}")

    run = LivePipeline(LiveCapture(cfg), duration, out, pmd_cap=max_pmds)
    attached = sum(v is None for v in run.header["attached"].values())
    say(f"khmon: attached to {attached} tracepoints" + (f", recording to {out}" if out else ""))
    last = [time.monotonic()]

    def on_tick(r: LivePipeline) -> None:
        snap = r.snapshot
        if not progress or snap is None or time.monotonic() - last[0] < 5:
            return
        last[0] = time.monotonic()
        acc = snap.report["accounting"]
        seen = sum(a["seen"] for a in acc.values())
        lost = snap.report["lost_events"]
        where = f" -> {out} ({r.writer.bytes_written} bytes)" if r.writer is not None else ""
        say(f"khmon: {snap.report['window']['seconds']:.0f} s, {seen} events, {lost} lost{where}")

    model = run.start().wait(should_stop, on_tick=on_tick)
    warnings = run.warnings
    late = target.at_end(model.report(warnings)) if target and early else None
    return model, [w for w in (early, *warnings, late) if w]


def _emit(report: dict, as_json: bool, grids: int = 0) -> None:
    if as_json:
        out_json(report)
    else:
        out(render_report(report, grids))


@app.command()
def doctor(
    as_json: JsonOpt = False,
    no_trial: Annotated[bool, typer.Option("--no-trial", help="Skip loading real BPF programs.")]
    = False,
) -> None:
    """Check what this kernel offers (BTF, tracefs, each tracepoint and its fields, kfunc and
    kprobe, kallsyms, headers, THP settings) and what khmon will use.

    Exits 0 when live capture works, 1 otherwise, naming the reason.
    """
    from .doctor import as_json as checks_json
    from .doctor import failures, run_checks

    def body() -> None:
        checks = run_checks(trial=not no_trial)
        if as_json:
            out_json(checks_json(checks))
        else:
            width = max(len(f"{c.area} {c.item}") for c in checks)
            out("\n".join(f"{c.state.upper():5} {(c.area + ' ' + c.item).ljust(width)}  "
                          f"{c.detail}" for c in checks))
        bad = failures(checks)
        if bad:
            say(f"khmon: live capture will not work: {bad[0].item}: {bad[0].detail}")
            raise typer.Exit(EXIT_FAIL)

    _guard(body)


@app.command()
def record(
    output: Annotated[Path, typer.Option("--output", "-o", help="Recording file to write.")],
    duration: Annotated[float | None, typer.Option("--duration", "-d", min=0.1,
                                                   callback=_finite,
                                                   help="Seconds to record (default: until "
                                                   "Ctrl-C, SIGTERM or SIGHUP).")] = None,
    pid: PidOpt = 0,
    ringbuf_pages: RingOpt = 1024,
    dedup_slots: DedupOpt = 32768,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing recording file "
                                        "(a new file: a report reading the old one keeps it).")]
    = False,
    max_pmds: MaxPmdsOpt = DEFAULT_PMD_CAP,
    ebpf: EbpfOpt = False,
) -> None:
    """Record khugepaged events to a file for `khmon report FILE`.

    The file holds a header (kernel release, tracepoint formats, BTF offsets, THP settings
    and counters) and the event stream. Progress goes to stderr every 5 s.
    """
    def body() -> None:
        cfg = _config(pid, ringbuf_pages, dedup_slots)
        if ebpf:
            out(_generated_c(cfg))
            return
        require_capture()  # first: without privileges, a path check would mislead
        check_output(output, force)  # before the compile, which takes seconds
        model, warnings = _capture(cfg, duration, output, StopFlag(), progress=not quiet,
                                   max_pmds=max_pmds)
        r = model.report(warnings)
        for w in warnings:
            say(f"khmon: warning: {w}")
        say(f"khmon: recorded {sum(r['events'].values())} events ({r['lost_events']} lost) "
            f"in {r['window']['seconds']:.1f} s to {output}")

    _guard(body)


@app.command()
def report(
    recording: Annotated[Path | None, typer.Argument(help="A recording from `khmon record`.")]
    = None,
    live: Annotated[bool, typer.Option("--live", help="Capture live instead of reading a file.")]
    = False,
    duration: Annotated[float, typer.Option("--duration", "-d", min=0.1, callback=_finite,
                                            help="Seconds of live capture.")] = 10.0,
    pid: PidOpt = 0,
    as_json: JsonOpt = False,
    ringbuf_pages: RingOpt = 1024,
    dedup_slots: DedupOpt = 32768,
    grid: Annotated[int, typer.Option("--grid", min=0, help=(
        "Draw this many PMDs (most collapse attempts first) as 8x64 grids of their PTEs, "
        "attempted ranges marked."))] = 0,
    max_pmds: MaxPmdsOpt = DEFAULT_PMD_CAP,
    ebpf: EbpfOpt = False,
    from_daemon: Annotated[bool, typer.Option("--daemon", help="Ask the running `khmon daemon` "
                                              "for its report so far (its socket API).")] = False,
    socket: Annotated[Path, typer.Option("--socket", help="The daemon's socket (with "
                                         "--daemon).")] = DEFAULT_SOCKET,
) -> None:
    """Summarise khugepaged activity: counts per event, status, order and process, next to
    the kernel's own counters over the same window (/proc/vmstat thp counters,
    khugepaged/pages_collapsed and full_scans, the per-size hugepages stats), and every
    lost event. Where the kernel allows function probes, also one record per PMD: its
    present-PTE bitmap, verdict and collapse attempts (--json pmds[], --grid N).

    Give a recording, or --live --duration S to capture now, or --daemon.
    """
    def body() -> None:
        if from_daemon and not live and recording is None:
            from .service.client import daemon_report
            return _emit(daemon_report(socket), as_json, grid)
        if live == (recording is not None) or from_daemon:
            raise KhmonError("give one of a recording, --live or --daemon", "khmon report FILE, "
                             "khmon report --live --duration 10, or khmon report --daemon",
                             EXIT_BAD_INPUT)
        if recording is not None:
            reader = Reader(recording)
            model = replay(reader, pmd_cap=max_pmds)
            warnings = reader.warnings
        else:
            cfg = _config(pid, ringbuf_pages, dedup_slots)
            if ebpf:
                out(_generated_c(cfg))
                return
            model, warnings = _capture(cfg, duration, None, StopFlag(), progress=False,
                                       max_pmds=max_pmds)
        for w in warnings:
            say(f"khmon: warning: {w}")
        _emit(model.report(warnings), as_json, grid)

    _guard(body)


def _orders(value: str | None) -> frozenset[int] | None:
    """--orders 4,5,9 -> {4, 5, 9}; None keeps the recording's own."""
    if value is None:
        return None
    try:
        orders = frozenset(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        orders = frozenset({-1})
    if not orders or not all(2 <= o <= 9 for o in orders):
        raise KhmonError(f"--orders {value!r} is not a list of collapse orders",
                         "give orders 2..9 separated by commas, e.g. --orders 4,5,9",
                         EXIT_BAD_INPUT)
    return orders


@app.command()
def simulate(
    recording: Annotated[Path, typer.Argument(help="A recording from `khmon record` with PMD "
                                              "bitmaps (any source). Where function probes "
                                              "ran, the kernel's attempts are compared too.")],
    algo: Annotated[str, typer.Option("--algo", help="v19: the linear walk of Linux 7.2; "
                                      "v17: the stack-based recursion of the v17 posting.")]
    = "v19",
    orders: Annotated[str | None, typer.Option(
        "--orders", help="Enabled collapse orders, e.g. 4,5,9 (9 = 2 MiB); default: the "
        "recording's THP settings for a MADV_HUGEPAGE VMA.")] = None,
    max_ptes_none: Annotated[int | None, typer.Option(
        "--max-ptes-none", min=0, max=511, help="khugepaged/max_ptes_none; default: the "
        "recording's. mTHP collapse honours only 0 and 511.")] = None,
    max_ptes_swap: Annotated[int | None, typer.Option("--max-ptes-swap", min=0, max=512)] = None,
    max_ptes_shared: Annotated[int | None, typer.Option("--max-ptes-shared", min=0,
                                                        max=512)] = None,
    max_pmds: MaxPmdsOpt = DEFAULT_PMD_CAP,
    as_json: JsonOpt = False,
) -> None:
    """Replay every captured PMD bitmap through a model of khugepaged's collapse decision.

    With the recording's own settings it checks the model against what the kernel did, pass
    by pass (every pass should match); with other settings or the other algorithm it answers
    "what if": predicted collapses per order, attempts and bloat beside the kernel's.
    Exit 0 when it ran (whatever matched); 2 for a bad recording or option.
    """
    from dataclasses import replace

    from .model import khugepaged as sim
    from .outputs import whatif

    def body() -> None:
        if algo not in sim.ALGORITHMS:
            raise KhmonError(f"--algo {algo!r} is not a known algorithm",
                             f"use one of {', '.join(sim.ALGORITHMS)}", EXIT_BAD_INPUT)
        chosen = _orders(orders)
        reader = Reader(recording)
        model = replay(reader, pmd_cap=max_pmds)
        for w in reader.warnings:
            say(f"khmon: warning: {w}")
        if not model.pmds.active:
            raise KhmonError(f"{recording} has no per-PMD records (it was made without "
                             "function probes or pagemap samples)", "record on a kernel where "
                             "`khmon doctor` shows a bitmap source", EXIT_BAD_INPUT)
        r = model.report(reader.warnings)
        epochs = {c["epoch"]: c["settings"] for c in r["settings_changes"]}
        given = {k: v for k, v in (("orders", chosen), ("max_ptes_none", max_ptes_none),
                                   ("max_ptes_swap", max_ptes_swap),
                                   ("max_ptes_shared", max_ptes_shared)) if v is not None}
        def settings(epoch: int | None) -> sim.Settings:
            """The recording's settings in that epoch (the latest for None), with the
            what-if options applied."""
            knobs = r["settings"] if epoch is None else epochs.get(
                epoch, reader.header.get("settings", {}))
            return replace(sim.settings_from_sysfs(knobs), **given)

        result = whatif.replay(r["pmds"], algo, settings,
                               attempts_seen=model.pmds.collapse is not None)
        if not result["passes"]:
            raise KhmonError(f"{recording} has nothing to replay: " + (
                f"none of its {len(r['pmds'])} PMD records has a bitmap" if r["pmds"] else
                "no scan in it named a PMD whose PTEs could be read"),
                "record while a workload gives khugepaged PMDs to scan", EXIT_BAD_INPUT)
        result["what_if"] = sorted(given)
        result["warnings"] = [w for w in [sim.unhonoured_max_ptes_none(algo, settings(None))] if w]
        for w in result["warnings"]:
            say(f"khmon: warning: {w}")
        if as_json:
            out_json(result)
        else:
            out(render_simulation(result))

    _guard(body)


@app.command()
def demo(
    pmds: Annotated[int, typer.Option("--pmds", min=1, max=4096,
                                      help="2 MiB regions per workload pattern.")] = 16,
    as_json: JsonOpt = False,
) -> None:
    """Show khmon on real khugepaged work: start a capture, run the built-in workload (one
    fully populated region that khugepaged collapses, one half-populated region it must
    refuse), and print the report with the kernel's own counters beside it.

    For the run it sets THP enabled=madvise, khugepaged scan_sleep_millisecs=100 and
    max_ptes_none=255, and restores every knob afterwards.
    """
    from .kernel.sysfs import override
    from .workload import Workloads

    def body() -> None:
        knobs = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100",
                 "khugepaged/max_ptes_none": "255"}
        work = Workloads([["--pmds", str(pmds), "--pattern", "full"],
                          ["--pmds", str(pmds), "--pattern", "first-half", "--full-scans", "3"]])
        stop = StopFlag()
        say(f"khmon demo: capturing while two workloads of {pmds} x 2 MiB run "
            "(khugepaged scan_sleep 100 ms) ...")
        try:
            with override(knobs):
                model, warnings = _capture(ProbeConfig(), 90, None, lambda: work() or stop(),
                                           progress=True)
        finally:
            work.kill()
        r = model.report(warnings)
        if as_json:
            _emit(r, True)
            return
        out(render_report(r) + "\n\n" + _demo_story(r, work.results(), pmds))

    _guard(body)


app.command("daemon")(daemon_command)  # its options and body live in khmon.daemon


def _demo_story(r: dict, runs: list[dict], pmds: int) -> str:
    """What the demo showed, in words, checked against the kernel's counters."""
    pids = [x.get("pid") for x in runs]
    done = [x for x in runs if x.get("done")]
    delta = r["kernel_counters"]["delta"]
    procs = {p["pid"]: p for p in r["processes"]}
    full, half = (procs.get(p, {}) for p in ([*pids, 0, 0])[:2])
    ok = r["collapse"]["succeeded"] == delta.get("khugepaged/pages_collapsed")
    return "\n".join([
        "What happened:",
        f"- workload 'full' (pid {pids[0] if pids else '?'}) populated every page of {pmds} PMDs;"
        f" khugepaged scanned them {full.get('scans', 0)} times and collapsed "
        f"{full.get('collapses', 0)} (smaps says {done[0]['collapsed_pmds'] if done else '?'}).",
        f"- workload 'first-half' (pid {pids[1] if len(pids) > 1 else '?'}) left 256 of 512 "
        f"PTEs empty, over max_ptes_none=255: {half.get('scans', 0)} scans, "
        f"{half.get('collapses', 0)} collapses.",
        f"- khmon counted {r['collapse']['succeeded']} successful collapses; the kernel's "
        f"khugepaged/pages_collapsed rose by {delta.get('khugepaged/pages_collapsed')} and "
        f"thp_collapse_alloc by {delta.get('thp_collapse_alloc')}: "
        + ("they agree." if ok else "they DISAGREE (other collapses during the window?)"),
        f"- khmon counted {r['scan_pmd']['by_status'].get('exceed_none_pte', 0)} scans refused "
        f"for too many empty PTEs; /proc/vmstat thp_scan_exceed_none_pte rose by "
        f"{delta.get('thp_scan_exceed_none_pte')}.",
        f"- lost events: {r['lost_events']}.",
    ])


@app.command(no_args_is_help=False)
def top(
    interval: Annotated[float | None, typer.Argument(min=0.1, help="Seconds between refreshes "
                                                     "(default 1).")] = None,
    count: Annotated[int | None, typer.Argument(min=1, help="Refreshes, then exit.")] = None,
    delay: Annotated[float | None, typer.Option("--delay", "-d", min=0.1,
                                                help="Same as INTERVAL.")] = None,
    number: Annotated[int | None, typer.Option("--count", "-n", min=1,
                                               help="Same as COUNT.")] = None,
    pid: PidOpt = 0,
    batch: Annotated[bool, typer.Option("--batch", "-b", help="Plain text, one block per "
                                        "refresh (the default when stdout is not a "
                                        "terminal).")] = False,
    once: Annotated[bool, typer.Option("--once", help="Batch output of one refresh (with -n: "
                                       "that many).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON snapshot per line.")] = False,
    socket: Annotated[Path | None, typer.Option("--socket", help="The daemon's socket "
                                                "(default /run/khmon/khmon.sock).")] = None,
    local: Annotated[bool, typer.Option("--local", help="A capture of its own even when a "
                                        "daemon runs (root).")] = False,
    replay: Annotated[Path | None, typer.Option("--replay", help="Play a recording frame by "
                                                "frame (space pauses, [ and ] step).")] = None,
) -> None:
    """Live view of khugepaged: per order, process and PMD, what it tries and wastes, and
    whether khmon's counts agree with the kernel's. From the daemon's socket when one runs,
    else a capture of its own (root). Keys: h or ? for help, q to quit.
    """
    from .outputs.top import TopOptions
    from .outputs.top import run as run_top

    raise typer.Exit(_guard(lambda: run_top(TopOptions(
        interval, count, delay, number, pid, batch, once, as_json, socket, local, replay))))


def _generated_c(cfg: ProbeConfig) -> str:
    from .capture.bpfgen import generate
    from .capture.live import kernel_layouts, owner_offsets, uffd_mask
    from .capture.loader import nr_cpu_ids
    from .capture.plan import vma_flag_bits
    from .kernel.btf import Btf

    btf = Btf.from_kernel()
    # As LiveProbes compiles it first: function probes as fentry/fexit.
    return generate(kernel_layouts(btf, cfg.ptwalk), owner_offsets(btf), cfg,
                    nr_cpu_ids=nr_cpu_ids(), func_mode="kfunc",
                    uffd_mask=uffd_mask(vma_flag_bits(btf)))


def version_callback(value: bool) -> None:
    if value:
        _guard(lambda: out(f"khmon {__version__}"))
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback,
                                          is_eager=True, help="Print the version.")] = False,
) -> None:
    """Live eBPF observability for Linux khugepaged and mTHP collapse."""


def main() -> None:
    """Entry point. Usage errors become one line too: click's own format is a boxed
    paragraph, which scripts and logs handle badly."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):  # before click runs; click's EOF on a prompt
        code = EXIT_INTERRUPTED
    except OSError as e:
        # Only click's own output (--help) gets here: khmon's goes through outputs.streams,
        # and its reads turn OSError into KhmonError where they happen.
        if e.errno not in OUTPUT_ERRNOS:
            raise
        try:
            stdout_failed(e)
        except KhmonError as err:
            sys.exit(_error_line(err))
    except Exception as e:
        # Click's exceptions (typer vendors click, so match by shape, not by class).
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "khmon"
        say(f"khmon: error: {e.format_message()} (see {cmd} --help)")
        sys.exit(e.exit_code)
    if code == EXIT_INTERRUPTED:
        # A Ctrl-C outside a capture's window: while click parses (typer turns it into exit
        # 130 silently) or in a command (_guard). A capture itself ends cleanly instead.
        say("khmon: interrupted")
    sys.exit(code if isinstance(code, int) else 0)
