//! The change DB's tables against a real PostgreSQL: created as zero-cache 1.9.0 has them
//! (multi-node.md §3.1), idempotently, and the replication state read back.

use serde_json::json;
use zcache::changestream::changedb::{
    ChangeDb, ChangeDbError, LoggedTransaction, ReplicationState,
};
use zcache::changestream::protocol::Downstream;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};
use zcache::pgrepl::ConnConfig;

mod support;
use support::run;

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

fn tx(watermark: &str, ids: &[&str]) -> LoggedTransaction {
    LoggedTransaction {
        watermark: watermark.into(),
        begin: json!({"tag": "begin"}),
        changes: ids
            .iter()
            .map(|id| {
                json!({"tag": "insert", "new": {"id": id, "title": "it's"},
                       "relation": {"schema": "public", "name": "issue", "rowKey": {"columns": ["id"]}}})
            })
            .collect(),
        commit: json!({"tag": "commit"}),
    }
}

#[test]
fn the_owner_appends_transactions_that_read_back_as_the_streams_messages() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    let cfg = ConnConfig::parse(&pg.url("postgres")).expect("url");
    let cfg2 = cfg.clone();
    run(async move {
        ChangeDb::new(cfg, "zero_0")
            .migrate()
            .await
            .expect("migrate")
    });
    pg.psql(
        "postgres",
        "INSERT INTO \"zero_0/cdc\".\"replicationState\" (\"lastWatermark\", owner) VALUES ('09', 'task-1')",
    )
    .expect("state");
    let read = run(async move {
        let mut db = ChangeDb::new(cfg2, "zero_0");
        db.append("task-1", &tx("0a", &["i1", "i2"]))
            .await
            .expect("append");
        db.append("task-1", &tx("0b", &["i3"]))
            .await
            .expect("append");
        let all = db.read_after(("", -1), 100).await.expect("read");
        let page = db.read_after(("0a", 1), 2).await.expect("read a page");
        let state = db.state().await.expect("state");
        (all, page, state)
    });
    let (all, page, state) = read;
    let shape: Vec<(String, i64, &str)> = all
        .iter()
        .map(|(w, p, m)| {
            let tag = match m {
                Downstream::Begin { .. } => "begin",
                Downstream::Data(_) => "data",
                Downstream::Commit { .. } => "commit",
                _ => "other",
            };
            (w.clone(), *p, tag)
        })
        .collect();
    let expected: Vec<(String, i64, &str)> = vec![
        ("0a".into(), 0, "begin"),
        ("0a".into(), 1, "data"),
        ("0a".into(), 2, "data"),
        ("0a".into(), 3, "commit"),
        ("0b".into(), 0, "begin"),
        ("0b".into(), 1, "data"),
        ("0b".into(), 2, "commit"),
    ];
    assert_eq!(shape, expected);
    assert_eq!(
        all[0].2,
        Downstream::Begin {
            json: None,
            skip_ack: false,
            commit_watermark: "0a".into()
        }
    );
    assert_eq!(
        all[2].2,
        Downstream::Data(tx("0a", &["i2"]).changes[0].clone())
    );
    assert_eq!(
        all[6].2,
        Downstream::Commit {
            commit_time_ms: None,
            watermark: "0b".into()
        }
    );
    assert_eq!(
        page.iter()
            .map(|(w, p, _)| (w.as_str(), *p))
            .collect::<Vec<_>>(),
        vec![("0a", 2), ("0a", 3)]
    );
    assert_eq!(state.map(|s| s.last_watermark), Some("0b".into()));

    // Another replication-manager took the log over: this one's append is refused whole.
    pg.psql(
        "postgres",
        "UPDATE \"zero_0/cdc\".\"replicationState\" SET owner = 'task-2'",
    )
    .expect("take over");
    let cfg = ConnConfig::parse(&pg.url("postgres")).expect("url");
    let (refused, rows) = run(async move {
        let mut db = ChangeDb::new(cfg, "zero_0");
        let refused = db.append("task-1", &tx("0c", &["i4"])).await;
        let rows = db.read_after(("0b", 2), 100).await.expect("read");
        (refused, rows)
    });
    assert!(
        matches!(refused, Err(ChangeDbError::NotOwner(Some(ref o))) if o == "task-2"),
        "{refused:?}"
    );
    assert!(
        rows.is_empty(),
        "nothing of the refused transaction stays: {rows:?}"
    );
}
