#!/usr/bin/env bash
# Runs every cargo-fuzz target in node/fuzz/ for N seconds each (default 60):
#   scripts/fuzz.sh [seconds-per-target] [target...]
#
# Targets: the request head parser, the response head parser, the chunked
# scanner (request side and response side) and the WebSocket frame tracker;
# each asserts properties (agreement fed whole or in pieces, normalised
# output a fixed point, rewritten heads parse back the same), not only "no
# panic". Needs a nightly toolchain and cargo-fuzz; both are installed here
# when missing. The committed corpus (node/fuzz/corpus/<target>) is read,
# not written while fuzzing: new inputs go to target/fuzz/corpus/<target>,
# crashes to node/fuzz/artifacts/<target> (the script then fails and names
# them). With FUZZ_MERGE=1, after a clean run, the inputs that reach code
# the committed corpus does not are merged into it (libFuzzer -merge=1,
# so it grows only by new coverage), to be committed.
set -euo pipefail

secs=${1:-60}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$root/node"
# Inside the workspace's target dir (no second one at the repo's top).
target_dir="$root/target/fuzz"
# No sanitizer: the code under test is safe Rust, and a plain build is
# several times faster; debug assertions catch overflow.
flags=(--sanitizer none --debug-assertions --target-dir "$target_dir")

cargo +nightly fuzz build "${flags[@]}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
failed=()
for t in "${targets[@]}"; do
    work="$target_dir/corpus/$t"
    mkdir -p "$work" "fuzz/corpus/$t"
    rm -rf "fuzz/artifacts/$t"
    echo "== $t: ${secs}s"
    if ! cargo +nightly fuzz run "${flags[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len=8192 -print_final_stats=1 2>&1 |
        grep -E '^(==|#[0-9]+ +DONE|stat::number_of_executed_units|.*(panicked|ERROR|Test unit written))'; then
        :
    fi
    if [ -n "$(ls -A "fuzz/artifacts/$t" 2>/dev/null)" ]; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashes found in: ${failed[*]} (see node/fuzz/artifacts/)" >&2
    exit 1
fi
if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    for t in "${targets[@]}"; do
        before=$(ls "fuzz/corpus/$t" | wc -l)
        cargo +nightly fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "$target_dir/corpus/$t" -- \
            -merge=1 -max_len=8192 >/dev/null 2>&1
        echo "== $t: corpus $before -> $(ls "fuzz/corpus/$t" | wc -l) inputs"
    done
fi
echo "all targets ran ${secs}s clean"
