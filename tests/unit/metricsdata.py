"""A real Model fed tests/unit's synthetic 7.2 stream, with the in-kernel counts a live
capture adds to each stats part, and its snapshots: what the exporter's tests
(tests/unit/test_metrics.py, tests/service/test_exporter.py) collect from."""

from __future__ import annotations

import itertools

from khdata import START_NS
from synthetic import SyntheticStream

from khmon.model.model import Model, Snapshot
from khmon.stream.parts import Part

SEC = 1_000_000_000
NASTY = [b'a"b\\c', b"new\nline", b"\xff\xfe bad utf8", b"{x=\"1\"}", b"[/]", b"sp ace"]


def exact_stats(m: Model, second: int) -> Part:
    """A stats part carrying in-kernel counts as the capture sends them: seen/lost/missed
    per event (here what the records counted), exact collapse rows and a histogram."""
    by = {lay.name: lay for lay in m.layouts}
    col, fn = by["mm_collapse_huge_page"], by["fn_collapse"]
    value = {n: v for v, n in col.fmt.symbols["status"].items()}
    fn_value = {n: v for v, n in fn.fmt.symbols["result"].items()}
    anon = m.events[col.index]
    rows = [[anon.name(k)[1], value[anon.name(k)[0]], 2, n, 0, 0] for k, n in anon.counts.items()]
    fcounts = m.events[fn.index]
    frows, hist = [], []
    for k, n in fcounts.counts.items():
        st, order, _f = fcounts.name(k)
        ns = fcounts.dur_sum[k]
        frows.append([order, fn_value[st], 1 if st != "succeeded" else 0, n, ns,
                      fcounts.dur_max[k]])
        hist.append([order, int(st == "succeeded"), 9 if st != "succeeded" else 15, n])
    seen = {ec.lay.name: ec.total for ec in m.events}
    return Part("S", meta={
        "mono_ns": START_NS + second * SEC, "wall": f"2026-12-02T10:00:{second % 60:02d}+00:00",
        "probe": {"seen": seen, "lost": dict.fromkeys(seen, 0), "missed": dict.fromkeys(seen, 0),
                  "exact": {"mm_collapse_huge_page": rows, "fn_collapse": frows},
                  "hist": {"fn_collapse": hist}, "exact_full": 0}})


def snapshots(labels: int = 4, comms: list[bytes] | None = None, seconds: int = 6
              ) -> tuple[Model, list[Snapshot]]:
    """A model fed a synthetic stream (with exact counts each second) and its snapshots."""
    s = SyntheticStream(processes=12, pmds_per_process=20, scanned_per_s=150, seconds=seconds,
                        lifetime_s=(1, 3), seed=3)
    if comms is not None:
        names = itertools.cycle(comms)
        spawn = s._spawn

        def renamed(now_s: int):
            p = spawn(now_s)
            p.comm = next(names)
            return p
        s._spawn = renamed  # type: ignore[method-assign]
    m = Model(s.header, s.lays, exit_grace_s=2, process_labels=labels)
    snaps = []
    for part in s.parts():
        m.add(part)
        if part.kind == "S":
            m.add(exact_stats(m, part.meta["mono_ns"] // SEC))
            snaps.append(m.snapshot())
    return m, snaps
