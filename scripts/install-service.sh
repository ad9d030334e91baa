#!/usr/bin/env bash
# install-service.sh — install khmon.service for this checkout (`make install-service`).
#
#   scripts/install-service.sh [--root DIR]
#
# Writes <root>/etc/systemd/system/khmon.service from systemd/khmon.service, with ExecStart
# pointing at this checkout's .venv/bin/khmon (and ProtectHome=read-only when the checkout
# is under /home or /root, which ProtectHome=yes would hide; and the checkout bound read-only
# into the service's private /tmp when it lives under /tmp or /var/tmp, which PrivateTmp=yes
# would hide), and <root>/etc/default/khmon
# from systemd/khmon.env unless one is there already (it holds the local choices). Then,
# where systemd runs (and --root is /), `systemctl daemon-reload`. Start it with
# `systemctl enable --now khmon`. --root installs into another tree (the unit tests use it).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=/
die() { echo "install-service: error: $*" >&2; exit 1; }
say() { echo "install-service: $*" >&2; }
while (($#)); do
    case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    *) die "unknown argument '$1' (usage: install-service.sh [--root DIR])" ;;
    esac
done
khmon="$repo/.venv/bin/khmon"
[[ -x "$khmon" ]] || die "$khmon is missing (run make setup first)"
protect_home=yes
bind=""
case "$repo" in
/tmp/* | /var/tmp/*) bind="BindReadOnlyPaths=$repo" ;;
/home/* | /root/* | /run/user/*) protect_home=read-only ;;
esac
[[ "$repo" != *[[:space:]#]* ]] || die "the checkout path '$repo' has a space or '#' in it, which ExecStart= cannot take (clone it elsewhere)"
[[ $root == / || $(id -u) == 0 || -w "$root" ]] || die "cannot write to $root"
[[ $root != / || $(id -u) == 0 ]] || die "must run as root (it writes /etc/systemd/system; try sudo make install-service)"

unit_dir="$root/etc/systemd/system"
env_dir="$root/etc/default"
mkdir -p "$unit_dir" "$env_dir"
sed -e "s#^ExecStart=/usr/local/lib/khmon/.venv/bin/khmon #ExecStart=$khmon #" \
    -e "s#^ProtectHome=.*#ProtectHome=$protect_home#" \
    -e "s#^Documentation=.*#Documentation=file://$repo/README.md#" \
    -e "s#^PrivateTmp=yes\$#&${bind:+\\n$bind}#" \
    "$repo/systemd/khmon.service" >"$unit_dir/khmon.service.tmp"
grep -q "^ExecStart=$khmon daemon" "$unit_dir/khmon.service.tmp" || die "systemd/khmon.service has no ExecStart line to rewrite"
chmod 0644 "$unit_dir/khmon.service.tmp"
mv "$unit_dir/khmon.service.tmp" "$unit_dir/khmon.service"
say "installed $unit_dir/khmon.service (ExecStart=$khmon daemon)"
if [[ -e "$env_dir/khmon" ]]; then
    say "kept $env_dir/khmon (the defaults are in systemd/khmon.env)"
else
    install -m 0644 "$repo/systemd/khmon.env" "$env_dir/khmon"
    say "installed $env_dir/khmon (the daemon's options)"
fi
if [[ $root == / && -d /run/systemd/system ]]; then
    systemctl daemon-reload
    say "systemd reloaded; start it with: systemctl enable --now khmon"
else
    say "systemd is not running here: nothing reloaded"
fi
