#!/usr/bin/env bash
# Create (or refresh) the Python virtualenv used by Charon's tests:
#   <repo>/.venv with the pinned packages of tests/python/requirements.txt.
#
# Idempotent and fast when nothing changed: a stamp file inside the venv holds
# the hash of the requirements file and the interpreter version; if it matches,
# the script exits at once without touching the network.
#
# Usage: scripts/setup-test-env.sh            (from anywhere)
# Env:   PYTHON      interpreter used to create the venv (default: python3)
#        CHARON_VENV venv directory (default: <repo>/.venv)
# Prints the venv's python path as its last line of stdout.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
venv="${CHARON_VENV:-$repo/.venv}"
req="$repo/tests/python/requirements.txt"
stamp="$venv/.charon-requirements.stamp"

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
