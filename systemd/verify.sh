#!/usr/bin/env bash
# Verify systemd/presenced.service (and presenced.sysusers.conf) with the
# systemd tools, without booting systemd or installing anything.
#
# Usage: systemd/verify.sh [BINARY]
#   BINARY  absolute path of the presenced binary to put in ExecStart=
#           (default: <repo>/target/debug/presenced; build it first with
#           `cargo build -p presenced`). `systemd/verify.sh /bin/true` checks the
#           unit alone while the daemon binary is not buildable.
#
# Why rewrite ExecStart: `systemd-analyze verify` checks that the ExecStart
# binary exists and is executable, and /usr/bin/presenced is not installed on a
# build machine. The unit is copied to a temporary directory (same file name, so
# the unit name is unchanged), only ExecStart's binary path is replaced, and the
# copy is verified. Nothing else is altered.
#
# Also: `systemd-analyze security --offline=true` on the same copy; its overall
# exposure level must be <= 1.5 (MAX_EXPOSURE in the environment overrides).
#
# Failure (exit 1): systemd-analyze exits non-zero, or prints anything about
# presenced.service (systemd-analyze exits 0 on e.g. "Unknown key ... ignoring",
# which for us is a typo, so any such line fails the check). Lines that name a
# unit file under /usr/lib, /lib, /etc or /run (another installed unit pulled
# in as a dependency, e.g. a distro unit with a deprecated key) are shown but do
# not fail the check: they are not ours to fix.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
unit_src="$here/presenced.service"
sysusers_src="$here/presenced.sysusers.conf"
bin="${1:-$repo/target/debug/presenced}"

die() { echo "verify.sh: $*" >&2; exit 1; }

command -v systemd-analyze >/dev/null || die "systemd-analyze not found (install systemd)"
[[ "$bin" == /* ]] || die "BINARY must be an absolute path, got '$bin'"
[[ -x "$bin" ]] || die "BINARY '$bin' is not an executable file (build it: cargo build -p presenced)"
[[ -f "$unit_src" ]] || die "missing $unit_src"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
unit="$tmp/presenced.service"

# Replace only the binary (first word) of ExecStart=, keep the arguments.
n_exec="$(grep -c '^ExecStart=/usr/bin/presenced ' "$unit_src" || true)"
[[ "$n_exec" == 1 ]] || die "expected exactly one 'ExecStart=/usr/bin/presenced ...' line in $unit_src, found $n_exec"
bin_sed="${bin//\\/\\\\}"
bin_sed="${bin_sed//|/\\|}"
bin_sed="${bin_sed//&/\\&}"
sed "s|^ExecStart=/usr/bin/presenced |ExecStart=${bin_sed} |" "$unit_src" >"$unit"
grep -q "^ExecStart=${bin} " "$unit" || die "ExecStart rewrite failed"

status=0
echo "== systemd-analyze verify (ExecStart binary: $bin)"
set +e
out="$(systemd-analyze verify --recursive-errors=no "$unit" 2>&1)"
rc=$?
set -e
if [[ -n "$out" ]]; then
    while IFS= read -r line; do
        [[ -z "$line" ]] && continue
        if [[ "$line" =~ ^(/usr/lib|/lib|/etc|/run)/[^:]*\.[a-z]+: ]] && [[ "$line" != *presenced* ]]; then
            echo "  (another unit, not failing) $line"
        else
            echo "  ERROR: $line"
            status=1
        fi
    done <<<"$out"
fi
if [[ $rc -ne 0 ]]; then
    echo "  ERROR: systemd-analyze verify exited with status $rc"
    status=1
fi
[[ $status -eq 0 ]] && echo "  ok: presenced.service"

# Sandbox exposure: `systemd-analyze security` scores the unit from 0.0 (locked
# down) to 10.0; fail above MAX_EXPOSURE. --offline=true reads the unit file
# itself, not a loaded unit, so no systemd instance is needed.
MAX_EXPOSURE="${MAX_EXPOSURE:-1.5}"
echo "== systemd-analyze security --offline=true (exposure must be <= $MAX_EXPOSURE)"
set +e
sec="$(systemd-analyze security --offline=true "$unit" 2>&1)"
set -e
exposure="$(sed -n 's/.*Overall exposure level for presenced\.service: \([0-9][0-9]*\.[0-9]\).*/\1/p' <<<"$sec" | tail -1)"
if [[ -z "$exposure" ]]; then
    sed 's/^/  /' <<<"$sec"
    echo "  ERROR: no overall exposure level in the output of systemd-analyze security"
    status=1
elif awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e > m) }'; then
    grep '✗' <<<"$sec" | sed 's/^/  /' || true
    echo "  ERROR: exposure $exposure is above $MAX_EXPOSURE (items marked ✗ above)"
    status=1
else
    echo "  ok: exposure $exposure"
fi

if [[ -f "$sysusers_src" ]]; then
    if command -v systemd-sysusers >/dev/null; then
        echo "== systemd-sysusers --dry-run (empty root)"
        mkdir -p "$tmp/root/etc"
        set +e
        out="$(systemd-sysusers --root="$tmp/root" --dry-run "$sysusers_src" 2>&1)"
        rc=$?
        set -e
        if [[ $rc -ne 0 ]] || ! grep -q "Creating user 'presenced'" <<<"$out"; then
            sed 's/^/  /' <<<"$out"
            echo "  ERROR: systemd-sysusers rejected presenced.sysusers.conf (status $rc)"
            status=1
        else
            echo "  ok: presenced.sysusers.conf creates user and group presenced"
        fi
    else
        echo "== systemd-sysusers not found; presenced.sysusers.conf not checked"
    fi
fi

exit $status
