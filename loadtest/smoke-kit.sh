#!/usr/bin/env bash
# Smoke run of the load harness (target/release/loadtest) against zcache and against the real
# zero-cache 1.9.0 of the reference kit, one after the other on freshly seeded data, with the
# same workload. Prints each run's table (JSON in $KIT_WORK/results/<server>.json) and exits
# non-zero if a run hydrated no client or matched no commit -> poke sample while writing.
#   loadtest/smoke-kit.sh [extra loadtest flags...]
# Env: KIT (kit source, default ../shared/reference/zero-cache-kit), KIT_WORK (copy of the kit,
#      default /tmp/lt-kit), ZCACHE_BIN (default target/release/zcache), ZCACHE_PORT (4872),
#      LOADTEST_BIN (default target/release/loadtest), SERVERS ("zcache zero-cache"),
#      CLIENTS (50), GROUPS_N (50), WRITE_RATE (50), WARMUP (5s), DURATION (10s),
#      QUERY (issuesByStatus={"status":"open","limit":100}; e.g. issueById={"id":"i{group1}"}),
#      and the kit's PGPORT / ZERO_PORT / APP_PORT to move it off ports in use.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KIT="${KIT:-$ROOT/../shared/reference/zero-cache-kit}"
KIT_WORK="${KIT_WORK:-/tmp/lt-kit}"
ZCACHE_BIN="${ZCACHE_BIN:-$ROOT/target/release/zcache}"
ZCACHE_PORT="${ZCACHE_PORT:-4872}"
LOADTEST_BIN="${LOADTEST_BIN:-$ROOT/target/release/loadtest}"
CLIENTS="${CLIENTS:-50}"; GROUPS_N="${GROUPS_N:-50}"; WRITE_RATE="${WRITE_RATE:-50}"
WARMUP="${WARMUP:-5s}"; DURATION="${DURATION:-10s}"
DEFAULT_QUERY='issuesByStatus={"status":"open","limit":100}'; QUERY="${QUERY:-$DEFAULT_QUERY}"
[ -x "$LOADTEST_BIN" ] || { echo "build the harness first: cargo build --release -p zcache-loadtest" >&2; exit 1; }
[ -d "$KIT" ] || { echo "reference kit not found at $KIT (set KIT)" >&2; exit 1; }

mkdir -p "$KIT_WORK"
cp -r "$KIT"/. "$KIT_WORK"/ && chmod -R u+w "$KIT_WORK"
cd "$KIT_WORK"
. ./env.sh
RESULTS="$KIT_WORK/results"; mkdir -p "$RESULTS"

harness() { # NAME SERVER_URL PID [extra flags]
  local json="$RESULTS/$1.json"
  "$LOADTEST_BIN" --server "$2" --server-pid "$3" --upstream-db "$PG_URL" \
    --clients "$CLIENTS" --groups "$GROUPS_N" --query "$QUERY" \
    --write-rate "$WRITE_RATE" --warmup "$WARMUP" --duration "$DURATION" --auth u1 --user-id u1 \
    --json-out "$json" "${@:4}" || { echo "loadtest failed" >&2; return 1; }
  node -e '
    const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const ok = r.clients_hydrated > 0 && (r.config.write_rate === 0 || r.latency["commit->poke"].count > 0);
    process.exit(ok ? 0 : 1);' "$json" || { echo "smoke check failed: nothing hydrated or no commit->poke sample" >&2; return 1; }
}

run_zcache() {
  [ -x "$ZCACHE_BIN" ] || { echo "no zcache binary at $ZCACHE_BIN (cargo build --release)" >&2; return 1; }
  ./setup.sh >/dev/null
  ./start-zero.sh app-only >/dev/null
  # The old log must go before the start: the redirect truncates it only once the child runs,
  # and the wait below would otherwise see the previous run's "zcache ready".
  rm -f "$WORK_DIR"/zcache-replica.db* "$WORK_DIR/zcache.log"
  "$ZCACHE_BIN" --upstream-db "$PG_URL" --replica-file "$WORK_DIR/zcache-replica.db" --port "$ZCACHE_PORT" \
    --app-id "$ZERO_APP_ID" --query-url "$APP_URL/query" --mutate-url "$APP_URL/mutate" >"$WORK_DIR/zcache.log" 2>&1 &
  local pid=$!
  until grep -q "zcache ready" "$WORK_DIR/zcache.log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$WORK_DIR/zcache.log" >&2; return 1; }
    sleep 0.05
  done
  local rc=0
  harness zcache "http://127.0.0.1:$ZCACHE_PORT" "$pid" "$@" || rc=$?
  kill $pid; wait $pid 2>/dev/null || true
  ./stop.sh keep-pg >/dev/null
  return $rc
}

run_zero_cache() {
  ./setup.sh >/dev/null
  ./start-zero.sh fresh | grep -E "answering|process tree"
  local rc=0
  harness zero-cache "http://127.0.0.1:$ZERO_PORT" "$(cat "$WORK_DIR/zero-cache.pid")" "$@" || rc=$?
  ./stop.sh keep-pg >/dev/null
  return $rc
}

SERVERS="${SERVERS:-zcache zero-cache}"
rc=0
case " $SERVERS " in *" zcache "*) echo "=== zcache ($ZCACHE_BIN)"; run_zcache "$@" || rc=1;; esac
case " $SERVERS " in *" zero-cache "*) echo; echo "=== zero-cache 1.9.0"; run_zero_cache "$@" || rc=1;; esac
./stop.sh >/dev/null
# Both sides measured: each figure side by side, with how many times better zcache did.
if [ -f "$RESULTS/zcache.json" ] && [ -f "$RESULTS/zero-cache.json" ] && [ "$SERVERS" = "zcache zero-cache" ]; then
  echo; node - "$RESULTS/zcache.json" "$RESULTS/zero-cache.json" <<'JS'
const fs = require('fs');
const [z, r] = process.argv.slice(2).map(f => JSON.parse(fs.readFileSync(f, 'utf8')));
const rows = [];
for (const name of ['connect', 'hydration', 'commit->poke']) {
  for (const p of ['p50_ms', 'p99_ms', 'max_ms']) {
    const a = z.latency[name]?.[p], b = r.latency[name]?.[p];
    if (z.latency[name]?.count > 0) rows.push([`${name} ${p.replace('_ms', '')} (ms)`, a, b, a > 0 && b > 0 ? b / a : null]);
  }
}
const peak = x => x.server_rss_mib?.peak ?? x.server_rss_mib?.max;
rows.push(['server RSS peak (MiB)', peak(z), peak(r), peak(z) > 0 ? peak(r) / peak(z) : null]);
rows.push(['pokes/s received', z.pokes_per_s, r.pokes_per_s, r.pokes_per_s > 0 ? z.pokes_per_s / r.pokes_per_s : null]);
const fmt = v => v == null ? '-' : (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(1));
console.log('figure'.padEnd(28) + 'zcache'.padStart(10) + 'zero-cache'.padStart(12) + '  zcache better by');
for (const [n, a, b, x] of rows) console.log(n.padEnd(28) + fmt(a).padStart(10) + fmt(b).padStart(12) + '  ' + (x == null ? '-' : fmt(x) + 'x'));
JS
fi
echo "results as JSON in $RESULTS"
exit $rc
