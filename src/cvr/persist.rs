//! The CVR's stored form: what `store` writes and reads, and the conversions from and to the
//! in-memory `Cvr`. The stored structs mirror the in-memory ones on purpose, so the database
//! format changes only when these do.

use super::store::{FlushBatch, Loaded};
use super::{ClientRecord, Cvr, Desire, QueryRecord, QuerySpec, RowKey, RowRecord};
use crate::protocol::cookie::Version;
use crate::zql::value::Row;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One row record as stored: the queries reaching it (empty: a tombstone) and the digest of
/// the contents last sent (None: a tombstone).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub table: String,
    pub key: String,
    pub patch: String,
    pub queries: Vec<String>,
    pub digest: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct StoredConfig {
    clients: Vec<String>,
    /// clientID -> query hash -> desire (with its TTL state); outlives deleted clients.
    desires: BTreeMap<String, BTreeMap<String, Desire>>,
    /// The TTL clock (ms of connected time).
    #[serde(default)]
    ttl_clock_ms: u64,
    queries: BTreeMap<String, StoredQuery>,
    removed_queries: BTreeMap<String, String>,
    lmids: BTreeMap<String, (u64, String)>,
    /// ((clientID, mutationID), result JSON or None for a tombstone, patch cookie).
    mutation_results: Vec<(String, u64, Option<String>, String)>,
    #[serde(default)]
    client_schema: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct StoredQuery {
    /// Named: {"name", "args"}; legacy: {"ast"}.
    name: Option<String>,
    args: Option<Vec<serde_json::Value>>,
    ast: Option<serde_json::Value>,
    got: Option<String>,
}

/// `StoredConfig` borrowed from the CVR, to write: every flush serializes it (to tell whether
/// it changed), and cloning the query ASTs for that cost more than the serializing.
#[derive(Serialize)]
struct StoredConfigRef<'a> {
    clients: Vec<&'a str>,
    desires: &'a BTreeMap<String, BTreeMap<String, Desire>>,
    ttl_clock_ms: u64,
    queries: BTreeMap<&'a str, StoredQueryRef<'a>>,
    removed_queries: BTreeMap<&'a str, String>,
    lmids: BTreeMap<&'a str, (u64, String)>,
    mutation_results: Vec<(&'a str, u64, Option<&'a str>, String)>,
    client_schema: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
struct StoredQueryRef<'a> {
    name: Option<&'a str>,
    args: Option<&'a [serde_json::Value]>,
    ast: Option<&'a serde_json::Value>,
    got: Option<String>,
}

/// A stable 64-bit digest of a row's contents (FNV-1a over its JSON), so a restarted zcache
/// can tell which rows changed since it last sent them without storing their contents.
pub fn row_digest(row: &Row) -> u64 {
    let mut json = String::new();
    for v in row {
        v.write_json(&mut json);
        json.push('\u{1}');
    }
    fnv1a(json.as_bytes())
}

/// The digest of a loaded row whose sent contents are unknown (`from_stored`). A real digest
/// equals it with probability 2^-64; the row is then not sent again.
const DIGEST_UNKNOWN: u64 = 0;
/// Any fixed seed: fingerprints are compared within one process.
const CONFIG_FINGERPRINT_SEED: u64 = 0x5a63_6163_6865_0001;

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl Cvr {
    /// The writes since the last flush, or None when there are none; `contents`: with the
    /// row records whose contents alone changed (otherwise they wait, and the batch says
    /// up to which version the stored digests are exact). Marks them flushed: a caller
    /// whose write fails must call `mark_all_dirty`.
    pub fn take_flush(&mut self, contents: bool) -> Option<FlushBatch> {
        let contents = contents && !self.dirty_contents.is_empty();
        if !self.has_unflushed() && !contents {
            return None;
        }
        let mut dirty = std::mem::take(&mut self.dirty_rows);
        if contents {
            dirty.extend(std::mem::take(&mut self.dirty_contents));
        }
        let mut reaching: super::FastMap<&RowKey, Vec<String>> = Default::default();
        for (hash, q) in &self.queries {
            for key in q.keys.iter().filter(|k| dirty.contains(*k)) {
                reaching.entry(key).or_default().push(hash.clone());
            }
        }
        let mut rows: Vec<StoredRow> = dirty
            .iter()
            .filter_map(|key| {
                let rec = self.rows.get(key)?;
                let mut queries = reaching.remove(key).unwrap_or_default();
                queries.sort();
                debug_assert_eq!(queries.len(), rec.refs as usize, "refs = queries reaching");
                Some(StoredRow {
                    table: key.table().to_string(),
                    key: key.key().to_string(),
                    patch: rec.patch.cookie(),
                    digest: (rec.refs > 0).then_some(rec.digest),
                    queries,
                })
            })
            .collect();
        rows.sort_by(|a, b| (&a.table, &a.key).cmp(&(&b.table, &b.key)));
        self.flushed_version = Some(self.version);
        // Most flushes only move the version (a poke): the configuration, kilobytes of
        // query ASTs, is serialized and written again only when it changed.
        let fingerprint = self.config_fingerprint();
        let config = (self.flushed_config != Some(fingerprint)).then(|| self.stored_config());
        self.flushed_config = Some(fingerprint);
        if self.dirty_contents.is_empty() {
            self.digests_stored_at = self.version;
        }
        Some(FlushBatch {
            group: self.id.clone(),
            version: self.version.cookie(),
            digests_at: self.digests_stored_at.cookie(),
            config,
            rows,
        })
    }

    /// Keeps the client schema; written at the next flush although no version moved.
    pub fn set_client_schema(&mut self, schema: serde_json::Value) {
        self.client_schema = Some(schema);
        self.client_schema_sets += 1;
        self.force_flush();
    }

    /// The configuration is written at the next flush although no version moved.
    pub fn force_flush(&mut self) {
        self.flushed_version = None;
    }

    /// Whether a flush has anything to write.
    pub fn has_unflushed(&self) -> bool {
        self.flushed_version != Some(self.version) || !self.dirty_rows.is_empty()
    }

    /// Everything is written again at the next flush (after a failed one).
    /// Whether row contents wait for a `take_flush` with contents.
    pub fn has_deferred_contents(&self) -> bool {
        !self.dirty_contents.is_empty()
    }

    pub fn mark_all_dirty(&mut self) {
        self.flushed_version = None;
        self.flushed_config = None;
        self.dirty_contents.clear();
        self.dirty_rows = self.rows.keys().cloned().collect();
    }

    /// A digest of what `stored_config` writes, without serializing it (that was a tenth
    /// of a shard's time at 10,000 groups). A query's spec is not hashed: it is fixed while
    /// the query is in the map, and a query removed and put again changes its `got` and
    /// the tombstones. The client schema counts by its setting (`client_schema_sets`).
    /// Exact within the process only, as `flushed_config` is.
    fn config_fingerprint(&self) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let state = foldhash::fast::FixedState::with_seed(CONFIG_FINGERPRINT_SEED);
        // The hash maps iterate in no fixed order: their entries' hashes are summed.
        let queries = self.queries.iter().fold(0u64, |sum, (hash, q)| {
            sum.wrapping_add(state.hash_one((hash, q.got)))
        });
        let removed = self
            .removed_queries
            .iter()
            .fold(0u64, |sum, entry| sum.wrapping_add(state.hash_one(entry)));
        let mut h = state.build_hasher();
        for id in self.clients.keys() {
            id.hash(&mut h);
        }
        for (client, desires) in &self.desires {
            client.hash(&mut h);
            for (hash, d) in desires {
                (hash, d.inactivated_at, d.ttl_ms, d.removed, d.patch).hash(&mut h);
            }
        }
        let ttl_clock_ms = self.ttl_clock_ms;
        (
            ttl_clock_ms,
            queries,
            removed,
            &self.lmids,
            &self.mutation_results,
        )
            .hash(&mut h);
        self.client_schema_sets.hash(&mut h);
        h.finish()
    }

    fn stored_config(&self) -> String {
        let config = StoredConfigRef {
            clients: self.clients.keys().map(String::as_str).collect(),
            desires: &self.desires,
            ttl_clock_ms: self.ttl_clock_ms,
            queries: self
                .queries
                .iter()
                .map(|(h, q)| {
                    let (name, args, ast) = match &q.spec {
                        QuerySpec::Named { name, args } => {
                            (Some(name.as_str()), Some(args.as_slice()), None)
                        }
                        QuerySpec::Ast(ast) => (None, None, Some(ast)),
                    };
                    let got = q.got.map(|v| v.cookie());
                    (
                        h.as_str(),
                        StoredQueryRef {
                            name,
                            args,
                            ast,
                            got,
                        },
                    )
                })
                .collect(),
            removed_queries: self
                .removed_queries
                .iter()
                .map(|(h, v)| (h.as_str(), v.cookie()))
                .collect(),
            lmids: self
                .lmids
                .iter()
                .map(|(c, (lmid, v))| (c.as_str(), (*lmid, v.cookie())))
                .collect(),
            mutation_results: self
                .mutation_results
                .iter()
                .map(|((c, id), (r, v))| (c.as_str(), *id, r.as_deref(), v.cookie()))
                .collect(),
            client_schema: self.client_schema.as_ref(),
        };
        // Plain maps of strings and numbers: serializing cannot fail.
        serde_json::to_string(&config).unwrap_or_default()
    }

    /// The CVR a store held for `id`. Row contents are unknown until the group's queries
    /// are hydrated again; their digests tell which rows changed meanwhile.
    pub fn from_stored(id: &str, loaded: Loaded) -> Result<Cvr, String> {
        let version = cookie(&loaded.version)?;
        let config: StoredConfig =
            serde_json::from_str(&loaded.config).map_err(|e| format!("config: {e}"))?;
        let mut cvr = Cvr::new(id);
        cvr.version = version;
        // The stored rows' patches are not in `recent`.
        cvr.recent_floor = version;
        for client in config.clients {
            cvr.clients.insert(client, ClientRecord::default());
        }
        cvr.desires = config.desires;
        cvr.ttl_clock_ms = config.ttl_clock_ms;
        cvr.client_schema = config.client_schema;
        for (hash, q) in config.queries {
            let spec = match (q.name, q.ast) {
                (Some(name), _) => QuerySpec::Named {
                    name,
                    args: q.args.unwrap_or_default(),
                },
                (None, Some(ast)) => QuerySpec::Ast(ast),
                (None, None) => return Err(format!("query {hash} has neither name nor ast")),
            };
            let got = q.got.as_deref().map(cookie).transpose()?;
            let record = QueryRecord {
                spec,
                got,
                keys: super::FastSet::default(),
            };
            cvr.queries.insert(hash, record);
        }
        for (hash, v) in config.removed_queries {
            cvr.removed_queries.insert(hash, cookie(&v)?);
        }
        for (client, (lmid, v)) in config.lmids {
            cvr.lmids.insert(client, (lmid, cookie(&v)?));
        }
        for (client, mid, result, v) in config.mutation_results {
            cvr.mutation_results
                .insert((client, mid), (result, cookie(&v)?));
        }
        // Contents sent after the stored digests were made are unknown: every live row
        // counts as changed (a digest no contents have), so hydrating again sends it.
        let digests_at = match &loaded.digests_at {
            Some(d) => cookie(d)?,
            None => version,
        };
        let digests_stale = digests_at < version;
        cvr.digests_stored_at = digests_at;
        for r in loaded.rows {
            let key = RowKey::new(&r.table, r.key);
            for hash in &r.queries {
                let Some(q) = cvr.queries.get_mut(hash) else {
                    return Err(format!("row {key:?} names unknown query {hash}"));
                };
                q.keys.insert(key.clone());
            }
            let record = RowRecord {
                refs: r.queries.len() as u32,
                patch: cookie(&r.patch)?,
                contents: None,
                digest: match r.digest {
                    Some(_) if digests_stale => DIGEST_UNKNOWN,
                    d => d.unwrap_or(0),
                },
            };
            cvr.rows.insert(key, record);
        }
        cvr.flushed_version = Some(cvr.version);
        Ok(cvr)
    }
}

fn cookie(s: &str) -> Result<Version, String> {
    Version::parse(s).ok_or_else(|| format!("bad version {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cvr::QueryRows;
    use crate::protocol::down::PokeBuilder;
    use crate::zql::value::Value;

    use crate::cvr::issue_spec as spec;

    fn rows(items: &[(&str, &str)]) -> QueryRows {
        items
            .iter()
            .map(|(id, title)| {
                let key = crate::zql::RowKey::new("issue", format!("{{\"id\":\"{id}\"}}"));
                let row = vec![Value::Text(id.to_string()), Value::Text(title.to_string())];
                (key, crate::cvr::RowData::new(spec(), row))
            })
            .collect()
    }

    fn named(name: &str) -> QuerySpec {
        QuerySpec::Named {
            name: name.into(),
            args: vec![serde_json::json!({"n": 1})],
        }
    }

    /// Row patches of the poke from `base`, as "op id" strings.
    fn row_ops(cvr: &Cvr, base: Option<Version>) -> Vec<String> {
        let mut p = PokeBuilder::new("p", base.map(|b| b.cookie()).as_deref());
        cvr.write_patches(base, &mut p);
        let mut ops: Vec<String> = p
            .finish(&cvr.version.cookie())
            .iter()
            .map(|m| serde_json::from_str::<serde_json::Value>(m).expect("json"))
            .filter(|m| m[0] == "pokePart")
            .flat_map(|m| m[1]["rowsPatch"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                let id = r.get("value").unwrap_or(&r["id"])["id"].to_string();
                format!("{} {id}", r["op"].as_str().unwrap_or(""))
            })
            .collect();
        ops.sort();
        ops
    }

    /// A group with two queries sharing a row, a dropped query, a tombstone, lmids and a
    /// mutation result, flushed and loaded back.
    fn stored_and_loaded() -> (Cvr, Cvr, Version) {
        let mut cvr = Cvr::new("g1");
        let v1 = cvr.next_config_version();
        cvr.ensure_client("c1");
        cvr.put_desired("c1", "q1", named("a"), Some(1000.0), v1);
        cvr.put_desired(
            "c1",
            "q2",
            QuerySpec::Ast(serde_json::json!({"table": "issue"})),
            None,
            v1,
        );
        cvr.put_desired("c1", "q3", named("b"), Some(0.0), v1);
        cvr.version = v1;
        let v2 = Version {
            state: 10,
            config: 0,
        };
        cvr.set_query_rows("q1", &rows(&[("i1", "one"), ("i2", "two")]), v2);
        cvr.set_query_rows("q2", &rows(&[("i2", "two"), ("i3", "three")]), v2);
        cvr.set_query_rows("q3", &rows(&[("i4", "four")]), v2);
        cvr.version = v2;
        let v3 = cvr.next_config_version();
        cvr.del_desired("c1", "q3", v3);
        cvr.remove_query("q3", v3);
        cvr.set_lmids([("c1".to_string(), 7)].into(), v3);
        cvr.set_mutation_results(
            [(("c1".to_string(), 5), "{\"error\":\"app\"}".into())].into(),
            v3,
        );
        cvr.version = v3;
        cvr.set_client_schema(serde_json::json!({"tables": {"issue": {"primaryKey": ["id"]}}}));
        let batch = cvr.take_flush(true).expect("writes");
        assert!(
            cvr.take_flush(true).is_none(),
            "a second flush has nothing to write"
        );
        assert_eq!(batch.digests_at, batch.version);
        let loaded = Loaded {
            version: batch.version,
            digests_at: Some(batch.digests_at),
            config: batch
                .config
                .expect("a first flush writes the configuration"),
            rows: batch.rows,
        };
        let back = Cvr::from_stored("g1", loaded).expect("loads");
        (cvr, back, v3)
    }

    #[test]
    fn a_flushed_cvr_loads_back_with_the_same_records() {
        let (cvr, back, v3) = stored_and_loaded();
        assert_eq!(back.version, v3);
        assert_eq!(back.lmids, cvr.lmids);
        assert_eq!(back.mutation_results, cvr.mutation_results);
        assert_eq!(back.removed_queries, cvr.removed_queries);
        assert_eq!(back.clients.len(), 1);
        assert_eq!(back.desires, cvr.desires);
        assert!(cvr.desires["c1"].values().any(|d| !d.is_active()));
        assert_eq!(back.ttl_clock_ms, cvr.ttl_clock_ms);
        assert_eq!(back.client_schema, cvr.client_schema);
        for (hash, q) in &cvr.queries {
            let b = &back.queries[hash];
            assert_eq!(
                (&b.spec, b.got, &b.keys),
                (&q.spec, q.got, &q.keys),
                "{hash}"
            );
        }
        assert_eq!(back.rows.len(), cvr.rows.len());
        for (key, r) in &cvr.rows {
            let b = &back.rows[key];
            assert_eq!((b.refs, b.patch), (r.refs, r.patch), "{key:?}");
            if r.refs > 0 {
                assert_eq!(b.digest, r.digest);
            }
        }
        // Nothing to send from the stored version, and live rows are not deleted while
        // their contents are unknown.
        assert!(row_ops(&back, Some(v3)).is_empty());
        assert_eq!(
            row_ops(
                &back,
                Some(Version {
                    state: 10,
                    config: 0
                })
            ),
            vec!["del \"i4\""]
        );
    }

    #[test]
    fn hydrating_again_after_a_load_sends_only_what_changed() {
        let (_, mut back, v3) = stored_and_loaded();
        let v4 = Version {
            state: 20,
            config: 0,
        };
        // i2 changed while zcache was down; i1 left q1; q2 is unchanged.
        assert!(back.set_query_rows("q1", &rows(&[("i2", "two!")]), v4));
        assert!(!back.set_query_rows("q2", &rows(&[("i2", "two!"), ("i3", "three")]), v4));
        back.version = v4;
        assert_eq!(row_ops(&back, Some(v3)), vec!["del \"i1\"", "put \"i2\""]);
        // A client from before everything gets every live row and no tombstones' puts.
        assert_eq!(row_ops(&back, None), vec!["put \"i2\"", "put \"i3\""]);
        // The flush after it writes the rows that entered or left queries, and the
        // configuration (its queries' versions moved); i2's new contents wait for a round
        // of contents, and until then the digests are exact at v3 only.
        let batch = back.take_flush(false).expect("writes");
        assert!(batch.config.is_some());
        let written = |batch: &FlushBatch| -> Vec<(String, Vec<String>)> {
            batch
                .rows
                .iter()
                .map(|r| (r.key.clone(), r.queries.clone()))
                .collect()
        };
        assert_eq!(written(&batch), vec![("{\"id\":\"i1\"}".into(), vec![])]);
        assert_eq!(batch.digests_at, v3.cookie());
        assert!(back.has_deferred_contents());
        let batch = back.take_flush(true).expect("contents");
        assert_eq!(
            written(&batch),
            vec![("{\"id\":\"i2\"}".into(), vec!["q1".into(), "q2".into()])]
        );
        assert_eq!(batch.digests_at, v4.cookie());
        assert!(back.take_flush(true).is_none());
    }

    /// The fingerprint stands in for serializing the configuration at every flush: each
    /// change of what `stored_config` writes must write it, and a data poke must not.
    #[test]
    fn every_configuration_change_is_written_and_a_data_poke_writes_none() {
        let (mut cvr, _, v3) = stored_and_loaded();
        cvr.mark_all_dirty();
        assert!(cvr.take_flush(true).is_some_and(|b| b.config.is_some()));
        type Step = Box<dyn Fn(&mut Cvr, Version)>;
        let steps: Vec<(&str, Step)> = vec![
            (
                "data",
                Box::new(|c, v| _ = c.set_query_rows("q1", &rows(&[("i1", "a")]), v)),
            ),
            (
                "desire",
                Box::new(|c, v| _ = c.put_desired("c2", "q4", named("d"), None, v)),
            ),
            (
                "ttl up",
                Box::new(|c, v| _ = c.put_desired("c2", "q4", named("d"), Some(9e9), v)),
            ),
            ("del", Box::new(|c, v| _ = c.del_desired("c2", "q4", v))),
            ("ttl clock", Box::new(|c, _| c.advance_ttl_clock(5))),
            (
                "got",
                Box::new(|c, v| _ = c.set_query_rows("q4", &rows(&[("i9", "x")]), v)),
            ),
            ("removed", Box::new(|c, v| _ = c.remove_query("q4", v))),
            (
                "lmid",
                Box::new(|c, v| _ = c.set_lmids([("c1".to_string(), 99)].into(), v)),
            ),
            (
                "mutation",
                Box::new(|c, v| {
                    let results = [(("c1".to_string(), 5), "{}".to_string())].into();
                    _ = c.set_mutation_results(results, v);
                }),
            ),
            (
                "schema",
                Box::new(|c, _| c.set_client_schema(serde_json::json!({"v": 2}))),
            ),
            ("client gone", Box::new(|c, v| _ = c.delete_client("c2", v))),
            (
                "data again",
                Box::new(|c, v| _ = c.set_query_rows("q1", &rows(&[("i1", "b")]), v)),
            ),
        ];
        let mut at = v3;
        for (name, step) in steps {
            let before = cvr.stored_config();
            at = Version {
                state: at.state + 1,
                config: 0,
            };
            step(&mut cvr, at);
            cvr.version = at;
            let batch = cvr.take_flush(true).expect("the version moved");
            let after = cvr.stored_config();
            if after != before {
                assert_eq!(batch.config.as_ref(), Some(&after), "{name}: written");
            }
            if name.starts_with("data") {
                assert_eq!(after, before, "{name} is not configuration");
                assert_eq!(batch.config, None, "{name}: not written again");
            } else {
                assert_ne!(after, before, "{name} changes the configuration");
            }
        }
    }

    #[test]
    fn a_load_with_stale_digests_sends_every_live_row_again() {
        let (cvr, _, v3) = stored_and_loaded();
        let v2 = Version {
            state: 10,
            config: 0,
        };
        // As stored by a flush whose contents waited: digests exact at v2 only.
        let mut cvr = cvr;
        cvr.mark_all_dirty();
        let batch = cvr.take_flush(true).expect("writes");
        let loaded = Loaded {
            version: batch.version,
            digests_at: Some(v2.cookie()),
            config: batch.config.expect("configuration"),
            rows: batch.rows,
        };
        let mut back = Cvr::from_stored("g1", loaded).expect("loads");
        let v4 = Version {
            state: 20,
            config: 0,
        };
        // The same contents as stored: i2 may have been sent other contents meanwhile.
        back.set_query_rows("q1", &rows(&[("i1", "one"), ("i2", "two")]), v4);
        back.set_query_rows("q2", &rows(&[("i2", "two"), ("i3", "three")]), v4);
        back.version = v4;
        assert_eq!(
            row_ops(&back, Some(v3)),
            vec!["put \"i1\"", "put \"i2\"", "put \"i3\""]
        );
    }

    #[test]
    fn a_failed_flush_writes_everything_again() {
        let (mut cvr, _, _) = stored_and_loaded();
        cvr.mark_all_dirty();
        let batch = cvr.take_flush(false).expect("writes");
        assert_eq!(batch.rows.len(), cvr.rows.len());
        assert_eq!(batch.digests_at, batch.version);
        assert!(batch.config.is_some(), "the failed write may have lost it");
    }

    #[test]
    fn a_poke_writes_the_version_without_the_unchanged_configuration() {
        let (mut cvr, _, v3) = stored_and_loaded();
        let v4 = Version {
            state: v3.state + 1,
            config: 0,
        };
        assert!(cvr.set_query_rows("q1", &rows(&[("i1", "one, edited"), ("i2", "two")]), v4));
        cvr.version = v4;
        let batch = cvr.take_flush(false).expect("writes");
        assert_eq!(batch.version, v4.cookie());
        assert_eq!(batch.config, None);
        assert!(batch.rows.is_empty(), "{:?}", batch.rows);
        assert_eq!(batch.digests_at, v3.cookie());
        let v5 = cvr.next_config_version();
        cvr.set_lmids([("c1".to_string(), 8)].into(), v5);
        cvr.version = v5;
        let batch = cvr.take_flush(true).expect("writes");
        assert!(batch.config.is_some_and(|c| c.contains('8')));
        assert!(batch.rows.iter().any(|r| r.key.contains("i1")));
        assert_eq!(batch.digests_at, v5.cookie());
    }

    #[test]
    fn unreadable_records_are_errors_not_panics() {
        let bad = |config: &str, version: &str| {
            Cvr::from_stored(
                "g",
                Loaded {
                    version: version.into(),
                    digests_at: None,
                    config: config.into(),
                    rows: vec![],
                },
            )
        };
        assert!(bad("{}", "0a").is_err());
        assert!(bad("not json", "0a").is_err());
        let empty = r#"{"clients":[],"desires":{},"queries":{},"removed_queries":{},"lmids":{},"mutation_results":[]}"#;
        assert!(bad(empty, "0a").is_ok());
        assert!(bad(empty, "??").is_err());
        let orphan = Cvr::from_stored(
            "g",
            Loaded {
                version: "0a".into(),
                digests_at: None,
                config: empty.into(),
                rows: vec![StoredRow {
                    table: "issue".into(),
                    key: "{}".into(),
                    patch: "0a".into(),
                    queries: vec!["nope".into()],
                    digest: Some(1),
                }],
            },
        );
        assert!(orphan.is_err());
    }
}
