//! Legacy CRUD mutations applied to a real PostgreSQL by `mutagen::Mutagen`
//! (legacy-features.md §3.3-3.5): ops and lmids, denials, duplicates and gaps, Postgres
//! errors, serialization failures retried, the pool's bound, and an upstream that goes away.

mod support;

use std::rc::Rc;
use std::time::Duration;

use serde_json::json;
use support::{cluster, psql, run, with_timeout};
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};
use zcache::mutagen::{Mutagen, Outcome, Verdict, SERIALIZATION_ATTEMPTS_MAX};
use zcache::pgrepl::ConnConfig;
use zcache::protocol::crud::{parse_crud_mutation, CrudMutation};
use zcache::protocol::error::ErrorKind;

const APP: &str = "zero";
const SHARD: &str = "zero_0";
const CG: &str = "cg1";

/// The shard schema as zcache's set-up creates it, and the app's tables.
fn prepare(pg: &PgCluster) -> ConnConfig {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::config(pg, &dir.path().join("replica.db"), APP, &[]);
    assert_eq!(cfg.shard_schema(), SHARD);
    let upstream = support::upstream(&cfg);
    run(async {
        let mut conn = zcache::pgrepl::connect(&upstream, false)
            .await
            .expect("connect");
        zcache::replicator::setup::ensure_shard_schema(&mut conn, &cfg)
            .await
            .expect("shard schema");
    });
    psql(
        pg,
        "CREATE TABLE issue (id TEXT PRIMARY KEY, title TEXT, priority INTEGER, meta JSONB, done BOOLEAN);
         CREATE SCHEMA app;
         CREATE TABLE app.item (a INTEGER, b TEXT, v TEXT, PRIMARY KEY (a, b));",
    );
    upstream
}

fn mutation(id: u64, client: &str, ops: serde_json::Value) -> CrudMutation {
    parse_crud_mutation(&json!({"type": "crud", "id": id, "clientID": client,
        "name": "_zero_crud", "timestamp": 1, "args": [{"ops": ops}]}))
    .expect("valid mutation")
}

fn insert(table: &str, value: serde_json::Value) -> serde_json::Value {
    json!({"op": "insert", "tableName": table, "primaryKey": ["id"], "value": value})
}

fn lmid(pg: &PgCluster, client: &str) -> String {
    psql(
        pg,
        &format!(
            "SELECT \"lastMutationID\" FROM {SHARD}.clients WHERE \"clientGroupID\" = '{CG}' AND \"clientID\" = '{client}'"
        ),
    )
    .trim()
    .to_string()
}

fn issues(pg: &PgCluster) -> String {
    psql(
        pg,
        "SELECT id, title, priority, meta, done FROM issue ORDER BY id",
    )
}

async fn apply(g: &Mutagen, m: &CrudMutation, v: Verdict) -> Outcome {
    with_timeout("apply", g.apply(CG, m, v))
        .await
        .unwrap_or_else(|e| panic!("mutation {} failed: {e}", m.id))
}

#[test]
fn ops_reach_postgres_and_bump_the_lmid() {
    let pg = cluster(&[]);
    let upstream = prepare(&pg);
    run(async {
        let g = Mutagen::new(upstream, SHARD.into(), 2);
        let m1 = mutation(
            1,
            "c1",
            json!([insert(
                "issue",
                json!({"id": "i1", "title": "it's a \\ back", "priority": 1,
                "meta": {"tags": ["a", "b'c"]}, "done": false})
            )]),
        );
        assert_eq!(apply(&g, &m1, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(lmid(&pg, "c1"), "1");
        assert_eq!(
            issues(&pg),
            "i1|it's a \\ back|1|{\"tags\": [\"a\", \"b'c\"]}|f\n"
        );

        // Insert of a present row: ON CONFLICT DO NOTHING.
        let m2 = mutation(
            2,
            "c1",
            json!([insert("issue", json!({"id": "i1", "title": "no"}))]),
        );
        assert_eq!(apply(&g, &m2, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(lmid(&pg, "c1"), "2");
        assert!(issues(&pg).starts_with("i1|it's a \\ back|"));

        // Upsert of a present row updates every column given; of a new row inserts it.
        let m3 = mutation(
            3,
            "c1",
            json!([
                {"op": "upsert", "tableName": "issue", "primaryKey": ["id"],
                 "value": {"id": "i1", "title": "up", "priority": "7"}},
                {"op": "upsert", "tableName": "issue", "primaryKey": ["id"],
                 "value": {"id": "i2", "title": "new", "done": true}}
            ]),
        );
        assert_eq!(apply(&g, &m3, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(lmid(&pg, "c1"), "3");
        assert_eq!(
            issues(&pg),
            "i1|up|7|{\"tags\": [\"a\", \"b'c\"]}|f\ni2|new|||t\n"
        );

        // Update: the columns given, the key in WHERE.
        let m4 = mutation(
            4,
            "c1",
            json!([{"op": "update", "tableName": "issue", "primaryKey": ["id"],
                    "value": {"id": "i2", "priority": 3, "meta": null}}]),
        );
        assert_eq!(apply(&g, &m4, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(issues(&pg).lines().nth(1), Some("i2|new|3||t"));

        // Delete.
        let m5 = mutation(
            5,
            "c1",
            json!([{"op": "delete", "tableName": "issue", "primaryKey": ["id"], "value": {"id": "i1"}}]),
        );
        assert_eq!(apply(&g, &m5, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(issues(&pg), "i2|new|3||t\n");
        assert_eq!(lmid(&pg, "c1"), "5");

        // A schema-qualified table and a composite key, numbers into the integer column.
        let key = json!(["a", "b"]);
        let m6 = mutation(
            6,
            "c1",
            json!([
                {"op": "insert", "tableName": "app.item", "primaryKey": key, "value": {"a": 1, "b": "x", "v": "one"}},
                {"op": "insert", "tableName": "app.item", "primaryKey": key, "value": {"a": 2, "b": "x", "v": "two"}},
                {"op": "update", "tableName": "app.item", "primaryKey": key, "value": {"a": 1, "b": "x", "v": "uno"}},
                {"op": "delete", "tableName": "app.item", "primaryKey": key, "value": {"a": 2, "b": "x"}}
            ]),
        );
        assert_eq!(apply(&g, &m6, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(psql(&pg, "SELECT a, b, v FROM app.item"), "1|x|uno\n");
        assert_eq!(lmid(&pg, "c1"), "6");

        // Denied and authorizer failures bump the lmid only.
        let m7 = mutation(7, "c1", json!([insert("issue", json!({"id": "i7"}))]));
        assert_eq!(apply(&g, &m7, Verdict::Denied).await, Outcome::Denied);
        let m8 = mutation(8, "c1", json!([insert("issue", json!({"id": "i8"}))]));
        let failed = Verdict::Failed("Error: Table 'nope' is not a valid table.".into());
        assert_eq!(
            apply(&g, &m8, failed).await,
            Outcome::Failed("Error: Table 'nope' is not a valid table.".into())
        );
        assert_eq!(lmid(&pg, "c1"), "8");
        assert_eq!(issues(&pg), "i2|new|3||t\n");

        // Another client of the group starts at 1; the clients row of c1 is untouched.
        let other = mutation(1, "c2", json!([]));
        assert_eq!(apply(&g, &other, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!((lmid(&pg, "c2"), lmid(&pg, "c1")), ("1".into(), "8".into()));
    });
}

#[test]
fn duplicates_are_ignored_and_gaps_refused() {
    let pg = cluster(&[]);
    let upstream = prepare(&pg);
    run(async {
        let g = Mutagen::new(upstream, SHARD.into(), 1);
        // The first mutation of a client must have id 1.
        let gap0 = mutation(2, "c1", json!([insert("issue", json!({"id": "g"}))]));
        let e = g.apply(CG, &gap0, Verdict::Allowed).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidPush);
        assert_eq!(
            e.message,
            "Push contains unexpected mutation id 2 for client c1. Expected mutation id 1."
        );
        assert_eq!(lmid(&pg, "c1"), "");

        let m1 = mutation(
            1,
            "c1",
            json!([insert("issue", json!({"id": "i1", "title": "a"}))]),
        );
        assert_eq!(apply(&g, &m1, Verdict::Allowed).await, Outcome::Applied);
        let m2 = mutation(
            2,
            "c1",
            json!([insert("issue", json!({"id": "i2", "title": "b"}))]),
        );
        assert_eq!(apply(&g, &m2, Verdict::Allowed).await, Outcome::Applied);
        let before = issues(&pg);

        // A duplicate: silently ignored, whatever its ops and verdict.
        let dup = mutation(
            1,
            "c1",
            json!([{"op": "delete", "tableName": "issue", "primaryKey": ["id"], "value": {"id": "i1"}}]),
        );
        for v in [
            Verdict::Allowed,
            Verdict::Denied,
            Verdict::Failed("Error: x".into()),
        ] {
            assert_eq!(apply(&g, &dup, v).await, Outcome::AlreadyProcessed);
        }
        assert_eq!(lmid(&pg, "c1"), "2");
        assert_eq!(issues(&pg), before);

        // A gap: fatal InvalidPush, nothing written, lmid unchanged.
        let gap = mutation(
            5,
            "c1",
            json!([{"op": "delete", "tableName": "issue", "primaryKey": ["id"], "value": {"id": "i1"}}]),
        );
        for v in [Verdict::Allowed, Verdict::Denied] {
            let e = g.apply(CG, &gap, v).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidPush);
            assert_eq!(
                e.message,
                "Push contains unexpected mutation id 5 for client c1. Expected mutation id 3."
            );
        }
        assert_eq!(lmid(&pg, "c1"), "2");
        assert_eq!(issues(&pg), before);

        // The connection is still good for the next mutation.
        let m3 = mutation(3, "c1", json!([]));
        assert_eq!(apply(&g, &m3, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(lmid(&pg, "c1"), "3");
        assert_eq!(g.idle_conns(), 1);
    });
}

#[test]
fn postgres_errors_fail_the_mutation_and_bump_the_lmid() {
    let pg = cluster(&[]);
    let upstream = prepare(&pg);
    run(async {
        let g = Mutagen::new(upstream, SHARD.into(), 1);
        let m1 = mutation(
            1,
            "c1",
            json!([insert("issue", json!({"id": "i1", "priority": 1}))]),
        );
        assert_eq!(apply(&g, &m1, Verdict::Allowed).await, Outcome::Applied);
        let before = issues(&pg);

        let bad = mutation(
            2,
            "c1",
            json!([{"op": "update", "tableName": "issue", "primaryKey": ["id"],
                    "value": {"id": "i1", "priority": "abc"}}]),
        );
        assert_eq!(
            apply(&g, &bad, Verdict::Allowed).await,
            Outcome::Failed("PostgresError: invalid input syntax for type integer: \"abc\"".into())
        );
        assert_eq!(lmid(&pg, "c1"), "2");
        assert_eq!(issues(&pg), before);

        // A later op failing undoes the earlier ones of the same mutation.
        let half = mutation(
            3,
            "c1",
            json!([
                insert("issue", json!({"id": "i3", "title": "x"})),
                insert("nope", json!({"id": "i4"}))
            ]),
        );
        assert_eq!(
            apply(&g, &half, Verdict::Allowed).await,
            Outcome::Failed("PostgresError: relation \"nope\" does not exist".into())
        );
        assert_eq!(lmid(&pg, "c1"), "3");
        assert_eq!(issues(&pg), before);

        // A key value that is not a scalar: refused before Postgres, lmid bumped.
        let key = mutation(
            4,
            "c1",
            json!([{"op": "delete", "tableName": "issue", "primaryKey": ["id"], "value": {"id": ["i1"]}}]),
        );
        assert_eq!(
            apply(&g, &key, Verdict::Allowed).await,
            Outcome::Failed(
                "Error: The delete of table issue: primary key column 'id' must be a string, \
                 number or boolean, not an array"
                    .into()
            )
        );
        // A NUL in a value.
        let nul = mutation(
            5,
            "c1",
            json!([insert("issue", json!({"id": "i5", "title": "a\u{0}b"}))]),
        );
        assert_eq!(
            apply(&g, &nul, Verdict::Allowed).await,
            Outcome::Failed(
                "Error: a value holds a NUL character, which Postgres cannot store in text".into()
            )
        );
        assert_eq!(lmid(&pg, "c1"), "5");
        assert_eq!(issues(&pg), before);
    });
}

#[test]
fn serialization_failures_are_retried() {
    let pg = cluster(&[]);
    let upstream = prepare(&pg);
    psql(
        &pg,
        "CREATE SEQUENCE flaky_attempts; CREATE SEQUENCE doomed_attempts;
         CREATE TABLE flaky (id TEXT PRIMARY KEY); CREATE TABLE doomed (id TEXT PRIMARY KEY);
         CREATE FUNCTION flaky_fail() RETURNS trigger AS $$ BEGIN
           IF nextval('flaky_attempts') <= 2 THEN
             RAISE EXCEPTION 'provoked' USING ERRCODE = 'serialization_failure'; END IF;
           RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE FUNCTION doomed_fail() RETURNS trigger AS $$ BEGIN
           PERFORM nextval('doomed_attempts');
           RAISE EXCEPTION 'provoked' USING ERRCODE = 'serialization_failure'; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER flaky_t BEFORE INSERT ON flaky FOR EACH ROW EXECUTE FUNCTION flaky_fail();
         CREATE TRIGGER doomed_t BEFORE INSERT ON doomed FOR EACH ROW EXECUTE FUNCTION doomed_fail();",
    );
    run(async {
        let g = Rc::new(Mutagen::new(upstream.clone(), SHARD.into(), 2));
        let m1 = mutation(1, "c1", json!([insert("issue", json!({"id": "i1"}))]));
        assert_eq!(apply(&g, &m1, Verdict::Allowed).await, Outcome::Applied);

        // A real conflict: another SERIALIZABLE transaction updates the client's row and
        // commits while the mutation waits for its lock.
        let mut other = zcache::pgrepl::connect(&upstream, false)
            .await
            .expect("connect");
        other
            .execute(&format!(
                "BEGIN ISOLATION LEVEL SERIALIZABLE;
                 UPDATE {SHARD}.clients SET \"lastMutationID\" = \"lastMutationID\"
                   WHERE \"clientGroupID\" = '{CG}' AND \"clientID\" = 'c1'"
            ))
            .await
            .expect("hold the row");
        let m2 = mutation(2, "c1", json!([insert("issue", json!({"id": "i2"}))]));
        let task = glommio::spawn_local({
            let g = g.clone();
            let m2 = m2.clone();
            async move { g.apply(CG, &m2, Verdict::Allowed).await }
        });
        let mut waits = 0;
        while psql(&pg, "SELECT count(*) FROM pg_locks WHERE NOT granted").trim() != "1" {
            waits += 1;
            assert!(waits < 500, "the mutation never waited for the row lock");
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        other.execute("COMMIT").await.expect("commit");
        let outcome = with_timeout("the conflicting mutation", task).await;
        assert_eq!(outcome.expect("applied"), Outcome::Applied);
        let log = std::fs::read_to_string(pg.log_path()).expect("server log");
        assert_eq!(
            log.matches("could not serialize access due to concurrent update")
                .count(),
            1,
            "the first attempt should have failed once:\n{log}"
        );
        assert_eq!(lmid(&pg, "c1"), "2");
        assert_eq!(issues(&pg).lines().count(), 2);

        // Two failures, then the third attempt commits, once.
        let m3 = mutation(3, "c1", json!([insert("flaky", json!({"id": "f"}))]));
        assert_eq!(apply(&g, &m3, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(
            psql(&pg, "SELECT last_value FROM flaky_attempts").trim(),
            "3"
        );
        assert_eq!(psql(&pg, "SELECT id FROM flaky"), "f\n");
        assert_eq!(lmid(&pg, "c1"), "3");

        // Failing every time: given up after the last attempt, nothing bumped.
        let m4 = mutation(4, "c1", json!([insert("doomed", json!({"id": "d"}))]));
        let e = with_timeout("doomed", g.apply(CG, &m4, Verdict::Allowed))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("serialization failure"), "{e}");
        assert_eq!(
            psql(&pg, "SELECT last_value FROM doomed_attempts").trim(),
            SERIALIZATION_ATTEMPTS_MAX.to_string()
        );
        assert_eq!(lmid(&pg, "c1"), "3");
        // The same id goes through once it can.
        assert_eq!(
            apply(&g, &mutation(4, "c1", json!([])), Verdict::Allowed).await,
            Outcome::Applied
        );
        assert_eq!(lmid(&pg, "c1"), "4");
    });
}

#[test]
fn the_pool_holds_at_most_conns_max() {
    let pg = cluster(&[]);
    let upstream = prepare(&pg);
    run(async {
        let g = Rc::new(Mutagen::new(upstream, SHARD.into(), 2));
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let g = g.clone();
                glommio::spawn_local(async move {
                    let m = mutation(
                        1,
                        &format!("c{i}"),
                        json!([insert("issue", json!({"id": format!("i{i}")}))]),
                    );
                    g.apply(CG, &m, Verdict::Allowed).await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(
                with_timeout("apply", t).await.expect("applied"),
                Outcome::Applied
            );
        }
        assert_eq!(g.idle_conns(), 2);
        assert_eq!(issues(&pg).lines().count(), 6);
    });
}

#[test]
fn a_lost_upstream_is_an_error_and_then_reconnected() {
    let data = tempfile::tempdir().expect("tempdir");
    let options = PgClusterOptions {
        data_dir: Some(data.path().join("pg")),
        ..PgClusterOptions::default()
    };
    let mut pg = PgCluster::start(options.clone()).expect("start PostgreSQL");
    let port = pg.port();
    let upstream = prepare(&pg);
    // One executor throughout: the pool's sockets belong to the executor that opened them.
    run(async move {
        let g = Mutagen::new(upstream, SHARD.into(), 1);
        let m1 = mutation(1, "c1", json!([insert("issue", json!({"id": "i1"}))]));
        assert_eq!(apply(&g, &m1, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(g.idle_conns(), 1);
        // The pooled connection is killed while idle: the next mutation reconnects.
        psql(
            &pg,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        );
        glommio::timer::sleep(Duration::from_millis(100)).await;
        let m2 = mutation(2, "c1", json!([insert("issue", json!({"id": "i2"}))]));
        assert_eq!(apply(&g, &m2, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(lmid(&pg, "c1"), "2");

        pg.stop();
        let m3 = mutation(3, "c1", json!([insert("issue", json!({"id": "i3"}))]));
        let e = with_timeout("apply while down", g.apply(CG, &m3, Verdict::Allowed))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("upstream Postgres"), "{e}");
        // Still down, with no connection in the pool: the connect fails.
        let e = with_timeout("apply while down", g.apply(CG, &m3, Verdict::Allowed))
            .await
            .unwrap_err();
        assert!(e.message.contains("could not connect"), "{e}");
        assert_eq!(g.idle_conns(), 0);

        let pg = PgCluster::start(PgClusterOptions {
            port: Some(port),
            ..options
        })
        .expect("restart PostgreSQL");
        assert_eq!(apply(&g, &m3, Verdict::Allowed).await, Outcome::Applied);
        assert_eq!(lmid(&pg, "c1"), "3");
        assert_eq!(
            psql(&pg, "SELECT id FROM issue ORDER BY id"),
            "i1\ni2\ni3\n"
        );
    });
}
