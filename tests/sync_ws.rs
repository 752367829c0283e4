//! The whole server over real sockets: a real PostgreSQL (started here), the zcache binary,
//! and a WebSocket client speaking the Zero protocol the way the 1.9 client does. Queries are
//! legacy ASTs so no app server is needed (the e2e suite covers named queries and mutators).

use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::Message;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};

mod zcache_proc;
use zcache_proc::{free_port, next, Server, Ws, WAIT};

fn start_zcache(pg: &PgCluster) -> Server {
    zcache_proc::start(&pg.url("app"), "ztest", &[])
}

/// zcache with its replica in `dir` (kept by the caller across restarts).
fn start_zcache_at(pg: &PgCluster, dir: &std::path::Path, port: u16) -> Server {
    start_zcache_with(pg, dir, port, &[], "")
}

/// The same with more arguments, and `ZCACHE_LOG` when `log_filter` is not empty.
fn start_zcache_with(
    pg: &PgCluster,
    dir: &std::path::Path,
    port: u16,
    args: &[&str],
    log_filter: &str,
) -> Server {
    let env: &[(&str, Option<&str>)] = if log_filter.is_empty() {
        &[]
    } else {
        &[("ZCACHE_LOG", Some(log_filter))]
    };
    zcache_proc::start_at(&pg.url("app"), "ztest", dir, port, args, env)
}

fn seed(pg: &PgCluster) {
    pg.create_database("app").expect("create db");
    pg.psql(
        "app",
        "CREATE TABLE issue (id TEXT PRIMARY KEY, title TEXT, status TEXT, created BIGINT);
         CREATE TABLE comment (id TEXT PRIMARY KEY, issue_id TEXT, body TEXT);
         CREATE INDEX ON comment (issue_id);
         INSERT INTO issue SELECT 'i' || i, 'Issue ' || i, (ARRAY['open','closed'])[1 + i % 2], 1000 + i
           FROM generate_series(1, 50) i;
         INSERT INTO comment SELECT 'c' || i, 'i' || (1 + i % 50), 'Body ' || i FROM generate_series(1, 150) i;
         CREATE TABLE big (id TEXT PRIMARY KEY, n BIGINT);
         INSERT INTO big VALUES ('safe', 9007199254740991), ('unsafe', 9007199254740993);",
    )
    .expect("seed");
    zcache_proc::allow_reads(pg, "app", "ztest", &["issue", "comment", "big"]);
}

fn sec_protocol(init: Value, token: Option<&str>) -> String {
    let mut body = json!({"initConnectionMessage": ["initConnection", init]});
    if let Some(t) = token {
        body["authToken"] = json!(t);
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(body.to_string());
    percent_encoding::utf8_percent_encode(&b64, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn connect(port: u16, path_and_query: &str, protocol: &str) -> (Ws, String) {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("tcp");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!("ws://127.0.0.1:{port}{path_and_query}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(protocol).expect("header"),
    );
    let (ws, resp) = tungstenite::client(req, stream).expect("handshake");
    let echoed = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (ws, echoed)
}

/// Reads one whole poke: (baseCookie, cookie, merged rowsPatch, got hashes, lmids).
struct Poke {
    base: Value,
    cookie: String,
    rows: Vec<Value>,
    got: Vec<String>,
    desired: Vec<String>,
}

fn read_poke(ws: &mut Ws) -> Poke {
    let start = next(ws);
    assert_eq!(start[0], "pokeStart", "expected pokeStart, got {start}");
    let mut poke = Poke {
        base: start[1]["baseCookie"].clone(),
        cookie: String::new(),
        rows: vec![],
        got: vec![],
        desired: vec![],
    };
    loop {
        let m = next(ws);
        match m[0].as_str() {
            Some("pokePart") => {
                poke.rows
                    .extend(m[1]["rowsPatch"].as_array().cloned().unwrap_or_default());
                for g in m[1]["gotQueriesPatch"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    poke.got.push(format!(
                        "{} {}",
                        g["op"].as_str().unwrap_or(""),
                        g["hash"].as_str().unwrap_or("")
                    ));
                }
                if let Some(d) = m[1]["desiredQueriesPatches"].as_object() {
                    for ops in d.values() {
                        for op in ops.as_array().cloned().unwrap_or_default() {
                            poke.desired.push(format!(
                                "{} {}",
                                op["op"].as_str().unwrap_or(""),
                                op["hash"].as_str().unwrap_or("")
                            ));
                        }
                    }
                }
            }
            Some("pokeEnd") => {
                poke.cookie = m[1]["cookie"].as_str().expect("cookie").to_string();
                assert_eq!(m[1]["pokeID"], start[1]["pokeID"]);
                return poke;
            }
            _ => panic!("unexpected message inside a poke: {m}"),
        }
    }
}

fn open_issues_ast() -> Value {
    json!({
        "table": "issue",
        "where": {"type": "simple", "op": "=", "left": {"type": "column", "name": "status"}, "right": {"type": "literal", "value": "open"}},
        "orderBy": [["created", "desc"]],
        "limit": 5,
        "related": [{"correlation": {"parentField": ["id"], "childField": ["issue_id"]},
                     "subquery": {"table": "comment", "alias": "comments", "orderBy": [["id", "asc"]]}}]
    })
}

fn init_with(ast: Value) -> Value {
    json!({"desiredQueriesPatch": [{"op": "put", "hash": "q1", "ast": ast, "ttl": 300000}]})
}

fn ids(rows: &[Value], table: &str) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .filter(|r| r["tableName"] == table && r["op"] == "put")
        .map(|r| r["value"]["id"].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

fn sql_ids(pg: &PgCluster, sql: &str) -> Vec<String> {
    let mut out: Vec<String> = pg
        .psql("app", sql)
        .expect("sql")
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    out.sort();
    out
}

#[test]
fn zero_protocol_over_real_sockets() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let server = start_zcache(&pg);
    let port = server.port;

    // Plain HTTP health check.
    let health = ureq::get(&format!("http://127.0.0.1:{port}/"))
        .call()
        .expect("GET /");
    assert_eq!(health.into_string().expect("body"), "OK");

    // A protocol version the server does not speak: upgrade, then VersionNotSupported.
    let (mut ws, _) = connect(
        port,
        "/sync/v99/connect?clientID=a&clientGroupID=g&ts=1&lmid=0",
        "e30%3D",
    );
    let err = next(&mut ws);
    assert_eq!(err[0], "error");
    assert_eq!(err[1]["kind"], "VersionNotSupported");

    // A connect URL without clientID.
    let (mut ws, _) = connect(
        port,
        "/sync/v51/connect?clientGroupID=g&ts=1&lmid=0",
        "e30%3D",
    );
    assert_eq!(next(&mut ws)[1]["kind"], "InvalidConnectionRequest");

    // A real session: the embedded initConnection, the echoed protocol, two pokes.
    let protocol = sec_protocol(init_with(open_issues_ast()), Some("tok"));
    let (mut ws, echoed) = connect(
        port,
        "/sync/v51/connect?clientID=c1&clientGroupID=g1&userID=u1&baseCookie=&ts=1.5&lmid=0&wsid=w1",
        &protocol,
    );
    assert_eq!(
        echoed, protocol,
        "Sec-WebSocket-Protocol must be echoed verbatim"
    );
    let connected = next(&mut ws);
    assert_eq!(connected[0], "connected");
    assert_eq!(connected[1]["wsid"], "w1");

    let config = read_poke(&mut ws);
    assert_eq!(config.base, Value::Null);
    assert_eq!(config.desired, vec!["put q1"]);
    let hydrate = read_poke(&mut ws);
    assert_eq!(hydrate.base, json!(config.cookie));
    assert!(
        hydrate.cookie > config.cookie,
        "cookies grow: {} then {}",
        config.cookie,
        hydrate.cookie
    );
    assert_eq!(hydrate.got, vec!["put q1"]);
    let want_issues = sql_ids(
        &pg,
        "SELECT id FROM issue WHERE status = 'open' ORDER BY created DESC, id LIMIT 5",
    );
    assert_eq!(ids(&hydrate.rows, "issue"), want_issues);
    let want_comments = sql_ids(&pg, "SELECT c.id FROM comment c JOIN (SELECT id FROM issue WHERE status = 'open' ORDER BY created DESC, id LIMIT 5) i ON c.issue_id = i.id");
    assert_eq!(ids(&hydrate.rows, "comment"), want_comments);

    // ping -> pong
    ws.send(Message::text("[\"ping\",{}]")).expect("send ping");
    assert_eq!(next(&mut ws), json!(["pong", {}]));

    // An upstream insert that enters the window: one poke with the new row, chained cookie.
    pg.psql(
        "app",
        "INSERT INTO issue VALUES ('new', 'New issue', 'open', 99999)",
    )
    .expect("insert");
    let change = read_poke(&mut ws);
    assert_eq!(change.base, json!(hydrate.cookie));
    let puts = ids(&change.rows, "issue");
    assert_eq!(puts, vec!["new"]);
    let dels: Vec<&Value> = change.rows.iter().filter(|r| r["op"] == "del").collect();
    assert!(
        dels.iter().any(|r| r["tableName"] == "issue"),
        "the 6th issue leaves the window: {:?}",
        change.rows
    );

    // A second client of the same group (the same user: the group is pinned to it) joining
    // with no cookie gets everything at once.
    let protocol2 = sec_protocol(json!({"desiredQueriesPatch": []}), None);
    let (mut ws2, _) = connect(
        port,
        "/sync/v51/connect?clientID=c2&clientGroupID=g1&userID=u1&baseCookie=&ts=1&lmid=0&wsid=w2",
        &protocol2,
    );
    assert_eq!(next(&mut ws2)[0], "connected");
    let catchup = read_poke(&mut ws2);
    let mut all = catchup.rows.clone();
    // A config poke (client record) may come first; merge until the cookie matches client 1.
    let mut cookie = catchup.cookie.clone();
    let deadline = Instant::now() + WAIT;
    while ids(&all, "issue").len() < 5 && Instant::now() < deadline {
        let p = read_poke(&mut ws2);
        all.extend(p.rows);
        cookie = p.cookie;
    }
    let want_now = sql_ids(
        &pg,
        "SELECT id FROM issue WHERE status = 'open' ORDER BY created DESC, id LIMIT 5",
    );
    assert_eq!(ids(&all, "issue"), want_now);
    assert!(!cookie.is_empty());

    // Sockets of many groups: whichever shard accepts a socket, the owning shard serves it
    // (handed over when needed) and every client gets its pokes.
    let groups: Vec<String> = (0..8).map(|i| format!("group-{i}")).collect();
    let owners: std::collections::BTreeSet<usize> = groups
        .iter()
        .map(|g| zcache::shards::owner_shard(g, 2))
        .collect();
    assert_eq!(owners.len(), 2, "the groups cover both shards");
    for g in &groups {
        let p = sec_protocol(init_with(open_issues_ast()), None);
        let (mut w, _) = connect(
            port,
            &format!(
                "/sync/v51/connect?clientID=x&clientGroupID={g}&baseCookie=&ts=1&lmid=0&wsid=w"
            ),
            &p,
        );
        assert_eq!(next(&mut w)[0], "connected");
        assert_eq!(read_poke(&mut w).desired, vec!["put q1"]);
        assert_eq!(ids(&read_poke(&mut w).rows, "issue"), want_now);
    }

    // An int8 beyond 2^53 is refused with a clear error, never sent as a wrong number.
    let p = sec_protocol(
        init_with(json!({"table": "big", "orderBy": [["id", "asc"]]})),
        None,
    );
    let (mut w, _) = connect(
        port,
        "/sync/v51/connect?clientID=b&clientGroupID=big-group&baseCookie=&ts=1&lmid=0&wsid=w",
        &p,
    );
    assert_eq!(next(&mut w)[0], "connected");
    read_poke(&mut w);
    let err = next(&mut w);
    assert_eq!(err[0], "transformError", "{err}");
    let message = err[1][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("big.n = 9007199254740993 is beyond 2^53"),
        "{message}"
    );

    // Invalid JSON: InvalidMessage, then the socket closes.
    ws.send(Message::text("not json")).expect("send");
    let err = next(&mut ws);
    assert_eq!(err[1]["kind"], "InvalidMessage");

    // A cookie this server never issued.
    let (mut ws3, _) = connect(
        port,
        "/sync/v51/connect?clientID=c9&clientGroupID=unknown&baseCookie=zz&ts=1&lmid=0",
        "e30%3D",
    );
    assert_eq!(
        next(&mut ws3)[1]["kind"],
        "InvalidConnectionRequestBaseCookie"
    );
    // A valid-looking cookie for a group this server does not know.
    let (mut ws4, _) = connect(
        port,
        "/sync/v51/connect?clientID=c9&clientGroupID=unknown2&baseCookie=110&ts=1&lmid=0",
        "e30%3D",
    );
    assert_eq!(next(&mut ws4)[0], "connected");
    assert_eq!(next(&mut ws4)[1]["kind"], "ClientNotFound");
    drop(server);
}

/// The client view record outlives the process: a client reconnecting with its cookie after
/// a restart gets only what changed, including what changed while zcache was down.
#[test]
fn a_cookie_from_before_a_restart_gets_a_diff() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = start_zcache_at(&pg, dir.path(), port);
    let url = |cookie: &str| {
        format!("/sync/v51/connect?clientID=c1&clientGroupID=g1&baseCookie={cookie}&ts=1&lmid=0&wsid=w1")
    };
    let protocol = sec_protocol(init_with(open_issues_ast()), None);
    let (mut ws, _) = connect(port, &url(""), &protocol);
    assert_eq!(next(&mut ws)[0], "connected");
    let _config = read_poke(&mut ws);
    let hydrated = read_poke(&mut ws);
    let window = ids(&hydrated.rows, "issue");
    assert_eq!(window.len(), 5);
    pg.psql(
        "app",
        &format!(
            "UPDATE issue SET title = 'live edit' WHERE id = '{}'",
            window[0]
        ),
    )
    .expect("update");
    let live = read_poke(&mut ws);
    assert_eq!(live.rows.len(), 1, "{:?}", live.rows);
    // Written behind the pokes: wait until the store has the client's cookie, and the
    // edited row's contents (written in a later round than the version: `digestsAt`).
    let stored = || {
        pg.psql(
            "app",
            "SELECT version || ' ' || coalesce(\"digestsAt\", '') FROM \"ztest_0/zcvr\".instances \
             WHERE \"clientGroupID\" = 'g1'",
        )
        .unwrap_or_default()
        .trim()
        .to_string()
    };
    let deadline = Instant::now() + WAIT;
    while stored() != format!("{} {}", live.cookie, live.cookie) {
        assert!(
            Instant::now() < deadline,
            "CVR never stored at {}",
            live.cookie
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(ws);
    drop(server);

    // While zcache is down: one visible issue edited, one visible comment deleted, and an
    // issue outside the window edited (nothing to send for it).
    let gone_comment = sql_ids(
        &pg,
        &format!(
            "SELECT id FROM comment WHERE issue_id = '{}' ORDER BY id LIMIT 1",
            window[1]
        ),
    );
    pg.psql(
        "app",
        &format!(
            "UPDATE issue SET title = 'edited while down' WHERE id = '{}';
             DELETE FROM comment WHERE id = '{}';
             UPDATE issue SET title = 'unseen' WHERE status = 'closed';",
            window[2], gone_comment[0]
        ),
    )
    .expect("changes while down");

    let _again = start_zcache_at(&pg, dir.path(), port);
    let (mut ws, _) = connect(port, &url(&live.cookie), &protocol);
    assert_eq!(next(&mut ws)[0], "connected");
    // The replicator may still be catching up on what happened while zcache was down, so
    // the changes may come in the first poke or in the ones right after it.
    let mut rows = Vec::new();
    let mut queries = Vec::new();
    let mut cookie = live.cookie.clone();
    let deadline = Instant::now() + WAIT;
    while rows.len() < 2 {
        assert!(Instant::now() < deadline, "changes never arrived: {rows:?}");
        let p = read_poke(&mut ws);
        assert_eq!(p.base, json!(cookie), "pokes chain from the stored cookie");
        rows.extend(p.rows);
        queries.extend(p.got.into_iter().chain(p.desired));
        cookie = p.cookie;
    }
    let mut ops: Vec<String> = rows
        .iter()
        .map(|r| {
            let id = r.get("value").unwrap_or(&r["id"])["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let table = r["tableName"].as_str().unwrap_or("");
            format!("{} {table} {id}", r["op"].as_str().unwrap_or(""))
        })
        .collect();
    ops.sort();
    assert_eq!(
        ops,
        vec![
            format!("del comment {}", gone_comment[0]),
            format!("put issue {}", window[2])
        ],
        "only what changed while zcache was down, not the view again"
    );
    let put = rows.iter().find(|r| r["op"] == "put").expect("put");
    assert_eq!(put["value"]["title"], "edited while down");
    assert!(queries.is_empty(), "queries unchanged: {queries:?}");
    assert!(cookie > live.cookie);

    // And it stays live after the restart.
    pg.psql(
        "app",
        &format!(
            "UPDATE issue SET title = 'after restart' WHERE id = '{}'",
            window[3]
        ),
    )
    .expect("update");
    let after = read_poke(&mut ws);
    assert_eq!(after.base, json!(cookie));
    assert_eq!(ids(&after.rows, "issue"), vec![window[3].clone()]);
}

/// A group nobody is connected to is written out and dropped from memory; a client coming
/// back with its cookie loads it again and gets what changed meanwhile.
#[test]
fn an_idle_group_is_unloaded_and_comes_back_from_the_cvr_database() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let server = start_zcache_with(
        &pg,
        dir.path(),
        port,
        &["--group-idle-ms", "200"],
        "zcache=info,zcache::shards=debug",
    );
    let url = |cookie: &str| {
        format!("/sync/v51/connect?clientID=c1&clientGroupID=g1&baseCookie={cookie}&ts=1&lmid=0&wsid=w1")
    };
    let protocol = sec_protocol(init_with(open_issues_ast()), None);
    let (mut ws, _) = connect(port, &url(""), &protocol);
    assert_eq!(next(&mut ws)[0], "connected");
    let _config = read_poke(&mut ws);
    let hydrated = read_poke(&mut ws);
    let window = ids(&hydrated.rows, "issue");
    let _ = ws.close(None);
    drop(ws);
    let deadline = Instant::now() + WAIT;
    while !server.logged("idle group unloaded") {
        assert!(
            Instant::now() < deadline,
            "the idle group was never unloaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pg.psql(
        "app",
        &format!(
            "UPDATE issue SET title = 'while unloaded' WHERE id = '{}'",
            window[0]
        ),
    )
    .expect("update");
    let (mut ws, _) = connect(port, &url(&hydrated.cookie), &protocol);
    assert_eq!(next(&mut ws)[0], "connected");
    let mut rows = Vec::new();
    let mut cookie = hydrated.cookie.clone();
    while rows.is_empty() {
        assert!(Instant::now() < deadline, "the change never arrived");
        let p = read_poke(&mut ws);
        assert_eq!(p.base, json!(cookie));
        rows.extend(p.rows);
        cookie = p.cookie;
    }
    assert_eq!(ids(&rows, "issue"), vec![window[0].clone()], "{rows:?}");
    assert_eq!(rows.len(), 1, "only the change, not the view again");
    assert!(
        server.logged_within("CVR loaded", WAIT),
        "it came back from the database"
    );
}

/// SIGTERM with a client connected: the socket is closed as "going away", the CVR is written,
/// the last LSN is confirmed, the process exits 0, and the client's cookie works after a
/// restart.
#[test]
fn sigterm_drains_and_exits_cleanly() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut server = start_zcache_at(&pg, dir.path(), port);
    let url = |cookie: &str| {
        format!("/sync/v51/connect?clientID=c1&clientGroupID=g1&baseCookie={cookie}&ts=1&lmid=0&wsid=w1")
    };
    let protocol = sec_protocol(init_with(open_issues_ast()), None);
    let (mut ws, _) = connect(port, &url(""), &protocol);
    assert_eq!(next(&mut ws)[0], "connected");
    let _config = read_poke(&mut ws);
    let hydrated = read_poke(&mut ws);
    let window = ids(&hydrated.rows, "issue");
    pg.psql(
        "app",
        &format!("UPDATE issue SET title = 'last' WHERE id = '{}'", window[0]),
    )
    .expect("update");
    let last = read_poke(&mut ws);
    let commit_lsn = pg
        .psql("app", "SELECT pg_current_wal_insert_lsn()")
        .expect("lsn");

    let pid = server.child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let close = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("socket ended without a close frame: {e}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1001, "going away");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "zcache did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    let stored = pg
        .psql(
            "app",
            "SELECT version FROM \"ztest_0/zcvr\".instances WHERE \"clientGroupID\" = 'g1'",
        )
        .expect("stored");
    assert_eq!(
        stored.trim(),
        last.cookie,
        "the CVR was written before exiting"
    );
    let behind = pg
        .psql(
            "app",
            &format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'ztest%' \
                 AND confirmed_flush_lsn < '{}'::pg_lsn",
                commit_lsn.trim()
            ),
        )
        .expect("slots");
    assert_eq!(behind.trim(), "0", "the last applied LSN is confirmed");
    drop(server);

    let _again = start_zcache_at(&pg, dir.path(), port);
    let (mut ws, _) = connect(port, &url(&last.cookie), &protocol);
    assert_eq!(next(&mut ws)[0], "connected");
    let resumed = read_poke(&mut ws);
    assert_eq!(resumed.base, json!(last.cookie));
    assert!(
        resumed.rows.is_empty(),
        "nothing changed: {:?}",
        resumed.rows
    );
}

/// A zcache restarted at once on its port: the connections the last run accepted wait in
/// TIME_WAIT, the killed process's listeners linger until its io_uring instances are torn
/// down, and the new listeners must bind anyway (as zero-cache's do).
#[test]
fn a_restart_binds_the_port_its_last_run_served_on() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_zcache_at(&pg, dir.path(), port);
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("tcp");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("health answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        streams.push(s);
    }
    // The server side closes first (its process ends), then the clients: the server's ends
    // of these connections are left in TIME_WAIT.
    drop(server);
    drop(streams);
    let again = start_zcache_at(&pg, dir.path(), port);
    let health = ureq::get(&format!("http://127.0.0.1:{port}/"))
        .call()
        .expect("health after restart");
    assert_eq!(health.status(), 200);
    drop(again);
}

#[test]
fn bad_upstream_settings_stop_with_one_clear_line() {
    // Nothing listens on this port.
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_zcache"))
        .args([
            "--upstream-db",
            &format!("postgres://postgres@127.0.0.1:{port}/x"),
            "--port",
            &free_port().to_string(),
        ])
        .arg("--replica-file")
        .arg(std::env::temp_dir().join(format!("zc-bad-{port}.db")))
        .output()
        .expect("run zcache");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("could not connect to Postgres"), "{stderr}");

    // wal_level not logical.
    let pg = PgCluster::start(PgClusterOptions {
        extra_conf: vec!["wal_level = replica".into()],
        ..Default::default()
    })
    .expect("postgres");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_zcache"))
        .args([
            "--upstream-db",
            &pg.url("postgres"),
            "--port",
            &free_port().to_string(),
        ])
        .arg("--replica-file")
        .arg(dir.path().join("r.db"))
        .output()
        .expect("run zcache");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wal_level = logical"), "{stderr}");

    // The port is taken.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let out = Command::new(env!("CARGO_BIN_EXE_zcache"))
        .args([
            "--upstream-db",
            &pg.url("postgres"),
            "--port",
            &taken_port.to_string(),
        ])
        .output()
        .expect("run zcache");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("port {taken_port} is already in use")),
        "{stderr}"
    );
}
