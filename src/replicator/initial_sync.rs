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

async fn copy_table<T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<T>,
    replica: &Replica,
    t: &PublishedTable,
) -> Result<u64, ReplError> {
    let cols: Vec<String> = t
        .spec
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let sql = format!(
        "COPY {} ({}) TO STDOUT",
        t.upstream_ident(),
        cols.join(", ")
    );
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
