#!/usr/bin/env bash
# The figures of zcache's performance targets, each measured on zcache and then on the
# reference zero-cache 1.9.0 with the same data, PostgreSQL and app server (the kit in
# ../shared/reference/zero-cache-kit), one workload after the other:
#   1. the kit's own Node client and bench (loadtest/compare-kit.sh 50 20,100): ready time,
#      idle RSS, hydration, update and mutation latency, 20 and 100 clients at once;
#   2. the load harness, one client at a time (8 clients at 1/s, no writes): hydration;
#   3. the load harness, 100 clients at once (no writes): all hydrated, RSS;
#   4. the load harness, 10 clients and 20 row updates/s: commit to poke;
#   5. zcache alone: 10,000 client groups with one live query each (issueById) and 1,000
#      row updates/s (zero-cache is not run there: 10,000 sockets would only measure its
#      collapse);
#   6. shared owners (issue 13; loadtest/shared.sh): 10,000 client groups on 100 shared
#      issuesByOwner queries (limit 20), a 50 s ramp, 200 row updates/s inside the windows, on
#      zcache; 6z the same on zero-cache at N = 100, 300, 1000 (up to the first it does not survive);
#   7. broadcast overload (issue 13; loadtest/shared.sh): 1,000 groups on one query
#      (issuesByStatus open 100), 1,000 row updates/s, on zcache.
# Prints each workload's side-by-side table; the logs stay in $OUT (default /tmp/zcache-targets).
#   loadtest/targets.sh            (build first: cargo build --release --workspace)
# Env: SKIP (workload numbers to leave out, e.g. "1 5 6z"), and smoke-kit.sh's, compare-kit.sh's
#      and shared.sh's own variables.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/zcache-targets}"; mkdir -p "$OUT"
SKIP=" ${SKIP:-} "

run() { # N TITLE COMMAND...
  local n=$1 title=$2; shift 2
  case "$SKIP" in *" $n "*) return 0;; esac
  echo; echo "=== $n. $title"
  "$@" >"$OUT/$n.log" 2>&1 || { echo "workload $n failed; see $OUT/$n.log" >&2; tail -20 "$OUT/$n.log" >&2; return 1; }
}

kit_summary() { grep -E "ready|idle RSS|initial sync|process tree|^\(|^metric|server-side|complete after|visible|mutation:|^===" "$OUT/1.log" || true; }
side_by_side() { sed -n '/^figure/,/^results/p' "$OUT/$1.log" | grep -v '^results'; }

run 1 "the kit's Node client and bench" "$ROOT/loadtest/compare-kit.sh" 50 20,100 && kit_summary
run 2 "one client at a time: hydration" env CLIENTS=8 GROUPS_N=8 WRITE_RATE=0 WARMUP=1s DURATION=10s \
  "$ROOT/loadtest/smoke-kit.sh" --quiet --connect-rate 1 && side_by_side 2
run 3 "100 clients at once" env CLIENTS=100 GROUPS_N=100 WRITE_RATE=0 WARMUP=15s DURATION=5s \
  "$ROOT/loadtest/smoke-kit.sh" --quiet --connect-rate 0 && side_by_side 3
run 4 "update to client" env CLIENTS=10 GROUPS_N=10 WRITE_RATE=20 WARMUP=5s DURATION=20s \
  "$ROOT/loadtest/smoke-kit.sh" --quiet && side_by_side 4
run 5 "10,000 client groups, 1,000 row updates/s (zcache)" env SERVERS=zcache CLIENTS=10000 \
  GROUPS_N=10000 WRITE_RATE=1000 WARMUP=25s DURATION=30s QUERY='issueById={"id":"i{group1}"}' \
  "$ROOT/loadtest/smoke-kit.sh" --quiet --connect-rate 500 --tx-size 10 \
  && sed -n '/^latency/,/^errors/p' "$OUT/5.log"
run 6 "shared owners: 10,000 groups on 100 shared queries, 200 row updates/s (zcache)" \
  env OUT="$OUT/shared" "$ROOT/loadtest/shared.sh" 6 && grep '^summary' "$OUT/6.log"
run 7 "broadcast overload: 1,000 groups on one query, 1,000 row updates/s (zcache)" \
  env OUT="$OUT/shared" "$ROOT/loadtest/shared.sh" 7 && grep '^summary' "$OUT/7.log"
run 6z "shared owners on zero-cache 1.9.0, N = 100, 300, 1000" \
  env OUT="$OUT/shared" "$ROOT/loadtest/shared.sh" 6z && grep -E '^summary|did not survive' "$OUT/6z.log"
echo; echo "logs in $OUT"
