#!/usr/bin/env bash
# run.sh — boot a Debian kernel under QEMU/TCG with virtme-ng, on the host's
# root file system, and run one command in it as root from this checkout.
#
#   tests/vm/run.sh <6.1|7.2> '<command>'
#
# Exits with the command's exit status (255: the guest died, e.g. a panic;
# 124: KHMON_VM_TIMEOUT expired; 125: run.sh's own guest-side setup failed).
# Prints the elapsed wall time on stderr at the end.
#
# The guest's kernel console (loglevel 7) goes to build/vm/<series>-console.log, and its
# last lines are printed when the guest fails. A guest that dies on its own (before the
# command starts, or in a kernel panic) is booted once more, and says so.
#
# Environment:
#   KHMON_CACHE        cache root (default /var/cache/khmon): kernels, apt state, vng venv
#   KHMON_VM_MEMORY    guest memory (default 2G)
#   KHMON_VM_CPUS      guest CPUs (default 2)
#   KHMON_VM_TIMEOUT   seconds before the guest is killed (default 1800; 0 = none)
#   KHMON_VNG_SPEC     pip requirement for virtme-ng (default virtme-ng==1.42)
set -euo pipefail

START_NS=$(date +%s%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE="${KHMON_CACHE:-/var/cache/khmon}"
VENV="$CACHE/vng-venv"
VNG_SPEC="${KHMON_VNG_SPEC:-virtme-ng==1.42}"
MEMORY="${KHMON_VM_MEMORY:-2G}"
CPUS="${KHMON_VM_CPUS:-2}"
TIMEOUT="${KHMON_VM_TIMEOUT:-1800}"
PROG="run.sh"

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
elapsed() { echo "$((($(date +%s%N) - START_NS) / 1000000))" | sed -E 's/([0-9]{3})$/.\1/; s/^\./0./'; }

[[ $# -eq 2 ]] || { echo "usage: $PROG <6.1|7.2> '<command>'" >&2; exit 2; }
SERIES="$1"
CMD="$2"
case "$SERIES" in 6.1 | 7.2) ;; *) die "unknown kernel series '$SERIES' (expected 6.1 or 7.2)" ;; esac

# Host tools from Debian: qemu (the emulator), busybox-static (virtme-ng puts
# it in the guest's initramfs), kmod (depmod, for kernels.sh), python3-venv
# (for virtme-ng's own venv). Installed only when missing.
ensure_debian_packages() {
    local p missing=()
    for p in qemu-system-x86 busybox-static kmod python3-venv; do
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]} (apt)"
    apt-get update -q >/dev/null || die "apt-get update failed (needed to install ${missing[*]})"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# virtme-ng from PyPI in a venv of its own (Debian's python, not the project's
# venv): it is a test-harness tool, not a khmon dependency.
ensure_vng() {
    if [[ -x "$VENV/bin/vng" ]] && "$VENV/bin/vng" --version >/dev/null 2>&1; then
        return
    fi
    log "installing $VNG_SPEC into $VENV (pip)"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV" || die "cannot create venv $VENV"
    "$VENV/bin/pip" install -q "$VNG_SPEC" >"$CACHE/vng-install.log" 2>&1 ||
        die "pip install $VNG_SPEC failed (see $CACHE/vng-install.log)"
}

mkdir -p "$CACHE"
ensure_debian_packages
ensure_vng

# Resolve (and if needed download) the kernel; the last stdout line of
# kernels.sh is "release=<r> vmlinuz=<path>".
FETCH_NS=$(date +%s%N)
fetch_out=$("$HERE/kernels.sh" fetch "$SERIES") || exit 1
last=$(tail -n1 <<<"$fetch_out")
RELEASE=$(sed -nE 's/^release=([^ ]+) .*/\1/p' <<<"$last")
VMLINUZ=$(sed -nE 's/.* vmlinuz=([^ ]+)$/\1/p' <<<"$last")
[[ -n "$RELEASE" && -f "$VMLINUZ" ]] || die "could not parse kernels.sh output: $last"
log "kernel $SERIES = $RELEASE (resolved in $((($(date +%s%N) - FETCH_NS) / 1000000)) ms)"

# What the guest runs: mount tracefs (not mounted by virtme-ng's init, and
# khmon needs it), enter the checkout (the guest sees the host's root fs, so
# it is at the same path), then the user's command. An explicit "exit N" in
# the command ends this shell with N, which vng hands back to us.
printf -v repo_q '%q' "$REPO"
printf -v cache_q '%q' "$(cd "$CACHE" && pwd -P)"
# The guest creates MARKER once its command is about to run: without it, a dead guest never
# got that far. The command's stderr joins its stdout, so vng's stderr carries only the
# kernel console (--verbose), which goes to CONSOLE_LOG.
LOGDIR="$REPO/build/vm"
mkdir -p "$LOGDIR"
MARKER="$LOGDIR/.started-$SERIES-$$"
CONSOLE_LOG="$LOGDIR/$SERIES-console.log"
printf -v marker_q '%q' "$MARKER"
# virtme-ng's init mounts a tmpfs over /var/cache (and a few other dirs), which
# hides the cached headers that /lib/modules/<rel>/build and source point at.
# A non-recursive bind of / sees the 9p root without those mounts; bind the
# cache dir from there back over its own path.
GUEST_CMD="if [ ! -d $cache_q/kernels ]; then mkdir -p /run/khmon-hostroot $cache_q && mount --bind / /run/khmon-hostroot && mount --bind /run/khmon-hostroot$cache_q $cache_q || { echo '$PROG (guest): cannot expose $cache_q' >&2; exit 125; }; fi
grep -qs ' /sys/kernel/tracing tracefs ' /proc/mounts || mount -t tracefs nodev /sys/kernel/tracing || { echo '$PROG (guest): cannot mount tracefs' >&2; exit 125; }
cd $repo_q || { echo '$PROG (guest): cannot cd to $repo_q' >&2; exit 125; }
: > $marker_q
exec 2>&1
export KHMON_TCG_GUEST=1
$CMD"

vng_args=(
    -r "$VMLINUZ"
    --disable-kvm # KVM on this host hangs right after "Probing EDD"
    --force-9p    # share the root fs over 9p (no virtiofsd needed)
    --rwdir "$REPO" # the root fs is read-only in the guest; tests write into the checkout
    --cpus "$CPUS"
    --memory "$MEMORY"
    --user root
    --verbose # the kernel console, into CONSOLE_LOG
    -- "$GUEST_CMD"
)
timeout_cmd=()
if [[ "$TIMEOUT" != 0 ]]; then
    # timeout kills vng's whole process group, qemu included.
    timeout_cmd=(timeout -k 10 "$TIMEOUT")
fi

# vng execs virtme-run (same venv) by name.
export PATH="$VENV/bin:$PATH"
log "booting $RELEASE (TCG, $CPUS cpus, $MEMORY)"
cd "$REPO" # vng also starts the guest command in the host's cwd
# stdin from /dev/null: the guest command gets no input, and qemu never
# touches a terminal (it would stop on SIGTTOU in a background process group).
# stdout and stderr go through pipes (cat) because qemu reopens
# /proc/self/fd/1 and /2 with O_TRUNC: writing to a regular file directly,
# it would wipe whatever was logged to that file before the guest started.
boot() {
    rm -f "$MARKER"
    set +e
    {
        "${timeout_cmd[@]}" "$VENV/bin/vng" "${vng_args[@]}" </dev/null 2>&1 1>&3 3>&- | cat >"$CONSOLE_LOG"
        exit "${PIPESTATUS[0]}"
    } 3>&1 | cat
    rc=${PIPESTATUS[0]}
    set -e
}
console_tail() {
    log "last lines of the guest's kernel console ($CONSOLE_LOG):"
    tail -n 40 "$CONSOLE_LOG" | sed 's/^/  console| /' >&2
}
# The guest is run once more (and says why) when it died on its own: before the command
# started (a boot failure), or in a kernel panic. Under TCG the guest kernel has died both
# ways with nothing of khmon's involved (an "Oops: int3" in khugepaged's own code while
# tracepoint static keys were being flipped); a test failure is never retried.
boot
if ((rc == 255)) && { [[ ! -e "$MARKER" ]] || grep -q "Kernel panic" "$CONSOLE_LOG"; }; then
    if [[ -e "$MARKER" ]]; then
        log "$SERIES ($RELEASE) kernel panicked under the command (exit=$rc, $(elapsed)s):"
        grep -m1 -E "Oops|BUG|Kernel panic" "$CONSOLE_LOG" | sed 's/^/  console| /' >&2
    else
        log "$SERIES ($RELEASE) died before the command started (exit=$rc, $(elapsed)s): a boot failure"
    fi
    console_tail
    cp "$CONSOLE_LOG" "$CONSOLE_LOG.died"
    log "booting $RELEASE once more (the first console is kept in $CONSOLE_LOG.died)"
    boot
fi
if ((rc == 124)) && [[ "$TIMEOUT" != 0 ]]; then
    log "guest killed after ${TIMEOUT}s (KHMON_VM_TIMEOUT)"
fi
if ((rc != 0)); then
    console_tail
fi
rm -f "$MARKER"
log "$SERIES ($RELEASE) exit=$rc elapsed=$(elapsed)s"
exit "$rc"
