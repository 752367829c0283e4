//! Client view records in Postgres (`--cvr-db`, default the upstream database), so that a
//! client reconnecting with its cookie gets a diff also after zcache restarts.
//!
//! zcache keeps its own layout, in schema `"{app}_{shard}/zcvr"` beside zero-cache's
//! `"{app}_{shard}/cvr"` (zero-protocol.md allows it: only the observable semantics matter):
//! - `instances`: one row per client group, its version (a cookie), its configuration
//!   (clients, desires, queries, query tombstones, lmids, mutation results) as one JSON
//!   document written whole when it changed, and `digestsAt`: the version up to which the
//!   stored row digests are those of the contents sent;
//! - `rows`: one row per row record, with its patch version, the queries that reach it (an
//!   empty list is a tombstone, kept so that any older cookie can be diffed) and a digest
//!   of the contents last sent. Contents are never stored: they come from the replica. A
//!   record whose contents alone changed is written in its group's turn (within
//!   `CONTENTS_FLUSH_INTERVAL_MS`), not at each poke; a group loaded with `digestsAt`
//!   behind its version sends its live rows again.
//!
//! Writes are batches built on the shard (`Cvr::take_flush`) and sent by a background task
//! (`shards::flush`), off the path that pokes clients.

use super::StoredRow;
use crate::pgrepl::{ConnConfig, PgError, Session};
use std::fmt::Write as _;

/// Row records per INSERT statement: statements stay well under Postgres's message limits.
pub const ROWS_PER_STATEMENT_MAX: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("CVR database: {0}")]
    Pg(#[from] PgError),
    #[error("CVR database: stored record of client group {group} is unreadable: {reason}")]
    Corrupt { group: String, reason: String },
    #[error("CVR database: a value holds a NUL character, which Postgres text cannot store")]
    Nul,
    #[error("CVR database: the shard's store is closed: {0}")]
    Closed(String),
}

/// One client group's writes: its version, its configuration when it changed (None: the
/// stored one holds), and the row records that changed since the last flush.
#[derive(Debug, Clone, PartialEq)]
pub struct FlushBatch {
    pub group: String,
    pub version: String,
    /// The version up to which the stored row digests are those of the contents sent
    /// (row writes of contents alone are deferred: `Cvr::take_flush`).
    pub digests_at: String,
    pub config: Option<String>,
    pub rows: Vec<StoredRow>,
}

/// What `load` found for a client group.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub version: String,
    /// None: written by a zcache that wrote every row change (the digests are exact).
    pub digests_at: Option<String>,
    pub config: String,
    pub rows: Vec<StoredRow>,
}

pub struct CvrStore {
    session: Session,
    schema: String,
}

impl CvrStore {
    /// `schema` is the shard schema (`{app}_{shard}`); the store's own is `"{schema}/zcvr"`.
    pub fn new(cfg: ConnConfig, shard_schema: &str) -> Self {
        CvrStore {
            session: Session::new(cfg),
            schema: quote_ident(&format!("{shard_schema}/zcvr")),
        }
    }

    /// Creates the schema and tables when missing. Run once at start-up, before serving.
    pub async fn migrate(&mut self) -> Result<(), StoreError> {
        let s = &self.schema;
        // One implicit transaction; the lock keeps shards migrating at once from racing
        // on CREATE SCHEMA's catalog row.
        let sql = format!(
            "SELECT pg_advisory_xact_lock(hashtext('zcache cvr migration'));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.instances (
               \"clientGroupID\" TEXT PRIMARY KEY,
               version TEXT NOT NULL,
               config JSONB NOT NULL,
               \"lastActive\" TIMESTAMPTZ NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {s}.rows (
               \"clientGroupID\" TEXT NOT NULL,
               \"table\" TEXT NOT NULL,
               \"rowKey\" TEXT NOT NULL,
               \"patchVersion\" TEXT NOT NULL,
               queries JSONB NOT NULL,
               digest BIGINT,
               PRIMARY KEY (\"clientGroupID\", \"table\", \"rowKey\"));
             ALTER TABLE {s}.instances ADD COLUMN IF NOT EXISTS \"digestsAt\" TEXT;"
        );
        self.run(&sql).await.map(drop)
    }

    /// The stored record of `group`, or None for a group this database never saw.
    pub async fn load(&mut self, group: &str) -> Result<Option<Loaded>, StoreError> {
        let s = &self.schema;
        let g = literal(group)?;
        let sql = format!(
            "SELECT version, config::text, \"digestsAt\" FROM {s}.instances
               WHERE \"clientGroupID\" = {g};
             SELECT \"table\", \"rowKey\", \"patchVersion\", queries::text, digest
               FROM {s}.rows WHERE \"clientGroupID\" = {g};"
        );
        let mut results = self.run(&sql).await?.into_iter();
        let (Some(instance), Some(rows)) = (results.next(), results.next()) else {
            return Err(corrupt(
                group,
                "the load returned fewer results than statements",
            ));
        };
        let Some(first) = instance.rows.into_iter().next() else {
            return Ok(None);
        };
        let [Some(version), Some(config), digests_at] = <[Option<String>; 3]>::try_from(first)
            .map_err(|_| corrupt(group, "instance row of the wrong width"))?
        else {
            return Err(corrupt(group, "instance row with nulls"));
        };
        let rows = rows
            .rows
            .into_iter()
            .map(|r| stored_row(group, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Loaded {
            version,
            digests_at,
            config,
            rows,
        }))
    }

    /// Writes batches in one transaction (a multi-statement simple query is one implicit
    /// transaction): a crash leaves every group either before or after its batch.
    pub async fn flush(&mut self, batches: &[FlushBatch]) -> Result<(), StoreError> {
        let mut sql = String::new();
        write_batches(&self.schema, batches, &mut sql)?;
        if sql.is_empty() {
            return Ok(());
        }
        self.run(&sql).await.map(drop)
    }

    /// Runs `sql` on the store's connection, connecting first when there is none. The
    /// connection is taken out for the call and put back only when it is known to be sound:
    /// after success or a server error, not after an I/O failure or a cancelled call.
    async fn run(&mut self, sql: &str) -> Result<Vec<crate::pgrepl::QueryResult>, StoreError> {
        Ok(self.session.simple_query(sql).await?)
    }
}

/// The statements writing `batches`: one per kind of write for all the groups (Postgres
/// parses and plans each statement: one UPDATE per group and one INSERT per group's rows cost
/// it more than the writing, at 10,000 groups a second).
fn write_batches(schema: &str, batches: &[FlushBatch], sql: &mut String) -> Result<(), StoreError> {
    let configured: Vec<(&FlushBatch, &str)> = batches
        .iter()
        .filter_map(|b| Some((b, b.config.as_deref()?)))
        .collect();
    if !configured.is_empty() {
        let _ = write!(sql, "INSERT INTO {schema}.instances VALUES ");
        for (i, (b, config)) in configured.iter().enumerate() {
            sql.push_str(if i == 0 { "(" } else { ",(" });
            push_literal(sql, &b.group)?;
            sql.push(',');
            push_literal(sql, &b.version)?;
            sql.push(',');
            push_literal(sql, config)?;
            sql.push_str("::jsonb,now(),");
            push_literal(sql, &b.digests_at)?;
            sql.push(')');
        }
        sql.push_str(
            " ON CONFLICT (\"clientGroupID\") DO UPDATE SET
               version = EXCLUDED.version, config = EXCLUDED.config,
               \"lastActive\" = EXCLUDED.\"lastActive\", \"digestsAt\" = EXCLUDED.\"digestsAt\";",
        );
    }
    let moved: Vec<&FlushBatch> = batches.iter().filter(|b| b.config.is_none()).collect();
    if !moved.is_empty() {
        let _ = write!(
            sql,
            "UPDATE {schema}.instances AS i SET version = v.version, \"lastActive\" = now(),
               \"digestsAt\" = v.digests FROM (VALUES "
        );
        for (i, b) in moved.iter().enumerate() {
            sql.push_str(if i == 0 { "(" } else { ",(" });
            push_literal(sql, &b.group)?;
            sql.push(',');
            push_literal(sql, &b.version)?;
            sql.push(',');
            push_literal(sql, &b.digests_at)?;
            sql.push(')');
        }
        sql.push_str(") AS v(id, version, digests) WHERE i.\"clientGroupID\" = v.id;");
    }
    let rows: Vec<(&str, &StoredRow)> = batches
        .iter()
        .flat_map(|b| b.rows.iter().map(|r| (b.group.as_str(), r)))
        .collect();
    // Columns as arrays, not a VALUES list: Postgres parses an array literal for a fraction
    // of what a row of literals costs it (half the time of the whole INSERT, measured).
    let mut scratch = String::new();
    let mut queries: Vec<String> = Vec::new();
    for chunk in rows.chunks(ROWS_PER_STATEMENT_MAX) {
        let _ = write!(
            sql,
            "INSERT INTO {schema}.rows SELECT g, t, k, p, q::jsonb, d FROM unnest("
        );
        push_text_array(sql, &mut scratch, chunk.iter().map(|(g, _)| *g))?;
        push_text_array(
            sql,
            &mut scratch,
            chunk.iter().map(|(_, r)| r.table.as_str()),
        )?;
        push_text_array(sql, &mut scratch, chunk.iter().map(|(_, r)| r.key.as_str()))?;
        push_text_array(
            sql,
            &mut scratch,
            chunk.iter().map(|(_, r)| r.patch.as_str()),
        )?;
        queries.clear();
        queries.extend(chunk.iter().map(|(_, r)| queries_json(&r.queries)));
        push_text_array(sql, &mut scratch, queries.iter().map(String::as_str))?;
        sql.push('\'');
        for (i, (_, r)) in chunk.iter().enumerate() {
            sql.push(if i == 0 { '{' } else { ',' });
            match r.digest {
                // u64 digests go through BIGINT as their two's complement.
                Some(d) => {
                    let _ = write!(sql, "{}", d as i64);
                }
                None => sql.push_str("NULL"),
            }
        }
        debug_assert!(!chunk.is_empty(), "chunks are never empty");
        sql.push_str("}'");
        sql.push_str(
            "::bigint[]) AS u(g, t, k, p, q, d)
             ON CONFLICT (\"clientGroupID\", \"table\", \"rowKey\") DO UPDATE SET
               \"patchVersion\" = EXCLUDED.\"patchVersion\", queries = EXCLUDED.queries,
               digest = EXCLUDED.digest;",
        );
    }
    Ok(())
}

fn stored_row(group: &str, r: Vec<Option<String>>) -> Result<StoredRow, StoreError> {
    let [Some(table), Some(key), Some(patch), Some(queries), digest] =
        <[Option<String>; 5]>::try_from(r).map_err(|_| corrupt(group, "row of the wrong width"))?
    else {
        return Err(corrupt(group, "row record with nulls"));
    };
    let queries: Vec<String> =
        serde_json::from_str(&queries).map_err(|e| corrupt(group, &format!("row queries: {e}")))?;
    let digest = match digest {
        Some(d) => Some(
            d.parse::<i64>()
                .map_err(|e| corrupt(group, &format!("row digest: {e}")))? as u64,
        ),
        None => None,
    };
    Ok(StoredRow {
        table,
        key,
        patch,
        queries,
        digest,
    })
}

fn corrupt(group: &str, reason: &str) -> StoreError {
    StoreError::Corrupt {
        group: group.to_string(),
        reason: reason.to_string(),
    }
}

/// A SQL string literal (standard_conforming_strings on: only quotes are special).
fn literal(s: &str) -> Result<String, StoreError> {
    let mut out = String::with_capacity(s.len() + 2);
    push_literal(&mut out, s)?;
    Ok(out)
}

/// Appends `s` as a SQL string literal, without allocating (a flush writes thousands).
/// A row record's queries as a JSON array (hashes come from clients: escaped as any JSON
/// string).
fn queries_json(queries: &[String]) -> String {
    let mut json = String::from("[");
    for (j, q) in queries.iter().enumerate() {
        if j > 0 {
            json.push(',');
        }
        crate::zql::value::write_json_string(q, &mut json);
    }
    json.push(']');
    json
}

/// `'{"a","b"}'::text[],`: every element quoted, `"` and `\` escaped inside the array
/// literal, then the literal quoted as any string.
fn push_text_array<'a>(
    sql: &mut String,
    scratch: &mut String,
    items: impl Iterator<Item = &'a str>,
) -> Result<(), StoreError> {
    scratch.clear();
    scratch.push('{');
    for (i, item) in items.enumerate() {
        if i > 0 {
            scratch.push(',');
        }
        scratch.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                scratch.push('\\');
            }
            scratch.push(c);
        }
        scratch.push('"');
    }
    scratch.push('}');
    push_literal(sql, scratch)?;
    sql.push_str("::text[],");
    Ok(())
}

fn push_literal(sql: &mut String, s: &str) -> Result<(), StoreError> {
    if s.contains('\0') {
        return Err(StoreError::Nul);
    }
    sql.reserve(s.len() + 2);
    sql.push('\'');
    let mut rest = s;
    while let Some(i) = rest.find('\'') {
        sql.push_str(&rest[..=i]);
        sql.push('\'');
        rest = &rest[i + 1..];
    }
    sql.push_str(rest);
    sql.push('\'');
    Ok(())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_double_quotes_and_refuse_nul() {
        assert_eq!(literal("it's").ok().as_deref(), Some("'it''s'"));
        assert!(matches!(literal("a\0b"), Err(StoreError::Nul)));
        assert_eq!(quote_ident("z_0/zcvr"), "\"z_0/zcvr\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn batches_are_one_statement_per_kind_of_write() {
        let rows = |g: usize| -> Vec<StoredRow> {
            (0..ROWS_PER_STATEMENT_MAX)
                .map(|i| StoredRow {
                    table: "issue".into(),
                    key: format!("{{\"id\":\"g{g}i{i}\"}}"),
                    patch: "0a".into(),
                    queries: if i == 1 {
                        vec!["q\"1".into()]
                    } else {
                        vec!["q1".into()]
                    },
                    digest: if i == 0 { None } else { Some(u64::MAX) },
                })
                .collect()
        };
        let batch = |g: usize, config: Option<&str>| FlushBatch {
            group: format!("g'{g}"),
            version: format!("0a:0{g}"),
            digests_at: "0a".into(),
            config: config.map(str::to_string),
            rows: rows(g),
        };
        let batches = [
            batch(1, Some("{}")),
            batch(2, None),
            batch(3, Some("{\"a\":1}")),
        ];
        let mut sql = String::new();
        write_batches("\"s\"", &batches, &mut sql).expect("batches");
        assert_eq!(sql.matches("INSERT INTO \"s\".instances").count(), 1);
        assert_eq!(sql.matches("UPDATE \"s\".instances").count(), 1);
        assert!(sql.contains("('g''2','0a:02','0a')"), "{}", &sql[..400]);
        // 3,000 rows in statements of at most ROWS_PER_STATEMENT_MAX.
        assert_eq!(sql.matches("INSERT INTO \"s\".rows").count(), 3);
        // One array element per row; the group once more in the instances' INSERT.
        assert_eq!(sql.matches("\"g''3\"").count(), ROWS_PER_STATEMENT_MAX);
        assert_eq!(sql.matches("'g''3'").count(), 1);
        // u64 digests go through BIGINT as their two's complement; hashes are JSON-escaped,
        // then escaped as array elements (tests/cvr_store.rs reads them back from Postgres).
        assert!(sql.contains("'{NULL,-1,-1"));
        assert!(sql.contains(r#""[\"q\\\"1\"]""#), "{}", &sql[..2000]);
        let mut sql = String::new();
        write_batches("\"s\"", &batches[1..2], &mut sql).expect("batches");
        assert!(!sql.contains("INSERT INTO \"s\".instances"));
    }
}
