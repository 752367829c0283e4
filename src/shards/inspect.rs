//! The inspector: the `inspect` message of sync protocol v51 (zero-cache's inspect-handler.ts
//! and inspector-delegate.ts). A client asks, on its sync socket, for its group's queries,
//! the server's timings, the server version, or an analysis of one query; the answer goes
//! back on that socket only, as `["inspect", {op, id, value}]`.
//!
//! Everything the rest of the shard holds for it lives here: `ConnInspect` on each socket,
//! `GroupInspect` on each group (its authentication and per-query timings) and
//! `ShardInspect` on the shard (the shard-wide timings).

use super::conn::Conn;
use super::group::Group;
use super::Shard;
use crate::appserver::{QueryRequest, TransformResult};
use crate::cvr::{Cvr, QuerySpec};
use crate::zql::ast::{parse_ast, Ast, Direction};
use crate::zql::schema::TableSpec;
use crate::zql::value::{Row, Value};
use crate::zql::{Source, ZqlError};
use serde_json::{json, Map, Value as Json};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Instant;

/// What `version` answers when `--server-version` is not set: the zero-cache release whose
/// protocol zcache speaks.
pub const SERVER_VERSION_DEFAULT: &str = "1.9.0";
/// The compression a digest reports (zero's TDigest default). The digest here keeps at most
/// `TDIGEST_CENTROIDS_MAX` centroids whatever it says.
pub const TDIGEST_COMPRESSION: u32 = 1000;
/// Centroids one digest keeps: past it the two closest merge, so a digest stays a few KB
/// however many timings it took (one per query of every group, and two per shard).
pub const TDIGEST_CENTROIDS_MAX: usize = 100;
/// Extra per-query timing entries a group may hold beyond twice its queries before the
/// entries of queries it no longer has are dropped (amortizes the clean-up).
const QUERY_TIMINGS_SLACK: usize = 16;
/// The protocol from which a query's hydration time is a plain number
/// (`query-hydration-server-ms`); older clients expect a digest.
const PROTOCOL_HYDRATION_MS: u32 = 51;
/// The id the app server sees for the one named query an analysis transforms.
const ANALYZE_QUERY_ID: &str = "inspector-analyze-query";

/// A small t-digest: centroids (mean, weight) sorted by mean, at most
/// `TDIGEST_CENTROIDS_MAX` of them. Its JSON is zero's: `[compression, mean1, weight1, ...]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TDigest {
    centroids: Vec<(f64, f64)>,
}

impl TDigest {
    /// Adds one value (NaN and infinities are dropped: no timing is either).
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        let at = self.centroids.partition_point(|&(m, _)| m < x);
        match self.centroids.get_mut(at) {
            Some((m, w)) if *m == x => *w += 1.0,
            _ => self.centroids.insert(at, (x, 1.0)),
        }
        if self.centroids.len() > TDIGEST_CENTROIDS_MAX {
            self.merge_closest();
        }
    }

    /// Merges the two adjacent centroids closest in mean into their weighted mean.
    fn merge_closest(&mut self) {
        let Some(i) = (0..self.centroids.len().saturating_sub(1)).min_by(|&a, &b| {
            let gap = |i: usize| self.centroids[i + 1].0 - self.centroids[i].0;
            gap(a).total_cmp(&gap(b))
        }) else {
            return;
        };
        let (m2, w2) = self.centroids.remove(i + 1);
        let (m1, w1) = self.centroids[i];
        let w = w1 + w2;
        self.centroids[i] = ((m1 * w1 + m2 * w2) / w, w);
    }

    pub fn centroids(&self) -> &[(f64, f64)] {
        &self.centroids
    }

    /// Values added (NaN and infinities excepted).
    pub fn count(&self) -> f64 {
        self.centroids.iter().map(|&(_, w)| w).sum()
    }

    pub fn to_json(&self) -> Json {
        let mut out = Vec::with_capacity(1 + 2 * self.centroids.len());
        out.push(Json::from(TDIGEST_COMPRESSION));
        for &(m, w) in &self.centroids {
            out.push(number(m));
            out.push(number(w));
        }
        Json::Array(out)
    }
}

/// A float as JSON, whole numbers without a fraction (as JavaScript prints them: `1`, not
/// `1.0`).
fn number(x: f64) -> Json {
    const EXACT_MAX: f64 = 9_007_199_254_740_992.0; // 2^53
    if x.fract() == 0.0 && x.abs() < EXACT_MAX {
        Json::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number)
    }
}

fn ms_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// The shard-wide timings (zero-cache keeps them per syncer worker).
#[derive(Debug, Default)]
pub struct ShardInspect {
    /// Each query hydration, ms (`query-materialization-server`).
    materialization: RefCell<TDigest>,
    /// Each query advanced to a new replica version, ms (`query-update-server`).
    update: RefCell<TDigest>,
}

impl ShardInspect {
    pub fn to_json(&self) -> Json {
        json!({
            "query-materialization-server": self.materialization.borrow().to_json(),
            "query-update-server": self.update.borrow().to_json(),
        })
    }
}

/// One query's timings in its group.
#[derive(Debug, Clone, Default)]
struct QueryTimings {
    /// Its last hydration, ms.
    hydration_ms: Option<f64>,
    /// Each advance of it, ms.
    update: TDigest,
}

/// The inspector's state of one client group.
#[derive(Debug, Default)]
pub struct GroupInspect {
    /// The group passed `authenticate`. Kept in memory with the group only: a group unloaded
    /// for idleness (or a restart) must authenticate again, which the client's inspector
    /// does by itself (it prompts on `authenticated: false` and retries). zero-cache keeps a
    /// set per syncer worker, for the worker's life.
    authenticated: Cell<bool>,
    /// Per-query timings by query hash. Only queries the CVR still has are kept (pruned as
    /// it grows, and at each `queries` answer).
    queries: RefCell<HashMap<String, QueryTimings>>,
}

impl GroupInspect {
    /// Query `hash` was hydrated, from `started` until now.
    pub fn hydrated(&self, shard: &Shard, cvr: &Cvr, hash: &str, started: Instant) {
        let ms = ms_since(started);
        shard.inspect.materialization.borrow_mut().add(ms);
        self.timings_of(cvr, hash, |t| t.hydration_ms = Some(ms));
    }

    /// Query `hash` was advanced to a new version, from `started` until now.
    pub fn updated(&self, shard: &Shard, cvr: &Cvr, hash: &str, started: Instant) {
        let ms = ms_since(started);
        shard.inspect.update.borrow_mut().add(ms);
        self.timings_of(cvr, hash, |t| t.update.add(ms));
    }

    fn timings_of(&self, cvr: &Cvr, hash: &str, f: impl FnOnce(&mut QueryTimings)) {
        let mut queries = self.queries.borrow_mut();
        if !queries.contains_key(hash)
            && queries.len() >= 2 * cvr.queries.len() + QUERY_TIMINGS_SLACK
        {
            queries.retain(|h, _| cvr.queries.contains_key(h));
        }
        f(queries.entry(hash.to_string()).or_default());
    }

    /// Drops the timings of queries the CVR no longer has.
    fn prune(&self, cvr: &Cvr) {
        self.queries
            .borrow_mut()
            .retain(|h, _| cvr.queries.contains_key(h));
    }

    /// The query's `metrics` field for a client of `protocol` (null: never hydrated here).
    fn metrics_json(&self, hash: &str, protocol: u32) -> Json {
        let queries = self.queries.borrow();
        let Some(t) = queries.get(hash) else {
            return Json::Null;
        };
        let mut out = Map::new();
        if protocol >= PROTOCOL_HYDRATION_MS {
            if let Some(ms) = t.hydration_ms {
                out.insert("query-hydration-server-ms".into(), number(ms));
            }
        } else {
            // Older clients read a digest of hydrations (zero-cache's metricsForProtocol).
            let mut d = TDigest::default();
            if let Some(ms) = t.hydration_ms {
                d.add(ms);
            }
            out.insert("query-materialization-server".into(), d.to_json());
        }
        out.insert("query-update-server".into(), t.update.to_json());
        Json::Object(out)
    }
}

/// The inspector's view of one socket.
#[derive(Debug)]
pub struct ConnInspect {
    /// initConnection completed: only then is `inspect` answered (zero-cache drops it
    /// silently before, having no client handler yet).
    initialized: Cell<bool>,
    /// The sync protocol version of the connect URL (shapes the per-query metrics).
    protocol: u32,
}

impl ConnInspect {
    pub fn new(protocol: u32) -> Self {
        ConnInspect {
            initialized: Cell::new(false),
            protocol,
        }
    }

    pub fn set_initialized(&self) {
        self.initialized.set(true);
    }
}

/// `NODE_ENV=development`: zero-cache's development mode, in which every inspector request
/// is authenticated and an unset admin password lets an empty one in.
fn dev_mode() -> bool {
    static DEV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEV.get_or_init(|| std::env::var("NODE_ENV").is_ok_and(|v| v == "development"))
}

/// zero-cache's isAdminPasswordValid. An empty password counts as none (as JavaScript's
/// `!password`).
pub fn admin_password_valid(configured: Option<&str>, sent: Option<&str>, dev: bool) -> bool {
    let configured = configured.filter(|p| !p.is_empty());
    let sent = sent.filter(|p| !p.is_empty());
    match (configured, sent) {
        (None, None) => dev,
        (None, Some(_)) => false,
        (Some(_), None) => false,
        (Some(c), Some(s)) => constant_time_eq(c.as_bytes(), s.as_bytes()),
    }
}

/// Compares without an early exit, so the time taken tells nothing of where the first
/// difference is (a length mismatch answers at once, as zero-cache's timingSafeEqual guard).
/// Hand-rolled: ring 0.17 deprecates its `constant_time::verify_slices_are_equal`.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

/// Handles one `inspect` message of `conn`: answers it on that socket. Nothing here fails
/// the socket; an error inside an op is answered as `{op: "error"}`.
pub async fn handle(shard: &Rc<Shard>, group: &Rc<Group>, conn: &Conn, body: Json) {
    if !conn.inspect.initialized.get() {
        tracing::debug!(client = %conn.client_id, "inspect before initConnection: dropped");
        return;
    }
    let id = body.get("id").cloned().unwrap_or(Json::Null);
    let op = body.get("op").and_then(Json::as_str).unwrap_or_default();
    let authenticated = dev_mode() || group.inspect.authenticated.get();
    let (op, value) = if op != "authenticate" && !authenticated {
        tracing::info!(group = %group.id, "inspector not authenticated: challenge sent");
        ("authenticated", Json::Bool(false))
    } else {
        match run_op(shard, group, conn, op, &body).await {
            Ok(answer) => answer,
            Err(message) => {
                tracing::warn!(group = %group.id, op, %message, "inspect op failed");
                ("error", Json::String(message))
            }
        }
    };
    let reply = json!(["inspect", {"op": op, "id": id, "value": value}]);
    conn.send_text(&reply.to_string());
}

async fn run_op(
    shard: &Rc<Shard>,
    group: &Rc<Group>,
    conn: &Conn,
    op: &str,
    body: &Json,
) -> Result<(&'static str, Json), String> {
    Ok(match op {
        "authenticate" => {
            let sent = body.get("value").and_then(Json::as_str);
            let ok = admin_password_valid(shard.cfg.admin_password.as_deref(), sent, dev_mode());
            group.inspect.authenticated.set(ok);
            ("authenticated", Json::Bool(ok))
        }
        "version" => {
            let v = shard.cfg.server_version.as_deref();
            ("version", Json::from(v.unwrap_or(SERVER_VERSION_DEFAULT)))
        }
        "metrics" => ("metrics", shard.inspect.to_json()),
        "queries" => {
            let client = body.get("clientID").and_then(Json::as_str);
            let cvr = group.cvr.borrow();
            group.inspect.prune(&cvr);
            let queries = group.queries.borrow();
            let server_ast = |hash: &str| {
                queries
                    .ast_of(hash)
                    .and_then(|a| serde_json::to_value(a).ok())
            };
            let metrics = |hash: &str| group.inspect.metrics_json(hash, conn.inspect.protocol);
            let rows = query_rows(&cvr, client, &server_ast, &metrics);
            ("queries", Json::Array(rows))
        }
        "analyze-query" => ("analyze-query", analyze_query(shard, group, body).await?),
        other => return Err(format!("unknown inspect op {other:?}")),
    })
}

/// The `queries` answer: one row per (clientID, queryHash) desire, in that order, without
/// the desires whose TTL ran out on the TTL clock (zero-cache's cvr-store inspectQueries).
/// The clock is the CVR's as last ticked by the group.
pub fn query_rows(
    cvr: &Cvr,
    client: Option<&str>,
    server_ast: &dyn Fn(&str) -> Option<Json>,
    metrics: &dyn Fn(&str) -> Json,
) -> Vec<Json> {
    let mut out = Vec::new();
    for (client_id, desires) in &cvr.desires {
        if client.is_some_and(|c| c != client_id) {
            continue;
        }
        for (hash, d) in desires {
            let expired = d
                .inactivated_at
                .is_some_and(|at| at.saturating_add(d.ttl_ms) <= cvr.ttl_clock_ms);
            if expired {
                continue;
            }
            let query = cvr.queries.get(hash);
            // The client's AST for a legacy query, else the one the server runs.
            let (ast, name, args) = match query.map(|q| &q.spec) {
                Some(QuerySpec::Ast(ast)) => (ast.clone(), Json::Null, Json::Null),
                Some(QuerySpec::Named { name, args }) => (
                    server_ast(hash).unwrap_or(Json::Null),
                    Json::from(name.as_str()),
                    Json::Array(args.clone()),
                ),
                None => (
                    server_ast(hash).unwrap_or(Json::Null),
                    Json::Null,
                    Json::Null,
                ),
            };
            out.push(json!({
                "clientID": client_id,
                "queryID": hash,
                "ttl": d.ttl_ms,
                "inactivatedAt": d.inactivated_at,
                "rowCount": query.map_or(0, |q| q.keys.len()),
                "ast": ast,
                "got": query.is_some_and(|q| q.got.is_some()),
                "deleted": d.removed,
                "name": name,
                "args": args,
                "metrics": metrics(hash),
            }));
        }
    }
    out
}

/// The AST an analysis runs for a legacy (client AST) query: the read permissions bound to
/// the group's JWT claims. zero-cache's analyze-query runs without permissions when none are
/// deployed ("No permissions loaded; analyze-query will run without applying permissions."),
/// unlike live queries, which are then denied.
fn server_ast(shard: &Shard, group: &Group, ast: Ast) -> Ast {
    let Some(perms) = shard.permissions() else {
        return ast;
    };
    let auth_data = group.auth_data.borrow().clone();
    crate::permissions::authorize_read(&ast, Some(&perms), auth_data.as_ref())
}

/// `analyze-query`: runs one query on a replica snapshot and reports what it syncs and reads
/// (zero-cache's analyze.ts / run-ast.ts).
async fn analyze_query(shard: &Rc<Shard>, group: &Rc<Group>, body: &Json) -> Result<Json, String> {
    let present = |k: &str| body.get(k).filter(|v| !v.is_null());
    let mut ast_json = present("ast").or_else(|| present("value")).cloned();
    let mut legacy = true;
    let name = body
        .get("name")
        .and_then(Json::as_str)
        .filter(|n| !n.is_empty());
    if let (Some(name), Some(args)) = (name, present("args")) {
        ast_json = Some(transform_named(shard, group, name, args).await?);
        legacy = false;
    }
    let Some(ast_json) = ast_json else {
        return Err("AST is required for analyze-query operation. Either provide an AST directly or ensure custom query transformation is configured.".into());
    };
    let ast = parse_ast(&ast_json).map_err(|e| e.to_string())?;
    let ast = if legacy {
        server_ast(shard, group, ast)
    } else {
        ast
    };
    let options = body.get("options");
    let option = |k: &str| options.and_then(|o| o.get(k)).and_then(Json::as_bool);
    let synced_rows = option("syncedRows").unwrap_or(true);
    let vended_rows = option("vendedRows").unwrap_or(false);

    let reader = shard.reader.borrow();
    reader.begin_snapshot().map_err(|e| e.to_string())?;
    let source = CountingSource {
        inner: &*reader,
        keep_rows: vended_rows,
        read: RefCell::default(),
    };
    let start = epoch_ms();
    let started = Instant::now();
    let evaluation = crate::zql::evaluate(&ast, &source);
    let elapsed = ms_since(started);
    let result = evaluation.map_err(|e| e.to_string()).and_then(|ev| {
        let mut out = Map::new();
        out.insert("warnings".into(), json!([]));
        if synced_rows {
            out.insert("syncedRows".into(), synced_rows_json(&*reader, &ev.rows)?);
        }
        out.insert("syncedRowCount".into(), Json::from(ev.rows.len()));
        out.insert("start".into(), number(start));
        out.insert("end".into(), number(start + elapsed));
        out.insert("elapsed".into(), number(elapsed));
        source.report(&mut out, vended_rows);
        Ok(Json::Object(out))
    });
    let _ = reader.end_snapshot();
    result
}

fn epoch_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The AST of a named query, from the app server's query URL (zero-cache's
/// transformCustomQuery), with the group's token.
async fn transform_named(
    shard: &Shard,
    group: &Group,
    name: &str,
    args: &Json,
) -> Result<Json, String> {
    if shard.cfg.query_url.is_empty() {
        return Err(
            "Custom query transformation requested but no CustomQueryTransformer is configured"
                .into(),
        );
    }
    let args = match args {
        Json::Array(a) => a.clone(),
        other => vec![other.clone()],
    };
    let request = QueryRequest {
        id: ANALYZE_QUERY_ID.into(),
        name: name.into(),
        args,
    };
    let token = group.token.borrow().clone();
    let results = super::eval::transform(shard, token, vec![request])
        .await
        .map_err(|e| format!("Error transforming custom query {name}: {e}"))?;
    match results.into_iter().next() {
        Some(TransformResult::Ast { ast, .. }) => Ok(ast),
        Some(TransformResult::Error { error, .. }) => {
            Err(format!("Error transforming custom query {name}: {error}"))
        }
        None => Err("No transformation result returned".into()),
    }
}

/// `{table: [row objects]}` of the rows a query syncs, each table's rows by primary key.
fn synced_rows_json(src: &dyn Source, rows: &crate::zql::eval::RowCounts) -> Result<Json, String> {
    let mut by_table: BTreeMap<&str, Vec<(&str, &Row)>> = BTreeMap::new();
    for (key, (row, _)) in rows {
        by_table
            .entry(key.table())
            .or_default()
            .push((key.key(), row));
    }
    let mut out = Map::new();
    for (table, mut rows) in by_table {
        rows.sort_by(|a, b| a.0.cmp(b.0));
        let spec = src
            .table(table)
            .ok_or_else(|| ZqlError::UnknownTable(table.into()).to_string())?;
        let rows = rows
            .into_iter()
            .map(|(_, row)| row_json(&spec, row))
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(table.into(), Json::Array(rows));
    }
    Ok(Json::Object(out))
}

/// A row as the JSON object the client gets in a poke. (zcache's replica keeps no per-row
/// `_0_version`, so the rows have none.)
fn row_json(spec: &TableSpec, row: &Row) -> Result<Json, String> {
    let mut text = String::new();
    crate::protocol::down::write_row_object(spec, row, &mut text);
    serde_json::from_str(&text).map_err(|e| format!("row of {} is not JSON: {e}", spec.name))
}

/// Rows read by one statement-like fetch: how many, and (when asked) which.
#[derive(Default)]
struct ReadRows {
    count: u64,
    rows: Vec<Row>,
}

/// The replica, counting the rows each kind of read returns, keyed by table and a SQL-like
/// text of the read (zero-cache keys its counts by the SQLite statement).
struct CountingSource<'a> {
    inner: &'a dyn Source,
    keep_rows: bool,
    read: RefCell<BTreeMap<String, BTreeMap<String, ReadRows>>>,
}

impl CountingSource<'_> {
    fn note(&self, table: &str, statement: String, rows: &[Row]) {
        let mut read = self.read.borrow_mut();
        let entry = read
            .entry(table.to_string())
            .or_default()
            .entry(statement)
            .or_default();
        entry.count += rows.len() as u64;
        if self.keep_rows {
            entry.rows.extend(rows.iter().cloned());
        }
    }

    fn column(&self, table: &str, i: usize) -> String {
        let name = self
            .inner
            .table(table)
            .and_then(|s| s.columns.get(i).map(|c| c.name.clone()))
            .unwrap_or_else(|| format!("#{i}"));
        format!("\"{}\"", name.replace('"', "\"\""))
    }

    fn statement(&self, table: &str, conditions: Vec<String>, tail: &str) -> String {
        let mut s = format!("SELECT * FROM \"{}\"", table.replace('"', "\"\""));
        if !conditions.is_empty() {
            s.push_str(" WHERE ");
            s.push_str(&conditions.join(" AND "));
        }
        s.push_str(tail);
        s
    }

    fn eq_conditions(&self, table: &str, eq: &[(usize, Value)]) -> Vec<String> {
        eq.iter()
            .map(|(i, _)| format!("{} = ?", self.column(table, *i)))
            .collect()
    }

    /// `readRowCountsByQuery` and `readRowCount`; with `vended`, also `readRows` and the
    /// deprecated `vendedRowCounts` / `vendedRows` (the same figures under older names).
    fn report(&self, out: &mut Map<String, Json>, vended: bool) {
        let read = self.read.borrow();
        let mut counts = Map::new();
        let mut rows = Map::new();
        let mut total = 0u64;
        for (table, statements) in read.iter() {
            let spec = self.inner.table(table);
            let mut c = Map::new();
            let mut r = Map::new();
            for (statement, read) in statements {
                total += read.count;
                c.insert(statement.clone(), Json::from(read.count));
                if let (true, Some(spec)) = (vended, &spec) {
                    let objects = read
                        .rows
                        .iter()
                        .filter_map(|row| row_json(spec, row).ok())
                        .collect();
                    r.insert(statement.clone(), Json::Array(objects));
                }
            }
            counts.insert(table.clone(), Json::Object(c));
            rows.insert(table.clone(), Json::Object(r));
        }
        out.insert("readRowCountsByQuery".into(), Json::Object(counts.clone()));
        out.insert("readRowCount".into(), Json::from(total));
        if vended {
            out.insert("readRows".into(), Json::Object(rows.clone()));
            out.insert("vendedRowCounts".into(), Json::Object(counts));
            out.insert("vendedRows".into(), Json::Object(rows));
        }
    }
}

impl Source for CountingSource<'_> {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.inner.table(name)
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        let rows = self.inner.fetch(table, eq)?;
        let statement = self.statement(table, self.eq_conditions(table, eq), "");
        self.note(table, statement, &rows);
        Ok(rows)
    }

    fn fetch_in(
        &self,
        table: &str,
        column: usize,
        values: &[Value],
        eq: &[(usize, Value)],
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        let rows = self.inner.fetch_in(table, column, values, eq)?;
        if let Some(rows) = &rows {
            let mut conditions = vec![format!("{} IN (...)", self.column(table, column))];
            conditions.extend(self.eq_conditions(table, eq));
            let statement = self.statement(table, conditions, "");
            self.note(table, statement, rows);
        }
        Ok(rows)
    }

    fn fetch_ordered(
        &self,
        table: &str,
        eq: &[(usize, Value)],
        order: &[(usize, Direction)],
        cursor: Option<(&[Value], bool)>,
        limit: usize,
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        let rows = self.inner.fetch_ordered(table, eq, order, cursor, limit)?;
        if let Some(rows) = &rows {
            let mut conditions = self.eq_conditions(table, eq);
            if let Some((_, inclusive)) = cursor {
                conditions.push(format!("(cursor) {} ?", if inclusive { ">=" } else { ">" }));
            }
            let order: Vec<String> = order
                .iter()
                .map(|(i, d)| {
                    let dir = match d {
                        Direction::Asc => "ASC",
                        Direction::Desc => "DESC",
                    };
                    format!("{} {dir}", self.column(table, *i))
                })
                .collect();
            let tail = format!(" ORDER BY {} LIMIT ?", order.join(", "));
            let statement = self.statement(table, conditions, &tail);
            self.note(table, statement, rows);
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cvr::QueryRows;
    use crate::protocol::cookie::Version;
    use crate::zql::schema::{ColumnKind, ColumnSpec};

    #[test]
    fn digest_json_is_compression_then_mean_weight_pairs() {
        let mut d = TDigest::default();
        assert_eq!(d.to_json(), json!([1000]));
        d.add(0.88);
        d.add(0.61);
        d.add(0.61);
        d.add(f64::NAN);
        d.add(f64::INFINITY);
        assert_eq!(d.to_json(), json!([1000, 0.61, 2, 0.88, 1]));
        assert_eq!(d.count(), 3.0);
    }

    #[test]
    fn digest_stays_bounded_and_keeps_count_and_mean() {
        let mut d = TDigest::default();
        let mut sum = 0.0;
        // A spread of distinct values, out of order.
        for i in 0..10_000u32 {
            let x = f64::from((i * 7919) % 10_000) / 10.0;
            sum += x;
            d.add(x);
        }
        let c = d.centroids();
        assert_eq!(c.len(), TDIGEST_CENTROIDS_MAX);
        assert!(c.windows(2).all(|w| w[0].0 < w[1].0), "sorted by mean");
        assert_eq!(d.count(), 10_000.0);
        let weighted: f64 = c.iter().map(|&(m, w)| m * w).sum();
        assert!((weighted - sum).abs() < 1e-6 * sum, "{weighted} vs {sum}");
        // The extremes stay at the ends.
        assert!(c[0].0 < 100.0 && c[c.len() - 1].0 > 900.0, "{c:?}");
        assert_eq!(d.to_json().as_array().map(Vec::len), Some(201));
    }

    #[test]
    fn digest_merges_the_closest_pair() {
        let mut d = TDigest::default();
        for i in 0..TDIGEST_CENTROIDS_MAX {
            d.add(i as f64 * 10.0);
        }
        d.add(500.5); // 0.5 from 500: those two merge
        assert_eq!(d.centroids().len(), TDIGEST_CENTROIDS_MAX);
        assert!(
            d.centroids().contains(&(500.25, 2.0)),
            "{:?}",
            d.centroids()
        );
    }

    #[test]
    fn numbers_print_as_javascript_does() {
        assert_eq!(number(1.0).to_string(), "1");
        assert_eq!(number(0.95).to_string(), "0.95");
        assert_eq!(number(f64::NAN), Json::Null);
    }

    #[test]
    fn admin_password_rules() {
        assert!(admin_password_valid(Some("pw"), Some("pw"), false));
        assert!(!admin_password_valid(Some("pw"), Some("pX"), false));
        assert!(!admin_password_valid(Some("pw"), Some("pw2"), false));
        assert!(!admin_password_valid(Some("pw"), Some("p"), false));
        assert!(!admin_password_valid(Some("pw"), None, false));
        assert!(
            !admin_password_valid(Some("pw"), None, true),
            "dev needs it too when set"
        );
        assert!(!admin_password_valid(None, Some("pw"), false));
        assert!(!admin_password_valid(None, Some("pw"), true));
        assert!(!admin_password_valid(None, None, false));
        assert!(
            admin_password_valid(None, None, true),
            "dev mode, no password"
        );
        assert!(
            admin_password_valid(Some(""), Some(""), true),
            "empty is none"
        );
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b"b"));
    }

    fn spec() -> Rc<TableSpec> {
        Rc::new(TableSpec {
            name: "issue".into(),
            columns: vec![
                ColumnSpec {
                    name: "id".into(),
                    kind: ColumnKind::String,
                    pg_type_oid: 25,
                },
                ColumnSpec {
                    name: "n".into(),
                    kind: ColumnKind::Number,
                    pg_type_oid: 20,
                },
            ],
            primary_key: vec![0],
        })
    }

    fn rows(ids: &[&str]) -> QueryRows {
        ids.iter()
            .map(|id| {
                let row = vec![Value::Text(id.to_string()), Value::Int(1)];
                (
                    crate::zql::RowKey::new("issue", format!("{{\"id\":\"{id}\"}}")),
                    crate::cvr::RowData::new(spec(), row),
                )
            })
            .collect()
    }

    #[test]
    fn query_rows_list_desires_by_client_then_hash_without_expired_ones() {
        let mut cvr = Cvr::new("g");
        let at = cvr.next_config_version();
        let legacy = json!({"table": "issue"});
        cvr.put_desired("c2", "qa", QuerySpec::Ast(legacy.clone()), None, at);
        let named = QuerySpec::Named {
            name: "byId".into(),
            args: vec![json!({"id": "i1"})],
        };
        cvr.put_desired("c1", "qn", named.clone(), Some(1000.0), at);
        cvr.put_desired("c1", "qa", QuerySpec::Ast(legacy.clone()), Some(50.0), at);
        let data = cvr.next_data_version(1);
        cvr.set_query_rows("qa", &rows(&["i1", "i2"]), data);
        cvr.version = data;
        // c1 drops qa (TTL 50 ms) and qn (TTL 1 s); 100 ms later only qn's desire is left.
        let at = Version {
            config: data.config + 1,
            ..data
        };
        cvr.del_desired("c1", "qa", at);
        cvr.del_desired("c1", "qn", at);
        cvr.advance_ttl_clock(100);

        let server_ast = |h: &str| (h == "qn").then(|| json!({"table": "server"}));
        let metrics = |h: &str| {
            if h == "qa" {
                json!({"query-hydration-server-ms": 1.5})
            } else {
                Json::Null
            }
        };
        let all = query_rows(&cvr, None, &server_ast, &metrics);
        let keys: Vec<(&str, &str)> = all
            .iter()
            .map(|r| {
                (
                    r["clientID"].as_str().unwrap_or(""),
                    r["queryID"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(keys, vec![("c1", "qn"), ("c2", "qa")]);
        assert_eq!(
            all[0],
            json!({"clientID": "c1", "queryID": "qn", "ttl": 1000, "inactivatedAt": 0,
                   "rowCount": 0, "ast": {"table": "server"}, "got": false, "deleted": false,
                   "name": "byId", "args": [{"id": "i1"}], "metrics": null})
        );
        assert_eq!(
            all[1],
            json!({"clientID": "c2", "queryID": "qa", "ttl": 300000, "inactivatedAt": null,
                   "rowCount": 2, "ast": legacy, "got": true, "deleted": false,
                   "name": null, "args": null, "metrics": {"query-hydration-server-ms": 1.5}})
        );
        let c2 = query_rows(&cvr, Some("c2"), &server_ast, &metrics);
        assert_eq!(c2.len(), 1);
        assert_eq!(c2[0]["clientID"], "c2");
        assert!(query_rows(&cvr, Some("nobody"), &server_ast, &metrics).is_empty());
    }

    #[test]
    fn group_timings_shape_per_protocol_and_are_pruned() {
        let g = GroupInspect::default();
        let mut cvr = Cvr::new("g");
        let at = cvr.next_config_version();
        cvr.put_desired(
            "c",
            "q1",
            QuerySpec::Ast(json!({"table": "issue"})),
            None,
            at,
        );
        g.timings_of(&cvr, "q1", |t| t.hydration_ms = Some(2.5));
        g.timings_of(&cvr, "q1", |t| t.update.add(0.5));
        assert_eq!(
            g.metrics_json("q1", 51),
            json!({"query-hydration-server-ms": 2.5, "query-update-server": [1000, 0.5, 1]})
        );
        assert_eq!(
            g.metrics_json("q1", 49),
            json!({"query-materialization-server": [1000, 2.5, 1], "query-update-server": [1000, 0.5, 1]})
        );
        assert_eq!(g.metrics_json("other", 51), Json::Null);
        // Timings of queries the CVR does not hold go, at the latest once the map outgrows it.
        for i in 0..100 {
            g.timings_of(&cvr, &format!("gone{i}"), |t| t.update.add(1.0));
        }
        assert!(g.queries.borrow().len() <= 2 * cvr.queries.len() + QUERY_TIMINGS_SLACK + 1);
        assert!(g.queries.borrow().contains_key("q1"));
        g.prune(&cvr);
        assert_eq!(g.queries.borrow().len(), 1);
    }
}
