//! Client view records: per client group, which queries each client desires, which are got,
//! which rows the group has (ref-counted across queries), and the version at which each of
//! those last changed. Every entry keeps its patch version, and removed entries stay as
//! tombstones, so a poke from any cookie the group handed out is a scan for entries newer
//! than that cookie (cvr-and-view-syncer.md §3.4): the same code serves the live pokes, a
//! reconnect, and a second client joining the group.
//!
//! Pure data: no I/O. Kept in memory on the owning shard; `persist` turns it into the batches
//! `store` writes to Postgres, and back.

use crate::protocol::cookie::Version;
use crate::protocol::down::{PokeBuilder, QueryOp};
use crate::zql::schema::TableSpec;
use crate::zql::value::Row;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;

mod persist;
pub mod store;
pub use persist::{row_digest, StoredRow};

/// A row's identity: table name and primary-key JSON object (`{"id":"i1"}`).
pub type RowKey = (String, String);

/// What a query is, as the client asked for it.
#[derive(Debug, Clone, PartialEq)]
pub enum QuerySpec {
    /// A named (synced) query: the app server turns it into an AST.
    Named {
        name: String,
        args: Vec<serde_json::Value>,
    },
    /// A legacy ad-hoc query carrying its AST.
    Ast(serde_json::Value),
}

#[derive(Debug, Clone)]
pub struct Desire {
    pub active: bool,
    pub patch: Version,
}

#[derive(Debug, Clone, Default)]
pub struct ClientRecord {
    pub desired: BTreeMap<String, Desire>,
}

#[derive(Debug, Clone)]
pub struct QueryRecord {
    pub spec: QuerySpec,
    /// Version at which the query became got; None while only desired.
    pub got: Option<Version>,
    /// Rows this query's last evaluation reached.
    pub keys: HashSet<RowKey>,
}

#[derive(Debug, Clone)]
pub struct RowRecord {
    /// How many queries reach the row; 0 = tombstone.
    pub refs: u32,
    pub patch: Version,
    /// The contents last sent; None for a tombstone, and for a live row loaded from the
    /// store until its query is hydrated again.
    pub contents: Option<(Rc<TableSpec>, Row)>,
    /// `row_digest` of those contents (what the store keeps instead of them).
    pub digest: u64,
}

/// The rows one evaluation of a query reached.
pub type QueryRows = HashMap<RowKey, (Rc<TableSpec>, Row)>;

/// A row an incremental step touched, with what the query now reaches there (None: nothing).
pub type TouchedRow = (RowKey, Option<(Rc<TableSpec>, Row)>);

#[derive(Debug, Clone)]
pub struct Cvr {
    pub id: String,
    pub version: Version,
    pub clients: BTreeMap<String, ClientRecord>,
    pub queries: HashMap<String, QueryRecord>,
    /// Got-query tombstones: hash -> version at which it stopped being got.
    pub removed_queries: HashMap<String, Version>,
    pub rows: HashMap<RowKey, RowRecord>,
    /// `{app}_{shard}.clients` rows of this group: clientID -> (lastMutationID, patch).
    pub lmids: BTreeMap<String, (u64, Version)>,
    /// `{app}_{shard}.mutations` rows: (clientID, mutationID) -> (result JSON or tombstone, patch).
    pub mutation_results: BTreeMap<(String, u64), (Option<String>, Version)>,
    /// Row records changed since the last `take_flush`.
    dirty_rows: HashSet<RowKey>,
    /// The version the store last got (None: never flushed, or a flush failed).
    flushed_version: Option<Version>,
}

impl Cvr {
    /// A new CVR is at version `00` (zero-cache's lexi 0).
    pub fn new(id: &str) -> Self {
        Cvr {
            id: id.to_string(),
            version: Version::default(),
            clients: BTreeMap::new(),
            queries: HashMap::new(),
            removed_queries: HashMap::new(),
            rows: HashMap::new(),
            lmids: BTreeMap::new(),
            mutation_results: BTreeMap::new(),
            dirty_rows: HashSet::new(),
            flushed_version: None,
        }
    }

    /// The version a configuration change (clients, desired queries) moves to.
    pub fn next_config_version(&self) -> Version {
        Version {
            state: self.version.state,
            config: self.version.config + 1,
        }
    }

    /// The version a data change read at replica state `state` moves to.
    pub fn next_data_version(&self, state: u64) -> Version {
        if state > self.version.state {
            Version { state, config: 0 }
        } else {
            self.next_config_version()
        }
    }

    pub fn ensure_client(&mut self, client_id: &str) -> bool {
        if self.clients.contains_key(client_id) {
            return false;
        }
        self.clients
            .insert(client_id.to_string(), ClientRecord::default());
        true
    }

    /// Records a desired-query put; true if anything changed.
    pub fn put_desired(
        &mut self,
        client_id: &str,
        hash: &str,
        spec: QuerySpec,
        at: Version,
    ) -> bool {
        let client = self.clients.entry(client_id.to_string()).or_default();
        let changed = !matches!(client.desired.get(hash), Some(d) if d.active);
        if changed {
            client.desired.insert(
                hash.to_string(),
                Desire {
                    active: true,
                    patch: at,
                },
            );
        }
        self.queries
            .entry(hash.to_string())
            .or_insert_with(|| QueryRecord {
                spec,
                got: None,
                keys: HashSet::new(),
            });
        changed
    }

    pub fn del_desired(&mut self, client_id: &str, hash: &str, at: Version) -> bool {
        match self
            .clients
            .get_mut(client_id)
            .and_then(|c| c.desired.get_mut(hash))
        {
            Some(d) if d.active => {
                *d = Desire {
                    active: false,
                    patch: at,
                };
                true
            }
            _ => false,
        }
    }

    pub fn clear_desired(&mut self, client_id: &str, at: Version) -> bool {
        let hashes: Vec<String> = match self.clients.get(client_id) {
            Some(c) => c
                .desired
                .iter()
                .filter(|(_, d)| d.active)
                .map(|(h, _)| h.clone())
                .collect(),
            None => return false,
        };
        hashes
            .iter()
            .fold(false, |acc, h| self.del_desired(client_id, h, at) | acc)
    }

    /// Queries no client desires any more.
    pub fn undesired_queries(&self) -> Vec<String> {
        let desired: HashSet<&String> = self
            .clients
            .values()
            .flat_map(|c| c.desired.iter().filter(|(_, d)| d.active).map(|(h, _)| h))
            .collect();
        self.queries
            .keys()
            .filter(|h| !desired.contains(h))
            .cloned()
            .collect()
    }

    /// Stores a query's new result: marks it got, adjusts row ref-counts, and records puts
    /// for rows that are new to the group or whose contents changed, dels for rows no query
    /// reaches any more. Returns whether anything a client sees changed.
    pub fn set_query_rows(&mut self, hash: &str, rows: QueryRows, at: Version) -> bool {
        let Some(query) = self.queries.get_mut(hash) else {
            return false;
        };
        let mut changed = false;
        if query.got.is_none() {
            query.got = Some(at);
            self.removed_queries.remove(hash);
            changed = true;
        }
        let old_keys = std::mem::take(&mut query.keys);
        query.keys = rows.keys().cloned().collect();
        for key in old_keys.iter().filter(|k| !rows.contains_key(*k)) {
            changed |= self.unref_row(key, at);
        }
        for (key, (spec, row)) in rows {
            let added = !old_keys.contains(&key);
            changed |= self.ref_row(key, spec, row, added, at);
        }
        changed
    }

    /// Updates a got query's rows from an incremental step: each touched key with the row
    /// the query now reaches (None: no longer reached). Untouched rows stay as they were.
    pub fn update_query_rows(&mut self, hash: &str, touched: Vec<TouchedRow>, at: Version) -> bool {
        let Some(query) = self.queries.get_mut(hash) else {
            return false;
        };
        debug_assert!(
            query.got.is_some(),
            "an incremental step of a query never hydrated"
        );
        let mut changed = false;
        let mut added = Vec::new();
        let mut gone = Vec::new();
        for (key, now) in touched {
            let had = query.keys.contains(&key);
            match now {
                Some((spec, row)) => {
                    if !had {
                        query.keys.insert(key.clone());
                    }
                    added.push((key, spec, row, !had));
                }
                None if had => {
                    query.keys.remove(&key);
                    gone.push(key);
                }
                None => {}
            }
        }
        for key in gone {
            changed |= self.unref_row(&key, at);
        }
        for (key, spec, row, new_ref) in added {
            changed |= self.ref_row(key, spec, row, new_ref, at);
        }
        changed
    }

    fn ref_row(
        &mut self,
        key: RowKey,
        spec: Rc<TableSpec>,
        row: Row,
        added: bool,
        at: Version,
    ) -> bool {
        self.dirty_rows.insert(key.clone());
        let rec = self.rows.entry(key).or_insert(RowRecord {
            refs: 0,
            patch: at,
            contents: None,
            digest: 0,
        });
        let was_live = rec.refs > 0;
        if added {
            rec.refs += 1;
        }
        debug_assert!(rec.refs > 0, "a row a query reaches is referenced");
        let digest = row_digest(&row);
        let same = match &rec.contents {
            Some((_, old)) => *old == row,
            // Loaded from the store: only the digest of what the client has is known.
            None => was_live && rec.digest == digest,
        };
        if !same {
            rec.patch = at;
        }
        rec.contents = Some((spec, row));
        rec.digest = digest;
        !same
    }

    fn unref_row(&mut self, key: &RowKey, at: Version) -> bool {
        let Some(rec) = self.rows.get_mut(key) else {
            return false;
        };
        debug_assert!(rec.refs > 0);
        self.dirty_rows.insert(key.clone());
        rec.refs = rec.refs.saturating_sub(1);
        if rec.refs > 0 {
            return false;
        }
        rec.contents = None;
        rec.patch = at;
        true
    }

    /// Drops a query: its rows lose a reference, and it is no longer got.
    pub fn remove_query(&mut self, hash: &str, at: Version) -> bool {
        let Some(query) = self.queries.remove(hash) else {
            return false;
        };
        let mut changed = false;
        for key in &query.keys {
            changed |= self.unref_row(key, at);
        }
        if query.got.is_some() {
            self.removed_queries.insert(hash.to_string(), at);
            changed = true;
        }
        changed
    }

    /// Replaces the group's lastMutationIDs (rows of `{app}_{shard}.clients`).
    pub fn set_lmids(&mut self, lmids: BTreeMap<String, u64>, at: Version) -> bool {
        let mut changed = false;
        for (client, lmid) in lmids {
            match self.lmids.get(&client) {
                Some((old, _)) if *old == lmid => {}
                _ => {
                    self.lmids.insert(client, (lmid, at));
                    changed = true;
                }
            }
        }
        changed
    }

    /// Replaces the group's mutation results (rows of `{app}_{shard}.mutations`).
    pub fn set_mutation_results(
        &mut self,
        results: BTreeMap<(String, u64), String>,
        at: Version,
    ) -> bool {
        let mut changed = false;
        for (key, entry) in self.mutation_results.iter_mut() {
            if entry.0.is_some() && !results.contains_key(key) {
                *entry = (None, at);
                changed = true;
            }
        }
        for (key, result) in results {
            if !matches!(self.mutation_results.get(&key), Some((Some(old), _)) if *old == result) {
                self.mutation_results.insert(key, (Some(result), at));
                changed = true;
            }
        }
        changed
    }

    /// Writes into `poke` everything that changed after `base` (everything live when
    /// `base` is None): desired and got queries, lmids, mutation results and rows.
    pub fn write_patches(&self, base: Option<Version>, poke: &mut PokeBuilder) {
        let newer = |v: Version| base.is_none_or(|b| v > b);
        for (client_id, client) in &self.clients {
            for (hash, d) in client.desired.iter().filter(|(_, d)| newer(d.patch)) {
                match (d.active, base) {
                    (true, _) => poke.desired_query(client_id, QueryOp::Put, hash),
                    (false, Some(_)) => poke.desired_query(client_id, QueryOp::Del, hash),
                    (false, None) => {}
                }
            }
        }
        let mut got: BTreeSet<&String> = BTreeSet::new();
        for (hash, q) in &self.queries {
            if q.got.is_some_and(newer) {
                got.insert(hash);
            }
        }
        for hash in got {
            poke.got_query(QueryOp::Put, hash);
        }
        if base.is_some() {
            for (hash, v) in &self.removed_queries {
                if newer(*v) {
                    poke.got_query(QueryOp::Del, hash);
                }
            }
        }
        for (client_id, (lmid, v)) in &self.lmids {
            if newer(*v) {
                poke.last_mutation_id(client_id, *lmid);
            }
        }
        for ((client_id, id), (result, v)) in &self.mutation_results {
            match (result, newer(*v)) {
                (Some(r), true) => poke.put_mutation_result(client_id, *id, r),
                (None, true) if base.is_some() => poke.del_mutation_result(client_id, *id),
                _ => {}
            }
        }
        for ((table, key), rec) in &self.rows {
            if !newer(rec.patch) {
                continue;
            }
            match &rec.contents {
                Some((spec, row)) => poke.put_row(spec, row),
                // A live row loaded from the store whose query has not been hydrated again:
                // nothing to send until it is.
                None if rec.refs > 0 => {}
                None if base.is_some() => poke.del_row(table, key),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
