"""The generated files of dashboards/: in step with their generator, loadable by Grafana's
published schema, and consistent with each other (the data source's timeInterval is the scrape
interval of khmon's job; the scrape configuration passes promtool)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from dashboards import alerts, generate, host, overview, provisioning
from dashboards.panels import build_dashboard
from tests.support import grafana
from tests.support.prometheus import promtool

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "dashboards" / "schema" / "check.sh"


def test_checked_in_files_equal_the_generator() -> None:
    """Fails when someone edits a generated file, or the generator without `make dashboards`."""
    assert generate.stale() == [], "run `make dashboards` and commit the result"
    r = subprocess.run([".venv/bin/python", "-m", "dashboards.generate", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_check_sees_a_hand_edit(tmp_path: Path, monkeypatch) -> None:
    """The drift check compares text: one changed character in a copy is stale."""
    copy = tmp_path / "dashboards"
    shutil.copytree(ROOT / "dashboards", copy, ignore=shutil.ignore_patterns("schema", "__pycache__"))
    monkeypatch.setattr(generate, "HERE", copy)
    assert generate.stale() == []
    f = copy / "khmon-overview.json"
    f.write_text(f.read_text().replace('"title": "khmon overview"', '"title": "khmon overview!"'))
    assert generate.stale() == [f]


def test_generation_is_deterministic() -> None:
    assert build_dashboard(overview.DASHBOARD) == build_dashboard(overview.DASHBOARD)
    assert generate.artifacts() == generate.artifacts()


def test_dashboards_pass_grafanas_schema() -> None:
    files = [str(generate.dashboard_path(d)) for d in generate.DASHBOARDS]
    r = subprocess.run(["bash", str(CHECK), *files], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_misspelt_annotation_key_still_fails(tmp_path: Path) -> None:
    """check.sh's types allow the Prometheus annotation keys Grafana reads (types.d.ts says
    why), and only those."""
    doc = build_dashboard(host.DASHBOARD)
    ann = doc["annotations"]["list"][1]
    ann["target"]["exprr"] = ann["target"].pop("expr")
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(doc, indent=2))
    r = subprocess.run(["bash", str(CHECK), str(f)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "'\"exprr\"' does not exist" in r.stdout, r.stdout


def test_the_overview_has_the_rows_the_issue_lists() -> None:
    doc = build_dashboard(overview.DASHBOARD)
    assert [r["title"] for r in grafana.rows(doc)] == [
        "Health", "khugepaged", "mTHP by order", "Wasted work", "Processes", "THP beyond collapse"]


def test_host_detail_repeats_per_instance_and_annotates_settings_changes() -> None:
    doc = build_dashboard(host.DASHBOARD)
    (row,) = grafana.rows(doc)
    assert row["repeat"] == "instance"
    names = [a["name"] for a in grafana.prometheus_annotations(doc)]
    assert names == ["khugepaged settings changed", "THP settings changed"]
    for metric, knob in host.KNOBS:
        assert metric in host.knob_changes() and f'"{knob}"' in host.knob_changes()


def test_provisioning_agrees_with_the_scrape_configuration(tmp_path: Path) -> None:
    """Grafana's $__rate_interval spans four scrapes only if timeInterval is the scrape interval."""
    (ds,) = provisioning.datasource()["datasources"]
    (job,) = provisioning.prometheus_config(["x:1"])["scrape_configs"]
    assert ds["jsonData"]["timeInterval"] == job["scrape_interval"] == provisioning.SCRAPE_INTERVAL
    assert job["job_name"] == alerts.JOB_NAME
    (prov,) = provisioning.dashboard_provider()["providers"]
    assert prov["type"] == "file" and prov["allowUiUpdates"] is False
    # The shipped Prometheus configuration, with the rules beside it as it names them.
    shutil.copy(ROOT / "dashboards" / "provisioning" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "dashboards" / "alerts.yml", tmp_path / "khmon-alerts.yml")
    code, out, err = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert code == 0, out + err
    assert "SUCCESS: 1 rule files found" in out


def test_readme_shows_the_provisioning() -> None:
    text = (ROOT / "README.md").read_text()
    for needle in ("dashboards/provisioning/datasources/khmon.yml", "job_name: khmon",
                   "dashboards/provisioning/dashboards/khmon.yml", "docs/runbooks.md", "make dashboards"):
        assert needle in text, needle
