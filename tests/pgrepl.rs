//! pgrepl against a real PostgreSQL started by PgCluster: queries, auth methods, COPY out,
//! slot + exported snapshot, the pgoutput stream, status updates, and cancel-safety of recv.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::LocalExecutorBuilder;
use zcache::embedded::pgcluster::{ClusterError, PgCluster, PgClusterOptions};
use zcache::pgrepl::pgoutput::{decode, OldKind, OldTuple, PgOutput, TupleValue};
use zcache::pgrepl::{
    connect, ConnConfig, Lsn, PgConn, PgError, PgStream, ReplEvent, ReplicationStream,
};

/// How long any single wait on the server may take before the test fails instead of hanging.
const WAIT_MS: u64 = 30_000;

fn run<T>(f: impl Future<Output = T>) -> T {
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("executor")
        .run(f)
}

fn cluster() -> PgCluster {
    PgCluster::start(PgClusterOptions::default()).expect("start PostgreSQL")
}

fn cfg(pg: &PgCluster) -> ConnConfig {
    ConnConfig::parse(&pg.url("postgres")).expect("url")
}

async fn with_timeout<T>(what: &str, f: impl Future<Output = T>) -> T {
    let timer = async {
        glommio::timer::sleep(Duration::from_millis(WAIT_MS)).await;
        None
    };
    future::or(async { Some(f.await) }, timer)
        .await
        .unwrap_or_else(|| panic!("timed out: {what}"))
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
}

/// The next pgoutput message, skipping keepalives.
async fn next_msg(stream: &mut ReplicationStream<PgStream>) -> PgOutput {
    loop {
        match with_timeout("recv", stream.recv()).await.expect("recv") {
            ReplEvent::XLogData { data, .. } => return decode(&data).expect("decode"),
            ReplEvent::Keepalive { .. } => continue,
        }
    }
}

/// One transaction, Begin to Commit, without the Relation/Type messages pgoutput interleaves.
async fn next_txn(stream: &mut ReplicationStream<PgStream>) -> Vec<PgOutput> {
    let first = next_msg(stream).await;
    assert!(
        matches!(first, PgOutput::Begin { .. }),
        "expected Begin, got {first:?}"
    );
    let mut msgs = vec![first];
    loop {
        let msg = next_msg(stream).await;
        let done = matches!(msg, PgOutput::Commit { .. });
        if !matches!(msg, PgOutput::Relation(_) | PgOutput::Type { .. }) {
            msgs.push(msg);
        }
        if done {
            return msgs;
        }
    }
}

fn changes(txn: &[PgOutput]) -> &[PgOutput] {
    &txn[1..txn.len() - 1]
}

#[test]
fn simple_query_returns_typed_text_results() {
    let pg = cluster();
    run(async {
        let mut conn = connect(&cfg(&pg), false).await.expect("connect");
        assert!(conn.parameter("server_version").is_some());
        assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
        assert!(conn.backend_key().is_some());

        let sql = "select 1::int4 as a, 'héllo'::text as b, null::int8 as c, true as d, \
                   1.5::numeric as e, '2020-01-02'::date as f";
        let results = conn.simple_query(sql).await.expect("select");
        assert_eq!(results.len(), 1);
        let r = &results[0];
        let cols: Vec<(&str, u32)> = r.columns.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        assert_eq!(
            cols,
            [
                ("a", 23),
                ("b", 25),
                ("c", 20),
                ("d", 16),
                ("e", 1700),
                ("f", 1082)
            ]
        );
        let want = [
            Some("1"),
            Some("héllo"),
            None,
            Some("t"),
            Some("1.5"),
            Some("2020-01-02"),
        ];
        let got: Vec<Option<&str>> = r.rows[0].iter().map(|v| v.as_deref()).collect();
        assert_eq!(got, want);
        assert_eq!(r.tag, "SELECT 1");

        let results = conn
            .simple_query(
                "create table t(x int); insert into t values (1),(2); select x from t order by x",
            )
            .await
            .expect("multi");
        let tags: Vec<&str> = results.iter().map(|r| r.tag.as_str()).collect();
        assert_eq!(tags, ["CREATE TABLE", "INSERT 0 2", "SELECT 2"]);
        assert!(results[0].columns.is_empty());
        assert_eq!(
            results[2].rows,
            vec![vec![Some("1".to_owned())], vec![Some("2".to_owned())]]
        );
        conn.close().await.expect("close");
    });
}

#[test]
fn errors_leave_the_connection_usable() {
    let pg = cluster();
    run(async {
        let mut conn = connect(&cfg(&pg), false).await.expect("connect");
        let err = conn.simple_query("select 1/0").await.unwrap_err();
        assert_eq!(err.code(), Some("22012"), "{err}");
        assert!(matches!(&err, PgError::Server { severity, .. } if severity == "ERROR"));

        let err = conn
            .simple_query("select 1; select no_such_column; select 2")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("42703"), "{err}");

        let err = conn.copy_out("select 1", |_| Ok(())).await.unwrap_err();
        assert!(matches!(err, PgError::Protocol(_)), "{err}");

        let r = conn.simple_query("select 42").await.expect("usable");
        assert_eq!(r[0].rows, vec![vec![Some("42".to_owned())]]);

        // A request abandoned mid-way poisons the connection instead of mixing up replies.
        let slow = async { Some(conn.simple_query("select pg_sleep(2)").await) };
        let timer = async {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            None
        };
        assert!(future::or(slow, timer).await.is_none());
        let err = conn.simple_query("select 1").await.unwrap_err();
        assert!(matches!(err, PgError::Desynchronized), "{err}");
    });
}

#[test]
fn copy_out_streams_rows_and_survives_callback_errors() {
    let pg = cluster();
    run(async {
        let mut conn = connect(&cfg(&pg), false).await.expect("connect");
        let mut rows = Vec::new();
        conn.copy_out(
            "COPY (select i, 'r' || i from generate_series(1, 5000) i) TO STDOUT",
            |row| {
                rows.push(String::from_utf8(row.to_vec()).expect("utf8"));
                Ok(())
            },
        )
        .await
        .expect("copy");
        assert_eq!(rows.len(), 5000);
        assert_eq!(rows[0], "1\tr1\n");
        assert_eq!(rows[4999], "5000\tr5000\n");

        let mut seen = 0;
        let err = conn
            .copy_out("COPY (select generate_series(1, 5000)) TO STDOUT", |_| {
                seen += 1;
                Err(PgError::Protocol("stop here".into()))
            })
            .await
            .unwrap_err();
        assert_eq!(seen, 1);
        assert!(err.to_string().contains("stop here"));

        let err = conn
            .copy_out("COPY no_such_table TO STDOUT", |_| Ok(()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("42P01"));
        let r = conn.simple_query("select 7").await.expect("usable");
        assert_eq!(r[0].rows, vec![vec![Some("7".to_owned())]]);
    });
}

fn prepend_hba(pg: &PgCluster, lines: &str) {
    let path = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&path).expect("read hba");
    std::fs::write(&path, format!("{lines}\n{old}")).expect("write hba");
    pg.psql("postgres", "select pg_reload_conf()")
        .expect("reload");
}

async fn connect_as(
    pg: &PgCluster,
    user: &str,
    password: Option<&str>,
) -> Result<PgConn<PgStream>, PgError> {
    let mut cfg = cfg(pg);
    cfg.user = user.to_owned();
    cfg.password = password.map(str::to_owned);
    connect(&cfg, false).await
}

#[test]
fn password_authentication_md5_scram_cleartext() {
    let pg = cluster();
    pg.psql(
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE u_md5 LOGIN PASSWORD 'md5 pw';
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE u_scram LOGIN PASSWORD 'p@ss w/rd:é';
         CREATE ROLE u_clear LOGIN PASSWORD 'clear pw';",
    )
    .expect("roles");
    let stored = pg
        .psql("postgres", "select rolname || ' ' || left(rolpassword, 3) from pg_authid where rolname like 'u\\_%' order by 1")
        .expect("stored");
    assert_eq!(stored, "u_clear SCR\nu_md5 md5\nu_scram SCR\n");
    prepend_hba(
        &pg,
        "host all u_md5 127.0.0.1/32 md5\nhost all u_scram 127.0.0.1/32 scram-sha-256\n\
         host all u_clear 127.0.0.1/32 password",
    );
    run(async {
        // The reload is asynchronous: wait until the server asks u_scram for a password.
        let mut waited_ms = 0;
        loop {
            match connect_as(&pg, "u_scram", None).await {
                Err(PgError::Auth(_)) => break,
                Ok(_) if waited_ms < WAIT_MS => {}
                other => panic!("hba reload not applied: {:?}", other.err()),
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
            waited_ms += 20;
        }

        for (user, password) in [
            ("u_md5", "md5 pw"),
            ("u_scram", "p@ss w/rd:é"),
            ("u_clear", "clear pw"),
        ] {
            let mut conn = connect_as(&pg, user, Some(password))
                .await
                .unwrap_or_else(|e| panic!("{user}: {e}"));
            let r = conn
                .simple_query("select current_user")
                .await
                .expect("query");
            assert_eq!(r[0].rows[0][0].as_deref(), Some(user));

            let err = connect_as(&pg, user, Some("wrong"))
                .await
                .err()
                .expect("wrong password accepted");
            assert_eq!(err.code(), Some("28P01"), "{user}: {err}");
            let err = connect_as(&pg, user, None)
                .await
                .err()
                .expect("no password accepted");
            assert!(matches!(err, PgError::Auth(_)), "{user}: {err}");
        }

        // The password survives percent-encoding in a URL.
        let url = format!(
            "postgres://u_scram:p%40ss%20w%2Frd%3A%C3%A9@127.0.0.1:{}/postgres",
            pg.port()
        );
        let mut conn = connect(&ConnConfig::parse(&url).expect("url"), false)
            .await
            .expect("scram via url");
        conn.execute("select 1").await.expect("query");
    });
}

#[test]
fn snapshot_copy_and_pgoutput_stream() {
    let pg = cluster();
    pg.psql(
        "postgres",
        "create table items(id int primary key, name text, n int);
         insert into items values (1, 'a', 10), (2, 'b', 20), (3, 'c', 30);
         create publication zpub for table items;",
    )
    .expect("setup");
    let oid: u32 = pg
        .psql("postgres", "select 'items'::regclass::oid")
        .expect("oid")
        .trim()
        .parse()
        .expect("oid");
    run(async {
        let cfg = cfg(&pg);
        let mut repl = connect(&cfg, true).await.expect("replication connect");
        let slot = repl
            .create_logical_slot("zslot", false)
            .await
            .expect("slot");
        let snapshot = slot.snapshot_name.clone().expect("exported snapshot");
        assert!(slot.consistent_point > Lsn(0));

        // Committed after the slot: invisible to the snapshot, visible in the stream.
        pg.psql("postgres", "insert into items values (4, 'd', 40)")
            .expect("insert");

        let mut reader = connect(&cfg, false).await.expect("connect");
        reader
            .execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
            ))
            .await
            .expect("import snapshot");
        let mut rows = Vec::new();
        reader
            .copy_out("COPY items TO STDOUT", |row| {
                rows.push(String::from_utf8(row.to_vec()).expect("utf8"));
                Ok(())
            })
            .await
            .expect("copy");
        reader.execute("COMMIT").await.expect("commit");
        rows.sort();
        assert_eq!(rows, ["1\ta\t10\n", "2\tb\t20\n", "3\tc\t30\n"]);
        let now = reader
            .simple_query("select count(*) from items")
            .await
            .expect("count");
        assert_eq!(now[0].rows[0][0].as_deref(), Some("4"));

        let mut stream = repl
            .start_replication("zslot", slot.consistent_point, &["zpub".to_owned()])
            .await
            .expect("start replication");

        // The insert, with the Relation message that precedes the first change to items.
        let begin = next_msg(&mut stream).await;
        let PgOutput::Begin { final_lsn, .. } = begin else {
            panic!("expected Begin, got {begin:?}")
        };
        assert!(final_lsn > slot.consistent_point);
        let PgOutput::Relation(rel) = next_msg(&mut stream).await else {
            panic!("expected Relation")
        };
        assert_eq!(
            (
                rel.oid,
                rel.namespace.as_str(),
                rel.name.as_str(),
                rel.replica_identity
            ),
            (oid, "public", "items", b'd')
        );
        let cols: Vec<(&str, u32, bool)> = rel
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_oid, c.is_key()))
            .collect();
        assert_eq!(
            cols,
            [("id", 23, true), ("name", 25, false), ("n", 23, false)]
        );
        assert_eq!(
            next_msg(&mut stream).await,
            PgOutput::Insert {
                relation_oid: oid,
                new: vec![text("4"), text("d"), text("40")]
            }
        );
        let commit = next_msg(&mut stream).await;
        let PgOutput::Commit {
            commit_lsn,
            end_lsn,
            ..
        } = commit
        else {
            panic!("expected Commit, got {commit:?}")
        };
        assert_eq!(commit_lsn, final_lsn);
        assert!(end_lsn > commit_lsn);

        pg.psql(
            "postgres",
            "update items set name = 'bb' where id = 2;
             update items set id = 20 where id = 2;
             delete from items where id = 3;
             truncate items;
             begin; select pg_logical_emit_message(true, 'p', 'x'); commit;
             select pg_logical_emit_message(false, 'q', 'nontx');",
        )
        .expect("changes");

        let key_only = |id: &str| OldTuple {
            kind: OldKind::Key,
            values: vec![text(id), TupleValue::Null, TupleValue::Null],
        };
        let txn = next_txn(&mut stream).await;
        assert_eq!(
            changes(&txn),
            [PgOutput::Update {
                relation_oid: oid,
                old: None,
                new: vec![text("2"), text("bb"), text("20")]
            }]
        );
        let txn = next_txn(&mut stream).await;
        assert_eq!(
            changes(&txn),
            [PgOutput::Update {
                relation_oid: oid,
                old: Some(key_only("2")),
                new: vec![text("20"), text("bb"), text("20")]
            }]
        );
        let txn = next_txn(&mut stream).await;
        assert_eq!(
            changes(&txn),
            [PgOutput::Delete {
                relation_oid: oid,
                old: key_only("3")
            }]
        );
        let txn = next_txn(&mut stream).await;
        assert_eq!(
            changes(&txn),
            [PgOutput::Truncate {
                options: 0,
                relation_oids: vec![oid]
            }]
        );
        let txn = next_txn(&mut stream).await;
        let [PgOutput::Message {
            transactional: true,
            prefix,
            content,
            ..
        }] = changes(&txn)
        else {
            panic!("expected one transactional message, got {txn:?}")
        };
        assert_eq!((prefix.as_str(), &content[..]), ("p", &b"x"[..]));
        let msg = next_msg(&mut stream).await;
        let PgOutput::Message {
            transactional: false,
            prefix,
            content,
            ..
        } = msg
        else {
            panic!("expected a non-transactional message, got {msg:?}")
        };
        assert_eq!((prefix.as_str(), &content[..]), ("q", &b"nontx"[..]));
        let PgOutput::Commit {
            end_lsn: last_end, ..
        } = txn[txn.len() - 1]
        else {
            unreachable!()
        };

        // Confirming moves the slot's confirmed_flush_lsn.
        let confirmed_past = |lsn: Lsn| {
            let sql = format!(
                "select confirmed_flush_lsn >= '{lsn}'::pg_lsn from pg_replication_slots where slot_name = 'zslot'"
            );
            pg.psql("postgres", &sql).expect("slot").trim() == "t"
        };
        assert!(!confirmed_past(last_end), "confirmed before we said so");
        stream
            .send_status(last_end, last_end, last_end, false)
            .await
            .expect("status");
        let mut waited_ms = 0;
        while !confirmed_past(last_end) {
            assert!(
                waited_ms < WAIT_MS,
                "confirmed_flush_lsn did not reach {last_end}"
            );
            glommio::timer::sleep(Duration::from_millis(20)).await;
            waited_ms += 20;
        }
    });
}

/// A real socket that hands out at most `TRICKLE_READ_BYTES` per read and is "not ready" every
/// other poll, so that messages arrive in pieces and a racing timer can cancel `recv` while part
/// of a message sits in its buffer.
struct Trickle<S> {
    inner: S,
    pend_next: bool,
}

const TRICKLE_READ_BYTES: usize = 1000;

impl<S: AsyncRead + Unpin> AsyncRead for Trickle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        if std::mem::replace(&mut self.pend_next, false) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pend_next = true;
        let n = buf.len().min(TRICKLE_READ_BYTES);
        Pin::new(&mut self.inner).poll_read(cx, &mut buf[..n])
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Trickle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[test]
fn cancelled_recv_loses_no_message() {
    const ROWS: usize = 300;
    const PAYLOAD_BYTES: usize = 16 * 1000;
    let pg = cluster();
    pg.psql(
        "postgres",
        "create table big(id int primary key, payload text); create publication bigpub for table big;",
    )
    .expect("setup");
    run(async {
        let tcp = TcpStream::connect(("127.0.0.1", pg.port()))
            .await
            .expect("tcp");
        let trickle = Trickle {
            inner: tcp,
            pend_next: false,
        };
        let mut repl = PgConn::startup(trickle, &cfg(&pg), true)
            .await
            .expect("connect");
        let slot = repl
            .create_logical_slot("bigslot", true)
            .await
            .expect("slot");
        // Large rows in a few transactions: most messages span several socket reads.
        for chunk in 0..3 {
            let (lo, hi) = (chunk * ROWS / 3 + 1, (chunk + 1) * ROWS / 3);
            let sql = format!(
                "insert into big select i, repeat(md5(i::text), {}) from generate_series({lo}, {hi}) i",
                PAYLOAD_BYTES / 32
            );
            pg.psql("postgres", &sql).expect("insert");
        }
        let mut stream = repl
            .start_replication("bigslot", slot.consistent_point, &["bigpub".to_owned()])
            .await
            .expect("start");

        let mut ids = Vec::new();
        let mut cancelled = 0u32;
        let mut cancelled_mid_message = 0u32;
        let mut rounds = 0u32;
        while ids.len() < ROWS {
            rounds += 1;
            assert!(
                rounds < 1_000_000,
                "stream stalled after {} rows",
                ids.len()
            );
            let recv = async { Some(stream.recv().await) };
            let tick = async {
                glommio::timer::sleep(Duration::from_micros(u64::from(rounds % 4) * 25)).await;
                None
            };
            let Some(event) = future::or(recv, tick).await else {
                cancelled += 1;
                cancelled_mid_message += u32::from(stream.buffered_bytes() > 0);
                continue;
            };
            let ReplEvent::XLogData { data, .. } = event.expect("recv") else {
                continue;
            };
            if let PgOutput::Insert { new, .. } = decode(&data).expect("decode") {
                let [TupleValue::Text(id), TupleValue::Text(payload)] = &new[..] else {
                    panic!("row {new:?}")
                };
                assert_eq!(payload.len(), PAYLOAD_BYTES);
                ids.push(
                    std::str::from_utf8(id)
                        .expect("id")
                        .parse::<usize>()
                        .expect("id"),
                );
            }
        }
        assert_eq!(ids, (1..=ROWS).collect::<Vec<_>>());
        // Only a cancellation with part of a message buffered puts cancel-safety to the test.
        assert!(
            cancelled_mid_message > 0,
            "no recv was cancelled mid-message ({cancelled} in all)"
        );
        eprintln!("{cancelled} cancelled recv calls, {cancelled_mid_message} mid-message");
    });
}

#[test]
fn persistent_cluster_is_reused() {
    let dir = tempfile::Builder::new()
        .prefix("zcache-persist-")
        .tempdir_in("/tmp")
        .expect("tmp");
    // As root, the server user must be able to reach the data dir.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let opts = PgClusterOptions {
        data_dir: Some(dir.path().join("pg")),
        ..Default::default()
    };
    {
        let pg = PgCluster::start(opts.clone()).expect("first start");
        pg.create_database("keep db").expect("create db");
        pg.psql(
            "keep db",
            "create table kept(x int); insert into kept values (7)",
        )
        .expect("write");
    }
    let mut pg = PgCluster::start(opts).expect("second start");
    assert_eq!(
        pg.psql("keep db", "select x from kept").expect("read"),
        "7\n"
    );
    let conf = std::fs::read_to_string(pg.data_dir().join("postgresql.conf")).expect("conf");
    assert_eq!(conf.matches("include_if_exists = 'zcache.conf'").count(), 1);
    pg.stop();
    assert!(matches!(
        pg.psql("postgres", "select 1"),
        Err(ClusterError::Stopped)
    ));
}

#[test]
fn bad_configuration_fails_with_the_log_tail() {
    let opts = PgClusterOptions {
        extra_conf: vec!["no_such_setting = 1".into()],
        ..Default::default()
    };
    let err = PgCluster::start(opts)
        .err()
        .expect("started with a bad setting");
    assert!(matches!(err, ClusterError::Exited { .. }), "{err}");
    assert!(err.to_string().contains("no_such_setting"), "{err}");
}

#[test]
fn keepalives_are_answered_and_stream_errors_surface() {
    let opts = PgClusterOptions {
        extra_conf: vec!["wal_sender_timeout = '1s'".into()],
        ..Default::default()
    };
    let pg = PgCluster::start(opts).expect("start");
    pg.psql(
        "postgres",
        "create table k(id int primary key); create publication kpub for table k;",
    )
    .expect("setup");
    run(async {
        let cfg = cfg(&pg);

        // An unknown slot is refused before streaming starts.
        let repl = connect(&cfg, true).await.expect("connect");
        let err = repl
            .start_replication("no_such_slot", Lsn(0), &["kpub".to_owned()])
            .await
            .err()
            .expect("started");
        assert_eq!(err.code(), Some("42704"), "{err}");

        // Answering reply-requested keepalives keeps the walsender (timeout 1 s) from hanging up.
        let mut repl = connect(&cfg, true).await.expect("connect");
        let slot = repl.create_logical_slot("kslot", true).await.expect("slot");
        let mut stream = repl
            .start_replication("kslot", slot.consistent_point, &["kpub".to_owned()])
            .await
            .expect("start");
        let started = std::time::Instant::now();
        let mut replies = 0;
        while started.elapsed() < Duration::from_millis(3_000) {
            match with_timeout("keepalive", stream.recv())
                .await
                .expect("stream died")
            {
                ReplEvent::Keepalive {
                    wal_end,
                    reply_requested: true,
                    ..
                } => {
                    stream
                        .send_status(wal_end, wal_end, wal_end, false)
                        .await
                        .expect("status");
                    replies += 1;
                }
                ReplEvent::Keepalive { .. } => {}
                ReplEvent::XLogData { data, .. } => panic!("unexpected data {:?}", decode(&data)),
            }
        }
        assert!(
            replies >= 2,
            "only {replies} reply-requested keepalives in 3 s"
        );

        // pgoutput reports an unknown publication as an error inside the COPY stream.
        let mut repl = connect(&cfg, true).await.expect("connect");
        let slot = repl
            .create_logical_slot("kslot2", true)
            .await
            .expect("slot");
        let mut stream = repl
            .start_replication("kslot2", slot.consistent_point, &["no_such_pub".to_owned()])
            .await
            .expect("start");
        pg.psql("postgres", "insert into k values (1)")
            .expect("insert");
        let err = loop {
            match with_timeout("stream error", stream.recv()).await {
                Ok(ReplEvent::Keepalive { .. }) => continue,
                Ok(ReplEvent::XLogData { data, .. }) => {
                    panic!("unexpected data {:?}", decode(&data))
                }
                Err(e) => break e,
            }
        };
        assert!(
            matches!(&err, PgError::Server { message, .. } if message.contains("no_such_pub")),
            "{err}"
        );
    });
}
