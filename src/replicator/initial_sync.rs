//! The initial copy: a replication slot with an exported snapshot, then every published
//! table copied under that snapshot into the replica, watermarked with the slot's consistent
//! point, so streaming continues exactly where the copy ends.
//!
//! Tables are copied largest first over several connections that all import the exported
//! snapshot, so Postgres produces rows for several tables at once while the one SQLite writer
//! (this executor) consumes them. Rows go from each COPY message straight into a prepared
//! statement: memory stays bounded by a message and SQLite's page cache, whatever the tables'
//! sizes. The copy runs without journal or syncs (`Replica::begin_bulk_load`); the watermark
//! is committed afterwards in an ordinary durable transaction.

use super::schema::{published_tables, PublishedTable};
use super::setup::quote_ident;
use super::ReplError;
use crate::pgrepl::{connect, ConnConfig, Lsn, PgConn, PgError};
use crate::sqlite::pgbinary::{
    decode_binary_sql, plan_column, BinaryColumn, BinaryCopyError, CopyBinaryDecoder, Tuple,
    UserType,
};
use crate::sqlite::pgtypes::{copy_line_fields, decode_text_sql};
use crate::sqlite::replica::RowWriter;
use crate::sqlite::Replica;
use futures_lite::io::{AsyncRead, AsyncWrite};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Connections copying at once (the snapshot connection included). Postgres formats COPY
/// output in one backend per connection; more than a few only adds contention with the
/// single SQLite writer.
pub const COPY_CONNECTIONS_MAX: usize = 3;
/// How often a table still being copied reports its progress.
pub const PROGRESS_INTERVAL_MS: u64 = 3_000;

pub struct Synced {
    pub slot: String,
    pub watermark: Lsn,
}

/// Slot names: `{app}_{shard}_` then the time, so a re-sync never collides with the old one.
pub fn new_slot_name(app_id: &str, shard_num: u32) -> String {
    let ms = crate::shards::conn::now_ms();
    format!("{app_id}_{shard_num}_{ms}")
}

pub async fn run<S, T>(
    upstream: &ConnConfig,
    repl_conn: &mut PgConn<S>,
    snapshot_conn: &mut PgConn<T>,
    replica: &mut Replica,
    slot: &str,
    publications: &[String],
) -> Result<Synced, ReplError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let created = repl_conn.create_logical_slot(slot, false).await?;
    let snapshot = created
        .snapshot_name
        .ok_or_else(|| PgError::protocol("the slot exported no snapshot"))?;
    let phase = |what: &str| {
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "initial sync: {what}"
        );
    };
    phase("slot created");
    import_snapshot(snapshot_conn, &snapshot).await?;
    let mut tables = published_tables(snapshot_conn, publications).await?;
    tables.sort_by_key(|t| std::cmp::Reverse(t.heap_bytes));
    // The snapshot stays importable while the replication connection that exported it is
    // open and idle, which it is until the copy is over.
    let mut extra = Vec::new();
    for _ in 1..COPY_CONNECTIONS_MAX.min(tables.len()) {
        let mut conn = connect(upstream, false).await?;
        import_snapshot(&mut conn, &snapshot).await?;
        extra.push(conn);
    }
    phase("tables described, connections open");
    replica.begin_bulk_load()?;
    for t in &tables {
        replica.create_table_unkeyed(&t.spec)?;
    }
    let rows_total = copy_tables(snapshot_conn, &mut extra, replica, &tables).await?;
    phase("rows copied");
    for t in &tables {
        replica.create_key_index(&t.spec.name)?;
        for cols in &t.indexes {
            replica.create_index(&t.spec.name, cols)?;
        }
    }
    phase("indexes made");
    replica.end_bulk_load()?;
    phase("copy committed and synced");
    replica.begin()?;
    replica.set_meta("slot", slot)?;
    replica.set_meta("publications", &publications.join(","))?;
    replica.commit(created.consistent_point.0)?;
    snapshot_conn.execute("COMMIT").await?;
    for mut conn in extra {
        conn.execute("COMMIT").await?;
        let _ = conn.close().await;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        rows = rows_total,
        tables = tables.len(),
        ms = (secs * 1000.0) as u64,
        rows_per_s = (rows_total as f64 / secs.max(1e-6)) as u64,
        watermark = %created.consistent_point,
        "initial sync done"
    );
    Ok(Synced {
        slot: slot.to_string(),
        watermark: created.consistent_point,
    })
}

async fn import_snapshot<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    snapshot: &str,
) -> Result<(), PgError> {
    // The name comes from Postgres; refuse anything that could leave the literal.
    if !snapshot
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(PgError::protocol(format!(
            "unexpected snapshot name {snapshot:?}"
        )));
    }
    conn.execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
    ))
    .await
}

type CopyTask<'a> = Pin<Box<dyn Future<Output = Result<u64, ReplError>> + 'a>>;

/// Copies every table, each connection taking the next largest table left; returns the rows.
async fn copy_tables<T, U>(
    first: &mut PgConn<T>,
    extra: &mut [PgConn<U>],
    replica: &Replica,
    tables: &[PublishedTable],
) -> Result<u64, ReplError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let queue: RefCell<VecDeque<&PublishedTable>> = RefCell::new(tables.iter().collect());
    let mut tasks: Vec<Option<CopyTask<'_>>> = Vec::with_capacity(extra.len() + 1);
    tasks.push(Some(Box::pin(copy_worker(first, replica, &queue))));
    for conn in extra.iter_mut() {
        tasks.push(Some(Box::pin(copy_worker(conn, replica, &queue))));
    }
    let mut rows = 0u64;
    futures_lite::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in tasks.iter_mut() {
            let Some(task) = slot else { continue };
            match task.as_mut().poll(cx) {
                Poll::Ready(Ok(n)) => {
                    rows += n;
                    *slot = None;
                }
                // The other copies are dropped with their connections; the caller fails.
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    })
    .await?;
    Ok(rows)
}

async fn copy_worker<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    replica: &Replica,
    queue: &RefCell<VecDeque<&PublishedTable>>,
) -> Result<u64, ReplError> {
    let mut rows = 0;
    loop {
        // Not held across the await below.
        let next = queue.borrow_mut().pop_front();
        let Some(t) = next else { return Ok(rows) };
        rows += copy_table(conn, replica, t).await?;
    }
}

/// A table's copy: its rows so far and when it last reported.
struct Progress<'a> {
    table: &'a PublishedTable,
    started: Instant,
    reported: Instant,
    rows: u64,
}

impl<'a> Progress<'a> {
    fn new(table: &'a PublishedTable) -> Self {
        let now = Instant::now();
        Progress {
            table,
            started: now,
            reported: now,
            rows: 0,
        }
    }

    /// Counts a row; logs now and then. Cheap: the clock is read every 4096 rows.
    #[inline]
    fn row(&mut self) {
        self.rows += 1;
        if !self.rows.is_multiple_of(4096) {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.reported) < Duration::from_millis(PROGRESS_INTERVAL_MS) {
            return;
        }
        self.reported = now;
        let secs = now.duration_since(self.started).as_secs_f64();
        let estimate = self.table.rows_estimate;
        tracing::info!(
            table = %self.table.spec.name,
            rows = self.rows,
            rows_per_s = (self.rows as f64 / secs.max(1e-6)) as u64,
            percent = (estimate > 0).then(|| (self.rows * 100 / estimate).min(100)),
            "initial sync: copying"
        );
    }

    fn done(&self) {
        let secs = self.started.elapsed().as_secs_f64();
        tracing::debug!(
            table = %self.table.spec.name,
            rows = self.rows,
            ms = (secs * 1000.0) as u64,
            rows_per_s = (self.rows as f64 / secs.max(1e-6)) as u64,
            "initial sync: table copied"
        );
    }
}

/// The format a table's rows are copied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Binary,
}

async fn copy_table<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    replica: &Replica,
    t: &PublishedTable,
) -> Result<u64, ReplError> {
    match binary_plan(conn, t).await? {
        Some(plan) => copy_table_binary(conn, replica, t, &plan).await,
        None => {
            tracing::debug!(table = %t.spec.name, "initial sync: text COPY (no binary reading of every column)");
            copy_table_text(conn, replica, t).await
        }
    }
}

/// Copies one table's rows (under the connection's snapshot) into the replica's open
/// transaction, in `format`; binary fails when a column has no binary reading. For tests
/// and benchmarks that compare the two formats: the sync itself picks binary when it can.
pub async fn copy_table_as<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    replica: &Replica,
    t: &PublishedTable,
    format: CopyFormat,
) -> Result<u64, ReplError> {
    match format {
        CopyFormat::Text => copy_table_text(conn, replica, t).await,
        CopyFormat::Binary => match binary_plan(conn, t).await? {
            Some(plan) => copy_table_binary(conn, replica, t, &plan).await,
            None => Err(ReplError::Value(format!(
                "{} has a column without a binary reading",
                t.spec.name
            ))),
        },
    }
}

/// `COPY "schema"."table" ("a", "b") TO STDOUT`, with `options` appended.
fn copy_sql(t: &PublishedTable, options: &str) -> String {
    let cols: Vec<String> = t
        .spec
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    format!(
        "COPY {} ({}) TO STDOUT{options}",
        t.upstream_ident(),
        cols.join(", ")
    )
}

/// How each column of `t` is read from binary COPY, or `None` when one cannot be (the table
/// is then copied in text). Binary values skip the session's text conversions, so binary is
/// used only where those are the identity or known: UTF-8 server encoding (text COPY
/// converts to the client's), ISO dates, UTC. User-defined types are looked up in the
/// catalog: enums (and arrays of them) are read, domains and composites are not.
async fn binary_plan<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    t: &PublishedTable,
) -> Result<Option<Vec<BinaryColumn>>, PgError> {
    let session_ok = conn.parameter("server_encoding") == Some("UTF8")
        && conn.parameter("client_encoding") == Some("UTF8")
        && conn.parameter("TimeZone") == Some("UTC")
        && conn.parameter("integer_datetimes") == Some("on")
        && conn
            .parameter("DateStyle")
            .is_some_and(|s| s.starts_with("ISO"));
    if !session_ok {
        return Ok(None);
    }
    let mut user: Vec<u32> = t
        .spec
        .columns
        .iter()
        .map(|c| c.pg_type_oid)
        .filter(|&o| o >= crate::sqlite::pgtypes::oid::FIRST_USER_OID)
        .collect();
    user.sort_unstable();
    user.dedup();
    let user_types = if user.is_empty() {
        Vec::new()
    } else {
        user_types(conn, &user).await?
    };
    let lookup = |o: u32| {
        user_types
            .iter()
            .find(|(oid, _)| *oid == o)
            .map_or(UserType::Other, |(_, u)| *u)
    };
    Ok(t.spec
        .columns
        .iter()
        .map(|c| plan_column(c.pg_type_oid, c.kind, lookup))
        .collect())
}

/// What the catalog says about these user-defined types.
async fn user_types<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    oids: &[u32],
) -> Result<Vec<(u32, UserType)>, PgError> {
    let list: Vec<String> = oids.iter().map(u32::to_string).collect();
    let sql = format!(
        "SELECT t.oid, t.typtype, t.typcategory, t.typelem, coalesce(e.typtype, '') \
         FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem WHERE t.oid IN ({})",
        list.join(", ")
    );
    let mut out = Vec::new();
    for r in conn
        .simple_query(&sql)
        .await?
        .into_iter()
        .flat_map(|r| r.rows)
    {
        let cell = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let (Ok(oid), Ok(elem_oid)) = (cell(0).parse::<u32>(), cell(3).parse::<u32>()) else {
            continue;
        };
        let kind = if cell(1) == "e" {
            UserType::Enum
        } else if cell(2) == "A" && elem_oid != 0 {
            UserType::ArrayOf {
                elem_oid,
                elem_is_enum: cell(4) == "e",
            }
        } else {
            UserType::Other
        };
        out.push((oid, kind));
    }
    Ok(out)
}

async fn copy_table_text<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    replica: &Replica,
    t: &PublishedTable,
) -> Result<u64, ReplError> {
    let sql = copy_sql(t, "");
    let mut writer = replica.row_writer(&t.spec.name)?;
    let mut progress = Progress::new(t);
    let mut scratch = Vec::new();
    let mut failure: Option<ReplError> = None;
    conn.copy_out(&sql, |line| {
        // After a failure the rest of the output is drained unread.
        if failure.is_some() {
            return Ok(());
        }
        match write_line(&mut writer, t, line, &mut scratch) {
            Ok(()) => progress.row(),
            Err(e) => failure = Some(e),
        }
        Ok(())
    })
    .await?;
    match failure {
        Some(e) => Err(e),
        None => {
            progress.done();
            Ok(progress.rows)
        }
    }
}

async fn copy_table_binary<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    replica: &Replica,
    t: &PublishedTable,
    plan: &[BinaryColumn],
) -> Result<u64, ReplError> {
    debug_assert_eq!(plan.len(), t.spec.columns.len());
    let sql = copy_sql(t, " (FORMAT binary)");
    let mut writer = replica.row_writer(&t.spec.name)?;
    let mut progress = Progress::new(t);
    let mut decoder = CopyBinaryDecoder::new(plan.len());
    let mut scratch = String::new();
    let mut failure: Option<ReplError> = None;
    conn.copy_out(&sql, |chunk| {
        // After a failure the rest of the output is drained unread.
        if failure.is_some() {
            return Ok(());
        }
        let fed = decoder.feed(chunk, |tuple| {
            write_tuple(&mut writer, plan, tuple, &mut scratch)?;
            progress.row();
            Ok::<(), ReplError>(())
        });
        if let Err(e) = fed {
            failure = Some(e);
        }
        Ok(())
    })
    .await?;
    if let Some(e) = failure {
        return Err(e);
    }
    decoder.finish()?;
    progress.done();
    Ok(progress.rows)
}

impl From<BinaryCopyError> for ReplError {
    fn from(e: BinaryCopyError) -> Self {
        ReplError::Pg(PgError::protocol(e.to_string()))
    }
}

/// Decodes one binary COPY tuple straight into the writer's parameters and inserts the row.
#[inline]
fn write_tuple(
    writer: &mut RowWriter<'_>,
    plan: &[BinaryColumn],
    tuple: &Tuple<'_>,
    scratch: &mut String,
) -> Result<(), ReplError> {
    debug_assert_eq!(tuple.len(), plan.len());
    for (i, col) in plan.iter().enumerate() {
        let value = match tuple.field(i) {
            None => rusqlite::types::ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Null),
            Some(raw) => {
                decode_binary_sql(col, raw, scratch).map_err(|e| ReplError::Value(e.to_string()))?
            }
        };
        writer.bind(i, value)?;
    }
    writer.insert()?;
    Ok(())
}

/// Decodes one text COPY line straight into the writer's parameters and inserts the row.
#[inline]
fn write_line(
    writer: &mut RowWriter<'_>,
    t: &PublishedTable,
    line: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), ReplError> {
    let columns = &t.spec.columns;
    let fields = copy_line_fields(
        line,
        scratch,
        |why| ReplError::from(PgError::protocol(why)),
        |i, field| {
            let Some(col) = columns.get(i) else {
                return Ok(()); // counted below
            };
            let value = match field {
                None => rusqlite::types::ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Null),
                Some(text) => decode_text_sql(col.pg_type_oid, col.kind, text)?,
            };
            writer.bind(i, value)?;
            Ok(())
        },
    )?;
    if fields != columns.len() {
        return Err(ReplError::Value(format!(
            "a COPY row of {} has {fields} fields, not {}",
            t.spec.name,
            columns.len()
        )));
    }
    writer.insert()?;
    Ok(())
}
