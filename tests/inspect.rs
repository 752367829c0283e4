//! The inspector (`inspect` messages of sync protocol v51) over real sockets: a real
//! PostgreSQL (started here), the zcache binary with `--admin-password`, and raw WebSocket
//! clients. Queries are legacy ASTs; allow-all read permissions are deployed upstream so the
//! rows stay visible once legacy queries go through row-level permissions.

use serde_json::{json, Value};
use std::net::TcpStream;
use tungstenite::Message;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};

mod zcache_proc;
use zcache_proc::{connect, next, Server, Ws, WAIT};

const APP: &str = "ztest";
const PASSWORD: &str = "s3cret-admin";

fn seed(pg: &PgCluster) {
    pg.create_database("app").expect("create db");
    pg.psql(
        "app",
        &format!(
            "CREATE TABLE issue (id TEXT PRIMARY KEY, title TEXT);
             INSERT INTO issue SELECT 'i' || i, 'Issue ' || i FROM generate_series(1, 5) i;
             CREATE SCHEMA IF NOT EXISTS {APP};
             CREATE TABLE IF NOT EXISTS {APP}.permissions (permissions JSONB, hash TEXT,
               lock BOOL PRIMARY KEY DEFAULT true CHECK (lock));
             INSERT INTO {APP}.permissions (permissions) VALUES
               ('{{\"tables\":{{\"issue\":{{\"row\":{{\"select\":[[\"allow\",{{\"type\":\"and\",\"conditions\":[]}}]]}}}}}}}}')
             ON CONFLICT (lock) DO UPDATE SET permissions = EXCLUDED.permissions;"
        ),
    )
    .expect("seed");
}

fn start_zcache(pg: &PgCluster, dir: &std::path::Path) -> Server {
    // Not development mode, whatever the environment says: authentication is required.
    zcache_proc::start_at(
        &pg.url("app"),
        APP,
        dir,
        zcache_proc::free_port(),
        &["--admin-password", PASSWORD],
        &[("NODE_ENV", None)],
    )
}

fn send(ws: &mut Ws, msg: Value) {
    ws.send(Message::text(msg.to_string())).expect("send");
}

/// `issue` rows whose id is one of `ids`.
fn issues(ids: &[&str]) -> Value {
    let conditions: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "simple", "op": "=", "left": {"type": "column", "name": "id"}, "right": {"type": "literal", "value": id}}))
        .collect();
    json!({"table": "issue", "where": {"type": "or", "conditions": conditions}, "orderBy": [["id", "asc"]]})
}

/// Reads one whole poke; returns the ids of the rows it puts.
fn read_poke(ws: &mut Ws) -> Vec<String> {
    let start = next(ws);
    assert_eq!(start[0], "pokeStart", "expected a poke, got {start}");
    let mut puts = Vec::new();
    loop {
        let m = next(ws);
        match m[0].as_str() {
            Some("pokePart") => {
                for r in m[1]["rowsPatch"].as_array().into_iter().flatten() {
                    if r["op"] == "put" {
                        puts.push(r["value"]["id"].as_str().unwrap_or("").to_string());
                    }
                }
            }
            Some("pokeEnd") => {
                puts.sort();
                return puts;
            }
            _ => panic!("unexpected message inside a poke: {m}"),
        }
    }
}

/// Sends `["inspect", body]` and returns the answer's body (pokes in between are skipped).
fn inspect(ws: &mut Ws, body: Value) -> Value {
    let id = body["id"].clone();
    send(ws, json!(["inspect", body]));
    loop {
        let m = next(ws);
        match m[0].as_str() {
            Some("inspect") => {
                assert_eq!(m[1]["id"], id, "the answer echoes the id: {m}");
                return m[1].clone();
            }
            Some("pokeStart" | "pokePart" | "pokeEnd") => continue,
            _ => panic!("unexpected message while waiting for inspect {id}: {m}"),
        }
    }
}

/// A socket whose connect carries no initConnection (`{}` as the protocol header).
fn connect_without_init(port: u16, group: &str, client: &str) -> Ws {
    use tungstenite::client::IntoClientRequest;
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("tcp");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!(
        "ws://127.0.0.1:{port}/sync/v51/connect?clientID={client}&clientGroupID={group}&baseCookie=&ts=1&lmid=0&wsid=w-{client}"
    )
    .into_client_request()
    .expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static("e30%3D"),
    );
    let (mut ws, _) = tungstenite::client(req, stream).expect("handshake");
    assert_eq!(next(&mut ws)[0], "connected");
    ws
}

fn is_digest(v: &Value) -> bool {
    v.as_array().is_some_and(|a| {
        a.first() == Some(&json!(1000)) && a.len() % 2 == 1 && a.iter().all(Value::is_number)
    })
}

#[test]
fn inspector_authenticates_then_answers_queries_metrics_version_and_analysis() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_zcache(&pg, dir.path());
    let port = server.port;

    // Before initConnection an inspect message is dropped silently: the pong comes alone.
    let mut early = connect_without_init(port, "g-early", "ce");
    send(
        &mut early,
        json!(["inspect", {"op": "version", "id": "early"}]),
    );
    send(&mut early, json!(["ping", {}]));
    assert_eq!(next(&mut early)[0], "pong");

    let ast = issues(&["i1", "i2", "i3"]);
    let mut ws = connect(
        port,
        "g1",
        "c1",
        json!({"desiredQueriesPatch": [{"op": "put", "hash": "q1", "ast": ast, "ttl": 300000}]}),
    );
    read_poke(&mut ws); // the desired echo
    let hydrated = read_poke(&mut ws);
    assert_eq!(hydrated, vec!["i1", "i2", "i3"]);

    // Not authenticated: every op but authenticate is challenged.
    for op in ["version", "queries", "metrics", "analyze-query"] {
        let id = format!("pre-{op}");
        assert_eq!(
            inspect(&mut ws, json!({"op": op, "id": id, "ast": ast})),
            json!({"op": "authenticated", "id": id, "value": false})
        );
    }
    let wrong = inspect(
        &mut ws,
        json!({"op": "authenticate", "id": "a1", "value": "s3cret-admiN"}),
    );
    assert_eq!(
        wrong,
        json!({"op": "authenticated", "id": "a1", "value": false})
    );
    let short = inspect(
        &mut ws,
        json!({"op": "authenticate", "id": "a2", "value": "s3"}),
    );
    assert_eq!(short["value"], false);
    assert_eq!(
        inspect(&mut ws, json!({"op": "version", "id": "v0"}))["op"],
        "authenticated",
        "a failed attempt leaves the group unauthenticated"
    );
    let right = inspect(
        &mut ws,
        json!({"op": "authenticate", "id": "a3", "value": PASSWORD}),
    );
    assert_eq!(
        right,
        json!({"op": "authenticated", "id": "a3", "value": true})
    );

    assert_eq!(
        inspect(&mut ws, json!({"op": "version", "id": "v1"})),
        json!({"op": "version", "id": "v1", "value": "1.9.0"})
    );

    let queries = inspect(&mut ws, json!({"op": "queries", "id": "q"}));
    assert_eq!(queries["op"], "queries");
    let rows = queries["value"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{queries}");
    let row = &rows[0];
    assert_eq!(row["clientID"], "c1");
    assert_eq!(row["queryID"], "q1");
    assert_eq!(row["ttl"], 300000);
    assert_eq!(row["inactivatedAt"], Value::Null);
    assert_eq!(row["rowCount"], hydrated.len());
    assert_eq!(row["ast"], ast);
    assert_eq!(row["got"], true);
    assert_eq!(row["deleted"], false);
    assert_eq!(row["name"], Value::Null);
    assert_eq!(row["args"], Value::Null);
    assert!(
        row["metrics"]["query-hydration-server-ms"].is_number(),
        "{row}"
    );
    assert!(is_digest(&row["metrics"]["query-update-server"]), "{row}");
    let mine = inspect(
        &mut ws,
        json!({"op": "queries", "id": "q2", "clientID": "c1"}),
    );
    assert_eq!(mine["value"].as_array().map(Vec::len), Some(1));
    let none = inspect(
        &mut ws,
        json!({"op": "queries", "id": "q3", "clientID": "nobody"}),
    );
    assert_eq!(none["value"], json!([]));

    // analyze-query on an AST: the rows it syncs, read on the replica.
    let analysis = inspect(
        &mut ws,
        json!({"op": "analyze-query", "id": "an1", "ast": issues(&["i2", "i4"])}),
    );
    assert_eq!(analysis["op"], "analyze-query", "{analysis}");
    let result = &analysis["value"];
    assert_eq!(result["warnings"], json!([]));
    assert_eq!(
        result["syncedRows"],
        json!({"issue": [{"id": "i2", "title": "Issue 2"}, {"id": "i4", "title": "Issue 4"}]})
    );
    assert_eq!(result["syncedRowCount"], 2);
    assert!(
        result["readRowCount"].as_u64().is_some_and(|n| n >= 2),
        "{result}"
    );
    for k in ["start", "end", "elapsed"] {
        assert!(result[k].is_number(), "{k}: {result}");
    }
    assert!(result.get("vendedRows").is_none(), "only when asked");
    // The deprecated `value`, syncedRows off, vendedRows on.
    let analysis = inspect(
        &mut ws,
        json!({"op": "analyze-query", "id": "an2", "value": issues(&["i5"]),
               "options": {"syncedRows": false, "vendedRows": true}}),
    );
    let result = &analysis["value"];
    assert_eq!(result["syncedRowCount"], 1, "{analysis}");
    assert!(result.get("syncedRows").is_none(), "{result}");
    assert!(result["vendedRowCounts"]["issue"].is_object(), "{result}");

    // Errors are answered, and the socket stays open.
    let no_ast = inspect(&mut ws, json!({"op": "analyze-query", "id": "e1"}));
    assert_eq!(no_ast["op"], "error");
    assert!(
        no_ast["value"]
            .as_str()
            .is_some_and(|m| m.starts_with("AST is required for analyze-query operation")),
        "{no_ast}"
    );
    let named = inspect(
        &mut ws,
        json!({"op": "analyze-query", "id": "e2", "name": "byId", "args": [{"id": "i1"}]}),
    );
    assert_eq!(
        named,
        json!({"op": "error", "id": "e2", "value": "Custom query transformation requested but no CustomQueryTransformer is configured"})
    );
    let bad_table = inspect(
        &mut ws,
        json!({"op": "analyze-query", "id": "e3", "ast": {"table": "nope"}}),
    );
    assert_eq!(bad_table["op"], "error", "{bad_table}");
    let unknown = inspect(&mut ws, json!({"op": "frobnicate", "id": "e4"}));
    assert_eq!(unknown["op"], "error");

    // A change upstream advances the query: its update time lands in the metrics.
    pg.psql("app", "UPDATE issue SET title = 'changed' WHERE id = 'i1'")
        .expect("update");
    assert_eq!(read_poke(&mut ws), vec!["i1"]);
    let metrics = inspect(&mut ws, json!({"op": "metrics", "id": "m"}));
    assert_eq!(metrics["op"], "metrics");
    let hydrations = &metrics["value"]["query-materialization-server"];
    let updates = &metrics["value"]["query-update-server"];
    assert!(is_digest(hydrations) && is_digest(updates), "{metrics}");
    assert!(
        hydrations.as_array().is_some_and(|a| a.len() >= 3),
        "{metrics}"
    );
    assert!(
        updates.as_array().is_some_and(|a| a.len() >= 3),
        "{metrics}"
    );
    let row = &inspect(&mut ws, json!({"op": "queries", "id": "q4"}))["value"][0];
    let per_query = &row["metrics"]["query-update-server"];
    assert!(per_query.as_array().is_some_and(|a| a.len() >= 3), "{row}");

    // Authentication belongs to the group: another socket of it needs none.
    let mut other = connect(port, "g1", "c2", json!({"desiredQueriesPatch": []}));
    let reply = inspect(&mut other, json!({"op": "version", "id": "o1"}));
    assert_eq!(reply["value"], "1.9.0");
    // ...and a third socket's answers go to it alone.
    send(&mut ws, json!(["ping", {}]));
    loop {
        let m = next(&mut ws);
        assert_ne!(
            m[0], "inspect",
            "another socket's answer reached this one: {m}"
        );
        if m[0] == "pong" {
            break;
        }
    }
    drop(server);
}
