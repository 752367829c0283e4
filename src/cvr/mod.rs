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
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;

mod persist;
pub mod store;
pub use persist::{row_digest, StoredRow};

/// A row's identity: table name and primary-key JSON object (`{"id":"i1"}`).
pub use crate::zql::RowKey;

/// The maps keyed by row keys: foldhash instead of SipHash, which was a tenth of a shard's
/// time with 10,000 groups (every group's rows are hashed at each copy and diff).
pub type FastMap<K, V> = crate::zql::eval::FastMap<K, V>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// A row's contents as views hold them: made once per row and state, and shared by every
/// query and client group that reaches it, with its digest and the JSON of its `put` made
/// once too (so a row sent to many groups is encoded once).
#[derive(Debug)]
pub struct RowData {
    pub spec: Rc<TableSpec>,
    pub row: Row,
    /// `row_digest(row)`.
    pub digest: u64,
    put: std::cell::OnceCell<String>,
}

impl RowData {
    pub fn new(spec: Rc<TableSpec>, row: Row) -> Rc<Self> {
        let digest = row_digest(&row);
        Rc::new(RowData {
            spec,
            row,
            digest,
            put: std::cell::OnceCell::new(),
        })
    }

    /// The rowsPatch `put` op of this row.
    pub fn put_json(&self) -> &str {
        self.put
            .get_or_init(|| crate::protocol::down::put_row_json(&self.spec, &self.row))
    }

    fn same_contents(a: &Rc<RowData>, b: &Rc<RowData>) -> bool {
        Rc::ptr_eq(a, b) || (a.digest == b.digest && a.row == b.row)
    }
}

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

/// TTL of a desired query whose `put` names none (zero-cache's DEFAULT_TTL_MS, 5 min).
pub const TTL_DEFAULT_MS: u64 = 5 * 60 * 1000;
/// Longest TTL kept (MAX_TTL_MS, 10 min); longer and "forever" (negative) TTLs become it.
pub const TTL_MAX_MS: u64 = 10 * 60 * 1000;

/// A TTL as the client sent it: `ttl` ms, absent = default, negative or infinite = forever
/// (zero-cache's parseTTL; NaN counts as 0). Forever is `None`.
pub fn parse_ttl(ttl: Option<f64>) -> Option<f64> {
    match ttl {
        None => Some(TTL_DEFAULT_MS as f64),
        Some(t) if t.is_nan() => Some(0.0),
        Some(t) if t < 0.0 || !t.is_finite() => None,
        Some(t) => Some(t),
    }
}

/// The TTL stored for a desire: [0, 10 min], forever = 10 min (clampTTL).
pub fn clamp_ttl(ttl: Option<f64>) -> u64 {
    match parse_ttl(ttl) {
        Some(t) if t <= TTL_MAX_MS as f64 => t as u64,
        _ => TTL_MAX_MS,
    }
}

/// Whether a repeated `put` raises the TTL: the *unclamped* incoming value against the stored
/// one, forever longest (compareTTL > 0). So a client that keeps asking for more than the
/// maximum bumps the version on every put, as zero-cache's clients see it.
pub fn ttl_raises(incoming: Option<f64>, stored_ms: u64) -> bool {
    match parse_ttl(incoming) {
        None => true,
        Some(t) => t > stored_ms as f64,
    }
}

/// The eviction timer's delay from the TTL clock to the next expiry: 50 ms of hysteresis so
/// queries expiring close together go in one poke, at least 50 ms, at most 10 min
/// (#scheduleExpireEviction).
pub fn eviction_delay_ms(next_expiry_ms: u64, ttl_clock_ms: u64) -> u64 {
    let delay = next_expiry_ms.saturating_sub(ttl_clock_ms) + EVICTION_HYSTERESIS_MS;
    delay.clamp(EVICTION_HYSTERESIS_MS, TTL_MAX_MS)
}

/// TTL_TIMER_HYSTERESIS.
pub const EVICTION_HYSTERESIS_MS: u64 = 50;

/// Version <-> cookie string, the form the CVR tables store (`patchVersion TEXT`).
mod version_cookie {
    use crate::protocol::cookie::Version;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Version, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.cookie())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let text = String::deserialize(d)?;
        Version::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not a CVR version: {text:?}")))
    }
}

fn ttl_default_ms() -> u64 {
    TTL_DEFAULT_MS
}

/// One client's desire for one query (zero-cache's `desires` row / query `clientState`).
/// Active: neither inactivated nor removed. Inactivated: dropped by a `del` or a client
/// deletion, kept alive by its TTL. Removed: cleared, or its query is gone; kept only as a
/// tombstone so a client catching up from an older cookie still gets the desired `del`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Desire {
    /// TTL clock (ms) at which the client stopped desiring the query.
    #[serde(default)]
    pub inactivated_at: Option<u64>,
    /// Clamped TTL, ms.
    #[serde(default = "ttl_default_ms")]
    pub ttl_ms: u64,
    /// No longer part of the query's client state.
    #[serde(default)]
    pub removed: bool,
    /// Version of the desire's last change.
    #[serde(with = "version_cookie")]
    pub patch: Version,
}

impl Desire {
    pub fn is_active(&self) -> bool {
        self.inactivated_at.is_none() && !self.removed
    }

    /// TTL clock value at which this inactivated desire stops keeping its query.
    fn expires_at(&self) -> Option<u64> {
        self.inactivated_at.map(|at| at.saturating_add(self.ttl_ms))
    }
}

/// A client of the group. Its desires live in `Cvr::desires`, which outlives the record:
/// a deleted client's inactivated desires keep their queries until the TTL runs out.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientRecord {}

/// How a query's client states stand: any active desire keeps it; otherwise it expires at
/// the latest `inactivatedAt + ttl` (now, when no client state is left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Desired,
    Inactive { expires_at: Option<u64> },
}

#[derive(Debug, Clone)]
pub struct QueryRecord {
    pub spec: QuerySpec,
    /// Version at which the query became got; None while only desired.
    pub got: Option<Version>,
    /// Rows this query's last evaluation reached.
    pub keys: FastSet<RowKey>,
}

#[derive(Debug, Clone)]
pub struct RowRecord {
    /// How many queries reach the row; 0 = tombstone.
    pub refs: u32,
    pub patch: Version,
    /// The contents last sent; None for a tombstone, and for a live row loaded from the
    /// store until its query is hydrated again.
    pub contents: Option<Rc<RowData>>,
    /// `row_digest` of those contents (what the store keeps instead of them).
    pub digest: u64,
}

/// The rows one evaluation of a query reached.
pub type QueryRows = FastMap<RowKey, Rc<RowData>>;

/// A row an incremental step touched, with what the query now reaches there (None: nothing).
pub type TouchedRow = (RowKey, Option<Rc<RowData>>);

#[derive(Debug, Clone)]
pub struct Cvr {
    pub id: String,
    pub version: Version,
    pub clients: BTreeMap<String, ClientRecord>,
    /// clientID -> queryID -> desire, including the desires of deleted clients.
    pub desires: BTreeMap<String, BTreeMap<String, Desire>>,
    /// Milliseconds of connected time (zero-cache's ttlClock): runs only while a client of
    /// the group is connected; inactivation times and expiries are on this clock.
    pub ttl_clock_ms: u64,
    pub queries: HashMap<String, QueryRecord>,
    /// Got-query tombstones: hash -> version at which it stopped being got.
    pub removed_queries: HashMap<String, Version>,
    pub rows: FastMap<RowKey, RowRecord>,
    /// `{app}_{shard}.clients` rows of this group: clientID -> (lastMutationID, patch).
    pub lmids: BTreeMap<String, (u64, Version)>,
    /// `{app}_{shard}.mutations` rows: (clientID, mutationID) -> (result JSON or tombstone, patch).
    pub mutation_results: BTreeMap<(String, u64), (Option<String>, Version)>,
    /// The client schema the group's first connection sent.
    pub client_schema: Option<serde_json::Value>,
    /// Row records whose queries changed (or that became tombstones) since the last
    /// `take_flush`: written at the next one.
    dirty_rows: FastSet<RowKey>,
    /// Live row records whose contents alone changed since they were last written: written
    /// by a `take_flush` with contents. Until then the stored digests are exact only up to
    /// `digests_stored_at`, which the store keeps with the version.
    dirty_contents: FastSet<RowKey>,
    /// The version up to which the stored row digests are those of the contents sent.
    digests_stored_at: Version,
    /// The version the store last got (None: never flushed, or a flush failed).
    flushed_version: Option<Version>,
    /// The fingerprint of the configuration the store last got (None: not known to be
    /// stored).
    flushed_config: Option<u64>,
    /// How many times the client schema was set: the configuration's fingerprint counts
    /// this instead of hashing the schema.
    client_schema_sets: u64,
    /// Rows patched lately, in patch order (a row may appear more than once), so that a
    /// poke from a recent cookie visits the rows patched since and not every row of the
    /// group. Trimmed after pokes to what connected clients still lack (`trim_recent`),
    /// and to RECENT_ROW_PATCHES_MAX.
    recent: VecDeque<(Version, RowKey)>,
    /// Every row patch after this version is in `recent`.
    recent_floor: Version,
}

/// Row patches `recent` keeps at most; a poke from before them scans every row.
pub const RECENT_ROW_PATCHES_MAX: usize = 1_024;
/// The capacity an emptied `recent` may keep; a larger one is given back.
const RECENT_ROW_PATCHES_KEPT_CAPACITY: usize = 8;

/// A row entry of a poke.
pub enum RowPatch<'a> {
    Put(&'a Rc<RowData>),
    Del(&'a RowKey),
}

impl Cvr {
    /// A new CVR is at version `00` (zero-cache's lexi 0).
    pub fn new(id: &str) -> Self {
        Cvr {
            id: id.to_string(),
            version: Version::default(),
            clients: BTreeMap::new(),
            desires: BTreeMap::new(),
            ttl_clock_ms: 0,
            queries: HashMap::new(),
            removed_queries: HashMap::new(),
            rows: FastMap::default(),
            lmids: BTreeMap::new(),
            mutation_results: BTreeMap::new(),
            client_schema: None,
            dirty_rows: FastSet::default(),
            dirty_contents: FastSet::default(),
            digests_stored_at: Version::default(),
            flushed_version: None,
            client_schema_sets: 0,
            recent: VecDeque::new(),
            recent_floor: Version::default(),
            flushed_config: None,
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

    /// Moves the TTL clock forward by `ms` of connected time.
    pub fn advance_ttl_clock(&mut self, ms: u64) {
        self.ttl_clock_ms = self.ttl_clock_ms.saturating_add(ms);
    }

    /// Records a desired-query put with the client's `ttl`. It matters (true: the version
    /// bumps and the desired `put` is echoed) when the query is new to the client, was
    /// inactivated or cleared (reactivation: no rehydration if it is still got), or when the
    /// put raises the TTL; a repeated put otherwise changes nothing.
    pub fn put_desired(
        &mut self,
        client_id: &str,
        hash: &str,
        spec: QuerySpec,
        ttl: Option<f64>,
        at: Version,
    ) -> bool {
        self.ensure_client(client_id);
        let known = self.queries.contains_key(hash);
        let current = self.desires.get(client_id).and_then(|d| d.get(hash));
        let matters = match current {
            Some(d) if known && d.is_active() => ttl_raises(ttl, d.ttl_ms),
            _ => true,
        };
        if !matters {
            return false;
        }
        self.desires
            .entry(client_id.to_string())
            .or_default()
            .insert(
                hash.to_string(),
                Desire {
                    inactivated_at: None,
                    ttl_ms: clamp_ttl(ttl),
                    removed: false,
                    patch: at,
                },
            );
        self.queries
            .entry(hash.to_string())
            .or_insert_with(|| QueryRecord {
                spec,
                got: None,
                keys: FastSet::default(),
            });
        true
    }

    /// A `del`: the client stops desiring the query at the current TTL clock; the query
    /// stays got, with its rows, until its TTL runs out. True if the client desired it.
    pub fn del_desired(&mut self, client_id: &str, hash: &str, at: Version) -> bool {
        let now = self.ttl_clock_ms;
        match self.active_desire_mut(client_id, hash) {
            Some(d) => {
                d.inactivated_at = Some(now);
                d.patch = at;
                true
            }
            None => false,
        }
    }

    /// A `clear`: every query the client desires loses its desire outright (no TTL).
    pub fn clear_desired(&mut self, client_id: &str, at: Version) -> bool {
        let mut changed = false;
        for d in self
            .desires
            .get_mut(client_id)
            .into_iter()
            .flat_map(|m| m.values_mut())
            .filter(|d| d.is_active())
        {
            d.removed = true;
            d.patch = at;
            changed = true;
        }
        changed
    }

    fn active_desire_mut(&mut self, client_id: &str, hash: &str) -> Option<&mut Desire> {
        if !self.queries.contains_key(hash) {
            return None;
        }
        self.desires
            .get_mut(client_id)
            .and_then(|m| m.get_mut(hash))
            .filter(|d| d.is_active())
    }

    /// Deletes a client of the group: its desired queries are inactivated with their TTLs
    /// (they expire later) and its record goes. A client unknown here is left alone.
    /// Returns whether any desire changed (the version must bump).
    pub fn delete_client(&mut self, client_id: &str, at: Version) -> bool {
        if self.clients.remove(client_id).is_none() {
            return false;
        }
        let hashes: Vec<String> = self
            .desires
            .get(client_id)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, d)| d.is_active())
            .map(|(h, _)| h.clone())
            .collect();
        hashes
            .iter()
            .fold(false, |acc, h| self.del_desired(client_id, h, at) | acc)
    }

    /// The clients one config update deletes, in zero-cache's order: those of this CVR not
    /// in `active_clients` (read before the update adds the sender, who always counts as
    /// active), then those in `deleted`, known here or not (an unknown one changes nothing
    /// but is still acknowledged).
    pub fn clients_to_delete(
        &self,
        sender: &str,
        active_clients: Option<&[String]>,
        deleted: &[String],
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Some(active) = active_clients {
            let active: HashSet<&str> = active.iter().map(String::as_str).collect();
            out.extend(
                self.clients
                    .keys()
                    .filter(|c| *c != sender && !active.contains(c.as_str()))
                    .cloned(),
            );
        }
        let mut seen: HashSet<String> = out.iter().cloned().collect();
        for c in deleted {
            if seen.insert(c.clone()) {
                out.push(c.clone());
            }
        }
        debug_assert!(!out.iter().any(|c| c == sender), "a client deleting itself");
        out
    }

    /// Every live query's standing across the client states that remain.
    fn liveness(&self) -> HashMap<&str, Liveness> {
        let mut out: HashMap<&str, Liveness> = self
            .queries
            .keys()
            .map(|h| (h.as_str(), Liveness::Inactive { expires_at: None }))
            .collect();
        for (hash, d) in self.desires.values().flat_map(|m| m.iter()) {
            if d.removed {
                continue;
            }
            let Some(entry) = out.get_mut(hash.as_str()) else {
                continue;
            };
            *entry = match (*entry, d.expires_at()) {
                (Liveness::Desired, _) | (_, None) => Liveness::Desired,
                (Liveness::Inactive { expires_at }, Some(e)) => Liveness::Inactive {
                    expires_at: Some(expires_at.map_or(e, |old| old.max(e))),
                },
            };
        }
        out
    }

    /// Queries whose TTL has run out: every remaining client state is inactivated and
    /// `inactivatedAt + ttl <= ttlClock` (no client state left: expired at once).
    pub fn expired_queries(&self) -> Vec<String> {
        let now = self.ttl_clock_ms;
        let mut out: Vec<String> = self
            .liveness()
            .into_iter()
            .filter(|(_, l)| matches!(l, Liveness::Inactive { expires_at } if expires_at.is_none_or(|e| e <= now)))
            .map(|(h, _)| h.to_string())
            .collect();
        out.sort();
        out
    }

    /// The TTL clock value at which the next inactive query expires (nextEvictionTime).
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.liveness()
            .into_values()
            .filter_map(|l| match l {
                Liveness::Inactive { expires_at } => expires_at,
                Liveness::Desired => None,
            })
            .min()
    }

    /// Stores a query's new result: marks it got, adjusts row ref-counts, and records puts
    /// for rows that are new to the group or whose contents changed, dels for rows no query
    /// reaches any more. Returns whether anything a client sees changed.
    pub fn set_query_rows(&mut self, hash: &str, rows: &QueryRows, at: Version) -> bool {
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
        for (key, data) in rows {
            let added = !old_keys.contains(key);
            changed |= self.ref_row(key.clone(), data.clone(), added, at);
        }
        changed
    }

    /// Updates a got query's rows from an incremental step: each touched key with the row
    /// the query now reaches (None: no longer reached). Untouched rows stay as they were.
    pub fn update_query_rows(&mut self, hash: &str, touched: &[TouchedRow], at: Version) -> bool {
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
            let had = query.keys.contains(key);
            match now {
                Some(data) => {
                    if !had {
                        query.keys.insert(key.clone());
                    }
                    added.push((key.clone(), data.clone(), !had));
                }
                None if had => {
                    query.keys.remove(key);
                    gone.push(key.clone());
                }
                None => {}
            }
        }
        for key in gone {
            changed |= self.unref_row(&key, at);
        }
        for (key, data, new_ref) in added {
            changed |= self.ref_row(key, data, new_ref, at);
        }
        changed
    }

    fn ref_row(&mut self, key: RowKey, data: Rc<RowData>, added: bool, at: Version) -> bool {
        let rec = self.rows.entry(key.clone()).or_insert(RowRecord {
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
        let same = match &rec.contents {
            Some(old) => RowData::same_contents(old, &data),
            // Loaded from the store: only the digest of what the client has is known.
            None => was_live && rec.digest == data.digest,
        };
        if !same {
            rec.patch = at;
            Self::note_patch(&mut self.recent, &mut self.recent_floor, &key, at);
        }
        rec.digest = data.digest;
        rec.contents = Some(data);
        if added || !was_live {
            self.dirty_rows.insert(key);
        } else if !same {
            // Only its contents changed: written with the next round of contents
            // (`take_flush`), most pokes being nothing else.
            self.dirty_contents.insert(key);
        }
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
        Self::note_patch(&mut self.recent, &mut self.recent_floor, key, at);
        true
    }

    fn note_patch(
        recent: &mut VecDeque<(Version, RowKey)>,
        floor: &mut Version,
        key: &RowKey,
        at: Version,
    ) {
        debug_assert!(
            recent.back().is_none_or(|(v, _)| *v <= at),
            "patch versions only grow"
        );
        recent.push_back((at, key.clone()));
        if recent.len() > RECENT_ROW_PATCHES_MAX {
            if let Some((v, _)) = recent.pop_front() {
                *floor = (*floor).max(v);
            }
        }
    }

    /// Forgets the recent patches every connected client has (they are at `oldest` or
    /// later): a poke from an older cookie scans every row instead.
    pub fn trim_recent(&mut self, oldest: Version) {
        while self.recent.front().is_some_and(|(v, _)| *v <= oldest) {
            self.recent.pop_front();
        }
        self.recent_floor = self.recent_floor.max(oldest);
        // A hydration's patches (every row) grew it; most pokes need a few entries.
        if self.recent.is_empty() && self.recent.capacity() > RECENT_ROW_PATCHES_KEPT_CAPACITY {
            self.recent = VecDeque::new();
        }
    }

    /// The row records patched after `base` (None: every record).
    fn patched_rows(&self, base: Option<Version>) -> Vec<(&RowKey, &RowRecord)> {
        let Some(base) = base.filter(|b| *b >= self.recent_floor) else {
            return self
                .rows
                .iter()
                .filter(|(_, rec)| base.is_none_or(|b| rec.patch > b))
                .collect();
        };
        let first = self.recent.partition_point(|(v, _)| *v <= base);
        let mut seen: FastSet<&RowKey> = FastSet::default();
        let mut out = Vec::with_capacity(self.recent.len() - first);
        for (v, key) in self.recent.range(first..) {
            // Only the entry of the row's last patch counts.
            let Some((key, rec)) = self.rows.get_key_value(key) else {
                continue;
            };
            if rec.patch == *v && seen.insert(key) {
                out.push((key, rec));
            }
        }
        out
    }

    /// The poke from `base` when it is rows only (no query, client, lmid or mutation
    /// entries): its row entries, which any group with the same entries shares.
    pub fn rows_only_patch(&self, base: Version) -> Option<Vec<RowPatch<'_>>> {
        let newer = |v: Version| v > base;
        let configured = self
            .desires
            .values()
            .flat_map(|d| d.values())
            .any(|d| newer(d.patch))
            || self.queries.values().any(|q| q.got.is_some_and(newer))
            || self.removed_queries.values().any(|v| newer(*v))
            || self.lmids.values().any(|(_, v)| newer(*v))
            || self.mutation_results.values().any(|(_, v)| newer(*v));
        if configured {
            return None;
        }
        Some(self.row_patches(Some(base)))
    }

    /// The row entries of a poke from `base` (None: a client with nothing, which gets no
    /// dels).
    fn row_patches(&self, base: Option<Version>) -> Vec<RowPatch<'_>> {
        self.patched_rows(base)
            .into_iter()
            .filter_map(|(key, rec)| match &rec.contents {
                Some(data) => Some(RowPatch::Put(data)),
                // A live row loaded from the store whose query has not been hydrated again:
                // nothing to send until it is.
                None if rec.refs > 0 => None,
                None => base.is_some().then_some(RowPatch::Del(key)),
            })
            .collect()
    }

    /// Drops a query: its rows lose a reference, and it is no longer got.
    pub fn remove_query(&mut self, hash: &str, at: Version) -> bool {
        let Some(query) = self.queries.remove(hash) else {
            return false;
        };
        // The client states go with the query; the desires stay as tombstones.
        for d in self.desires.values_mut().filter_map(|m| m.get_mut(hash)) {
            d.removed = true;
        }
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
        for (client_id, desires) in &self.desires {
            for (hash, d) in desires.iter().filter(|(_, d)| newer(d.patch)) {
                match (d.is_active(), base) {
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
        for patch in self.row_patches(base) {
            match patch {
                RowPatch::Put(data) => poke.put_row_json(data.put_json()),
                RowPatch::Del(key) => poke.del_row(key.table(), key.key()),
            }
        }
    }
}

/// The `issue(id, title)` table the unit tests' rows are of.
#[cfg(test)]
pub(crate) fn issue_spec() -> Rc<TableSpec> {
    let col = |name: &str| crate::zql::schema::ColumnSpec {
        name: name.into(),
        kind: crate::zql::schema::ColumnKind::String,
        pg_type_oid: 25,
    };
    Rc::new(TableSpec {
        name: "issue".into(),
        columns: vec![col("id"), col("title")],
        primary_key: vec![0],
    })
}

#[cfg(test)]
mod tests;
