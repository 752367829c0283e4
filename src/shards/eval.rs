//! From desired queries to CVR rows: named queries transformed by the app server, ASTs
//! evaluated against the shard's replica snapshot, and the internal queries that carry
//! lastMutationIDs and mutation results.
//!
//! Each query's AST is maintained once per shard (`shared`), whatever number of groups hold
//! it; a group copies its result when it first gets the query (`evaluate_into`) and then
//! applies the diffs of each version to its CVR (`catch_up_into`).

use super::routes::{interests_of, Interest};
use super::shared::{Catchup, SharedHandle, SharedQueries};
use super::Shard;
use crate::appserver::{AppServerError, QueryRequest, TransformResult};
use crate::cvr::{Cvr, QuerySpec, TouchedRow};
use crate::protocol::cookie::Version;
use crate::protocol::{ErrorKind, ProtocolError};
use crate::sqlite::ReplicaReader;
use crate::zql::ast::{parse_ast, Ast, Condition};
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
    /// The shared maintained query behind every got query.
    live: HashMap<String, SharedHandle>,
    /// Named queries to transform again although they have an AST (a new connection or a
    /// new auth token: the app server may now answer differently).
    stale: std::collections::HashSet<String>,
    /// Legacy AST queries: their executable AST is the client's with the read permissions
    /// bound to the group's auth, so a new token or new permissions transform them again.
    legacy: std::collections::HashSet<String>,
    /// Bumped whenever what the queries read may have changed (the routes are re-registered
    /// only then).
    generation: u64,
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

    /// Changes whenever what the queries read may have.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn insert(&mut self, hash: &str, ast: Ast) {
        self.generation += 1;
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
        self.generation += 1;
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
    pub fn interests(&self, shared: &SharedQueries, out: &mut BTreeSet<Interest>) {
        for (hash, tables) in &self.tables {
            match self.live.get(hash).and_then(|h| shared.live(&h.key)) {
                Some(q) => interests_of(q, out),
                None => out.extend(tables.iter().cloned().map(Interest::Table)),
            }
        }
    }

    /// The got queries with a shared query behind them, by hash.
    pub fn handles(&self) -> impl Iterator<Item = (&String, &SharedHandle)> {
        self.live.iter()
    }
}

/// Asks the app server for the ASTs of named queries (on the blocking pool: the shard keeps
/// serving while it waits).
pub async fn transform(
    shard: &Shard,
    token: Option<String>,
    queries: Vec<QueryRequest>,
) -> TransformOutcome {
    // The request is the token and the queries (no group in it): groups asking the same at
    // once share one call.
    let request: Vec<(&str, &str, &[serde_json::Value])> = queries
        .iter()
        .map(|q| (q.id.as_str(), q.name.as_str(), q.args.as_slice()))
        .collect();
    let key = (
        token.clone(),
        serde_json::to_string(&request).unwrap_or_default(),
    );
    let app = shard.app.clone();
    let call = || async move {
        let ids: Vec<String> = queries.iter().map(|q| q.id.clone()).collect();
        let result = glommio::executor()
            .spawn_blocking(move || app.transform(token.as_deref(), &queries))
            .await;
        result.map_err(|e| transform_failed(&e, &ids))
    };
    shard.transforms.run(key, call).await
}

/// A transform request: the token and the queries' JSON.
pub type TransformKey = (Option<String>, String);
pub type TransformOutcome = Result<Vec<TransformResult>, ProtocolError>;

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

/// Gives one query its shared maintained query (hydrated if no group holds it yet) in the
/// open snapshot, caught up to by `shared`, and stores a copy of its rows in the CVR.
pub fn evaluate_into(
    reader: &ReplicaReader,
    shard: &Shard,
    shared: &mut SharedQueries,
    queries: &mut GroupQueries,
    cvr: &mut Cvr,
    hash: &str,
    at: Version,
) -> Result<bool, crate::zql::error::ZqlError> {
    let Some(ast) = queries.asts.get(hash).cloned() else {
        return Ok(false);
    };
    queries.live.remove(hash);
    let handle = shared.acquire(&ast, reader, &shard.index_requests)?;
    let rows = shared.rows(&handle.key, reader)?;
    queries.live.insert(hash.to_string(), handle);
    queries.generation += 1;
    Ok(cvr.set_query_rows(hash, &rows, at))
}

/// What one got query lacks to be at the shared queries' state (None: it takes reading the
/// replica, and `reader` is None). A query whose shared query failed is let go: it is
/// hydrated anew at the next chance.
pub fn catch_up_of(
    reader: Option<&ReplicaReader>,
    shared: &mut SharedQueries,
    queries: &mut GroupQueries,
    hash: &str,
    from: u64,
) -> Result<Option<Catchup>, crate::zql::error::ZqlError> {
    let Some(handle) = queries.live.get(hash) else {
        return Ok(Some(Catchup::Steps(Vec::new())));
    };
    let result = shared.since(&handle.key, from, reader);
    if result.is_err() {
        queries.live.remove(hash);
        queries.generation += 1;
    }
    result
}

/// Applies a query's catch-up to the CVR.
pub fn apply_catch_up(cvr: &mut Cvr, hash: &str, catchup: Catchup, at: Version) -> bool {
    match catchup {
        Catchup::Steps(diffs) => match diffs.as_slice() {
            [] => false,
            [one] => cvr.update_query_rows(hash, one, at),
            // One net diff: each row's last entry, whose contents are current (a later
            // change to the row would have touched the query again). Applied step by step,
            // an older step could put back old contents of a row another of the group's
            // queries still reaches with newer ones.
            many => cvr.update_query_rows(hash, &net_diff(many), at),
        },
        Catchup::Copy(rows) => cvr.set_query_rows(hash, &rows, at),
    }
}

/// Several steps' diffs of one query as one: each touched row once, as the last step left it.
fn net_diff(steps: &[Rc<Vec<TouchedRow>>]) -> Vec<TouchedRow> {
    let mut last: HashMap<&crate::cvr::RowKey, &TouchedRow> = HashMap::new();
    for entry in steps.iter().flat_map(|s| s.iter()) {
        last.insert(&entry.0, entry);
    }
    last.into_values().cloned().collect()
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
