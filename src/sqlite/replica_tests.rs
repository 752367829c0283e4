use super::*;

pub fn issue_spec() -> TableSpec {
    let col = |name: &str, kind, oid| ColumnSpec {
        name: name.into(),
        kind,
        pg_type_oid: oid,
    };
    TableSpec {
        name: "issue".into(),
        columns: vec![
            col("id", ColumnKind::String, 25),
            col("n", ColumnKind::Number, 20),
            col("done", ColumnKind::Boolean, 16),
        ],
        primary_key: vec![0],
    }
}

#[test]
fn reset_empties_the_replica_in_the_same_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let mut r = Replica::open(&path).expect("open");
    r.create_table(&issue_spec()).expect("create");
    r.begin().expect("begin");
    r.upsert(
        "issue",
        &vec![Value::Text("a".into()), Value::Int(1), Value::Bool(true)],
    )
    .expect("upsert");
    r.set_meta("slot", "s1").expect("meta");
    r.commit(5).expect("commit");
    let reader = crate::sqlite::ReplicaReader::open(&path).expect("reader");
    assert_eq!(reader.begin_snapshot().expect("snapshot"), 5);
    reader.end_snapshot().expect("end");

    r.reset().expect("reset");
    assert_eq!(r.watermark().expect("watermark"), None);
    assert_eq!(r.meta("slot").expect("meta"), None);
    assert!(r.tables().is_empty());
    // The reader opened before the reset sees it: same file.
    assert!(
        reader.begin_snapshot().is_err(),
        "no watermark after a reset"
    );
    reader.end_snapshot().expect("end");
    let n: i64 = r
        .conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'issue'",
            [],
            |x| x.get(0),
        )
        .expect("count");
    assert_eq!(n, 0);
    // And the replica fills again.
    r.create_table(&issue_spec()).expect("create again");
    r.begin().expect("begin");
    r.commit(9).expect("commit");
    assert_eq!(reader.begin_snapshot().expect("snapshot"), 9);
    reader.end_snapshot().expect("end");
}

#[test]
fn commits_keep_the_wal_under_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let mut r = Replica::open(&path).expect("open");
    r.create_table(&issue_spec()).expect("create");
    // One transaction larger than the limit, then a small one: the commit of the large
    // one truncates the WAL.
    r.begin().expect("begin");
    let text = "x".repeat(4000);
    for i in 0..(REPLICA_WAL_BYTES_MAX / 4000 + 100) {
        r.upsert(
            "issue",
            &vec![
                Value::Text(format!("{i}{text}")),
                Value::Int(1),
                Value::Null,
            ],
        )
        .expect("upsert");
    }
    r.commit(1).expect("commit");
    assert!(
        r.wal_bytes() <= REPLICA_WAL_BYTES_MAX,
        "WAL of {} bytes after a commit",
        r.wal_bytes()
    );
}

#[test]
fn writes_commit_with_watermark_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    {
        let mut r = Replica::open(&path).expect("open");
        r.create_table(&issue_spec()).expect("create");
        r.begin().expect("begin");
        r.upsert(
            "issue",
            &vec![Value::Text("a".into()), Value::Int(1), Value::Bool(true)],
        )
        .expect("upsert");
        r.upsert(
            "issue",
            &vec![Value::Text("b".into()), Value::Int(2), Value::Bool(false)],
        )
        .expect("upsert");
        r.delete("issue", &[Value::Text("a".into())])
            .expect("delete");
        r.commit(77).expect("commit");
        // an uncommitted transaction is lost, watermark included
        r.begin().expect("begin");
        r.truncate("issue").expect("truncate");
        r.rollback().expect("rollback");
    }
    let r = Replica::open(&path).expect("reopen");
    assert_eq!(r.watermark().expect("watermark"), Some(77));
    assert_eq!(r.spec("issue").expect("spec"), &issue_spec());
    let n: i64 = r
        .conn
        .query_row("SELECT count(*) FROM issue WHERE id = 'b'", [], |x| {
            x.get(0)
        })
        .expect("count");
    assert_eq!(n, 1);
    assert!(matches!(
        r.upsert("nope", &vec![]),
        Err(ReplicaError::UnknownTable(_))
    ));
}

#[test]
fn bulk_load_writes_rows_then_returns_to_durable_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let mut r = Replica::open(&path).expect("open");
    r.begin_bulk_load().expect("bulk");
    let mode: String = r
        .conn
        .query_row("PRAGMA journal_mode", [], |x| x.get(0))
        .expect("mode");
    assert_eq!(mode, "off");
    r.create_table(&issue_spec()).expect("create");
    {
        let mut w = r.row_writer("issue").expect("writer");
        assert_eq!(w.columns(), 3);
        for i in 0..1000i64 {
            let id = format!("i{i}");
            w.bind(0, ToSqlOutput::Borrowed(ValueRef::Text(id.as_bytes())))
                .expect("bind");
            w.bind(1, ToSqlOutput::Borrowed(ValueRef::Integer(i)))
                .expect("bind");
            w.bind(2, ToSqlOutput::Borrowed(ValueRef::Null))
                .expect("bind");
            w.insert().expect("insert");
        }
    }
    r.end_bulk_load().expect("end bulk");
    let mode: String = r
        .conn
        .query_row("PRAGMA journal_mode", [], |x| x.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
    let sync: i64 = r
        .conn
        .query_row("PRAGMA synchronous", [], |x| x.get(0))
        .expect("sync");
    assert_eq!(
        sync, 1,
        "NORMAL again after the copy (sync_wal makes commits durable)"
    );
    r.begin().expect("begin");
    r.commit(5).expect("commit");
    drop(r);
    let r = Replica::open(&path).expect("reopen");
    assert_eq!(r.watermark().expect("watermark"), Some(5));
    let (n, sum): (i64, i64) = r
        .conn
        .query_row("SELECT count(*), sum(n) FROM issue", [], |x| {
            Ok((x.get(0)?, x.get(1)?))
        })
        .expect("count");
    assert_eq!((n, sum), (1000, 999 * 1000 / 2));
}

#[test]
fn row_statements_follow_a_changed_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut r = Replica::open(&dir.path().join("replica.db")).expect("open");
    r.create_table(&issue_spec()).expect("create");
    let row = vec![Value::Text("a".into()), Value::Int(1), Value::Bool(true)];
    r.upsert("issue", &row).expect("upsert");
    // The same table re-created with a fourth column: the cached SQL must not be reused.
    let mut wider = issue_spec();
    wider.columns.push(ColumnSpec {
        name: "extra".into(),
        kind: ColumnKind::String,
        pg_type_oid: 25,
    });
    r.create_table(&wider).expect("re-create");
    let mut row4 = row.clone();
    row4.push(Value::Text("x".into()));
    r.upsert("issue", &row4).expect("upsert 4 columns");
    assert_eq!(
        r.get("issue", &[Value::Text("a".into())]).expect("get"),
        Some(row4)
    );
    r.delete("issue", &[Value::Text("a".into())])
        .expect("delete");
    assert_eq!(
        r.get("issue", &[Value::Text("a".into())]).expect("get"),
        None
    );
}

fn row(id: &str, n: i64) -> Vec<Value> {
    vec![Value::Text(id.into()), Value::Int(n), Value::Bool(false)]
}

fn count(r: &Replica, table: &str) -> i64 {
    r.conn
        .query_row(
            &format!("SELECT count(*) FROM {}", quote_ident(table)),
            [],
            |x| x.get(0),
        )
        .expect("count")
}

/// The key index replaces the PRIMARY KEY clause: upserts replace by key whether the index
/// was made with the table or after a bulk copy, and it follows renames and re-keying.
#[test]
fn the_key_index_keeps_rows_unique_by_key_through_schema_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut r = Replica::open(&dir.path().join("replica.db")).expect("open");
    r.begin_bulk_load().expect("bulk");
    r.create_table_unkeyed(&issue_spec()).expect("create");
    let mut w = r.row_writer("issue").expect("writer");
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        for (c, v) in row(id, i as i64).iter().enumerate() {
            w.bind(c, to_sql_ref(v)).expect("bind");
        }
        w.insert().expect("insert");
    }
    drop(w);
    r.create_key_index("issue").expect("key index");
    r.end_bulk_load().expect("end bulk");

    r.begin().expect("begin");
    r.upsert("issue", &row("a", 10)).expect("upsert");
    r.commit(1).expect("commit");
    assert_eq!(count(&r, "issue"), 3, "an upsert of a key replaces its row");

    r.begin().expect("begin");
    r.rename_table("issue", "ticket").expect("rename");
    r.create_table(&issue_spec())
        .expect("a new table under the old name");
    r.upsert("ticket", &row("a", 11)).expect("upsert");
    r.upsert("issue", &row("a", 1)).expect("upsert");
    r.upsert("issue", &row("a", 2)).expect("upsert");
    r.commit(2).expect("commit");
    assert_eq!(count(&r, "ticket"), 3);
    assert_eq!(count(&r, "issue"), 1);

    r.begin().expect("begin");
    r.set_primary_key("ticket", &[1]).expect("re-key by n");
    r.upsert("ticket", &row("z", 11)).expect("upsert");
    r.commit(3).expect("commit");
    let ids: Vec<String> = r
        .conn
        .prepare("SELECT id FROM ticket ORDER BY id")
        .and_then(|mut s| s.query_map([], |x| x.get(0))?.collect())
        .expect("ids");
    assert_eq!(ids, ["b", "c", "z"], "n = 11 now names z's row");
}

/// A reader holding one snapshot for long blocks the forced checkpoint; the writer then
/// retries only after the WAL grew `REPLICA_CHECKPOINT_RETRY_BYTES` more, not at every
/// commit, and is back to the normal bound once the reader is gone.
#[test]
fn a_blocked_checkpoint_is_retried_after_more_growth_not_at_every_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let mut r = Replica::open(&path).expect("open");
    r.create_table(&issue_spec()).expect("create");
    r.begin().expect("begin");
    r.commit(1).expect("commit");
    let reader = crate::sqlite::ReplicaReader::open(&path).expect("reader");
    reader.begin_snapshot().expect("snapshot");
    let big = "x".repeat(64 << 10);
    let mut version = 1;
    let mut commit_big = |r: &mut Replica| {
        version += 1;
        r.begin().expect("begin");
        let row = vec![
            Value::Text(format!("{version}:{big}")),
            Value::Int(0),
            Value::Bool(true),
        ];
        r.upsert("issue", &row).expect("upsert");
        r.commit(version).expect("commit");
    };
    while r.wal_bytes() <= REPLICA_WAL_BYTES_MAX {
        commit_big(&mut r);
    }
    let blocked_at = r.checkpoint_at_bytes.get();
    assert!(
        blocked_at > REPLICA_WAL_BYTES_MAX,
        "the reader blocked the checkpoint: the next try waits for more growth"
    );
    assert!(r.wal_bytes() > REPLICA_WAL_BYTES_MAX);
    reader.end_snapshot().expect("end");
    // With the reader gone, checkpoints go through again and the WAL returns under the bound.
    for _ in 0..10_000 {
        commit_big(&mut r);
        if r.wal_bytes() <= REPLICA_WAL_BYTES_MAX {
            break;
        }
    }
    assert!(
        r.wal_bytes() <= REPLICA_WAL_BYTES_MAX,
        "with the reader gone the WAL is bounded again ({} bytes)",
        r.wal_bytes()
    );
    assert_eq!(r.checkpoint_at_bytes.get(), REPLICA_WAL_BYTES_MAX);
}
