#!/usr/bin/env bash
# kernels.sh — fetch Debian kernels (image, modules, headers) for khmon's
# guest-kernel tests, without installing anything into the host's dpkg database.
#
#   tests/vm/kernels.sh fetch   <6.1|7.2>   resolve + download + unpack + wire up;
#                                           last stdout line: release=<r> vmlinuz=<path>
#   tests/vm/kernels.sh release <6.1|7.2>   print the release of the fetched kernel
#   tests/vm/kernels.sh vmlinuz <6.1|7.2>   print the vmlinuz path of the fetched kernel
#                                           (always /usr/lib/modules/<release>/vmlinuz)
#
# Series:
#   6.1  bookworm's current kernel: whatever linux-image-amd64 depends on, read
#        from the host's own apt sources (bookworm, -updates, -security).
#   7.2  the newest Debian kernel >= 7.2 in sid, via a private apt configuration.
#
# Everything is unpacked under ${KHMON_CACHE:-/var/cache/khmon}/kernels/<release>/.
# The modules are then hard-linked (or copied) to /usr/lib/modules/<release>/
# because the guest, booted on the host's root file system (run.sh), loads its
# modules from there (and run.sh's initramfs takes its first few from there), and
# build/source links there point bcc at the headers.
#
# Environment: KHMON_CACHE (cache root), KHMON_DEBIAN_MIRROR (override the
# mirror URI taken from the host's apt sources, e.g. http://host/debian).
set -euo pipefail

CACHE="${KHMON_CACHE:-/var/cache/khmon}"
KDIR="$CACHE/kernels"
PROG="kernels.sh"

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

usage() {
    echo "usage: $PROG {fetch|release|vmlinuz} <6.1|7.2>" >&2
    exit 2
}

# The Debian mirror the host already uses (first non-security .../debian URI in
# its apt sources), so sid comes from the same registry as everything else.
debian_mirror() {
    if [[ -n "${KHMON_DEBIAN_MIRROR:-}" ]]; then
        echo "${KHMON_DEBIAN_MIRROR%/}"
        return
    fi
    local uri
    uri=$(
        {
            cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
                sed -nE 's/^[[:space:]]*URIs:[[:space:]]*//p' | tr -s '[:blank:]' '\n'
            cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
                sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p'
        } | grep -E '^https?://[^/]+(/.*)?/debian/?$' | head -n1 || true
    )
    [[ -n "$uri" ]] || die "no Debian mirror (http://<host>/debian) found in the host's apt sources; set KHMON_DEBIAN_MIRROR"
    echo "${uri%/}"
}

# APT_OPTS: a private apt state (lists + archive cache) per series, so nothing
# touches the host's package lists or dpkg database. 6.1 reads the host's own
# sources; 7.2 reads a private sources.list naming sid on the host's mirror.
setup_apt() {
    local series="$1" st="$CACHE/apt/$1"
    mkdir -p "$st/lists/partial" "$st/cache/archives/partial"
    APT_OPTS=(
        -o "Dir::State::Lists=$st/lists"
        -o "Dir::Cache=$st/cache"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Retries=2"
        -o "Acquire::http::Timeout=30"
    )
    APT_DESC="the host's apt sources"
    if [[ "$series" == 7.2 ]]; then
        local mirror
        mirror=$(debian_mirror)
        echo "deb [trusted=yes] $mirror sid main" >"$st/sources.list"
        APT_OPTS+=(-o "Dir::Etc::SourceList=$st/sources.list" -o "Dir::Etc::SourceParts=/dev/null")
        APT_DESC="$mirror sid"
    fi
    APT_STATE="$st"
}

# Always refresh the index: the point is to follow the registry, not a pinned
# version. Error-Mode=any turns "some index files failed" into a failure.
apt_update() {
    local logf="$APT_STATE/update.log"
    log "apt-get update ($APT_DESC)"
    if ! apt-get "${APT_OPTS[@]}" -o APT::Update::Error-Mode=any -q update >"$logf" 2>&1; then
        local why
        # "Failed to fetch <url>  <reason>" names both what and why.
        why=$(grep -m1 -E '^[EW]: Failed to fetch' "$logf" || grep -m1 -E '^(E|W|Err):' "$logf" || true)
        die "cannot reach Debian's package registry ($APT_DESC): apt-get update failed: ${why:-see $logf}"
    fi
}

# Dependencies of a package, one name per line (alternatives included).
deps_of() {
    apt-cache "${APT_OPTS[@]}" depends "$1" 2>/dev/null |
        sed -nE 's/^[[:space:]]*\|?(Pre)?Depends:[[:space:]]*([^[:space:]<>]+).*/\2/p'
}

# Print the release (uname -r) this series resolves to right now.
resolve_release() {
    local series="$1" rel=""
    case "$series" in
    6.1)
        # bookworm's "current" kernel is what the linux-image-amd64 metapackage pulls in.
        rel=$(deps_of linux-image-amd64 | sed -nE 's/^linux-image-(6\.1\.[0-9]+-[0-9]+-amd64)$/\1/p' |
            sort -V | tail -n1)
        [[ -n "$rel" ]] || die "linux-image-amd64 in $APT_DESC does not depend on a linux-image-6.1.*-amd64"
        ;;
    7.2)
        # sid names real kernel packages linux-binary-<version>-amd64; take the
        # newest whose version is >= 7.2 (cloud/rt/unsigned flavours excluded).
        local v
        rel=$(apt-cache "${APT_OPTS[@]}" search --names-only '^linux-binary-[0-9][^- ]*-amd64$' |
            sed -nE 's/^linux-binary-([0-9][^- ]*)-amd64 .*/\1/p' |
            while read -r v; do
                if dpkg --compare-versions "$v" ge 7.2; then echo "$v"; fi
            done | sort -V | tail -n1)
        [[ -n "$rel" ]] || die "no linux-binary-<version>-amd64 with version >= 7.2 in $APT_DESC"
        rel="$rel-amd64"
        ;;
    esac
    echo "$rel"
}

# The packages that make up kernel <rel>: image (or, where linux-image-<rel> is
# only a metapackage, its linux-binary/-modules/-base parts), the -amd64 headers,
# the -common headers and the kbuild package the headers' symlinks point into.
package_list() {
    local rel="$1" d parts=() hdr_deps
    while read -r d; do
        case "$d" in
        "linux-binary-$rel" | "linux-modules-$rel" | "linux-base-$rel") parts+=("$d") ;;
        esac
    done < <(deps_of "linux-image-$rel")
    if ((${#parts[@]} == 0)); then
        parts=("linux-image-$rel") # bookworm: the image package is the real thing
    fi
    hdr_deps=$(deps_of "linux-headers-$rel")
    COMMON_PKG=$(grep -E '^linux-headers-.*-common$' <<<"$hdr_deps" | head -n1 || true)
    KBUILD_PKG=$(grep -E '^linux-kbuild-' <<<"$hdr_deps" | head -n1 || true)
    [[ -n "$COMMON_PKG" ]] || die "linux-headers-$rel does not depend on a linux-headers-*-common package"
    [[ -n "$KBUILD_PKG" ]] || die "linux-headers-$rel does not depend on a linux-kbuild-* package"
    PKGS=("${parts[@]}" "linux-headers-$rel" "$COMMON_PKG" "$KBUILD_PKG")
}

# Download + dpkg -x into <cache>/kernels/<rel>/root (skipped if already complete).
# Unpacked into a temporary dir and renamed, so an interrupted fetch never
# leaves a half-populated tree that looks finished.
download_unpack() {
    local rel="$1" dest="$KDIR/$1" tmp="$KDIR/.$1.tmp" deb why
    if [[ -f "$dest/.complete" ]]; then
        log "$rel already unpacked in $dest"
        return
    fi
    rm -rf "$tmp"
    mkdir -p "$tmp/debs" "$tmp/root"
    log "downloading ${PKGS[*]}"
    if ! (cd "$tmp/debs" && apt-get "${APT_OPTS[@]}" -q download "${PKGS[@]}") >"$tmp/download.log" 2>&1; then
        why=$(grep -m1 -E '^(E|W|Err):' "$tmp/download.log" || true)
        die "apt-get download of ${PKGS[*]} failed: ${why:-see $tmp/download.log}"
    fi
    for deb in "$tmp"/debs/*.deb; do
        dpkg-deb -f "$deb" Package Version | paste -sd' ' >>"$tmp/packages.txt"
        dpkg -x "$deb" "$tmp/root"
    done
    rm -rf "$tmp/debs" # the unpacked tree is all we use; keep the cache small
    touch "$tmp/.complete"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

# Debian's -amd64 headers reference the -common dir (and linux-kbuild) by
# relative symlinks, and the Makefile by absolute /usr/src path. All three
# packages are unpacked into the same root so the symlinks resolve; the
# Makefile's absolute include is rewritten to the cached -common dir.
check_headers() {
    local rel="$1" root="$KDIR/$1/root" hdir cdir broken abs
    hdir="$root/usr/src/linux-headers-$rel"
    cdir="$root/usr/src/$COMMON_PKG"
    [[ -d "$hdir" ]] || die "headers dir $hdir missing after unpack"
    [[ -d "$cdir" ]] || die "common headers dir $cdir missing after unpack"
    # Rewrite the Makefile's absolute /usr/src paths ("include /usr/src/
    # linux-headers-<x>-common/Makefile"; 7.x also has "KBUILD_OUTPUT=/usr/src/
    # linux-headers-<rel>") to the cache; already-rewritten paths are preceded
    # by ".../root" and so are left alone on a re-run.
    sed -i -E "s#(^|[^[:alnum:]_./-])/usr/src/linux-headers-#\1$root/usr/src/linux-headers-#g" "$hdir/Makefile"
    broken=$(find "$hdir" "$cdir" -xtype l -print | head -n5)
    [[ -z "$broken" ]] || die "broken symlinks in unpacked headers: $(echo "$broken" | paste -sd' ')"
    # An absolute link would resolve against the host's /usr/src, not the cache.
    abs=$(find "$hdir" "$cdir" -type l -lname '/*' -print | head -n5)
    [[ -z "$abs" ]] || die "absolute symlinks in unpacked headers (would escape the cache): $(echo "$abs" | paste -sd' ')"
    grep -q "$cdir" "$hdir/Makefile" || die "$hdir/Makefile does not reference $cdir"
    [[ -e "$cdir/Makefile" && -e "$cdir/include/linux/kconfig.h" ]] || die "$cdir lacks Makefile or include/linux/kconfig.h"
    HDIR="$hdir"
    CDIR="$cdir"
}

# Put the modules where modprobe (run.sh's initramfs build, and the guest) looks,
# index them, and point build/source at the cached headers for bcc.
wire_modules() {
    local rel="$1" dest="$KDIR/$1" src="" dst="/usr/lib/modules/$1" stamp
    for src in "$dest/root/usr/lib/modules/$rel" "$dest/root/lib/modules/$rel"; do
        [[ -d "$src/kernel" ]] && break
        src=""
    done
    [[ -n "$src" ]] || die "no modules dir for $rel in $dest/root (package layout changed?)"
    stamp="$dst/.khmon-cache"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$dest" || ! -s "$dst/modules.dep" ]]; then
        log "installing modules into $dst"
        mkdir -p "$dst"
        # Hard links cost no space; fall back to a copy across file systems.
        cp -a -l -f "$src/." "$dst/" 2>/dev/null || cp -a -f "$src/." "$dst/"
        rm -f "$dst/build" "$dst/source"
        command -v depmod >/dev/null || die "depmod not found (apt-get install kmod)"
        depmod "$rel"
        [[ -s "$dst/modules.dep" ]] || die "depmod $rel produced no modules.dep"
        echo "$dest" >"$stamp"
    fi
    ln -sfn "$HDIR" "$dst/build"
    ln -sfn "$CDIR" "$dst/source"
    # The image lives next to its modules, where Debian's own packages put it,
    # so `kernels.sh vmlinuz` has one answer: /usr/lib/modules/<rel>/vmlinuz.
    local img
    img=$(find_cached_vmlinuz "$rel")
    if ! cmp -s "$img" "$dst/vmlinuz"; then
        ln -f "$img" "$dst/vmlinuz" 2>/dev/null || cp -f "$img" "$dst/vmlinuz"
    fi
}

find_cached_vmlinuz() {
    local rel="$1" root="$KDIR/$1/root" f
    for f in "$root/boot/vmlinuz-$rel" "$root/usr/lib/modules/$rel/vmlinuz" "$root/lib/modules/$rel/vmlinuz"; do
        if [[ -f "$f" ]]; then
            echo "$f"
            return
        fi
    done
    die "no vmlinuz for $rel under $root"
}

cmd_fetch() {
    local series="$1" rel vmlinuz
    command -v apt-get >/dev/null || die "apt-get not found (this needs a Debian host)"
    mkdir -p "$KDIR"
    # One fetch per series at a time (run.sh may be started for both kernels at once).
    exec 9>"$KDIR/.$series.lock"
    flock 9
    setup_apt "$series"
    apt_update
    rel=$(resolve_release "$series")
    log "series $series resolves to $rel"
    package_list "$rel"
    download_unpack "$rel"
    check_headers "$rel"
    wire_modules "$rel"
    vmlinuz="/usr/lib/modules/$rel/vmlinuz"
    echo "$rel" >"$KDIR/$series.release"
    echo "release=$rel vmlinuz=$vmlinuz"
}

fetched_release() {
    local series="$1" f="$KDIR/$1.release" rel
    [[ -s "$f" ]] || die "no $series kernel fetched yet (run: $0 fetch $series)"
    rel=$(cat "$f")
    [[ -f "$KDIR/$rel/.complete" ]] || die "$series kernel $rel is recorded but $KDIR/$rel is incomplete (run: $0 fetch $series)"
    echo "$rel"
}

[[ $# -eq 2 ]] || usage
case "$2" in 6.1 | 7.2) ;; *) usage ;; esac
case "$1" in
fetch) cmd_fetch "$2" ;;
release) fetched_release "$2" ;;
vmlinuz)
    rel=$(fetched_release "$2")
    [[ -f "/usr/lib/modules/$rel/vmlinuz" ]] || die "/usr/lib/modules/$rel/vmlinuz missing (run: $0 fetch $2)"
    echo "/usr/lib/modules/$rel/vmlinuz"
    ;;
*) usage ;;
esac
