"""khmon top's cost: CPU per frame and memory of the UI process at 1 Hz, with a snapshot of
1,000 processes and 20,000 PMDs.

What it does: builds one snapshot report of a model holding PROCESSES processes and PMDS PMD
records (khmon.model.model.Model fed the synthetic 7.2 stream of tests/unit/synthetic.py, so
every record has the real shape: bitmaps, attempts, passes), then serves it over a real Unix
socket speaking the daemon's protocol (tests/support/fake_daemon.py, in this process, with
its totals growing every second so every rate is a rate). `khmon top --socket` runs in a
real terminal (tmux, 160x50, tests/support/tmux.py) for SECONDS; after a warm-up the UI
process's CPU time (/proc/PID/stat) is read over the rest of the run and divided by the
frames it drew (1 Hz). RSS is the UI process's VmRSS at the end and VmHWM (its peak).

Three cases, because what crosses the socket is the cost:
  daemon cap 20   the lists as `khmon daemon` sends them (docs/socket.md: at most 20 each)
  top cap 200     the lists as khmon top asks for them (top=200; khmon.topfeed's maximum)
  all procs, pid  all 1,000 processes, and the PMDs of the selected process only (what a
                  snapshot request's `pid` asks for: khmon.topfeed answers it so)
  uncapped        all 1,000 processes and 20,000 PMD records in every snapshot (no source
                  sends this; it shows what the caps buy: JSON decoding dominates)

Targets (issue 14): at most 5% of a core and 80 MB. Also printed: first paint (start to the
first screen with data) and the JSON decode time of one snapshot in each case.
Run: .venv/bin/python bench/top_frame.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "unit"), str(ROOT)]

from synthetic import SyntheticStream  # noqa: E402

from khmon.kernel.proc import TICKS  # noqa: E402
from khmon.model.model import Model  # noqa: E402
from khmon.stream.parts import END, STATS  # noqa: E402
from tests.support.fake_daemon import fake_daemon  # noqa: E402
from tests.support.tmux import TopPane  # noqa: E402

PROCESSES, PMDS = 1000, 20_000
TARGET_CPU, TARGET_RSS_MB = 0.05, 80.0
WARMUP_S = 5.0


def base_report() -> dict[str, Any]:
    """One snapshot of a model with PROCESSES processes and PMDS PMD records."""
    s = SyntheticStream(processes=PROCESSES, pmds_per_process=PMDS // PROCESSES,
                        scanned_per_s=PMDS, uffd_share=0.05, lifetime_s=(1000, 2000), seconds=3)
    m = Model(s.header, s.lays, pmd_cap=PMDS * 2)
    for part in s.parts():
        m.add(part)
        if part.kind in (STATS, END):
            snap = m.snapshot(PMDS)
    r = snap.report
    assert len(r["processes"]) == PROCESSES and len(r["pmds"]) == PMDS, (
        len(r["processes"]), len(r["pmds"]))
    return r


def grown(base: dict[str, Any], seq: int, cap: int | None, pid: int | None = None
          ) -> dict[str, Any]:
    """The base report one second later per seq: totals grown, lists capped to `cap`;
    with `pid`, the PMDs are that process's (a snapshot request's `pid`)."""
    r = dict(base)
    r["events"] = {k: v * seq for k, v in base["events"].items()}
    col = copy.deepcopy(base["collapse"])
    col["attempts"] *= seq
    col["succeeded"] *= seq
    for o in col["by_order"].values():
        o["attempts"] *= seq
        o["succeeded"] *= seq
    r["collapse"] = col
    procs = base["processes"] if cap is None else base["processes"][:cap]
    r["processes"] = [{**p, "scans": p["scans"] * seq,
                       "collapse_attempts": p["collapse_attempts"] * seq} for p in procs]
    pmds = base["pmds"] if pid is None else [p for p in base["pmds"] if p["pid"] == pid]
    r["pmds"] = pmds if cap is None else pmds[:cap]
    return r


def by_pid(base: dict[str, Any], seq: int, pid: int | None) -> dict[str, Any]:
    """Every process; the PMDs of `pid` (or, before one is selected, the 20 most recent)."""
    r = grown(base, seq, None, pid)
    if pid is None:
        r["pmds"] = r["pmds"][:20]
    return r


def proc_cpu(pid: int) -> float:
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / TICKS


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_case(name: str, base: dict[str, Any], cap: int | None, seconds: float,
             warmup: float, pid_pmds: bool = False) -> dict[str, Any]:
    def answer(seq: int, req: dict[str, Any]) -> dict[str, Any]:
        return by_pid(base, seq, req.get("pid")) if pid_pmds else grown(base, seq, cap)

    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "khmon.sock"
        t0 = time.monotonic()
        with fake_daemon(sock, answer) as d:
            sample = json.dumps({"report": answer(1, {"pid": base["pmds"][0]["pid"]})})
            t = time.perf_counter()
            json.loads(sample)
            decode_ms = (time.perf_counter() - t) * 1e3
            with TopPane(["--socket", str(sock), "1"], Path(tmp)) as pane:
                pane.wait_for(lambda s: "Processes:" in s and "shown of" in s, 60, "data")
                paint = time.monotonic() - t0
                ui = min(pane.pids())
                time.sleep(warmup)
                c0, n0, w0 = proc_cpu(ui), d.seq, time.monotonic()
                time.sleep(seconds - warmup)
                c1, n1, w1 = proc_cpu(ui), d.seq, time.monotonic()
                rss, hwm = status_kb(ui, "VmRSS") / 1024, status_kb(ui, "VmHWM") / 1024
                screen = pane.screen()
                pane.keys("q")
                pane.exit_status(30)
    frames = max(1, n1 - n0)
    return {"case": name, "bytes": len(sample), "decode_ms": decode_ms, "paint_s": paint,
            "frames": frames, "cpu_ms": (c1 - c0) / frames * 1e3,
            "share": (c1 - c0) / (w1 - w0), "rss": rss, "hwm": hwm, "screen": screen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="per case, warm-up included")
    ap.add_argument("--warmup", type=float, default=WARMUP_S,
                    help="seconds of each case before CPU time is counted")
    ap.add_argument("--screen", action="store_true", help="print the last screen of each case")
    args = ap.parse_args()
    if not 0 <= args.warmup < args.seconds:
        ap.error(f"--seconds {args.seconds:g} must be longer than the warm-up ({args.warmup:g} s)")
    t = time.monotonic()
    base = base_report()
    print(f"snapshot: {len(base['processes']):,} processes, {len(base['pmds']):,} PMD records "
          f"(built in {time.monotonic() - t:.1f} s); khmon top --socket at 1 Hz in tmux 160x50, "
          f"{args.seconds:g} s per case, {args.warmup:g} s warm-up")
    print(f"{'case':<16}{'JSON/frame':>12}{'decode':>10}{'CPU/frame':>11}{'core':>8}"
          f"{'RSS':>9}{'peak RSS':>10}{'first paint':>13}")
    ok = True
    for name, cap, pid_pmds in (("daemon cap 20", 20, False), ("top cap 200", 200, False),
                                ("all procs, pid", None, True), ("uncapped", None, False)):
        r = run_case(name, base, cap, args.seconds, args.warmup, pid_pmds)
        print(f"{r['case']:<16}{r['bytes'] / 1e6:>10.2f}MB{r['decode_ms']:>8.1f}ms"
              f"{r['cpu_ms']:>9.1f}ms{r['share'] * 100:>7.2f}%{r['rss']:>7.1f}MB"
              f"{r['hwm']:>8.1f}MB{r['paint_s']:>11.2f} s")
        if args.screen:
            print(r["screen"])
        if cap is not None or pid_pmds:
            ok &= r["share"] <= TARGET_CPU and r["hwm"] <= TARGET_RSS_MB
    print(f"targets (all but uncapped): <= {TARGET_CPU * 100:.0f}% of a core, <= {TARGET_RSS_MB:.0f} MB"
          f": {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
