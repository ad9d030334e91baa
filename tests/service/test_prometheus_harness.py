"""The Prometheus harness against real servers: a real prometheus_client exporter in this process,
scraped every second by the real Prometheus 2.42, checked through Prometheus's HTTP API and promtool.

One Prometheus serves the module (Prometheus 2.42 makes its first scrape about 5 s after start:
its discovery manager passes targets on at most every 5 s, and no flag changes that). It scrapes
a plain exporter whose counter the fixture increments a known number of times, and one TLS exporter
three ways (skip-verify, the certificate as CA, and unverified, which must fail).
"""

from __future__ import annotations

import math
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import promql_parser
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from tests.support import prometheus as harness
from tests.support.exporter import serve
from tests.support.prometheus import (
    Prometheus,
    PrometheusMissing,
    PrometheusStartError,
    QueryError,
    Target,
    promtool,
    values,
)

METRIC = "khmon_test_events_total"
FIRST, SECOND = 5, 7  # one inc(5), a scrape, then seven inc(): the series steps 0 -> 5 -> ... -> 12
RULES = textwrap.dedent(f"""\
    groups:
      - name: harness
        rules:
          - record: job:khmon_test_events:increase1h
            expr: increase({METRIC}[1h])
          - alert: KhmonTestEventsSeen
            expr: {METRIC} >= {FIRST + SECOND}
            labels:
              severity: info
            annotations:
              summary: "{{{{ $value }}}} test events"
    """)


@dataclass
class Stack:
    prom: Prometheus
    address: str  # the plain exporter
    tls_address: str
    exposition: str  # what the plain exporter served over HTTP at the end of set-up
    last_sample: float  # Prometheus's timestamp of the first sample reading FIRST + SECOND
    started: float  # time.time() just before Prometheus started


def _self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("harness")
    cert, key = _self_signed(tmp)
    rules = tmp / "rules.yml"
    rules.write_text(RULES)
    registry = CollectorRegistry()
    counter = Counter("khmon_test_events", "Events counted by the test.", registry=registry)
    with serve(registry) as address, serve(CollectorRegistry(), certfile=cert, keyfile=key) as tls_address:
        targets = [
            Target(address, job="plain"),
            Target(tls_address, job="tls-skip", scheme="https", insecure_skip_verify=True),
            Target(tls_address, job="tls-ca", scheme="https", ca_file=cert),
            Target(tls_address, job="tls-unverified", scheme="https"),
        ]
        started = time.time()
        with Prometheus(targets, scrape_interval=1.0, rule_files=[rules]) as prom:
            prom.wait_for_scrapes(2, job="plain")  # two samples of 0 first
            counter.inc(FIRST)
            prom.wait_for(f"{METRIC} == {FIRST}")
            for _ in range(SECOND):
                counter.inc()
            prom.wait_for(f"{METRIC} == {FIRST + SECOND}")
            last = prom.value(f"timestamp({METRIC})")
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
                exposition = r.read().decode()
            yield Stack(prom, address, tls_address, exposition, last, started)


def test_raw_value_and_increase_equal_the_known_count(stack: Stack) -> None:
    prom = stack.prom
    assert prom.value(METRIC) == FIRST + SECOND
    # Evaluated at the last sample's own timestamp, increase() has nothing to extrapolate: the
    # series starts at 0 (no extrapolation before it) and ends at the evaluation time.
    assert prom.value(f"increase({METRIC}[1h])", at=stack.last_sample) == pytest.approx(FIRST + SECOND)
    # Steps count from the start: start a whole number of steps before the last sample to end on it.
    start = stack.last_sample - math.ceil(stack.last_sample - stack.started)
    series = prom.query_range(METRIC, start=start, end=stack.last_sample, step=1.0)
    assert len(series) == 1
    seen = [float(v) for _, v in series[0]["values"]]
    assert seen[0] == 0 and seen[-1] == FIRST + SECOND
    assert seen == sorted(seen) and FIRST in seen, seen  # a counter, and a scrape saw the first step
    assert series[0]["metric"] == {"__name__": METRIC, "job": "plain", "instance": stack.address}


def test_metric_names_and_targets(stack: Stack) -> None:
    prom = stack.prom
    names = prom.label_values("__name__")
    assert METRIC in names
    assert "khmon_test_events_created" in names  # a live Counter object adds _created
    plain = [t for t in prom.targets() if t["labels"]["job"] == "plain"]
    assert [(t["health"], t["lastError"]) for t in plain] == [("up", "")]
    assert values(prom.series(f'{{__name__="{METRIC}"}}'), "job") == ["plain"]


def test_tls_targets(stack: Stack) -> None:
    prom = stack.prom
    prom.wait_for_scrapes(1, job="tls-skip")
    prom.wait_for_scrapes(1, job="tls-ca")
    bad = prom.wait_for(lambda: [t for t in prom.targets()
                                 if t["labels"]["job"] == "tls-unverified" and t["health"] == "down"])
    assert "certificate" in bad[0]["lastError"], bad[0]["lastError"]
    assert all(t["scrapeUrl"].startswith("https://") for t in prom.targets() if t["labels"]["job"] != "plain")


def test_rules_and_alerts(stack: Stack) -> None:
    prom = stack.prom
    firing = prom.wait_for(lambda: [a for a in prom.alerts() if a["state"] == "firing"])
    assert firing[0]["labels"]["alertname"] == "KhmonTestEventsSeen"
    assert firing[0]["labels"]["severity"] == "info"
    assert firing[0]["annotations"]["summary"] == f"{FIRST + SECOND} test events"
    rules = [r for g in prom.rules() for r in g["rules"]]
    assert {r["name"]: r["health"] for r in rules} == {
        "job:khmon_test_events:increase1h": "ok", "KhmonTestEventsSeen": "ok"}
    prom.wait_for("job:khmon_test_events:increase1h > 0")


def test_unexpanded_rate_interval_is_bad_data(stack: Stack) -> None:
    # A dashboard query sent as Grafana stores it, before Grafana expands $__rate_interval.
    with pytest.raises(QueryError) as e:
        stack.prom.query(f"rate({METRIC}[$__rate_interval])")
    assert e.value.error_type == "bad_data"
    assert "parse error" in e.value.error
    assert f"1:{len('rate(' + METRIC + '[') + 1}" in e.value.error  # where: the "$"
    # A misspelt metric is no error at all, only an empty result: tests must assert on values.
    assert stack.prom.query("khmon_test_evnets_total") == []


@pytest.mark.parametrize("expr, valid", [
    (f"sum by (job) (rate({METRIC}[5m]))", True),
    ("histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))", True),
    (f"{METRIC} offset 5m", True),
    (f"max_over_time({METRIC}[5m:1s])", True),
    ('label_replace(up, "a", "$1", "job", "(.*)")', True),
    (f"{METRIC} == bool 1", True),
    (f"rate({METRIC}[$__rate_interval])", False),
    (f"rate({METRIC}[5m]", False),
    (f"rate({METRIC})", False),
    (f"{METRIC}[5m] + 1", False),
    ("nosuchfunc(up)", False),
    ('up{job=~"("}', False),
    ("topk(up, up)", False),
])
def test_promql_parser_agrees_with_prometheus(stack: Stack, expr: str, valid: bool) -> None:
    """promql-parser (the offline check for dashboards and rules) accepts what Prometheus 2.42
    accepts and rejects what it rejects with bad_data."""
    try:
        promql_parser.parse(expr)
        parser_ok = True
    except ValueError:
        parser_ok = False
    try:
        stack.prom.query(expr)
        prometheus_ok = True
    except QueryError as e:
        assert e.error_type == "bad_data", e
        prometheus_ok = False
    assert (parser_ok, prometheus_ok) == (valid, valid)


def test_promtool_check_metrics(stack: Stack) -> None:
    rc, out, err = promtool("check", "metrics", stdin=stack.exposition)
    assert rc == 0, (out, err)
    assert METRIC in stack.exposition
    registry = CollectorRegistry()
    Counter("khmon_direct_events", "Counted.", registry=registry).inc()
    assert promtool("check", "metrics", stdin=generate_latest(registry))[0] == 0
    no_total = "# HELP khmon_events Events.\n# TYPE khmon_events counter\nkhmon_events 1\n"
    rc, out, err = promtool("check", "metrics", stdin=no_total)
    assert rc == 3, (rc, out, err)  # 3: lint problems found
    assert '"_total" suffix' in out + err


def test_promtool_check_rules(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(RULES)
    bad.write_text(RULES.replace(f"increase({METRIC}[1h])", f"increase({METRIC}[$__rate_interval])"))
    rc, out, err = promtool("check", "rules", str(good))
    assert rc == 0, (out, err)
    assert "SUCCESS: 2 rules found" in out
    rc, out, err = promtool("check", "rules", str(bad))
    assert rc == 1 and "parse error" in out + err, (rc, out, err)


def test_start_failure_carries_prometheus_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(RULES.replace(f"increase({METRIC}[1h])", f"increase({METRIC}[$__rate_interval])"))
    prom = Prometheus(["127.0.0.1:1"], rule_files=[bad])
    with pytest.raises(PrometheusStartError) as e:
        prom.start()
    assert "$__rate_interval" in str(e.value) or "parse error" in str(e.value), str(e.value)
    assert str(bad) in str(e.value)  # Prometheus names the rule file
    assert not prom.running and prom.directory is None


def test_stopped_and_removed_when_the_test_fails() -> None:
    prom = Prometheus(["127.0.0.1:1"])
    with pytest.raises(ZeroDivisionError), prom:
        directory = prom.directory
        assert directory is not None and directory.is_dir() and prom.running
        url = prom.url
        _ = 1 / 0
    assert not prom.running
    assert not directory.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/-/ready", timeout=2)


def test_missing_binaries_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the unpacked binaries the tests fail (never skip) and say what to run."""
    monkeypatch.setattr(harness, "PROMETHEUS_DIR", tmp_path)
    with pytest.raises(PrometheusMissing, match="run `make setup`"):
        Prometheus(["127.0.0.1:1"]).start()
    with pytest.raises(PrometheusMissing, match="promtool is missing"):
        promtool("--version")
