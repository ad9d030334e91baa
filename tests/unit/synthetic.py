"""A synthetic khugepaged stream in the real 7.2 record layouts, for long-run tests and the
soak benchmark (bench/soak.py).

It plays what a busy test machine shows: processes that start and exit (their mm addresses
recycled for the next ones), each with PMDs that khugepaged rescans (deduplicated scans, as
the kernel's flush records deliver them: one record counting the repeats of a second),
userfaultfd-armed PMDs whose every visit walks the orders down and fails at isolate (the
uffd waste, with its futile rescans), and fully populated PMDs that collapse once. A stats
part closes every second of stream time, naming the processes that exited.

Records are packed with each layout's own struct, in the order the kernel would deliver
them on one khugepaged thread; the generator is deterministic for a seed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from khdata import START_NS, by_name, func_layouts_72, stream_header

from khmon.stream.layout import EventLayout
from khmon.stream.parts import Part

UFFD_BITS = {"uffd_missing": 1 << 9, "uffd_wp": 1 << 12, "hugepage": 1 << 29}
UFFD = UFFD_BITS["uffd_missing"] | UFFD_BITS["hugepage"]
EVERY4TH = bytes([0x77]) * 64
FULL = bytes([0xFF]) * 64
WALK = [(0, 9), (0, 8), (0, 7), (0, 6), (0, 5), (0, 4), (0, 3), (0, 2)]
SEC = 1_000_000_000
KHUGEPAGED_TID = 77


@dataclass
class _Proc:
    pid: int
    mm: int
    comm: bytes
    pmds: list[int]  # PMD addresses
    uffd: set[int]  # the userfaultfd-armed ones
    plain: list[int]  # the others
    collapsed: set[int]
    dies_at: int  # stream second


class SyntheticStream:
    """parts() yields the stream; `events` and `records` count what it yielded."""

    def __init__(self, processes: int = 100, pmds_per_process: int = 2000,
                 scanned_per_s: int = 50_000, repeats: int = 20, uffd_share: float = 0.02,
                 lifetime_s: tuple[int, int] = (5, 30), seconds: int | None = 60, seed: int = 1,
                 max_events: int | None = None) -> None:
        """`seconds` of stream time (None: no limit), or fewer: the stream ends with the
        first second that brings its events to `max_events`."""
        self.lays = func_layouts_72()
        by = by_name(self.lays)
        self.scan, self.col = by["fn_pmd_scan"], by["fn_collapse"]
        self.tp_scan, self.tp_col = by["mm_khugepaged_scan_pmd"], by["mm_collapse_huge_page"]
        self.iso = by["mm_collapse_huge_page_isolate"]
        self.header = stream_header(self.lays, UFFD_BITS, {
            "enabled": "always [madvise] never", "khugepaged/max_ptes_none": "511",
            **{f"hugepages-{4 << o}kB/enabled": "always [inherit] madvise never"
               for o in range(2, 10)}})
        self.n_procs, self.per_proc = processes, pmds_per_process
        self.scanned_per_s, self.repeats, self.uffd_share = scanned_per_s, repeats, uffd_share
        self.lifetime, self.seconds, self.max_events = lifetime_s, seconds, max_events
        self.rng = random.Random(seed)
        self._mm_pool = [0xFFFF_8880_0000_0000 + i * 0x4000 for i in range(processes * 2)]
        self._next_pid = 1000
        self.events = self.records = 0
        self._status = {name: {v: k for k, v in lay.fmt.symbols.get(lay.fmt.status_field or "",
                                                                     {}).items()}
                        for name, lay in by.items()}
        # per layout: field names and their zero values (bytes for arrays and comms)
        self._fields = {lay.index: (tuple(n for n, _o, _c in lay.items),
                                    tuple(b"" if c.endswith("s") else 0 for _n, _o, c in lay.items))
                        for lay in self.lays}

    def _pack(self, lay: EventLayout, **values: int | bytes) -> bytes:
        names, defaults = self._fields[lay.index]
        return lay.struct.pack(*[values.get(f, d) for f, d in zip(names, defaults, strict=True)])

    def _spawn(self, now_s: int) -> _Proc:
        mm = self._mm_pool.pop(0)  # the oldest freed mm address comes back first
        self._next_pid += 1
        base = 0x7F00_0000_0000 + (self._next_pid % 4096) * (1 << 32)
        pmds = [base + i * (2 << 20) for i in range(self.per_proc)]
        uffd = {a for a in pmds if self.rng.random() < self.uffd_share}
        lo, hi = self.lifetime
        return _Proc(self._next_pid, mm, f"job-{self._next_pid % 37}".encode(), pmds, uffd,
                     [a for a in pmds if a not in uffd], set(), now_s + self.rng.randint(lo, hi))

    def parts(self) -> Iterator[Part]:
        procs = [self._spawn(0) for _ in range(self.n_procs)]
        for sec in itertools.count() if self.seconds is None else range(self.seconds):
            t0 = START_NS + sec * SEC
            # khugepaged's scan moves on: a different share of the PMDs each second; the
            # uffd-armed ones it never gets to collapse come back every second (futile rescans)
            chosen = [(p, a) for p in procs for a in p.uffd]
            budget = max(0, self.scanned_per_s - len(chosen))
            step = max(1, sum(len(p.plain) for p in procs) // max(1, budget))
            chosen += [(p, a) for p in procs for a in p.plain[sec % step::step]][:budget]
            out: list[tuple[EventLayout, bytes]] = []  # in one thread's delivery order
            ts = t0
            for p, addr in chosen:
                owner = {"tid": KHUGEPAGED_TID, "comm": b"khugepaged", "owner_tgid": p.pid,
                         "owner_comm": p.comm}
                if addr in p.uffd:
                    verdict, flags, n = "exceed_none_pte", UFFD, 1  # every visit a real pass
                    for off, order in WALK:
                        ts += 1000
                        out.append((self.iso, self._pack(
                            self.iso, ts=ts - 500, order=order, **owner,
                            status=self._status[self.iso.name]["exceed_none_pte"])))
                        out.append((self.col, self._pack(
                            self.col, ts=ts, count=1, mm=p.mm, address=addr + off * 4096,
                            order=order, present=EVERY4TH, vm_flags=flags, in_pmd_scan=1,
                            duration_ns=900, result=self._status[self.col.name]["exceed_none_pte"],
                            **owner)))
                        out.append((self.tp_col, self._pack(
                            self.tp_col, ts=ts, count=1, mm=p.mm, order=order, **owner,
                            status=self._status[self.tp_col.name]["exceed_none_pte"])))
                elif addr not in p.collapsed and self.rng.random() < 0.01:
                    verdict, flags, n = "succeeded", UFFD_BITS["hugepage"], 1
                    ts += 1000
                    out.append((self.col, self._pack(
                        self.col, ts=ts, count=1, mm=p.mm, address=addr, order=9, present=FULL,
                        vm_flags=flags, in_pmd_scan=1, duration_ns=50_000,
                        result=self._status[self.col.name]["succeeded"], **owner)))
                    out.append((self.tp_col, self._pack(
                        self.tp_col, ts=ts, count=1, mm=p.mm, order=9, **owner,
                        status=self._status[self.tp_col.name]["succeeded"])))
                    p.collapsed.add(addr)
                else:
                    verdict = "page_pmd_mapped" if addr in p.collapsed else "exceed_none_pte"
                    flags, n = UFFD_BITS["hugepage"], self.repeats
                ts += 10
                out.append((self.tp_scan, self._pack(
                    self.tp_scan, ts=ts, count=n, mm=p.mm, pfn=addr >> 12, **owner,
                    status=self._status[self.tp_scan.name][verdict])))
                out.append((self.scan, self._pack(
                    self.scan, ts=ts, count=n, mm=p.mm, address=addr, vm_start=addr,
                    vm_end=addr + (2 << 20), vm_flags=flags,
                    result=self._status[self.scan.name][verdict], **owner)))
                self.events += n * 2 + (3 * len(WALK) if addr in p.uffd else 0)
            yield from _runs(out)
            self.records += len(out)
            exited = [p for p in procs if p.dies_at <= sec]
            for p in exited:
                procs.remove(p)
                self._mm_pool.append(p.mm)
                procs.append(self._spawn(sec))
            yield Part("S", meta={"mono_ns": t0 + SEC, "wall": "synthetic",
                                  "exited": [p.pid for p in exited]})
            if self.max_events is not None and self.events >= self.max_events:
                break
        yield Part("E", meta={"mono_ns": t0 + SEC, "wall": "synthetic"})


def _runs(recs: list[tuple[EventLayout, bytes]]) -> Iterator[Part]:
    """Records in delivery order as R parts of one event each (as the loader's group_runs
    makes them: consecutive records of an event joined, never reordered)."""
    run: list[bytes] = []
    lay = None
    for lay_i, rec in recs:
        if lay_i is not lay and run:
            yield Part("R", event=lay.index, data=b"".join(run))
            run = []
        lay = lay_i
        run.append(rec)
    if run:
        yield Part("R", event=lay.index, data=b"".join(run))


# Sections of a report whose every number is a running total (the monotonicity checks).
MONOTONIC = ("events", "collapse", "scan_pmd", "by_event", "accounting", "wasted", "by_comm",
             "functions", "lost_events")
MODEL_TOTALS = ("pmds_evicted", "processes_forgotten", "dropped", "process_label_overflow",
                "decode_errors")


def _leaves(x: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def totals(report: dict) -> dict[str, float]:
    """Every running total of a report, by path (top lists are rankings and `unaccounted` a
    difference: neither is a total)."""
    out = {}
    for section in MONOTONIC:
        out.update(_leaves(report[section], section))
    for key in MODEL_TOTALS:
        out.update(_leaves(report["model"][key], f"model.{key}"))
    return {k: v for k, v in out.items() if ".top_" not in k and not k.endswith(".unaccounted")}


def went_down(before: dict[str, float], now: dict[str, float]) -> list[str]:
    """The totals of `before` that are missing from `now` or smaller there."""
    return [f"{k}: {v} -> {now.get(k)}" for k, v in before.items()
            if k not in now or now[k] < v]
