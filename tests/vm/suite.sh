#!/usr/bin/env bash
# suite.sh — khmon's live suite inside a guest kernel.
#
#   tests/vm/suite.sh <6.1|7.2>
#
# Boots the kernel with run.sh and runs `pytest tests/live` against it, unchanged from the
# host run. KHMON_EXPECT_TIERS tells the doctor test what this kernel is known to offer
# (tests/live/test_cli_live.py); --durations shows where the guest's time goes (each bcc
# compile takes about 30 s under TCG).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
[[ $# -eq 1 ]] || { echo "usage: suite.sh <6.1|7.2>" >&2; exit 2; }
case "$1" in
  6.1) expect="kfunc,kprobe,kallsyms_data,ptwalk" ;;
  7.2) expect="kfunc,kprobe,order,mthp_present_ptes,per_order_stats" ;;
  *) echo "suite.sh: unknown kernel series '$1' (expected 6.1 or 7.2)" >&2; exit 2 ;;
esac
exec "$HERE/run.sh" "$1" "cd '$REPO' && export KHMON_EXPECT_TIERS=$expect CI='${CI:-}' && \
  .venv/bin/python -m pytest -v -p no:cacheprovider --durations=8 tests/live"
