"""khmon's Grafana dashboards and Prometheus rules, as code.

`python -m dashboards.generate` (or `make dashboards`) writes the checked-in files of this
directory from these modules: the dashboard JSON (built with grafana-foundation-sdk), the alert
rules and the provisioning files. tests/service fails when the files and the generator differ.
"""
