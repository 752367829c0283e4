//! One simulated Zero client: connects, desires its named queries, follows pokes, measures
//! connect, hydration and commit -> poke, keeps the connection alive with pings, and reconnects
//! with its last cookie after a close.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::cli::NamedQuery;
use crate::poke::{GotQueries, MergedPoke, PokeAssembler};
use crate::protocol::{
    connect_url, init_connection, parse_downstream, ping_message, sec_websocket_protocol,
    ConnectParams, Downstream, RowFilter, SEC_PROTOCOL_BYTES_MAX,
};
use crate::stats::Stats;
use crate::writer::{KeyPool, TokenBook};

/// zero-client pings after this long without a message, and gives up when no answer comes
/// within the same time again.
pub const PING_IDLE: Duration = Duration::from_secs(5);
pub const PONG_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Bounds what one frame can make a client buffer (a poke part is far smaller).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What every client shares.
pub struct ClientCtx {
    pub ws_base: String,
    pub auth: Option<String>,
    pub user_id: Option<String>,
    pub ttl_ms: u64,
    pub client_schema: Option<Value>,
    pub filter: RowFilter,
    /// Collect write-table keys for the writer (only when there is one).
    pub collect_keys: bool,
    pub reconnect: bool,
    pub stats: Arc<Stats>,
    pub keys: Arc<KeyPool>,
    pub book: Arc<TokenBook>,
}

pub struct ClientSpec {
    pub client_id: String,
    pub group_id: String,
    pub queries: Vec<NamedQuery>,
}

#[derive(Default)]
struct ClientState {
    cookie: Option<String>,
    hydrated: bool,
    connections: u32,
    got: GotQueries,
}

enum SessionEnd {
    Stopped,
    Lost,
}

pub async fn run_client(spec: ClientSpec, ctx: Arc<ClientCtx>, mut stop: watch::Receiver<bool>) {
    let mut state = ClientState::default();
    loop {
        if *stop.borrow() {
            return;
        }
        match session(&spec, &ctx, &mut state, &mut stop).await {
            SessionEnd::Stopped => return,
            SessionEnd::Lost if !ctx.reconnect => return,
            SessionEnd::Lost => {
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Builds the upgrade request: the connect URL and the Sec-WebSocket-Protocol payload (the
/// initConnection moves to the first message when the header would be too long). Returns the
/// request and the initConnection still to be sent, if any.
fn build_request(
    spec: &ClientSpec,
    ctx: &ClientCtx,
    state: &ClientState,
    started: Instant,
) -> anyhow::Result<(
    tokio_tungstenite::tungstenite::handshake::client::Request,
    Option<String>,
)> {
    let schema = if state.cookie.is_none() {
        ctx.client_schema.as_ref()
    } else {
        None
    };
    let init = init_connection(&spec.queries, ctx.ttl_ms, schema, &spec.client_id);
    let mut header = sec_websocket_protocol(Some(&init), ctx.auth.as_deref());
    let mut pending = None;
    if header.len() > SEC_PROTOCOL_BYTES_MAX {
        header = sec_websocket_protocol(None, ctx.auth.as_deref());
        pending = Some(init.to_string());
    }
    let wsid = format!("{}w{}", spec.client_id, state.connections);
    let url = connect_url(
        &ctx.ws_base,
        &ConnectParams {
            client_id: &spec.client_id,
            client_group_id: &spec.group_id,
            user_id: ctx.user_id.as_deref(),
            base_cookie: state.cookie.as_deref(),
            ts_ms: started.elapsed().as_secs_f64() * 1000.0,
            lmid: 0,
            wsid: &wsid,
        },
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(&header)?);
    Ok((req, pending))
}

async fn open(
    spec: &ClientSpec,
    ctx: &ClientCtx,
    state: &ClientState,
    stop: &mut watch::Receiver<bool>,
) -> Result<(Ws, Option<String>), Option<String>> {
    let (req, pending) = build_request(spec, ctx, state, ctx.stats.started)
        .map_err(|_| Some("bad_request".to_string()))?;
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(FRAME_BYTES_MAX);
    config.max_frame_size = Some(FRAME_BYTES_MAX);
    let connect = tokio_tungstenite::connect_async_with_config(req, Some(config), true);
    tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match r {
            Err(_) => Err(Some("connect_timeout".to_string())),
            Ok(Err(e)) => Err(Some(connect_error_kind(&e))),
            Ok(Ok((ws, _response))) => Ok((ws, pending)),
        },
        _ = stop.changed() => Err(None),
    }
}

/// Error kinds for a failed upgrade: refused or reset sockets, HTTP statuses, protocol faults
/// (for example a Sec-WebSocket-Protocol the server did not echo).
fn connect_error_kind(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use std::io::ErrorKind;
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connect_refused".into(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "connect_reset".into(),
            ErrorKind::UnexpectedEof => "connect_eof".into(),
            _ => "connect_io".into(),
        },
        Error::Http(resp) => format!("connect_http_{}", resp.status().as_u16()),
        Error::Protocol(_) => "connect_protocol".into(),
        _ => "connect_failed".into(),
    }
}

async fn session(
    spec: &ClientSpec,
    ctx: &ClientCtx,
    state: &mut ClientState,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    state.connections += 1;
    let t0 = Instant::now();
    let (mut ws, mut pending_init) = match open(spec, ctx, state, stop).await {
        Ok(x) => x,
        Err(None) => return SessionEnd::Stopped,
        Err(Some(kind)) => {
            ctx.stats.error(&kind);
            return SessionEnd::Lost;
        }
    };
    let mut conn = Connection {
        t0,
        connected: false,
        poke: PokeAssembler::default(),
    };
    let end = conn
        .run(&mut ws, spec, ctx, state, &mut pending_init, stop)
        .await;
    if conn.connected {
        ctx.stats.open.dec();
    }
    end
}

struct Connection {
    t0: Instant,
    connected: bool,
    poke: PokeAssembler,
}

impl Connection {
    async fn run(
        &mut self,
        ws: &mut Ws,
        spec: &ClientSpec,
        ctx: &ClientCtx,
        state: &mut ClientState,
        pending_init: &mut Option<String>,
        stop: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let mut last_recv = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        loop {
            let deadline = match ping_sent {
                Some(t) => t + PONG_TIMEOUT,
                None => last_recv + PING_IDLE,
            };
            tokio::select! {
                msg = ws.next() => {
                    last_recv = Instant::now();
                    ping_sent = None;
                    let text = match msg {
                        None => { ctx.stats.error("close:eof"); return SessionEnd::Lost; }
                        Some(Err(_)) => { ctx.stats.error("read_error"); return SessionEnd::Lost; }
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.map_or(1005, |f| u16::from(f.code));
                            ctx.stats.error(&format!("close:{code}"));
                            return SessionEnd::Lost;
                        }
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(other)) => { ctx.stats.bytes_in.add(other.len() as u64); continue; }
                    };
                    let outgoing = self.on_text(text.as_str(), spec, ctx, state, pending_init);
                    if let Some(out) = outgoing {
                        if ws.send(Message::text(out)).await.is_err() {
                            ctx.stats.error("write_error");
                            return SessionEnd::Lost;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if ping_sent.is_some() {
                        ctx.stats.error("ping_timeout");
                        return SessionEnd::Lost;
                    }
                    if ws.send(Message::text(ping_message())).await.is_err() {
                        ctx.stats.error("write_error");
                        return SessionEnd::Lost;
                    }
                    ping_sent = Some(Instant::now());
                }
                _ = stop.changed() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    return SessionEnd::Stopped;
                }
            }
        }
    }

    /// Handles one text frame; returns a message to send, if any.
    fn on_text(
        &mut self,
        text: &str,
        spec: &ClientSpec,
        ctx: &ClientCtx,
        state: &mut ClientState,
        pending_init: &mut Option<String>,
    ) -> Option<String> {
        let stats = &ctx.stats;
        stats.frames_in.inc();
        stats.bytes_in.add(text.len() as u64);
        let want_keys = ctx.collect_keys && ctx.keys.wants_more();
        let msg = match parse_downstream(text, &ctx.filter, want_keys) {
            Ok(m) => m,
            Err(_) => {
                stats.error("bad_frame");
                return None;
            }
        };
        match msg {
            Downstream::Connected => {
                if !self.connected {
                    self.connected = true;
                    stats.open.inc();
                    stats.connects.inc();
                    stats.connect.record(self.t0.elapsed());
                }
                return pending_init.take();
            }
            Downstream::PokeStart {
                poke_id,
                base_cookie,
            } => {
                if let Err(e) = self.poke.start(poke_id, base_cookie) {
                    stats.error(&e.to_string());
                    self.poke.reset();
                }
            }
            Downstream::PokePart(part) => {
                if let Err(e) = self.poke.part(part) {
                    stats.error(&e.to_string());
                }
            }
            Downstream::PokeEnd {
                poke_id,
                cookie,
                cancel,
            } => match self.poke.end(&poke_id, cookie, cancel) {
                Ok(Some(poke)) => self.on_poke(poke, spec, ctx, state),
                Ok(None) => {
                    stats.error("poke_cancelled");
                }
                Err(e) => {
                    stats.error(&e.to_string());
                }
            },
            Downstream::Error { kind, message } => {
                if stats.error(&format!("error:{kind}")) {
                    eprintln!("first '{kind}' error frame: {message}");
                }
            }
            Downstream::TransformError { queries } => {
                if stats.error("transformError") {
                    eprintln!("first transformError frame: {queries} queries refused");
                }
            }
            Downstream::Pong | Downstream::Other(_) => {}
        }
        None
    }

    fn on_poke(
        &mut self,
        poke: MergedPoke,
        spec: &ClientSpec,
        ctx: &ClientCtx,
        state: &mut ClientState,
    ) {
        let now = Instant::now();
        let stats = &ctx.stats;
        stats.pokes.inc();
        stats.rows_put.add(poke.rows_put);
        state.cookie = Some(poke.cookie);
        state.got.apply(&poke.got);
        if !poke.keys.is_empty() {
            ctx.keys.add(poke.keys);
        }
        if state.hydrated {
            for seq in poke.tokens {
                let Some(m) = ctx.book.matched(seq) else {
                    continue;
                };
                if stats.in_measured_period(m.committed_at) {
                    stats
                        .commit_to_poke
                        .record(now.saturating_duration_since(m.committed_at));
                    stats.token_matches.inc();
                }
            }
        } else if state
            .got
            .contains_all(spec.queries.iter().map(|q| q.hash.as_str()))
        {
            // Tokens in the hydration poke are rows the client never had before: not a latency.
            state.hydrated = true;
            stats.hydrated.inc();
            stats
                .hydration
                .record(now.saturating_duration_since(self.t0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::decode_sec_websocket_protocol;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn ctx(port: u16) -> ClientCtx {
        ClientCtx {
            ws_base: format!("ws://127.0.0.1:{port}/sync/v51/connect"),
            auth: Some("tok".into()),
            user_id: None,
            ttl_ms: 1000,
            client_schema: Some(serde_json::json!({"tables": {}})),
            filter: RowFilter {
                table: "issue".into(),
                key: "id".into(),
                column: "title".into(),
            },
            collect_keys: false,
            reconnect: false,
            stats: Arc::new(Stats::new()),
            keys: Arc::new(KeyPool::new(1)),
            book: Arc::new(TokenBook::new(1)),
        }
    }

    fn spec() -> ClientSpec {
        ClientSpec {
            client_id: "c1".into(),
            group_id: "g1".into(),
            queries: vec![NamedQuery::default_query()],
        }
    }

    #[tokio::test]
    async fn refused_connection_is_classified() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let (_tx, mut rx) = watch::channel(false);
        let c = ctx(port);
        let r = open(&spec(), &c, &ClientState::default(), &mut rx).await;
        assert_eq!(r.err(), Some(Some("connect_refused".to_string())));
    }

    /// A real socket that records the upgrade request and answers 404: the request carries the
    /// connect URL and the Sec-WebSocket-Protocol payload with the initConnection.
    #[tokio::test]
    async fn upgrade_request_carries_url_and_protocol_header() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(buf).unwrap()
        });
        let (_tx, mut rx) = watch::channel(false);
        let c = ctx(port);
        let r = open(&spec(), &c, &ClientState::default(), &mut rx).await;
        assert_eq!(r.err(), Some(Some("connect_http_404".to_string())));
        let request = server.await.unwrap();
        let first = request.lines().next().unwrap();
        assert!(
            first.starts_with("GET /sync/v51/connect?clientID=c1&clientGroupID=g1&baseCookie=&ts="),
            "{first}"
        );
        let header = request
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("sec-websocket-protocol")
                    .then(|| v.trim().to_string())
            })
            .unwrap();
        let payload = decode_sec_websocket_protocol(&header).unwrap();
        assert_eq!(payload["authToken"], "tok");
        let init = &payload["initConnectionMessage"][1];
        assert_eq!(init["clientSchema"], serde_json::json!({"tables": {}}));
        assert_eq!(init["desiredQueriesPatch"][0]["name"], "issuesByStatus");
    }

    #[test]
    fn schema_only_without_cookie() {
        let c = ctx(1);
        let with_cookie = ClientState {
            cookie: Some("00:01".into()),
            ..ClientState::default()
        };
        let (req, pending) = build_request(&spec(), &c, &with_cookie, Instant::now()).unwrap();
        assert!(pending.is_none());
        assert!(req.uri().to_string().contains("baseCookie=00%3A01"));
        let header = req.headers()["Sec-WebSocket-Protocol"].to_str().unwrap();
        let payload = decode_sec_websocket_protocol(header).unwrap();
        assert!(payload["initConnectionMessage"][1]
            .get("clientSchema")
            .is_none());
    }

    #[test]
    fn oversized_init_moves_to_first_message() {
        let mut c = ctx(1);
        let big: serde_json::Map<String, Value> = (0..400)
            .map(|i| {
                (
                    format!("table_{i}"),
                    serde_json::json!({"columns": {}, "primaryKey": ["id"]}),
                )
            })
            .collect();
        c.client_schema = Some(serde_json::json!({"tables": big}));
        let (req, pending) =
            build_request(&spec(), &c, &ClientState::default(), Instant::now()).unwrap();
        let header = req.headers()["Sec-WebSocket-Protocol"].to_str().unwrap();
        assert!(header.len() <= SEC_PROTOCOL_BYTES_MAX);
        let payload = decode_sec_websocket_protocol(header).unwrap();
        assert!(payload.get("initConnectionMessage").is_none());
        assert_eq!(payload["authToken"], "tok");
        let first: Value = serde_json::from_str(&pending.unwrap()).unwrap();
        assert_eq!(first[0], "initConnection");
    }
}
