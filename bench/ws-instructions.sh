#!/usr/bin/env bash
# User-space instructions per proxied WebSocket round trip, Charon next to
# nginx (issue 21): valgrind's callgrind counts instructions, which unlike
# CPU time do not depend on what else runs on the machine.
#
# Each proxy (one worker, no access log, upstream `charon-bench backend`)
# runs under callgrind with collection off; collection is switched on
# around a `charon-bench ws-load` run (100 WebSockets, 128-byte round trips,
# no warm-up), twice: SHORT and LONG seconds. The difference of the two
# instruction totals over the difference of their round trips is the cost
# of one round trip, with connection set-up, start-up and close cancelled
# out. Kernel work (most of the CPU, see docs/benchmarks.md) is not counted.
#
#   bench/ws-instructions.sh                 Charon (target/release) and nginx
#   BIN=DIR bench/ws-instructions.sh         another Charon build
#   TARGETS=charon bench/ws-instructions.sh  Charon only
#
# Needs valgrind and nginx, and a release build:
# cargo build --release -p charon-node -p charonctl -p charon-bench
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="$(cd "${BIN:-$ROOT/target/release}" && pwd)"
TOOLS="$ROOT/target/release"
SHORT=${SHORT:-4}
LONG=${LONG:-12}
TARGETS=${TARGETS:-charon nginx}
W="$(mktemp -d)"
cd "$W"
"$TOOLS"/charon-bench backend --listen 127.0.0.1:18960 > backend.log 2>&1 &
BK=$!
VG=""
trap 'kill $BK $VG 2>/dev/null || true' EXIT

wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.2; done; }

# Starts the proxy named $1 under callgrind in directory $2, on port $3;
# sets VG to valgrind's PID.
start() {
  local name=$1 d=$2 port=$3
  mkdir -p "$d"
  case $name in
    charon)
      TOKIO_WORKER_THREADS=1 CHARON_ADMIN_TOKEN=bench-token-0123456789 CHARON_ACCESS_LOG=off \
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$d/cg.out" \
        "$B"/charon-node --data-dir "$d/data" --http-listen 127.0.0.1:$port --https-listen 127.0.0.1:0 \
        --api-listen 127.0.0.1:$((port + 1)) --admin-listen 127.0.0.1:0 --gossip-listen 127.0.0.1:0 \
        --log warn > "$d/out.log" 2>&1 &
      VG=$!
      wait_port $((port + 1))
      "$B"/charonctl --endpoint http://127.0.0.1:$((port + 1)) --token bench-token-0123456789 \
        host add 127.0.0.1 --upstream http://127.0.0.1:18960 > /dev/null
      ;;
    nginx)
      mkdir -p "$d/body" "$d/proxy"
      cat > "$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/body;
    proxy_temp_path $d/proxy;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
    upstream backend { server 127.0.0.1:18960; keepalive 256; }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Host \$http_host;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_read_timeout 3600s;
        }
    }
}
EOF
      valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$d/cg.out" \
        nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" > "$d/out.log" 2>&1 &
      VG=$!
      ;;
  esac
  wait_port "$port"
}

# One measurement: prints "<round trips> <instructions>".
one() {
  local name=$1 secs=$2 d="$W/$1-$2" port=18970
  start "$name" "$d" $port
  callgrind_control -i on $VG > /dev/null 2>&1
  "$TOOLS"/charon-bench ws-load --addr 127.0.0.1:$port --conns 100 --warmup 0 --duration "$secs" > "$d/load.out" 2>&1
  callgrind_control -i off $VG > /dev/null 2>&1
  callgrind_control -d $VG > /dev/null 2>&1
  kill -TERM $VG
  wait $VG || true
  VG=""
  local msgs instr
  msgs=$(sed -n 's/.*"messages":\([0-9]*\).*/\1/p' "$d/load.out")
  instr=$(cat "$d"/cg.out* | awk '/^totals:/ { s += $2 } END { print s }')
  echo "$msgs $instr"
}

for t in $TARGETS; do
  read -r m1 i1 < <(one "$t" "$SHORT")
  read -r m2 i2 < <(one "$t" "$LONG")
  echo "$t: $(( (i2 - i1) / (m2 - m1) )) instructions per round trip ($m1 and $m2 round trips, $i1 and $i2 instructions)"
done
