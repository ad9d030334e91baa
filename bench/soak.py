"""Soak: weeks of a busy test machine, squeezed into one process, through the decoder and model.

What it does: streams a synthetic khugepaged stream in the real 7.2 record layouts
(tests/unit/synthetic.py) through khmon.model.model.Model, the very code the daemon runs
behind the ring buffer. In the stream, processes start and exit with recycled mm addresses,
up to 200,000 PMDs are live at once (more than the default PMD cap, so the table stays
full and evicts), khugepaged rescans them (deduplicated records counting their repeats, as
the kernel's flushes deliver them), userfaultfd-armed PMDs make the uffd waste with its
futile rescans and order cascades, and full PMDs collapse. A snapshot is taken at every
second of stream time and the survivors are settled (khmon.model.model.settle), as the
daemon's pipeline does.

The defaults put most of the model's warm-up (the table filling in 5 s of stream time, then
exited processes kept for their grace and long-lived PMDs filling their capped history,
about 35 s in all) inside the first tenth of the events (13 s of 130), so rss_mb_10 is
close to the steady state the later figures are compared with; docs/benchmarks.md shows
the curve.

How to read the output: one line per 5 s of stream time, then a last line

    soak: events=N events_per_s=X rss_mb_10=A rss_mb_50=B rss_mb_100=C snapshot_ms_p99=S
          pmds_tracked_max=P evicted=E monotonic=yes|no     (one line; folded here)

events are kernel events (a record counting 20 repeats is 20), events_per_s is events over
the time spent in the decoder and model (generating the stream is not counted; it runs
between seconds), rss_mb_K the resident set when K% of the events have gone through,
snapshot_ms_p99 the 99th percentile of the time a snapshot took (both in CPU time of the
thread: on a shared machine wall time also counts other processes' turns; the line before
gives the wall-clock figures too), monotonic whether every
total in every snapshot was at least the one before. Targets: events_per_s >= 1,000,000;
rss_mb_100 <= 1.1 x rss_mb_10 and <= 250; snapshot_ms_p99 <= 20 with the table full;
monotonic=yes. Run: .venv/bin/python bench/soak.py [--events N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from synthetic import SyntheticStream, totals, went_down

from khmon.model.model import Model, settle


def rss_mb() -> float:
    """Resident set size now (not the peak): /proc/self/statm's second field, in pages."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=150_000_000, help="kernel events to stream")
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--pmds-per-process", type=int, default=2000)
    ap.add_argument("--scanned-per-s", type=int, default=30_000,
                    help="PMDs khugepaged visits per second of stream time")
    ap.add_argument("--uffd-share", type=float, default=0.01,
                    help="share of PMDs in userfaultfd-armed VMAs (rescanned every second)")
    ap.add_argument("--lifetime", type=int, nargs=2, default=(3, 15), metavar=("MIN", "MAX"),
                    help="a process lives this many seconds of stream time")
    ap.add_argument("--exit-grace", type=float, default=3,
                    help="seconds an exited process's PMDs stay in the model")
    ap.add_argument("--repeats", type=int, default=20,
                    help="rescans a deduplicated record stands for")
    args = ap.parse_args()
    stream = SyntheticStream(processes=args.processes, pmds_per_process=args.pmds_per_process,
                             scanned_per_s=args.scanned_per_s, repeats=args.repeats,
                             uffd_share=args.uffd_share, lifetime_s=tuple(args.lifetime),
                             seconds=None, max_events=args.events)
    model = Model(stream.header, stream.lays, exit_grace_s=args.exit_grace)
    print(f"soak: {args.events:,} events, {args.processes} processes x "
          f"{args.pmds_per_process} PMDs live, {args.scanned_per_s:,} visited a second, "
          f"PMD cap {model.pmds.cap:,}")
    busy = wall = 0.0
    snap_ms: list[float] = []
    snap_wall_ms: list[float] = []
    rss: dict[int, float] = {}
    before: dict[str, float] = {}
    monotonic = True
    tracked_max = 0
    second = 0
    pending = []
    for part in stream.parts():
        pending.append(part)
        if part.kind not in ("S", "E"):
            continue
        # One second of stream time through decoder and model, timed as the CPU time of this
        # thread (on a shared machine, wall time also counts other processes' turns; both
        # are printed).
        c0, w0 = time.thread_time(), time.perf_counter()
        for p in pending:
            model.add(p)
        c1, w1 = time.thread_time(), time.perf_counter()
        snap = model.snapshot()
        c2, w2 = time.thread_time(), time.perf_counter()
        settle()  # as the pipeline does after each snapshot (its time counts as busy)
        busy += time.thread_time() - c0
        wall += time.perf_counter() - w0
        snap_ms.append((c2 - c1) * 1e3)
        snap_wall_ms.append((w2 - w1) * 1e3)
        pending = []
        second += 1
        tracked_max = max(tracked_max, snap.pmds_total)
        now = totals(snap.report)
        bad = went_down(before, now)
        if bad:
            monotonic = False
            print(f"  not monotonic at second {second}: {bad[:3]}")
        before = now
        for pct in (10, 50):
            if pct not in rss and stream.events >= args.events * pct / 100:
                rss[pct] = rss_mb()
        if second % 5 == 0:
            print(f"  {second:4d} s: {stream.events:>12,} events, {stream.records:>10,} records, "
                  f"{snap.pmds_total:>7,} PMDs held, {rss_mb():6.1f} MB, snapshot "
                  f"{snap_ms[-1]:.1f} ms")
    rss[100] = rss_mb()
    r = model.report()
    evicted = sum(r["model"]["pmds_evicted"].values())
    p99, wall_p99 = (statistics.quantiles(x, n=100)[98] for x in (snap_ms, snap_wall_ms))
    w = r["wasted"]["by_reason"]
    print(f"stream: {stream.records:,} records, {len(r['processes']):,} processes held "
          f"({sum(r['model']['processes_forgotten'].values()):,} forgotten), uffd_isolate "
          f"{w['uffd_isolate']['attempts']:,}, futile_rescan {w['futile_rescan']['attempts']:,}, "
          f"order_cascade {w['order_cascade']['attempts']:,}, collapses {r['collapse']['succeeded']:,}")
    print(f"decoder+model: {busy:.1f} s of CPU ({wall:.1f} s of wall time, "
          f"{stream.events / wall:,.0f} events/s by the wall); snapshot p99 by the wall "
          f"{wall_p99:.2f} ms")
    print(f"soak: events={stream.events} events_per_s={stream.events / busy:.0f} "
          f"rss_mb_10={rss[10]:.1f} rss_mb_50={rss[50]:.1f} rss_mb_100={rss[100]:.1f} "
          f"snapshot_ms_p99={p99:.2f} pmds_tracked_max={tracked_max} evicted={evicted} "
          f"monotonic={'yes' if monotonic else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
