#!/usr/bin/env bash
# Checks deploy/systemd/charon-node.service with `systemd-analyze verify`
# (any warning counts as a failure) and prints its `systemd-analyze
# security` exposure score, without installing anything on this machine:
# both run against a throw-away root (--root) that holds the unit, the
# systemd units of this host, /bin/sh and the binaries at the paths the
# unit names.
#
# Usage: deploy/systemd/verify.sh [BIN_DIR]
#   BIN_DIR  where charon-node and charonctl are (default: target/release,
#            else target/debug)
# Needs: systemd-analyze (apt-get install systemd).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
unit="$here/charon-node.service"
bin_dir=${1:-}
if [[ -z $bin_dir ]]; then
    for d in "$repo/target/release" "$repo/target/debug"; do
        [[ -x $d/charon-node ]] && bin_dir=$d && break
    done
fi
[[ -n $bin_dir && -x $bin_dir/charon-node ]] ||
    { echo "verify.sh: no charon-node binary (cargo build --release -p charon-node)" >&2; exit 1; }
command -v systemd-analyze >/dev/null || { echo "verify.sh: systemd-analyze is missing (apt-get install systemd)" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/charon-systemd-verify.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/etc/charon" "$root/usr/lib/systemd" "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
[[ -L /lib ]] && ln -s usr/lib "$root/lib"
cp "$bin_dir/charon-node" "$root/usr/local/bin/"
[[ -x $bin_dir/charonctl ]] && cp "$bin_dir/charonctl" "$root/usr/local/bin/"
cp "$(readlink -f /bin/sh)" "$root/bin/sh"
cp "$unit" "$root/etc/systemd/system/"
cp "$here/charon-node.env" "$root/etc/charon/charon-node.env"
: >"$root/etc/charon/secrets.env"

echo "== systemd-analyze verify charon-node.service ($(systemd-analyze --version | head -n 1))"
out=$(systemd-analyze --root="$root" verify "$root/etc/systemd/system/charon-node.service" 2>&1) && status=0 || status=$?
if ((status != 0)) || [[ -n $out ]]; then
    echo "$out"
    echo "verify.sh: FAILED (status $status)" >&2
    exit 1
fi
echo "clean: no warnings"

echo "== systemd-analyze security --offline charon-node.service"
systemd-analyze --root="$root" security --offline=true --no-pager \
    "$root/etc/systemd/system/charon-node.service" 2>&1 | tail -n 1
