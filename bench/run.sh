#!/usr/bin/env bash
# Charon next to nginx, HAProxy and Caddy, measured interleaved in one session
# (see bench/README.md).
#
#   bench/run.sh                 the full run (~15 min): 3 rounds, 10 s per
#                                measurement, 9,000 idle tunnels; the report goes to
#                                bench/results/<UTC timestamp>.md (+ .json)
#   bench/run.sh --smoke         seconds per measurement, to prove the harness works;
#                                the report goes to target/bench/smoke-<timestamp>.md
#   bench/run.sh --smoke --debug the same on debug builds: no release build needed
#                                (CI: about 2 minutes once `cargo build` has run)
#
# Other options: --debug (debug builds for a full run too: figures not
# meaningful), --rounds N, --duration SECS, --warmup SECS, --targets LIST,
# --tests LIST, --out FILE, --no-install; anything after `--` goes to
# `charon-bench run` (see `charon-bench run --help`).
#
# Installs what is missing (nginx, haproxy, caddy, wrk, openssl) from Debian's
# packages with apt-get, without letting them start their system services.
# Exit status: 0 when every measurement succeeded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cmdline="bench/run.sh${*:+ $*}"
smoke=0 debug=0 install=1 out="" extra=()
run_args=()
while (($#)); do
    case "$1" in
        --smoke) smoke=1 ;;
        --debug) debug=1 ;;
        --no-install) install=0 ;;
        --rounds | --duration | --warmup | --targets | --tests)
            run_args+=("$1" "${2:?$1 needs a value}"); shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

# 1. The peers and tools, from Debian's packages when missing.
need=()
for tool in nginx haproxy caddy wrk openssl; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
    if ((!install)); then
        echo "bench/run.sh: missing ${need[*]} (run without --no-install to apt-get them)" >&2
        exit 1
    fi
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    echo "== installing ${need[*]} (apt-get)"
    $sudo apt-get update -q
    # Packaged daemons would start on port 80 and friends: a policy-rc.d that
    # says "no" keeps them stopped (only ours is removed afterwards).
    policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}" ||
        { ((made_policy)) && $sudo rm -f "$policy"; exit 1; }
    if ((made_policy)); then $sudo rm -f "$policy"; fi
fi

# 2. Charon and the harness.
profile=release
build=(--release)
if ((debug)); then profile=debug build=(); fi
echo "== cargo build ${build[*]} (charon-node, charonctl, charon-bench)"
cargo build "${build[@]}" -q -p charon-node -p charonctl -p charon-bench

# 3. The run.
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
if ((smoke)); then
    mode=smoke
    [[ -n $out ]] || out="target/bench/smoke-$stamp.md"
    run_args=(--rounds 2 --duration 1 --warmup 0 --ws-conns 100 --idle-conns 500 --tls-conns 4 "${run_args[@]}")
else
    mode=full
    [[ -n $out ]] || out="bench/results/$stamp.md"
fi
if ((debug)); then mode="$mode, debug build (figures not meaningful)"; fi
workdir=$(mktemp -d "${TMPDIR:-/tmp}/charon-bench.XXXXXX")
status=0
"target/$profile/charon-bench" run \
    --bin-dir "target/$profile" \
    --workdir "$workdir" \
    --out "$out" \
    --mode "$mode" \
    --command "$cmdline" \
    "${run_args[@]}" "${extra[@]}" || status=$?
if ((status == 0)); then
    rm -rf "$workdir"
else
    echo "bench/run.sh: failed (status $status); configurations and logs kept in $workdir" >&2
fi
exit "$status"
