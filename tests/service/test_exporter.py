"""The exporter's exposition, in both formats, as Prometheus's own tools judge it: promtool
check metrics on the text format, prometheus_client's strict OpenMetrics parser on the
other, and the real Prometheus 2.42 scraping the collectors over HTTP (it asks for
OpenMetrics first), counting what the snapshot holds. No root, no BPF: the collectors read
snapshots of a real Model fed the synthetic 7.2 stream of tests/unit, and this machine's
sysfs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as om
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from khmon.model.model import Snapshot
from khmon.outputs.metrics import DaemonFacts, KernelCollector, SnapshotCollector, Timed
from tests.support.exporter import serve
from tests.support.prometheus import Prometheus, promtool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from metricsdata import NASTY, snapshots

LABELS = 8


@pytest.fixture(scope="module")
def snapshot() -> tuple[dict, Snapshot]:
    comms = NASTY + [f"job-{i}".encode() for i in range(20)]  # the odd ones get labels
    m, snaps = snapshots(labels=LABELS, comms=comms, seconds=10)
    return m.header, snaps[-1]


@pytest.fixture(scope="module")
def registry(snapshot: tuple[dict, Snapshot]) -> CollectorRegistry:
    header, snap = snapshot
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Timed({"snapshot": SnapshotCollector(lambda: snap, DaemonFacts(header, "0.26.0")),
                        "kernel": KernelCollector()}))
    return reg


def test_text_format_passes_promtool(registry: CollectorRegistry) -> None:
    text = generate_latest(registry).decode()
    rc, out, err = promtool("check", "metrics", stdin=text)
    assert rc == 0, out + err
    assert "khmon_collapse_attempts_total{" in text and "_created" not in text


def test_openmetrics_format_parses_strictly(registry: CollectorRegistry) -> None:
    text = om.generate_latest(registry).decode()
    assert text.endswith("# EOF\n") and "_created" not in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["khmon_collapse_attempts"].type == "counter"
    assert fams["khmon_collapse_duration_seconds"].type == "histogram"
    assert fams["khmon_build_info"].type == "gauge"


@pytest.fixture(scope="module")
def scraped(registry: CollectorRegistry) -> Iterator[Prometheus]:
    with serve(registry) as address, Prometheus([address], scrape_interval=1.0) as prom:
        prom.wait_for_scrapes(2)
        yield prom


def test_prometheus_scrapes_what_the_snapshot_holds(scraped: Prometheus,
                                                    snapshot: tuple[dict, Snapshot]) -> None:
    r = snapshot[1].report
    assert scraped.value('sum(khmon_collapse_attempts_total{kind="anon"})') \
        == r["collapse"]["attempts"]
    assert scraped.value('khmon_wasted_attempts_total{reason="uffd_isolate"}') \
        == r["wasted"]["by_reason"]["uffd_isolate"]["attempts"]
    assert scraped.value("sum(khmon_process_scans_total)") \
        == sum(row["scans"] for row in r["by_comm"].values())
    comms = scraped.label_values("comm")
    assert len(comms) <= LABELS + 2 and "other" in comms
    assert 'a"b\\c' in comms  # a comm with a quote and a backslash, escaped and back
    # the histogram works with PromQL's own functions
    q = scraped.value('histogram_quantile(0.5, sum by (le) '
                      '(khmon_collapse_duration_seconds_bucket{outcome="failed"}))')
    assert 0 < q <= 2 ** 10 / 1e9  # every synthetic failure took 900 ns
