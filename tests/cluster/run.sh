#!/usr/bin/env bash
# Docker-based multi-region tests of deploy/ (see suite.py for what they check).
#
# Usage: tests/cluster/run.sh [--debug] [--no-build] [SUITE ARGS...]
#   --debug      build the images from the debug binaries (faster to build)
#   --no-build   use the images as they are (charon:local, charon-haproxy:local,
#                charon-router:local) and target/<profile>/charonctl
#   SUITE ARGS   passed to suite.py: --wan-delay-ms 50, --propagation-rounds 10,
#                --http-clients 4, --ws-clients 16, --only image,hosts,...,
#                --keep (leave the cluster up)
#
# Prints "SKIPPED: no Docker engine" and exits 0 when `docker info` fails.
# Otherwise builds the images (deploy/docker/build.sh: cargo build, then
# docker build FROM scratch), prepares the Python venv with `websockets`
# (scripts/setup-test-env.sh) and runs suite.py: it starts the five-node
# cluster under a project of its own (charontest<pid>, free 10.x networks, no
# host ports), so it can run next to a cluster started by cluster.sh, and
# removes every container, network and volume it made, also when interrupted.
# Exit: 0 all checks passed (or skipped); 1 a check failed; 2 usage error.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
profile=release
build=1
suite_args=()
while (($#)); do
    case $1 in
        --debug) profile=debug ;;
        --no-build) build=0 ;;
        -h | --help)
            awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
            exit 0
            ;;
        *) suite_args+=("$1") ;;
    esac
    shift
done

if ! docker info >/dev/null 2>&1; then
    echo "SKIPPED: no Docker engine (docker info failed); the Docker cluster tests did not run"
    exit 0
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    echo "FAILED: a Docker engine answers but neither 'docker compose' nor 'docker-compose'" \
        "is installed (apt-get install docker-compose-plugin, or docker-compose)" >&2
    exit 1
fi
for tool in jq timeout; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "FAILED: $tool is required (deploy/rolling-restart.sh, cluster.sh)" >&2
        exit 1
    }
done

if ((build)); then
    "$repo/deploy/docker/build.sh" "--$profile"
fi
charonctl="$repo/target/$profile/charonctl"
[[ -x $charonctl ]] || {
    echo "FAILED: $charonctl is missing (drop --no-build, or cargo build -p charonctl)" >&2
    exit 1
}

python=$("$repo/scripts/setup-test-env.sh" | tail -n 1)
"$python" -c 'import websockets' 2>/dev/null || {
    echo "FAILED: $python has no 'websockets' (scripts/setup-test-env.sh)" >&2
    exit 1
}

project="charontest$$"
# Whatever suite.py could not remove (it cleans up itself, also on SIGTERM
# and Ctrl-C; this is for a hard crash).
cleanup() {
    local ids
    ids=$(docker ps -aq --filter "label=com.docker.compose.project=$project" 2>/dev/null || true)
    ids+=" $(docker ps -aq --filter "name=^$project-" 2>/dev/null || true)"
    if [[ -n ${ids// /} ]]; then
        echo "run.sh: removing leftover containers of $project" >&2
        # shellcheck disable=SC2086
        docker rm -f -v $ids >/dev/null 2>&1 || true
    fi
    ids=$(docker network ls -q --filter "label=com.docker.compose.project=$project" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [[ -z $ids ]] || docker network rm $ids >/dev/null 2>&1 || true
    ids=$(docker volume ls -q --filter "label=com.docker.compose.project=$project" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [[ -z $ids ]] || docker volume rm $ids >/dev/null 2>&1 || true
}
trap cleanup EXIT

# suite.py cleans up on SIGTERM/SIGINT: pass them on and wait for it.
"$python" "$repo/tests/cluster/suite.py" --project "$project" --charonctl "$charonctl" \
    "${suite_args[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
while :; do
    wait "$child" && status=0 || status=$?
    # wait returns early (status > 128) when a trapped signal arrives.
    kill -0 "$child" 2>/dev/null || break
done
exit "$status"
