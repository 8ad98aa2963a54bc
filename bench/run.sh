#!/usr/bin/env bash
# Charon next to nginx, HAProxy and Caddy, measured interleaved in one session
# (see bench/README.md).
#
#   bench/run.sh                 the full run (~18 min): 3 rounds, 10 s per
#                                measurement, 9,000 idle tunnels; the report goes to
#                                bench/results/<UTC timestamp>.md (+ .json)
#   bench/run.sh --smoke         seconds per measurement, to prove the harness works;
#                                the report goes to target/bench/smoke-<timestamp>.md
#   bench/run.sh --smoke --debug the same on debug builds: no release build needed
#                                (CI: about 2 minutes once `cargo build` has run)
#
# Setup:
#   --workers N          every proxy with N workers (Charon TOKIO_WORKER_THREADS,
#                        nginx worker_processes, HAProxy nbthread, Caddy GOMAXPROCS)
#   --pin                the proxy on CPUs of its own (taskset), load generators
#                        and backend on the others; with N >= CPUs they cannot be
#                        isolated (see bench/README.md)
# Comparing Charon builds, interleaved in one run:
#   --baseline-rev REV   build REV in a temporary git worktree and measure it
#                        (charon@base) next to this checkout (charon@new)
#   --charon-bin L=DIR   a build to measure, labelled L (repeatable)
#   --charon-variant 'NAME=FLAGS'
#                        also measure each build with `charonctl host add FLAGS`
#                        (an argument @FILE: one argument per line of FILE)
#
# Other options: --debug (debug builds for a full run too: figures not
# meaningful), --rounds N, --duration SECS, --warmup SECS, --targets LIST,
# --tests LIST (idle,http-small,http-large,ws,tls,ws-h2,idle-h2,idle-tls,ws-tls), --out FILE,
# --no-install; anything after `--` goes to `charon-bench run` (see
# `charon-bench run --help`).
#
# Installs what is missing (nginx, haproxy, caddy, wrk, openssl, taskset) from Debian's
# packages with apt-get, without letting them start their system services.
# Exit status: 0 when every measurement succeeded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cmdline="bench/run.sh${*:+ $*}"
smoke=0 debug=0 install=1 out="" baseline="" extra=()
run_args=() charon_bins=()
while (($#)); do
    case "$1" in
        --smoke) smoke=1 ;;
        --debug) debug=1 ;;
        --no-install) install=0 ;;
        --pin) run_args+=(--pin) ;;
        --rounds | --duration | --warmup | --targets | --tests | --workers | --charon-variant)
            run_args+=("$1" "${2:?$1 needs a value}"); shift ;;
        --charon-bin) charon_bins+=(--charon-bin "${2:?--charon-bin needs LABEL=DIR}"); shift ;;
        --baseline-rev) baseline="${2:?--baseline-rev needs a git revision}"; shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

# 1. The peers and tools, from Debian's packages when missing.
need=()
for tool in nginx haproxy caddy wrk openssl; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
# taskset (pinned mode) comes with util-linux.
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
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

# The baseline: built in a temporary worktree, into a target directory of
# its own (target/bench-baseline/target, kept between runs for the
# dependencies). Not into this checkout's target/: cargo's fingerprints do
# not depend on where a workspace lies, so a crate compiled there from the
# baseline's sources, being newer than this checkout's files, could be
# taken as up to date here and end up in charon@new. Its two binaries are
# kept by commit in target/bench-baseline/<commit>-<profile>/, so a second
# run with the same baseline skips the build.
if [[ -n $baseline ]]; then
    sha=$(git rev-parse --verify "$baseline^{commit}") ||
        { echo "bench/run.sh: --baseline-rev $baseline is not a commit" >&2; exit 64; }
    dest="target/bench-baseline/$sha-$profile"
    if [[ ! -x $dest/charon-node || ! -x $dest/charonctl ]]; then
        echo "== cargo build ${build[*]} of $baseline ($sha) in a temporary worktree"
        tree=$(mktemp -d "${TMPDIR:-/tmp}/charon-baseline.XXXXXX")
        target_dir="$PWD/target/bench-baseline/target"
        git worktree add -q --detach "$tree" "$sha"
        status=0
        (cd "$tree" && CARGO_TARGET_DIR="$target_dir" cargo build "${build[@]}" -q -p charon-node -p charonctl) || status=$?
        if ((status == 0)); then
            mkdir -p "$dest"
            cp "$target_dir/$profile/charon-node" "$target_dir/$profile/charonctl" "$dest/"
            printf 'commit %s (--baseline-rev %s), %s build\n' "$(git rev-parse --short "$sha")" "$baseline" "$profile" >"$dest/charon-build.txt"
        fi
        git worktree remove --force "$tree"
        ((status == 0)) || { echo "bench/run.sh: building $baseline failed" >&2; exit "$status"; }
    fi
    charon_bins=(--charon-bin "base=$dest" --charon-bin "new=target/$profile" "${charon_bins[@]}")
fi

echo "== cargo build ${build[*]} (charon-node, charonctl, charon-bench)"
cargo build "${build[@]}" -q -p charon-node -p charonctl -p charon-bench
if [[ -n $baseline ]] && cmp -s "target/$profile/charon-node" "$dest/charon-node"; then
    echo "bench/run.sh: note: charon@base and charon@new are the same binary" >&2
fi

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
    "${run_args[@]}" "${charon_bins[@]}" "${extra[@]}" || status=$?
if ((status == 0)); then
    rm -rf "$workdir"
else
    echo "bench/run.sh: failed (status $status); configurations and logs kept in $workdir" >&2
fi
exit "$status"
