//! `/metrics`, the health checks and `--log-format json` of the real server: a real
//! PostgreSQL (started here), the zcache binary, and a WebSocket client speaking the Zero
//! protocol (a legacy AST query, so no app server is needed).

use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};

mod zcache_proc;
use zcache_proc::{free_port, next, Server, Ws, WAIT};

/// zcache with JSON logs and two syncer shards (so `/metrics` merges several executors).
fn start_zcache(pg: &PgCluster) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--num-sync-workers", "2", "--log-format", "json"];
    let env = [("ZCACHE_LOG", None)];
    let mut server = zcache_proc::start_at(
        &pg.url("app"),
        "zmetrics",
        dir.path(),
        free_port(),
        &args,
        &env,
    );
    server.dir = Some(dir);
    server
}

/// Time for every executor to publish figures recorded now (it does so every second).
const METRICS_WAIT: Duration = Duration::from_secs(10);

fn seed(pg: &PgCluster) {
    pg.create_database("app").expect("create db");
    pg.psql(
        "app",
        "CREATE TABLE issue (id TEXT PRIMARY KEY, title TEXT, status TEXT, created BIGINT);
         INSERT INTO issue SELECT 'i' || i, 'Issue ' || i, (ARRAY['open','closed'])[1 + i % 2], 1000 + i
           FROM generate_series(1, 20) i;",
    )
    .expect("seed");
    zcache_proc::allow_reads(pg, "app", "zmetrics", &["issue"]);
}

/// One raw HTTP exchange: (status line, lowercased headers, body).
fn http(port: u16, request: &str) -> (String, BTreeMap<String, String>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("tcp");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read until close");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole head");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// The `/metrics` samples, by series (`name{labels}`).
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, headers, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample has a value");
            (series.to_string(), value.parse().expect("numeric value"))
        })
        .collect()
}

fn get(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// The sum of a per-shard gauge over the shards.
fn over_shards(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    let prefix = format!("{name}{{shard=");
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
        .sum()
}

/// Scrapes until `ok` holds, or fails with the last scrape.
fn scrape_until(
    port: u16,
    what: &str,
    ok: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + METRICS_WAIT;
    loop {
        let samples = scrape(port);
        if ok(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {METRICS_WAIT:?}: {samples:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn connect(port: u16, init: Value) -> Ws {
    let body = json!({"initConnectionMessage": ["initConnection", init]});
    let b64 = base64::engine::general_purpose::STANDARD.encode(body.to_string());
    let protocol =
        percent_encoding::utf8_percent_encode(&b64, percent_encoding::NON_ALPHANUMERIC).to_string();
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("tcp");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!(
        "ws://127.0.0.1:{port}/sync/v51/connect?clientID=c1&clientGroupID=g1&baseCookie=&ts=1&lmid=0&wsid=w1"
    )
    .into_client_request()
    .expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&protocol).expect("header"),
    );
    tungstenite::client(req, stream).expect("handshake").0
}

/// Reads up to the next pokeEnd; returns the puts of the poke's rows (table, id).
fn read_poke(ws: &mut Ws) -> Vec<(String, String)> {
    let start = next(ws);
    assert_eq!(start[0], "pokeStart", "expected pokeStart, got {start}");
    let mut puts = Vec::new();
    loop {
        let m = next(ws);
        match m[0].as_str() {
            Some("pokePart") => {
                for r in m[1]["rowsPatch"].as_array().cloned().unwrap_or_default() {
                    if r["op"] == "put" {
                        puts.push((
                            r["tableName"].as_str().unwrap_or_default().to_string(),
                            r["value"]["id"].as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
            }
            Some("pokeEnd") => return puts,
            _ => panic!("unexpected message inside a poke: {m}"),
        }
    }
}

fn open_issues() -> Value {
    json!({"desiredQueriesPatch": [{"op": "put", "hash": "q1", "ttl": 300000, "ast": {
        "table": "issue",
        "where": {"type": "simple", "op": "=", "left": {"type": "column", "name": "status"},
                  "right": {"type": "literal", "value": "open"}},
        "orderBy": [["id", "asc"]]
    }}]})
}

fn check_health_endpoints(port: u16) {
    for path in ["/", "/keepalive"] {
        let (status, headers, body) =
            http(port, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(status, "HTTP/1.1 200 OK", "GET {path}");
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(body, "OK");
        let (status, headers, body) =
            http(port, &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(status, "HTTP/1.1 200 OK", "HEAD {path}");
        assert_eq!(headers.get("content-length").map(String::as_str), Some("2"));
        assert_eq!(body, "");
    }
    let (status, _, body) = http(port, "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let body: Value = serde_json::from_str(&body).expect("a JSON 404");
    assert_eq!(
        body,
        json!({"message": "Route GET:/nowhere not found", "error": "Not Found", "statusCode": 404})
    );
}

#[test]
fn metrics_health_and_json_logs() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    seed(&pg);
    let server = start_zcache(&pg);
    let port = server.port;
    check_health_endpoints(port);

    let mut ws = connect(port, open_issues());
    assert_eq!(next(&mut ws)[0], "connected");
    let _config = read_poke(&mut ws);
    let hydrated = read_poke(&mut ws);
    assert_eq!(hydrated.len(), 10, "the open issues: {hydrated:?}");

    // Hydrated, connected: counted once every shard has published.
    let before = scrape_until(port, "the hydration and the connection", |s| {
        get(s, "zero_sync_hydration_time_seconds_count") >= 1.0
            && over_shards(s, "zero_sync_websocket_open_connections") == 1.0
    });
    assert_eq!(over_shards(&before, "zero_sync_active_client_groups"), 1.0);
    assert_eq!(over_shards(&before, "zero_sync_queries"), 1.0);
    assert!(over_shards(&before, "zero_sync_rows") >= 10.0);
    let lag_before = get(&before, "zcache_replication_lag_seconds_count");

    // An upstream change the query sees: replicated, advanced, poked.
    pg.psql("app", "UPDATE issue SET title = 'changed' WHERE id = 'i2'")
        .expect("update");
    let poked = read_poke(&mut ws);
    assert_eq!(poked, vec![("issue".to_string(), "i2".to_string())]);

    let after = scrape_until(port, "the change's replication lag and poke latency", |s| {
        get(s, "zcache_replication_lag_seconds_count") > lag_before
            && get(s, "zero_sync_view_syncer_lag_seconds_count") >= 1.0
            && get(s, "zero_sync_advance_time_seconds_count") >= 1.0
            && get(s, "zero_sync_cvr_flush_time_seconds_count") >= 1.0
    });
    assert_eq!(
        over_shards(&after, "zero_sync_websocket_open_connections"),
        1.0
    );
    // Locally replicated and poked within a few seconds: the +Inf bucket is not needed.
    for name in [
        "zcache_replication_lag_seconds",
        "zero_sync_view_syncer_lag_seconds",
    ] {
        let count = get(&after, &format!("{name}_count"));
        assert_eq!(get(&after, &format!("{name}_bucket{{le=\"+Inf\"}}")), count);
        assert_eq!(
            get(&after, &format!("{name}_bucket{{le=\"5\"}}")),
            count,
            "{name}"
        );
        assert!(get(&after, &format!("{name}_sum")) < 5.0 * count, "{name}");
    }

    // The socket closes: the connections gauge follows.
    drop(ws);
    scrape_until(port, "the connection gone", |s| {
        over_shards(s, "zero_sync_websocket_open_connections") == 0.0
    });

    // --log-format json: every stderr line is one JSON object with a level and a message.
    let log = server.log_lines();
    assert!(!log.is_empty());
    for line in &log {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        assert!(v["message"].is_string(), "{line}");
    }
    assert!(log
        .iter()
        .any(|l| l.contains("\"message\":\"zcache ready\"")));
}
