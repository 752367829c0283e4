//! The change DB (`ZERO_CHANGE_DB`): the replication-manager's log of committed changes and
//! its replication state, in zero-cache 1.9.0's schema `"{app}_{shard}/cdc"`
//! (multi-node.md §3.1; `change-streamer/schema/tables.ts`), so that either server can take
//! the log over from the other.
//!
//! So far: the tables, created as zero-cache creates them, the replication state, and
//! transactions appended by the log's owner and read back as the stream's messages. Purging
//! and the subscriptions come with the endpoint.

use super::protocol::Downstream;
use crate::pgrepl::{ConnConfig, PgError, Session};
use crate::replicator::setup::quote_literal;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ChangeDbError {
    #[error("change DB: {0}")]
    Pg(#[from] PgError),
    #[error("change DB: {0}")]
    Corrupt(String),
    /// Another replication-manager took the log over (zero-cache's ownership check).
    #[error("change DB: the log is owned by {0:?} now")]
    NotOwner(Option<String>),
}

/// One committed transaction as the log keeps it: the change objects of its begin, its data
/// and its commit (element 2 of each stream message), all at its commit watermark.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedTransaction {
    pub watermark: String,
    pub begin: Value,
    pub changes: Vec<Value>,
    pub commit: Value,
}

/// The replication state row (`replicationState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationState {
    pub last_watermark: String,
    pub owner: Option<String>,
    pub owner_address: Option<String>,
}

pub struct ChangeDb {
    session: Session,
    /// `"{app}_{shard}/cdc"`, quoted.
    schema: String,
}

impl ChangeDb {
    /// `shard_schema` is `{app}_{shard}` (e.g. `zero_0`).
    pub fn new(cfg: ConnConfig, shard_schema: &str) -> Self {
        ChangeDb {
            session: Session::new(cfg),
            schema: format!("\"{}\"", format!("{shard_schema}/cdc").replace('"', "\"\"")),
        }
    }

    /// Creates the schema and tables when missing, as zero-cache 1.9.0 has them.
    pub async fn migrate(&mut self) -> Result<(), ChangeDbError> {
        let s = &self.schema;
        let sql = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('zcache change db migration'));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.\"changeLog\" (
               watermark TEXT, pos INT8, change JSON NOT NULL, precommit TEXT,
               PRIMARY KEY (watermark, pos));
             CREATE TABLE IF NOT EXISTS {s}.\"replicationState\" (
               \"lastWatermark\" TEXT NOT NULL, owner TEXT, \"ownerAddress\" TEXT,
               lock INTEGER PRIMARY KEY DEFAULT 1 CHECK (lock = 1));
             CREATE TABLE IF NOT EXISTS {s}.\"replicationConfig\" (
               \"replicaVersion\" TEXT NOT NULL, publications TEXT[] NOT NULL,
               \"resetRequired\" BOOL,
               lock INTEGER PRIMARY KEY DEFAULT 1 CHECK (lock = 1));
             CREATE TABLE IF NOT EXISTS {s}.\"tableMetadata\" (
               schema TEXT, \"table\" TEXT, metadata JSONB NOT NULL,
               PRIMARY KEY (schema, \"table\"));
             CREATE TABLE IF NOT EXISTS {s}.backfilling (
               schema TEXT, \"table\" TEXT, \"column\" TEXT, backfill JSONB NOT NULL,
               PRIMARY KEY (schema, \"table\", \"column\"));
             CREATE TABLE IF NOT EXISTS {s}.\"versionHistory\" (
               \"dataVersion\" INTEGER NOT NULL, \"schemaVersion\" INTEGER NOT NULL,
               \"minSafeVersion\" INTEGER NOT NULL,
               lock CHAR(1) NOT NULL DEFAULT 'v' CHECK (lock = 'v'), PRIMARY KEY (lock));
             COMMIT;"
        );
        self.run(&sql).await.map(drop)
    }

    /// The replication state, or None before a replication-manager wrote one.
    pub async fn state(&mut self) -> Result<Option<ReplicationState>, ChangeDbError> {
        let sql = format!(
            "SELECT \"lastWatermark\", owner, \"ownerAddress\" FROM {}.\"replicationState\"",
            self.schema
        );
        let results = self.run(&sql).await?;
        let Some(row) = results
            .into_iter()
            .next()
            .and_then(|r| r.rows.into_iter().next())
        else {
            return Ok(None);
        };
        let [Some(last_watermark), owner, owner_address] = <[Option<String>; 3]>::try_from(row)
            .map_err(|_| ChangeDbError::Corrupt("replicationState of the wrong width".into()))?
        else {
            return Err(ChangeDbError::Corrupt(
                "replicationState without lastWatermark".into(),
            ));
        };
        Ok(Some(ReplicationState {
            last_watermark,
            owner,
            owner_address,
        }))
    }

    /// Appends `tx` for the log's owner `owner`: its rows at positions 0 (begin) to n + 1
    /// (commit), and `lastWatermark` moved to it, in one transaction that is rolled back if
    /// the log has another owner.
    pub async fn append(
        &mut self,
        owner: &str,
        tx: &LoggedTransaction,
    ) -> Result<(), ChangeDbError> {
        let s = &self.schema;
        let w = quote_literal(&tx.watermark);
        let rows: Vec<String> = std::iter::once(&tx.begin)
            .chain(&tx.changes)
            .chain(std::iter::once(&tx.commit))
            .enumerate()
            .map(|(pos, change)| {
                format!("({w},{pos},{}::json)", quote_literal(&change.to_string()))
            })
            .collect();
        let sql = format!(
            "BEGIN;
             SELECT owner FROM {s}.\"replicationState\" FOR UPDATE;
             INSERT INTO {s}.\"changeLog\" (watermark, pos, change) VALUES {};
             UPDATE {s}.\"replicationState\" SET \"lastWatermark\" = {w}
               WHERE owner = {} RETURNING owner;",
            rows.join(","),
            quote_literal(owner)
        );
        let results = self.run(&sql).await;
        let updated = match &results {
            Ok(r) => r.last().is_some_and(|u| !u.rows.is_empty()),
            Err(_) => false,
        };
        let end = if updated { "COMMIT" } else { "ROLLBACK" };
        let ended = self.run(end).await;
        let results = results?;
        ended?;
        if !updated {
            let owner = results
                .get(1)
                .and_then(|r| r.rows.first())
                .and_then(|row| row.first().cloned().flatten());
            return Err(ChangeDbError::NotOwner(owner));
        }
        Ok(())
    }

    /// Up to `limit` logged rows after position `after` (a watermark and a position), as
    /// the stream's messages, each with its watermark and position.
    pub async fn read_after(
        &mut self,
        after: (&str, i64),
        limit: usize,
    ) -> Result<Vec<(String, i64, Downstream)>, ChangeDbError> {
        let sql = format!(
            "SELECT watermark, pos::text, change::text FROM {}.\"changeLog\"
               WHERE (watermark, pos) > ({}, {}) ORDER BY watermark, pos LIMIT {limit}",
            self.schema,
            quote_literal(after.0),
            after.1
        );
        let results = self.run(&sql).await?;
        let rows = results
            .into_iter()
            .next()
            .map(|r| r.rows)
            .unwrap_or_default();
        rows.into_iter().map(logged_message).collect()
    }

    async fn run(&mut self, sql: &str) -> Result<Vec<crate::pgrepl::QueryResult>, ChangeDbError> {
        Ok(self.session.simple_query(sql).await?)
    }
}

/// A log row as the stream's message: zero-cache keeps only the change object and rebuilds
/// `["begin",c,{"commitWatermark":w}]`, `["commit",c,{"watermark":w}]` and `["data",c]`.
fn logged_message(row: Vec<Option<String>>) -> Result<(String, i64, Downstream), ChangeDbError> {
    let corrupt = |what: &str| ChangeDbError::Corrupt(format!("changeLog row: {what}"));
    let [Some(watermark), Some(pos), Some(change)] =
        <[Option<String>; 3]>::try_from(row).map_err(|_| corrupt("wrong width"))?
    else {
        return Err(corrupt("nulls"));
    };
    let pos: i64 = pos.parse().map_err(|_| corrupt("pos"))?;
    let change: Value = serde_json::from_str(&change).map_err(|e| corrupt(&e.to_string()))?;
    let message = match change.get("tag").and_then(Value::as_str) {
        Some("begin") => json!(["begin", change, {"commitWatermark": watermark}]),
        Some("commit") => json!(["commit", change, {"watermark": watermark}]),
        _ => json!(["data", change]),
    };
    let message = Downstream::from_json(&message).map_err(|e| corrupt(&e.to_string()))?;
    Ok((watermark, pos, message))
}
