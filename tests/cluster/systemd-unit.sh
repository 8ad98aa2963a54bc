#!/usr/bin/env bash
# Runs deploy/systemd/charon-node.service under a real systemd, in a Docker
# container: systemd (PID 1) and /usr come from this host (bind-mounted
# read-only), /etc is a copy of the host's without its enabled units, the
# binaries are mounted at /usr/local/bin. Checks that:
#   - `systemd-analyze verify` is clean (deploy/systemd/verify.sh);
#   - the unit starts; the node runs as a dynamic (non-root) user with
#     NoNewPrivileges, a seccomp filter and no capability but
#     CAP_NET_BIND_SERVICE; /readyz says 200; a host added with charonctl is
#     proxied;
#   - `systemctl stop` drains (readyz 503, listeners closed) and the unit
#     ends with Result=success and exit status 0, inside TimeoutStopSec;
#   - after `systemctl start` the host is still there (StateDirectory).
#
# Usage: tests/cluster/systemd-unit.sh [BIN_DIR]   (default target/release)
# Prints "SKIPPED: ..." and exits 0 without a Docker engine, without systemd
# on this host, or when systemd cannot boot in a container here.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin_dir=${1:-$repo/target/release}
name="charon-systemd-test-$$"
image="charon-systemd-host:$$"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/charon-systemd-test.XXXXXX")

skip() {
    echo "SKIPPED: $*"
    exit 0
}
fail() {
    echo "FAILED: $*" >&2
    docker exec "$name" journalctl -u charon-node --no-pager -n 30 2>/dev/null >&2 || true
    exit 1
}
cleanup() {
    docker rm -f -v "$name" >/dev/null 2>&1 || true
    docker rmi "$image" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

docker info >/dev/null 2>&1 || skip "no Docker engine (docker info failed)"
[[ -x /usr/lib/systemd/systemd ]] || skip "no systemd on this host (/usr/lib/systemd/systemd)"
[[ -x $bin_dir/charon-node && -x $bin_dir/charonctl ]] || fail "no charon-node/charonctl in $bin_dir"
command -v python3 >/dev/null || fail "python3 is needed (the upstream inside the container)"

echo "== deploy/systemd/verify.sh"
"$repo/deploy/systemd/verify.sh" "$bin_dir"

# An image of mount points and the merged-/usr symlinks; all else is mounted.
mkdir -p "$tmp/ctx/rootfs" "$tmp/local/bin" "$tmp/var"
for d in etc var run tmp proc sys dev usr root home; do mkdir -p "$tmp/ctx/rootfs/$d"; done
for d in bin lib lib64 sbin; do
    [[ -L /$d ]] && ln -s "$(readlink "/$d")" "$tmp/ctx/rootfs/$d"
done
printf 'FROM scratch\nCOPY rootfs/ /\nENV container=docker\nSTOPSIGNAL SIGRTMIN+3\n' >"$tmp/ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$image" "$tmp/ctx" >/dev/null 2>&1 || fail "docker build of the systemd host image"
cp -a /etc "$tmp/etc"
rm -rf "$tmp"/etc/systemd/system/*.wants "$tmp/etc/machine-id"
od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$tmp/etc/machine-id"
echo >>"$tmp/etc/machine-id"
cp "$bin_dir/charon-node" "$bin_dir/charonctl" "$tmp/local/bin/"
mkdir -p "$tmp/etc/charon"
cp "$repo/deploy/systemd/charon-node.service" "$tmp/etc/systemd/system/"
cat >"$tmp/etc/charon/charon-node.env" <<'EOF'
CHARON_NODE_NAME=sd1
CHARON_HTTP_LISTEN=0.0.0.0:8080
CHARON_HTTPS_LISTEN=0.0.0.0:8443
CHARON_API_LISTEN=127.0.0.1:7070
CHARON_ADMIN_LISTEN=0.0.0.0:9090
CHARON_GOSSIP_LISTEN=127.0.0.1:7946
CHARON_DRAIN_DELAY_SECS=2
CHARON_DRAIN_DEADLINE_SECS=5
CHARON_DRAIN_SPREAD_SECS=1
NO_COLOR=1
EOF
(umask 077 && echo "CHARON_CLUSTER_SECRET=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')" >"$tmp/etc/charon/secrets.env")

echo "== booting systemd $(/usr/lib/systemd/systemd --version | head -n 1 | awk '{print $2}') in a container"
# SYS_ADMIN for the mount namespaces of the unit's sandboxing; the host's
# cgroup tree for systemd's own.
if ! out=$(docker run -d --name "$name" --cap-add SYS_ADMIN --cap-add NET_ADMIN \
    --security-opt seccomp=unconfined --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
    -v /usr:/usr:ro -v "$tmp/local:/usr/local:ro" -v "$tmp/etc:/etc" -v "$tmp/var:/var" \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp "$image" /usr/lib/systemd/systemd --unit=basic.target 2>&1); then
    skip "systemd cannot run in a container here: $out"
fi
inside() { docker exec "$name" "$@"; }
state=""
for _ in $(seq 60); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] && break
    sleep 0.5
done
[[ $state == running || $state == degraded ]] || skip "systemd did not boot in the container (state '$state')"

echo "== systemctl start charon-node"
inside systemctl start charon-node || fail "systemctl start"
ip=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "$name")
code=000
for _ in $(seq 60); do
    code=$(python3 - "$ip" <<'EOF'
import sys, urllib.request
try:
    print(urllib.request.urlopen(f"http://{sys.argv[1]}:9090/readyz", timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
)
    [[ $code == 200 ]] && break
    sleep 0.5
done
[[ $code == 200 ]] || fail "/readyz says $code"
pid=$(inside systemctl show -p MainPID --value charon-node)
status=$(inside cat "/proc/$pid/status")
uid=$(awk '/^Uid:/ {print $2}' <<<"$status")
nnp=$(awk '/^NoNewPrivs:/ {print $2}' <<<"$status")
seccomp=$(awk '/^Seccomp:/ {print $2}' <<<"$status")
capeff=$(awk '/^CapEff:/ {print $2}' <<<"$status")
echo "node pid $pid: uid $uid, NoNewPrivs $nnp, Seccomp $seccomp, CapEff $capeff"
((uid >= 61184 && uid <= 65519)) || fail "the node runs as uid $uid, not a dynamic user"
[[ $nnp == 1 && $seccomp == 2 ]] || fail "NoNewPrivs=$nnp Seccomp=$seccomp"
[[ $capeff == 0000000000000400 ]] || fail "capabilities $capeff (want only CAP_NET_BIND_SERVICE)"

# An upstream inside the container (the host's python3 is under /usr).
inside systemd-run -q --unit=upstream -p DynamicUser=yes /usr/bin/python3 -m http.server 3000 --bind 127.0.0.1
ctl() { inside /usr/local/bin/charonctl --token-file /var/lib/charon/admin.token "$@"; }
ctl host add sd.example --upstream http://127.0.0.1:3000 >/dev/null || fail "charonctl host add"
code=000
for _ in $(seq 40); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: sd.example' "http://$ip:8080/" || true)
    [[ $code == 200 ]] && break
    sleep 0.25
done
[[ $code == 200 ]] || fail "the proxied host answers $code"
echo "proxied sd.example: 200"

echo "== systemctl stop charon-node (drain: delay 2 s, deadline 5 s)"
start=$EPOCHREALTIME
inside systemctl stop charon-node
took=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
show=$(inside systemctl show -p Result -p ExecMainCode -p ExecMainStatus charon-node | tr '\n' ' ')
echo "stopped in ${took}s: $show"
[[ $show == *"Result=success"* && $show == *"ExecMainStatus=0"* ]] || fail "stop: $show"
inside journalctl -u charon-node --no-pager -o cat | grep -q 'SIGTERM: draining before exit' || fail "no drain on stop"
inside journalctl -u charon-node --no-pager -o cat | grep -q 'listeners closed' || fail "listeners not closed on stop"

echo "== systemctl start again: the store survived"
inside systemctl start charon-node
for _ in $(seq 40); do
    ctl host show sd.example >/dev/null 2>&1 && break
    sleep 0.25
done
ctl host show sd.example >/dev/null || fail "sd.example is gone after the restart"
echo "PASSED: charon-node.service ran under systemd: dynamic user $uid, sandboxed, drained on stop in ${took}s, exit 0, state kept"
