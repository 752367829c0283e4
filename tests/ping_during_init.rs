//! A socket answers pings while an earlier message is still being handled: here the
//! initConnection waits 1.5 s for a slow app server's /query, and a ping sent meanwhile gets
//! its pong at once, before the hydration's poke (zero-cache answers pings at once too; a
//! client that hears nothing for 5 s reconnects). Real PostgreSQL, the zcache binary, a raw
//! WebSocket client, and a minimal app server on a socket of its own.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::Message;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};

mod zcache_proc;
use zcache_proc::{connect, next, WAIT};

/// How long the app server sits on each /query request.
const APP_SERVER_DELAY_MS: u64 = 1_500;

/// Answers every /query request after APP_SERVER_DELAY_MS, transforming each named query
/// into an AST over `issue`.
fn slow_app_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_queries(stream));
        }
    });
    port
}

fn serve_queries(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
        let request: Value = serde_json::from_slice(&body).expect("JSON body");
        let queries: Vec<Value> = request[1]
            .as_array()
            .expect("queries")
            .iter()
            .map(|q| json!({"id": q["id"], "name": q["name"], "ast": {"table": "issue"}}))
            .collect();
        std::thread::sleep(Duration::from_millis(APP_SERVER_DELAY_MS));
        let answer = json!(["transformed", queries]).to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        );
        if stream.write_all(head.as_bytes()).is_err()
            || stream.write_all(answer.as_bytes()).is_err()
        {
            return;
        }
    }
}

#[test]
fn a_ping_is_answered_while_the_initconnection_waits_for_the_app_server() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("postgres");
    pg.create_database("app").expect("create db");
    pg.psql(
        "app",
        "CREATE TABLE issue (id TEXT PRIMARY KEY, title TEXT);
         INSERT INTO issue SELECT 'i' || i, 'Issue ' || i FROM generate_series(1, 3) i;",
    )
    .expect("seed");
    let app = slow_app_server();
    let query_url = format!("http://127.0.0.1:{app}/query");
    let server = zcache_proc::start(&pg.url("app"), "zping", &["--query-url", &query_url]);

    let init = json!({"desiredQueriesPatch": [
        {"op": "put", "hash": "q1", "name": "allIssues", "args": []}]});
    let mut ws = connect(server.port, "g1", "c1", init);

    // The config poke (the desired query) comes before the transform; then the socket waits.
    let sent = Instant::now();
    ws.send(Message::text(json!(["ping", {}]).to_string()))
        .expect("ping");
    let mut before_pong = Vec::new();
    loop {
        let msg = next(&mut ws);
        if msg[0] == "pong" {
            break;
        }
        assert_ne!(
            msg[0], "error",
            "an error instead of the pong: {msg} (after {before_pong:?})"
        );
        before_pong.push(msg);
    }
    let waited = sent.elapsed();
    assert!(
        waited < Duration::from_millis(APP_SERVER_DELAY_MS / 2),
        "the pong came after {waited:?}, behind the hydration"
    );
    assert!(
        before_pong
            .iter()
            .all(|m| m[0] != "pokePart" || m[1].get("rowsPatch").is_none()),
        "rows before the pong: the app server did not hold up the hydration ({before_pong:?})"
    );
    // The hydration completes after the app server answers: the rows arrive.
    let started = Instant::now();
    let mut rows = 0;
    while rows < 3 {
        let msg = next(&mut ws);
        assert_ne!(msg[0], "error", "{msg}");
        if msg[0] == "pokePart" {
            rows += msg[1]["rowsPatch"].as_array().map_or(0, Vec::len);
        }
    }
    assert!(started.elapsed() < WAIT);
}
