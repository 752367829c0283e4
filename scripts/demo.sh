#!/usr/bin/env bash
# Runs zcache on its embedded default: a PostgreSQL of its own under ./zcache-data with demo
# data, served on port 4848. Extra arguments go to zcache (see `zcache --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
exec cargo run --release --bin zcache -- "$@"
