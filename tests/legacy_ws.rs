//! The legacy API's edge cases over raw WebSockets against the real zcache binary and a real
//! PostgreSQL (legacy-features.md §0, §1.4, §1.6, §3, §4): connect-time auth refusals and
//! their close frames, client groups pinned to one user, `updateAuth`, every CRUD outcome
//! (checked on the wire and upstream), push routing, and the per-user rate limit.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::Message;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};

mod zcache_proc;
use zcache_proc::{free_port, Server, Ws, WAIT};

const APP: &str = "lws";
/// The shard schema of `APP` (shard 0): where the clients' lastMutationIDs live.
const SHARD: &str = "lws_0";
const SECRET: &str = "legacy-ws-test-secret";
/// A WebSocket close reason holds at most 123 bytes.
const CLOSE_REASON_MAX: usize = 123;
/// How long the server is given to (not) answer before a test calls it silent.
const QUIET: Duration = Duration::from_millis(1000);

// ---------------------------------------------------------------- tokens

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn b64u(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// A JWT with `header` and `claims`, signed HS256 with `SECRET` (whatever `header` says).
fn sign_with(header: Value, claims: Value) -> String {
    let input = format!(
        "{}.{}",
        b64u(header.to_string().as_bytes()),
        b64u(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64u(tag.as_ref()))
}

fn sign(claims: Value) -> String {
    sign_with(json!({"alg": "HS256", "typ": "JWT"}), claims)
}

/// A valid token for `user`, issued `age` seconds ago, expiring in an hour.
fn token(user: &str, age: u64) -> String {
    let now = now_s();
    sign(json!({"sub": user, "iat": now - age, "exp": now + 3600}))
}

/// The same with an `extra` claim, which the read rule also matches `title` against.
fn token_extra(user: &str, age: u64, extra: &str) -> String {
    let now = now_s();
    sign(json!({"sub": user, "iat": now - age, "exp": now + 3600, "extra": extra}))
}

fn expired(user: &str) -> String {
    let now = now_s();
    sign(json!({"sub": user, "iat": now - 100, "exp": now - 10}))
}

// ---------------------------------------------------------------- upstream and servers

fn seed(pg: &PgCluster, db: &str) {
    pg.create_database(db).expect("create db");
    pg.psql(
        db,
        "CREATE TABLE issue (id TEXT PRIMARY KEY, owner_id TEXT NOT NULL, title TEXT, priority INTEGER);
         INSERT INTO issue VALUES ('u1-old', 'u1', 'mine', 1), ('u2-old', 'u2', 'theirs', 2);",
    )
    .expect("seed");
}

/// Rules as `zero-deploy-permissions` writes them: the owner (`owner_id = authData.sub`) may
/// select, insert, update and delete an issue; nobody else may, except that a token whose
/// `extra` claim is an issue's title may also select it.
fn deploy_owner_rules(pg: &PgCluster, db: &str) {
    let owner = json!({"type": "simple", "op": "=",
        "left": {"type": "column", "name": "owner_id"},
        "right": {"type": "static", "anchor": "authData", "field": "sub"}});
    let rule = json!([["allow", owner]]);
    let titled = json!({"type": "simple", "op": "=",
        "left": {"type": "column", "name": "title"},
        "right": {"type": "static", "anchor": "authData", "field": "extra"}});
    let select = json!([["allow", owner], ["allow", titled]]);
    let perms = json!({"tables": {"issue": {"row": {
        "select": select, "insert": rule, "delete": rule,
        "update": {"preMutation": rule, "postMutation": rule}}}}});
    let sql = format!(
        "{}\nUPDATE \"{APP}\".permissions SET permissions = '{perms}';",
        zcache::replicator::setup::permissions_sql(APP)
    );
    pg.psql(db, &sql).expect("deploy permissions");
}

/// zcache on database `db` with its own replica; `ZERO_AUTH_SECRET` when `secret`, and no
/// other key option whatever the environment says.
fn start(pg: &PgCluster, db: &str, secret: bool, env: &[(&str, Option<&str>)]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut all: Vec<(&str, Option<&str>)> = vec![
        ("ZERO_AUTH_SECRET", secret.then_some(SECRET)),
        ("ZERO_AUTH_JWK", None),
        ("ZERO_AUTH_JWKS_URL", None),
        ("ZERO_PER_USER_MUTATION_LIMIT_MAX", None),
        ("ZERO_ENABLE_CRUD_MUTATIONS", None),
    ];
    all.extend_from_slice(env);
    let mut server = zcache_proc::start_at(&pg.url(db), APP, dir.path(), free_port(), &[], &all);
    server.dir = Some(dir);
    server
}

fn sql(pg: &PgCluster, db: &str, query: &str) -> String {
    pg.psql(db, query).expect("sql").trim().to_string()
}

/// Upstream `lastMutationID` of `client` in `group` ("" when it has no row).
fn lmid(pg: &PgCluster, db: &str, group: &str, client: &str) -> String {
    sql(
        pg,
        db,
        &format!(
            "SELECT \"lastMutationID\" FROM \"{SHARD}\".clients \
             WHERE \"clientGroupID\" = '{group}' AND \"clientID\" = '{client}'"
        ),
    )
}

/// Upstream issues as `id|owner_id|title|priority` lines.
fn issues(pg: &PgCluster, db: &str) -> String {
    sql(
        pg,
        db,
        "SELECT id, owner_id, title, priority FROM issue ORDER BY id",
    )
}

// ---------------------------------------------------------------- sockets

/// Every issue, as a legacy query (the read rule narrows it to the user's own).
fn init() -> Value {
    json!({"desiredQueriesPatch": [{"op": "put", "hash": "q1", "ttl": 300000,
        "ast": {"table": "issue", "orderBy": [["id", "asc"]]}}]})
}

fn sec_protocol(init: Value, token: Option<&str>) -> String {
    let mut body = json!({"initConnectionMessage": ["initConnection", init]});
    if let Some(t) = token {
        body["authToken"] = json!(t);
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(body.to_string());
    percent_encoding::utf8_percent_encode(&b64, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Opens a socket of `client` in `group` (with `userID` when `user` is set) and the query of
/// `init()`; reads nothing.
fn open(port: u16, group: &str, client: &str, user: Option<&str>, token: Option<&str>) -> Ws {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("tcp");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let user = user.map(|u| format!("&userID={u}")).unwrap_or_default();
    let mut req = format!(
        "ws://127.0.0.1:{port}/sync/v51/connect?clientID={client}&clientGroupID={group}{user}&baseCookie=&ts=1&lmid=0&wsid=w-{client}"
    )
    .into_client_request()
    .expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&sec_protocol(init(), token)).expect("header"),
    );
    tungstenite::client(req, stream).expect("handshake").0
}

/// A socket that must connect: reads `connected`, then the poke that answers the query.
fn join(port: u16, group: &str, client: &str, user: &str, tok: &str) -> (Ws, Poke) {
    let mut ws = open(port, group, client, Some(user), Some(tok));
    match read_frame(&mut ws) {
        Frame::Text(m) if m[0] == "connected" => {}
        f => panic!("{client} of {group} as {user}: expected connected, got {f:?}"),
    }
    let (others, pokes) = until_poke(&mut ws, |p| p.got.iter().any(|g| g == "put q1"));
    assert!(others.is_empty(), "before the query was got: {others:?}");
    (ws, merge(pokes))
}

#[derive(Debug, PartialEq)]
enum Frame {
    Text(Value),
    /// (code, reason); None: a close frame without a status.
    Close(Option<(u16, String)>),
}

fn read_frame(ws: &mut Ws) -> Frame {
    loop {
        match ws.read().expect("read a frame") {
            Message::Text(t) => {
                return Frame::Text(serde_json::from_str(t.as_str()).expect("JSON"))
            }
            Message::Close(c) => {
                return Frame::Close(c.map(|f| (u16::from(f.code), f.reason.as_str().to_string())))
            }
            _ => continue,
        }
    }
}

fn send(ws: &mut Ws, msg: &Value) {
    ws.send(Message::text(msg.to_string())).expect("send");
}

fn error(kind: &str, message: &str) -> Value {
    json!(["error", {"kind": kind, "message": message, "origin": "zeroCache"}])
}

/// `message` cut to a close reason's 123 bytes at a character boundary.
fn close_reason(message: &str) -> String {
    let mut end = message.len().min(CLOSE_REASON_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

/// A refused connect: the error frame first (no `connected`), then close 3000 with the
/// message as its reason (cut to 123 bytes).
fn assert_refused(ws: &mut Ws, kind: &str, message: &str) {
    assert_eq!(read_frame(ws), Frame::Text(error(kind, message)));
    assert_eq!(
        read_frame(ws),
        Frame::Close(Some((3000, close_reason(message))))
    );
}

/// A fatal error on a live socket: the error frame, then a close without a status (1005).
fn assert_fatal(ws: &mut Ws, kind: &str, message: &str) {
    assert_eq!(read_frame(ws), Frame::Text(error(kind, message)));
    assert_eq!(read_frame(ws), Frame::Close(None));
}

/// One whole poke.
#[derive(Debug, Default)]
struct Poke {
    /// `put id` / `del id` of issue rows (sorted by `merge`).
    rows: Vec<String>,
    /// Issue rows put, as sent.
    values: Vec<Value>,
    /// `op hash`
    got: Vec<String>,
    lmids: serde_json::Map<String, Value>,
}

fn merge(pokes: Vec<Poke>) -> Poke {
    let mut all = Poke::default();
    for p in pokes {
        all.rows.extend(p.rows);
        all.values.extend(p.values);
        all.got.extend(p.got);
        all.lmids.extend(p.lmids);
    }
    // The order of rows within a poke is not part of the protocol.
    all.rows.sort();
    all
}

/// The next poke, or the next other message (a close fails the test).
fn read_item(ws: &mut Ws) -> Result<Poke, Value> {
    let start = match read_frame(ws) {
        Frame::Text(m) => m,
        f => panic!("closed by the server: {f:?}"),
    };
    if start[0] != "pokeStart" {
        return Err(start);
    }
    let mut poke = Poke::default();
    loop {
        let m = match read_frame(ws) {
            Frame::Text(m) => m,
            f => panic!("closed inside a poke: {f:?}"),
        };
        match m[0].as_str() {
            Some("pokePart") => {
                let part = &m[1];
                for r in part["rowsPatch"].as_array().into_iter().flatten() {
                    assert_eq!(r["tableName"], "issue", "{r}");
                    let (op, id) = match r["op"].as_str() {
                        Some("put") => {
                            poke.values.push(r["value"].clone());
                            ("put", &r["value"]["id"])
                        }
                        Some(op) => (op, &r["id"]["id"]),
                        None => panic!("row patch without op: {r}"),
                    };
                    poke.rows
                        .push(format!("{op} {}", id.as_str().unwrap_or("")));
                }
                for g in part["gotQueriesPatch"].as_array().into_iter().flatten() {
                    poke.got.push(format!(
                        "{} {}",
                        g["op"].as_str().unwrap_or(""),
                        g["hash"].as_str().unwrap_or("")
                    ));
                }
                if let Some(l) = part["lastMutationIDChanges"].as_object() {
                    poke.lmids.extend(l.clone());
                }
            }
            Some("pokeEnd") => {
                assert_eq!(m[1]["pokeID"], start[1]["pokeID"]);
                return Ok(poke);
            }
            _ => panic!("unexpected message inside a poke: {m}"),
        }
    }
}

/// Reads until a poke for which `done` holds: (the other messages on the way, the pokes).
/// An error frame other than a `MutationFailed` (after which a poke still comes) fails the
/// test at once rather than waiting for a poke that will not come.
fn until_poke(ws: &mut Ws, done: impl Fn(&Poke) -> bool) -> (Vec<Value>, Vec<Poke>) {
    let (mut others, mut pokes) = (Vec::new(), Vec::new());
    loop {
        match read_item(ws) {
            Ok(p) => {
                let stop = done(&p);
                pokes.push(p);
                if stop {
                    return (others, pokes);
                }
            }
            Err(m) if m[0] == "error" && m[1]["kind"] != "MutationFailed" => {
                panic!("waiting for a poke, got {m} (after {others:?})")
            }
            Err(m) => others.push(m),
        }
    }
}

/// Reads until a poke tells `client`'s lastMutationID is `n`: the other messages on the
/// way and the pokes merged. A higher lmid fails the test.
fn until_lmid(ws: &mut Ws, client: &str, n: u64) -> (Vec<Value>, Poke) {
    let (others, pokes) = until_poke(ws, |p| match p.lmids.get(client) {
        Some(l) => {
            let l = l.as_u64().expect("lmid");
            assert!(l <= n, "{client}'s lmid went past {n}: {l}");
            l == n
        }
        None => false,
    });
    (others, merge(pokes))
}

/// Gives the server `QUIET` to send something, then pings: everything that came before the
/// pong (pokes as `poke ...`), which also shows the socket is still open.
fn drain(ws: &mut Ws) -> Vec<String> {
    std::thread::sleep(QUIET);
    send(ws, &json!(["ping", {}]));
    let mut out = Vec::new();
    loop {
        match read_item(ws) {
            Err(m) if m[0] == "pong" => return out,
            Err(m) => out.push(m.to_string()),
            Ok(p) => out.push(format!("poke {:?} lmids {:?}", p.rows, p.lmids)),
        }
    }
}

const T: u64 = 1_700_000_000_000;

fn push_to(group: &str, client: &str, id: u64, ops: Vec<Value>) -> Value {
    json!(["push", {"clientGroupID": group, "pushVersion": 1, "timestamp": T, "requestID": format!("r{id}"),
        "mutations": [{"type": "crud", "id": id, "clientID": client, "name": "_zero_crud", "timestamp": T,
            "args": [{"ops": ops}]}]}])
}

fn op(op: &str, table: &str, value: Value) -> Value {
    json!({"op": op, "tableName": table, "primaryKey": ["id"], "value": value})
}

fn insert(value: Value) -> Value {
    op("insert", "issue", value)
}

fn alive(server: &mut Server) {
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "zcache exited"
    );
}

// ---------------------------------------------------------------- tests

/// §1.4, §1.5, §1.6: refusals at connect, pinned client groups, and `updateAuth`.
#[test]
fn auth_refusals_pinned_groups_and_update_auth() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg, "app");
    deploy_owner_rules(&pg, "app");
    let mut server = start(&pg, "app", true, &[]);
    let port = server.port;

    // --- Connect-time refusals: error frame, then close 3000 with the message as reason.
    let mut ws = open(port, "gx", "cx", Some("u1"), Some(&expired("u1")));
    assert_refused(
        &mut ws,
        "AuthInvalidated",
        "Failed to decode auth token: JWTExpired: \"exp\" claim timestamp check failed",
    );
    let mut ws = open(port, "gx", "cx", None, Some(&token("u1", 10)));
    assert_refused(
        &mut ws,
        "Unauthorized",
        "Authenticated connections require a userID.",
    );
    // An RS256 token against a secret: jose's TypeError, longer than a close reason holds
    // (zero-cache 1.9.0 crashes on it); zcache cuts the reason and stays up.
    let now = now_s();
    let rs256 = sign_with(
        json!({"alg": "RS256", "typ": "JWT"}),
        json!({"sub": "u1", "iat": now, "exp": now + 3600}),
    );
    let long =
        "Failed to decode auth token: TypeError: Key for the RS256 algorithm must be one of \
                type KeyObject, CryptoKey, or JSON Web Key. Received an instance of Uint8Array";
    assert!(long.len() > CLOSE_REASON_MAX);
    let mut ws = open(port, "gx", "cx", Some("u1"), Some(&rs256));
    assert_eq!(
        read_frame(&mut ws),
        Frame::Text(error("AuthInvalidated", long))
    );
    match read_frame(&mut ws) {
        Frame::Close(Some((3000, reason))) => {
            assert_eq!(reason.len(), CLOSE_REASON_MAX, "{reason:?}");
            assert!(long.starts_with(&reason), "{reason:?}");
        }
        f => panic!("expected close 3000, got {f:?}"),
    }
    std::thread::sleep(Duration::from_millis(200));
    alive(&mut server);
    // Still serving: a good token connects (and sees only its user's issues).
    let (_ok, first) = join(port, "gx", "cx", "u1", &token("u1", 10));
    assert_eq!(first.rows, ["put u1-old"]);

    // --- A client group is pinned to the user of its first connection.
    let (mut w1, first) = join(port, "gp", "p1", "u1", &token("u1", 10));
    assert_eq!(first.rows, ["put u1-old"]);
    let pinned = "Client groups are pinned to a single userID. Connection userID does not match existing client group userID.";
    let mut ws = open(port, "gp", "p2", Some("u2"), Some(&token("u2", 10)));
    assert_refused(&mut ws, "Unauthorized", pinned);
    let mut ws = open(port, "gp", "p3", None, None);
    assert_refused(&mut ws, "Unauthorized", pinned);
    // u1's socket is untouched and still synced.
    pg.psql(
        "app",
        "INSERT INTO issue VALUES ('u1-new', 'u1', 'fresh', 3), ('u2-new', 'u2', 'x', 4)",
    )
    .expect("insert");
    let (others, poke) = until_poke(&mut w1, |p| !p.rows.is_empty());
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(merge(poke).rows, ["put u1-new"]);
    assert_eq!(drain(&mut w1), Vec::<String>::new());

    // --- updateAuth (every error fatal: error frame, close without status).
    let (mut wu, _) = join(port, "gu", "a1", "u1", &token("u1", 100));
    send(&mut wu, &json!(["updateAuth", {"auth": expired("u1")}]));
    assert_fatal(
        &mut wu,
        "AuthInvalidated",
        "Failed to decode auth token: JWTExpired: \"exp\" claim timestamp check failed",
    );
    let (mut wu, first) = join(port, "gu", "a2", "u1", &token("u1", 100));
    assert_eq!(first.rows, ["put u1-new", "put u1-old"]);
    // A valid token issued before the held one is ignored silently: had it been taken, its
    // `extra` claim would have let u2's issue "theirs" in.
    send(
        &mut wu,
        &json!(["updateAuth", {"auth": token_extra("u1", 200, "theirs")}]),
    );
    assert_eq!(drain(&mut wu), Vec::<String>::new());
    // A newer one is taken: the query is bound to it again and the difference poked.
    send(
        &mut wu,
        &json!(["updateAuth", {"auth": token_extra("u1", 50, "theirs")}]),
    );
    let (others, poke) = until_poke(&mut wu, |p| !p.rows.is_empty());
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(merge(poke).rows, ["put u2-old"]);
    send(&mut wu, &json!(["updateAuth", {"auth": ""}]));
    assert_fatal(
        &mut wu,
        "Unauthorized",
        "No token provided. An unauthenticated client cannot connect to an authenticated client group.",
    );
    alive(&mut server);
}

/// §3: every CRUD outcome on the wire and upstream, then push routing (§3.2) under three
/// configurations.
#[test]
fn crud_outcomes_and_routing() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg, "app");
    deploy_owner_rules(&pg, "app");
    let server = start(&pg, "app", true, &[]);
    let port = server.port;
    let db = "app";
    let base = "u1-old|u1|mine|1\nu2-old|u2|theirs|2";

    let (mut ws, first) = join(port, "gc", "mc", "u1", &token("u1", 10));
    assert_eq!(first.rows, ["put u1-old"]);

    // Allowed insert: upstream, then poked with the row and lmid 1; no answer otherwise.
    let i1 = json!({"id": "i1", "owner_id": "u1", "title": "one", "priority": 1});
    send(&mut ws, &push_to("gc", "mc", 1, vec![insert(i1.clone())]));
    let (others, poke) = until_lmid(&mut ws, "mc", 1);
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(poke.rows, ["put i1"]);
    assert_eq!(poke.values[0]["title"], "one");
    assert_eq!(lmid(&pg, db, "gc", "mc"), "1");
    assert_eq!(issues(&pg, db), format!("i1|u1|one|1\n{base}"));

    // The same id again: already processed, silently ignored.
    let dup = json!({"id": "dup", "owner_id": "u1", "title": "dup", "priority": 1});
    send(&mut ws, &push_to("gc", "mc", 1, vec![insert(dup)]));
    assert_eq!(drain(&mut ws), Vec::<String>::new());
    assert_eq!(lmid(&pg, db, "gc", "mc"), "1");
    assert_eq!(issues(&pg, db), format!("i1|u1|one|1\n{base}"));

    // A gap: fatal.
    let gap = json!({"id": "gap", "owner_id": "u1", "title": "gap", "priority": 1});
    send(&mut ws, &push_to("gc", "mc", 3, vec![insert(gap)]));
    assert_fatal(
        &mut ws,
        "InvalidPush",
        "Push contains unexpected mutation id 3 for client mc. Expected mutation id 2.",
    );
    assert_eq!(lmid(&pg, db, "gc", "mc"), "1");
    assert_eq!(issues(&pg, db), format!("i1|u1|one|1\n{base}"));

    // The client reconnects. Denied writes (another owner's row, a row for another owner):
    // nothing said, nothing written, the lmid still bumped.
    let (mut ws, _) = join(port, "gc", "mc", "u1", &token("u1", 10));
    let hijack = json!({"id": "u2-old", "title": "hijacked"});
    send(
        &mut ws,
        &push_to("gc", "mc", 2, vec![op("update", "issue", hijack)]),
    );
    let (others, _) = until_lmid(&mut ws, "mc", 2);
    assert!(others.is_empty(), "{others:?}");
    let foreign = json!({"id": "f1", "owner_id": "u2", "title": "foreign", "priority": 1});
    send(&mut ws, &push_to("gc", "mc", 3, vec![insert(foreign)]));
    let (others, poke) = until_lmid(&mut ws, "mc", 3);
    assert!(others.is_empty(), "{others:?}");
    assert!(poke.rows.is_empty(), "{:?}", poke.rows);
    assert_eq!(lmid(&pg, db, "gc", "mc"), "3");
    assert_eq!(issues(&pg, db), format!("i1|u1|one|1\n{base}"));

    // A PostgreSQL error: transient MutationFailed, lmid bumped, the socket stays.
    let bad = json!({"id": "bad", "owner_id": "u1", "title": "bad", "priority": "abc"});
    send(&mut ws, &push_to("gc", "mc", 4, vec![insert(bad)]));
    let (others, _) = until_lmid(&mut ws, "mc", 4);
    assert_eq!(
        others,
        [error(
            "MutationFailed",
            "PostgresError: invalid input syntax for type integer: \"abc\""
        )]
    );
    assert_eq!(lmid(&pg, db, "gc", "mc"), "4");

    // An unknown table.
    send(
        &mut ws,
        &push_to(
            "gc",
            "mc",
            5,
            vec![op("insert", "nope", json!({"id": "x"}))],
        ),
    );
    let (others, _) = until_lmid(&mut ws, "mc", 5);
    assert_eq!(
        others,
        [error(
            "MutationFailed",
            "Error: Table 'nope' is not a valid table."
        )]
    );

    // An update of a row that does not exist.
    let ghost = json!({"id": "ghost", "title": "boo"});
    send(
        &mut ws,
        &push_to("gc", "mc", 6, vec![op("update", "issue", ghost)]),
    );
    let (others, _) = until_lmid(&mut ws, "mc", 6);
    assert_eq!(others.len(), 1, "{others:?}");
    assert_eq!(others[0][0], "error");
    assert_eq!(others[0][1]["kind"], "MutationFailed");
    assert_eq!(others[0][1]["origin"], "zeroCache");
    let message = others[0][1]["message"].as_str().expect("message");
    assert!(
        message.starts_with("Error: Pre-mutation row not found for"),
        "{message}"
    );
    assert_eq!(lmid(&pg, db, "gc", "mc"), "6");
    assert_eq!(issues(&pg, db), format!("i1|u1|one|1\n{base}"));

    // After all that the same socket still writes.
    let uno = json!({"id": "i1", "title": "uno"});
    send(
        &mut ws,
        &push_to("gc", "mc", 7, vec![op("update", "issue", uno)]),
    );
    let (others, poke) = until_lmid(&mut ws, "mc", 7);
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(poke.rows, ["put i1"]);
    assert_eq!(poke.values[0]["title"], "uno");
    assert_eq!(issues(&pg, db), format!("i1|u1|uno|1\n{base}"));

    // --- Routing: a push for another client group (zero-cache's message, quote missing).
    let stray = json!({"id": "stray", "owner_id": "u1", "title": "s", "priority": 1});
    send(&mut ws, &push_to("other", "mc", 8, vec![insert(stray)]));
    assert_fatal(
        &mut ws,
        "InvalidPush",
        "clientGroupID in mutation \"other\" does not match clientGroupID of connection \"gc",
    );
    assert_eq!(lmid(&pg, db, "gc", "mc"), "7");
    assert_eq!(lmid(&pg, db, "other", "mc"), "");
    assert_eq!(issues(&pg, db), format!("i1|u1|uno|1\n{base}"));
    drop(server);

    // CRUD mutations disabled.
    seed(&pg, "nocrud");
    deploy_owner_rules(&pg, "nocrud");
    let server = start(
        &pg,
        "nocrud",
        true,
        &[("ZERO_ENABLE_CRUD_MUTATIONS", Some("false"))],
    );
    let (mut ws, _) = join(server.port, "gd", "md", "u1", &token("u1", 10));
    let row = json!({"id": "n1", "owner_id": "u1", "title": "n", "priority": 1});
    send(&mut ws, &push_to("gd", "md", 1, vec![insert(row.clone())]));
    assert_fatal(
        &mut ws,
        "InvalidPush",
        "Support for legacy CRUD mutations is disabled",
    );
    assert_eq!(lmid(&pg, "nocrud", "gd", "md"), "");
    assert_eq!(issues(&pg, "nocrud"), base);
    drop(server);

    // No key option: the token is opaque, and CRUD needs a JWT.
    seed(&pg, "noauth");
    deploy_owner_rules(&pg, "noauth");
    let server = start(&pg, "noauth", false, &[]);
    let (mut ws, _) = join(server.port, "go", "mo", "u1", "an-opaque-token");
    send(&mut ws, &push_to("go", "mo", 1, vec![insert(row)]));
    assert_fatal(
        &mut ws,
        "Internal",
        "Only JWT auth is supported for CRUD mutations",
    );
    assert_eq!(lmid(&pg, "noauth", "go", "mo"), "");
    assert_eq!(issues(&pg, "noauth"), base);
}

/// §4 as zcache does it: the limit counts per user across client groups (zero-cache counts
/// per client group).
#[test]
fn rate_limit_counts_per_user_across_groups() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    let db = "rl";
    seed(&pg, db);
    deploy_owner_rules(&pg, db);
    // A day-long window, so no window boundary falls inside the test.
    let server = start(
        &pg,
        db,
        true,
        &[
            ("ZERO_PER_USER_MUTATION_LIMIT_MAX", Some("2")),
            ("ZERO_PER_USER_MUTATION_LIMIT_WINDOW_MS", Some("86400000")),
        ],
    );
    let port = server.port;
    let base = "u1-old|u1|mine|1\nu2-old|u2|theirs|2";
    let row =
        |id: &str, owner: &str| json!({"id": id, "owner_id": owner, "title": id, "priority": 1});

    let (mut a, _) = join(port, "ga", "ca", "u1", &token("u1", 10));
    for (n, id) in [(1, "r1"), (2, "r2")] {
        send(&mut a, &push_to("ga", "ca", n, vec![insert(row(id, "u1"))]));
        let (others, poke) = until_lmid(&mut a, "ca", n);
        assert!(others.is_empty(), "{others:?}");
        assert_eq!(poke.rows, [format!("put {id}")]);
    }
    // The third: transient, not applied, lmid unchanged, the socket stays.
    send(
        &mut a,
        &push_to("ga", "ca", 3, vec![insert(row("r3", "u1"))]),
    );
    assert_eq!(
        read_frame(&mut a),
        Frame::Text(error("MutationRateLimited", "Rate limit exceeded"))
    );
    assert_eq!(drain(&mut a), Vec::<String>::new());
    assert_eq!(lmid(&pg, db, "ga", "ca"), "2");
    let two = format!("r1|u1|r1|1\nr2|u1|r2|1\n{base}");
    assert_eq!(issues(&pg, db), two);

    // The same user in another client group, on another socket: limited too.
    let (mut b, _) = join(port, "gb", "cb", "u1", &token("u1", 10));
    send(
        &mut b,
        &push_to("gb", "cb", 1, vec![insert(row("r4", "u1"))]),
    );
    assert_eq!(
        read_frame(&mut b),
        Frame::Text(error("MutationRateLimited", "Rate limit exceeded"))
    );
    assert_eq!(drain(&mut b), Vec::<String>::new());
    assert_eq!(lmid(&pg, db, "gb", "cb"), "");
    assert_eq!(issues(&pg, db), two);

    // Another user is not.
    let (mut c, _) = join(port, "gc2", "cc", "u2", &token("u2", 10));
    send(
        &mut c,
        &push_to("gc2", "cc", 1, vec![insert(row("r5", "u2"))]),
    );
    let (others, poke) = until_lmid(&mut c, "cc", 1);
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(poke.rows, ["put r5"]);
    assert_eq!(lmid(&pg, db, "gc2", "cc"), "1");
    assert_eq!(
        issues(&pg, db),
        format!("r1|u1|r1|1\nr2|u1|r2|1\nr5|u2|r5|1\n{base}")
    );
}
