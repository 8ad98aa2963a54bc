#!/usr/bin/env bash
# The Docker-based tests of deploy/ (tests/cluster/run.sh), for CI and for
# people: the five-node two-region compose cluster (hosts, propagation,
# partition, kill, rolling restart under load, image contents), the
# Kubernetes manifests (offline schemas + the pod spec on Docker) and the
# systemd unit (under a real systemd in a container).
#
# Usage: scripts/docker-cluster-test.sh [tests/cluster/run.sh ARGS...]
# Prints "SKIPPED: no Docker engine" and exits 0 where `docker info` fails,
# so it can run on any machine. Takes about 4 minutes after the release
# build (which deploy/docker/build.sh runs first: about 4 minutes cold).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec tests/cluster/run.sh "$@"
