//! Upstream schema changes against a real PostgreSQL: each kind of change is applied to the
//! replica in place (in the transaction that made it), followed by writes in the new shape;
//! after each, the replica's tables, specs (`_zcache_tables`) and rows equal upstream's. A
//! type change rebuilds the replica (ZERO_AUTO_RESET), or stops replication when that is off.
//! Without event triggers, a changed Relation message brings a dropped column in place and
//! rebuilds the replica for an added one.

mod support;

use std::time::Duration;

use support::*;
use zcache::embedded::pgcluster::PgCluster;
use zcache::sqlite::ReplicaReader;

use Canon::{Bool, Int, Text};

fn item(name: &str, columns: &[(&str, Canon)], pk: &[&str]) -> Table {
    Table::new("public", name, columns, pk)
}

/// Waits until the replica equals upstream for `tables` (after a reset, no single version
/// marks the moment).
async fn eventually_equal(pg: &PgCluster, path: &std::path::Path, tables: &[Table]) {
    with_timeout("the replica to equal upstream", async {
        loop {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert_replica_equals_upstream(pg, path, tables)
            }));
            if ok.is_ok() {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

fn has_table(path: &std::path::Path, name: &str) -> bool {
    let reader = ReplicaReader::open(path).expect("open the replica");
    reader.table_spec(name).is_some()
}

#[test]
fn schema_changes_apply_in_place() {
    let pg = cluster(&[]);
    psql(
        &pg,
        "CREATE TABLE item (id int PRIMARY KEY, name text, n int);
         INSERT INTO item VALUES (1, 'one', 10), (2, 'two', 20), (3, NULL, NULL);",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(&pg, &path, "ddl", &[]);
    run(async {
        let prepared = prepare(&cfg).await;
        let slot = prepared.slot.clone();
        let st = start_streaming(&cfg, prepared).await;
        let step = |body: &str| commit(&pg, body);

        // Add a column with a default: rows present get it.
        let at = step(
            "ALTER TABLE item ADD COLUMN flag bool NOT NULL DEFAULT true;
             INSERT INTO item VALUES (4, 'four', 40, false);
             UPDATE item SET flag = false WHERE id = 2;",
        );
        version_of(&st.rx, at).await;
        let t = item(
            "item",
            &[("id", Int), ("name", Text), ("n", Int), ("flag", Bool)],
            &["id"],
        );
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&t));

        // Add a column without a default, in its own transaction, then use it.
        version_of(&st.rx, step("ALTER TABLE item ADD COLUMN note text;")).await;
        version_of(
            &st.rx,
            step("UPDATE item SET note = 'noted' WHERE id = 1; INSERT INTO item VALUES (5, 'five', 50, true, 'x');"),
        )
        .await;
        let t = item(
            "item",
            &[
                ("id", Int),
                ("name", Text),
                ("n", Int),
                ("flag", Bool),
                ("note", Text),
            ],
            &["id"],
        );
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&t));

        // Rename a column: its values stay.
        let at = step(
            "ALTER TABLE item RENAME COLUMN name TO title;
             INSERT INTO item (id, title, n, flag) VALUES (6, 'six', 60, true);
             UPDATE item SET title = 'uno' WHERE id = 1;",
        );
        version_of(&st.rx, at).await;
        let t = item(
            "item",
            &[
                ("id", Int),
                ("title", Text),
                ("n", Int),
                ("flag", Bool),
                ("note", Text),
            ],
            &["id"],
        );
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&t));

        // Drop a column (indexed, so the replica's index goes too).
        psql(&pg, "CREATE INDEX item_n ON item (n);");
        let at = step(
            "ALTER TABLE item DROP COLUMN n;
             INSERT INTO item (id, title, flag) VALUES (7, 'seven', false);
             DELETE FROM item WHERE id = 3;",
        );
        version_of(&st.rx, at).await;
        let t = item(
            "item",
            &[("id", Int), ("title", Text), ("flag", Bool), ("note", Text)],
            &["id"],
        );
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&t));

        // Rename the table.
        let at = step(
            "ALTER TABLE item RENAME TO thing;
             INSERT INTO thing (id, title, flag) VALUES (8, 'eight', true);
             UPDATE thing SET note = 'renamed' WHERE id = 2;",
        );
        version_of(&st.rx, at).await;
        assert!(!has_table(&path, "item"), "the old name is gone");
        let thing = item(
            "thing",
            &[("id", Int), ("title", Text), ("flag", Bool), ("note", Text)],
            &["id"],
        );
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&thing));

        // Create a table with rows in the same transaction, then write to it again.
        let at = step(
            "CREATE TABLE other (k text NOT NULL, v int NOT NULL, w text, PRIMARY KEY (k));
             INSERT INTO other VALUES ('a', 1, 'x'), ('b', 2, NULL), ('c', 2, 'z');",
        );
        version_of(&st.rx, at).await;
        version_of(
            &st.rx,
            step("INSERT INTO other VALUES ('d', 4, 'w'); UPDATE other SET w = 'y' WHERE k = 'a';"),
        )
        .await;
        let other = |pk: &[&str]| item("other", &[("k", Text), ("v", Int), ("w", Text)], pk);
        assert_replica_equals_upstream(&pg, &path, &[thing.clone(), other(&["k"])]);

        // Change the primary key in one statement, then write by the new key.
        let at = step(
            "ALTER TABLE other DROP CONSTRAINT other_pkey, ADD PRIMARY KEY (v, k);
             UPDATE other SET w = 'by new key' WHERE v = 2 AND k = 'c';
             DELETE FROM other WHERE v = 4 AND k = 'd';",
        );
        version_of(&st.rx, at).await;
        assert_replica_equals_upstream(&pg, &path, &[other(&["v", "k"])]);

        // Change it back in two statements (the table is keyless in between).
        let at = step(
            "ALTER TABLE other DROP CONSTRAINT other_pkey;
             ALTER TABLE other ADD PRIMARY KEY (k);
             INSERT INTO other VALUES ('e', 2, 'e');
             UPDATE other SET k = 'bb' WHERE k = 'b';",
        );
        version_of(&st.rx, at).await;
        assert_replica_equals_upstream(&pg, &path, &[other(&["k"])]);

        // Drop a table.
        let at = step("DROP TABLE other; INSERT INTO thing (id, flag) VALUES (9, true);");
        version_of(&st.rx, at).await;
        assert!(!has_table(&path, "other"), "the dropped table is gone");
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&thing));

        // DDL on tables outside the publications changes nothing.
        psql(
            &pg,
            "CREATE SCHEMA private; CREATE TABLE private.p (id int PRIMARY KEY);",
        );
        let at =
            step("ALTER TABLE private.p ADD COLUMN x int; INSERT INTO thing (id) VALUES (10);");
        version_of(&st.rx, at).await;
        assert!(!has_table(&path, "private.p"));
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&thing));
        assert_eq!(
            slot_names(&pg),
            vec![slot.clone()],
            "no reset happened on the way"
        );
        st.stop().await;
        drop_slot(&pg, &slot);
    });
}

#[test]
fn type_change_resets_the_replica() {
    let pg = cluster(&[]);
    psql(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         CREATE TABLE u (id int PRIMARY KEY);
         INSERT INTO t VALUES (1, 10), (2, NULL); INSERT INTO u VALUES (1);",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(&pg, &path, "reset", &[]);
    run(async {
        let prepared = prepare(&cfg).await;
        let old_slot = prepared.slot.clone();
        // A reader opened before the reset, as a syncer's is: it must see the rebuilt replica.
        let reader = ReplicaReader::open(&path).expect("open the replica");
        let st = start_streaming(&cfg, prepared).await;
        commit(
            &pg,
            "ALTER TABLE t ALTER COLUMN v TYPE text USING 'v=' || v::text;
             INSERT INTO t VALUES (3, 'three');",
        );
        let t = item("t", &[("id", Int), ("v", Text)], &["id"]);
        let u = item("u", &[("id", Int)], &["id"]);
        eventually_equal(&pg, &path, &[t.clone(), u.clone()]).await;
        let slots = slot_names(&pg);
        assert!(
            slots.len() == 1 && slots[0] != old_slot,
            "one new slot replaces {old_slot}: {slots:?}"
        );
        // Streaming goes on from the new replica.
        let at = commit(&pg, "INSERT INTO t VALUES (4, 'four'); DELETE FROM u;");
        with_timeout("the version after the reset", async {
            loop {
                if at.contains(next_version(&st.rx).await.watermark) {
                    return;
                }
            }
        })
        .await;
        assert_replica_equals_upstream(&pg, &path, &[t.clone(), u]);
        let mut reader = reader;
        reader.reload_specs().expect("reload");
        assert_eq!(
            replica_rows(&reader, &t),
            upstream_rows(&pg, &t),
            "a reader opened before the reset sees the new replica"
        );
        st.stop().await;
        drop_slot(&pg, &slot_names(&pg)[0]);
    });
}

#[test]
fn type_change_stops_replication_without_auto_reset() {
    let pg = cluster(&[]);
    psql(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 10);",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let mut cfg = config(&pg, &path, "noreset", &[]);
    cfg.auto_reset = false;
    run(async {
        let prepared = prepare(&cfg).await;
        let slot = prepared.slot.clone();
        let st = start_streaming(&cfg, prepared).await;
        let before = replica_snapshot(&path, &[item("t", &[("id", Int), ("v", Int)], &["id"])]);
        commit(
            &pg,
            "ALTER TABLE t ALTER COLUMN v TYPE bigint; INSERT INTO t VALUES (2, 20);",
        );
        // The replicator ends: its channel closes without a version.
        let v = with_timeout("replication to stop", st.rx.recv()).await;
        assert!(v.is_none(), "no version for a change it cannot apply");
        let after = replica_snapshot(&path, &[item("t", &[("id", Int), ("v", Int)], &["id"])]);
        assert_eq!(before, after, "the replica is left as it was");
        st.stop().await;
        drop_slot(&pg, &slot);
    });
}

#[test]
fn without_event_triggers_an_added_column_rebuilds_the_replica() {
    let pg = cluster(&[]);
    psql(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, a text, b int); INSERT INTO t VALUES (1, 'x', 1);",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(&pg, &path, "notrig", &[]);
    run(async {
        let prepared = prepare(&cfg).await;
        let slot = prepared.slot.clone();
        assert_eq!(
            psql(&pg, "SELECT \"ddlDetection\" FROM notrig_0.\"shardConfig\"").trim(),
            "t"
        );
        // As on a server where zcache's role may not create event triggers.
        psql(
            &pg,
            "DROP EVENT TRIGGER notrig_ddl_start_0; DROP EVENT TRIGGER notrig_ddl_end_0;",
        );
        let st = start_streaming(&cfg, prepared).await;
        // A dropped column alone is followed in place.
        psql(&pg, "ALTER TABLE t DROP COLUMN b;");
        let at = commit(&pg, "INSERT INTO t VALUES (2, 'y');");
        version_of(&st.rx, at).await;
        let t = item("t", &[("id", Int), ("a", Text)], &["id"]);
        assert_replica_equals_upstream(&pg, &path, std::slice::from_ref(&t));
        assert_eq!(slot_names(&pg), vec![slot.clone()]);
        // An added column: what the rows present hold in it (here a default) is not in the
        // stream, so the replica is rebuilt (tests/nonsuper.rs has renames and more).
        psql(&pg, "ALTER TABLE t ADD COLUMN c text DEFAULT 'd';");
        commit(&pg, "INSERT INTO t VALUES (3, 'z', 'new column');");
        let t = item("t", &[("id", Int), ("a", Text), ("c", Text)], &["id"]);
        eventually_equal(&pg, &path, std::slice::from_ref(&t)).await;
        let slots = slot_names(&pg);
        assert!(slots.len() == 1 && slots[0] != slot, "rebuilt: {slots:?}");
        let at = commit(&pg, "UPDATE t SET c = 'set' WHERE id = 1;");
        with_timeout("the version after the reset", async {
            while !at.contains(next_version(&st.rx).await.watermark) {}
        })
        .await;
        assert_replica_equals_upstream(&pg, &path, &[t]);
        st.stop().await;
        drop_slot(&pg, &slots[0]);
    });
}
