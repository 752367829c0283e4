//! One maintained query per shard and AST, shared by every client group holding it
//! (issue 13). A version's changes are pushed into each query it concerns once, by the first
//! group to advance past it; the resulting row diff (rows whose presence or contents changed,
//! with their contents as shared `RowData`) is kept in a short log, and every group applies
//! the diffs of its queries to its own CVR (ref-counts, patch versions) without running the
//! query again. A group whose state is older than the log (it had no socket, or fell far
//! behind) and a group asking for a query anew take a copy of the current result.
//!
//! All shared queries are at one replica state, `state`: the snapshot of the last catch-up.
//! Catch-ups are numbered (`seq`): a version announced after a snapshot that already held it
//! is pushed by a later catch-up at the same state, so the state alone does not tell them
//! apart. A group's queries are at the catch-up its CVR last took (`Group::shared_seq`),
//! always one of the log's step boundaries, so the steps after it are exactly what it lacks.

use super::pending::Pending;
use super::VersionReady;
use crate::cvr::{FastMap, QueryRows, RowData, TouchedRow};
use crate::sqlite::{IndexRequests, ReplicaReader};
use crate::zql::ast::Ast;
use crate::zql::ivm::{LiveQuery, RowKey};
use crate::zql::schema::TableSpec;
use crate::zql::value::Row;
use crate::zql::ZqlError;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;
use std::rc::Rc;

/// Steps the log keeps. A group further behind takes copies of its changed queries.
pub const SHARED_LOG_STEPS_MAX: usize = 4_096;
/// Touched rows the log keeps over all its steps (each a key and a shared row).
pub const SHARED_LOG_ROWS_MAX: usize = 500_000;

/// A shared query's identity: its AST's canonical JSON, with its hash made once (every
/// group's catch-up looks its query up, and hashing the JSON each time was a thirtieth of
/// a shard's time). Clones share it; equal keys are usually the same pointer.
#[derive(Clone)]
pub struct QueryKey(Rc<(u64, Box<str>)>);

impl QueryKey {
    fn new(json: String) -> Self {
        // A fixed seed: the hash feeds in-process maps only.
        let hash = foldhash::fast::FixedState::with_seed(0x5a_63_71_6b).hash_one(&json);
        QueryKey(Rc::new((hash, json.into_boxed_str())))
    }

    pub fn as_str(&self) -> &str {
        &self.0 .1
    }
}

impl std::hash::Hash for QueryKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 .0);
    }
}

impl PartialEq for QueryKey {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for QueryKey {}

impl Ord for QueryKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for QueryKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for QueryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A group's hold on a shared query; the query is dropped once nobody holds it.
#[derive(Clone)]
pub struct SharedHandle {
    pub key: QueryKey,
    /// Counted by `Rc::strong_count`: the entry keeps one.
    _hold: Rc<()>,
}

struct Entry {
    ast: Rc<Ast>,
    /// None after a push failed: its state is not to be trusted; holders get `failed`.
    live: Option<LiveQuery>,
    failed: Option<String>,
    hold: Rc<()>,
    /// The catch-up at which its result last changed.
    changed_at: u64,
    /// The current result as shared rows, made at the first copy after a change.
    rows: Option<Rc<QueryRows>>,
    /// The replica watermark of the snapshot it was hydrated in. A snapshot may hold
    /// versions not yet announced: their changes are in this result already, and pushing
    /// them when they are announced would apply them twice.
    hydrated_at: u64,
}

/// One catch-up (or a run of them that changed nothing): from one `seq` to the next, the
/// diff of every query it changed.
struct Step {
    from: u64,
    to: u64,
    diffs: FastMap<QueryKey, Rc<Vec<TouchedRow>>>,
    rows: usize,
}

/// What a group must do to bring one of its queries from its state to the shared one.
pub enum Catchup {
    /// Apply these diffs in order (none: nothing changed).
    Steps(Vec<Rc<Vec<TouchedRow>>>),
    /// The log does not reach back: replace the query's rows with the current result.
    Copy(Rc<QueryRows>),
}

pub struct SharedQueries {
    entries: FastMap<QueryKey, Entry>,
    state: u64,
    /// The number of the last catch-up.
    seq: u64,
    /// What changed since `state`.
    pending: Pending,
    /// The oldest version in `pending` (None: nothing pending).
    pending_from: Option<u64>,
    log: VecDeque<Step>,
    log_rows: usize,
    log_steps_max: usize,
    log_rows_max: usize,
}

impl Default for SharedQueries {
    fn default() -> Self {
        Self::with_log_limits(SHARED_LOG_STEPS_MAX, SHARED_LOG_ROWS_MAX)
    }
}

/// The key of `ast`: its JSON, which is canonical (serde writes fields in declaration order).
pub fn query_key(ast: &Ast) -> QueryKey {
    QueryKey::new(serde_json::to_string(ast).unwrap_or_else(|e| format!("unserializable AST: {e}")))
}

impl SharedQueries {
    /// With a log of other bounds (tests make it short to reach the copy path).
    pub fn with_log_limits(log_steps_max: usize, log_rows_max: usize) -> Self {
        assert!(log_steps_max > 0, "the log keeps at least the last step");
        SharedQueries {
            entries: FastMap::default(),
            state: 0,
            seq: 0,
            pending: Pending::default(),
            pending_from: None,
            log: VecDeque::new(),
            log_rows: 0,
            log_steps_max,
            log_rows_max,
        }
    }

    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether announced changes wait for a catch-up.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A version announced to the shard: its changes wait for the next catch-up.
    pub fn note(&mut self, v: &VersionReady) {
        self.pending.note(v);
        let from = self
            .pending_from
            .map_or(v.watermark, |f| f.min(v.watermark));
        self.pending_from = Some(from);
    }

    pub fn live(&self, key: &QueryKey) -> Option<&LiveQuery> {
        self.entries.get(key).and_then(|e| e.live.as_ref())
    }

    /// Brings every shared query to the state of `reader`'s open snapshot: pushes what
    /// changed since into each query it concerns, once, and logs the diffs.
    pub fn catch_up(&mut self, reader: &ReplicaReader) -> Result<(), ZqlError> {
        let to = reader.snapshot_watermark();
        // A version announced late (its changes are in a snapshot already caught up to) is
        // pushed at the same state, in a catch-up of its own.
        if to < self.state || (to == self.state && self.pending.is_empty()) {
            return Ok(());
        }
        let seq = self.seq + 1;
        self.sweep();
        let pending = std::mem::take(&mut self.pending);
        let pending_from = self.pending_from.take();
        let changes = if pending.is_empty() {
            Some(Vec::new())
        } else {
            pending.changes(reader)?
        };
        let mut diffs = FastMap::default();
        let mut rows = 0;
        for (key, entry) in self.entries.iter_mut() {
            let Some(live) = entry.live.as_mut() else {
                continue;
            };
            if !pending.tables.iter().any(|t| live.reads(t)) {
                continue;
            }
            // Hydrated in a snapshot that held some of the pending versions: their changes
            // are in it already, and the others cannot be told apart (they are one net set).
            let has_some = pending_from.is_some_and(|from| entry.hydrated_at >= from);
            let diff = match &changes {
                Some(changes) if !has_some => push(live, changes, reader),
                _ => rehydrate(live, &entry.ast, reader),
            };
            match diff {
                Ok(diff) if diff.is_empty() => {}
                Ok(diff) => {
                    rows += diff.len();
                    entry.changed_at = seq;
                    entry.rows = None;
                    diffs.insert(key.clone(), Rc::new(diff));
                }
                Err(e) => {
                    tracing::warn!(query = %key, error = %e, "shared query failed");
                    entry.live = None;
                    entry.failed = Some(e.to_string());
                    entry.changed_at = seq;
                    entry.rows = None;
                }
            }
        }
        self.log_step(Step {
            from: self.seq,
            to: seq,
            diffs,
            rows,
        });
        self.seq = seq;
        self.state = to;
        Ok(())
    }

    fn log_step(&mut self, step: Step) {
        debug_assert!(
            self.log.back().is_none_or(|last| last.to <= step.from),
            "steps are logged in order (`since` searches them)"
        );
        match self.log.back_mut() {
            // Steps that changed nothing merge, so quiet versions cost no log space.
            Some(last)
                if last.diffs.is_empty() && step.diffs.is_empty() && last.to == step.from =>
            {
                last.to = step.to;
            }
            _ => {
                self.log_rows += step.rows;
                self.log.push_back(step);
            }
        }
        while self.log.len() > self.log_steps_max || self.log_rows > self.log_rows_max {
            let Some(old) = self.log.pop_front() else {
                break;
            };
            self.log_rows -= old.rows;
        }
        debug_assert!(self.log_rows <= self.log_rows_max || self.log.is_empty());
    }

    /// Drops the queries nobody holds any more.
    fn sweep(&mut self) {
        self.entries.retain(|_, e| Rc::strong_count(&e.hold) > 1);
    }

    /// A hold on the query of `ast` at the current state, hydrating it in `reader`'s open
    /// snapshot if no group holds it yet. That snapshot is the one caught up to, or one
    /// ahead of the versions announced (a hydration does not wait for them): the query's
    /// next catch-up then hydrates it again instead of pushing changes it already has.
    pub fn acquire(
        &mut self,
        ast: &Rc<Ast>,
        reader: &ReplicaReader,
        indexes: &IndexRequests,
    ) -> Result<SharedHandle, ZqlError> {
        let key = query_key(ast);
        if let Some(e) = self.entries.get(&key) {
            if e.live.is_some() {
                return Ok(SharedHandle {
                    key,
                    _hold: e.hold.clone(),
                });
            }
        }
        let started = std::time::Instant::now();
        let live = LiveQuery::hydrate(ast, reader)?;
        request_missing_indexes(reader, &live, indexes);
        crate::metrics::observe_since(crate::metrics::Timing::Hydration, started);
        tracing::debug!(
            target: "zcache::hydration",
            "hydrated {} rows of {} in {} us",
            live.rows().len(),
            ast.table,
            started.elapsed().as_micros()
        );
        let hold = self
            .entries
            .get(&key)
            .map(|e| e.hold.clone())
            .unwrap_or_default();
        self.entries.insert(
            key.clone(),
            Entry {
                ast: ast.clone(),
                live: Some(live),
                failed: None,
                hold: hold.clone(),
                changed_at: self.seq,
                rows: None,
                hydrated_at: reader.snapshot_watermark(),
            },
        );
        Ok(SharedHandle { key, _hold: hold })
    }

    /// The query's current result, as shared rows.
    pub fn rows(
        &mut self,
        key: &QueryKey,
        reader: &ReplicaReader,
    ) -> Result<Rc<QueryRows>, ZqlError> {
        let entry = self
            .entries
            .get_mut(key)
            .ok_or_else(|| ZqlError::Source(format!("shared query {key} is gone")))?;
        if let Some(rows) = &entry.rows {
            return Ok(rows.clone());
        }
        let live = entry.live.as_ref().ok_or_else(|| {
            ZqlError::Source(
                entry
                    .failed
                    .clone()
                    .unwrap_or_else(|| "query failed".into()),
            )
        })?;
        let mut rows: QueryRows =
            QueryRows::with_capacity_and_hasher(live.rows().len(), Default::default());
        for (key, (row, _count)) in live.rows() {
            rows.insert(key.clone(), row_data(reader, key.table(), row)?);
        }
        let rows = Rc::new(rows);
        entry.rows = Some(rows.clone());
        Ok(rows)
    }

    /// What a group at catch-up `from` must apply to `key`'s rows to be at `seq`. Without a
    /// reader (no snapshot open), None when that takes reading the replica (a copy not made
    /// yet).
    pub fn since(
        &mut self,
        key: &QueryKey,
        from: u64,
        reader: Option<&ReplicaReader>,
    ) -> Result<Option<Catchup>, ZqlError> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| ZqlError::Source(format!("shared query {key} is gone")))?;
        if let Some(e) = &entry.failed {
            return Err(ZqlError::Source(e.clone()));
        }
        if entry.changed_at <= from {
            return Ok(Some(Catchup::Steps(Vec::new())));
        }
        if self.log.front().is_none_or(|s| s.from > from) {
            if let Some(rows) = &entry.rows {
                return Ok(Some(Catchup::Copy(rows.clone())));
            }
            return match reader {
                Some(reader) => self.rows(key, reader).map(|r| Some(Catchup::Copy(r))),
                None => Ok(None),
            };
        }
        // The steps are in order: only those after `from` are looked at (every group's
        // catch-up scanning the whole log was a sixth of a shard's time).
        let first = self.log.partition_point(|s| s.to <= from);
        Ok(Some(Catchup::Steps(
            self.log
                .range(first..)
                .filter_map(|s| s.diffs.get(key).cloned())
                .collect(),
        )))
    }
}

/// The diff of one incremental step: each touched key with what the query now reaches.
fn push(
    live: &mut LiveQuery,
    changes: &[crate::zql::ivm::RowChange],
    reader: &ReplicaReader,
) -> Result<Vec<TouchedRow>, ZqlError> {
    let touched = live.push(changes, reader)?;
    touched_rows(live, touched, reader)
}

/// The diff of a hydration anew (the changes were not known): every key whose presence or
/// contents differ.
fn rehydrate(
    live: &mut LiveQuery,
    ast: &Ast,
    reader: &ReplicaReader,
) -> Result<Vec<TouchedRow>, ZqlError> {
    let fresh = LiveQuery::hydrate(ast, reader)?;
    let old = std::mem::replace(live, fresh);
    let mut touched: HashSet<RowKey> = HashSet::new();
    for (key, (row, _)) in old.rows() {
        match live.rows().get(key) {
            Some((now, _)) if now == row => {}
            _ => {
                touched.insert(key.clone());
            }
        }
    }
    for key in live.rows().keys() {
        if !old.rows().contains_key(key) {
            touched.insert(key.clone());
        }
    }
    touched_rows(live, touched, reader)
}

fn touched_rows(
    live: &LiveQuery,
    touched: HashSet<RowKey>,
    reader: &ReplicaReader,
) -> Result<Vec<TouchedRow>, ZqlError> {
    let mut out = Vec::with_capacity(touched.len());
    for key in touched {
        let now = match live.rows().get(&key) {
            Some((row, _)) => Some(row_data(reader, key.table(), row)?),
            None => None,
        };
        out.push((key, now));
    }
    Ok(out)
}

/// A row as views share it, after checking it holds nothing a JavaScript client would get
/// wrong (integers beyond 2^53).
fn row_data(reader: &ReplicaReader, table: &str, row: &Row) -> Result<Rc<RowData>, ZqlError> {
    let spec: Rc<TableSpec> = reader
        .table_spec(table)
        .ok_or_else(|| ZqlError::UnknownTable(table.to_string()))?;
    if let Some((column, value)) = crate::protocol::down::unsafe_integer_column(&spec, row) {
        return Err(ZqlError::Source(format!(
            "{table}.{column} = {value} is beyond 2^53: a JavaScript client cannot hold it exactly"
        )));
    }
    Ok(RowData::new(spec, row.clone()))
}

/// Asks the replicator for the indexes the query's lookups lack.
fn request_missing_indexes(reader: &ReplicaReader, live: &LiveQuery, wanted: &IndexRequests) {
    for (table, columns) in live.lookups() {
        if columns.is_empty() || reader.has_index_on(&table, &columns).unwrap_or(true) {
            continue;
        }
        if wanted.request(&table, &columns) {
            tracing::debug!(%table, ?columns, "asking for an index the query's lookups need");
        }
    }
}
