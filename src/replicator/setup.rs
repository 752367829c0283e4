//! Upstream set-up, as zero-cache does it (zero-protocol.md §5), so the app server's helpers
//! (`@rocicorp/zero/server`) find the `{app}_{shard}` schema they write lmids and results to.

use crate::config::Config;
use crate::pgrepl::{PgConn, PgError};
use futures_lite::io::{AsyncRead, AsyncWrite};

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn public_publication(cfg: &Config) -> String {
    format!("_{}_public_{}", cfg.app_id, cfg.shard_num)
}

pub fn metadata_publication(cfg: &Config) -> String {
    format!("_{}_metadata_{}", cfg.app_id, cfg.shard_num)
}

/// The publications zcache streams: the app's (or its own over `public`) plus metadata.
pub fn publications(cfg: &Config) -> Vec<String> {
    let mut pubs = if cfg.app_publications.is_empty() {
        vec![public_publication(cfg)]
    } else {
        cfg.app_publications.clone()
    };
    pubs.push(metadata_publication(cfg));
    pubs
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream Postgres has wal_level={0}: set wal_level = logical in postgresql.conf and restart Postgres")]
    WalLevel(String),
    #[error("upstream set-up failed: {0}")]
    Pg(#[from] PgError),
}

/// Checks what zcache needs of the upstream server.
pub async fn check_upstream<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<S>,
) -> Result<(), SetupError> {
    let rows = conn.simple_query("SHOW wal_level").await?;
    let level = rows
        .first()
        .and_then(|r| r.rows.first())
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_default();
    if level != "logical" {
        return Err(SetupError::WalLevel(level));
    }
    Ok(())
}

/// Creates the app and shard schemas, their tables and the publications, if missing.
pub async fn ensure_shard_schema<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<S>,
    cfg: &Config,
) -> Result<(), SetupError> {
    let app = quote_ident(&cfg.app_id);
    let shard = quote_ident(&cfg.shard_schema());
    let pubs_literal = quote_literal(&format!("{{{}}}", publications(cfg).join(",")));
    let sql = format!(
        r#"
CREATE SCHEMA IF NOT EXISTS {app};
CREATE TABLE IF NOT EXISTS {app}.permissions (
  permissions JSONB, hash TEXT, lock BOOL PRIMARY KEY DEFAULT true CHECK (lock));
CREATE OR REPLACE FUNCTION {app}.set_permissions_hash() RETURNS TRIGGER AS $$
BEGIN NEW.hash = md5(NEW.permissions::text); RETURN NEW; END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS on_set_permissions ON {app}.permissions;
CREATE TRIGGER on_set_permissions BEFORE INSERT OR UPDATE ON {app}.permissions
  FOR EACH ROW EXECUTE FUNCTION {app}.set_permissions_hash();
INSERT INTO {app}.permissions (permissions) VALUES (NULL) ON CONFLICT DO NOTHING;
CREATE SCHEMA IF NOT EXISTS {shard};
CREATE TABLE IF NOT EXISTS {shard}.clients (
  "clientGroupID" TEXT NOT NULL, "clientID" TEXT NOT NULL, "lastMutationID" BIGINT NOT NULL,
  "userID" TEXT, PRIMARY KEY ("clientGroupID", "clientID"));
CREATE TABLE IF NOT EXISTS {shard}.mutations (
  "clientGroupID" TEXT NOT NULL, "clientID" TEXT NOT NULL, "mutationID" BIGINT NOT NULL,
  "result" JSON NOT NULL, PRIMARY KEY ("clientGroupID", "clientID", "mutationID"));
CREATE TABLE IF NOT EXISTS {shard}."shardConfig" (
  publications TEXT[] NOT NULL, "ddlDetection" BOOL NOT NULL,
  lock BOOL PRIMARY KEY DEFAULT true CHECK (lock));
INSERT INTO {shard}."shardConfig" (publications, "ddlDetection") VALUES ({pubs_literal}, false)
  ON CONFLICT (lock) DO UPDATE SET publications = EXCLUDED.publications;
"#
    );
    conn.execute(&sql).await?;
    let existing = conn
        .simple_query("SELECT pubname FROM pg_publication")
        .await?
        .into_iter()
        .flat_map(|r| r.rows)
        .filter_map(|r| r.into_iter().next().flatten())
        .collect::<Vec<String>>();
    let public = public_publication(cfg);
    if cfg.app_publications.is_empty() && !existing.contains(&public) {
        conn.execute(&format!(
            "CREATE PUBLICATION {} FOR TABLES IN SCHEMA public WITH (publish_via_partition_root = true)",
            quote_ident(&public)
        ))
        .await?;
    }
    let metadata = metadata_publication(cfg);
    if !existing.contains(&metadata) {
        conn.execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {app}.permissions, {shard}.clients, {shard}.mutations",
            quote_ident(&metadata)
        ))
        .await?;
    }
    Ok(())
}
