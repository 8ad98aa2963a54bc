#!/usr/bin/env bash
# Docker-based multi-region tests of deploy/ (see suite.py for what they check).
#
# Usage: tests/cluster/run.sh [--debug] [--no-build] [--parts LIST] [SUITE ARGS...]
#   --debug       build the images from the debug binaries (faster to build)
#   --no-build    use the images as they are (charon:local, charon-haproxy:local,
#                 charon-router:local) and target/<profile>/charon{-node,ctl}
#   --parts LIST  comma-separated, default compose,kubernetes,systemd:
#     compose     suite.py: the five-node two-region compose cluster
#     kubernetes  deploy/kubernetes/validate.sh (schemas of Kubernetes
#                 1.30-1.37, offline) and k8s_pods.py (the StatefulSet's pod
#                 spec run on Docker: env, Secret, headless seeds, stop)
#     systemd     systemd-unit.sh: charon-node.service under a real systemd
#                 in a container (skipped where systemd cannot run there)
#   SUITE ARGS    passed to suite.py: --wan-delay-ms 50, --propagation-rounds
#                 10, --http-clients 4, --ws-clients 16, --only image,hosts,...,
#                 --keep (leave the cluster up)
#
# Prints "SKIPPED: no Docker engine" and exits 0 when `docker info` fails.
# Otherwise builds the images (deploy/docker/build.sh: cargo build, then
# docker build FROM scratch), prepares the Python venv with `websockets`
# (scripts/setup-test-env.sh) and runs the parts. suite.py starts the cluster
# under a project of its own (charontest<pid>, free 10.x networks, no host
# ports), so it can run next to a cluster started by cluster.sh; every part
# removes the containers, networks and volumes it made, also when interrupted.
# Exit: 0 all checks passed (or skipped); 1 a check failed; 2 usage error.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
profile=release
build=1
parts=compose,kubernetes,systemd
suite_args=()
while (($#)); do
    case $1 in
        --debug) profile=debug ;;
        --no-build) build=0 ;;
        --parts)
            (($# >= 2)) || { echo "run.sh: --parts needs a value" >&2; exit 2; }
            parts=$2
            shift
            ;;
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
# shellcheck disable=SC2317 # called by the EXIT trap
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

# Runs one part in the background; the parts clean up on SIGTERM/SIGINT, so
# pass those on and wait. Sets $status.
child=""
trap '[[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true' TERM INT
run_part() {
    "$@" &
    child=$!
    while :; do
        wait "$child" && status=0 || status=$?
        # wait returns early (status > 128) when a trapped signal arrives.
        kill -0 "$child" 2>/dev/null || break
    done
    child=""
}

results=()
failed=0
for part in ${parts//,/ }; do
    echo
    echo "######## $part"
    case $part in
        compose)
            run_part "$python" "$repo/tests/cluster/suite.py" --project "$project" \
                --charonctl "$charonctl" "${suite_args[@]}"
            ;;
        kubernetes)
            run_part "$repo/deploy/kubernetes/validate.sh"
            if ((status == 0)); then
                run_part "$repo/target/venv-k8s-validate/bin/python" "$repo/tests/cluster/k8s_pods.py"
            fi
            ;;
        systemd) run_part "$repo/tests/cluster/systemd-unit.sh" "$repo/target/$profile" ;;
        *)
            echo "run.sh: unknown part '$part' (compose, kubernetes, systemd)" >&2
            exit 2
            ;;
    esac
    if ((status == 0)); then results+=("PASS  $part"); else results+=("FAIL  $part (exit $status)"); failed=1; fi
done
echo
echo "######## tests/cluster"
printf '  %s\n' "${results[@]}"
exit "$failed"
