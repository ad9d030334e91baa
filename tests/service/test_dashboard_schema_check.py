"""dashboards/schema/check.sh: Grafana's published dashboard types, applied by the real tsc.

No Grafana server can be had on these machines, so this check is what stands between a generated
dashboard and Grafana's schema; these tests show it refuses what it must and passes what it must,
including a dashboard built with grafana-foundation-sdk.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, ThresholdsMode
from grafana_foundation_sdk.models.dashboard import Threshold as ThresholdModel

CHECK = Path(__file__).resolve().parents[2] / "dashboards" / "schema" / "check.sh"
MINIMAL: dict[str, Any] = {"title": "min", "uid": "min", "schemaVersion": 41, "panels": []}


def check(tmp: Path, **docs: dict[str, Any] | str) -> subprocess.CompletedProcess[str]:
    files = []
    for name, doc in docs.items():
        f = tmp / f"{name}.json"
        f.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
        files.append(str(f))
    return subprocess.run(["bash", str(CHECK), *files], capture_output=True, text=True, timeout=120)


def test_set_up() -> None:
    r = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr, r.stderr  # not "node_modules is missing"


def test_minimal_dashboard_passes(tmp_path: Path) -> None:
    r = check(tmp_path, minimal=MINIMAL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == ""


def test_unknown_top_level_key_fails(tmp_path: Path) -> None:
    r = check(tmp_path, unknown={**MINIMAL, "panelz": []})
    assert r.returncode == 1
    # Reported at the key's own place in the JSON file: line 6 of json.dumps(indent=2).
    assert "unknown.json(6,3): error TS2353" in r.stdout, r.stdout
    assert "'\"panelz\"' does not exist" in r.stdout, r.stdout


def test_wrong_type_and_bad_enum_fail(tmp_path: Path) -> None:
    wrong = {**MINIMAL, "schemaVersion": "41"}
    enum = {**MINIMAL, "graphTooltip": 7, "panels": [{
        "type": "stat", "title": "t", "gridPos": {"h": 4, "w": 6, "x": 0, "y": 0},
        "fieldConfig": {"defaults": {"thresholds": {"mode": "absolut", "steps": []}}, "overrides": []},
    }]}
    r = check(tmp_path, wrong=wrong, enum=enum)
    assert r.returncode == 1
    out = r.stdout
    assert "wrong.json(4,3): error TS2322: Type 'string' is not assignable to type 'number'" in out, out
    assert "Type '7' is not assignable to type 'DashboardCursorSync" in out, out
    assert "Type '\"absolut\"' is not assignable to type '\"absolute\" | \"percentage\"'" in out, out


def test_not_json_fails(tmp_path: Path) -> None:
    # check.sh wraps the file in TypeScript, which would accept an expression that is not JSON.
    r = check(tmp_path, expr='{"title": "x", "schemaVersion": 41 + 0}')
    assert r.returncode == 1 and "not JSON" in r.stderr, r.stderr


@pytest.mark.parametrize("broken", [False, True])
def test_sdk_dashboard(tmp_path: Path, broken: bool) -> None:
    """A dashboard from grafana-foundation-sdk, with the parts khmon's will have, passes (the SDK
    writes auto/auto_min/auto_count on every variable, which check.sh's types allow); the same
    with a misspelt key fails."""
    query = (prometheus.Dataquery().expr("rate(khmon_collapses_total[$__rate_interval])")
             .legend_format("{{result}}"))
    built = (
        dashboard.Dashboard("khmon").uid("khmon").refresh("10s").tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(dashboard.DatasourceVariable("datasource").type("prometheus"))
        .with_row(dashboard.Row("collapses"))
        .with_panel(
            timeseries.Panel().title("collapses/s").unit("ops").with_target(query)
            .datasource(DataSourceRef(type_val="prometheus", uid="${datasource}"))
            .thresholds(dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                        .steps([ThresholdModel(color="green", value=None)]))
        )
        .build()
    )
    doc = json.loads(json.dumps(built, cls=JSONEncoder))
    if broken:
        doc["panels"][1]["gridpos"] = doc["panels"][1].pop("gridPos")
    r = check(tmp_path, sdk=doc)
    assert r.returncode == int(broken), r.stdout + r.stderr
    if broken:
        assert "'\"gridpos\"' does not exist" in r.stdout, r.stdout
