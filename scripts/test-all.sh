#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing (PostgreSQL from Debian's
# packages, the e2e Node packages from their lockfile), checks formatting and lints, runs the
# Rust unit and integration tests (real PostgreSQL clusters started by the tests), then the
# end-to-end tests with the real @rocicorp/zero 1.9.0 client against zcache.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== %s\n' "$*"; }

step "dependencies"
bash scripts/ensure-postgres.sh
command -v node >/dev/null || { echo "Node.js 20+ is required for the end-to-end tests" >&2; exit 1; }
if [ ! -f tests/e2e/node_modules/@rocicorp/zero/package.json ] ||
   [ tests/e2e/package-lock.json -nt tests/e2e/node_modules/.package-lock.json ]; then
  (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace --quiet 2>&1

step "end-to-end: the real Zero client against zcache"
cargo build --quiet --bin zcache
(cd tests/e2e && ZCACHE_BIN="$PWD/../../target/debug/zcache" npm test)
