#!/usr/bin/env bash
# Prepare what Charon's tests need besides cargo:
#   - <repo>/.venv: a Python virtualenv with the pinned packages of
#     tests/python/requirements.txt;
#   - haproxy (tests/tests/rolling.rs puts it in front of a cluster),
#     pebble (the ACME test CA of tests/tests/acme.rs) and chromium (the
#     browser test of tests/tests/websocket_h2.rs): installed with apt-get
#     when missing and apt is available, without starting a system service. Where it cannot be installed the script says so and goes
#     on; the rolling-restart test then reports itself as SKIPPED.
#
# Idempotent and fast when nothing changed: a stamp file inside the venv holds
# the hash of the requirements file and the interpreter version; if it matches,
# the script exits at once without touching the network.
#
# Usage: scripts/setup-test-env.sh            (from anywhere)
# Env:   PYTHON      interpreter used to create the venv (default: python3)
#        CHARON_VENV venv directory (default: <repo>/.venv)
#        CHARON_NO_APT=1  never run apt-get (haproxy is then only looked for)
# Prints the venv's python path as its last line of stdout.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
venv="${CHARON_VENV:-$repo/.venv}"
req="$repo/tests/python/requirements.txt"
stamp="$venv/.charon-requirements.stamp"

# haproxy: from Debian's packages when missing. Best effort: a machine without
# apt (or without root) still gets the venv. Serialised with the same kind of
# lock as the venv (apt-get holds dpkg's lock and fails rather than waits).
# Also jq (deploy/rolling-restart.sh reads charonctl's JSON with it) and,
# where a Docker engine answers, docker-compose (scripts/docker-cluster-test.sh).
missing_packages() {
    local need=()
    command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
    command -v jq >/dev/null 2>&1 || need+=(jq)
    # pebble (with pebble-challtestsrv): the ACME test CA of tests/tests/acme.rs.
    command -v pebble >/dev/null 2>&1 || [[ -x /usr/bin/pebble ]] || need+=(pebble)
    # chromium: the browser test of WebSockets over h2 (RFC 8441) in
    # tests/tests/websocket_h2.rs, driven headless over DevTools.
    command -v chromium >/dev/null 2>&1 || [[ -x /usr/bin/chromium ]] || need+=(chromium)
    if docker info >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 &&
        ! command -v docker-compose >/dev/null 2>&1; then
        need+=(docker-compose)
    fi
    echo "${need[*]}"
}

install_haproxy() {
    local packages
    packages="$(missing_packages)"
    if [[ -z $packages ]]; then
        return 0
    fi
    local why=""
    if [[ ${CHARON_NO_APT:-0} == 1 ]]; then
        why="CHARON_NO_APT=1"
    elif ! command -v apt-get >/dev/null 2>&1; then
        why="apt-get is not available"
    fi
    if [[ -n $why ]]; then
        echo "setup-test-env: note: haproxy is not installed and $why;" \
            "the rolling-restart test (tests/tests/rolling.rs) will be skipped" >&2
        return 0
    fi
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "setup-test-env: note: haproxy is not installed and installing it needs root" \
                "(apt-get install haproxy); the rolling-restart test will be skipped" >&2
            return 0
        fi
    fi
    local lock="${TMPDIR:-/tmp}/charon-apt-haproxy.lock"
    exec 8>"$lock"
    if command -v flock >/dev/null 2>&1; then
        flock 8
        packages="$(missing_packages)"
        if [[ -z $packages ]]; then
            exec 8>&-
            return 0
        fi
    fi
    echo "setup-test-env: installing $packages (apt-get)" >&2
    # A packaged daemon would start its service: a policy-rc.d that says "no"
    # keeps it stopped (only ours is removed afterwards), as in bench/run.sh.
    local policy=/usr/sbin/policy-rc.d made_policy=0 status=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        made_policy=1
    fi
    local -a pkgs
    read -r -a pkgs <<<"$packages"
    {
        $sudo apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
                --no-install-recommends "${pkgs[@]}"
    } >&2 || status=$?
    if ((made_policy)); then $sudo rm -f "$policy"; fi
    exec 8>&-
    if ((status != 0)); then
        echo "setup-test-env: note: apt-get install $packages failed (status $status);" \
            "the rolling-restart test will be skipped" >&2
    fi
    return 0
}
install_haproxy

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup-test-env: $python not found (need Python >= 3.10)" >&2
    exit 1
fi

want="$( { sha256sum "$req" | cut -d' ' -f1; "$python" -c 'import sys; print(sys.version)'; } )"

if [[ -x "$venv/bin/python" && -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]] \
    && "$venv/bin/python" -c 'import websockets, kosoku' >/dev/null 2>&1; then
    echo "$venv/bin/python"
    exit 0
fi

# Serialise concurrent callers (e.g. several test binaries at once).
# The lock lives outside the work tree so it never shows up in git status.
mkdir -p "$(dirname "$venv")"
lock="${TMPDIR:-/tmp}/charon-venv-$(printf '%s' "$venv" | sha256sum | cut -c1-16).lock"
exec 9>"$lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    # Someone else may have finished while we waited.
    if [[ -x "$venv/bin/python" && -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]]; then
        echo "$venv/bin/python"
        exit 0
    fi
fi

echo "setup-test-env: preparing $venv" >&2
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >&2; then
        echo "setup-test-env: '$python -m venv' failed; on Debian: apt-get install python3-venv" >&2
        exit 1
    fi
fi

rm -f "$stamp"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-input -r "$req" >&2
"$venv/bin/python" -c 'import websockets, kosoku' >&2
printf '%s\n' "$want" >"$stamp"
echo "setup-test-env: ready" >&2
echo "$venv/bin/python"
