"""Every query the dashboards and alerts ship, run against a real Prometheus scraping the real
`khmon daemon` while real khugepaged scans, collapses and refuses real PMDs.

One daemon and one Prometheus (1 s scrape, the alert rules loaded) serve the module. While
they run, three workloads make known work: 16 fully populated PMDs (collapsed), 8 half-empty
ones under max_ptes_none 255 (refused at the scan), then 2 userfaultfd-armed PMDs with every
4th page empty and mTHP orders 4..9 enabled (the uffd_isolate waste, where the kernel has the
mTHP collapse series; refused at the scan before it). Then every panel target, variable and
annotation runs with $__rate_interval, $__interval, $__range, $job and $instance expanded as
Grafana expands them (tests/support/grafana.py), for All and for this daemon selected, and
must succeed with data. A target that needs what the kernel lacks (function probes, the order
field, a per-size counter: its spec says so, dashboards/panels.py) may be empty only where the
kernel itself lacks that (checked against tracefs and sysfs, not the daemon's word), and then
passes as "not offered"; test_what_the_kernel_offers asserts the daemon's khmon_kernel_info /
khmon_feature_enabled against the kernel and against KHMON_EXPECT_TIERS. Nothing here skips.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser as pp
import pytest

from dashboards import alerts, generate, host, overview
from dashboards.panels import MTHP_SIZES
from dashboards.panels import targets as spec_targets
from khmon.kernel import sysfs
from khmon.workload import Workloads
from tests.support import grafana
from tests.support.daemon import running_daemon
from tests.support.live import UNDER_TCG
from tests.support.prometheus import Prometheus, Target
from tests.support.promql import metric_names
from tests.support.thp import mthp_knobs

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
JOB = alerts.JOB_NAME
UP = f'up{{job="{JOB}"}}'
FAST = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100"}
# 1 s on a machine. In a TCG guest a scrape of the daemon during the uffd storm took longer
# than 1 s (the scrape timeout cannot exceed the interval), leaving gaps that empty every
# 4 s window: there khmon is scraped every 5 s, as dashboards/provisioning scrapes it.
SCRAPE = 5.0 if UNDER_TCG else 1.0
WORKLOAD_TIMEOUT = 600.0 if UNDER_TCG else 120.0
SCRAPE_TIMEOUT = 240.0 if UNDER_TCG else 60.0
FORMAT = Path("/sys/kernel/tracing/events/huge_memory/mm_collapse_huge_page/format")

DOCS = {d.uid: json.loads(generate.dashboard_path(d).read_text()) for d in generate.DASHBOARDS}
TARGETS = [t for doc in DOCS.values() for t in grafana.targets(doc)]
NEEDS = {(d.uid, pid, ref): p.query_needs(q)
         for d in generate.DASHBOARDS for pid, ref, p, q in spec_targets(d)}
ANNOTATIONS = [(uid, a) for uid, doc in DOCS.items() for a in grafana.prometheus_annotations(doc)]
RAN: dict[str, list[str]] = {"data": [], "not_offered": []}  # target names, for the summary


@dataclass
class Lab:
    prom: Prometheus
    address: str  # the daemon's instance label
    start: float  # the dashboard's time range
    end: float  # the last scrape's timestamp
    before: float  # a scrape before the workloads with no collapse in flight (_quiet)
    work: list[dict[str, Any]] = field(default_factory=list)  # the workloads' own accounts

    def contexts(self, t: grafana.Target | None = None, max_points: int | None = None
                 ) -> Iterator[tuple[str, grafana.Context]]:
        """The selections a user makes: All, and this daemon. A repeated row's copy has one
        value of its variable, whatever is selected."""
        points = max_points or (t.max_points if t else None) or 1000
        for label, job, inst in (("All", grafana.ALL, grafana.ALL), ("selected", [JOB], [self.address])):
            values = {"job": job, "instance": inst}
            if t is not None and t.repeat:
                values[t.repeat] = [self.address if t.repeat == "instance" else JOB]
            yield label, grafana.Context(range_s=self.end - self.start, scrape_s=SCRAPE, max_points=points,
                                         values=values, all_values={"job": ".+", "instance": ".+"})

    def run(self, expr: str, ctx: grafana.Context,
            instant: bool) -> tuple[str, list[dict[str, Any]], list[float]]:
        """The query Grafana would send, and Prometheus's answer: (expanded expr, result, values)."""
        e = grafana.expand(expr, ctx)
        if instant:
            res = self.prom.query(e, at=self.end)
            return e, res, [float(r["value"][1]) for r in res]
        start, end = grafana.aligned(self.start, self.end, ctx.step_ms)
        res = self.prom.query_range(e, start, end, ctx.step_ms / 1000)
        return e, res, [float(v) for r in res for _, v in r["values"]]


def _workloads(prom: Prometheus, runs: list[list[str]], knobs: dict[str, str]) -> list[dict[str, Any]]:
    """Run workloads under `knobs`, which stay set for at least two scrapes first: a setting that
    lasts less than a scrape interval is in no sample, and no annotation could show it (in a
    guest a phase can be over in less than the 5 s scrape interval)."""
    work = Workloads([[*r, "--timeout", str(WORKLOAD_TIMEOUT / 2)] for r in runs])
    try:
        with sysfs.override(knobs):
            n = _scrapes(prom)
            prom.wait_for(lambda: _scrapes(prom) >= n + 2, timeout=SCRAPE_TIMEOUT)
            deadline = time.monotonic() + WORKLOAD_TIMEOUT
            while not work():
                assert time.monotonic() < deadline, f"workloads {runs} still running"
                time.sleep(0.2)
    finally:
        work.kill()
    return work.results()


def _scrapes(prom: Prometheus) -> float:
    return prom.value(f"count_over_time({UP}[1h])")


def _quiet(prom: Prometheus) -> float:
    """The timestamp of a scrape no collapse is still on its way to: neither khmon's succeeded
    collapses nor the kernel's pages_collapsed changed over the last 4 scrapes. khmon's count
    trails the kernel's by up to a snapshot, so a collapse just before a scrape is in the
    kernel's sample and not yet in khmon's. A guest's THP is `always` (khugepaged collapses the
    daemon's own heap); `madvise`, set before this, leaves only the workloads'."""
    w = f"{round(4 * SCRAPE)}s"
    succeeded = f'khmon_collapse_attempts_total{{job="{JOB}",status="succeeded"}}'
    prom.wait_for(f'(sum(changes(khmon_khugepaged_pages_collapsed_total{{job="{JOB}"}}[{w}])) '
                  f'+ (sum(changes({succeeded}[{w}])) or vector(0))) == 0 '
                  f'and on() count_over_time({UP}[{w}]) >= 4', timeout=SCRAPE_TIMEOUT)
    return prom.value(f"timestamp({UP})")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    start = time.time()
    with running_daemon() as d, Prometheus([Target(d.address, job=JOB)], scrape_interval=SCRAPE,
                                           rule_files=[ROOT / "dashboards" / "alerts.yml"]) as prom:
        # Scraped under the machine's own THP setting first, so a change to it shows.
        prom.wait_for_scrapes(3, timeout=SCRAPE_TIMEOUT)
        with sysfs.override({"enabled": "madvise"}):
            before = _quiet(prom)
            work = _workloads(prom, [["--pmds", "16", "--pattern", "full"],
                                     ["--pmds", "8", "--pattern", "first-half"]],
                              {**FAST, "khugepaged/max_ptes_none": "255", **mthp_knobs({9})})
            work += _workloads(prom, [["--pmds", "2", "--pattern", "every4th-empty", "--uffd",
                                       "--full-scans", "3"]],
                               {**FAST, "khugepaged/max_ptes_none": "511", **mthp_knobs(range(4, 10))})
            # Settled: the daemon's snapshot (once a second) and the dedup's epoch flush have caught
            # up, and $__rate_interval windows after the last change are scraped.
            n = _scrapes(prom)
            prom.wait_for(lambda: _scrapes(prom) >= n + 8, timeout=SCRAPE_TIMEOUT)
            # Every scrape succeeded: a failed one would leave gaps that empty rate windows and
            # stale instant queries (the dashboards' fault would be hidden behind the harness's).
            failed = prom.value(f"count_over_time({UP}[1h]) - sum_over_time({UP}[1h])")
            slowest = prom.value(f'max_over_time(scrape_duration_seconds{{job="{JOB}"}}[1h])')
            assert failed == 0, f"{failed:g} scrapes of the daemon failed; the slowest took {slowest:.2f} s"
            yield Lab(prom, d.address, start, prom.value(f"timestamp({UP})"), before, work)


def test_the_workloads_did_what_they_say(lab: Lab) -> None:
    """Ground truth first: the kernel collapsed the full PMDs and none of the others."""
    full, half, uffd = lab.work
    assert full["collapsed_pmds"] == 16, full
    assert half["collapsed_pmds"] == 0 and uffd["collapsed_pmds"] == 0, (half, uffd)


def _info(lab: Lab) -> dict[str, str]:
    (r,) = lab.prom.query(f'khmon_kernel_info{{instance="{lab.address}"}}', at=lab.end)
    return r["metric"]


def _feature(lab: Lab, name: str) -> float:
    return lab.prom.value(f'khmon_feature_enabled{{instance="{lab.address}",feature="{name}"}}', at=lab.end)


def offered(lab: Lab, need: str) -> tuple[bool, str]:
    """Whether this kernel and daemon offer what a target needs, and the reason if not."""
    kind, _, name = need.partition(":")
    info = _info(lab)
    where = (f"kernel {info['release']} (function_probes={info['function_probes']}, "
             f"order_field={info['order_field']})")
    if kind == "feature":
        on = _feature(lab, name) == 1
        return on, f'khmon_feature_enabled{{feature="{name}"}} is 0 on {where}'
    if kind == "kernel":
        return info[name] == "true", f"khmon_kernel_info{{{name}=\"false\"}} on {where}"
    if kind == "mthp_stat":
        return (any(sysfs.THP.glob(f"hugepages-*kB/stats/{name}")),
                f"{where} has no transparent_hugepage/hugepages-*kB/stats/{name}")
    if need == "sysfs:mthp_sizes":
        return any(sysfs.THP.glob("hugepages-*kB")), f"{where} has no mTHP sizes (hugepages-*kB)"
    raise AssertionError(f"unknown need {need!r}")


def test_what_the_kernel_offers(lab: Lab) -> None:
    """The daemon's account of the kernel, against the kernel itself and what this machine is
    known to offer (KHMON_EXPECT_TIERS, set by tests/vm/suite.sh and CI): the reason a target
    may be empty is never the daemon's word alone."""
    info = _info(lab)
    assert info["order_field"] == str("order;" in FORMAT.read_text()).lower(), info
    probes = _feature(lab, "function_probes")
    assert probes == (info["function_probes"] != "none"), info
    expected = [t for t in os.environ.get("KHMON_EXPECT_TIERS", "").split(",") if t]
    if "kfunc" in expected or "kprobe" in expected:
        assert probes == 1 and _feature(lab, "pmd_records") == 1, info
    if "tracepoints_only" in expected:
        assert probes == 0, info
    if "order" in expected:
        assert info["order_field"] == "true", info
    if "per_order_stats" in expected:
        assert offered(lab, "mthp_stat:collapse_alloc")[0]


def test_every_target_has_a_spec() -> None:
    assert {(t.dashboard, t.panel_id, t.ref) for t in TARGETS} == set(NEEDS)
    assert len(TARGETS) > 60


@pytest.mark.parametrize("t", TARGETS, ids=[t.name for t in TARGETS])
def test_panel_target_returns_data(lab: Lab, t: grafana.Target) -> None:
    need = NEEDS[(t.dashboard, t.panel_id, t.ref)]
    for label, ctx in lab.contexts(t):
        expr, res, values = lab.run(t.expr, ctx, t.instant)
        if res and any(math.isfinite(v) for v in values):
            continue
        ok, why = offered(lab, need) if need else (True, "")
        assert not ok, f"{t.name} ({label}) returned {'only NaN' if res else 'nothing'}: {expr}"
        RAN["not_offered"].append(f"{t.name} ({why})")  # empty because the kernel lacks `need`
        return
    RAN["data"].append(t.name)


@pytest.mark.parametrize(("uid", "name"), [(u, n) for u in DOCS for n in ("job", "instance")])
def test_variable_query_returns_values(lab: Lab, uid: str, name: str) -> None:
    """label_values(khmon_build_info..., label), as Grafana asks the labels API."""
    match, label = grafana.label_values_query(grafana.variables(DOCS[uid])[name]["query"])
    assert match is not None
    for _, ctx in lab.contexts():
        got = lab.prom.api(f"label/{label}/values", **{"match[]": grafana.expand(match, ctx),
                                                        "start": str(lab.start), "end": str(lab.end)})
        assert (JOB if name == "job" else lab.address) in got, (uid, name, got)


@pytest.mark.parametrize(("uid", "ann"), ANNOTATIONS, ids=[a["name"] for _, a in ANNOTATIONS])
def test_annotation_marks_the_settings_changes(lab: Lab, uid: str, ann: dict[str, Any]) -> None:
    """The run changed khugepaged's scan_sleep and max_ptes_none and the mTHP sizes' enabled:
    each annotation query finds changes."""
    for label, ctx in lab.contexts():
        expr, res, values = lab.run(ann["target"]["expr"], ctx, instant=False)
        if not (res and values):
            seen = {m: sorted({v for r in lab.prom.query_range(m, lab.start, lab.end, SCRAPE)
                               for _, v in r["values"]}) for m, _ in host.KNOBS}
            raise AssertionError(f"{ann['name']} ({label}) found nothing: {expr}\nthe knobs' values: {seen}")
    if ann["name"] == "khugepaged settings changed":
        settings = {r["metric"]["setting"] for r in res}
        assert {"scan_sleep_millisecs", "max_ptes_none"} <= settings, settings


def _query_needs() -> dict[str, set[str | None]]:
    """Each metric name the shipped queries read, and what the queries reading it need."""
    out: dict[str, set[str | None]] = {}
    sentinel = grafana.Context(range_s=3600, scrape_s=SCRAPE, max_points=100,
                               values={"job": ["j"], "instance": ["i"]})
    for t in TARGETS:
        for n in metric_names(pp.parse(grafana.expand(t.expr, sentinel))):
            out.setdefault(n, set()).add(NEEDS[(t.dashboard, t.panel_id, t.ref)])
    # Annotations and alerts have no spec; of their metrics only the per-size ones (every
    # khmon_mthp_*) need anything: a kernel with mTHP sizes (6.1 has none).
    unspecified = [grafana.expand(a["target"]["expr"], sentinel) for _, a in ANNOTATIONS]
    for expr in [*unspecified, *(rule.expr for rule in alerts.ALERTS)]:
        for n in metric_names(pp.parse(expr)):
            out.setdefault(n, set()).add(MTHP_SIZES if n.startswith("khmon_mthp_") else None)
    return out


def test_every_metric_name_exists(lab: Lab) -> None:
    """Against Prometheus's own __name__ values: a misspelt name would return success and nothing."""
    names = set(lab.prom.label_values("__name__"))
    missing = [n for n, needs in sorted(_query_needs().items())
               if n not in names and any(need is None or offered(lab, need)[0] for need in needs)]
    assert missing == []


def _panel(uid: str, title: str) -> list[grafana.Target]:
    return [t for t in TARGETS if t.dashboard == uid and t.panel_title == title]


def test_agreement_panel_series_are_equal(lab: Lab) -> None:
    """khmon's succeeded collapses and the kernel's pages_collapsed, over the window from the last
    scrape before the workloads to the end: the totals panel's two values are equal (and its
    difference 0), and both saw the 16 PMDs the workload had collapsed. Both ends of the range
    are scrape timestamps, so increase() extrapolates nothing: $__range is given to the
    millisecond (Grafana writes whole seconds, which are the same when Prometheus has aligned
    the scrapes to the interval, as it does within 2 ms of jitter, but not under TCG)."""
    span_ms = round((lab.end - lab.before) * 1000)
    # increase() counts from a series' first sample: khmon's succeeded series must already be
    # there (at 0) before the first collapse, or the first scrape's collapses would not count.
    succeeded = f'khmon_collapse_attempts_total{{instance="{lab.address}",kind="anon",status="succeeded"}}'
    assert lab.prom.query(succeeded, at=lab.before), "no succeeded series before the workloads"
    ctx = grafana.Context(range_s=span_ms / 1000, scrape_s=SCRAPE, max_points=1000,
                          values={"job": [JOB], "instance": [lab.address]})
    totals = {t.ref: lab.prom.value(grafana.expand(t.expr.replace("$__range", f"{span_ms}ms"), ctx),
                                    at=lab.end)
              for t in _panel(overview.UID, "Succeeded collapses over the range")}
    assert totals["A"] == totals["B"] and totals["C"] == 0, totals
    assert totals["A"] >= lab.work[0]["collapsed_pmds"] == 16, totals
    # The timeseries beside it: both lines are there, on the same steps, and both saw collapses.
    series = {}
    for t in _panel(overview.UID, "Succeeded collapses: khmon and the kernel's pages_collapsed"):
        (_, ctx_sel), = [c for c in lab.contexts(t) if c[0] == "selected"]
        _, res, _ = lab.run(t.expr, ctx_sel, instant=False)
        (r,) = res
        series[t.ref] = {ts: float(v) for ts, v in r["values"]}
    assert series["A"].keys() == series["B"].keys()
    assert max(series["A"].values()) > 0 and max(series["B"].values()) > 0, series


def test_alert_rules_evaluate_on_real_data(lab: Lab) -> None:
    """Every rule evaluates without error on the daemon's real series, and none fires (the run is
    shorter than every `for`): khmon is up, attached and fresh, so those stay inactive;
    KhmonLostEvents may be pending only if events were lost (the uffd storm loses records under
    TCG); waste may make KhmonUffdIsolateWaste pending."""
    rules = {r["name"]: r for g in lab.prom.rules() for r in g["rules"]}
    assert set(rules) == {a.name for a in alerts.ALERTS}
    for name, r in rules.items():
        assert r["health"] == "ok", (name, r.get("lastError"))
    firing = [a for a in lab.prom.alerts() if a["state"] == "firing"]
    assert firing == []
    for name in ("KhmonDown", "KhmonNotScraped", "KhmonPipelineStalled", "KhmonProbeNotAttached"):
        assert rules[name]["state"] == "inactive", (name, rules[name].get("alerts"))
    # KhmonCollapseCountMismatch may be pending, never firing: minutes after a daemon start its
    # two increase()s extrapolate differently (khmon's counter starts at 0, so Prometheus does
    # not extrapolate it back; the kernel's it does): 3.3 collapses apart in the 6.1 guest, while
    # the exact totals agree (test_agreement_panel_series_are_equal). Its `for` outlasts that.
    lost = lab.prom.value(f'sum(khmon_lost_events_total{{instance="{lab.address}"}})', at=lab.end)
    if lost == 0:
        assert rules["KhmonLostEvents"]["state"] == "inactive", rules["KhmonLostEvents"].get("alerts")


def test_summary(lab: Lab) -> None:
    """How many targets ran with data, and which were empty because the kernel lacks what they
    read."""
    print(f"\n{len(RAN['data'])} of {len(TARGETS)} panel targets returned data for All and for this "
          f"daemon; {len(RAN['not_offered'])} empty where kernel {_info(lab)['release']} lacks what they "
          f"read: {RAN['not_offered']}")
    assert RAN["data"], "no target ran (run the whole module)"
