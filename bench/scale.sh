#!/usr/bin/env bash
# One Charon node as its stored configuration grows (see bench/README.md,
# "Scale"): builds release binaries, runs `charon-bench scale` and writes
# bench/results/scale-<UTC timestamp>.md (+ .json).
#
#   bench/scale.sh                       100, 1k, 10k, 100k hosts (+10 % certificates)
#   bench/scale.sh --sizes 100,2000      a smoke (seconds)
#   bench/scale.sh --debug               debug builds (figures not meaningful)
#
# Other options: --out FILE, --no-build; anything after `--` goes to
# `charon-bench scale` (--writes, --warmup-writes, --cert-ratio, --lookups).
# Exit status: 0 when the run succeeded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cmdline="bench/scale.sh${*:+ $*}"
debug=0 build_it=1 out="" sizes="100,1k,10k,100k" extra=()
while (($#)); do
    case "$1" in
        --debug) debug=1 ;;
        --no-build) build_it=0 ;;
        --sizes) sizes="${2:?--sizes needs a list}"; shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/scale.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

profile=release
build=(--release)
if ((debug)); then profile=debug build=(); fi
if ((build_it)); then
    echo "== cargo build ${build[*]} (charon-node, charon-bench)"
    cargo build "${build[@]}" -q -p charon-node -p charon-bench
fi

stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
[[ -n $out ]] || out="bench/results/scale-$stamp.md"
mkdir -p "$(dirname "$out")"
workdir=$(mktemp -d "${TMPDIR:-/tmp}/charon-scale.XXXXXX")
trap 'rm -rf "$workdir"' EXIT

dirty=""
if [[ -n $(git status --porcelain -- node proto Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    dirty=" + uncommitted changes"
fi
part="$workdir/part.md"
"target/$profile/charon-bench" scale \
    --bin-dir "target/$profile" \
    --workdir "$workdir" \
    --sizes "$sizes" \
    --out "$part" \
    --command "$cmdline" \
    "${extra[@]}" >/dev/null
{
    echo "# Scale: one node, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| CPU | $(nproc) × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1) |"
    echo "| charon | $("target/$profile/charon-node" --version) ($profile build), tree at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$dirty |"
    echo
    if ((debug)); then echo "**Debug build: figures not meaningful.**"; echo; fi
    cat "$part"
} >"$out"
cp "$workdir/part.json" "${out%.md}.json"
echo "== report: $out"
