//! Query TTLs and client deletion over real sockets: a real PostgreSQL (started here), the
//! zcache binary, and WebSocket clients speaking the Zero protocol as the 1.9 client does.
//! Queries are legacy ASTs, so no app server is needed.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tungstenite::Message;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};

mod zcache_proc;
use zcache_proc::{connect, next, Server, Ws};

fn start_zcache(pg: &PgCluster) -> Server {
    zcache_proc::start(&pg.url("app"), "ztest", &[])
}

fn seed(pg: &PgCluster) {
    pg.create_database("app").expect("create db");
    pg.psql(
        "app",
        "CREATE TABLE issue (id TEXT PRIMARY KEY, title TEXT);
         INSERT INTO issue SELECT 'i' || i, 'Issue ' || i FROM generate_series(1, 5) i;",
    )
    .expect("seed");
    zcache_proc::allow_reads(pg, "app", "ztest", &["issue"]);
}

fn send(ws: &mut Ws, msg: Value) {
    ws.send(Message::text(msg.to_string())).expect("send");
}

/// One whole poke, its patches as sorted `op key` strings.
#[derive(Debug, Default)]
struct Poke {
    /// `client op hash`
    desired: Vec<String>,
    /// `op hash`
    got: Vec<String>,
    /// `op id`
    rows: Vec<String>,
}

fn op_hash(v: &Value) -> String {
    format!(
        "{} {}",
        v["op"].as_str().unwrap_or(""),
        v["hash"].as_str().unwrap_or("")
    )
}

/// A poke, or any other message.
#[derive(Debug)]
enum Item {
    Poke(Poke),
    Other(Value),
}

fn read_item(ws: &mut Ws) -> Item {
    let start = next(ws);
    if start[0] != "pokeStart" {
        return Item::Other(start);
    }
    let mut poke = Poke::default();
    loop {
        let m = next(ws);
        match m[0].as_str() {
            Some("pokePart") => {
                let part = &m[1];
                for r in part["rowsPatch"].as_array().into_iter().flatten() {
                    let id = match r["op"].as_str() {
                        Some("put") => &r["value"]["id"],
                        _ => &r["id"]["id"],
                    };
                    poke.rows.push(format!(
                        "{} {}",
                        r["op"].as_str().unwrap_or(""),
                        id.as_str().unwrap_or("")
                    ));
                }
                for g in part["gotQueriesPatch"].as_array().into_iter().flatten() {
                    poke.got.push(op_hash(g));
                }
                for (client, ops) in part["desiredQueriesPatches"]
                    .as_object()
                    .into_iter()
                    .flatten()
                {
                    for op in ops.as_array().into_iter().flatten() {
                        assert!(op.get("ttl").is_none(), "no ttl in the echo: {op}");
                        poke.desired.push(format!("{client} {}", op_hash(op)));
                    }
                }
            }
            Some("pokeEnd") => {
                assert_eq!(m[1]["pokeID"], start[1]["pokeID"]);
                poke.desired.sort();
                poke.got.sort();
                poke.rows.sort();
                return Item::Poke(poke);
            }
            _ => panic!("unexpected message inside a poke: {m}"),
        }
    }
}

fn read_poke(ws: &mut Ws) -> Poke {
    match read_item(ws) {
        Item::Poke(p) => p,
        Item::Other(m) => panic!("expected a poke, got {m}"),
    }
}

/// Sends a ping and reads up to its pong: everything the server sent before it.
fn drain(ws: &mut Ws) -> Vec<Item> {
    send(ws, json!(["ping", {}]));
    let mut out = Vec::new();
    loop {
        match read_item(ws) {
            Item::Other(m) if m[0] == "pong" => return out,
            item => out.push(item),
        }
    }
}

fn acks(items: &[Item]) -> Vec<Value> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Other(m) if m[0] == "deleteClients" => Some(m[1]["clientIDs"].clone()),
            _ => None,
        })
        .collect()
}

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|i| i.to_string()).collect()
}

/// `issue` rows whose id is one of `ids`.
fn issues(ids: &[&str]) -> Value {
    let conditions: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "simple", "op": "=", "left": {"type": "column", "name": "id"}, "right": {"type": "literal", "value": id}}))
        .collect();
    json!({"table": "issue", "where": {"type": "or", "conditions": conditions}, "orderBy": [["id", "asc"]]})
}

fn put(hash: &str, ids: &[&str], ttl: u64) -> Value {
    json!({"op": "put", "hash": hash, "ast": issues(ids), "ttl": ttl})
}

fn change(ops: Vec<Value>) -> Value {
    json!(["changeDesiredQueries", {"desiredQueriesPatch": ops}])
}

/// Reads the two pokes of queries added at connect or by a change: the desired echo, then
/// got + rows.
fn read_added(ws: &mut Ws) -> (Poke, Poke) {
    (read_poke(ws), read_poke(ws))
}

#[test]
fn ttl_keeps_dropped_queries_for_a_while_and_client_deletion_inactivates() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let server = start_zcache(&pg);
    let port = server.port;

    // --- TTL: a del keeps the query and its rows until its TTL runs out.
    let mut ws = connect(
        port,
        "ga",
        "c1",
        json!({"desiredQueriesPatch": [put("q12", &["i1", "i2"], 1000), put("q2", &["i2"], 300_000)]}),
    );
    let (config, hydrate) = read_added(&mut ws);
    assert_eq!(config.desired, s(&["c1 put q12", "c1 put q2"]));
    assert_eq!(hydrate.got, s(&["put q12", "put q2"]));
    assert_eq!(hydrate.rows, s(&["put i1", "put i2"]));

    // A repeated put with the same or a lower TTL changes nothing; nothing is poked.
    send(&mut ws, change(vec![put("q12", &["i1", "i2"], 500)]));
    assert!(
        drain(&mut ws).is_empty(),
        "a put that does not raise the TTL is silent"
    );

    send(&mut ws, change(vec![json!({"op": "del", "hash": "q12"})]));
    let del = read_poke(&mut ws);
    let dropped = Instant::now();
    assert_eq!(
        del.desired,
        s(&["c1 del q12"]),
        "the desired del goes at once"
    );
    assert!(
        del.got.is_empty() && del.rows.is_empty(),
        "still got: {del:?}"
    );

    // About a second later: got del, and a row del only for the row q2 does not reach.
    let expiry = read_poke(&mut ws);
    let waited = dropped.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "expired after {waited:?}"
    );
    assert_eq!(expiry.got, s(&["del q12"]));
    assert_eq!(
        expiry.rows,
        s(&["del i1"]),
        "i2 survives: q2 still reaches it"
    );
    assert!(expiry.desired.is_empty());

    // ttl 0: dropped and removed in the same change.
    send(&mut ws, change(vec![put("q3", &["i3"], 0)]));
    let (_, added) = read_added(&mut ws);
    assert_eq!(added.rows, s(&["put i3"]));
    send(&mut ws, change(vec![json!({"op": "del", "hash": "q3"})]));
    let started = Instant::now();
    let config = read_poke(&mut ws);
    assert_eq!(config.desired, s(&["c1 del q3"]));
    let removal = read_poke(&mut ws);
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(removal.got, s(&["del q3"]));
    assert_eq!(removal.rows, s(&["del i3"]));

    // Reactivation within the TTL: a desired put, no rehydration, and no expiry later.
    send(&mut ws, change(vec![put("q4", &["i4"], 1000)]));
    read_added(&mut ws);
    send(&mut ws, change(vec![json!({"op": "del", "hash": "q4"})]));
    assert_eq!(read_poke(&mut ws).desired, s(&["c1 del q4"]));
    send(&mut ws, change(vec![put("q4", &["i4"], 1000)]));
    let again = read_poke(&mut ws);
    assert_eq!(again.desired, s(&["c1 put q4"]));
    assert!(again.got.is_empty() && again.rows.is_empty(), "{again:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        drain(&mut ws).is_empty(),
        "a reactivated query does not expire"
    );
    drop(ws);

    // --- Several clients of one group.
    let mut w1 = connect(
        port,
        "gb",
        "c1",
        json!({"desiredQueriesPatch": [put("q12", &["i1", "i2"], 1000)]}),
    );
    read_added(&mut w1);
    let mut w2 = connect(
        port,
        "gb",
        "c2",
        json!({"desiredQueriesPatch": [put("q3", &["i3"], 1000)], "activeClients": ["c1", "c2"]}),
    );
    // c2's catch-up and its query's two pokes; c1 sees the same changes.
    let mut got2 = Vec::new();
    let mut rows2 = Vec::new();
    for item in drain(&mut w2) {
        if let Item::Poke(p) = item {
            got2.extend(p.got);
            rows2.extend(p.rows);
        }
    }
    got2.sort();
    rows2.sort();
    assert_eq!(got2, s(&["put q12", "put q3"]));
    assert_eq!(rows2, s(&["put i1", "put i2", "put i3"]));
    let seen1 = drain(&mut w1);
    assert!(
        acks(&seen1).is_empty(),
        "activeClients listing everyone deletes nobody"
    );

    // deleteClients from c2 deletes c1: acked to every socket; c1's query expires later.
    send(&mut w2, json!(["deleteClients", {"clientIDs": ["c1"]}]));
    let deleted_at = Instant::now();
    for ws in [&mut w2, &mut w1] {
        let items = drain(ws);
        assert_eq!(acks(&items), vec![json!(["c1"])], "{items:?}");
        let desired: Vec<String> = items
            .iter()
            .filter_map(|i| match i {
                Item::Poke(p) => Some(p.desired.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(desired, s(&["c1 del q12"]));
    }
    let expiry = read_poke(&mut w2);
    assert!(deleted_at.elapsed() >= Duration::from_millis(900));
    assert_eq!(expiry.got, s(&["del q12"]));
    assert_eq!(expiry.rows, s(&["del i1", "del i2"]));
    let expiry1 = read_poke(&mut w1);
    assert_eq!(expiry1.got, s(&["del q12"]));

    // A client whose activeClients leaves c2 out deletes it, without an ack.
    let mut w3 = connect(
        port,
        "gb",
        "c3",
        json!({"desiredQueriesPatch": [], "activeClients": ["c3"]}),
    );
    for ws in [&mut w3, &mut w2] {
        let items = drain(ws);
        assert!(
            acks(&items).is_empty(),
            "activeClients deletions are not acked: {items:?}"
        );
    }
    let expiry = read_poke(&mut w2);
    assert_eq!(expiry.got, s(&["del q3"]), "c2's query expired by its TTL");
    assert_eq!(expiry.rows, s(&["del i3"]));

    // initConnection.deleted is acked, listing the activeClients deletions too and clients
    // unknown to the group.
    let mut w4 = connect(
        port,
        "gb",
        "c4",
        json!({"desiredQueriesPatch": [], "activeClients": ["c4"], "deleted": {"clientIDs": ["ghost"]}}),
    );
    for ws in [&mut w4, &mut w3] {
        let items = drain(ws);
        assert_eq!(acks(&items), vec![json!(["c3", "ghost"])], "{items:?}");
    }

    // Deleting oneself is an internal error.
    send(&mut w4, json!(["deleteClients", {"clientIDs": ["c4"]}]));
    let err = next(&mut w4);
    assert_eq!(err[0], "error");
    assert_eq!(err[1]["kind"], "Internal");
    drop(server);
}
