//! The embedded default: with no upstream database, zcache runs a PostgreSQL of its own under
//! its data directory, with a small demo schema (users, issues, comments) to sync.

use super::pgcluster::{ClusterError, PgCluster, PgClusterOptions};
use std::path::Path;

pub const DEMO_DATABASE: &str = "zcache_demo";

const DEMO_SQL: &str = r#"
CREATE TABLE "user" (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE issue (
  id TEXT PRIMARY KEY, title TEXT NOT NULL, status TEXT NOT NULL, priority INT NOT NULL,
  created BIGINT NOT NULL, owner_id TEXT REFERENCES "user"(id));
CREATE TABLE comment (
  id TEXT PRIMARY KEY, issue_id TEXT NOT NULL REFERENCES issue(id) ON DELETE CASCADE,
  body TEXT NOT NULL, created BIGINT NOT NULL);
CREATE INDEX comment_issue_id ON comment (issue_id);
CREATE INDEX issue_status_created ON issue (status, created);
INSERT INTO "user" SELECT 'u' || i, 'User ' || i FROM generate_series(1, 20) i;
INSERT INTO issue SELECT 'i' || i, 'Issue title ' || i, (ARRAY['open','closed','in_progress'])[1 + i % 3],
  i % 5, 1700000000000 + i * 1000, 'u' || (1 + i % 20) FROM generate_series(1, 500) i;
INSERT INTO comment SELECT 'c' || i, 'i' || (1 + i % 500), 'Comment body ' || i, 1700000000000 + i * 100
  FROM generate_series(1, 2000) i;
"#;

/// Row-level permissions for the demo's legacy queries and CRUD mutations: anyone may read
/// and write every demo table (a real app deploys its own with `zero-deploy-permissions`).
const DEMO_PERMISSIONS: &str = r#"{"tables":{"user":{"row":{"select":[["allow",{"type":"and","conditions":[]}]]}},"issue":{"row":{"select":[["allow",{"type":"and","conditions":[]}]],"insert":[["allow",{"type":"and","conditions":[]}]],"update":{"preMutation":[["allow",{"type":"and","conditions":[]}]],"postMutation":[["allow",{"type":"and","conditions":[]}]]},"delete":[["allow",{"type":"and","conditions":[]}]]}},"comment":{"row":{"select":[["allow",{"type":"and","conditions":[]}]],"insert":[["allow",{"type":"and","conditions":[]}]],"update":{"preMutation":[["allow",{"type":"and","conditions":[]}]],"postMutation":[["allow",{"type":"and","conditions":[]}]]},"delete":[["allow",{"type":"and","conditions":[]}]]}}}}"#;

/// Starts (or restarts) the embedded cluster and seeds the demo database once; the demo
/// permissions go to app `app_id` unless it has some already.
pub fn start(data_dir: &Path, app_id: &str) -> Result<(PgCluster, String), ClusterError> {
    let cluster = PgCluster::start(PgClusterOptions {
        data_dir: Some(data_dir.join("pg")),
        port: None,
        extra_conf: Vec::new(),
    })?;
    let exists = cluster.psql(
        "postgres",
        &format!("SELECT 1 FROM pg_database WHERE datname = '{DEMO_DATABASE}'"),
    )?;
    if exists.trim() != "1" {
        cluster.create_database(DEMO_DATABASE)?;
        cluster.psql(DEMO_DATABASE, DEMO_SQL)?;
        tracing::info!("demo data loaded: 20 users, 500 issues, 2000 comments");
    }
    let deploy = format!(
        "{}\nUPDATE \"{app_id}\".permissions SET permissions = '{DEMO_PERMISSIONS}' WHERE permissions IS NULL;",
        crate::replicator::setup::permissions_sql(app_id)
    );
    cluster.psql(DEMO_DATABASE, &deploy)?;
    let url = cluster.url(DEMO_DATABASE);
    Ok((cluster, url))
}
