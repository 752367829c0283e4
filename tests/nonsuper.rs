//! zcache's replicator connecting to a real PostgreSQL as a role that is not a superuser, as on
//! managed Postgres: `app` has LOGIN and REPLICATION, a password (SCRAM), owns its database and
//! its tables, and may not create event triggers nor a publication `FOR TABLES IN SCHEMA`.
//!
//! - Without ZERO_APP_PUBLICATIONS, set-up fails with one error that says how to go on; doing
//!   what it says (a superuser creates the publication) makes the next start work.
//! - With a publication `app` made of its tables: initial sync, zcache's own schemas and
//!   metadata publication made by `app`, streaming; the replica equals upstream.
//! - Schema changes go undetected at the time (no event triggers): a dropped column is followed
//!   in place; an added or renamed column rebuilds the replica (ZERO_AUTO_RESET), or stops
//!   replication when that is off. Either way the replica never silently differs.

mod support;

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use support::*;
use zcache::config::Config;
use zcache::embedded::pgcluster::PgCluster;
use zcache::pgrepl::{connect, PgError};
use zcache::replicator::setup::SetupError;
use zcache::replicator::{self, ReplError};
use zcache::sqlite::ReplicaReader;

use Canon::{Bool, Int, Text};

const ROLE: &str = "app";
const PASSWORD: &str = "app-pw-7";
/// The database `app` owns; everything upstream happens there.
const APP_DB: &str = "appdb";
const APP_ID: &str = "zapp";

/// A cluster with the `app` role, its database and its tables `a`, `b` (published by the
/// tests that use a publication) and `c` (never published), with rows.
fn nonsuper_cluster() -> PgCluster {
    let pg = cluster(&[]);
    psql(
        &pg,
        &format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {ROLE} LOGIN REPLICATION PASSWORD '{PASSWORD}';
             CREATE DATABASE {APP_DB} OWNER {ROLE};"
        ),
    );
    assert_eq!(
        psql(
            &pg,
            &format!("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = '{ROLE}'")
        )
        .trim(),
        "f|t"
    );
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).expect("read hba");
    let line = format!("host all {ROLE} 127.0.0.1/32 scram-sha-256");
    std::fs::write(&hba, format!("{line}\n{old}")).expect("write hba");
    psql(&pg, "SELECT pg_reload_conf()");
    as_app(
        &pg,
        "CREATE TABLE a (id int PRIMARY KEY, name text, n int);
         CREATE TABLE b (k text, v int, note text, PRIMARY KEY (k, v));
         CREATE TABLE c (id int PRIMARY KEY);
         INSERT INTO a VALUES (1, 'one', 10), (2, 'two', 20), (3, NULL, NULL);
         INSERT INTO b VALUES ('x', 1, 'first'), ('y', 2, NULL);
         INSERT INTO c VALUES (1);",
    );
    pg
}

/// Runs `sql` in the app's database as `app` (psql connects as the superuser).
fn as_app(pg: &PgCluster, sql: &str) -> String {
    psql_in(pg, APP_DB, &format!("SET ROLE {ROLE};\n{sql}"))
}

/// Commits `body` in one transaction made by `app`.
fn commit_as_app(pg: &PgCluster, body: &str) -> CommitLsn {
    commit_in(pg, APP_DB, &format!("SET LOCAL ROLE {ROLE};\n{body}"))
}

fn app_config(pg: &PgCluster, replica: &Path, publications: &[&str]) -> Config {
    let url = format!(
        "postgres://{ROLE}:{PASSWORD}@127.0.0.1:{}/{APP_DB}",
        pg.port()
    );
    let mut args = vec![
        "zcache".to_string(),
        "--upstream-db".into(),
        url,
        "--replica-file".into(),
        replica.display().to_string(),
        "--app-id".into(),
        APP_ID.into(),
    ];
    if !publications.is_empty() {
        args.push("--app-publications".into());
        args.push(publications.join(","));
    }
    Config::try_parse_from(args).expect("config")
}

/// Waits for the hba reload (asynchronous), then checks zcache's connection is `app`'s, with
/// its password, and not a superuser's.
async fn check_connects_as_app(cfg: &Config) {
    let mut without_password = upstream(cfg);
    without_password.password = None;
    with_timeout("the hba reload", async {
        loop {
            match connect(&without_password, false).await {
                Err(PgError::Auth(_)) => return,
                Ok(_) => glommio::timer::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("connecting without a password: {e}"),
            }
        }
    })
    .await;
    let mut conn = connect(&upstream(cfg), false)
        .await
        .expect("connect as app");
    let rows = conn
        .simple_query("SELECT current_user, usesuper FROM pg_user WHERE usename = current_user")
        .await
        .expect("query");
    assert_eq!(
        rows[0].rows,
        vec![vec![Some(ROLE.to_string()), Some("f".to_string())]]
    );
    let _ = conn.close().await;
}

fn table_a() -> Table {
    Table::new(
        "public",
        "a",
        &[("id", Int), ("name", Text), ("n", Int)],
        &["id"],
    )
}

fn table_b() -> Table {
    Table::new(
        "public",
        "b",
        &[("k", Text), ("v", Int), ("note", Text)],
        &["k", "v"],
    )
}

fn has_table(path: &Path, name: &str) -> bool {
    let reader = ReplicaReader::open(path).expect("open the replica");
    reader.table_spec(name).is_some()
}

fn slots(pg: &PgCluster) -> Vec<String> {
    slot_names(pg)
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
}

/// The one slot upstream (a reset replaces it).
fn only_slot(pg: &PgCluster) -> String {
    let slots = slots(pg);
    assert_eq!(slots.len(), 1, "one replication slot: {slots:?}");
    slots[0].clone()
}

/// Waits until the replica equals upstream (a reset has no single version that marks it).
async fn eventually_equal(pg: &PgCluster, path: &Path, tables: &[Table]) {
    with_timeout("the replica to equal upstream", async {
        loop {
            let same = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert_replica_equals_upstream_in(pg, APP_DB, path, tables)
            }));
            if same.is_ok() {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// Commits `body` and waits for its version, skipping the one a reset sends.
async fn commit_and_wait(pg: &PgCluster, st: &Streaming, body: &str) {
    let at = commit_as_app(pg, body);
    with_timeout("the version of a commit", async {
        while !at.contains(next_version(&st.rx).await.watermark) {}
    })
    .await;
}

const EXPECTED_PUBLICATION_ERROR: &str = "cannot create the publication \"_zapp_public_0\" of \
    schema public: Postgres ERROR 42501: must be superuser to create FOR TABLES IN SCHEMA \
    publication. Creating a publication FOR TABLES IN SCHEMA needs a superuser. Either create a \
    publication of the tables to sync as their owner (CREATE PUBLICATION zero_data FOR TABLE \
    ...) and name it in ZERO_APP_PUBLICATIONS, or have a superuser run once: CREATE PUBLICATION \
    \"_zapp_public_0\" FOR TABLES IN SCHEMA public WITH (publish_via_partition_root = true)";

#[test]
fn default_publication_needs_a_superuser_and_the_error_says_so() {
    let pg = nonsuper_cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = app_config(&pg, &path, &[]);
    run(async {
        check_connects_as_app(&cfg).await;
        let err = with_timeout("prepare", replicator::prepare(&cfg, &upstream(&cfg)))
            .await
            .err()
            .expect("set-up fails without ZERO_APP_PUBLICATIONS");
        assert!(
            matches!(
                err,
                ReplError::Setup(SetupError::PublicationPrivilege { .. })
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), EXPECTED_PUBLICATION_ERROR);
        assert!(slots(&pg).is_empty(), "no slot left behind");

        // The second way out the message gives: a superuser creates the publication once.
        psql_in(
            &pg,
            APP_DB,
            "CREATE PUBLICATION \"_zapp_public_0\" FOR TABLES IN SCHEMA public \
             WITH (publish_via_partition_root = true)",
        );
        let prepared = prepare(&cfg).await;
        let c = Table::new("public", "c", &[("id", Int)], &["id"]);
        assert_replica_equals_upstream_in(&pg, APP_DB, &path, &[table_a(), table_b(), c]);
        drop(prepared);
    });
}

#[test]
fn app_publication_syncs_and_streams_as_a_non_superuser() {
    let pg = nonsuper_cluster();
    as_app(&pg, "CREATE PUBLICATION zero_data FOR TABLE a, b;");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = app_config(&pg, &path, &["zero_data"]);
    run(async {
        check_connects_as_app(&cfg).await;
        let prepared = prepare(&cfg).await;
        // zcache's set-up was made by app; event triggers were refused and are off.
        assert_eq!(
            psql_in(
                &pg,
                APP_DB,
                "SELECT nspname, nspowner::regrole FROM pg_namespace \
                 WHERE nspname IN ('zapp', 'zapp_0') ORDER BY 1"
            ),
            "zapp|app\nzapp_0|app\n"
        );
        assert_eq!(
            psql_in(
                &pg,
                APP_DB,
                "SELECT pubname, pubowner::regrole FROM pg_publication ORDER BY 1"
            ),
            "_zapp_metadata_0|app\nzero_data|app\n"
        );
        assert_eq!(
            psql_in(
                &pg,
                APP_DB,
                "SELECT publications, \"ddlDetection\" FROM zapp_0.\"shardConfig\""
            )
            .trim(),
            "{zero_data,_zapp_metadata_0}|f"
        );
        assert_eq!(
            psql_in(&pg, APP_DB, "SELECT count(*) FROM pg_event_trigger").trim(),
            "0"
        );
        let tables = [table_a(), table_b()];
        assert_replica_equals_upstream_in(&pg, APP_DB, &path, &tables);
        assert!(!has_table(&path, "c"), "c is not in the publication");

        let st = start_streaming(&cfg, prepared).await;
        let steps = [
            "INSERT INTO a VALUES (4, 'four', 40), (5, NULL, 50);
             INSERT INTO b VALUES ('z', 3, 'third'); INSERT INTO c VALUES (2);",
            "UPDATE a SET name = 'uno', n = n + 1 WHERE id = 1; UPDATE b SET note = 'noted' WHERE k = 'y';",
            // A key change: the old key comes with the update.
            "UPDATE a SET id = 30 WHERE id = 3; UPDATE b SET v = 20 WHERE k = 'y';",
            "DELETE FROM a WHERE id = 2; DELETE FROM b WHERE k = 'x'; DELETE FROM c;",
            "TRUNCATE b; INSERT INTO b VALUES ('after', 1, 'truncate'); INSERT INTO a VALUES (6, 'six', 6);",
        ];
        for body in steps {
            version_of(&st.rx, commit_as_app(&pg, body)).await;
            assert_replica_equals_upstream_in(&pg, APP_DB, &path, &tables);
        }
        assert!(!has_table(&path, "c"));
        st.stop().await;
    });
}

#[test]
fn schema_changes_without_event_triggers_never_leave_the_replica_different() {
    let pg = nonsuper_cluster();
    as_app(&pg, "CREATE PUBLICATION zero_data FOR TABLE a, b;");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = app_config(&pg, &path, &["zero_data"]);
    assert!(cfg.auto_reset, "ZERO_AUTO_RESET is on by default");
    run(async {
        check_connects_as_app(&cfg).await;
        let prepared = prepare(&cfg).await;
        let st = start_streaming(&cfg, prepared).await;
        let slot = only_slot(&pg);
        let b = table_b();

        // A dropped column is followed in place, in the transaction that shows it.
        let at = commit_as_app(
            &pg,
            "ALTER TABLE a DROP COLUMN n;
             INSERT INTO a VALUES (10, 'ten'); UPDATE a SET name = 'uno' WHERE id = 1;",
        );
        version_of(&st.rx, at).await;
        let a = Table::new("public", "a", &[("id", Int), ("name", Text)], &["id"]);
        assert_replica_equals_upstream_in(&pg, APP_DB, &path, &[a, b.clone()]);
        assert_eq!(only_slot(&pg), slot, "no reset for a dropped column");

        // An added column with a default: the rows present hold it upstream, and nothing in
        // the stream says so. The replica is rebuilt.
        commit_as_app(
            &pg,
            "ALTER TABLE a ADD COLUMN flag bool NOT NULL DEFAULT true;
             INSERT INTO a VALUES (11, 'eleven', false);",
        );
        let a = Table::new(
            "public",
            "a",
            &[("id", Int), ("name", Text), ("flag", Bool)],
            &["id"],
        );
        eventually_equal(&pg, &path, &[a.clone(), b.clone()]).await;
        let slot_after_add = only_slot(&pg);
        assert_ne!(
            slot_after_add, slot,
            "the replica was rebuilt from a new slot"
        );
        // Streaming goes on from the rebuilt replica.
        commit_and_wait(&pg, &st, "UPDATE a SET flag = false WHERE id = 1;").await;
        assert_replica_equals_upstream_in(&pg, APP_DB, &path, &[a, b.clone()]);

        // A renamed column: its values stay upstream, under the new name.
        commit_as_app(
            &pg,
            "ALTER TABLE a RENAME COLUMN name TO title; UPDATE a SET title = 'deux' WHERE id = 2;",
        );
        let a = Table::new(
            "public",
            "a",
            &[("id", Int), ("title", Text), ("flag", Bool)],
            &["id"],
        );
        eventually_equal(&pg, &path, &[a.clone(), b.clone()]).await;
        let slot_after_rename = only_slot(&pg);
        assert_ne!(slot_after_rename, slot_after_add, "rebuilt again");

        // An added column without a default in its own transaction, used by a later one.
        psql_in(
            &pg,
            APP_DB,
            "SET ROLE app; ALTER TABLE b ADD COLUMN extra int;",
        );
        commit_as_app(&pg, "INSERT INTO b VALUES ('w', 4, 'with extra', 5);");
        let b = Table::new(
            "public",
            "b",
            &[("k", Text), ("v", Int), ("note", Text), ("extra", Int)],
            &["k", "v"],
        );
        eventually_equal(&pg, &path, &[a.clone(), b.clone()]).await;
        commit_and_wait(
            &pg,
            &st,
            "UPDATE b SET extra = 6 WHERE k = 'x'; DELETE FROM a WHERE id = 10;",
        )
        .await;
        assert_replica_equals_upstream_in(&pg, APP_DB, &path, &[a, b]);
        assert_eq!(
            slots(&pg).len(),
            1,
            "each reset dropped the slot it replaced"
        );
        st.stop().await;
    });
}

#[test]
fn without_event_triggers_and_auto_reset_off_an_added_column_stops_replication() {
    let pg = nonsuper_cluster();
    as_app(&pg, "CREATE PUBLICATION zero_data FOR TABLE a, b;");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let mut cfg = app_config(&pg, &path, &["zero_data"]);
    cfg.auto_reset = false;
    run(async {
        check_connects_as_app(&cfg).await;
        let prepared = prepare(&cfg).await;
        let st = start_streaming(&cfg, prepared).await;
        let tables = [table_a(), table_b()];
        let before = replica_snapshot(&path, &tables);
        commit_as_app(
            &pg,
            "ALTER TABLE a ADD COLUMN note text DEFAULT 'x'; INSERT INTO a VALUES (7, 'seven', 7, 'y');",
        );
        let v = with_timeout("replication to stop", st.rx.recv()).await;
        assert!(v.is_none(), "no version for a change it cannot follow");
        assert_eq!(
            replica_snapshot(&path, &tables),
            before,
            "the replica is left as it was"
        );
        st.stop().await;
    });
}
