#!/usr/bin/env bash
# Checks etc/systemd/bayard.service with `systemd-analyze verify`, without a running systemd
# (a CI container is fine). It installs nothing: systemd-analyze comes with the `systemd`
# package (Debian/Ubuntu: apt-get install -y systemd).
#
#   etc/systemd/verify.sh [BINARY] [UNIT]
#
# BINARY: the bayard binary the unit's ExecStart is pointed at for the check, because
#         /usr/local/bin/bayard does not exist on a build machine (default:
#         target/release/bayard of this checkout). UNIT: the unit file (default: the
#         bayard.service next to this script).
#
# Fails on any warning or error systemd-analyze prints about the unit (unknown keys, bad
# values, missing executables); lines about other units of the machine are shown but ignored.
set -euo pipefail

started=$(date +%s%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

binary=${1:-$root/target/release/bayard}
unit=${2:-$here/bayard.service}

fail() {
    echo "error: $*" >&2
    exit 1
}

command -v systemd-analyze >/dev/null 2>&1 ||
    fail "systemd-analyze not found; install the systemd package (apt-get install -y systemd)"
[ -f "$unit" ] || fail "no unit file at $unit"
[ -e "$binary" ] || fail "no bayard binary at $binary (build it with cargo build --release, or pass its path)"
binary_dir=$(cd "$(dirname "$binary")" && pwd)
binary="$binary_dir/$(basename "$binary")"
[ -x "$binary" ] || fail "$binary is not executable"
case "$binary" in
*[[:space:]\|\&\\]*) fail "the binary path may not contain spaces, '|', '&' or '\\': $binary" ;;
esac

name=$(basename "$unit")
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
copy="$workdir/$name"

# Point ExecStart at the given binary; everything else stays as shipped.
grep -q '^ExecStart=/usr/local/bin/bayard serve$' "$unit" ||
    fail "$unit: expected the line 'ExecStart=/usr/local/bin/bayard serve'"
sed "s|^ExecStart=/usr/local/bin/bayard serve\$|ExecStart=$binary serve|" "$unit" >"$copy"
grep -qxF "ExecStart=$binary serve" "$copy" || fail "could not rewrite ExecStart in the copy of $unit"

options=(--man=no)
# Newer systemd can limit the verdict to this unit instead of everything it pulls in.
if systemd-analyze --help 2>/dev/null | grep -q -- '--recursive-errors'; then
    options+=(--recursive-errors=no)
fi

set +e
output=$(systemd-analyze verify "${options[@]}" "$copy" 2>&1)
status=$?
set -e

about_unit=$(printf '%s\n' "$output" | grep -F -e "$name" -e "$workdir" || true)
other=$(printf '%s\n' "$output" | grep -v -F -e "$name" -e "$workdir" | grep -v '^$' || true)

if [ -n "$other" ]; then
    echo "note: systemd-analyze said this about other units of this machine (ignored):"
    printf '%s\n' "$other" | sed 's/^/  /'
fi
if [ -n "$about_unit" ]; then
    echo "error: systemd-analyze verify found problems in $name:" >&2
    printf '%s\n' "$about_unit" | sed "s|$workdir/||g; s/^/  /" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    fail "systemd-analyze verify exited with status $status"
fi

elapsed_ms=$((($(date +%s%N) - started) / 1000000))
echo "systemd unit verified: $name (systemd $(systemd-analyze --version | awk 'NR == 1 { print $2 }'), ExecStart checked against $binary, ${elapsed_ms} ms)"
