"""The exporter's collectors (khmon.outputs.metrics) on snapshots of a real Model fed a
synthetic 7.2 stream: label budgets whatever comms the stream holds, successes and scan
verdicts there from the start, no series going down or away, the histogram cumulative, no
pid or PMD label, no _created.

The exposition checked by promtool and scraped by a real Prometheus is in
tests/service/test_exporter.py; the live daemon in tests/daemon."""

from __future__ import annotations

import pytest
from metricsdata import NASTY, snapshots
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from khmon.model.model import Snapshot
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


def _collect(snap: Snapshot, header: dict) -> list[Metric]:
    return list(SnapshotCollector(lambda: snap, DaemonFacts(header, "0.26.0")).collect())


def _families(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


def _samples(fam: Metric) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}


@pytest.mark.parametrize("labels", [1, 4, 32])
def test_comm_label_budget_holds_whatever_comms_the_stream_has(labels: int) -> None:
    comms = [f"c{i}".encode() for i in range(50)] + NASTY
    m, snaps = snapshots(labels, comms, seconds=14)
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
    m, snaps = snapshots(comms=NASTY)
    for fam in _collect(snaps[-1], m.header):
        for s in fam.samples:
            assert not {"pid", "address", "mm", "pmd", "tid"} & set(s.labels), (fam.name, s)


def test_no_series_goes_down_or_away_and_successes_start_at_zero() -> None:
    m, snaps = snapshots(comms=NASTY)
    first = _samples_of(_collect(snaps[0], m.header))
    before = first
    for snap in snaps[1:]:
        now = _samples_of(_collect(snap, m.header))
        for key, v in before.items():
            if key[0].endswith(("_total", "_bucket", "_count", "_sum")):
                assert key in now, f"{key} disappeared"
                assert now[key] >= v, f"{key} went down: {v} -> {now[key]}"
        before = now
    # collapse successes: every kind and order of this kernel from the start, at 0; and
    # every scan verdict of the format file
    ok = {dict(k[1])["kind"]: [] for k in first if k[0] == "khmon_collapse_attempts_total"}
    for k in first:
        labels = dict(k[1])
        if k[0] == "khmon_collapse_attempts_total" and labels["status"] == "succeeded":
            ok[labels["kind"]].append(labels["order"])
    assert sorted(ok["anon"], key=int) == [str(o) for o in range(2, 10)]  # 7.2: an order field
    assert sorted(ok["function"], key=int) == [str(o) for o in range(2, 10)]
    assert ok["file"] == ["9"]
    scan = next(lay for lay in m.layouts if lay.name == "mm_khugepaged_scan_pmd")
    assert len([k for k in first if k[0] == "khmon_scan_pmd_total"]) \
        == len(set(scan.fmt.symbols["status"].values()))
    assert dict(before)[("khmon_collapse_attempts_total", (("kind", "anon"), ("order", "9"),
                                                           ("status", "succeeded")))] > 0


def _samples_of(metrics: list[Metric]) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for fam in metrics:
        out.update(_samples(fam))
    return out


def test_collapse_counts_follow_the_report() -> None:
    m, snaps = snapshots()
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
    m, snaps = snapshots()
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
    m, snaps = snapshots()
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
    m, _ = snapshots(seconds=1)
    fams = list(SnapshotCollector(lambda: None, DaemonFacts(m.header, "0.26.0")).collect())
    assert [f.name for f in fams] == ["khmon_build_info"]
