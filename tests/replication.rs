//! The replicator against a real PostgreSQL: the initial sync of every supported column type,
//! streaming of random transactions (property test), the confirmed LSN never passing the
//! replica's watermark, resuming an existing replica, and the wal_level check.

mod support;

use std::cell::Cell as StdCell;
use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use support::*;
use zcache::embedded::pgcluster::PgCluster;
use zcache::pgrepl::Lsn;
use zcache::replicator::setup::SetupError;
use zcache::replicator::{self, ReplError};
use zcache::zql::value::Value;

// ---------------------------------------------------------------------------------------------
// 1. Initial sync of every type, then the same values through the stream

const TYPES_SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy 😀');
CREATE TABLE everything (
  id int4 PRIMARY KEY,
  t text, i2 int2, i8 int8, f4 float4, f8 float8, num numeric, b bool,
  ts timestamptz, tsn timestamp, d date, j json, jb jsonb, ta text[], ia int4[],
  m mood, u uuid, vc varchar(20), blob bytea
);
CREATE TABLE pairs (k1 text, k2 int8, note text, PRIMARY KEY (k1, k2));
CREATE TABLE keyless (x int4, y text);
CREATE TABLE "Mixed ""Case""" ("Id" text PRIMARY KEY, "Value" int4);
INSERT INTO everything VALUES
  (1, 'hello', 7, 42, 1.5, 2.25, 3.125, true,
   '2023-11-14 22:13:20.123456+00', '2023-11-14 22:13:20', '2023-11-14',
   '{"a": 1, "b": [true, null, "x"]}', '{"z": {"y": 2.5}, "a": "é"}',
   '{a,"b c"}', '{1,2,3}', 'ok', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'short',
   '\xdeadbeef'),
  (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL),
  (3, E'tab\there\nnew line \\ back ''quote'' "dq" ünï 🙂 中文', -32768, 9223372036854775807,
   1.1, 'Infinity', 12345678901234567890.123, false,
   '1969-07-20 20:17:40.5+02', 'infinity', '0044-03-15 BC',
   E'{"ws" :\n  [1, 2.5e3, "\\u00e9\\n"]}', '[1, "two", {"3": null}]',
   '{"a b",NULL,"","\"q\"","NULL","123","t","é",1e5}', '{1,NULL,-3}',
   'happy 😀', '00000000-0000-0000-0000-000000000000', 'ünïcødé',
   ''),
  (4, '', 0, -9007199254740993, '-0', 'NaN', 'NaN', true,
   '-infinity', '1900-02-28 23:59:59.999', '2000-02-29',
   '"just a string"', 'false', '{}', '{{1,2},{3,4}}',
   'sad', NULL, '', NULL),
  (5, 'null', 1, 1, 1e-30, 1e300, -0.000001, false,
   '2262-04-11 23:47:16.854775+00', '1970-01-01 00:00:00.000001', '1970-01-01',
   'null', '{"nested": {"deep": [[], {}]}}', '{NULL}', '{NULL,NULL}',
   'ok', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'x', NULL);
INSERT INTO pairs VALUES ('a', 1, 'one'), ('a', 2, NULL), ('b', 1, 'ü'), ('', 0, '');
INSERT INTO keyless VALUES (1, 'x'), (1, 'x');
INSERT INTO "Mixed ""Case""" VALUES ('K', 1), ('k', NULL);
"#;

fn types_tables() -> Vec<Table> {
    use Canon::*;
    vec![
        Table::new(
            "public",
            "everything",
            &[
                ("id", Int),
                ("t", Text),
                ("i2", Int),
                ("i8", Int),
                ("f4", Float),
                ("f8", Float),
                ("num", Float),
                ("b", Bool),
                ("ts", Time),
                ("tsn", Time),
                ("d", Time),
                ("j", Json),
                ("jb", Json),
                ("ta", Json),
                ("ia", Json),
                ("m", Text),
                ("u", Text),
                ("vc", Text),
            ],
            &["id"],
        ),
        Table::new(
            "public",
            "pairs",
            &[("k1", Text), ("k2", Int), ("note", Text)],
            &["k1", "k2"],
        ),
        Table::new(
            "public",
            "Mixed \"Case\"",
            &[("Id", Text), ("Value", Int)],
            &["Id"],
        ),
    ]
}

#[test]
fn initial_sync_and_stream_keep_every_type() {
    let pg = cluster(&[]);
    psql(&pg, TYPES_SCHEMA);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(&pg, &path, "types", &[]);
    let tables = types_tables();
    run(async {
        let prepared = prepare(&cfg).await;
        // Tables without a primary key are not synced; bytea columns are left out.
        assert!(prepared.replica.spec("keyless").is_err());
        let synced = assert_replica_equals_upstream(&pg, &path, &tables);
        assert_eq!(
            prepared.replica.watermark().expect("watermark"),
            Some(synced)
        );
        assert_eq!(
            prepared.publications,
            ["_types_public_0", "_types_metadata_0"]
        );

        // The same values through the stream (pgoutput's text form rather than COPY's).
        let st = start_streaming(&cfg, prepared).await;
        let at = commit(
            &pg,
            "INSERT INTO everything SELECT id + 100, t, i2, i8, f4, f8, num, b, ts, tsn, d, j, jb,
               ta, ia, m, u, vc, blob FROM everything;
             UPDATE everything SET t = t || '!', ta = ta || '{x}'::text[] WHERE id IN (1, 3);
             UPDATE everything SET id = 6 WHERE id = 5;
             DELETE FROM everything WHERE id = 2;",
        );
        let v = version_of(&st.rx, at).await;
        assert_eq!(v.tables, ["everything"]);
        let w = assert_replica_equals_upstream(&pg, &path, &tables);
        assert_eq!(w, v.watermark);

        let at = commit(
            &pg,
            r#"UPDATE pairs SET k2 = 3 WHERE k1 = 'a' AND k2 = 2;
               UPDATE "Mixed ""Case""" SET "Value" = 2 WHERE "Id" = 'K';
               INSERT INTO keyless VALUES (2, 'y');"#,
        );
        let v = version_of(&st.rx, at).await;
        assert_eq!(v.tables, ["Mixed \"Case\"", "pairs"]);
        assert_replica_equals_upstream(&pg, &path, &tables);
        st.stop().await;
    });
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. Random transactions stream into the replica; the slot is confirmed no further

/// Primary keys per table are drawn from this many values, so operations collide often.
const KEYS: u8 = 6;
const B_K1: [&str; 3] = ["x", "é", "🙂"];
const TEXTS: [Option<&str>; 7] = [
    Some("plain"),
    Some("tab\there"),
    Some("new\nline"),
    Some("back\\slash"),
    Some("quote'd \"dq\""),
    Some("ünïcødé 🙂 中文"),
    None,
];
/// Random cases of the streaming property; each takes about a second.
const STREAM_CASES: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tbl {
    A,
    B,
}

#[derive(Debug, Clone)]
enum Op {
    /// INSERT .. ON CONFLICT DO UPDATE (an update keeps `big`: an unchanged TOAST value).
    Upsert {
        t: Tbl,
        key: u8,
        val: u8,
    },
    /// UPDATE of the non-key columns; `big` also rewrites a's TOASTed column.
    Update {
        t: Tbl,
        key: u8,
        val: u8,
        big: bool,
    },
    /// A primary-key change (a no-op when `to` is taken).
    Rekey {
        t: Tbl,
        from: u8,
        to: u8,
    },
    Delete {
        t: Tbl,
        key: u8,
    },
    Truncate {
        a: bool,
        b: bool,
    },
}

#[derive(Debug, Clone)]
struct StreamCase {
    /// Applied before the initial sync.
    initial: Vec<Op>,
    /// Each committed upstream while streaming.
    txns: Vec<Vec<Op>>,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let t = prop_oneof![Just(Tbl::A), Just(Tbl::B)];
    prop_oneof![
        4 => (t.clone(), 0..KEYS, any::<u8>()).prop_map(|(t, key, val)| Op::Upsert { t, key, val }),
        3 => (t.clone(), 0..KEYS, any::<u8>(), any::<bool>())
            .prop_map(|(t, key, val, big)| Op::Update { t, key, val, big }),
        2 => (t.clone(), 0..KEYS, 0..KEYS).prop_map(|(t, from, to)| Op::Rekey { t, from, to }),
        2 => (t, 0..KEYS).prop_map(|(t, key)| Op::Delete { t, key }),
        1 => prop_oneof![Just((true, false)), Just((false, true)), Just((true, true))]
            .prop_map(|(a, b)| Op::Truncate { a, b }),
    ]
}

fn case_strategy() -> impl Strategy<Value = StreamCase> {
    (
        prop::collection::vec(op_strategy(), 0..8),
        prop::collection::vec(prop::collection::vec(op_strategy(), 1..5), 1..6),
    )
        .prop_map(|(initial, txns)| StreamCase { initial, txns })
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn opt_lit(s: Option<&str>) -> String {
    s.map(lit).unwrap_or_else(|| "NULL".into())
}

/// a's column values (v, n, big) for `val`; `big` is over 2 kB, so stored out of line.
fn a_values(val: u8) -> (String, String, String) {
    let v = opt_lit(TEXTS[val as usize % TEXTS.len()]);
    let n = match val % 5 {
        0 => "NULL".to_string(),
        _ => ((val as i64 - 128) * (1 << 36)).to_string(),
    };
    let big = match val % 3 {
        0 => "NULL".to_string(),
        _ => format!(
            "repeat({}, {})",
            lit(&format!("{val}é")),
            1200 + val as u32 * 4
        ),
    };
    (v, n, big)
}

/// b's column values (payload, ts, flag) for `val`.
fn b_values(val: u8) -> (String, String, String) {
    let payload = match val % 4 {
        0 => "NULL".to_string(),
        1 => "'null'".to_string(),
        _ => lit(&format!(
            r#"{{"v": {val}, "s": "é\"{val}", "arr": [1, null, true]}}"#
        )),
    };
    let ts = match val % 3 {
        0 => "NULL".to_string(),
        _ => format!("to_timestamp({val} * 86400.123456)"),
    };
    let flag = match val % 7 {
        0 => "NULL",
        _ if val.is_multiple_of(2) => "true",
        _ => "false",
    };
    (payload, ts, flag.to_string())
}

fn b_key(key: u8) -> (String, u8) {
    (lit(B_K1[key as usize % B_K1.len()]), key / B_K1.len() as u8)
}

fn op_sql(s: &str, op: &Op) -> String {
    match *op {
        Op::Upsert {
            t: Tbl::A,
            key,
            val,
        } => {
            let (v, n, big) = a_values(val);
            format!(
                "INSERT INTO {s}.a VALUES ({key}, {v}, {n}, {big})
                 ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, n = EXCLUDED.n;"
            )
        }
        Op::Upsert {
            t: Tbl::B,
            key,
            val,
        } => {
            let ((k1, k2), (p, ts, f)) = (b_key(key), b_values(val));
            format!(
                "INSERT INTO {s}.b VALUES ({k1}, {k2}, {p}, {ts}, {f}) ON CONFLICT (k1, k2)
                 DO UPDATE SET payload = EXCLUDED.payload, ts = EXCLUDED.ts, flag = EXCLUDED.flag;"
            )
        }
        Op::Update {
            t: Tbl::A,
            key,
            val,
            big,
        } => {
            let (v, n, b) = a_values(val);
            let big = if big {
                format!(", big = {b}")
            } else {
                String::new()
            };
            format!("UPDATE {s}.a SET v = {v}, n = {n}{big} WHERE id = {key};")
        }
        Op::Update {
            t: Tbl::B,
            key,
            val,
            big,
        } => {
            let ((k1, k2), (p, ts, f)) = (b_key(key), b_values(val));
            let flag = if big {
                format!(", flag = {f}")
            } else {
                String::new()
            };
            format!(
                "UPDATE {s}.b SET payload = {p}, ts = {ts}{flag} WHERE k1 = {k1} AND k2 = {k2};"
            )
        }
        Op::Rekey {
            t: Tbl::A,
            from,
            to,
        } => format!(
            "UPDATE {s}.a SET id = {to} WHERE id = {from}
             AND NOT EXISTS (SELECT FROM {s}.a WHERE id = {to});"
        ),
        Op::Rekey {
            t: Tbl::B,
            from,
            to,
        } => {
            let ((f1, f2), (t1, t2)) = (b_key(from), b_key(to));
            format!(
                "UPDATE {s}.b SET k1 = {t1}, k2 = {t2} WHERE k1 = {f1} AND k2 = {f2}
                 AND NOT EXISTS (SELECT FROM {s}.b WHERE k1 = {t1} AND k2 = {t2});"
            )
        }
        Op::Delete { t: Tbl::A, key } => format!("DELETE FROM {s}.a WHERE id = {key};"),
        Op::Delete { t: Tbl::B, key } => {
            let (k1, k2) = b_key(key);
            format!("DELETE FROM {s}.b WHERE k1 = {k1} AND k2 = {k2};")
        }
        Op::Truncate { a, b } => {
            let names: Vec<String> = [(a, "a"), (b, "b")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| format!("{s}.{n}"))
                .collect();
            format!("TRUNCATE {};", names.join(", "))
        }
    }
}

/// The replica names of the tables an operation names.
fn op_tables(s: &str, op: &Op) -> Vec<String> {
    let name = |t: Tbl| match t {
        Tbl::A => format!("{s}.a"),
        Tbl::B => format!("{s}.b"),
    };
    match *op {
        Op::Upsert { t, .. }
        | Op::Update { t, .. }
        | Op::Rekey { t, .. }
        | Op::Delete { t, .. } => {
            vec![name(t)]
        }
        Op::Truncate { a, b } => [(a, Tbl::A), (b, Tbl::B)]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, t)| name(*t))
            .collect(),
    }
}

fn stream_tables(s: &str) -> Vec<Table> {
    use Canon::*;
    vec![
        Table::new(
            s,
            "a",
            &[("id", Int), ("v", Text), ("n", Int), ("big", Text)],
            &["id"],
        ),
        Table::new(
            s,
            "b",
            &[
                ("k1", Text),
                ("k2", Int),
                ("payload", Json),
                ("ts", Time),
                ("flag", Bool),
            ],
            &["k1", "k2"],
        ),
        Table::new(s, "tick", &[("id", Int), ("n", Int)], &["id"]),
    ]
}

/// Creates schema `s` with tables a, b and tick, and publication `p` over it.
fn create_stream_schema(pg: &PgCluster, s: &str, p: &str, initial: &[Op]) {
    let mut sql = format!(
        "CREATE SCHEMA {s};
         CREATE TABLE {s}.a (id int4 PRIMARY KEY, v text, n int8, big text);
         ALTER TABLE {s}.a ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE {s}.b (k1 text, k2 int4, payload jsonb, ts timestamptz, flag bool,
           PRIMARY KEY (k1, k2));
         CREATE TABLE {s}.tick (id int4 PRIMARY KEY, n int4);
         CREATE PUBLICATION {p} FOR TABLES IN SCHEMA {s};\n"
    );
    for op in initial {
        sql.push_str(&op_sql(s, op));
        sql.push('\n');
    }
    psql(pg, &sql);
}

/// Polls the slot until Postgres has the confirmation of `watermark`; returns its LSN.
async fn confirmed_at_least(pg: &PgCluster, slot: &str, watermark: u64) -> u64 {
    with_timeout("the slot's confirmation", async {
        loop {
            let confirmed = slot_confirmed_lsn(pg, slot).expect("the slot exists");
            if confirmed >= watermark {
                return confirmed;
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn run_stream_case(pg: &PgCluster, n: u32, case: &StreamCase) {
    let (s, p) = (format!("s{n}"), format!("p{n}"));
    create_stream_schema(pg, &s, &p, &case.initial);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(pg, &path, &format!("t{n}"), &[&p]);
    let tables = stream_tables(&s);
    let tick = format!("{s}.tick");
    let slot = run(async {
        let prepared = prepare(&cfg).await;
        let slot = prepared.slot.clone();
        assert_replica_equals_upstream(pg, &path, &tables);
        let st = start_streaming(&cfg, prepared).await;
        let mut before: Vec<Rows> = tables.iter().map(|t| upstream_rows(pg, t)).collect();
        let mut last = 0;
        for (i, txn) in case.txns.iter().enumerate() {
            // The tick makes every transaction change something, so each has a version.
            let mut body: String = txn.iter().map(|op| op_sql(&s, op) + "\n").collect();
            body.push_str(&format!(
                "INSERT INTO {tick} VALUES (1, {i}) ON CONFLICT (id) DO UPDATE SET n = {i};"
            ));
            let at = commit(pg, &body);
            let v = version_of(&st.rx, at).await;

            let after: Vec<Rows> = tables.iter().map(|t| upstream_rows(pg, t)).collect();
            let (w, replica) = replica_snapshot(&path, &tables);
            assert_eq!(w, v.watermark, "the replica's watermark after txn {i}");
            for ((t, got), want) in tables.iter().zip(&replica).zip(&after) {
                if let Some(diff) = diff_rows(t, got, want) {
                    panic!(
                        "after txn {i}, the replica's {} differs:\n{diff}",
                        t.replica
                    );
                }
            }

            // Tables whose rows changed <= the version's tables <= tables the txn named.
            let reported: BTreeSet<String> = v.tables.iter().cloned().collect();
            assert_eq!(
                reported.len(),
                v.tables.len(),
                "duplicates in {:?}",
                v.tables
            );
            let named: BTreeSet<String> = txn
                .iter()
                .flat_map(|op| op_tables(&s, op))
                .chain([tick.clone()])
                .collect();
            let changed: BTreeSet<String> = tables
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| b != a)
                .map(|(t, _)| t.replica.clone())
                .collect();
            assert!(
                changed.is_subset(&reported) && reported.is_subset(&named),
                "txn {i}: changed {changed:?}, reported {reported:?}, named {named:?}"
            );
            before = after;
            last = v.watermark;
        }

        // 3. Postgres gets the confirmation, and it is no further than the replica.
        let confirmed = confirmed_at_least(pg, &slot, last).await;
        let (w, _) = replica_snapshot(&path, &tables);
        assert!(
            confirmed <= w,
            "confirmed {} past the replica's watermark {}",
            Lsn(confirmed),
            Lsn(w)
        );
        st.stop().await;
        slot
    });
    drop_slot(pg, &slot);
}

#[test]
fn streamed_transactions_keep_the_replica_equal_to_upstream() {
    let pg = cluster(&[]);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: STREAM_CASES,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let n = StdCell::new(0u32);
    let result = runner.run(&case_strategy(), |case| {
        n.set(n.get() + 1);
        run_stream_case(&pg, n.get(), &case);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Resume (and 3 again, with idle keepalives)

#[test]
fn resumes_the_replica_and_never_confirms_past_it() {
    // Replies are requested after 1 s of silence, so idle keepalives get answered.
    let pg = cluster(&["wal_sender_timeout = '2s'"]);
    psql(
        &pg,
        "CREATE TABLE a (id int4 PRIMARY KEY, v text);
         CREATE TABLE b (k1 text, k2 int4, note jsonb, PRIMARY KEY (k1, k2));
         CREATE SCHEMA unpub;
         CREATE TABLE unpub.noise (x int4);
         INSERT INTO a SELECT i, 'v' || i FROM generate_series(1, 20) i;
         INSERT INTO b VALUES ('a', 1, '{}');",
    );
    let tables = vec![
        Table::new(
            "public",
            "a",
            &[("id", Canon::Int), ("v", Canon::Text)],
            &["id"],
        ),
        Table::new(
            "public",
            "b",
            &[
                ("k1", Canon::Text),
                ("k2", Canon::Int),
                ("note", Canon::Json),
            ],
            &["k1", "k2"],
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(&pg, &path, "r", &[]);

    let (slot, first_watermark) = run(async {
        let prepared = prepare(&cfg).await;
        let slot = prepared.slot.clone();
        let st = start_streaming(&cfg, prepared).await;
        for i in 0..3 {
            let at = commit(
                &pg,
                &format!(
                    "UPDATE a SET v = v || '{i}' WHERE id % 3 = {i};
                     INSERT INTO b VALUES ('n', {i}, '[{i}]');"
                ),
            );
            assert_eq!(version_of(&st.rx, at).await.tables, ["a", "b"]);
        }
        let w = assert_replica_equals_upstream(&pg, &path, &tables);
        st.stop().await;
        (slot, w)
    });
    // The executor, the stream and every replica handle are gone. Upstream moves on.
    let downtime = [
        "INSERT INTO a SELECT i, 'late ' || i FROM generate_series(21, 30) i;",
        "UPDATE a SET id = id + 100 WHERE id <= 5;",
        "DELETE FROM a WHERE id BETWEEN 10 AND 12;
         UPDATE b SET k1 = 'm' WHERE k1 = 'n' AND k2 = 1;",
        "TRUNCATE b; INSERT INTO b VALUES ('after', 0, '{\"t\": true}');",
    ];
    let ats: Vec<CommitLsn> = downtime.iter().map(|sql| commit(&pg, sql)).collect();
    let (w, _) = replica_snapshot(&path, &tables);
    assert_eq!(w, first_watermark);

    run(async {
        let prepared = prepare(&cfg).await;
        // Resumed, not synced anew: same slot, same watermark, no other slot.
        assert_eq!(
            prepared.slot, slot,
            "prepare synced anew instead of resuming"
        );
        assert_eq!(
            prepared.replica.watermark().expect("watermark"),
            Some(first_watermark)
        );
        assert_eq!(slot_names(&pg), std::slice::from_ref(&slot));
        let st = start_streaming(&cfg, prepared).await;
        let mut last = 0;
        for at in &ats {
            last = version_of(&st.rx, *at).await.watermark;
        }
        assert_eq!(assert_replica_equals_upstream(&pg, &path, &tables), last);

        // WAL moves on with changes zcache does not replicate; keepalives report its end.
        for i in 0..3 {
            psql(&pg, &format!("INSERT INTO unpub.noise VALUES ({i})"));
            glommio::timer::sleep(Duration::from_millis(700)).await;
        }
        let wal_end = lsn(&psql(&pg, "SELECT pg_current_wal_lsn()"));
        glommio::timer::sleep(Duration::from_millis(2_500)).await;
        let confirmed = slot_confirmed_lsn(&pg, &slot).expect("slot");
        let (w, _) = replica_snapshot(&path, &tables);
        assert!(
            confirmed >= last,
            "the last commit {} was never confirmed ({})",
            Lsn(last),
            Lsn(confirmed)
        );
        assert!(
            confirmed <= w,
            "confirmed {} past the replica's watermark {} (WAL end {})",
            Lsn(confirmed),
            Lsn(w),
            Lsn(wal_end)
        );
        // Idle WAL recorded as the watermark is announced (syncers wait for every watermark
        // they may see), but as a version that changed nothing.
        while let Some(extra) = futures_lite::future::poll_once(st.rx.recv()).await {
            let v = extra.expect("the channel is open");
            assert!(
                v.tables.is_empty() && v.rows.as_ref().is_some_and(|r| r.is_empty()),
                "unreplicated changes made a version with changes: {v:?}"
            );
            assert!(
                v.watermark <= w,
                "an announced watermark the replica does not hold"
            );
        }
        st.stop().await;
    });

    // A third start still resumes and finds the replica equal to upstream.
    run(async {
        let prepared = prepare(&cfg).await;
        assert_eq!(prepared.slot, slot);
    });
    assert_replica_equals_upstream(&pg, &path, &tables);
}

// ---------------------------------------------------------------------------------------------
// 5. wal_level

#[test]
fn prepare_fails_unless_wal_level_is_logical() {
    let pg = cluster(&["wal_level = replica"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(&pg, &dir.path().join("replica.db"), "w", &[]);
    run(async {
        let err = with_timeout(
            "prepare",
            replicator::prepare(&cfg, &support::upstream(&cfg)),
        )
        .await
        .err()
        .expect("prepare must fail");
        assert!(
            matches!(&err, ReplError::Setup(SetupError::WalLevel(l)) if l == "replica"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("set wal_level = logical"), "{msg}");
    });
    // Nothing was set up upstream.
    assert!(slot_names(&pg).is_empty());
}

/// Times as zero-cache sends them (ms since midnight UTC, sub-ms digits dropped), and the
/// built-in types zero-cache does not sync left out of the replica.
#[test]
fn times_and_types_zero_cache_does_not_sync() {
    let pg = cluster(&[]);
    psql(
        &pg,
        "CREATE TABLE clock (id INT PRIMARY KEY, tm TIME, tz TIMETZ, ip INET, iv INTERVAL, o OID);
         INSERT INTO clock VALUES
           (1, '12:34:56.789123', '01:00:00+02', '10.0.0.1', '1 day', 7),
           (2, '24:00:00', '23:30:00-01:30', NULL, NULL, NULL),
           (3, NULL, NULL, NULL, NULL, NULL);",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(&pg, &path, "clock", &[]);
    run(async {
        let prepared = prepare(&cfg).await;
        let spec = prepared.replica.spec("clock").expect("clock is synced");
        let names: Vec<&str> = spec.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["id", "tm", "tz"],
            "inet, interval and oid are left out"
        );
    });
    let reader = zcache::sqlite::ReplicaReader::open(&path).expect("reader");
    reader.begin_snapshot().expect("snapshot");
    let mut rows = reader.fetch_rows("clock", &[]).expect("rows");
    rows.sort_by(|a, b| a[0].compare(&b[0]));
    assert_eq!(
        rows,
        vec![
            vec![
                Value::Int(1),
                Value::Int(45_296_789),
                Value::Int(82_800_000)
            ],
            vec![Value::Int(2), Value::Int(0), Value::Int(3_600_000)],
            vec![Value::Int(3), Value::Null, Value::Null],
        ]
    );
}
