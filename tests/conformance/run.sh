#!/usr/bin/env bash
# Peer conformance: the Autobahn cases against an echo server directly and
# through the proxy must give the same verdicts.
#
# Usage:
#   tests/conformance/run.sh DIRECT_URL PROXIED_URL OUT_DIR
#       DIRECT_URL   ws://127.0.0.1:PORT of the echo backend
#       PROXIED_URL  ws://HOST:PORT[/path] that the proxy routes to that backend
#       OUT_DIR      created if needed; gets direct.json, proxied.json,
#                    compare.txt and (unless AUTOBAHN_REPORTS=0) the Autobahn
#                    HTML/JSON reports in direct-report/ and proxied-report/
#   tests/conformance/run.sh --self OUT_DIR
#       self-test of the tooling: starts its own echo backend and compares two
#       direct runs against it.
#
# Start the echo backend for it as:
#   .venv/bin/python tests/python/ws_backend.py --port 0 --workers 2 --deflate-level 0
#
# Environment (all optional):
#   AUTOBAHN_PARALLELISM  cases at once (default 4)
#   AUTOBAHN_PROFILE      "full" (default: all 517 cases) or "quick" (leaves
#                         out the 12.x/13.x cases with messages of 32 KiB and
#                         more: 409 cases, about 50 s a run instead of 3.5 to
#                         6 minutes)
#   AUTOBAHN_CASES        space-separated case ids/globs to run (default: all)
#   AUTOBAHN_EXCLUDE      space-separated case ids/globs to leave out
#   AUTOBAHN_STRICT=1     an OK <-> NON-STRICT difference fails too
#   AUTOBAHN_REPORTS=0    do not write the HTML/JSON reports
#   AUTOBAHN_TIMEOUT      seconds for one run (default 1800)
#
# Output: the summary line of each run, then compare.py's output ending in
#   autobahn: 517 cases, 517 identical, 0 tolerated, 0 differing; direct: ...; proxied: ...
# Exit status: compare.py's (0 same, 1 different, 2 bad input), or 2 when a
# run could not be made.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

usage() {
    sed -n '5,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

self=0
if [[ $# -eq 2 && $1 == --self ]]; then
    self=1
    out="$2"
elif [[ $# -eq 3 ]]; then
    direct_url="$1"
    proxied_url="$2"
    out="$3"
else
    usage
fi

python="$("$repo/scripts/setup-test-env.sh" | tail -n 1)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

backend_pid=""
cleanup() {
    if [[ -n $backend_pid ]]; then
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [[ $self == 1 ]]; then
    coproc BACKEND {
        exec "$python" "$repo/tests/python/ws_backend.py" --port 0 --workers 2 --deflate-level 0
    }
    backend_pid=$BACKEND_PID
    read -r word port <&"${BACKEND[0]}" || true
    if [[ ${word:-} != LISTENING ]]; then
        echo "run.sh: the echo backend did not start" >&2
        exit 2
    fi
    direct_url="ws://127.0.0.1:$port"
    proxied_url="$direct_url"
fi

select_args=()
for glob in ${AUTOBAHN_CASES:-}; do
    select_args+=(--case "$glob")
done
for glob in ${AUTOBAHN_EXCLUDE:-}; do
    select_args+=(--exclude "$glob")
done
case "${AUTOBAHN_PROFILE:-full}" in
full) ;;
quick)
    # 12.x/13.x cases 8-10 and 13-18 send 1000 messages of 32-128 KiB each.
    for n in 8 9 10 13 14 15 16 17 18; do
        select_args+=(--exclude "12.*.$n" --exclude "13.*.$n")
    done
    ;;
*)
    echo "run.sh: AUTOBAHN_PROFILE must be full or quick" >&2
    exit 2
    ;;
esac

run_one() { # name url
    local report=()
    if [[ ${AUTOBAHN_REPORTS:-1} != 0 ]]; then
        rm -rf "${out:?}/$1-report"
        report=(--report-dir "$out/$1-report")
    fi
    if ! "$python" "$here/run_autobahn.py" --url "$2" --out "$out/$1.json" \
        --parallelism "${AUTOBAHN_PARALLELISM:-4}" --timeout "${AUTOBAHN_TIMEOUT:-1800}" \
        ${select_args[@]+"${select_args[@]}"} ${report[@]+"${report[@]}"}; then
        echo "run.sh: the $1 run ($2) failed" >&2
        exit 2
    fi
}

run_one direct "$direct_url"
run_one proxied "$proxied_url"

set +e
"$python" "$here/compare.py" "$out/direct.json" "$out/proxied.json" | tee "$out/compare.txt"
status=${PIPESTATUS[0]}
set -e
exit "$status"
