#!/usr/bin/env bash
# The project's test command (README "Run the tests"; CI runs it too).
#
# On a fresh machine it prepares everything the tests need by itself: the
# Python virtualenv with `websockets` and `kosoku` (Autobahn cases), the
# charon-node and charonctl binaries the integration tests start as real
# processes; then runs every test of the workspace.
#
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p charon-tests websocket`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-test-env.sh >/dev/null
# Bins and test targets in one build: built apart, the bins would get the
# feature set without dev-dependencies and every shared crate would be
# compiled (and stored) twice.
cargo build --workspace --bins --tests
cargo test --workspace "$@"
