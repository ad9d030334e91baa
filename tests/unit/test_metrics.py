"""The exporter's collectors (khmon.outputs.metrics) on snapshots of a real Model fed a
synthetic 7.2 stream: label budgets whatever comms the stream holds, every series there from
the start and monotonic after, the histogram cumulative, no pid or PMD label, no _created.

The exposition checked by promtool and scraped by a real Prometheus is in
tests/service/test_exporter.py; the live daemon in tests/daemon."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from khdata import START_NS
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from synthetic import SyntheticStream

from khmon.model.model import Model, Snapshot
from khmon.model.waste import REASONS
from khmon.outputs.metrics import (
    DURATION_BOUNDS_LOG2,
    DaemonFacts,
    KernelCollector,
    SnapshotCollector,
    Timed,
    bitmap_source,
    probe_kinds,
)
from khmon.stream.parts import Part

SEC = 1_000_000_000
NASTY = [b'a"b\\c', b"new\nline", b"\xff\xfe bad utf8", b"{x=\"1\"}", b"[/]", b"sp ace"]


def _exact_stats(m: Model, second: int) -> Part:
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


def _snapshots(labels: int = 4, comms: list[bytes] | None = None, seconds: int = 6
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
            m.add(_exact_stats(m, part.meta["mono_ns"] // SEC))
            snaps.append(m.snapshot())
    return m, snaps


def _collect(snap: Snapshot, header: dict) -> list[Metric]:
    return list(SnapshotCollector(lambda: snap, DaemonFacts(header, "0.26.0")).collect())


def _families(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


def _samples(fam: Metric) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}


@pytest.mark.parametrize("labels", [1, 4, 32])
def test_comm_label_budget_holds_whatever_comms_the_stream_has(labels: int) -> None:
    comms = [f"c{i}".encode() for i in range(50)] + NASTY
    m, snaps = _snapshots(labels, comms, seconds=14)
    fams = _families(_collect(snaps[-1], m.header))
    per_comm = [f for f in fams.values() if "comm" in (f.samples[0].labels if f.samples else {})]
    assert {f.name for f in per_comm} >= {"khmon_process_scans", "khmon_process_collapses",
                                           "khmon_process_wasted_attempts"}
    for fam in per_comm:
        comms_seen = {s.labels["comm"] for s in fam.samples}
        # the budget, plus "other" and the owner-unknown row
        assert len(comms_seen) <= labels + 2, (fam.name, comms_seen)
        if "reason" in fam.samples[0].labels:
            assert len(fam.samples) <= (labels + 2) * len(REASONS)
    assert "other" in {s.labels["comm"] for s in fams["khmon_process_scans"].samples}
    overflow = fams["khmon_process_label_overflow"].samples[0].value
    assert overflow == snaps[-1].report["model"]["process_label_overflow"] > 0


def test_no_family_is_labelled_by_pid_or_address() -> None:
    m, snaps = _snapshots(comms=NASTY)
    for fam in _collect(snaps[-1], m.header):
        for s in fam.samples:
            assert not {"pid", "address", "mm", "pmd", "tid"} & set(s.labels), (fam.name, s)


def test_every_series_is_there_from_the_first_snapshot_and_never_goes_down() -> None:
    m, snaps = _snapshots(comms=NASTY)
    first = _samples_of(_collect(snaps[0], m.header))
    before = first
    for snap in snaps[1:]:
        now = _samples_of(_collect(snap, m.header))
        for key, v in before.items():
            if key[0].endswith(("_total", "_bucket", "_count", "_sum")):
                assert key in now, f"{key} disappeared"
                assert now[key] >= v, f"{key} went down: {v} -> {now[key]}"
        before = now
    # collapse attempts: every kind x order x status of this kernel from the start, at 0
    attempts = {k for k in first if k[0] == "khmon_collapse_attempts_total"}
    kinds = Counter(dict(k[1])["kind"] for k in attempts)
    col = next(lay for lay in m.layouts if lay.name == "mm_collapse_huge_page")
    statuses = len(set(col.fmt.symbols["status"].values()))
    assert kinds["anon"] == 8 * statuses  # orders 2..9 on 7.2
    assert kinds["function"] == 8 * len(set(
        next(lay for lay in m.layouts if lay.name == "fn_collapse").fmt.symbols["result"].values()))
    assert dict(before)[("khmon_collapse_attempts_total", (("kind", "anon"), ("order", "9"),
                                                           ("status", "succeeded")))] > 0


def _samples_of(metrics: list[Metric]) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for fam in metrics:
        out.update(_samples(fam))
    return out


def test_collapse_counts_follow_the_report() -> None:
    m, snaps = _snapshots()
    r = snaps[-1].report
    got = _samples(_families(_collect(snaps[-1], m.header))["khmon_collapse_attempts"])
    for order, o in r["collapse"]["by_order"].items():
        for status, n in o["by_status"].items():
            key = ("khmon_collapse_attempts_total",
                   (("kind", "anon"), ("order", order), ("status", status)))
            assert got[key] == n
    fn = r["functions"]["collapse_huge_page"]
    assert sum(v for (name, lab), v in got.items() if dict(lab)["kind"] == "function") \
        == fn["calls"]
    wasted = _samples(_families(_collect(snaps[-1], m.header))["khmon_wasted_attempts"])
    assert {dict(lab)["reason"] for _n, lab in wasted} == set(REASONS)
    assert wasted[("khmon_wasted_attempts_total", (("reason", "uffd_isolate"),))] \
        == r["wasted"]["by_reason"]["uffd_isolate"]["attempts"] > 0


def test_duration_histogram_is_cumulative_with_fixed_buckets() -> None:
    m, snaps = _snapshots()
    fam = _families(_collect(snaps[-1], m.header))["khmon_collapse_duration_seconds"]
    chp = snaps[-1].report["functions"]["collapse_huge_page"]
    by_series: dict[tuple, list[tuple[float, float]]] = {}
    counts, sums = {}, {}
    for s in fam.samples:
        key = (s.labels["order"], s.labels["outcome"])
        if s.name.endswith("_bucket"):
            by_series.setdefault(key, []).append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            counts[key] = s.value
        elif s.name.endswith("_sum"):
            sums[key] = s.value
    assert by_series
    for key, buckets in by_series.items():
        assert len(buckets) == len(DURATION_BOUNDS_LOG2) + 1  # fixed bounds and +Inf
        values = [v for _le, v in buckets]
        assert values == sorted(values) and buckets[-1][0] == float("inf")
        assert values[-1] == counts[key]
        order, outcome = key
        o = chp["by_order"][order]
        n = o["succeeded"] if outcome == "succeeded" else o["calls"] - o["succeeded"]
        assert counts[key] == n
        want = o["succeeded_seconds"] if outcome == "succeeded" \
            else o["seconds"] - o["succeeded_seconds"]
        assert sums[key] == pytest.approx(want)
    # the synthetic failures took 900 ns (bucket 9: below 2^10 ns, so in every bucket)
    fails = by_series[("2", "failed")]
    assert fails[0][1] == counts[("2", "failed")]


def test_no_created_series_and_probe_kinds() -> None:
    m, snaps = _snapshots()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Timed({"snapshot": SnapshotCollector(lambda: snaps[-1],
                                                      DaemonFacts(m.header, "x")),
                        "kernel": KernelCollector()}))
    text = generate_latest(reg).decode()
    assert "_created" not in text
    assert 'khmon_scrape_collector_success{collector="snapshot"} 1.0' in text
    kinds = probe_kinds(m.header)
    assert kinds["fn_collapse"] == "function"  # the synthetic header names no mode
    assert kinds["mm_collapse_huge_page"] == "tracepoint"
    assert bitmap_source(m.header) == "kernel"  # 7.2: collapse_control's mthp_present_ptes


def test_before_the_first_snapshot_only_build_info() -> None:
    m, _ = _snapshots(seconds=1)
    fams = list(SnapshotCollector(lambda: None, DaemonFacts(m.header, "0.26.0")).collect())
    assert [f.name for f in fams] == ["khmon_build_info"]
