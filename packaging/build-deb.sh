#!/usr/bin/env bash
# Build the Debian package and check its file list.
#
#   bash packaging/build-deb.sh        # -> target/debian/presenced_<version>_<arch>.deb
#
# Needs cargo-deb (`cargo install cargo-deb --locked`) and dpkg-deb. Builds the
# release binaries, renders the man pages and shell completions with
# presenced-assets, packs the .deb as daemon/Cargo.toml [package.metadata.deb]
# says, then fails unless every file listed in packaging/deb-files.txt is in it.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release -p presenced --bins
rm -rf "$target_dir/release/assets"
"$target_dir/release/presenced-assets" "$target_dir/release/assets"
deb=$(cargo deb -p presenced --no-build --no-strip 2>&1 | tail -n 1)
[ -f "$deb" ] || { echo "cargo deb did not report a .deb: $deb" >&2; exit 1; }

listing=$(dpkg-deb -c "$deb" | awk '{print $NF}' | sed 's|^\./|/|')
missing=0
while read -r want; do
  case "$want" in ''|'#'*) continue ;; esac
  if ! grep -qxF "$want" <<<"$listing"; then
    echo "missing from $deb: $want" >&2
    missing=1
  fi
done < packaging/deb-files.txt
[ "$missing" -eq 0 ] || exit 1
# The example config is a conffile, so local edits survive an upgrade.
dpkg-deb -e "$deb" "$target_dir/debian/control.d" 2>/dev/null || true
grep -qx /etc/presenced/presenced.toml "$target_dir/debian/control.d/conffiles" \
  || { echo "/etc/presenced/presenced.toml is not a conffile" >&2; exit 1; }
echo "deb ok: $deb ($(grep -c . <<<"$listing") entries)"
