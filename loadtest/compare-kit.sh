#!/usr/bin/env bash
# Side by side: the reference kit's client and bench (shared/reference/zero-cache-kit) against
# zcache and against the real zero-cache 1.9.0, one after the other on the same freshly seeded
# data, PostgreSQL and app server. Prints both benches' summaries and the start-up figures.
#   loadtest/compare-kit.sh [updates=50] [clients=20,100]
# Env: KIT (kit source, default ../shared/reference/zero-cache-kit), KIT_WORK (copy of the kit,
#      default /tmp/zcache-kit), ZCACHE_BIN (default target/release/zcache), ZCACHE_PORT (4900),
#      SERVERS (default "zcache zero-cache"; one of them to run only that side).
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

# The server's own time for each hydration of the kit's issue queries (ms, one per line on
# stdin, in log order): the first 6 are client.mjs's and bench (a)'s, one client at a time;
# the rest hydrate while 20 and 100 clients connect at once.
report_hydrations() {
  local all; all="$(cat)"
  echo "$1: server-side hydration of the kit query, one client at a time: $(head -6 <<<"$all" | summarize_ms)"
  echo "$1: server-side hydration of the kit query, all: $(summarize_ms <<<"$all")"
}

# Median, p90 and max of the numbers on stdin (one per line), or "none" when there are none.
summarize_ms() {
  sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "none"; exit }
    printf "median %.2f ms, p90 %.2f ms, max %.2f ms over %d hydrations\n", v[int((NR + 1) / 2)], v[int(NR * 0.9 + 0.999)], v[NR], NR }'
}

run_zcache() {
  ./setup.sh >/dev/null
  ./start-zero.sh app-only >/dev/null
  rm -f "$WORK_DIR"/zcache-replica.db* "$WORK_DIR/zcache.log"  # a stale "zcache ready" must not count
  local t0; t0=$(ms_now)
  ZCACHE_LOG="zcache=info,zcache::hydration=debug,warn" "$ZCACHE_BIN" --upstream-db "$PG_URL" --replica-file "$WORK_DIR/zcache-replica.db" --port "$ZCACHE_PORT" \
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
  sed 's/\x1b\[[0-9;]*m//g' "$WORK_DIR/zcache.log" | grep -o 'hydrated [0-9]* rows of issue for [^ ]* in [0-9]* us' \
    | awk '{ print $(NF-1) / 1000 }' | report_hydrations zcache
  kill $pid; wait $pid 2>/dev/null || true
  ./stop.sh keep-pg >/dev/null
}

run_zero_cache() {
  ./setup.sh >/dev/null
  # Threshold 0: zero-cache logs every query's materialization time ("Slow query
  # materialization <ms>"), its own server-side hydration figure.
  ZERO_LOG_SLOW_HYDRATE_THRESHOLD=0 ./start-zero.sh fresh | grep -E "answering|initial sync|process tree"
  node client.mjs | grep -v "connection state"
  SERVER_PID="$(cat "$WORK_DIR/zero-cache.pid")" BENCH_JSON="$RESULTS/zero-cache.json" node bench.mjs "$UPDATES" "$CLIENTS" | sed -n '/^summary/,$p'
  grep -o 'Slow query materialization [0-9.]* {"table":"issue"' "$WORK_DIR/zero-cache.log" \
    | awk '{ print $4 }' | report_hydrations zero-cache
  ./stop.sh keep-pg >/dev/null
}

SERVERS="${SERVERS:-zcache zero-cache}"
case " $SERVERS " in *" zcache "*) echo "=== zcache ($ZCACHE_BIN)"; run_zcache;; esac
case " $SERVERS " in *" zero-cache "*) echo; echo "=== zero-cache 1.9.0"; run_zero_cache;; esac
./stop.sh >/dev/null
echo; echo "results as JSON in $RESULTS"
