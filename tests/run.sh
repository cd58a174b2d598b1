#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests and the end-to-end suite
# (which drives the real `bulk-export` binary over HTTP). Needs only Rust.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== build the binaries the end-to-end tests drive"
cargo build --workspace --bins

echo "== cargo test"
cargo test --workspace --all-targets
