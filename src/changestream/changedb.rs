//! The change DB (`ZERO_CHANGE_DB`): the replication-manager's log of committed changes and
//! its replication state, in zero-cache 1.9.0's schema `"{app}_{shard}/cdc"`
//! (multi-node.md §3.1; `change-streamer/schema/tables.ts`), so that either server can take
//! the log over from the other.
//!
//! So far: the tables, created as zero-cache creates them, and the replication state read
//! back. Appending, catch-up and purging come with the endpoint.

use crate::pgrepl::{ConnConfig, PgConn, PgError, PgStream};

#[derive(Debug, thiserror::Error)]
pub enum ChangeDbError {
    #[error("change DB: {0}")]
    Pg(#[from] PgError),
    #[error("change DB: {0}")]
    Corrupt(String),
}

/// The replication state row (`replicationState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationState {
    pub last_watermark: String,
    pub owner: Option<String>,
    pub owner_address: Option<String>,
}

pub struct ChangeDb {
    cfg: ConnConfig,
    /// `"{app}_{shard}/cdc"`, quoted.
    schema: String,
    conn: Option<PgConn<PgStream>>,
}

impl ChangeDb {
    /// `shard_schema` is `{app}_{shard}` (e.g. `zero_0`).
    pub fn new(cfg: ConnConfig, shard_schema: &str) -> Self {
        ChangeDb {
            cfg,
            schema: format!("\"{}\"", format!("{shard_schema}/cdc").replace('"', "\"\"")),
            conn: None,
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

    async fn run(&mut self, sql: &str) -> Result<Vec<crate::pgrepl::QueryResult>, ChangeDbError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => crate::pgrepl::connect(&self.cfg, false).await?,
        };
        let result = conn.simple_query(sql).await;
        // A server error leaves the connection usable; an I/O error does not.
        if result
            .as_ref()
            .map_or_else(|e| e.code().is_some(), |_| true)
        {
            self.conn = Some(conn);
        }
        Ok(result?)
    }
}
