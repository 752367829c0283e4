//! The initial copy: a replication slot with an exported snapshot, then every published
//! table copied under that snapshot into the replica in one SQLite transaction, watermarked
//! with the slot's consistent point, so streaming continues exactly where the copy ends.

use super::schema::{published_tables, PublishedTable};
use super::setup::quote_ident;
use super::ReplError;
use crate::pgrepl::{Lsn, PgConn, PgError};
use crate::sqlite::pgtypes::{decode_text, split_copy_line};
use crate::sqlite::Replica;
use crate::zql::value::Value;
use futures_lite::io::{AsyncRead, AsyncWrite};
use std::time::Instant;

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
    snapshot_conn
        .execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await?;
    let tables = published_tables(snapshot_conn, publications).await?;
    replica.begin()?;
    let mut rows_total = 0u64;
    for t in &tables {
        replica.create_table(&t.spec)?;
        rows_total += copy_table(snapshot_conn, replica, t).await?;
    }
    replica.set_meta("slot", slot)?;
    replica.set_meta("publications", &publications.join(","))?;
    replica.commit(created.consistent_point.0)?;
    snapshot_conn.execute("COMMIT").await?;
    for t in &tables {
        for cols in &t.indexes {
            replica.create_index(&t.spec.name, cols)?;
        }
    }
    tracing::info!(
        rows = rows_total,
        tables = tables.len(),
        ms = started.elapsed().as_millis() as u64,
        watermark = %created.consistent_point,
        "initial sync done"
    );
    Ok(Synced {
        slot: slot.to_string(),
        watermark: created.consistent_point,
    })
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
    let mut rows = 0u64;
    let mut failure: Option<ReplError> = None;
    conn.copy_out(&sql, |line| {
        let fields = split_copy_line(line).map_err(PgError::protocol)?;
        let row: Result<Vec<Value>, _> = t
            .spec
            .columns
            .iter()
            .zip(fields)
            .map(|(c, f)| match f {
                None => Ok(Value::Null),
                Some(text) => decode_text(c.pg_type_oid, c.kind, &text),
            })
            .collect();
        match row
            .map_err(ReplError::from)
            .and_then(|r| Ok(replica.upsert(&t.spec.name, &r)?))
        {
            Ok(()) => rows += 1,
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
        Ok(())
    })
    .await?;
    match failure {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}
