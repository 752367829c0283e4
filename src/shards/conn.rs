//! One client socket on its group's shard: the v51 handshake, `connected`, then upstream
//! messages handled strictly one at a time (as zero-cache does), and a writer task that
//! drains a bounded queue of pre-encoded frames.

use super::group::Group;
use super::Shard;
use crate::protocol::cookie::Version;
use crate::protocol::up::{self, Upstream};
use crate::protocol::{down, ErrorKind, ProtocolError, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::ws::conn::{WsError, WsLimits, WsReader, WsWriter};
use crate::ws::frame::{close_frame, text_frame};
use crate::ws::handshake::{response_101, response_http, validate_upgrade, UpgradeRequest};
use crate::ws::message::Message;
use bytes::{Bytes, BytesMut};
use futures_lite::io::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use std::cell::Cell;
use std::rc::Rc;

/// Frames queued for one socket before the client counts as too slow and is disconnected
/// (it reconnects and catches up from its cookie).
pub const OUTBOUND_FRAMES_MAX: usize = 4096;

enum Outbound {
    Frame(Bytes),
    Close(Bytes),
}

/// The shard's handle on one socket.
pub struct Conn {
    pub client_id: String,
    pub wsid: String,
    /// The cookie the client holds: the URL's baseCookie, then each poke's end.
    pub cookie: Cell<Option<Version>>,
    /// Whether this socket got a poke yet (zero-cache forces one after connecting).
    pub poked: Cell<bool>,
    /// Dropped when the socket is done, which ends the writer task.
    out: std::cell::RefCell<Option<LocalSender<Outbound>>>,
    closed: Cell<bool>,
}

impl Conn {
    pub fn send_frames(&self, frames: &[Bytes]) {
        for f in frames {
            self.enqueue(Outbound::Frame(f.clone()));
        }
    }

    pub fn send_text(&self, text: &str) {
        self.enqueue(Outbound::Frame(text_frame(text.as_bytes())));
    }

    fn enqueue(&self, item: Outbound) {
        if self.closed.get() {
            return;
        }
        let full = match &*self.out.borrow() {
            Some(out) => out.try_send(item).is_err(),
            None => false,
        };
        if full {
            tracing::warn!(client = %self.client_id, "outbound queue full: closing the socket");
            self.closed.set(true);
            self.out.borrow_mut().take();
        }
    }

    /// Sends `['error', ...]` and closes (zero-cache closes after every error frame).
    pub fn fail(&self, err: &ProtocolError) {
        tracing::info!(client = %self.client_id, error = %err, "closing connection with error");
        self.send_text(&down::error(err));
        self.close_silently();
    }

    /// Closes without an error frame (a newer socket of the same client took over).
    /// The server is going away (shutdown): WebSocket close 1001, which the client answers
    /// by reconnecting with backoff.
    pub fn close_going_away(&self) {
        self.enqueue(Outbound::Close(close_frame(1001, "server shutting down")));
        self.closed.set(true);
    }

    pub fn close_silently(&self) {
        self.enqueue(Outbound::Close(close_frame(1000, "")));
        self.closed.set(true);
        self.out.borrow_mut().take();
    }
}

/// Connect-URL parameters (zero-cache's connect-params.ts).
struct ConnectParams {
    client_id: String,
    client_group_id: String,
    base_cookie: Option<String>,
    wsid: String,
}

fn connect_params(req: &UpgradeRequest) -> Result<ConnectParams, ProtocolError> {
    let required = |name: &str| {
        req.query_param(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorKind::InvalidConnectionRequest,
                    format!("missing {name} in the connect URL"),
                )
            })
    };
    Ok(ConnectParams {
        client_id: required("clientID")?,
        client_group_id: required("clientGroupID")?,
        base_cookie: req.query_param("baseCookie").filter(|c| !c.is_empty()),
        wsid: req.query_param("wsid").unwrap_or_default(),
    })
}

/// The protocol version in `/sync/v{N}/connect` (any path prefix allowed).
pub fn protocol_version(path: &str) -> Option<u32> {
    let rest = path.strip_suffix("/connect")?;
    let (_, v) = rest.rsplit_once("/sync/v")?;
    v.parse().ok()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serves one upgraded socket until it closes.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, req: UpgradeRequest, extra: BytesMut) {
    let accept = match validate_upgrade(&req) {
        Ok(a) => a,
        Err(e) => {
            let _ = stream.write_all(&e.response()).await;
            return;
        }
    };
    if stream
        .write_all(&response_101(&accept, req.selected_protocol()))
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let (reader, writer) = futures_lite::io::split(stream);
    let (tx, rx) = local_channel::new_bounded(OUTBOUND_FRAMES_MAX);
    glommio::spawn_local(write_loop(WsWriter::new(writer), rx)).detach();

    let early = |err: ProtocolError| {
        let _ = tx.try_send(Outbound::Frame(text_frame(down::error(&err).as_bytes())));
        let _ = tx.try_send(Outbound::Close(close_frame(1000, "")));
    };
    let version = protocol_version(&req.path).unwrap_or(0);
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
        return early(ProtocolError::new(
            ErrorKind::VersionNotSupported,
            format!("server supports sync protocol versions {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION_MAX}, not {version}"),
        ));
    }
    let params = match connect_params(&req) {
        Ok(p) => p,
        Err(e) => return early(e),
    };
    let sec = match req.protocol().map(up::decode_sec_protocol).transpose() {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => return early(e),
    };
    let base = match params
        .base_cookie
        .as_deref()
        .map(|c| Version::parse(c).ok_or(c))
        .transpose()
    {
        Ok(b) => b,
        Err(c) => {
            return early(ProtocolError::new(
                ErrorKind::InvalidConnectionRequestBaseCookie,
                format!("cookie {c:?} was not issued by this server"),
            ))
        }
    };
    let conn = Rc::new(Conn {
        client_id: params.client_id.clone(),
        wsid: params.wsid.clone(),
        cookie: Cell::new(base),
        poked: Cell::new(false),
        out: std::cell::RefCell::new(Some(tx)),
        closed: Cell::new(false),
    });
    conn.send_text(&down::connected(&params.wsid, now_ms()));
    let group = match shard.group(&params.client_group_id) {
        Ok(g) => g,
        Err(e) => return conn.fail(&e),
    };
    if sec.auth_token.is_some() {
        *group.token.borrow_mut() = sec.auth_token.clone();
    }
    if let Err(e) = group.connect(conn.clone()).await {
        return conn.fail(&e);
    }
    let limits = WsLimits {
        frame_bytes_max: shard.cfg.websocket_max_payload_bytes,
        message_bytes_max: shard.cfg.websocket_max_payload_bytes,
    };
    let mut ws = WsReader::new(reader, extra, limits);
    let mut result = match sec.init_connection {
        Some(init) => group.init_connection(&shard, &conn, init).await,
        None => Ok(()),
    };
    while result.is_ok() && !conn.closed.get() {
        result = match ws.next_message().await {
            Ok(Message::Text(text)) => handle_text(&shard, &group, &conn, text).await,
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => Ok(()),
            Ok(Message::Binary(_)) => Err(ProtocolError::new(
                ErrorKind::InvalidMessage,
                "binary messages are not part of the protocol",
            )),
            Ok(Message::Close { .. }) | Err(WsError::Closed) | Err(WsError::Io(_)) => break,
            Err(e @ WsError::Frame(_)) => {
                let code = e.close_code().unwrap_or(1002);
                conn.enqueue(Outbound::Close(close_frame(code, &e.to_string())));
                break;
            }
        };
    }
    if let Err(e) = result {
        conn.fail(&e);
    }
    conn.close_silently();
    group.disconnect(&conn);
}

async fn handle_text(
    shard: &Rc<Shard>,
    group: &Rc<Group>,
    conn: &Rc<Conn>,
    text: Bytes,
) -> Result<(), ProtocolError> {
    let mut buf = text.to_vec();
    match up::parse(&mut buf)? {
        Upstream::Ping => {
            conn.send_text(down::PONG);
            Ok(())
        }
        Upstream::InitConnection(init) => group.init_connection(shard, conn, init).await,
        Upstream::ChangeDesiredQueries(c) => {
            group
                .change_desired_queries(shard, &conn.client_id, &c.desired_queries_patch)
                .await
        }
        Upstream::Push(header, body) => super::push::push(shard, group, conn, header, body),
        Upstream::UpdateAuth(token) => group.update_auth(shard, token).await,
        Upstream::AckMutationResponses(ack) => {
            super::push::cleanup_results(shard, group, &ack.client_id, ack.id);
            Ok(())
        }
        Upstream::DeleteClients(d) => {
            let ids = d.client_ids.unwrap_or_default();
            let deleted = group.delete_clients(shard, &conn.client_id, &ids).await?;
            // Only the message (not initConnection.deleted) clears the app server's
            // mutation results of the deleted clients.
            super::push::cleanup_results_bulk(shard, group, &deleted);
            Ok(())
        }
        Upstream::Ignored(tag) => {
            tracing::debug!(tag, "ignoring message");
            Ok(())
        }
    }
}

/// Writes queued frames until a close frame, an error, or the queue's end; then shuts the
/// socket's write side so the client sees the end and the reader half finishes too.
async fn write_loop<W: futures_lite::io::AsyncWrite + Unpin>(
    mut ws: WsWriter<W>,
    rx: local_channel::LocalReceiver<Outbound>,
) {
    while let Some(item) = rx.recv().await {
        let (frame, last) = match item {
            Outbound::Frame(f) => (f, false),
            Outbound::Close(f) => (f, true),
        };
        if ws.send_frame(&frame).await.is_err() || last {
            break;
        }
    }
    let _ = ws.into_inner().close().await;
}

/// Answers a plain HTTP request (health checks: zero-cache answers `GET /` with "OK").
pub async fn serve_http(mut stream: TcpStream, req: &UpgradeRequest) {
    let resp = if req.method == "GET" && (req.path == "/" || req.path.ends_with("/keepalive")) {
        response_http(200, "OK", "text/plain", b"OK")
    } else {
        response_http(404, "Not Found", "text/plain", b"not found")
    };
    let _ = stream.write_all(&resp).await;
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::protocol_version;

    #[test]
    fn version_from_path() {
        assert_eq!(protocol_version("/sync/v51/connect"), Some(51));
        assert_eq!(protocol_version("/api/zero/sync/v30/connect"), Some(30));
        assert_eq!(protocol_version("/sync/vx/connect"), None);
        assert_eq!(protocol_version("/other"), None);
    }
}
