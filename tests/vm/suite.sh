#!/usr/bin/env bash
# suite.sh — khmon's live suite inside a guest kernel: doctor, then the live tests.
#
#   tests/vm/suite.sh <6.1|7.2>
#
# Boots the kernel with run.sh, runs `khmon doctor` (kept in build/doctor-<kernel>.txt for
# the README) and `pytest tests/live` against that kernel. KHMON_EXPECT_TIERS tells the
# tier test what this kernel is known to offer (see tests/live/test_doctor_tiers.py).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
[[ $# -eq 1 ]] || { echo "usage: suite.sh <6.1|7.2>" >&2; exit 2; }
case "$1" in
  6.1) expect="kfunc,kprobe,kallsyms_data" ;;
  7.2) expect="order,mthp_present_ptes,per_order_stats" ;;
  *) echo "suite.sh: unknown kernel series '$1' (expected 6.1 or 7.2)" >&2; exit 2 ;;
esac
mkdir -p "$REPO/build"
exec "$HERE/run.sh" "$1" "cd '$REPO' && export KHMON_EXPECT_TIERS=$expect CI='${CI:-}' \
  && .venv/bin/khmon doctor > build/doctor-$1.txt; rc=\$?; cat build/doctor-$1.txt; \
  [ \$rc = 0 ] || { echo 'suite.sh: khmon doctor failed in the guest' >&2; exit \$rc; }; \
  .venv/bin/python -m pytest -v -p no:cacheprovider tests/live"
