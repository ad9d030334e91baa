#!/usr/bin/env bash
# khmon machine set-up: idempotent, run by `make setup` (and so by `make demo` and `make test`).
#
# It installs what a fresh Debian machine lacks for live capture:
#   - Debian packages: bcc's Python bindings (python3-bpfcc; PyPI has no bcc), bpftool (BTF
#     dumps for doctor and struct offsets), bpftrace (the benchmark's reference probe), venv.
#   - kernel headers for bcc: the running kernel's package where Debian has one, otherwise the
#     nearest Debian linux-headers version, wired as /lib/modules/$(uname -r)/{build,source}
#     (Debian splits headers into a build half, -<arch>, and a source half, -common; bcc
#     needs both).
#   - tracefs mounted at /sys/kernel/tracing.
#   - a virtualenv at .venv holding khmon (editable) that can import bcc.
# and for the service half's tests (tests/service, dashboards/schema):
#   - tmux (the TUI tests drive `khmon top` in a real terminal), openssl (self-signed certificates
#     for the TLS scrape tests), node and npm (Debian's, where the machine has none).
#   - Prometheus and promtool from Debian's prometheus package, unpacked into
#     /var/cache/khmon/prometheus, never installed: no service, no user, no dpkg state.
#   - dashboards/schema/node_modules (@grafana/schema and typescript) by `npm ci` from the lock file.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, kernel headers and tracefs need it); try: sudo make setup"

APT_PKGS=(python3-bpfcc bpfcc-tools bpftool bpftrace python3-venv python3-pip tmux openssl)
# node and npm: whatever the machine has (it may carry another build, which bundles npm and would
# conflict with Debian's npm); Debian's only where a command is missing.
command -v node >/dev/null || APT_PKGS+=(nodejs)
command -v npm >/dev/null || APT_PKGS+=(npm)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed: check the Debian mirror in /etc/apt/sources.list.d"
    apt_updated=1
  fi
}
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi

# --- kernel headers for bcc ---------------------------------------------------------------
rel=$(uname -r)
arch=$(dpkg --print-architecture)
moddir=/lib/modules/$rel
if [ ! -e "$moddir/build/include/linux/kconfig.h" ] && [ ! -e "$moddir/source/include/linux/kconfig.h" ]; then
  apt_update
  if apt-cache show "linux-headers-$rel" >/dev/null 2>&1; then
    say "installing linux-headers-$rel"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$rel" >/dev/null \
      || die "apt-get install linux-headers-$rel failed"
  else
    # No package for this kernel (a custom or cloud kernel): take the Debian headers whose
    # version is nearest to the running one. bcc only needs them for its helper headers;
    # khmon reads every struct offset from the running kernel's BTF, never from headers.
    want=$(echo "$rel" | awk -F. '{print $1*1000 + $2}')
    pkg=$(apt-cache pkgnames linux-headers- | grep -E "^linux-headers-[0-9]+\.[0-9]+[^-]*-[0-9a-z+]*-?$arch\$" \
          | grep -vE -- '-(cloud|rt)-' | sort -V \
          | awk -v want="$want" -v pre="linux-headers-" '{
              v=substr($0, length(pre)+1); split(v, a, "."); n=a[1]*1000 + a[2];
              d=(n>want)?n-want:want-n; if (best=="" || d<=bd) {best=$0; bd=d} }
              END {print best}')
    [ -n "$pkg" ] || die "no linux-headers package for $rel and none to fall back on; install kernel headers for $rel and link them at $moddir/build"
    say "no linux-headers-$rel in Debian; using the nearest, $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null || die "apt-get install $pkg failed"
    hrel=${pkg#linux-headers-}
    common=/usr/src/linux-headers-${hrel%-"$arch"}-common
    [ -d "/usr/src/$pkg" ] && [ -d "$common" ] || die "$pkg installed but /usr/src/$pkg or $common is missing"
    mkdir -p "$moddir"
    ln -sfn "/usr/src/$pkg" "$moddir/build"
    ln -sfn "$common" "$moddir/source"
  fi
fi

# --- tracefs ----------------------------------------------------------------------------------
if [ ! -d /sys/kernel/tracing/events ]; then
  say "mounting tracefs at /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing || die "cannot mount tracefs at /sys/kernel/tracing"
fi

# --- virtualenv ---------------------------------------------------------------------------------
# Debian's interpreter: python3-bpfcc is built for it, and it is on every Debian machine.
PY=/usr/bin/python3
stamp=.venv/.khmon-installed
want_stamp=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv || die "python3 -m venv failed"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
  say "installing khmon into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]' || die "pip install of khmon failed"
  .venv/bin/python -c 'import prometheus_client, promql_parser, textual
from grafana_foundation_sdk.builders import dashboard' \
    || die "the venv cannot import the service dependencies after pip install; see pyproject.toml"
  echo "$want_stamp" > "$stamp"
fi
# bcc is pure Python over libbcc: expose just Debian's bcc package to the venv, nothing else
# from the system site-packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
.venv/bin/python -c 'import bcc' || die "the venv cannot import bcc (python3-bpfcc installed?)"

# --- Prometheus and promtool (tests/service), unpacked from Debian's package -----------------
# `apt-get download` + `dpkg-deb -x` rather than `apt-get install`: the package would start a
# service and create a user; the tests only need the two (statically built) binaries.
PROM_DIR=/var/cache/khmon/prometheus
if ! "$PROM_DIR/prometheus" --version >/dev/null 2>&1 || ! "$PROM_DIR/promtool" --version >/dev/null 2>&1; then
  apt-cache show prometheus >/dev/null 2>&1 || apt_update
  say "unpacking Debian's prometheus package into $PROM_DIR"
  ptmp=$(mktemp -d)
  # Owned by _apt, so that apt downloads in its sandbox instead of warning.
  chown _apt "$ptmp" 2>/dev/null || true
  (cd "$ptmp" && apt-get download -q prometheus) >"$ptmp/log" 2>&1 \
    || die "apt-get download prometheus failed ($(tail -n1 "$ptmp/log")); check the Debian mirror in /etc/apt/sources.list.d"
  deb=$(ls "$ptmp"/prometheus_*.deb)
  dpkg-deb -x "$deb" "$ptmp/root" || die "dpkg-deb -x $deb failed"
  for b in prometheus promtool; do
    "$ptmp/root/usr/bin/$b" --version >/dev/null 2>&1 || die "the unpacked $b does not run: $ptmp/root/usr/bin/$b --version"
  done
  rm -rf "$PROM_DIR"
  mkdir -p "$PROM_DIR"
  mv "$ptmp/root/usr/bin/prometheus" "$ptmp/root/usr/bin/promtool" "$PROM_DIR/"
  basename "$deb" > "$PROM_DIR/SOURCE"
  rm -rf "$ptmp"
fi

# --- the dashboard schema checker's npm packages (dashboards/schema) ----------------------
# Keyed on package.json and the lock file, as .venv is on pyproject.toml; npm ci empties
# node_modules first, so a stale stamp never survives a reinstall.
schema=dashboards/schema
npm_stamp=$schema/node_modules/.khmon-installed
want_npm=$(cat "$schema/package.json" "$schema/package-lock.json" | sha256sum | cut -c1-16)
if [ "$(cat "$npm_stamp" 2>/dev/null)" != "$want_npm" ]; then
  say "npm ci in $schema"
  nlog=$(mktemp)
  (cd "$schema" && npm ci --no-audit --no-fund --loglevel=error) >"$nlog" 2>&1 \
    || die "npm ci in $schema failed ($(grep -m1 -i 'err' "$nlog" || tail -n1 "$nlog")); is the npm registry reachable?"
  rm -f "$nlog"
  "$schema/node_modules/.bin/tsc" --version >/dev/null 2>&1 || die "$schema/node_modules/.bin/tsc does not run after npm ci"
  echo "$want_npm" > "$npm_stamp"
fi
say "ok: .venv/bin/khmon ready"
