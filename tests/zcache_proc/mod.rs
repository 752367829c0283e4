//! The zcache binary as the socket tests run it: started on a port, its stderr echoed and kept,
//! ready once it says so, killed when dropped; and the WebSocket reads they all need.
#![allow(dead_code)] // each test binary uses a different part of this module

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tungstenite::{Message, WebSocket};

/// How long any single wait may take before the test fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Server {
    pub child: Child,
    pub port: u16,
    /// The replica's directory when the server owns it (None: the caller keeps it).
    pub dir: Option<tempfile::TempDir>,
    /// Every line zcache wrote to stderr so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn logged(&self, needle: &str) -> bool {
        self.log
            .lock()
            .map(|l| l.iter().any(|line| line.contains(needle)))
            .unwrap_or(false)
    }

    /// Whether `needle` is logged within `wait`: stderr is read by another thread, so a line
    /// written before a socket message may be seen after it.
    pub fn logged_within(&self, needle: &str, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if self.logged(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// zcache on `upstream` with app id `app_id`, its replica in a new temp dir, on a free port.
pub fn start(upstream: &str, app_id: &str, args: &[&str]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = start_at(upstream, app_id, dir.path(), free_port(), args, &[]);
    server.dir = Some(dir);
    server
}

/// The same with the replica in `dir` (kept by the caller, e.g. across restarts), on `port`,
/// with environment variables (a None value removes the variable).
pub fn start_at(
    upstream: &str,
    app_id: &str,
    dir: &Path,
    port: u16,
    args: &[&str],
    env: &[(&str, Option<&str>)],
) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zcache"));
    for (name, value) in env {
        match value {
            Some(v) => command.env(name, v),
            None => command.env_remove(name),
        };
    }
    let mut child = command
        .args(["--upstream-db", upstream, "--port", &port.to_string()])
        .args(["--app-id", app_id])
        .arg("--replica-file")
        .arg(dir.join("replica.db"))
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zcache");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[zcache] {line}");
            if line.contains("zcache ready") {
                let _ = tx.send(());
            }
            if let Ok(mut l) = lines.lock() {
                l.push(line);
            }
        }
    });
    rx.recv_timeout(WAIT).expect("zcache became ready");
    Server {
        child,
        port,
        dir: None,
        log,
    }
}

pub type Ws = WebSocket<TcpStream>;

/// The Sec-WebSocket-Protocol value carrying `init` as the embedded initConnection.
pub fn sec_protocol(init: Value) -> String {
    use base64::Engine;
    let body = serde_json::json!({"initConnectionMessage": ["initConnection", init]});
    let b64 = base64::engine::general_purpose::STANDARD.encode(body.to_string());
    percent_encoding::utf8_percent_encode(&b64, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Connects client `client` of group `group` with `init` embedded; reads `connected`.
pub fn connect(port: u16, group: &str, client: &str, init: Value) -> Ws {
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
        tungstenite::http::HeaderValue::from_str(&sec_protocol(init)).expect("header"),
    );
    let (mut ws, _) = tungstenite::client(req, stream).expect("handshake");
    assert_eq!(next(&mut ws)[0], "connected");
    ws
}

/// The next text message as JSON (control frames skipped); a close fails the test.
pub fn next(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Close(c) => panic!("closed by server: {c:?}"),
            _ => continue,
        }
    }
}

/// Deploys permissions that let anyone read `tables` with legacy (AST) queries, the way
/// `zero-deploy-permissions` writes them: without any, zcache (as zero-cache) denies every
/// legacy query. Run before zcache starts; it creates the row zcache would create.
pub fn allow_reads(
    pg: &zcache::embedded::pgcluster::PgCluster,
    db: &str,
    app_id: &str,
    tables: &[&str],
) {
    let anyone = r#"[["allow",{"type":"and","conditions":[]}]]"#;
    let rules: Vec<String> = tables
        .iter()
        .map(|t| format!(r#""{t}":{{"row":{{"select":{anyone}}}}}"#))
        .collect();
    let sql = format!(
        "{}\nUPDATE \"{app_id}\".permissions SET permissions = '{{\"tables\":{{{}}}}}';",
        zcache::replicator::setup::permissions_sql(app_id),
        rules.join(",")
    );
    pg.psql(db, &sql).expect("deploy permissions");
}
