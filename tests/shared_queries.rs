//! Differential test of the shard's shared queries (issue 13, `shards::shared`) over the real
//! pipeline: a real PostgreSQL, the initial sync, the replicator streaming seeded random
//! transactions (TRUNCATEs and a huge transaction among them, whose versions come without
//! their rows) into the SQLite replica, and one `SharedQueries` per model shard that many
//! model client groups hold queries of.
//!
//! A model group does what `shards::group` does with its `Cvr` (`apply_shared`, `hydrate`,
//! `eval::evaluate_into`/`catch_up_into`): in a replica snapshot it catches the shared queries
//! up, applies to its CVR what `since` says its queries lack from its state (the logged diffs,
//! or a copy of the result when the log does not reach back), and takes a copy of the result
//! of each query it joins. Groups advance at random (some sleep for many versions, beyond a
//! short log), join queries that no one or someone already holds, leave them (dropping the
//! hold and the CVR query) and join again later at another state. After every advance the
//! group's CVR must hold exactly the union of a fresh evaluation of its queries in the same
//! snapshot: the same live rows with the same contents and put JSON, each row referenced by
//! as many of its queries as reach it, each query record with exactly its rows.
//!
//! Two shards run side by side on the same stream: one with a log of a few steps and rows
//! (so lagging groups and long transactions take copies), one with the default log.
//!
//! An advance waits while its snapshot holds versions not yet announced (as
//! `Group::advance_locked` does: catching up past unannounced versions moves the shared
//! queries to a state without their changes, which this test found). A join does not wait
//! (as `Group::hydrate`): in such a snapshot it joins without catching the shared queries up
//! and owes its poke, so its view is checked at its next advance, once the versions are
//! announced and pushed (a query it hydrated there is hydrated again instead, as it has
//! their changes already: pushing them twice broke a window, which this test found).
//! A group lacking several steps of a query applies them as one net diff, as
//! `eval::catch_up_into` does (applied one after the other, an older step could put back old
//! contents of a row another query of the group reaches: this test found that too).
//! SHARED_QUERIES_TRACE=1 prints the versions and every catch-up applied.
//!
//! Seeded: SHARED_QUERIES_SEED and SHARED_QUERIES_TXNS pick another run.

#[path = "support/random_txns.rs"]
mod random_txns;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use glommio::channels::shared_channel::ConnectedReceiver;
use random_txns::*;
use serde_json::json;
use support::*;
use zcache::cvr::{Cvr, QuerySpec, RowKey};
use zcache::protocol::cookie::Version;
use zcache::protocol::down::put_row_json;
use zcache::shards::shared::{query_key, Catchup, QueryKey, SharedHandle, SharedQueries};
use zcache::shards::VersionReady;
use zcache::sqlite::{IndexRequests, ReplicaReader};
use zcache::zql::eval::RowCounts;
use zcache::zql::ivm::LiveQuery;
use zcache::zql::Ast;

const SEED_DEFAULT: u64 = 0x5ba_2ed1;
/// Upstream transactions streamed per run; each takes a few milliseconds of psql.
const TXNS_DEFAULT: usize = 400;
/// Client groups per shard.
const GROUPS: usize = 12;
/// Distinct queries the groups of a run choose from (so several groups share each).
const POOL: usize = 6;
/// The queries of the pool the groups start with.
const POOL_INITIAL: usize = 3;
/// The short log's bounds: steps and touched rows.
const SHORT_LOG: (usize, usize) = (4, 40);

// ---------------------------------------------------------------------------------------------
// The versions of one commit

/// The versions up to and including the one of the commit at `at` (idle-watermark versions,
/// with no tables, may come before it).
async fn versions_until(rx: &ConnectedReceiver<VersionReady>, at: CommitLsn) -> Vec<VersionReady> {
    let mut out = Vec::new();
    loop {
        let v = next_version(rx).await;
        assert!(v.watermark <= at.after, "a version past the commit");
        let done = !v.tables.is_empty();
        out.push(v);
        if done {
            return out;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model client groups, doing with their CVRs what `shards::group` does

/// What the run did, per shard, to show it exercised what it claims to.
#[derive(Default, Debug)]
struct Stats {
    catch_ups: usize,
    advances: usize,
    checks: usize,
    /// Checks of a group with some live row.
    nonempty_checks: usize,
    /// Non-empty logged diffs applied to a CVR.
    diffs_applied: usize,
    /// Catch-ups that took a copy of the result.
    copies: usize,
    /// Joins of a query no group held (hydrated anew), of one some group held, of one no
    /// group held any more but not yet dropped.
    joins_new: usize,
    joins_held: usize,
    joins_unswept: usize,
    /// Joins of a query the group had left before.
    rejoins: usize,
    leaves: usize,
    /// Leaves of a group that was not advancing (no snapshot).
    leaves_asleep: usize,
    /// The most versions a group went without advancing.
    max_lag: usize,
    /// Versions that came without their rows (TRUNCATE, too many rows).
    unlisted_versions: usize,
    /// Advances that found the snapshot newer than the versions noted, and waited.
    early: usize,
    /// Joins in a snapshot newer than the versions noted (checked at the next advance).
    early_joins: usize,
}

/// The query `q` of `queries()` is `q{q}` in the CVRs.
fn hash(q: usize) -> String {
    format!("q{q}")
}

fn trace() -> bool {
    std::env::var_os("SHARED_QUERIES_TRACE").is_some()
}

/// The client every model group has.
const CLIENT: &str = "c1";

struct ModelGroup {
    name: String,
    /// The shared queries' state its CVR's query rows are at (`Group::shared_state`).
    state: u64,
    cvr: Cvr,
    /// Its got queries, by query number, with their holds on the shared queries.
    held: BTreeMap<usize, SharedHandle>,
    /// Queries it held once and left.
    left: BTreeSet<usize>,
    /// It does not advance before this version count.
    asleep_until: usize,
    /// The version count of its last advance.
    last_advance: usize,
    /// It joined in a snapshot ahead of the versions noted: its view is not what a client
    /// may see until those are (`Group::poke_owed_at`).
    owed: bool,
}

/// A fresh evaluation of each query, made once per replica state.
#[derive(Default)]
struct Fresh {
    at: u64,
    live: HashMap<usize, Rc<LiveQuery>>,
}

impl Fresh {
    fn get(&mut self, q: usize, ast: &Ast, reader: &ReplicaReader) -> Rc<LiveQuery> {
        let w = reader.snapshot_watermark();
        if w != self.at {
            self.live.clear();
            self.at = w;
        }
        self.live
            .entry(q)
            .or_insert_with(|| {
                Rc::new(
                    LiveQuery::hydrate(ast, reader)
                        .unwrap_or_else(|e| panic!("fresh hydration of q{q}: {e}")),
                )
            })
            .clone()
    }
}

impl ModelGroup {
    fn new(name: String) -> Self {
        ModelGroup {
            name,
            state: 0,
            cvr: Cvr::new("g"),
            held: BTreeMap::new(),
            left: BTreeSet::new(),
            asleep_until: 0,
            last_advance: 0,
            owed: false,
        }
    }

    /// `apply_shared`: brings its got queries from its state to the shared one, in the
    /// snapshot the shared queries were just caught up to.
    fn advance(
        &mut self,
        shared: &mut SharedQueries,
        reader: &ReplicaReader,
        at: Version,
        stats: &mut Stats,
    ) -> bool {
        let (from, to) = (self.state, shared.seq());
        if from == to {
            return false;
        }
        let mut changed = false;
        for (&q, handle) in &self.held {
            let catchup = shared
                .since(&handle.key, from, Some(reader))
                .unwrap_or_else(|e| panic!("{}: since({from}) of q{q}: {e}", self.name))
                .expect("with a reader, a catch-up is always known");
            match catchup {
                Catchup::Steps(diffs) => {
                    if trace() {
                        eprintln!(
                            "  {} q{q} {from}->{to}: steps {:?}",
                            self.name,
                            diffs
                                .iter()
                                .map(|d| d
                                    .iter()
                                    .map(|(k, r)| (k.clone(), r.as_ref().map(|r| r.row.clone())))
                                    .collect::<Vec<_>>())
                                .collect::<Vec<_>>()
                        );
                    }
                    {
                        // Each key's last entry only: what a group at `from` lacks, as one
                        // diff (another query's newer contents are not overwritten by an
                        // older step's).
                        let mut net: HashMap<RowKey, _> = HashMap::new();
                        for d in &diffs {
                            stats.diffs_applied += usize::from(!d.is_empty());
                            for (k, r) in d.iter() {
                                net.insert(k.clone(), r.clone());
                            }
                        }
                        let net: Vec<_> = net.into_iter().collect();
                        changed |= self.cvr.update_query_rows(&hash(q), &net, at);
                    }
                }
                Catchup::Copy(rows) => {
                    if trace() {
                        eprintln!(
                            "  {} q{q} {from}->{to}: copy of {} rows",
                            self.name,
                            rows.len()
                        );
                    }
                    stats.copies += 1;
                    changed |= self.cvr.set_query_rows(&hash(q), &rows, at);
                }
            }
        }
        self.state = to;
        changed
    }

    /// `evaluate_into`: a hold on the shared query and a copy of its current result, after
    /// the group's other queries were brought to the shared state in the same snapshot.
    fn join(
        &mut self,
        q: usize,
        ast: &Rc<Ast>,
        shared: &mut SharedQueries,
        reader: &ReplicaReader,
        indexes: &IndexRequests,
        at: Version,
    ) -> bool {
        assert_eq!(self.state, shared.seq(), "a join before the advance");
        let mut changed =
            self.cvr
                .put_desired(CLIENT, &hash(q), QuerySpec::Ast(json!(q)), None, at);
        let handle = shared
            .acquire(ast, reader, indexes)
            .unwrap_or_else(|e| panic!("{}: acquiring q{q}: {e}", self.name));
        let rows = shared
            .rows(&handle.key, reader)
            .unwrap_or_else(|e| panic!("{}: rows of q{q}: {e}", self.name));
        changed |= self.cvr.set_query_rows(&hash(q), &rows, at);
        self.held.insert(q, handle);
        changed
    }

    /// Drops the query: its hold, and its CVR record (its rows lose a reference).
    fn leave(&mut self, q: usize, at: Version) -> bool {
        self.held.remove(&q).expect("a held query");
        self.left.insert(q);
        self.cvr.remove_query(&hash(q), at)
    }

    /// The CVR equals the union of fresh evaluations of its queries in the open snapshot.
    fn check(
        &self,
        reader: &ReplicaReader,
        queries: &[(String, Rc<Ast>)],
        fresh: &mut Fresh,
        what: &str,
    ) {
        let mut errors = Vec::new();
        let mut want: HashMap<&RowKey, (&zcache::zql::value::Row, u32)> = HashMap::new();
        let lives: Vec<(usize, Rc<LiveQuery>)> = self
            .held
            .keys()
            .map(|&q| (q, fresh.get(q, &queries[q].1, reader)))
            .collect();
        for (q, live) in &lives {
            let rows: &RowCounts = live.rows();
            for (k, (row, _)) in rows {
                want.entry(k).or_insert((row, 0)).1 += 1;
            }
            match self.cvr.queries.get(&hash(*q)) {
                None => errors.push(format!("q{q} has no CVR record")),
                Some(rec) if rec.got.is_none() => errors.push(format!("q{q} is not got")),
                Some(rec) => {
                    let have: BTreeSet<_> = rec.keys.iter().collect();
                    let fresh: BTreeSet<_> = rows.keys().collect();
                    for k in have.difference(&fresh) {
                        errors.push(format!("q{q}'s record reaches {k:?}, which it does not"));
                    }
                    for k in fresh.difference(&have) {
                        errors.push(format!("q{q}'s record lacks {k:?}"));
                    }
                }
            }
        }
        let recorded: BTreeSet<String> = self.cvr.queries.keys().cloned().collect();
        let held: BTreeSet<String> = self.held.keys().map(|&q| hash(q)).collect();
        if recorded != held {
            errors.push(format!("CVR queries {recorded:?}, held {held:?}"));
        }
        for (k, rec) in &self.cvr.rows {
            if rec.refs == 0 {
                if rec.contents.is_some() {
                    errors.push(format!("tombstone {k:?} keeps contents"));
                }
                if want.contains_key(k) {
                    errors.push(format!("{k:?} is a tombstone, but a query reaches it"));
                }
                continue;
            }
            let Some((row, n)) = want.get(k) else {
                errors.push(format!(
                    "{k:?} is live (refs {}, {:?}) but no query reaches it",
                    rec.refs,
                    rec.contents.as_ref().map(|d| &d.row)
                ));
                continue;
            };
            if rec.refs != *n {
                errors.push(format!("{k:?} has refs {}, {n} queries reach it", rec.refs));
            }
            let Some(data) = &rec.contents else {
                errors.push(format!("{k:?} is live without contents"));
                continue;
            };
            if data.row != **row {
                errors.push(format!("{k:?} holds {:?}, fresh {:?}", data.row, row));
                continue;
            }
            let spec = reader.table_spec(k.table()).expect("the row's table");
            if data.put_json() != put_row_json(&spec, row) {
                errors.push(format!(
                    "{k:?}'s put JSON {} is not {}",
                    data.put_json(),
                    put_row_json(&spec, row)
                ));
            }
            if data.digest != zcache::cvr::row_digest(row) {
                errors.push(format!("{k:?}'s digest is not its row's"));
            }
        }
        for k in want.keys() {
            if self.cvr.rows.get(*k).is_none_or(|r| r.refs == 0) {
                errors.push(format!(
                    "{k:?} is reached by a query but not live in the CVR"
                ));
            }
        }
        if !errors.is_empty() {
            panic!(
                "{}, {what} (at state {}, holding {:?}, left before {:?}):\n  {}",
                self.name,
                self.state,
                self.held.keys().collect::<Vec<_>>(),
                self.left,
                errors.join("\n  ")
            );
        }
    }
}

struct ModelShard {
    name: &'static str,
    shared: SharedQueries,
    groups: Vec<ModelGroup>,
    indexes: IndexRequests,
    stats: Stats,
    /// The newest version noted (`Shard::last_version`).
    last_noted: u64,
}

impl ModelShard {
    fn new(name: &'static str, shared: SharedQueries) -> Self {
        ModelShard {
            name,
            shared,
            groups: (0..GROUPS)
                .map(|g| ModelGroup::new(format!("{name}, group {g}")))
                .collect(),
            indexes: IndexRequests::default(),
            stats: Stats::default(),
            last_noted: 0,
        }
    }

    fn note(&mut self, v: &VersionReady) {
        if trace() {
            eprintln!(
                "{}: version {} tables {:?} rows {:?}",
                self.name,
                v.watermark,
                v.tables,
                v.rows.as_ref().map(|r| r.len())
            );
        }
        self.stats.unlisted_versions += usize::from(v.rows.is_none());
        self.shared.note(v);
        self.last_noted = self.last_noted.max(v.watermark);
    }

    /// The distinct ASTs its groups hold.
    fn held_keys(&self) -> BTreeSet<QueryKey> {
        self.groups
            .iter()
            .flat_map(|g| g.held.values().map(|h| h.key.clone()))
            .collect()
    }

    /// Catches the shared queries up in the open snapshot; a catch-up that moves drops the
    /// queries nobody holds, and keeps every held one.
    fn catch_up(&mut self, reader: &ReplicaReader) {
        let before = self.shared.seq();
        self.shared
            .catch_up(reader)
            .unwrap_or_else(|e| panic!("{}: catch-up: {e}", self.name));
        self.stats.catch_ups += 1;
        let held = self.held_keys();
        if self.shared.seq() != before {
            assert_eq!(
                self.shared.len(),
                held.len(),
                "{}: the shared queries after a catch-up are not those held",
                self.name
            );
        }
        for k in held {
            assert!(
                self.shared.live(&k).is_some(),
                "{}: a held query is gone",
                self.name
            );
        }
    }

    /// One group's advance (in a snapshot of its own), with what it joins and leaves there,
    /// checked against fresh evaluations.
    #[allow(clippy::too_many_arguments)]
    fn advance_group(
        &mut self,
        g: usize,
        reader: &ReplicaReader,
        queries: &[(String, Rc<Ast>)],
        pool: &[usize],
        rng: &mut Rng,
        fresh: &mut Fresh,
        count: usize,
        churn: bool,
    ) {
        let snapshot = reader.begin_snapshot().expect("snapshot");
        let early = snapshot > self.last_noted;
        if early && !(churn && self.groups[g].held.len() < 3 && rng.chance(1, 3)) {
            // Newer versions are committed than announced: as `Group::advance_locked`, the
            // group waits for their announcement (its changed rows are not noted yet).
            self.stats.early += 1;
            reader.end_snapshot().expect("end snapshot");
            return;
        }
        if !early {
            // Ahead of the announcements, the shared queries stay where they are
            // (`Group::hydrate`); a query hydrated there knows its snapshot.
            self.catch_up(reader);
        }
        let held_elsewhere: BTreeSet<QueryKey> = self
            .groups
            .iter()
            .enumerate()
            .filter(|(n, _)| *n != g)
            .flat_map(|(_, o)| o.held.values().map(|h| h.key.clone()))
            .collect();
        let group = &mut self.groups[g];
        let stats = &mut self.stats;
        stats.advances += 1;
        stats.max_lag = stats.max_lag.max(count - group.last_advance);
        group.last_advance = count;
        let at = group.cvr.next_data_version(snapshot);
        let mut changed = group.advance(&mut self.shared, reader, at, stats);
        if churn && !early && !group.held.is_empty() && rng.chance(1, 8) {
            let held: Vec<usize> = group.held.keys().copied().collect();
            changed |= group.leave(rng.pick(&held), at);
            stats.leaves += 1;
        }
        if churn && group.held.len() < 3 && (early || rng.chance(1, 6)) {
            let free: Vec<usize> = pool
                .iter()
                .copied()
                .filter(|q| !group.held.contains_key(q))
                .collect();
            let q = rng.pick(&free);
            let key = query_key(&queries[q].1);
            if held_elsewhere.contains(&key) {
                stats.joins_held += 1;
            } else if self.shared.live(&key).is_some() {
                stats.joins_unswept += 1;
            } else {
                stats.joins_new += 1;
            }
            stats.rejoins += usize::from(group.left.contains(&q));
            changed |= group.join(
                q,
                &queries[q].1,
                &mut self.shared,
                reader,
                &self.indexes,
                at,
            );
        }
        if changed {
            group.cvr.version = at;
        }
        if early {
            // A hydration ahead of the announcements (`Group::hydrate`): no poke, no check.
            stats.early_joins += 1;
            group.owed = true;
            reader.end_snapshot().expect("end snapshot");
            return;
        }
        let owed = std::mem::take(&mut group.owed);
        group.check(
            reader,
            queries,
            fresh,
            &format!(
                "advancing after version {count}{}",
                if owed {
                    " (after a join ahead of it)"
                } else {
                    ""
                }
            ),
        );
        stats.checks += 1;
        stats.nonempty_checks += usize::from(group.cvr.rows.values().any(|r| r.refs > 0));
        reader.end_snapshot().expect("end snapshot");
    }

    /// After a version was noted: some groups advance, others lag; some fall asleep for many
    /// versions (past the short log), and a sleeping group may leave a query.
    fn on_version(
        &mut self,
        reader: &ReplicaReader,
        queries: &[(String, Rc<Ast>)],
        pool: &[usize],
        rng: &mut Rng,
        fresh: &mut Fresh,
        count: usize,
    ) {
        for g in 0..GROUPS {
            let group = &mut self.groups[g];
            if count < group.asleep_until {
                if !group.held.is_empty() && rng.chance(1, 40) {
                    let held: Vec<usize> = group.held.keys().copied().collect();
                    let at = group.cvr.next_config_version();
                    if group.leave(rng.pick(&held), at) {
                        group.cvr.version = at;
                    }
                    self.stats.leaves_asleep += 1;
                }
                continue;
            }
            if rng.chance(1, 25) {
                group.asleep_until = count + 3 + rng.below(30) as usize;
                continue;
            }
            if rng.chance(1, 2) {
                self.advance_group(g, reader, queries, pool, rng, fresh, count, true);
            }
        }
    }
}

fn run_pipeline(
    pg: &zcache::embedded::pgcluster::PgCluster,
    seed: u64,
    txns: usize,
) -> Vec<(&'static str, Stats)> {
    let mut rng = Rng(seed);
    psql(pg, SCHEMA);
    psql(pg, &initial_data(&mut rng));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(pg, &path, "shq", &[]);
    let queries: Vec<(String, Rc<Ast>)> = queries()
        .into_iter()
        .map(|(name, ast)| (name, Rc::new(ast)))
        .collect();
    // The few queries this run's groups choose from.
    let mut pool: Vec<usize> = (0..queries.len()).collect();
    for i in 0..pool.len() {
        let j = i + rng.below((pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(POOL);
    pool.sort();
    eprintln!("queries of this run:");
    for &q in &pool {
        eprintln!("  {}", queries[q].0);
    }
    run(async {
        let prepared = prepare(&cfg).await;
        let reader = ReplicaReader::open(&path).expect("open the replica");
        let mut fresh = Fresh::default();
        let mut shards = vec![
            ModelShard::new(
                "short-log shard",
                SharedQueries::with_log_limits(SHORT_LOG.0, SHORT_LOG.1),
            ),
            ModelShard::new("default-log shard", SharedQueries::default()),
        ];
        // Every group starts with 1 to 3 of the pool's queries.
        for shard in &mut shards {
            for g in 0..GROUPS {
                reader.begin_snapshot().expect("snapshot");
                shard.catch_up(&reader);
                let group = &mut shard.groups[g];
                let at = group.cvr.next_data_version(reader.snapshot_watermark());
                group.advance(&mut shard.shared, &reader, at, &mut shard.stats);
                let n = 1 + rng.below(3) as usize;
                let mut changed = false;
                while group.held.len() < n {
                    // The rest of the pool is joined later, by the first group anew.
                    let q = rng.pick(&pool[..POOL_INITIAL]);
                    if !group.held.contains_key(&q) {
                        changed |= group.join(
                            q,
                            &queries[q].1,
                            &mut shard.shared,
                            &reader,
                            &shard.indexes,
                            at,
                        );
                    }
                }
                if changed {
                    group.cvr.version = at;
                }
                group.check(&reader, &queries, &mut fresh, "joining at the start");
                reader.end_snapshot().expect("end snapshot");
            }
        }
        let st = start_streaming(&cfg, prepared).await;
        let mut count = 0;
        let mut i = 0;
        while i < txns {
            // Now and then two or three transactions replicated before the first is
            // announced: while the shards take their versions one by one, the replica is
            // ahead of them (as a busy shard's is), and advances wait while joins go ahead.
            let batch = if rng.chance(1, 6) {
                2 + rng.below(2) as usize
            } else {
                1
            };
            let mut ats = Vec::new();
            for _ in 0..batch.min(txns - i) {
                let (sql, _) = transaction(&mut rng, i);
                ats.push(commit(pg, &sql));
                i += 1;
            }
            let mut versions = Vec::new();
            for at in ats {
                versions.extend(versions_until(&st.rx, at).await);
            }
            for v in versions {
                count += 1;
                for shard in &mut shards {
                    shard.note(&v);
                    shard.on_version(&reader, &queries, &pool, &mut rng, &mut fresh, count);
                }
            }
        }
        // Everyone catches up, then some groups leave everything: the next catch-up drops
        // what nobody holds any more.
        for shard in &mut shards {
            for g in 0..GROUPS {
                shard.advance_group(
                    g, &reader, &queries, &pool, &mut rng, &mut fresh, count, false,
                );
            }
            for group in shard.groups.iter_mut().filter(|_| rng.chance(1, 2)) {
                let at = group.cvr.next_config_version();
                for q in group.held.keys().copied().collect::<Vec<_>>() {
                    group.leave(q, at);
                }
                group.cvr.version = at;
            }
        }
        let at = commit(
            pg,
            "INSERT INTO tick VALUES (1, -1) ON CONFLICT (id) DO UPDATE SET n = -1;",
        );
        let versions = versions_until(&st.rx, at).await;
        for shard in &mut shards {
            for v in &versions {
                shard.note(v);
            }
            reader.begin_snapshot().expect("snapshot");
            let before = shard.shared.len();
            shard.catch_up(&reader);
            let held = shard.held_keys();
            assert_eq!(
                shard.shared.len(),
                held.len(),
                "{}: the released queries were not dropped",
                shard.name
            );
            eprintln!(
                "{}: {before} shared queries before the last catch-up, {} after",
                shard.name,
                held.len()
            );
            reader.end_snapshot().expect("end snapshot");
        }
        st.stop().await;
        shards.into_iter().map(|s| (s.name, s.stats)).collect()
    })
}

#[test]
fn groups_sharing_queries_follow_the_replicated_stream() {
    let seed = env_or("SHARED_QUERIES_SEED", SEED_DEFAULT);
    let txns = env_or("SHARED_QUERIES_TXNS", TXNS_DEFAULT);
    eprintln!("SHARED_QUERIES_SEED={seed} SHARED_QUERIES_TXNS={txns}");
    let pg = cluster(&[]);
    let started = std::time::Instant::now();
    let stats = run_pipeline(&pg, seed, txns);
    eprintln!("ran in {:?}", started.elapsed());
    for (name, s) in &stats {
        eprintln!("{name}: {s:?}");
        // The run exercised what it claims to.
        assert!(s.checks > txns, "{name}: {s:?}");
        assert!(s.nonempty_checks > s.checks / 2, "{name}: {s:?}");
        assert!(s.diffs_applied > txns / 2, "{name}: {s:?}");
        assert!(s.joins_new > 0 && s.joins_held > 0, "{name}: {s:?}");
        assert!(
            s.leaves > 0 && s.leaves_asleep > 0 && s.rejoins > 0,
            "{name}: {s:?}"
        );
        assert!(s.max_lag > SHORT_LOG.0 * 2, "{name}: {s:?}");
        assert!(
            s.early > 0 && s.early_joins > 0,
            "{name}: no advance or join ahead of the announcements: {s:?}"
        );
        if txns > OVERFLOW_AT {
            assert!(s.unlisted_versions >= 3, "{name}: {s:?}");
        }
    }
    let (short, default) = (&stats[0].1, &stats[1].1);
    assert!(
        short.copies > 0,
        "the short log never made a group copy: {short:?}"
    );
    assert_eq!(
        default.copies, 0,
        "the default log is long enough: {default:?}"
    );
}
