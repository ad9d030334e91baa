#!/usr/bin/env bash
# suite.sh — khmon's guest tests inside a guest kernel, with systemd as PID 1.
#
#   tests/vm/suite.sh <6.1|7.2> [pytest paths and options...]    (default: tests/live)
#
# Boots the kernel with run.sh, once, and runs pytest there on the given paths
# (e.g. `suite.sh 7.2 tests/live tests/service`: one boot for all of them, since
# each bcc compile takes about 30 s under TCG), unchanged from the host run.
# KHMON_EXPECT_TIERS tells the doctor test what this kernel is known to offer
# (tests/live/test_cli_live.py); --durations shows where the guest's time goes.
# run.sh passes CI and every KHMON_* variable through to the guest.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { echo "usage: suite.sh <6.1|7.2> [pytest paths and options...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
series="$1"
shift
case "$series" in
  6.1) expect="kfunc,kprobe,kallsyms_data,ptwalk" ;;
  7.2) expect="kfunc,kprobe,order,mthp_present_ptes,per_order_stats" ;;
  *) echo "suite.sh: unknown kernel series '$series' (expected 6.1 or 7.2)" >&2; exit 2 ;;
esac
(($# > 0)) || set -- tests/live
printf -v args ' %q' "$@"
export KHMON_EXPECT_TIERS="$expect"
# run.sh starts the command in the checkout.
exec "$HERE/run.sh" "$series" ".venv/bin/python -m pytest -v -p no:cacheprovider --durations=8$args"
