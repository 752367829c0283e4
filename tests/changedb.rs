//! The change DB's tables against a real PostgreSQL: created as zero-cache 1.9.0 has them
//! (multi-node.md §3.1), idempotently, and the replication state read back.

use glommio::LocalExecutorBuilder;
use zcache::changestream::changedb::{ChangeDb, ReplicationState};
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};
use zcache::pgrepl::ConnConfig;

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("executor")
        .run(f)
}

/// `table: column type nullable, ...` of the schema, in column order.
fn columns(pg: &PgCluster, schema: &str) -> String {
    pg.psql(
        "postgres",
        &format!(
            "SELECT string_agg(table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable, ', '
               ORDER BY table_name, ordinal_position)
             FROM information_schema.columns WHERE table_schema = '{schema}'"
        ),
    )
    .expect("columns")
    .trim()
    .to_string()
}

#[test]
fn the_change_db_has_zero_caches_tables_and_its_state_reads_back() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    let cfg = ConnConfig::parse(&pg.url("postgres")).expect("url");
    let state = run(async move {
        let mut db = ChangeDb::new(cfg, "zero_0");
        db.migrate().await.expect("migrate");
        db.migrate().await.expect("migrate again");
        assert_eq!(db.state().await.expect("state"), None);
        db
    });
    drop(state);
    let cols = columns(&pg, "zero_0/cdc");
    for expected in [
        "changeLog.watermark text NO",
        "changeLog.pos bigint NO",
        "changeLog.change json NO",
        "changeLog.precommit text YES",
        "replicationConfig.publications ARRAY NO",
        "replicationConfig.replicaVersion text NO",
        "replicationConfig.resetRequired boolean YES",
        "replicationState.lastWatermark text NO",
        "replicationState.owner text YES",
        "replicationState.ownerAddress text YES",
        "tableMetadata.metadata jsonb NO",
        "backfilling.backfill jsonb NO",
        "versionHistory.minSafeVersion integer NO",
    ] {
        assert!(cols.contains(expected), "{expected} in {cols}");
    }
    pg.psql(
        "postgres",
        "INSERT INTO \"zero_0/cdc\".\"replicationState\" (\"lastWatermark\", owner) VALUES ('0a', 'task-1')",
    )
    .expect("insert");
    // A second row is refused, as zero-cache's lock column makes it.
    assert!(pg
        .psql(
            "postgres",
            "INSERT INTO \"zero_0/cdc\".\"replicationState\" (\"lastWatermark\") VALUES ('0b')",
        )
        .is_err());
    let cfg = ConnConfig::parse(&pg.url("postgres")).expect("url");
    let state = run(async move { ChangeDb::new(cfg, "zero_0").state().await.expect("state") });
    assert_eq!(
        state,
        Some(ReplicationState {
            last_watermark: "0a".into(),
            owner: Some("task-1".into()),
            owner_address: None,
        })
    );
}
