#!/usr/bin/env bash
# Issue 13's workloads (shared query pipelines), each through loadtest/smoke-kit.sh on the
# reference kit's data (100 users, 10k issues, 50k comments):
#   6   shared owners, zcache: 10,000 clients, each its own client group, on
#       issuesByOwner={"owner":"u{group%100+1}","limit":20} (100 owners, so 100 groups share
#       each query), connecting over a 50 s ramp (200/s); then 200 row updates/s (title only,
#       rows inside the watched windows: the window is ordered by created), 30 s measured.
#   7   broadcast overload, zcache: 1,000 clients in 1,000 groups all on
#       issuesByStatus={"status":"open","limit":100}, 1,000 row updates/s in transactions of 10.
#   6z  shared owners on zero-cache 1.9.0 at N = ZC_NS (default "100 300 1000") clients and
#       groups, the same ramp rate, writes and measurement; stops at the first N it does not
#       survive (not every client hydrated, a reconnect storm: more than 5% extra connection
#       attempts, or no commit->poke sample).
# Each run prints the harness's table and one "summary" line; the logs (with the harness's
# progress line every second) and JSON go to $OUT
# (default /tmp/zcache-shared).
#   loadtest/shared.sh [6] [7] [6z]      (no argument: all three; build first:
#                                         cargo build --release --workspace)
# Env: OUT, ZC_NS, WARMUP6 (60s: the 50 s ramp and the last hydrations), DURATION6 (30s),
#      CLIENTS6 (10000), WARMUP7 (20s), DURATION7 (30s), DRAIN (60s), and smoke-kit.sh's own variables
#      (KIT_WORK, ZCACHE_BIN, LOADTEST_BIN, PGPORT, ZERO_PORT, APP_PORT, ZCACHE_PORT, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/zcache-shared}"; mkdir -p "$OUT"
WHICH="${*:-6 7 6z}"
ZC_NS="${ZC_NS:-100 300 1000}"
CLIENTS6="${CLIENTS6:-10000}"
WARMUP6="${WARMUP6:-60s}"; DURATION6="${DURATION6:-30s}"
WARMUP7="${WARMUP7:-20s}"; DURATION7="${DURATION7:-30s}"
SHARED_QUERY='issuesByOwner={"owner":"u{group%100+1}","limit":20}'
BROADCAST_QUERY='issuesByStatus={"status":"open","limit":100}'
# Only title changes: the windows are ordered by created, so every updated row stays in them.
WRITE_FLAGS=(--write-table issue --write-key id --write-column title)
# A lagging server delivers the last rows of the period seconds after it: wait for them (the
# drain ends 2 s after the last commit->poke sample), or the slowest samples are cut off.
DRAIN_FLAGS=(--drain "${DRAIN:-60s}")

# One socket per client in the harness and one per connection in the server (each its own
# process): 10,000 of each needs more than the usual 1,024 descriptors.
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi
[ "$(ulimit -n)" -ge $(( CLIENTS6 + 1024 )) ] || echo "warning: ulimit -n is $(ulimit -n), below $CLIENTS6 clients" >&2

# summary NAME JSON N: one line with the figures issue 13 asks for; exit 1 when the server did
# not survive (not all hydrated, reconnect storm, or no commit->poke sample).
summary() {
  node - "$1" "$2" "$3" <<'JS'
const [name, file, n] = process.argv.slice(2);
const r = JSON.parse(require('fs').readFileSync(file, 'utf8'));
const l = r.latency, cp = l['commit->poke'], h = l.hydration;
const f = v => v == null ? 'n/a' : (v >= 100 ? v.toFixed(0) : v.toFixed(1));
const errs = Object.entries(r.errors);
const connectErrs = errs.filter(([k]) => k.startsWith('connect')).reduce((a, [, v]) => a + v, 0);
// A reconnect storm: more than 5% extra connection attempts (successful or failed).
const storm = r.connects + connectErrs > Number(n) * 1.05;
const ok = r.clients_hydrated >= Number(n) && !storm && cp.count > 0;
const rss = r.server_rss_mib;
console.log(`summary ${name}: N=${n} hydrated ${r.clients_hydrated}/${n} (connects ${r.connects}, connected at end ${r.clients_connected_end})` +
  ` | commit->poke p50 ${f(cp.p50_ms)} p99 ${f(cp.p99_ms)} max ${f(cp.max_ms)} ms, ${cp.count} samples` +
  ` | rows ${r.rows_committed_measured}, unseen ${r.rows_unseen} (superseded ${r.rows_superseded}), receivers/row min ${r.receivers_per_row.min} mean ${r.receivers_per_row.mean} max ${r.receivers_per_row.max}` +
  ` | hydration p50 ${f(h.p50_ms)} p99 ${f(h.p99_ms)} max ${f(h.max_ms)} ms | connect errors ${connectErrs}` +
  ` | RSS MiB start ${f(rss.start)} peak ${f(rss.peak)} end ${f(rss.end)} | harness CPU ${r.harness_cpu_percent}%` +
  ` | errors ${errs.length ? errs.map(([k, v]) => k + '=' + v).join(',') : 'none'}` +
  ` | ${ok ? 'survived' : 'did NOT survive'}`);
process.exit(ok ? 0 : 1);
JS
}

# workload NAME N SERVER [env...] -- [loadtest flags...]
workload() {
  local name=$1 n=$2 server=$3; shift 3
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  local log="$OUT/$name.log" t0=$SECONDS rc=0 json="${KIT_WORK:-/tmp/lt-kit}/results/$server.json"
  rm -f "$json" "$OUT/$name.json"
  echo; echo "=== $name ($server, N=$n) at $(date -u +%FT%TZ), commit $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src || echo ' (src modified)'), load:$(uptime | sed 's/.*load average://')"
  env SERVERS="$server" CLIENTS="$n" GROUPS_N="$n" "${envs[@]}" \
    "$ROOT/loadtest/smoke-kit.sh" "${WRITE_FLAGS[@]}" "${DRAIN_FLAGS[@]}" "$@" >"$log" 2>&1 || rc=$?
  cp "$json" "$OUT/$name.json" 2>/dev/null || { echo "no result for $name (exit $rc); see $log" >&2; tail -20 "$log" >&2; return 1; }
  sed -n '/^loadtest:/,/^errors/p' "$log"
  echo "took $(( SECONDS - t0 )) s; load after:$(uptime | sed 's/.*load average://')"
  summary "$name" "$OUT/$name.json" "$n"
}

# The exit status is non-zero when a run produced no result; a run that did not survive is a
# finding (its summary says so), and for 6z it ends the escalation.

# shared.sh --summary NAME JSON N: the summary line of an earlier run's JSON.
if [ "${1:-}" = --summary ]; then summary "$2" "$3" "$4"; exit; fi

rc=0
for w in $WHICH; do
  case "$w" in
    6) workload 6-shared-owners-zcache "$CLIENTS6" zcache WRITE_RATE=200 WARMUP="$WARMUP6" DURATION="$DURATION6" \
         QUERY="$SHARED_QUERY" -- --connect-rate 200 --tx-size 1 || [ -f "$OUT/6-shared-owners-zcache.json" ] || rc=1;;
    7) workload 7-broadcast-zcache 1000 zcache WRITE_RATE=1000 WARMUP="$WARMUP7" DURATION="$DURATION7" \
         QUERY="$BROADCAST_QUERY" -- --connect-rate 200 --tx-size 10 || [ -f "$OUT/7-broadcast-zcache.json" ] || rc=1;;
    6z) for n in $ZC_NS; do
          # The ramp at 200/s takes n/200 s; zero-cache hydrates slowly, so 60 s beyond it.
          workload "6z-shared-owners-zero-cache-$n" "$n" zero-cache WRITE_RATE=200 \
            WARMUP="$(( n / 200 + 60 ))s" DURATION="$DURATION6" QUERY="$SHARED_QUERY" \
            -- --connect-rate 200 --tx-size 1 || {
              [ -f "$OUT/6z-shared-owners-zero-cache-$n.json" ] || rc=1
              echo "zero-cache did not survive N=$n; larger N not tried"; break; }
        done;;
    *) echo "unknown workload '$w' (6, 7 or 6z)" >&2; exit 2;;
  esac
done
echo; echo "logs and JSON in $OUT"
exit $rc
