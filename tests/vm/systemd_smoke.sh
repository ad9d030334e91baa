#!/usr/bin/env bash
# systemd_smoke.sh — inside a tests/vm guest, check what khmon's systemd tests rely on,
# and print how long systemd takes to bring a killed or hung service back:
#
#   tests/vm/run.sh <6.1|7.2> tests/vm/systemd_smoke.sh
#
# Exits nonzero at the first check that fails, naming it.
set -euo pipefail

step() { echo "--- $*"; }
fail() { echo "systemd_smoke.sh: FAILED: $*" >&2; exit 1; }
now() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'; }
prop() { systemctl show -P "$2" "$1"; }
# Wait up to $3 seconds for unit $1 to be active with a main PID other than $2; print it.
wait_new_pid() {
    local unit="$1" old="$2" deadline=$(($(date +%s) + $3)) pid
    while (($(date +%s) < deadline)); do
        pid=$(prop "$unit" MainPID)
        if [[ "$(prop "$unit" ActiveState)" == active && "$pid" != 0 && "$pid" != "$old" ]]; then
            echo "$pid"
            return
        fi
        sleep 0.1
    done
    systemctl status --no-pager "$unit" >&2 || true
    fail "$unit did not come back within $3 s"
}
install_unit() { # name, then the unit's text on stdin
    cat >"/etc/systemd/system/$1"
    systemctl daemon-reload
}

step "PID 1 is systemd"
[[ "$(cat /proc/1/comm)" == systemd ]] || fail "PID 1 is $(cat /proc/1/comm)"
systemctl --version | head -n1

step "systemctl is-system-running --wait"
state=$(systemctl is-system-running --wait || true)
echo "$state"
if [[ "$state" != running ]]; then
    systemctl --failed --no-pager
    fail "system state is $state, not running"
fi

step "systemd-run --wait -p Type=oneshot true"
systemd-run --wait -q -p Type=oneshot true

step "Restart=always brings a service back after kill -KILL"
install_unit khmon-smoke-restart.service <<'UNIT'
[Service]
ExecStart=/bin/sleep infinity
Restart=always
RestartSec=1
UNIT
systemctl start khmon-smoke-restart.service
pid=$(prop khmon-smoke-restart.service MainPID)
t0=$(now)
kill -KILL "$pid"
wait_new_pid khmon-smoke-restart.service "$pid" 30 >/dev/null
echo "active again $(secs_since "$t0") s after SIGKILL (RestartSec=1); $(systemctl show -p NRestarts khmon-smoke-restart.service)"
[[ "$(prop khmon-smoke-restart.service NRestarts)" == 1 ]] || fail "NRestarts is not 1"

step "Type=notify with WatchdogSec: systemd-notify --ready, then kill -STOP"
install_unit khmon-smoke-notify.service <<'UNIT'
[Service]
Type=notify
# systemd-notify is a child of the main process: only NotifyAccess=all accepts it.
NotifyAccess=all
ExecStart=/bin/bash -c 'systemd-notify --ready; while :; do systemd-notify WATCHDOG=1; sleep 1; done'
WatchdogSec=5
# A stopped process cannot act on the watchdog's SIGABRT (a core-dumping signal
# stays pending until SIGCONT): systemd SIGKILLs it after TimeoutAbortSec.
TimeoutAbortSec=2
Restart=on-failure
RestartSec=1
UNIT
t0=$(now)
systemctl start khmon-smoke-notify.service
echo "active $(secs_since "$t0") s after systemctl start (start returns once READY=1 arrived)"
[[ "$(prop khmon-smoke-notify.service ActiveState)" == active ]] || fail "notify unit not active"
pid=$(prop khmon-smoke-notify.service MainPID)
sleep 2 # a few pings
t0=$(now)
kill -STOP "$pid"
wait_new_pid khmon-smoke-notify.service "$pid" 60 >/dev/null
echo "active again $(secs_since "$t0") s after SIGSTOP (WatchdogSec=5, TimeoutAbortSec=2, RestartSec=1); $(systemctl show -p NRestarts -p Result khmon-smoke-notify.service | paste -sd' ')"
journalctl -b --no-pager -u khmon-smoke-notify.service | tail -n 8

step "systemd-analyze security"
systemd-analyze security --no-pager khmon-smoke-notify.service | tail -n 1
systemctl stop khmon-smoke-restart.service khmon-smoke-notify.service

step "journalctl -b"
journalctl -b --no-pager | tail -n 5

step "BTF and tracefs"
[[ -r /sys/kernel/btf/vmlinux ]] || fail "no /sys/kernel/btf/vmlinux"
ls -l /sys/kernel/btf/vmlinux
grep ' /sys/kernel/tracing ' /proc/mounts || fail "tracefs not mounted"
[[ -d /sys/kernel/tracing/events/huge_memory ]] || fail "no huge_memory tracepoints in tracefs"

step "khmon doctor"
ls -l "/lib/modules/$(uname -r)/build"
t0=$(now)
.venv/bin/khmon doctor
echo "doctor took $(secs_since "$t0") s"

echo "systemd_smoke.sh: all checks passed on $(uname -r)"
