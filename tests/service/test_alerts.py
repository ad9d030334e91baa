"""dashboards/alerts.yml: promtool check rules, promtool test rules with hand-written series
(tests/service/promtool/alerts_test.yml: every alert fires when it should and stays quiet
otherwise), a runbook per alert, and the query rules the dashboards follow, adapted to alerts
(job="khmon" instead of the dashboard variables, fixed ranges instead of Grafana's)."""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser as pp
import pytest

from dashboards import alerts
from tests.support.prometheus import promtool
from tests.support.promql import documented_families, function_name, matchers, metric_type, selectors

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "alerts.yml"
UNIT_TESTS = ROOT / "tests" / "service" / "promtool" / "alerts_test.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
FAMILIES = documented_families()
NAMES = [a.name for a in alerts.ALERTS]


def test_promtool_check_rules() -> None:
    code, out, err = promtool("check", "rules", str(RULES))
    assert code == 0, out + err
    assert f"SUCCESS: {len(alerts.ALERTS)} rules found" in out


def test_promtool_test_rules() -> None:
    code, out, err = promtool("test", "rules", str(UNIT_TESTS))
    assert code == 0, out + err
    assert "SUCCESS" in out


def test_the_issue_asks_for_these_alerts() -> None:
    """khmon down or not scraped, a probe not attached, lost events rising, the collapse count
    disagreeing with pages_collapsed, uffd_isolate waste, collapse allocations failing."""
    assert {"KhmonDown", "KhmonNotScraped", "KhmonProbeNotAttached", "KhmonLostEvents",
            "KhmonCollapseCountMismatch", "KhmonUffdIsolateWaste", "KhmonCollapseAllocFailing"} <= set(NAMES)
    assert len(set(NAMES)) == len(NAMES)


def _cases() -> dict[str, list[bool]]:
    """For each alert, whether each of its promtool cases expects it firing (True) or quiet."""
    out: dict[str, list[bool]] = {}
    for m in re.finditer(r"alertname: (\w+).*?\n\s+exp_alerts:(.*?)\n", UNIT_TESTS.read_text(), re.S):
        out.setdefault(m.group(1), []).append(m.group(2).strip() != "[]")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_alert_is_tested_firing_and_quiet(name: str) -> None:
    cases = _cases().get(name, [])
    assert True in cases and False in cases, (name, cases)


@pytest.mark.parametrize("alert", alerts.ALERTS, ids=NAMES)
def test_every_alert_has_a_summary_description_and_runbook(alert: alerts.Alert) -> None:
    rule = alert.rule()
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    anchor = rule["annotations"]["runbook"].partition("#")[2]
    sections = {h.lower(): body for h, body in re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)",
                                                             RUNBOOKS.read_text(), re.M | re.S)}
    assert anchor in sections, f"docs/runbooks.md has no '## {alert.name}'"
    body = sections[anchor]
    # What it means, what to check on a test machine, and how to silence it properly.
    for needle in ("khmon doctor", "Silence"):
        assert needle in body, (alert.name, needle)


@pytest.mark.parametrize("alert", alerts.ALERTS, ids=NAMES)
def test_alert_queries(alert: alerts.Alert) -> None:
    tree = pp.parse(alert.expr)
    for s, parents in selectors(tree):
        assert matchers(s).get("job") == (pp.MatchOp.Equal, alerts.JOB_NAME), (alert.name, str(s))
        kind = metric_type(s.name, FAMILIES)
        assert kind is not None, f"{alert.name}: {s.name} is not in docs/metrics.md"
        if kind in ("counter", "histogram"):
            assert len(parents) >= 2 and isinstance(parents[-1], pp.MatrixSelector), (alert.name, s.name)
            assert function_name(parents[-2]) in ("rate", "irate", "increase"), (alert.name, s.name)
        if "wasted" in s.name:
            assert matchers(s).get("reason", (None, ""))[0] == pp.MatchOp.Equal, "one reason at a time"
