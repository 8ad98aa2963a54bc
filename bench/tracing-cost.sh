#!/usr/bin/env bash
# The cost of tracing: two Charon nodes (release, one worker, no access log)
# side by side, one exporting every span to `charon-bench otlp-sink`, measured
# alternately with wrk; prints req/s, p99 and proxy CPU per request.
# Needs wrk and a release build (cargo build --release -p charon-node -p charonctl -p charon-bench).
set -euo pipefail
B="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/release"
cd "$(mktemp -d)"
"$B"/charon-bench backend --listen 127.0.0.1:18900 > backend.log 2>&1 &
BK=$!
"$B"/charon-bench otlp-sink --listen 127.0.0.1:18901 > sink.out 2> sink.err &
SK=$!
start() { # name port extra...
  local n=$1 p=$2; shift 2
  TOKIO_WORKER_THREADS=1 CHARON_ADMIN_TOKEN=bench-token-0123456789 CHARON_ACCESS_LOG=off \
    "$B"/charon-node --data-dir $n --http-listen 127.0.0.1:$p --https-listen 127.0.0.1:0 --api-listen 127.0.0.1:$((p+1)) \
    --admin-listen 127.0.0.1:$((p+2)) --gossip-listen 127.0.0.1:0 --log warn "$@" > $n.log 2>&1 &
  echo $!
}
A=$(start a 18910)
T=$(start b 18920 --otlp-endpoint http://127.0.0.1:18901)
for p in 18912 18922; do until curl -sf 127.0.0.1:$p/readyz >/dev/null; do sleep 0.1; done; done
for p in 18911 18921; do "$B"/charonctl --endpoint http://127.0.0.1:$p --token bench-token-0123456789 host add 127.0.0.1 --upstream http://127.0.0.1:18900 >/dev/null; done
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
tck=$(getconf CLK_TCK)
for round in 1 2 3; do
  for x in "off $A 18910" "on $T 18920"; do
    set -- $x
    wrk -t1 -c64 -d2s http://127.0.0.1:$3/small >/dev/null
    c0=$(cpu $2)
    out=$(wrk -t1 -c64 -d8s --latency http://127.0.0.1:$3/small)
    c1=$(cpu $2)
    req=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    p99=$(echo "$out" | awk '$1=="99%"{print $2}')
    us=$(echo "scale=1; ($c1-$c0)*1000000/$tck/$req" | bc)
    echo "round $round tracing $1: $rps req/s, p99 $p99, proxy CPU $us us/req"
  done
done
cat sink.err | tail -1
kill $A $T $BK $SK
