#!/usr/bin/env bash
# The whole test suite in stages, each timed, with a summary at the end.
#
#   scripts/test.sh           lint, unit, service (real Prometheus, promtool, tsc; no root or BPF),
#                             live on the host kernel (and the daemon there), live and
#                             khmon.service under systemd in the 6.1 and 7.2 guests
#   scripts/test.sh --fast    the same without the guest kernels
#
# Every stage runs even when an earlier one failed (the summary shows all of them); the
# exit status is nonzero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
fast=0
[ "${1:-}" = "--fast" ] && fast=1

stages=("lint:.venv/bin/ruff check daemon tests bench dashboards && .venv/bin/lint-imports --no-cache"
        "unit:.venv/bin/python -m pytest -v tests/unit"
        "service:.venv/bin/python -m pytest -v tests/service"
        "live-host:.venv/bin/python -m pytest -v tests/live tests/daemon")
if [ "$fast" = 0 ]; then
  # tests/systemd joins the same boot (the guests run systemd as PID 1)
  stages+=("guest-6.1:tests/vm/suite.sh 6.1 tests/live tests/systemd"
           "guest-7.2:tests/vm/suite.sh 7.2 tests/live tests/systemd")
fi

summary=()
failed=0
for stage in "${stages[@]}"; do
  name=${stage%%:*}
  cmd=${stage#*:}
  echo "=== stage $name: $cmd"
  t0=$(date +%s)
  bash -c "$cmd"
  rc=$?
  secs=$(($(date +%s) - t0))
  [ "$rc" = 0 ] && verdict=ok || { verdict="FAILED (exit $rc)"; failed=1; }
  summary+=("$(printf '%-10s %5ss  %s' "$name" "$secs" "$verdict")")
done
echo "=== timing summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
