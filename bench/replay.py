"""Replay throughput: how fast `khmon report FILE` decodes and aggregates a recording.

What it does: builds, in a temporary directory, a recording of EVENTS events (default
1,000,000) in the running kernel's real record formats (khmon.kernel.tracefs.read_formats +
khmon.stream.layout.build_layouts, header as session.LiveCapture.header() writes it). Records are
packed with each layout's own struct: mostly mm_khugepaged_scan_pmd with a mix of statuses
and owner processes, plus some mm_collapse_huge_page(_isolate) events; every record has
count=1, so records == events. Then, ROUNDS times, each round in a fresh child process, it
times the whole `khmon report FILE` path: Reader (file read, frame checks) + Model
(struct decode, counting) + result() + render_report(). In the same child, and alternating
with it, it times the bare decode floor: struct.iter_unpack over the same record bytes with
no counting, so the ratio pipeline/floor is measured side by side.

How to read the output:
  events/s best/median   end-to-end rate over the rounds; the target is >= 1,000,000
  floor events/s         iter_unpack alone; pipeline/floor says how much of the time is
                         decode (unavoidable in pure Python) versus counting and framing
  peak RSS               of a child that only replays (read once, report once)
  file size              bytes on disk, and bytes per event
If the median misses the target, a cProfile of one replay follows (top functions by
internal time). Needs read access to tracefs (root). Run: .venv/bin/python bench/replay.py
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from khmon.capture.bpfgen import ProbeConfig
from khmon.capture.live import LiveCapture, owner_offsets
from khmon.kernel.btf import Btf
from khmon.kernel.sysfs import read_counters
from khmon.kernel.tracefs import read_formats
from khmon.model.model import Model
from khmon.outputs.text import render_report
from khmon.stream.layout import EventLayout, build_layouts
from khmon.stream.parts import Part
from khmon.stream.recording import Reader, Writer

TARGET = 1_000_000
BATCH = 4096  # records per R part (a 100 ms poll at ~40k records/s)
STATS_EVERY = 40  # R parts between S parts (roughly one per second of capture)

# (owner tgid, owner comm, weight): a few busy processes and a long tail.
OWNERS = [(1000 + i, f"proc-{i}".encode(), w) for i, w in enumerate([40, 20, 10, 5] + [1] * 25)]
# scan_pmd status names and weights: a khugepaged mostly rejecting sparse PMDs.
SCAN_STATUSES = {"exceed_none_pte": 60, "succeeded": 8, "page_pmd_mapped": 15,
                 "pmd_none": 5, "lack_referenced_page": 4, "exceed_swap_pte": 2,
                 "pte_non_present": 2, "no_process_for_page": 1, "page_not_in_lru": 1,
                 "exceed_shared_pte": 1, "pte_mapped_hugepage": 1}
COLLAPSE_STATUSES = {"succeeded": 80, "alloc_huge_page_failed": 5, "exceed_none_pte": 10,
                     "page_locked": 5}
COLLAPSE_SHARE = 0.02  # fraction of events that are collapse(-isolate) events


def _header(layouts: list[EventLayout]) -> dict:
    """The header LiveCapture.header() writes, without attaching anything."""
    cap = LiveCapture.__new__(LiveCapture)
    cap.cfg = ProbeConfig()
    cap.layouts = layouts
    cap.owner = owner_offsets(Btf.from_kernel())
    cap.start_counters = read_counters()
    cap.vma_flags = {}
    cap.pages = None  # no pagemap parts in a synthetic stream
    cap.probes = SimpleNamespace(attached=dict.fromkeys(lay.name for lay in layouts),
                                 func_mode=None, func_errors={})
    return cap.header()


def _value_codes(lay: EventLayout, status_names: dict[str, int], rng: random.Random,
                 ts: int, owner: tuple[int, bytes, int]) -> tuple:
    """One record's values in the order of lay.struct (pad bytes take no value)."""
    tgid, comm, _ = owner
    vals: dict[str, object] = {
        "ts": ts, "count": 1, "event": lay.index, "cpu": rng.randrange(2),
        "tid": 37, "tgid": 37, "owner_tgid": tgid, "flags": 0,
        "comm": b"khugepaged", "owner_comm": comm,
    }
    syms = lay.fmt.symbols.get(lay.fmt.status_field or "", {})
    by_name = {v: k for k, v in syms.items()}
    names = list(status_names)
    status = by_name.get(rng.choices(names, weights=list(status_names.values()))[0], 0)
    for f in lay.fields:
        if f.name in ("status", "result"):
            vals[f.name] = status
        elif f.is_data_loc:
            vals[f.name] = 0
        elif f.name == "mm":
            vals[f.name] = 0xFFFF888100000000 + tgid * 0x1000
        elif f.name == "pfn":
            vals[f.name] = rng.randrange(1 << 22)
        elif f.name == "none_or_zero":
            vals[f.name] = rng.randrange(512)
        elif "[" in f.ctype:
            vals[f.name] = b""
        else:
            vals[f.name] = rng.randrange(2)
    out = [vals[name] for name in lay.field_names if name in vals]
    out += [b"" for _ in lay.strings]
    return tuple(out)


def build(path: Path, events: int, seed: int = 1) -> dict[str, int]:
    """Write a recording of `events` records (count=1 each); return records per event name."""
    layouts = build_layouts(read_formats())
    by_name = {lay.name: lay for lay in layouts}
    scan = by_name["mm_khugepaged_scan_pmd"]
    collapse = [by_name[n] for n in ("mm_collapse_huge_page", "mm_collapse_huge_page_isolate")
                if n in by_name]
    header = _header(layouts)
    rng = random.Random(seed)
    weights = [w for *_, w in OWNERS]
    # A pool of distinct packed records per layout, drawn from at random: building a million
    # fresh tuples would dominate the build time and the values do not matter to the decoder.
    pools: dict[int, list[bytes]] = {}
    for lay, statuses, n in [(scan, SCAN_STATUSES, 4096)] + [(c, COLLAPSE_STATUSES, 512)
                                                             for c in collapse]:
        pools[lay.index] = [
            lay.struct.pack(*_value_codes(lay, statuses, rng, 10**12 + i,
                                          rng.choices(OWNERS, weights=weights)[0]))
            for i in range(n)]
    counts = {lay.name: 0 for lay in layouts}
    writer = Writer(path, header)
    start_counters = read_counters()
    left, parts = events, 0
    try:
        while left:
            n = min(BATCH, left)
            n_coll = sum(1 for _ in range(n) if rng.random() < COLLAPSE_SHARE) if collapse else 0
            batches = [(scan, n - n_coll)]
            if n_coll:
                batches.append((collapse[parts % len(collapse)], n_coll))
            for lay, k in batches:
                if k:
                    pool = pools[lay.index]
                    _put(writer, Part("R", event=lay.index, data=b"".join(rng.choices(pool, k=k))))
                    counts[lay.name] += k
            left -= n
            parts += 1
            if parts % STATS_EVERY == 0:
                _put(writer, Part("S", meta=_stats(header, counts, parts, start_counters)))
        _put(writer, Part("E", meta=_stats(header, counts, parts, start_counters)))
    finally:
        writer.close()
    return counts


def _put(writer: Writer, part: Part) -> None:
    """Writer.add(part); older Writers had records()/stats()/end() instead."""
    if hasattr(writer, "add"):
        writer.add(part)
    elif part.kind == "R":
        writer.records(part.event, part.data)  # type: ignore[attr-defined]
    else:
        getattr(writer, {"S": "stats", "E": "end"}[part.kind])(part.meta)


def _stats(header: dict, counts: dict[str, int], parts: int, counters: dict) -> dict:
    mono = header["start_mono_ns"] + parts * 100_000_000
    return {"mono_ns": mono, "wall": header["start_wall"],
            "probe": {"seen": dict(counts), "lost": dict.fromkeys(counts, 0)},
            "counters": counters}


def replay(path: Path) -> tuple[int, str]:
    """`khmon report FILE` minus printing: events counted and the rendered text."""
    reader = Reader(path)
    agg = Model(reader.header)
    for part in reader.parts():
        agg.add(part)
    result = agg.report(reader.warnings)
    return sum(result["events"].values()), render_report(result)


def floor(path: Path) -> int:
    """Decode only: iter_unpack every record part, no framing checks, no counting."""
    reader = Reader(path)
    layouts = Model(reader.header).layouts
    n = 0
    for part in reader.parts():
        if part.kind == "R":
            for _ in layouts[part.event].struct.iter_unpack(part.data):
                n += 1
    return n


def child(path: Path, rounds: int) -> None:
    """Timed rounds in this (fresh) process; prints one JSON line."""
    pipe, flo = [], []
    events = 0
    for _ in range(rounds):
        t = time.perf_counter()
        events, _text = replay(path)
        pipe.append(time.perf_counter() - t)
        t = time.perf_counter()
        floor(path)
        flo.append(time.perf_counter() - t)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"events": events, "pipeline_s": pipe, "floor_s": flo, "rss_kb": rss_kb}))


def profile(path: Path, top: int = 15) -> str:
    prof = cProfile.Profile()
    prof.enable()
    replay(path)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7, help="timed replays (in child processes)")
    ap.add_argument("--profile", action="store_true", help="always print a cProfile")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, 1)
        return 0

    with tempfile.TemporaryDirectory(prefix="khmon-bench-") as tmp:
        path = Path(tmp) / "bench.khrec"
        t = time.perf_counter()
        counts = build(path, args.events)
        built_s = time.perf_counter() - t
        size = path.stat().st_size
        total = sum(counts.values())
        print(f"recording: {total:,} events ({', '.join(f'{k} {v:,}' for k, v in counts.items() if v)})")
        print(f"file size: {size:,} bytes ({size / total:.1f} bytes/event), built in {built_s:.1f} s")

        pipe, flo, rss = [], [], []
        for _ in range(args.rounds):
            out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if r["events"] != total:
                print(f"ERROR: replay counted {r['events']} events, expected {total}")
                return 1
            pipe += r["pipeline_s"]
            flo += r["floor_s"]
            rss.append(r["rss_kb"])

        rate = [total / s for s in pipe]
        frate = [total / s for s in flo]
        ratios = [p / f for p, f in zip(pipe, flo, strict=True)]
        print(f"rounds: {len(pipe)} (each in a fresh process; pipeline and floor alternate)")
        print(f"replay (Reader + Model + report): best {max(rate):,.0f} events/s, "
              f"median {statistics.median(rate):,.0f} events/s "
              f"(median {statistics.median(pipe):.3f} s per {total:,} events)")
        print(f"decode floor (iter_unpack only):       best {max(frate):,.0f} events/s, "
              f"median {statistics.median(frate):,.0f} events/s")
        print(f"pipeline time / floor time: median {statistics.median(ratios):.2f}x")
        print(f"peak RSS of a replaying process: {max(rss) / 1024:.0f} MiB "
              f"(file {size / 2**20:.0f} MiB)")
        ok = statistics.median(rate) >= TARGET
        print(f"target >= {TARGET:,} events/s: {'MET' if ok else 'MISSED'}")
        if not ok or args.profile:
            print("\ncProfile of one replay (sorted by internal time):")
            print(profile(path))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    struct.Struct("<Q")  # warm the struct cache identically in parent and children
    sys.exit(main())
