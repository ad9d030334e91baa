"""tests/support/grafana.py stands in for Grafana when the live tests expand a dashboard's
variables, so its arithmetic and escaping are pinned here against what Grafana does (FACTS.md:
$__rate_interval is max($__interval + scrape interval, 4 x scrape interval), 4s at a 1 s
scrape), and the multi-value form is parsed by Prometheus's parser, which the live run with
one daemon never exercises."""

from __future__ import annotations

import promql_parser as pp
import pytest

from tests.support import grafana
from tests.support.promql import matchers, selectors


@pytest.mark.parametrize(("range_s", "scrape_s", "points", "interval", "rate"), [
    (60, 1, 500, "1s", "4s"),  # 120 ms rounds to 100 ms, below the 1 s minimum
    (3600, 1, 500, "5s", "6s"),  # 7.2 s rounds to 5 s
    (3600, 15, 500, "15s", "1m0s"),  # 4 x 15 s
    (86400, 15, 500, "2m", "2m15s"),  # 172.8 s rounds to 2 m
    (7 * 86400, 5, 1000, "10m", "10m5s"),
])
def test_intervals(range_s: float, scrape_s: float, points: int, interval: str, rate: str) -> None:
    ctx = grafana.Context(range_s=range_s, scrape_s=scrape_s, max_points=points)
    assert grafana.expand("$__interval $__rate_interval", ctx) == f"{interval} {rate}"
    assert grafana.expand("${__range}", ctx) == f"{range_s}s"


def test_durations_as_grafana_writes_them() -> None:
    assert [grafana.go_duration(ms) for ms in (500, 4000, 61000, 3600000, 1500)] == [
        "500ms", "4s", "1m1s", "1h0m0s", "1.5s"]
    assert [grafana.format_interval(ms) for ms in (900, 1000, 90000, 7200000)] == ["900ms", "1s", "1m", "2h"]


def test_values_in_a_regex_matcher() -> None:
    """One value, several values and All, as Prometheus receives them and reads them."""
    expr = 'up{job=~"$job",instance=~"$instance"}'
    one = grafana.Context(60, 1, 100, values={"job": ["khmon"], "instance": ["127.0.0.1:10464"]})
    many = grafana.Context(60, 1, 100, values={"job": grafana.ALL, "instance": ["a:1", "b.c:2"]},
                           all_values={"job": ".+"})
    assert grafana.expand(expr, one) == r'up{job=~"khmon",instance=~"127\\.0\\.0\\.1:10464"}'
    assert grafana.expand(expr, many) == r'up{job=~".+",instance=~"(a:1|b\\.c:2)"}'
    for ctx, want in ((one, r"127\.0\.0\.1:10464"), (many, r"(a:1|b\.c:2)")):
        ((s, _),) = list(selectors(pp.parse(grafana.expand(expr, ctx))))
        assert matchers(s)["instance"] == (pp.MatchOp.Re, want)


def test_an_unknown_variable_is_an_error() -> None:
    with pytest.raises(KeyError):
        grafana.expand("rate(x[$__rate_intervall])", grafana.Context(60, 1, 100))


def test_label_values_queries() -> None:
    assert grafana.label_values_query('label_values(khmon_build_info{job=~"$job"}, instance)') == (
        'khmon_build_info{job=~"$job"}', "instance")
    assert grafana.label_values_query("label_values(job)") == (None, "job")
