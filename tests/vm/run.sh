#!/usr/bin/env bash
# run.sh — boot a Debian kernel under QEMU/TCG with systemd as PID 1, on the host's
# root file system, and run one command in it as root from this checkout.
#
#   tests/vm/run.sh <6.1|7.2> '<command>'
#
# Exits with the command's exit status (255: the guest died, e.g. a panic;
# 124: KHMON_VM_TIMEOUT expired; 125: the harness's own guest-side setup failed).
# The command's stdout and stderr stream to stdout as the guest writes them;
# run.sh's own messages, and the elapsed wall time at the end, go to stderr.
#
# The guest (see tests/vm/guest/):
#   - the kernel fetched by kernels.sh, and a small busybox initramfs (built here,
#     cached per kernel release and per hash of this script and guest/init) that
#     loads the 9p and overlay modules, mounts the host's / (a read-only 9p export)
#     under a tmpfs overlay (the guest writes anywhere, the host is never written),
#     and switch_roots to /lib/systemd/systemd;
#   - a second, read-write 9p export, a temp dir of this run, at /run/khmon-vm: it
#     carries runner.sh and the command in, and the output and exit status out;
#   - systemd boots khmon-vm.target (basic.target + khmon-runner.service), which
#     runs the command (environment: KHMON_TCG_GUEST=1, and the caller's CI and
#     KHMON_* variables) and then powers the guest off.
#
# Kept in build/vm/: <series>-console.log (the serial console: kernel and systemd,
# loglevel 7; its last lines are printed when the guest fails) and
# <series>-journal.log (journalctl -b, taken after the command). A guest that dies
# on its own (no runner within KHMON_VM_BOOT_TIMEOUT; a kernel panic or Oops, or no
# heartbeat within KHMON_VM_HANG_TIMEOUT, before the command ended) is booted once
# more, and says so; its console is kept as <series>-console.log.died. A test
# failure is never retried.
#
# Environment:
#   KHMON_CACHE             cache root (default /var/cache/khmon): kernels, apt state, initramfs
#   KHMON_VM_MEMORY         guest memory (default 2G)
#   KHMON_VM_CPUS           guest CPUs (default 2)
#   KHMON_VM_TIMEOUT        seconds before the guest is killed (default 1800; 0 = none)
#   KHMON_VM_BOOT_TIMEOUT   seconds for the boot to reach the runner (default 300; 0 = none)
#   KHMON_VM_HANG_TIMEOUT   seconds without a heartbeat from the guest before it counts as
#                           hung (default 180; 0 = none)
#   KHMON_VM_APPEND         more kernel command line (e.g. systemd.log_level=debug)
#   KHMON_VM_ACCEL          qemu's -accel (default tcg; never kvm on this host, see below)
set -euo pipefail

START_NS=$(date +%s%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE="${KHMON_CACHE:-/var/cache/khmon}"
MEMORY="${KHMON_VM_MEMORY:-2G}"
CPUS="${KHMON_VM_CPUS:-2}"
TIMEOUT="${KHMON_VM_TIMEOUT:-1800}"
BOOT_TIMEOUT="${KHMON_VM_BOOT_TIMEOUT:-300}"
HANG_TIMEOUT="${KHMON_VM_HANG_TIMEOUT:-180}"
PROG="run.sh"

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
# Milliseconds since $1 (default: since run.sh started), printed as seconds.
secs_since() { echo "$((($(date +%s%N) - ${1:-$START_NS}) / 1000000))" | sed -E 's/([0-9]{3})$/.\1/; s/^\./0./'; }

[[ $# -eq 2 ]] || { echo "usage: $PROG <6.1|7.2> '<command>'" >&2; exit 2; }
SERIES="$1"
CMD="$2"
case "$SERIES" in 6.1 | 7.2) ;; *) die "unknown kernel series '$SERIES' (expected 6.1 or 7.2)" ;; esac
for v in TIMEOUT BOOT_TIMEOUT HANG_TIMEOUT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "KHMON_VM_$v='${!v}' is not a number of seconds"
done
[[ $(id -u) == 0 ]] || die "must run as root (apt-get, /usr/lib/modules and qemu's 9p export of / need it)"

# Host tools from Debian: qemu (the emulator), busybox-static and cpio (the
# initramfs), xz-utils (7.2's modules are .ko.xz), kmod (modprobe resolves module
# dependencies; depmod, for kernels.sh). Installed only when missing.
ensure_debian_packages() {
    local p missing=()
    for p in qemu-system-x86 busybox-static cpio xz-utils kmod; do
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]} (apt)"
    apt-get update -q >/dev/null || die "apt-get update failed (needed to install ${missing[*]}); check the host's apt sources"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed; try it by hand to see why"
}

# The modules the guest needs before it has a root file system, which Debian
# builds as modules: 9p over virtio (and its transport, virtio_pci, on 6.1) and
# overlayfs. modprobe resolves their dependencies, in load order, and says which
# are built in on this kernel.
INITRD_MODULES=(netfs 9pnet 9pnet_virtio 9p overlay virtio_pci)

# Print the initramfs for kernel $1, building it if it is not cached. The key is
# the release and the hash of what goes into it: this script (the module list,
# the build) and guest/init.
initramfs() {
    local rel="$1" key dir out tmp m ko name
    key=$(cat "${BASH_SOURCE[0]}" "$HERE/guest/init" | sha256sum | cut -c1-16)
    dir="$CACHE/initramfs"
    out="$dir/$rel-$key.cpio.gz"
    if [[ -s "$out" ]]; then
        echo "$out"
        return
    fi
    mkdir -p "$dir"
    tmp=$(mktemp -d "$dir/.build.XXXXXX")
    mkdir -p "$tmp/bin" "$tmp/dev" "$tmp/proc" "$tmp/sys" "$tmp/modules"
    # The initramfs has no libc: only the static busybox (busybox-static installs it as /bin/busybox).
    ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is dynamically linked; apt-get install busybox-static"
    cp /bin/busybox "$tmp/bin/busybox"
    install -m 0755 "$HERE/guest/init" "$tmp/init"
    # The kernel opens /dev/console for /init before devtmpfs is mounted (init copes without it).
    mknod -m 0600 "$tmp/dev/console" c 5 1 2>/dev/null || true
    for m in "${INITRD_MODULES[@]}"; do
        # -C /dev/null: the host's modprobe.d options are not the guest's.
        modprobe -C /dev/null -S "$rel" --show-depends "$m" ||
            die "kernel $rel has no module $m (modprobe -S $rel --show-depends $m failed); re-run kernels.sh fetch"
    done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$tmp/paths"
    while read -r ko; do
        name=$(basename "$ko")
        case "$ko" in
        *.ko.xz) name=${name%.xz}; xz -dc "$ko" >"$tmp/modules/$name" ;; # busybox insmod cannot decompress
        *.ko) cp "$ko" "$tmp/modules/$name" ;;
        *) die "module $ko: unknown compression (expected .ko or .ko.xz)" ;;
        esac
        echo "$name" >>"$tmp/modules/order"
    done <"$tmp/paths"
    rm "$tmp/paths"
    [[ -s "$tmp/modules/order" ]] || die "no modules resolved for $rel (expected ${INITRD_MODULES[*]})"
    (cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$out.tmp"
    mv "$out.tmp" "$out"
    log "built $out (modules: $(sed 's/\.ko$//' "$tmp/modules/order" | paste -sd' '))"
    rm -rf "$tmp"
    # Older builds for this release are never used again.
    find "$dir" -maxdepth 1 -name "$rel-*.cpio.gz" ! -path "$out" -delete
    echo "$out"
}

# Units the guest must not start, one name a line. Whatever the host's
# administrator enabled (/etc/systemd/system/*.wants: on this host postgresql,
# apparmor, time sync, pstore, e2scrub and the apt/man-db/fstrim timers) is for
# the host, not for a throwaway test guest: at best it costs TCG boot time, at
# worst it fails (no network, no AppArmor policy for this kernel). Targets only
# group units, so they stay. Then units of Debian's base system that a guest
# with no disks, no network and no state does not need.
unwanted_units() {
    local f
    for f in /etc/systemd/system/*.wants/*; do
        [[ -L "$f" || -e "$f" ]] || continue
        [[ "$f" == *.target ]] && continue
        basename "$f"
    done
    printf '%s\n' \
        systemd-tmpfiles-clean.timer \
        apparmor.service \
        systemd-timesyncd.service \
        systemd-pstore.service
}

# The run's read-write share: what runner.sh needs (see guest/runner.sh) and the
# /etc files guest/init copies into the overlay.
prepare_share() {
    local share="$1" sd="$1/etc/systemd/system" u v
    mkdir -p "$sd" "$share/etc/tmpfiles.d"
    cp "$HERE/guest/khmon-vm.target" "$HERE/guest/khmon-runner.service" "$sd/"
    cp "$HERE/guest/runner.sh" "$share/runner.sh"
    # A unit file that is a link to /dev/null is masked.
    while read -r u; do
        ln -sfn /dev/null "$sd/$u"
    done < <(unwanted_units | sort -u)
    # Debian's "D /tmp" rule empties /tmp at boot: the guest would start with
    # none of the host's /tmp (and whiteouts over it in the overlay).
    ln -sfn /dev/null "$share/etc/tmpfiles.d/tmp.conf"
    {
        printf 'repo=%q\n' "$REPO"
        for v in CI "${!KHMON_@}"; do
            [[ -v "$v" ]] && printf 'export %s=%q\n' "$v" "${!v}"
        done
        # Tests use it to skip what races TCG (see README, Testing).
        echo 'export KHMON_TCG_GUEST=1'
    } >"$share/env"
    printf '%s\n' "$CMD" >"$share/command"
}

mkdir -p "$CACHE"
ensure_debian_packages

# Resolve (and if needed download) the kernel; the last stdout line of
# kernels.sh is "release=<r> vmlinuz=<path>".
FETCH_NS=$(date +%s%N)
fetch_out=$("$HERE/kernels.sh" fetch "$SERIES") || exit 1
last=$(tail -n1 <<<"$fetch_out")
RELEASE=$(sed -nE 's/^release=([^ ]+) .*/\1/p' <<<"$last")
VMLINUZ=$(sed -nE 's/.* vmlinuz=([^ ]+)$/\1/p' <<<"$last")
[[ -n "$RELEASE" && -f "$VMLINUZ" ]] || die "could not parse kernels.sh output: $last"
log "kernel $SERIES = $RELEASE (resolved in $(secs_since "$FETCH_NS")s)"
INITRD=$(initramfs "$RELEASE")

LOGDIR="$REPO/build/vm"
mkdir -p "$LOGDIR"
CONSOLE_LOG="$LOGDIR/$SERIES-console.log"
JOURNAL_LOG="$LOGDIR/$SERIES-journal.log"
rm -f "$JOURNAL_LOG" "$CONSOLE_LOG.died" # an earlier run's
SHARE=$(mktemp -d /tmp/khmon-vm.XXXXXX)
QPID=""
# qemu runs in the background, where a non-interactive shell's children ignore
# SIGINT: stop it when run.sh ends for any reason.
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    if [[ -n "$QPID" ]]; then kill "$QPID" 2>/dev/null || true; fi
    rm -rf "$SHARE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
prepare_share "$SHARE"

# The host has 2 cores, and a TCG guest wants both: one guest at a time, even
# from different checkouts. The lock is released when run.sh and qemu are gone.
exec 8>"$CACHE/vm.lock"
if ! flock -n 8; then
    log "waiting for the other guest to finish (lock $CACHE/vm.lock)"
    flock 8
fi

qemu_args=(
    -machine q35 -accel "${KHMON_VM_ACCEL:-tcg}" -cpu max # KVM on this host hangs right after "Probing EDD"
    -smp "$CPUS" -m "$MEMORY"
    -nodefaults -no-reboot -display none -net none
    -kernel "$VMLINUZ" -initrd "$INITRD"
    # panic=-1 reboots at once on a panic and -no-reboot turns that into qemu
    # exiting; oops=panic, because a kernel that oopsed has lost a thread (under
    # TCG: khugepaged, on a half-patched static call) and the run means nothing.
    -append "console=ttyS0 loglevel=7 panic=-1 oops=panic systemd.unit=khmon-vm.target${KHMON_VM_APPEND:+ $KHMON_VM_APPEND}"
    -chardev "file,id=console,path=$CONSOLE_LOG" -serial chardev:console
    # multidevs=remap: the host's / spans several file systems, whose inode
    # numbers would otherwise collide in the guest.
    -fsdev "local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap"
    -device "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"
    -fsdev "local,id=khmonrun,path=$SHARE,security_model=none"
    -device "virtio-9p-pci,fsdev=khmonrun,mount_tag=khmonrun"
)

# One boot. Sets RC (the run's exit status so far) and WHY (empty, or why the
# guest died on its own: worth a second boot).
boot() {
    local qpid tpid qrc boot_ns now killed="" started="" hung=0 stopped=0 timed_out=0 beat="" beat_ns=""
    rm -f "$SHARE/started" "$SHARE/heartbeat" "$SHARE/status" "$SHARE/journal.log"
    : >"$SHARE/output"
    log "booting $RELEASE (TCG, $CPUS cpus, $MEMORY, systemd)"
    boot_ns=$(date +%s%N)
    # stdin from /dev/null: qemu never touches a terminal (it would stop on
    # SIGTTOU in a background process group).
    qemu-system-x86_64 "${qemu_args[@]}" </dev/null >"$SHARE/qemu.log" 2>&1 &
    qpid=$!
    QPID=$qpid
    # The command's output, as the guest writes it through 9p; tail ends once
    # qemu has, after reading what is left.
    tail -n +1 -f --pid="$qpid" "$SHARE/output" &
    tpid=$!
    # Watch the guest: note when the runner starts, and stop qemu (SIGTERM, then
    # SIGKILL 10 s later) when the boot hangs (no runner within BOOT_TIMEOUT), the
    # guest stops (no new heartbeat within HANG_TIMEOUT), or the run exceeds TIMEOUT.
    while kill -0 "$qpid" 2>/dev/null; do
        now=$(date +%s%N)
        if [[ -z "$started" && -e "$SHARE/started" ]]; then
            started=1
            beat_ns=$now
            log "runner started $(secs_since "$boot_ns")s after qemu (guest uptime $(cat "$SHARE/started")s)"
        fi
        if [[ -n "$started" ]] && [[ "$(cat "$SHARE/heartbeat" 2>/dev/null)" != "$beat" ]]; then
            beat=$(cat "$SHARE/heartbeat" 2>/dev/null)
            beat_ns=$now
        fi
        if [[ -n "$killed" ]]; then
            ((now - killed < 10000000000)) || kill -KILL "$qpid" 2>/dev/null || true
        elif [[ -z "$started" && "$BOOT_TIMEOUT" != 0 ]] && ((now - boot_ns > BOOT_TIMEOUT * 1000000000)); then
            hung=1
            killed=$now
            kill "$qpid" 2>/dev/null || true
        elif [[ -n "$started" && "$HANG_TIMEOUT" != 0 ]] && ((now - beat_ns > HANG_TIMEOUT * 1000000000)); then
            stopped=1
            killed=$now
            kill "$qpid" 2>/dev/null || true
        elif [[ "$TIMEOUT" != 0 ]] && ((now - boot_ns > TIMEOUT * 1000000000)); then
            timed_out=1
            killed=$now
            kill "$qpid" 2>/dev/null || true
        fi
        sleep 0.5
    done
    set +e
    wait "$qpid"
    qrc=$?
    QPID=""
    wait "$tpid"
    set -e
    WHY=""
    if [[ -e "$SHARE/status" ]]; then
        RC=$(cat "$SHARE/status")
        [[ "$RC" =~ ^[0-9]+$ ]] || { log "unreadable exit status '$RC' from the guest"; RC=255; }
    elif ((hung)); then
        RC=255
        WHY="no runner within ${BOOT_TIMEOUT}s of booting (KHMON_VM_BOOT_TIMEOUT): a hung boot"
    elif ((stopped)); then
        RC=255
        WHY="no heartbeat from the guest for ${HANG_TIMEOUT}s (KHMON_VM_HANG_TIMEOUT) under the command: a hung kernel"
    elif ((timed_out)); then
        RC=124
        log "guest killed after ${TIMEOUT}s (KHMON_VM_TIMEOUT)"
    elif grep -q '^khmon-init: error:' "$CONSOLE_LOG"; then
        RC=125
        log "the guest's initramfs failed: $(grep -m1 '^khmon-init: error:' "$CONSOLE_LOG")"
    elif ((qrc != 0)); then
        RC=255
        log "qemu failed (exit $qrc): $(head -n3 "$SHARE/qemu.log" | paste -sd' ')"
    elif grep -qE 'Kernel panic|Oops' "$CONSOLE_LOG"; then
        RC=255
        WHY="kernel panic: $(grep -m1 -E 'Oops|BUG|Kernel panic' "$CONSOLE_LOG")"
    elif [[ -z "$started" ]]; then
        RC=255
        WHY="the guest powered off before the command started: a boot failure"
    else
        RC=255
        log "the guest died under the command, with no panic on its console"
    fi
    if [[ -s "$SHARE/journal.log" ]]; then
        cp "$SHARE/journal.log" "$JOURNAL_LOG"
    fi
}
console_tail() {
    log "last lines of the guest's console ($CONSOLE_LOG):"
    tail -n 40 "$CONSOLE_LOG" | sed 's/^/  console| /' >&2
}

boot
if [[ -n "$WHY" ]]; then
    log "$SERIES ($RELEASE) died on its own ($(secs_since)s): $WHY"
    console_tail
    cp "$CONSOLE_LOG" "$CONSOLE_LOG.died"
    log "booting $RELEASE once more (the first console is kept in $CONSOLE_LOG.died)"
    boot
    [[ -z "$WHY" ]] || log "$SERIES ($RELEASE) died on its own again: $WHY"
fi
if ((RC != 0)); then
    console_tail
fi
log "$SERIES ($RELEASE) exit=$RC elapsed=$(secs_since)s"
exit "$RC"
