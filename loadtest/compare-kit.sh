#!/usr/bin/env bash
# Side by side: the reference kit's client and bench (shared/reference/zero-cache-kit) against
# zcache and against the real zero-cache 1.9.0, one after the other on the same freshly seeded
# data, PostgreSQL and app server. Prints both benches' summaries and the start-up figures.
#   loadtest/compare-kit.sh [updates=50] [clients=20,100]
# Env: KIT (kit source, default ../shared/reference/zero-cache-kit), KIT_WORK (copy of the kit,
#      default /tmp/zcache-kit), ZCACHE_BIN (default target/release/zcache), ZCACHE_PORT (4900).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KIT="${KIT:-$ROOT/../shared/reference/zero-cache-kit}"
KIT_WORK="${KIT_WORK:-/tmp/zcache-kit}"
ZCACHE_BIN="${ZCACHE_BIN:-$ROOT/target/release/zcache}"
ZCACHE_PORT="${ZCACHE_PORT:-4900}"
UPDATES="${1:-50}"; CLIENTS="${2:-20,100}"
[ -x "$ZCACHE_BIN" ] || { echo "build zcache first: cargo build --release" >&2; exit 1; }
[ -d "$KIT" ] || { echo "reference kit not found at $KIT (set KIT)" >&2; exit 1; }

mkdir -p "$KIT_WORK"
cp -r "$KIT"/. "$KIT_WORK"/ && chmod -R u+w "$KIT_WORK"
cd "$KIT_WORK"
. ./env.sh
RESULTS="$KIT_WORK/results"; mkdir -p "$RESULTS"

ms_now() { date +%s%N | cut -c1-13; }

run_zcache() {
  ./setup.sh >/dev/null
  ./start-zero.sh app-only >/dev/null
  rm -f "$WORK_DIR"/zcache-replica.db*
  local t0; t0=$(ms_now)
  "$ZCACHE_BIN" --upstream-db "$PG_URL" --replica-file "$WORK_DIR/zcache-replica.db" --port "$ZCACHE_PORT" \
    --app-id "$ZERO_APP_ID" --query-url "$APP_URL/query" --mutate-url "$APP_URL/mutate" >"$WORK_DIR/zcache.log" 2>&1 &
  local pid=$!
  until grep -q "zcache ready" "$WORK_DIR/zcache.log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$WORK_DIR/zcache.log" >&2; exit 1; }
    sleep 0.02
  done
  echo "zcache: ready $(( $(ms_now) - t0 )) ms after launch; $(grep -o 'initial sync done.*' "$WORK_DIR/zcache.log" | sed 's/\x1b\[[0-9;]*m//g')"
  echo "zcache: idle RSS $(./rss.sh $pid)"
  SERVER_URL="http://127.0.0.1:$ZCACHE_PORT" SERVER_PID=$pid node client.mjs | grep -v "connection state"
  SERVER_URL="http://127.0.0.1:$ZCACHE_PORT" SERVER_PID=$pid BENCH_JSON="$RESULTS/zcache.json" node bench.mjs "$UPDATES" "$CLIENTS" | sed -n '/^summary/,$p'
  kill $pid; wait $pid 2>/dev/null || true
  ./stop.sh keep-pg >/dev/null
}

run_zero_cache() {
  ./setup.sh >/dev/null
  ./start-zero.sh fresh | grep -E "answering|initial sync|process tree"
  node client.mjs | grep -v "connection state"
  SERVER_PID="$(cat "$WORK_DIR/zero-cache.pid")" BENCH_JSON="$RESULTS/zero-cache.json" node bench.mjs "$UPDATES" "$CLIENTS" | sed -n '/^summary/,$p'
  ./stop.sh keep-pg >/dev/null
}

echo "=== zcache ($ZCACHE_BIN)"; run_zcache
echo; echo "=== zero-cache 1.9.0"; run_zero_cache
./stop.sh >/dev/null
echo; echo "results as JSON in $RESULTS"
