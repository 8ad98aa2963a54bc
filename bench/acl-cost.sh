#!/usr/bin/env bash
# The cost of access rules and limits (issue 20): two Charon nodes (one
# worker, no access log) side by side, both proxying 127.0.0.1 to the same
# backend; on the second the host has an access list of 1,000 CIDRs (999
# deny ranges the client is not in, then allow 127.0.0.0/8, default deny)
# and a rate limit too high to refuse anything (cluster scope, so its
# gossip publishing runs too): every request is judged by both. Measured
# alternately with wrk; prints req/s, p99 and proxy CPU per request.
# Needs wrk and a build: release by default
# (cargo build --release -p charon-node -p charonctl -p charon-bench);
# BIN=target/debug for a quick relative look on a debug build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="$ROOT/${BIN:-target/release}"
SECS=${SECS:-8}
# ROUNDS=N for more rounds than 3 (a shared machine spreads the figures).
cd "$(mktemp -d)"
"$B"/charon-bench backend --listen 127.0.0.1:18930 > backend.log 2>&1 &
BK=$!
start() { # name port extra...
  local n=$1 p=$2; shift 2
  TOKIO_WORKER_THREADS=1 CHARON_ADMIN_TOKEN=bench-token-0123456789 CHARON_ACCESS_LOG=off \
    "$B"/charon-node --data-dir $n --http-listen 127.0.0.1:$p --https-listen 127.0.0.1:0 --api-listen 127.0.0.1:$((p+1)) \
    --admin-listen 127.0.0.1:$((p+2)) --gossip-listen 127.0.0.1:0 --log warn "$@" > $n.log 2>&1 &
  echo $!
}
A=$(start a 18940)
L=$(start b 18950)
trap 'kill $A $L $BK 2>/dev/null' EXIT
for p in 18942 18952; do until curl -sf 127.0.0.1:$p/readyz >/dev/null; do sleep 0.1; done; done
ctl() { "$B"/charonctl --endpoint http://127.0.0.1:$1 --token bench-token-0123456789 "${@:2}" >/dev/null; }
rules=()
for i in $(seq 0 998); do rules+=(--deny "11.$((i / 256)).$((i % 256)).0/24"); done
ctl 18951 acl add big "${rules[@]}" --allow 127.0.0.0/8 --default deny
ctl 18941 host add 127.0.0.1 --upstream http://127.0.0.1:18930
ctl 18951 host add 127.0.0.1 --upstream http://127.0.0.1:18930 --acl big --rate-limit 1000000/s
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
tck=$(getconf CLK_TCK)
for round in $(seq 1 "${ROUNDS:-3}"); do
  for x in "none $A 18940" "acl-1000+rate $L 18950"; do
    set -- $x
    wrk -t1 -c64 -d2s http://127.0.0.1:$3/small >/dev/null
    c0=$(cpu $2)
    out=$(wrk -t1 -c64 -d${SECS}s --latency http://127.0.0.1:$3/small)
    c1=$(cpu $2)
    req=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    p99=$(echo "$out" | awk '$1=="99%"{print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/{print $NF}')
    us=$(echo "scale=1; ($c1-$c0)*1000000/$tck/$req" | bc)
    echo "round $round $1: $rps req/s, p99 $p99, proxy CPU $us us/req${non2xx:+, NON-2xx $non2xx}"
  done
done
