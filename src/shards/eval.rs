//! From desired queries to CVR rows: named queries transformed by the app server, ASTs
//! evaluated against the shard's replica snapshot, and the internal queries that carry
//! lastMutationIDs and mutation results.
//!
//! Each query is hydrated once into a `LiveQuery` and then kept up to date from the rows
//! each version changed (`push_into`); when those are not known (a truncate, a schema
//! change, a huge transaction) the query is hydrated again (`evaluate_into`).

use super::routes::{interests_of, Interest};
use super::Shard;
use crate::appserver::{AppServerError, QueryRequest, TransformResult};
use crate::cvr::{Cvr, QueryRows, QuerySpec};
use crate::protocol::cookie::Version;
use crate::protocol::{ErrorKind, ProtocolError};
use crate::sqlite::{IndexRequests, ReplicaReader};
use crate::zql::ast::{parse_ast, Ast, Condition};
use crate::zql::ivm::{LiveQuery, RowChange};
use crate::zql::schema::TableSpec;
use crate::zql::value::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

/// The executable form of a group's queries.
#[derive(Default)]
pub struct GroupQueries {
    asts: HashMap<String, Rc<Ast>>,
    tables: HashMap<String, BTreeSet<String>>,
    names: HashMap<String, String>,
    /// Queries whose AST failed to run: not retried until the client asks again.
    failed: std::collections::HashSet<String>,
    /// The maintained form of every got query.
    live: HashMap<String, LiveQuery>,
    /// Named queries to transform again although they have an AST (a new connection or a
    /// new auth token: the app server may now answer differently).
    stale: std::collections::HashSet<String>,
    /// Legacy AST queries: their executable AST is the client's with the read permissions
    /// bound to the group's auth, so a new token or new permissions transform them again.
    legacy: std::collections::HashSet<String>,
}

/// Every table an AST reads: its own, its related subqueries' and its EXISTS subqueries'.
pub fn ast_tables(ast: &Ast, out: &mut BTreeSet<String>) {
    out.insert(ast.table.clone());
    for r in ast.related.iter().flatten() {
        ast_tables(&r.subquery, out);
    }
    if let Some(c) = &ast.where_ {
        condition_tables(c, out);
    }
}

fn condition_tables(c: &Condition, out: &mut BTreeSet<String>) {
    match c {
        Condition::Simple(_) => {}
        Condition::And { conditions } | Condition::Or { conditions } => {
            conditions.iter().for_each(|c| condition_tables(c, out))
        }
        Condition::CorrelatedSubquery(s) => ast_tables(&s.related.subquery, out),
    }
}

impl GroupQueries {
    /// Desired queries that have no executable AST yet: named ones to send to the app
    /// server. Legacy AST queries are parsed and given the read permissions on the spot
    /// (`authorize`); one whose result is unchanged keeps its maintained state.
    pub fn needing_transform(
        &mut self,
        cvr: &Cvr,
        authorize: &dyn Fn(&Ast) -> Ast,
    ) -> Vec<QueryRequest> {
        let mut out = Vec::new();
        for (hash, q) in &cvr.queries {
            // Got queries without an AST were loaded from the CVR database: transformed again.
            let current = self.asts.contains_key(hash) && !self.stale.contains(hash);
            if current || self.failed.contains(hash) {
                continue;
            }
            match &q.spec {
                QuerySpec::Named { name, args } => {
                    self.names.insert(hash.clone(), name.clone());
                    out.push(QueryRequest {
                        id: hash.clone(),
                        name: name.clone(),
                        args: args.clone(),
                    });
                }
                QuerySpec::Ast(json) => {
                    self.stale.remove(hash);
                    self.legacy.insert(hash.clone());
                    if let Ok(ast) = parse_ast(json) {
                        let ast = authorize(&ast);
                        if self.asts.get(hash).is_some_and(|old| **old == ast) {
                            continue;
                        }
                        self.live.remove(hash);
                        self.insert(hash, ast);
                    }
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn insert(&mut self, hash: &str, ast: Ast) {
        let mut tables = BTreeSet::new();
        ast_tables(&ast, &mut tables);
        self.tables.insert(hash.to_string(), tables);
        self.asts.insert(hash.to_string(), Rc::new(ast));
    }

    /// Every named query is transformed again at the next hydration (zero-cache's "all"
    /// mode: on each new connection and each auth change).
    pub fn mark_named_stale(&mut self) {
        self.stale.extend(self.names.keys().cloned());
    }

    /// Every legacy query gets the read permissions again at the next hydration (new
    /// permissions, or a new token to bind them to).
    pub fn mark_legacy_stale(&mut self) {
        self.stale.extend(self.legacy.iter().cloned());
    }

    pub fn has_legacy(&self) -> bool {
        !self.legacy.is_empty()
    }

    /// Takes the app server's answers. A query whose AST is unchanged keeps its maintained
    /// state; a changed one is hydrated again. Returns the per-query errors as the JSON
    /// array the client expects in `transformError` ("" when there are none), and the ids
    /// of the queries that failed.
    pub fn absorb(
        &mut self,
        results: Vec<TransformResult>,
    ) -> Result<(String, Vec<String>), ProtocolError> {
        let mut errors = Vec::new();
        let mut failed = Vec::new();
        for r in results {
            let id = match &r {
                TransformResult::Ast { id, .. } | TransformResult::Error { id, .. } => id.clone(),
            };
            self.stale.remove(&id);
            match r {
                TransformResult::Ast { id, ast } => match parse_ast(&ast) {
                    Ok(ast) if self.asts.get(&id).is_some_and(|old| **old == ast) => {}
                    Ok(ast) => {
                        self.live.remove(&id);
                        self.insert(&id, ast);
                    }
                    Err(e) => {
                        failed.push(id.clone());
                        errors.push(serde_json::json!({
                            "error": "parse", "id": id, "name": self.names.get(&id),
                            "message": format!("the app server returned an invalid AST: {e}"),
                        }))
                    }
                },
                TransformResult::Error { error, .. } => {
                    failed.push(id);
                    errors.push(error)
                }
            }
        }
        let errors = if errors.is_empty() {
            String::new()
        } else {
            serde_json::Value::Array(errors).to_string()
        };
        Ok((errors, failed))
    }

    pub fn mark_failed(&mut self, hash: &str) {
        self.failed.insert(hash.to_string());
    }

    /// The client asked for the query again: give it another chance.
    pub fn retry(&mut self, hash: &str) {
        self.failed.remove(hash);
    }

    pub fn forget(&mut self, hash: &str) {
        self.stale.remove(hash);
        self.legacy.remove(hash);
        self.live.remove(hash);
        self.asts.remove(hash);
        self.tables.remove(hash);
        self.names.remove(hash);
    }

    /// Queries with an AST that are not got yet, or not hydrated in this process (loaded
    /// from the CVR database).
    pub fn ungot_with_ast(&self, cvr: &Cvr) -> Vec<String> {
        let mut out: Vec<String> = cvr
            .queries
            .iter()
            .filter(|(h, q)| {
                self.asts.contains_key(*h) && (q.got.is_none() || !self.live.contains_key(*h))
            })
            .map(|(h, _)| h.clone())
            .collect();
        out.sort();
        out
    }

    /// Got queries that read any of `tables`.
    pub fn affected_by(&self, cvr: &Cvr, tables: &BTreeSet<String>) -> Vec<String> {
        let mut out: Vec<String> = cvr
            .queries
            .iter()
            .filter(|(h, q)| {
                q.got.is_some() && self.tables.get(*h).is_some_and(|t| !t.is_disjoint(tables))
            })
            .map(|(h, _)| h.clone())
            .collect();
        out.sort();
        out
    }

    /// The AST the query runs (the app server's for a named query), for the inspector.
    pub fn ast_of(&self, hash: &str) -> Option<&Ast> {
        self.asts.get(hash).map(|a| &**a)
    }

    pub fn name_of(&self, hash: &str) -> Option<&str> {
        self.names.get(hash).map(String::as_str)
    }

    /// What these queries read, for the shard's routes: a maintained query's root pinned by
    /// `column = value` reads only the rows holding it; anything else (a query not yet
    /// hydrated, a subquery's table) reads whole tables.
    pub fn interests(&self, out: &mut BTreeSet<Interest>) {
        for (hash, tables) in &self.tables {
            match self.live.get(hash) {
                Some(q) => interests_of(q, out),
                None => out.extend(tables.iter().cloned().map(Interest::Table)),
            }
        }
    }
}

/// Asks the app server for the ASTs of named queries (on the blocking pool: the shard keeps
/// serving while it waits).
pub async fn transform(
    shard: &Shard,
    token: Option<String>,
    queries: Vec<QueryRequest>,
) -> Result<Vec<TransformResult>, ProtocolError> {
    let app = shard.app.clone();
    let ids: Vec<String> = queries.iter().map(|q| q.id.clone()).collect();
    let result = glommio::executor()
        .spawn_blocking(move || app.transform(token.as_deref(), &queries))
        .await;
    result.map_err(|e| transform_failed(&e, &ids))
}

fn transform_failed(e: &AppServerError, ids: &[String]) -> ProtocolError {
    // The app server's own TransformFailed body goes to the client as it is (zero-cache).
    if let AppServerError::Failed(serde_json::Value::Object(body)) = e {
        return ProtocolError::from_body(ErrorKind::TransformFailed, body);
    }
    let mut fields = e.body_fields();
    fields.insert("queryIDs".into(), ids.into());
    ProtocolError::with_fields(
        ErrorKind::TransformFailed,
        e.client_message("Failed to transform queries"),
        fields,
    )
}

/// Hydrates one query against the open snapshot and stores its rows in the CVR.
pub fn evaluate_into(
    reader: &ReplicaReader,
    shard: &Shard,
    queries: &mut GroupQueries,
    cvr: &mut Cvr,
    hash: &str,
    at: Version,
) -> Result<bool, crate::zql::error::ZqlError> {
    let Some(ast) = queries.asts.get(hash) else {
        return Ok(false);
    };
    queries.live.remove(hash);
    let started = std::time::Instant::now();
    let live = shard.hydrations.hydrate(ast, reader)?;
    request_missing_indexes(reader, &live, &shard.index_requests);
    let mut rows: QueryRows = HashMap::with_capacity(live.rows().len());
    for ((table, key), (row, _count)) in live.rows() {
        let spec = checked_spec(reader, table, row)?;
        rows.insert((table.clone(), key.clone()), (spec, row.clone()));
    }
    let synced = rows.len();
    queries.live.insert(hash.to_string(), live);
    let changed = cvr.set_query_rows(hash, rows, at);
    crate::metrics::observe_since(crate::metrics::Timing::Hydration, started);
    // The engine's side of a hydration (reads, operators, the CVR's rows), the figure
    // zero-cache logs as "Slow query materialization" under ZERO_LOG_SLOW_HYDRATE_THRESHOLD.
    tracing::debug!(
        target: "zcache::hydration",
        "hydrated {synced} rows of {} for {hash} in {} us",
        ast.table,
        started.elapsed().as_micros()
    );
    Ok(changed)
}

/// Brings one hydrated query up to date with `changes` (rows read in the open snapshot)
/// and updates the CVR with the rows whose count or contents changed.
pub fn push_into(
    reader: &ReplicaReader,
    shard: &Shard,
    queries: &mut GroupQueries,
    cvr: &mut Cvr,
    hash: &str,
    changes: &[RowChange],
    at: Version,
) -> Result<bool, crate::zql::error::ZqlError> {
    let Some(live) = queries.live.get_mut(hash) else {
        return evaluate_into(reader, shard, queries, cvr, hash, at);
    };
    let touched = match live.push(changes, reader) {
        Ok(t) => t,
        Err(e) => {
            // Its state is not to be trusted any more.
            queries.live.remove(hash);
            return Err(e);
        }
    };
    let mut update: Vec<crate::cvr::TouchedRow> = Vec::with_capacity(touched.len());
    for key in touched {
        let now = match live.rows().get(&key) {
            Some((row, _)) => Some((checked_spec(reader, &key.0, row)?, row.clone())),
            None => None,
        };
        update.push((key, now));
    }
    Ok(cvr.update_query_rows(hash, update, at))
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

/// The table's spec, after checking the row holds nothing a JavaScript client would get
/// wrong (integers beyond 2^53).
fn checked_spec(
    reader: &ReplicaReader,
    table: &str,
    row: &crate::zql::value::Row,
) -> Result<Rc<TableSpec>, crate::zql::error::ZqlError> {
    let spec = reader
        .table_spec(table)
        .ok_or_else(|| crate::zql::error::ZqlError::UnknownTable(table.to_string()))?;
    if let Some((column, value)) = crate::protocol::down::unsafe_integer_column(&spec, row) {
        return Err(crate::zql::error::ZqlError::Source(format!(
            "{table}.{column} = {value} is beyond 2^53: a JavaScript client cannot hold it exactly"
        )));
    }
    Ok(spec)
}

/// The internal queries: `{shard}.clients` rows of the group become lastMutationIDChanges,
/// `{shard}.mutations` rows become mutationsPatch.
pub fn refresh_mutation_state(
    reader: &ReplicaReader,
    shard_schema: &str,
    cvr: &mut Cvr,
    at: Version,
) -> Result<bool, ProtocolError> {
    let internal =
        |e: crate::sqlite::ReplicaError| ProtocolError::new(ErrorKind::Internal, e.to_string());
    let group = Value::Text(cvr.id.clone());
    let mut changed = false;
    let clients_table = format!("{shard_schema}.clients");
    if let Some(spec) = reader.table_spec(&clients_table) {
        let (Some(g), Some(c), Some(l)) = (
            spec.column_index("clientGroupID"),
            spec.column_index("clientID"),
            spec.column_index("lastMutationID"),
        ) else {
            return Err(ProtocolError::new(
                ErrorKind::Internal,
                format!("{clients_table} lacks zero's columns"),
            ));
        };
        let rows = reader
            .fetch_rows(&clients_table, &[(g, group.clone())])
            .map_err(internal)?;
        let lmids: BTreeMap<String, u64> = rows
            .into_iter()
            .filter_map(|r| match (&r[c], &r[l]) {
                (Value::Text(client), Value::Int(lmid)) => Some((client.clone(), *lmid as u64)),
                _ => None,
            })
            .collect();
        changed |= cvr.set_lmids(lmids, at);
    }
    let mutations_table = format!("{shard_schema}.mutations");
    if let Some(spec) = reader.table_spec(&mutations_table) {
        let (Some(g), Some(c), Some(m), Some(r)) = (
            spec.column_index("clientGroupID"),
            spec.column_index("clientID"),
            spec.column_index("mutationID"),
            spec.column_index("result"),
        ) else {
            return Err(ProtocolError::new(
                ErrorKind::Internal,
                format!("{mutations_table} lacks zero's columns"),
            ));
        };
        let rows = reader
            .fetch_rows(&mutations_table, &[(g, group)])
            .map_err(internal)?;
        let results: BTreeMap<(String, u64), String> = rows
            .into_iter()
            .filter_map(|row| match (&row[c], &row[m], &row[r]) {
                (
                    Value::Text(client),
                    Value::Int(id),
                    Value::Json(result) | Value::Text(result),
                ) => Some(((client.clone(), *id as u64), result.clone())),
                _ => None,
            })
            .collect();
        changed |= cvr.set_mutation_results(results, at);
    }
    Ok(changed)
}
