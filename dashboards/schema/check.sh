#!/usr/bin/env bash
# Type-check Grafana dashboard JSON files against @grafana/schema (see check.mjs):
#   dashboards/schema/check.sh FILE.json...
# Exits 0 when every file checks, 1 when any does not (tsc's errors are printed), 2 on misuse.
set -euo pipefail
here=$(dirname "$0")
command -v node >/dev/null || { echo "check: node is missing; run make setup" >&2; exit 2; }
exec node "$here/check.mjs" "$@"
