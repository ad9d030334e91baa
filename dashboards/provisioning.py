"""Files a lab copies to its Grafana and Prometheus, as data (written by dashboards.generate).

- provisioning/datasources/khmon.yml: a Prometheus data source whose timeInterval is the
  scrape interval of khmon's job, so Grafana's $__rate_interval (max($__interval + scrape
  interval, 4 x scrape interval)) always spans at least four scrapes;
- provisioning/dashboards/khmon.yml: a file provider for the dashboard JSON (read-only in the
  UI: the JSON in this repository is the source);
- provisioning/prometheus.yml: a Prometheus configuration with khmon's job and alert rules,
  checked by `promtool check config` in tests/service.
"""

from __future__ import annotations

from typing import Any

from .alerts import JOB_NAME

SCRAPE_INTERVAL = "5s"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/khmon"
DATASOURCE_UID = "khmon-prometheus"


def datasource() -> dict[str, Any]:
    return {"apiVersion": 1, "datasources": [{
        "name": "Prometheus (khmon)", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
        "url": "http://localhost:9090", "isDefault": False, "editable": False,
        "jsonData": {"timeInterval": SCRAPE_INTERVAL, "httpMethod": "POST"},
    }]}


def dashboard_provider() -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "khmon", "orgId": 1, "folder": "khmon", "folderUid": "khmon", "type": "file",
        "disableDeletion": True, "allowUiUpdates": False, "updateIntervalSeconds": 60,
        "options": {"path": DASHBOARDS_PATH, "foldersFromFilesStructure": False},
    }]}


def prometheus_config(targets: list[str]) -> dict[str, Any]:
    """khmon's job (named as alerts.JOB says) scraped every SCRAPE_INTERVAL, and its rules."""
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["khmon-alerts.yml"],
        "scrape_configs": [{
            "job_name": JOB_NAME, "scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
            "static_configs": [{"targets": targets}],
        }],
    }
