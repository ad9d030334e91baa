#!/bin/bash
# runner.sh — ExecStart of khmon-runner.service in the test guest. tests/vm/run.sh
# copies it into the run's read-write share (/run/khmon-vm in the guest) with:
#   env      shell assignments: repo=<checkout>, and the exported environment
#            (KHMON_TCG_GUEST=1, the caller's CI and KHMON_* variables)
#   command  the command to run, as given to run.sh
# and reads back:
#   started  written first (the guest's uptime): the boot is over, the command starts
#   heartbeat  the guest's uptime, every 5 s while the guest lives
#   output   the command's stdout and stderr (run.sh streams it as it grows)
#   status   the command's exit status (125: this script's own setup failed)
#   journal.log  the boot's journal, after the command
# The unit powers the guest off when this script ends.
set -uo pipefail
share=/run/khmon-vm

read -r uptime _ </proc/uptime
echo "$uptime" >"$share/started"

# A heartbeat for run.sh, which takes a guest whose user space stops writing it
# for KHMON_VM_HANG_TIMEOUT for hung (under TCG the kernel can deadlock patching
# its own code). Its command line names neither khmon nor pytest: the overhead
# benchmark takes processes that do for other khmon runs.
(cd "$share" && exec -a heartbeat /bin/sh -c 'while :; do cat /proc/uptime >heartbeat; sleep 5; done') &

setup_failed() {
    echo "run.sh (guest): $*" >>"$share/output"
    echo 125 >"$share/status"
    exit 125
}

# systemd mounts tracefs (sys-kernel-tracing.mount) on these kernels; khmon cannot work without it.
grep -qs ' /sys/kernel/tracing tracefs ' /proc/mounts ||
    mount -t tracefs nodev /sys/kernel/tracing ||
    setup_failed "cannot mount tracefs at /sys/kernel/tracing"
repo=
# shellcheck source=/dev/null
. "$share/env" || setup_failed "cannot read $share/env"
cd "$repo" || setup_failed "cannot cd to the checkout '$repo'"

bash -c "$(cat "$share/command")" </dev/null >>"$share/output" 2>&1
rc=$?

# For whoever debugs a failure on the host (run.sh keeps it in build/vm/).
journalctl -b --no-pager -o short-monotonic >"$share/journal.log" 2>&1
echo "$rc" >"$share/status"
