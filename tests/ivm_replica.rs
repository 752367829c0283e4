//! Differential test of incremental query maintenance over the real pipeline: a real
//! PostgreSQL, the initial sync, the replicator streaming random transactions into the SQLite
//! replica, the changed rows it lists per version (`apply.rs`), a group's `Pending` gathering
//! them across versions (`pending.rs`), and `LiveQuery::push` (`ivm.rs`) reading the replica.
//!
//! Two client groups hold the same live queries: an eager one advances after every version,
//! a lagging one gathers 1 to 3 versions before it advances (and now and then puts back what
//! it took, as an advance that found its snapshot too new does). After every advance each
//! query's rows (with their path counts) and roots (in order) must equal a fresh evaluation in
//! the same replica snapshot, and every row whose count or contents changed must be reported
//! as touched. Each version's changed-row list is also checked directly against the replica:
//! every row that changed is listed, with the state it had before the version; a TRUNCATE
//! comes without a list, and the groups then re-hydrate.
//!
//! Seeded: IVM_REPLICA_SEED (default below) and IVM_REPLICA_TXNS pick another run.

#[path = "support/random_txns.rs"]
mod random_txns;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use glommio::channels::shared_channel::ConnectedReceiver;
use random_txns::*;
use support::*;
use zcache::embedded::pgcluster::PgCluster;
use zcache::shards::pending::Pending;
use zcache::shards::routes::{interests_of, Interest, Routes};
use zcache::shards::VersionReady;
use zcache::sqlite::ReplicaReader;
use zcache::zql::eval::RowCounts;
use zcache::zql::ivm::{LiveQuery, RowKey};
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, Ast};

const SEED_DEFAULT: u64 = 0x1f0_2025;
/// Upstream transactions streamed per run; each takes a few milliseconds of psql.
const TXNS_DEFAULT: usize = 200;
/// Versions the lagging group gathers at most before it advances.
const LAG_VERSIONS_MAX: usize = 3;

/// The replica tables, as the test reads them back.
const TABLES: [&str; 6] = ["user", "issue", "comment", "label", "issue_label", "tick"];

// ---------------------------------------------------------------------------------------------
// Client groups

/// What every group's advance checks and counts.
#[derive(Default, Debug)]
struct Stats {
    advances: usize,
    pushes: usize,
    rehydrations: usize,
    restores: usize,
    changes_pushed: usize,
    /// Query checks where the maintained result was not empty.
    nonempty_checks: usize,
    /// Per query: pushes that changed some row of its result.
    result_changes: Vec<usize>,
    /// Per query, the versions the routes sent its routed group, and whether its root is
    /// pinned by a value.
    routed: Vec<(usize, bool)>,
}

struct Group {
    name: &'static str,
    pending: Pending,
    live: Vec<LiveQuery>,
    /// Versions noted since the last advance.
    noted: usize,
    /// The newest version noted.
    watermark: u64,
}

impl Group {
    fn new(name: &'static str, queries: &[(String, Ast)], reader: &ReplicaReader) -> Self {
        reader.begin_snapshot().expect("snapshot");
        let live = queries
            .iter()
            .map(|(q, ast)| {
                let live =
                    LiveQuery::hydrate(ast, reader).unwrap_or_else(|e| panic!("hydrate {q}: {e}"));
                if let Err(e) = compare(&live, reader, ast) {
                    panic!("{name}: hydrated {q}: {e}");
                }
                live
            })
            .collect();
        reader.end_snapshot().expect("end snapshot");
        Group {
            name,
            pending: Pending::default(),
            live,
            noted: 0,
            watermark: 0,
        }
    }

    fn note(&mut self, v: &VersionReady) {
        self.pending.note(v);
        self.noted += 1;
        self.watermark = self.watermark.max(v.watermark);
    }

    /// Advances as `shards::group` does: takes what is pending, reads the changed rows in a
    /// new snapshot, pushes them into (or re-hydrates) the queries reading a changed table;
    /// then checks every query against a fresh evaluation in that snapshot.
    fn advance(
        &mut self,
        reader: &ReplicaReader,
        queries: &[(String, Ast)],
        at: &str,
        stats: &mut Stats,
    ) {
        let pending = std::mem::take(&mut self.pending);
        self.noted = 0;
        stats.advances += 1;
        let snapshot = reader.begin_snapshot().expect("snapshot");
        // Versions are awaited before the next commit: the snapshot has nothing unannounced.
        assert!(
            snapshot >= self.watermark,
            "a snapshot older than its versions"
        );
        let changes = pending.changes(reader).expect("changed rows");
        if let Some(c) = &changes {
            stats.changes_pushed += c.len();
        }
        stats.result_changes.resize(queries.len(), 0);
        for (n, (live, (q, ast))) in self.live.iter_mut().zip(queries).enumerate() {
            let ctx = || format!("{}: {q}, advancing {at}", self.name);
            if !pending.tables.iter().any(|t| live.reads(t)) {
                if let Err(e) = compare(live, reader, ast) {
                    panic!("{}: {e}\n(an untouched query)", ctx());
                }
                continue;
            }
            match &changes {
                Some(changes) => {
                    stats.pushes += 1;
                    let before = live.rows().clone();
                    let touched = live
                        .push(changes, reader)
                        .unwrap_or_else(|e| panic!("{}: push failed: {e}", ctx()));
                    if let Err(e) = compare(live, reader, ast)
                        .and_then(|()| check_touched(&before, live.rows(), &touched))
                    {
                        panic!("{}: {e}\npushed changes: {changes:#?}", ctx());
                    }
                    if &before != live.rows() {
                        stats.result_changes[n] += 1;
                    }
                }
                None => {
                    stats.rehydrations += 1;
                    *live = LiveQuery::hydrate(ast, reader)
                        .unwrap_or_else(|e| panic!("{}: re-hydrate failed: {e}", ctx()));
                    if let Err(e) = compare(live, reader, ast) {
                        panic!("{}: {e}\n(re-hydrated)", ctx());
                    }
                }
            }
            if !live.rows().is_empty() {
                stats.nonempty_checks += 1;
            }
        }
        reader.end_snapshot().expect("end snapshot");
    }
}

/// Every row whose count or contents changed is reported as touched (the CVR learns of
/// changes through these keys only).
fn check_touched(
    before: &RowCounts,
    after: &RowCounts,
    touched: &HashSet<RowKey>,
) -> Result<(), String> {
    let keys: BTreeSet<&RowKey> = before.keys().chain(after.keys()).collect();
    for k in keys {
        if before.get(k) != after.get(k) && !touched.contains(k) {
            return Err(format!(
                "{k:?} changed ({:?} -> {:?}) but was not reported as touched",
                before.get(k),
                after.get(k)
            ));
        }
    }
    Ok(())
}

fn sorted(m: &RowCounts) -> Vec<(RowKey, Row, u32)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(k, (r, n))| (k.clone(), r.clone(), *n))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The maintained result equals a fresh evaluation in the reader's open snapshot: the same
/// roots in the same order, the same rows with the same path counts.
fn compare(live: &LiveQuery, reader: &ReplicaReader, ast: &Ast) -> Result<(), String> {
    let fresh = evaluate(ast, reader).map_err(|e| format!("evaluate failed: {e}"))?;
    let fresh_roots: Vec<&Row> = fresh.nodes.iter().map(|n| &n.row).collect();
    let live_roots: Vec<&Row> = live.roots().iter().collect();
    if live_roots != fresh_roots {
        return Err(format!(
            "roots differ:\n  live  {live_roots:?}\n  fresh {fresh_roots:?}"
        ));
    }
    let (got, want) = (sorted(live.rows()), sorted(&fresh.rows));
    if got == want {
        return Ok(());
    }
    let got_map: BTreeMap<_, _> = got.iter().map(|(k, r, n)| (k, (r, n))).collect();
    let want_map: BTreeMap<_, _> = want.iter().map(|(k, r, n)| (k, (r, n))).collect();
    let mut lines = Vec::new();
    for k in got_map
        .keys()
        .chain(want_map.keys())
        .collect::<BTreeSet<_>>()
    {
        let (g, w) = (got_map.get(k), want_map.get(k));
        if g != w {
            lines.push(format!("  {k:?}: live {g:?}, fresh {w:?}"));
        }
    }
    Err(format!("synced rows differ:\n{}", lines.join("\n")))
}

// ---------------------------------------------------------------------------------------------
// The changed-row lists, checked against the replica itself

/// Every row of the replica, by (table, primary-key values' Debug form).
type Mirror = BTreeMap<(String, String), Row>;

fn key_text(key: &[Value]) -> String {
    format!("{key:?}")
}

fn read_mirror(reader: &ReplicaReader) -> Mirror {
    let mut out = Mirror::new();
    for table in TABLES {
        let spec = reader.table_spec(table).expect("replica table");
        for row in reader.fetch_rows(table, &[]).expect("rows") {
            let key: Vec<Value> = spec.primary_key.iter().map(|&i| row[i].clone()).collect();
            out.insert((table.to_string(), key_text(&key)), row);
        }
    }
    out
}

/// A version's list names every row that changed, each first with its state before; and
/// it is missing exactly when the transaction truncated or changed too many rows.
fn check_version_rows(
    v: &VersionReady,
    before: &Mirror,
    after: &Mirror,
    unlisted: Unlisted,
    i: usize,
) {
    let changed: BTreeSet<&(String, String)> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    let tables: BTreeSet<&str> = v.tables.iter().map(String::as_str).collect();
    for (table, _) in &changed {
        assert!(
            tables.contains(table.as_str()),
            "txn {i}: {table} changed but the version names {tables:?}"
        );
    }
    let Some(rows) = &v.rows else {
        assert!(
            unlisted != Unlisted::No,
            "txn {i}: a version without its rows, yet no TRUNCATE nor too many rows"
        );
        return;
    };
    assert_eq!(unlisted, Unlisted::No, "txn {i}: came with its row list");
    let mut first_old: HashMap<(String, String), Option<Row>> = HashMap::new();
    let mut last_new: HashMap<(String, String), Option<Row>> = HashMap::new();
    for c in rows.iter() {
        let spec_key = (c.table.clone(), key_text(&c.key));
        first_old
            .entry(spec_key.clone())
            .or_insert_with(|| c.old.clone());
        last_new.insert(spec_key, c.new.clone());
    }
    for (key, new) in &last_new {
        assert_eq!(
            new.as_ref(),
            after.get(key),
            "txn {i}: the listed state after of {key:?} is not the replica's"
        );
    }
    for (key, old) in &first_old {
        assert_eq!(
            old.as_ref(),
            before.get(key),
            "txn {i}: the listed state before of {key:?} is not the replica's"
        );
    }
    for key in changed {
        assert!(
            first_old.contains_key(key),
            "txn {i}: {key:?} changed ({:?} -> {:?}) but is not listed",
            before.get(key),
            after.get(key)
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// The versions up to and including the one of the commit at `at` (idle-watermark versions,
/// with no tables, may come before it).
async fn versions_until(rx: &ConnectedReceiver<VersionReady>, at: CommitLsn) -> Vec<VersionReady> {
    let mut out = Vec::new();
    loop {
        let v = next_version(rx).await;
        assert!(
            v.watermark <= at.after,
            "a version at {} past the commit",
            v.watermark
        );
        let done = !v.tables.is_empty();
        if done {
            assert!(
                at.contains(v.watermark),
                "a data version before the commit's"
            );
        } else {
            assert!(v.rows.as_ref().is_some_and(|r| r.is_empty()));
        }
        out.push(v);
        if done {
            return out;
        }
    }
}

fn run_pipeline(pg: &PgCluster, seed: u64, txns: usize) -> Stats {
    let mut rng = Rng(seed);
    psql(pg, SCHEMA);
    psql(pg, &initial_data(&mut rng));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(pg, &path, "ivm", &[]);
    let queries = queries();
    run(async {
        let prepared = prepare(&cfg).await;
        let reader = ReplicaReader::open(&path).expect("open the replica");
        reader.begin_snapshot().expect("snapshot");
        let mut mirror = read_mirror(&reader);
        reader.end_snapshot().expect("end snapshot");
        let mut eager = Group::new("eager group", &queries, &reader);
        let mut lagging = Group::new("lagging group", &queries, &reader);
        // One group per query, hearing only of the versions the shard's routes send it.
        let mut routed: Vec<(Group, Vec<(String, Ast)>)> = queries
            .iter()
            .map(|q| {
                let one = vec![q.clone()];
                (Group::new("routed group", &one, &reader), one)
            })
            .collect();
        let mut stats = Stats::default();
        let mut routes = Routes::default();
        for (n, (g, _)) in routed.iter().enumerate() {
            let mut interests = BTreeSet::new();
            interests_of(&g.live[0], &mut interests);
            let pinned = interests
                .iter()
                .any(|i| matches!(i, Interest::Keyed { .. }));
            stats.routed.push((0, pinned));
            routes.set(&n.to_string(), interests);
        }
        let st = start_streaming(&cfg, prepared).await;
        let mut unlisted_seen = BTreeSet::new();
        // What the lagging group took and will put back (`Pending::restore`).
        let mut taken: Option<Pending> = None;
        for i in 0..txns {
            let (sql, unlisted) = transaction(&mut rng, i);
            unlisted_seen.insert(format!("{unlisted:?}"));
            let at = commit(pg, &sql);
            let at_txn = format!("after txn {i}:\n{sql}");
            for v in versions_until(&st.rx, at).await {
                if !v.tables.is_empty() {
                    reader.begin_snapshot().expect("snapshot");
                    let now = read_mirror(&reader);
                    reader.end_snapshot().expect("end snapshot");
                    check_version_rows(&v, &mirror, &now, unlisted, i);
                    mirror = now;
                }
                eager.note(&v);
                lagging.note(&v);
                for n in routes.groups_for(&v, |t| reader.table_spec(t), true) {
                    let n = n.parse::<usize>().expect("group number");
                    stats.routed[n].0 += 1;
                    routed[n].0.note(&v);
                }
            }
            eager.advance(&reader, &queries, &at_txn, &mut stats);
            // Not routed: the query must still equal a fresh evaluation without advancing.
            let mut routed_stats = Stats::default();
            for (g, one) in &mut routed {
                g.advance(&reader, one, &at_txn, &mut routed_stats);
            }

            // An advance that found newer versions committed than announced puts back what
            // it took; the versions noted since come after it.
            if let Some(older) = taken.take() {
                stats.restores += 1;
                lagging.pending.restore(older);
            } else if lagging.noted > 0 && i + 1 < txns && rng.chance(1, 12) {
                taken = Some(std::mem::take(&mut lagging.pending));
                continue;
            }
            if lagging.noted >= LAG_VERSIONS_MAX || rng.chance(1, 2) || i + 1 == txns {
                lagging.advance(&reader, &queries, &at_txn, &mut stats);
            }
        }
        if txns > OVERFLOW_AT {
            assert_eq!(unlisted_seen.len(), 3, "{unlisted_seen:?}");
        }
        st.stop().await;
        stats
    })
}

#[test]
fn live_queries_follow_the_replicated_stream() {
    let seed = env_or("IVM_REPLICA_SEED", SEED_DEFAULT);
    let txns = env_or("IVM_REPLICA_TXNS", TXNS_DEFAULT);
    eprintln!("IVM_REPLICA_SEED={seed} IVM_REPLICA_TXNS={txns}");
    let pg = cluster(&[]);
    let stats = run_pipeline(&pg, seed, txns);
    eprintln!("{stats:?}");
    // The run exercised what it claims to.
    assert!(stats.pushes > txns, "{stats:?}");
    assert!(stats.rehydrations >= 2, "{stats:?}");
    assert!(stats.restores >= 1, "{stats:?}");
    assert!(stats.changes_pushed > txns, "{stats:?}");
    assert!(stats.nonempty_checks > stats.pushes / 2, "{stats:?}");
    // Every query's result moved under the pushed changes, not just under re-hydration.
    assert!(stats.result_changes.iter().all(|&n| n > 0), "{stats:?}");
    // Every routed group's query stayed equal to a fresh evaluation, and the routes spared
    // the pinned ones versions that the others followed.
    let pinned: Vec<usize> = stats.routed.iter().filter(|r| r.1).map(|r| r.0).collect();
    let whole = stats.routed.iter().filter(|r| !r.1).map(|r| r.0).max();
    assert!(pinned.len() >= 4, "{stats:?}");
    assert!(
        pinned.iter().all(|&n| n > 0 && Some(n) < whole),
        "{stats:?}"
    );
}
