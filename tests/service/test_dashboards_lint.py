"""dashboard-linter's rules, as tests, on the dashboards khmon ships (dashboards/*.json).

grafana/dashboard-linter is Go and cannot be installed here, so its rules are written out: the
templated data source, job and instance variables, the panel and target rules, and khmon's own
(documented metrics only, waste never summed across reasons, maxDataPoints wherever an interval
is used). Every expression is parsed by promql-parser (Prometheus's parser) after expanding the
variables as Grafana does (tests/support/grafana.py), with sentinel values that let the rules see
which range and which matcher came from which variable.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import promql_parser as pp
import pytest

from tests.support import grafana
from tests.support.promql import (
    documented_families,
    function_name,
    matchers,
    metric_names,
    metric_type,
    nodes,
    selectors,
)

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "dashboards").glob("*.json"))
UIDS = {"khmon-overview.json": "khmon-overview", "khmon-host.json": "khmon-host"}
FAMILIES = documented_families()

# Sentinels: a time range and an odd scrape interval (7 s) whose $__rate_interval (28s) and
# $__range (5399s) are durations no fixed range in a khmon query is (dashboard-linter expands
# variables to "magic" values for the same reason).
SENTINEL = grafana.Context(range_s=5399, scrape_s=7, max_points=100000,
                           values={"job": ["KHMONJOB"], "instance": ["KHMONINSTANCE"]})
RATE_INTERVAL = timedelta(milliseconds=SENTINEL.rate_interval_ms)
RANGE = timedelta(seconds=round(SENTINEL.range_s))
# dashboard-linter's panel-units-rule list, the part that a khmon panel could use.
UNITS = {"none", "short", "percent", "percentunit", "bytes", "decbytes", "bits", "Bps", "binBps", "s",
         "ms", "µs", "ns", "ops", "cps", "reqps", "rps", "wps", "iops", "bool", "bool_yes_no",
         "bool_on_off", "dtdurations", "dateTimeAsIso"}


def _load(f: Path) -> dict[str, Any]:
    return json.loads(f.read_text())


DOCS = {f.name: _load(f) for f in FILES}
TARGETS = [t for d in DOCS.values() for t in grafana.targets(d)]
ANNOTATIONS = [(d["uid"], a) for d in DOCS.values() for a in grafana.prometheus_annotations(d)]


def parse(expr: str) -> object:
    return pp.parse(grafana.expand(expr, SENTINEL))


def test_the_dashboards_are_there() -> None:
    assert sorted(DOCS) == sorted(UIDS)
    assert len(TARGETS) > 60


@pytest.mark.parametrize("name", sorted(UIDS))
def test_fixed_uid_uneditable_and_unique_ids(name: str) -> None:
    d = DOCS[name]
    assert d["uid"] == UIDS[name]
    assert d["editable"] is False  # uneditable rule: the JSON in git is the source
    ids = [p["id"] for p in d["panels"]] + [p["id"] for r in grafana.rows(d) for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)


@pytest.mark.parametrize("name", sorted(UIDS))
def test_template_datasource_rule(name: str) -> None:
    ds = [v for v in DOCS[name]["templating"]["list"] if v["type"] == "datasource"]
    assert len(ds) == 1
    assert (ds[0]["name"], ds[0]["label"], ds[0]["query"]) == ("datasource", "Data source", "prometheus")


@pytest.mark.parametrize("name", sorted(UIDS))
@pytest.mark.parametrize("var", ["job", "instance"])
def test_template_job_and_instance_rules(name: str, var: str) -> None:
    v = grafana.variables(DOCS[name])[var]
    assert v["type"] == "query"
    assert v["label"] == var.title()
    assert v["datasource"]["uid"] in ("$datasource", "${datasource}")
    assert v["multi"] is True and v["includeAll"] is True and v["allValue"] == ".+"
    assert v["refresh"] == 2  # template-on-time-change-reload-rule: on time range change
    match, label = grafana.label_values_query(v["query"])
    assert label == var
    assert match is not None and metric_names(parse(match)) == {"khmon_build_info"}


@pytest.mark.parametrize("name", sorted(UIDS))
def test_every_panel_has_a_title_description_unit_and_targets(name: str) -> None:
    for p in grafana.panels(DOCS[name]):
        assert p["title"].strip() and p.get("description", "").strip(), p["title"]
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit in UNITS, (p["title"], unit)
        for o in p["fieldConfig"].get("overrides", []):
            for prop in o["properties"]:
                if prop["id"] == "unit":
                    assert prop["value"] in UNITS, (p["title"], prop)
        assert p.get("targets"), p["title"]  # panel-no-targets-rule


@pytest.mark.parametrize("name", sorted(UIDS))
def test_panel_datasource_rule(name: str) -> None:
    for p in grafana.panels(DOCS[name]):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", (p["title"], t["refId"])
    for a in grafana.prometheus_annotations(DOCS[name]):
        assert a["datasource"]["uid"] == a["target"]["datasource"]["uid"] == "${datasource}", a["name"]


def _all_queries() -> list[tuple[str, str]]:
    return [(t.name, t.expr) for t in TARGETS] + [(f"{uid} annotation {a['name']}", a["target"]["expr"])
                                                  for uid, a in ANNOTATIONS]


def target_problems(expr: str) -> list[str]:
    """What dashboard-linter's target-promql, target-job-instance, target-rate-interval and
    target-counter-agg rules, and khmon's waste rule, find wrong with one query."""
    try:
        tree = parse(expr)
    except (ValueError, RuntimeError) as e:  # what Prometheus would refuse with bad_data
        return [f"does not parse: {e}"]
    out = []
    for s, parents in selectors(tree):
        m = matchers(s)
        want = ((pp.MatchOp.Re, "KHMONJOB"), (pp.MatchOp.Re, "KHMONINSTANCE"))
        if (m.get("job"), m.get("instance")) != want:
            out.append(f'{s.name} lacks job=~"$job",instance=~"$instance"')
        kind = metric_type(s.name, FAMILIES)
        if kind is None:
            out.append(f"{s.name} is not in docs/metrics.md")
        elif kind in ("counter", "histogram") and not (
                len(parents) >= 2 and isinstance(parents[-1], pp.MatrixSelector)
                and function_name(parents[-2]) in ("rate", "irate", "increase")):
            out.append(f"counter {s.name} is not inside rate/irate/increase")
        if "wasted" in s.name:
            # Waste reasons overlap (docs/metrics.md): every aggregation above keeps `reason`.
            for a in parents:
                if isinstance(a, pp.AggregateExpr) and (
                        a.modifier is None
                        or ("reason" in a.modifier.labels) != (a.modifier.type == pp.AggModifierType.By)):
                    out.append(f"{s.name} is summed across reasons by {a.op}")
        if s.offset is not None and abs(s.offset) != RATE_INTERVAL:
            out.append(f"{s.name} has an offset other than $__rate_interval")
    for n, parents in nodes(tree):
        if isinstance(n, pp.MatrixSelector):
            fn = function_name(parents[-1]) if parents else None
            if fn in ("rate", "irate") and n.range != RATE_INTERVAL:
                out.append(f"{fn}() over {n.range}, not $__rate_interval")
            elif n.range not in (RATE_INTERVAL, RANGE):
                out.append(f"{fn}() over a fixed range {n.range}")
    return out


@pytest.mark.parametrize(("where", "expr"), _all_queries(), ids=[w for w, _ in _all_queries()])
def test_target_rules(where: str, expr: str) -> None:
    assert target_problems(expr) == [], where


M = 'job=~"$job",instance=~"$instance"'


@pytest.mark.parametrize(("expr", "problem"), [
    (f"rate(khmon_scan_pmd_total{{{M}}}[$__rate_interval])", None),
    (f"rate(khmon_scan_pmd_total{{{M}}}[5m])", "rate() over 0:05:00, not $__rate_interval"),
    (f"rate(khmon_scan_pmd_total{{{M}}}[$__range])", "not $__rate_interval"),
    (f"increase(khmon_scan_pmd_total{{{M}}}[1h])", "increase() over a fixed range"),
    (f"khmon_scan_pmd_total{{{M}}}", "counter khmon_scan_pmd_total is not inside"),
    (f"max_over_time(khmon_scan_pmd_total{{{M}}}[$__rate_interval])", "is not inside rate"),
    ('rate(khmon_scan_pmd_total{job=~"$job"}[$__rate_interval])', "lacks job"),
    (f"rate(khmon_scans_total{{{M}}}[$__rate_interval])", "khmon_scans_total is not in docs/metrics.md"),
    (f"sum(rate(khmon_wasted_bytes_total{{{M}}}[$__rate_interval]))", "summed across reasons by sum"),
    (f"sum without (reason) (rate(khmon_wasted_bytes_total{{{M}}}[$__rate_interval]))", "summed across"),
    (f"sum by (reason) (rate(khmon_wasted_bytes_total{{{M}}}[$__rate_interval]))", None),
    (f"rate(khmon_scan_pmd_total{{{M}}}[$__rate_interval]", "does not parse"),
    (f"rate(khmon_scan_pmd_total{{{M}}}[$__rate_intervall])", "variable"),
])
def test_the_rules_catch_what_they_must(expr: str, problem: str | None) -> None:
    """Each rule against a query that breaks it (and ones that do not)."""
    if problem == "variable":  # a misspelt variable: Grafana would leave it, Prometheus refuse it
        with pytest.raises(KeyError):
            target_problems(expr)
        return
    found = target_problems(expr)
    if problem is None:
        assert found == []
    else:
        assert any(problem in f for f in found), found


def test_intervals_are_deterministic() -> None:
    """A panel using $__interval or $__rate_interval sets maxDataPoints: otherwise Grafana derives
    the interval from the panel's width in the browser, and no test could expand it."""
    for t in TARGETS:
        if "$__interval" in t.expr or "$__rate_interval" in t.expr:
            assert t.max_points, t.name
        assert t.fmt in ("time_series", "table", "heatmap"), t.name
        if t.panel["type"] in ("table", "bargauge"):
            assert t.instant, f"{t.name}: tables and bar gauges read the end of the range"


def test_templated_metric_names_are_kernel_counters() -> None:
    """khmon_vmstat_thp_<name>_total and khmon_mthp_<stat>_total match any name in docs/metrics.md:
    the stat names the dashboards use must be real counters of the kernels khmon runs on."""
    vmstat = {line.split()[0] for line in Path("/proc/vmstat").read_text().splitlines()}
    mthp = {p.name for p in Path("/sys/kernel/mm/transparent_hugepage").glob("hugepages-*kB/stats/*")}
    # Added by the mTHP collapse series (Linux 7.2; FACTS.md), absent from the host kernel.
    mthp |= {"collapse_alloc", "collapse_alloc_failed", "collapse_exceed_none_pte",
             "collapse_exceed_swap_pte", "collapse_exceed_shared_pte"}
    used = {n for _, e in _all_queries() for n in metric_names(parse(e))}
    for n in sorted(used):
        if n.startswith("khmon_vmstat_"):
            assert n.removeprefix("khmon_vmstat_").removesuffix("_total") in vmstat, n
        elif n.startswith("khmon_mthp_") and n.endswith("_total"):
            assert n.removeprefix("khmon_mthp_").removesuffix("_total") in mthp, n


def test_sentinels_are_what_the_rules_assume() -> None:
    """The rules above tell $__rate_interval from $__range by value: they must differ."""
    assert RATE_INTERVAL != RANGE
    assert grafana.expand("x[$__rate_interval] x[$__range]", SENTINEL) == (
        f"x[{grafana.go_duration(SENTINEL.rate_interval_ms)}] x[{round(SENTINEL.range_s)}s]")
