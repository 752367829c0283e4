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
    /// On PostgreSQL 15 only a superuser may create a publication `FOR TABLES IN SCHEMA`.
    #[error(
        "cannot create the publication {pub_ident} of schema public: {source}. \
         Creating a publication FOR TABLES IN SCHEMA needs a superuser. Either create a \
         publication of the tables to sync as their owner (CREATE PUBLICATION zero_data FOR \
         TABLE ...) and name it in ZERO_APP_PUBLICATIONS, or have a superuser run once: \
         CREATE PUBLICATION {pub_ident} FOR TABLES IN SCHEMA public WITH \
         (publish_via_partition_root = true)",
        pub_ident = quote_ident(.publication)
    )]
    PublicationPrivilege {
        publication: String,
        #[source]
        source: PgError,
    },
    #[error("upstream set-up failed: {0}")]
    Pg(#[from] PgError),
}

/// SQLSTATE insufficient_privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

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

/// The app schema and its single-row `permissions` table, whose hash a trigger keeps (as
/// zero-cache creates them; `zero-deploy-permissions` updates the row).
pub fn permissions_sql(app_id: &str) -> String {
    let app = quote_ident(app_id);
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS {app};
CREATE TABLE IF NOT EXISTS {app}.permissions (
  permissions JSONB, hash TEXT, lock BOOL PRIMARY KEY DEFAULT true CHECK (lock));
CREATE OR REPLACE FUNCTION {app}.set_permissions_hash() RETURNS TRIGGER AS $$
BEGIN NEW.hash = md5(NEW.permissions::text); RETURN NEW; END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS on_set_permissions ON {app}.permissions;
CREATE TRIGGER on_set_permissions BEFORE INSERT OR UPDATE ON {app}.permissions
  FOR EACH ROW EXECUTE FUNCTION {app}.set_permissions_hash();
INSERT INTO {app}.permissions (permissions) VALUES (NULL) ON CONFLICT DO NOTHING;"#
    )
}

/// Creates the app and shard schemas, their tables and the publications, if missing.
pub async fn ensure_shard_schema<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<S>,
    cfg: &Config,
) -> Result<(), SetupError> {
    let permissions = permissions_sql(&cfg.app_id);
    let shard = quote_ident(&cfg.shard_schema());
    let pubs_literal = quote_literal(&format!("{{{}}}", publications(cfg).join(",")));
    let sql = format!(
        r#"
{permissions}
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
        let created = conn
            .execute(&format!(
                "CREATE PUBLICATION {} FOR TABLES IN SCHEMA public WITH (publish_via_partition_root = true)",
                quote_ident(&public)
            ))
            .await;
        match created {
            Ok(_) => {}
            // What a managed Postgres's non-superuser role gets: say how to go on.
            Err(source @ PgError::Server { .. })
                if source.code() == Some(INSUFFICIENT_PRIVILEGE) =>
            {
                return Err(SetupError::PublicationPrivilege {
                    publication: public,
                    source,
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    let metadata = metadata_publication(cfg);
    if !existing.contains(&metadata) {
        conn.execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {}.permissions, {shard}.clients, {shard}.mutations",
            quote_ident(&metadata),
            quote_ident(&cfg.app_id)
        ))
        .await?;
    }
    let detection = ensure_ddl_triggers(conn, cfg).await?;
    conn.execute(&format!(
        "UPDATE {shard}.\"shardConfig\" SET \"ddlDetection\" = {detection}"
    ))
    .await?;
    Ok(())
}

/// The logical message prefix of this shard's schema-change messages.
pub fn ddl_message_prefix(cfg: &Config) -> String {
    format!("{}/{}/ddl", cfg.app_id, cfg.shard_num)
}

/// Bumped when the content of the DDL messages changes, so a reader can refuse what it does
/// not understand.
pub const DDL_MESSAGE_VERSION: u64 = 1;

/// Command tags whose effect can change which tables are published or their shape.
const DDL_TAGS: [&str; 11] = [
    "CREATE TABLE",
    "CREATE TABLE AS",
    "SELECT INTO",
    "ALTER TABLE",
    "DROP TABLE",
    "ALTER SCHEMA",
    "DROP SCHEMA",
    "CREATE PUBLICATION",
    "ALTER PUBLICATION",
    "DROP PUBLICATION",
    "DROP OWNED",
];

/// The SQL installing the shard's schema-change detection: `published_schema()` describes
/// the shard's published tables (columns with attnum, type and the value rows present when
/// the column was added, primary key, relfilenode to tell a rewrite); `ddl_command_start`
/// keeps that description before the command in a transaction-local setting;
/// `ddl_command_end` emits a transactional logical message holding both, only when they
/// differ. Before and after, matched by table OID and column attnum, tell a rename from a
/// drop and an add. Drops need no `sql_drop` trigger: the table is absent from "after".
fn ddl_trigger_sql(cfg: &Config) -> String {
    let app = &cfg.app_id;
    let n = cfg.shard_num;
    let shard = quote_ident(&cfg.shard_schema());
    let pubs: Vec<String> = publications(cfg).iter().map(|p| quote_literal(p)).collect();
    let pubs = format!("ARRAY[{}]::text[]", pubs.join(", "));
    let setting = quote_literal(&format!("zcache_ddl.before_{app}_{n}"));
    let prefix = quote_literal(&ddl_message_prefix(cfg));
    let tags: Vec<String> = DDL_TAGS.iter().map(|t| quote_literal(t)).collect();
    let tags = tags.join(", ");
    let start = quote_ident(&format!("{app}_ddl_start_{n}"));
    let end = quote_ident(&format!("{app}_ddl_end_{n}"));
    format!(
        r#"
CREATE OR REPLACE FUNCTION {shard}.published_schema() RETURNS jsonb LANGUAGE sql STABLE AS $fn$
  SELECT coalesce(jsonb_agg(jsonb_build_object(
      'oid', c.oid::int8, 'schema', ns.nspname, 'name', c.relname, 'relfilenode', c.relfilenode::int8,
      'columns', (SELECT coalesce(jsonb_agg(jsonb_build_array(a.attnum, a.attname, a.atttypid::int8,
                    ty.typcategory = 'A',
                    CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END)
                    ORDER BY a.attnum), '[]'::jsonb)
                  FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
      'primaryKey', (SELECT jsonb_agg(a.attname ORDER BY k.ord)
                     FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     WHERE i.indrelid = c.oid AND i.indisprimary)
    ) ORDER BY c.oid), '[]'::jsonb)
  FROM (SELECT DISTINCT schemaname, tablename FROM pg_publication_tables
        WHERE pubname = ANY ({pubs})) pt
  JOIN pg_namespace ns ON ns.nspname = pt.schemaname
  JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = pt.tablename
$fn$;
CREATE OR REPLACE FUNCTION {shard}.ddl_start() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
  PERFORM set_config({setting}, {shard}.published_schema()::text, true);
END $fn$;
CREATE OR REPLACE FUNCTION {shard}.ddl_end() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
DECLARE
  before jsonb := nullif(current_setting({setting}, true), '')::jsonb;
  after jsonb := {shard}.published_schema();
BEGIN
  IF before IS NOT DISTINCT FROM after THEN
    RETURN;
  END IF;
  PERFORM pg_logical_emit_message(true, {prefix}, jsonb_build_object(
    'version', {DDL_MESSAGE_VERSION}, 'tag', tg_tag, 'before', before, 'after', after,
    'query', left(current_query(), 500))::text);
END $fn$;
DROP EVENT TRIGGER IF EXISTS {start};
DROP EVENT TRIGGER IF EXISTS {end};
CREATE EVENT TRIGGER {start} ON ddl_command_start WHEN TAG IN ({tags})
  EXECUTE FUNCTION {shard}.ddl_start();
CREATE EVENT TRIGGER {end} ON ddl_command_end WHEN TAG IN ({tags})
  EXECUTE FUNCTION {shard}.ddl_end();
"#
    )
}

/// Installs schema-change detection. Event triggers need a superuser: without one, zcache
/// goes on without detection, as zero-cache does: a changed Relation message still reveals
/// a changed table; a dropped column is applied in place, anything else (an added or renamed
/// column, whose default or history the message does not carry) resets the replica
/// (`ZERO_AUTO_RESET`). Returns whether detection is on.
pub async fn ensure_ddl_triggers<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<S>,
    cfg: &Config,
) -> Result<bool, SetupError> {
    // One simple query is one implicit transaction: it installs all of it or nothing.
    match conn.execute(&ddl_trigger_sql(cfg)).await {
        Ok(_) => Ok(true),
        Err(e @ PgError::Server { .. }) => {
            tracing::warn!(error = %e, "cannot create the schema-change event triggers (they need a superuser): \
                 an upstream schema change other than a dropped column will reset the replica \
                 (with ZERO_AUTO_RESET) or stop replication");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}
