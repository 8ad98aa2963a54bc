#!/usr/bin/env bash
# Config propagation in a Charon cluster (see bench/README.md): builds release
# binaries, runs `charon-bench propagation` for 3 and for 10 nodes, and writes
# bench/results/propagation-<UTC timestamp>.md (+ one .json per cluster size).
#
#   bench/propagation.sh                 3 and 10 nodes, default settings (~1 min)
#   bench/propagation.sh --nodes 3,5     other cluster sizes
#   bench/propagation.sh --debug         debug builds (figures not meaningful)
#
# Other options: --out FILE, --keep (keep the nodes' data dirs and logs even on
# success), --no-build (use the binaries already in target/<profile>: another
# engineer's half-done edit cannot stop the run); anything after `--` goes to
# every `charon-bench propagation` (see
# `charon-bench propagation --help`: --writes, --catchup-writes,
# --gossip-interval-ms, --write-to first|round-robin, ...).
# Exit status: 0 when every run succeeded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cmdline="bench/propagation.sh${*:+ $*}"
debug=0 keep=0 build_it=1 out="" sizes="3,10" extra=()
while (($#)); do
    case "$1" in
        --debug) debug=1 ;;
        --keep) keep=1 ;;
        --no-build) build_it=0 ;;
        --nodes) sizes="${2:?--nodes needs a list}"; shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/propagation.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

profile=release
build=(--release)
if ((debug)); then profile=debug build=(); fi
if ((build_it)); then
    echo "== cargo build ${build[*]} (charon-node, charonctl, charon-bench)"
    cargo build "${build[@]}" -q -p charon-node -p charonctl -p charon-bench
fi

stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
[[ -n $out ]] || out="bench/results/propagation-$stamp.md"
mkdir -p "$(dirname "$out")"
workdir=$(mktemp -d "${TMPDIR:-/tmp}/charon-propagation.XXXXXX")

dirty=""
if [[ -n $(git status --porcelain -- node proto Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    dirty=" + uncommitted changes"
fi
{
    echo "# Config propagation, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "\`$cmdline\`"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| CPU | $(nproc) × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1) |"
    echo "| kernel | Linux $(uname -r) |"
    echo "| charon | $("target/$profile/charon-node" --version) ($profile build of $(date -u -r "target/$profile/charon-node" '+%H:%M UTC')), tree now at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$dirty |"
    echo "| load average before | $(cut -d' ' -f1-3 /proc/loadavg) |"
    echo
    if ((debug)); then echo "**Debug build: figures not meaningful.**"; echo; fi
} >"$out"

status=0
IFS=, read -ra list <<<"$sizes"
for n in "${list[@]}"; do
    echo "== $n nodes"
    part="$workdir/$n-nodes.md"
    "target/$profile/charon-bench" propagation \
        --bin-dir "target/$profile" \
        --workdir "$workdir/$n-nodes" \
        --nodes "$n" \
        --out "$part" \
        "${extra[@]}" >/dev/null || status=$?
    if [[ -f $part ]]; then
        cat "$part" >>"$out"
        cp "$workdir/$n-nodes.json" "${out%.md}-${n}nodes.json"
        rm -f "$part"
    else
        printf '### %s nodes\n\nFailed (status %s); logs in %s.\n\n' "$n" "$status" "$workdir/$n-nodes" >>"$out"
    fi
done
echo "== report: $out"
if ((status == 0 && !keep)); then
    rm -rf "$workdir"
else
    echo "bench/propagation.sh: nodes' data and logs kept in $workdir" >&2
fi
exit "$status"
