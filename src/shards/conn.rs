//! One client socket on its group's shard: the v51 handshake, `connected`, then upstream
//! messages handled strictly one at a time (as zero-cache does), and a writer task that
//! drains a bounded queue of pre-encoded frames.

use super::group::Group;
use super::Shard;
use crate::protocol::cookie::Version;
use crate::protocol::up::{self, Upstream};
use crate::protocol::{down, ErrorKind, ProtocolError, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::ws::conn::{WsError, WsLimits, WsReader, WsWriter};
use crate::ws::frame::{close_frame, close_frame_no_status, text_frame};
use crate::ws::handshake::{response_101, validate_upgrade, UpgradeRequest};
use crate::ws::message::Message;
use bytes::{Bytes, BytesMut};
use futures_lite::io::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use std::cell::Cell;
use std::rc::Rc;

use super::outbound::{write_loop, Outbound};
pub use super::outbound::{
    Outflow, CLOSE_CODE_TRY_AGAIN_LATER, OUTBOUND_BYTES_MAX, OUTBOUND_FRAMES_MAX,
};

/// Client messages read ahead while an earlier one is handled; past it the reader waits.
pub const CLIENT_MESSAGES_QUEUED_MAX: usize = 64;
/// WebSocket close code of a connect refused for its credentials (zero-cache's).
pub const CLOSE_CODE_REFUSED: u16 = 3000;

/// The shard's handle on one socket.
pub struct Conn {
    pub client_id: String,
    pub wsid: String,
    /// The connect URL's userID (None: logged out).
    pub user_id: Option<String>,
    /// The credentials the connection holds (None: anonymous).
    pub auth: std::cell::RefCell<Option<super::auth::Auth>>,
    /// The cookie the client holds: the URL's baseCookie, then each poke's end.
    pub cookie: Cell<Option<Version>>,
    /// Whether this socket got a poke yet (zero-cache forces one after connecting).
    pub poked: Cell<bool>,
    /// Dropped when the socket is done, which ends the writer task.
    out: std::cell::RefCell<Option<LocalSender<Outbound>>>,
    flow: Rc<Outflow>,
    closed: Cell<bool>,
    /// What the inspector needs to know of the socket (initConnection done, protocol).
    pub inspect: super::inspect::ConnInspect,
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
        let len = item.len();
        let queued = match &*self.out.borrow() {
            Some(out) => {
                self.flow.reserve(len)
                    && out
                        .try_send(item)
                        .map_err(|_| self.flow.release(len))
                        .is_ok()
            }
            None => true,
        };
        if !queued {
            self.lagging();
        }
    }

    /// The client does not read fast enough: stop queuing, and let the writer drop what is
    /// queued and close with 1013 so the client reconnects and catches up from its cookie.
    fn lagging(&self) {
        tracing::warn!(
            client = %self.client_id,
            queued_bytes = self.flow.queued_bytes(),
            queued_frames = self.flow.queued_frames(),
            "client is not reading fast enough: closing its socket (1013)"
        );
        self.closed.set(true);
        self.flow.set_lagging();
        self.out.borrow_mut().take();
    }

    /// Bytes queued to this socket and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.flow.queued_bytes()
    }

    /// Whether this socket was closed for lagging.
    pub fn is_lagging(&self) -> bool {
        self.flow.is_lagging()
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

    /// Closes without a status code, as zero-cache's `ws.close()` (the client sees 1005).
    pub fn close_silently(&self) {
        self.close_with(close_frame_no_status());
    }

    fn close_with(&self, frame: Bytes) {
        self.enqueue(Outbound::Close(frame));
        self.closed.set(true);
        self.out.borrow_mut().take();
    }
}

/// Connect-URL parameters (zero-cache's connect-params.ts).
struct ConnectParams {
    client_id: String,
    client_group_id: String,
    /// Empty counts as absent (zero-cache's url-params.ts).
    user_id: Option<String>,
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
        user_id: req.query_param("userID").filter(|u| !u.is_empty()),
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
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (reader, writer) = futures_lite::io::split(stream);
    // Unbounded: `Outflow` holds the queue to its limits, and glommio's bounded channels
    // allocate their whole capacity up front (4,096 frames: 160 KB a socket, touched as
    // the ring turns).
    let (tx, rx) = local_channel::new_unbounded();
    let flow = Rc::new(Outflow::default());
    let shutdown = move || {
        // Safety: the writer calls this while it holds the write half, so the socket (and
        // `fd`) is still open. Shutting both directions also ends the reader's pending recv.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    };
    glommio::spawn_local(write_loop(
        WsWriter::new(writer),
        rx,
        flow.clone(),
        shutdown,
    ))
    .detach();

    // A refused connect: the error frame, then a close. Refused credentials close with
    // 3000 and the message as the reason, as zero-cache does (cut to the 123 bytes a close
    // reason may hold, where zero-cache's own close throws and takes the process down).
    let early_with = |err: ProtocolError, code: u16| {
        let reason = if code == CLOSE_CODE_REFUSED {
            err.message.as_str()
        } else {
            ""
        };
        for item in [
            Outbound::Frame(text_frame(down::error(&err).as_bytes())),
            Outbound::Close(close_frame(code, reason)),
        ] {
            if flow.reserve(item.len()) && tx.try_send(item).is_err() {
                debug_assert!(false, "a new socket's queue is empty");
            }
        }
    };
    let early = |err: ProtocolError| early_with(err, 1000);
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
    // Credentials before `connected`, and before any socket of the same client is touched.
    let auth = match super::auth::resolve(
        shard.legacy.verifier.as_ref(),
        params.user_id.as_deref(),
        sec.auth_token.as_deref(),
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return early_with(e, CLOSE_CODE_REFUSED),
    };
    if let Some(g) = shard.existing_group(&params.client_group_id) {
        if g.pinned_user
            .borrow()
            .as_ref()
            .is_some_and(|pinned| *pinned != params.user_id)
        {
            return early_with(
                ProtocolError::new(
                    ErrorKind::Unauthorized,
                    "Client groups are pinned to a single userID. Connection userID does not match existing client group userID.",
                ),
                CLOSE_CODE_REFUSED,
            );
        }
    }
    let conn = Rc::new(Conn {
        client_id: params.client_id.clone(),
        wsid: params.wsid.clone(),
        user_id: params.user_id.clone(),
        auth: std::cell::RefCell::new(auth.clone()),
        cookie: Cell::new(base),
        poked: Cell::new(false),
        out: std::cell::RefCell::new(Some(tx)),
        flow,
        closed: Cell::new(false),
        inspect: super::inspect::ConnInspect::new(version),
    });
    conn.send_text(&down::connected(&params.wsid, now_ms()));
    let group = match shard.group(&params.client_group_id) {
        Ok(g) => g,
        Err(e) => return conn.fail(&e),
    };
    if let Some(a) = &auth {
        group.take_auth(a);
    }
    let limits = WsLimits {
        frame_bytes_max: shard.cfg.websocket_max_payload_bytes,
        message_bytes_max: shard.cfg.websocket_max_payload_bytes,
    };
    let mut ws = WsReader::new(reader, extra, limits);
    // The socket joins its group and its messages are handled one at a time, in order, by a
    // task of their own, while this loop keeps reading: a ping is answered even while the
    // group's record loads, or a hydration or a slow app server holds up the message before
    // it (zero-cache answers pings at once too).
    // Boxed: the channel's slots are allocated up front, and a message is 216 bytes.
    let (ops, queued) = local_channel::new_bounded::<Box<Upstream>>(CLIENT_MESSAGES_QUEUED_MAX);
    let worker = glommio::spawn_local(handle_in_order(
        shard.clone(),
        group.clone(),
        conn.clone(),
        queued,
    ));
    let mut result = match sec.init_connection {
        Some(init) => ops
            .send(Box::new(Upstream::InitConnection(init)))
            .await
            .map_err(|_| ProtocolError::new(ErrorKind::Internal, "message queue closed")),
        None => Ok(()),
    };
    while result.is_ok() && !conn.closed.get() {
        result = match ws.next_message().await {
            Ok(Message::Text(text)) => match up::parse(&mut text.to_vec()) {
                Ok(Upstream::Ping) => {
                    conn.send_text(down::PONG);
                    Ok(())
                }
                // Full: the reader waits (the client is told nothing until a slot frees).
                Ok(msg) => match ops.send(Box::new(msg)).await {
                    Ok(()) => Ok(()),
                    Err(_) => break, // the worker ended: the socket failed
                },
                Err(e) => Err(e),
            },
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => Ok(()),
            Ok(Message::Binary(_)) => Err(ProtocolError::new(
                ErrorKind::InvalidMessage,
                "binary messages are not part of the protocol",
            )),
            // The client's close is answered with its own code (RFC 6455 5.5.1).
            Ok(Message::Close { code, .. }) => {
                conn.close_with(match code {
                    Some(code) => close_frame(code, ""),
                    None => close_frame_no_status(),
                });
                break;
            }
            Err(WsError::Closed) | Err(WsError::Io(_)) => break,
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
    // The message being handled finishes (as before, when the loop awaited it); the queued
    // ones are dropped with the socket.
    conn.close_silently();
    drop(ops);
    if worker.await {
        group.disconnect(&conn);
    }
}

/// Joins the socket to its group (the cookie check, and the group's record loaded from the
/// CVR database at its first use), then handles its messages in order until the queue ends,
/// one fails (the socket is then failed with its error) or the socket closes. Returns
/// whether the socket joined.
async fn handle_in_order(
    shard: Rc<Shard>,
    group: Rc<Group>,
    conn: Rc<Conn>,
    queued: local_channel::LocalReceiver<Box<Upstream>>,
) -> bool {
    if let Err(e) = group.connect(conn.clone()).await {
        conn.fail(&e);
        return false;
    }
    while let Some(msg) = queued.recv().await {
        if conn.closed.get() {
            break;
        }
        if let Err(e) = handle_message(&shard, &group, &conn, *msg).await {
            conn.fail(&e);
            break;
        }
    }
    true
}

async fn handle_message(
    shard: &Rc<Shard>,
    group: &Rc<Group>,
    conn: &Rc<Conn>,
    msg: Upstream,
) -> Result<(), ProtocolError> {
    match msg {
        Upstream::Ping => {
            conn.send_text(down::PONG);
            Ok(())
        }
        Upstream::InitConnection(init) => {
            group.init_connection(shard, conn, init).await?;
            conn.inspect.set_initialized();
            Ok(())
        }
        Upstream::ChangeDesiredQueries(c) => {
            group
                .change_desired_queries(shard, &conn.client_id, &c.desired_queries_patch)
                .await
        }
        Upstream::Push(header, body) => super::push::push(shard, group, conn, header, body).await,
        Upstream::UpdateAuth(token) => group.update_auth(shard, conn, token).await,
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
        Upstream::Inspect(body) => {
            super::inspect::handle(shard, group, conn, body).await;
            Ok(())
        }
        Upstream::Ignored(tag) => {
            tracing::debug!(tag, "ignoring message");
            Ok(())
        }
    }
}

/// Answers a plain HTTP request: the health checks (`crate::metrics::http`) and `/metrics`.
pub async fn serve_http(mut stream: TcpStream, req: &UpgradeRequest) {
    let resp = crate::metrics::http::answer(req);
    let _ = stream.write_all(&resp).await;
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    #[test]
    fn outflow_counts_bytes_and_frames() {
        let flow = Outflow::default();
        assert!(flow.reserve(OUTBOUND_BYTES_MAX - 10));
        assert!(flow.reserve(10), "exactly at the byte limit is allowed");
        assert!(!flow.reserve(1), "one byte more is not");
        assert_eq!(flow.queued_bytes(), OUTBOUND_BYTES_MAX);
        assert_eq!(flow.queued_frames(), 2);
        flow.release(OUTBOUND_BYTES_MAX - 10);
        assert!(flow.reserve(1000));
        assert_eq!(flow.queued_bytes(), 1010);
        flow.release(10);
        flow.release(1000);
        assert_eq!((flow.queued_bytes(), flow.queued_frames()), (0, 0));
    }

    #[test]
    fn outflow_takes_one_oversized_frame_when_empty() {
        let flow = Outflow::default();
        assert!(flow.reserve(OUTBOUND_BYTES_MAX * 2));
        assert!(!flow.reserve(1));
        flow.release(OUTBOUND_BYTES_MAX * 2);
        assert!(flow.reserve(1));
    }

    #[test]
    fn outflow_limits_frames_and_refuses_once_lagging() {
        let flow = Outflow::default();
        for _ in 0..OUTBOUND_FRAMES_MAX {
            assert!(flow.reserve(1));
        }
        assert!(!flow.reserve(1));
        flow.release(1);
        assert!(flow.reserve(1));
        flow.set_lagging();
        flow.release(1);
        assert!(!flow.reserve(1), "a lagging socket takes nothing more");
    }

    /// A socket the client never reads: every write stays pending.
    struct Stuck;

    impl futures_lite::io::AsyncWrite for Stuck {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn run_local<F: std::future::Future<Output = ()> + 'static>(
        f: impl FnOnce() -> F + Send + 'static,
    ) {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(f)
            .expect("executor")
            .join()
            .expect("join");
    }

    #[test]
    fn lagging_writer_stops_inside_a_stuck_write_and_discards_the_queue() {
        run_local(|| async {
            // Unbounded: `Outflow` holds the queue to its limits, and glommio's bounded channels
            // allocate their whole capacity up front (4,096 frames: 160 KB a socket, touched as
            // the ring turns).
            let (tx, rx) = local_channel::new_unbounded();
            let flow = Rc::new(Outflow::default());
            let shut = Rc::new(Cell::new(false));
            let shut2 = shut.clone();
            let writer = glommio::spawn_local(write_loop(
                WsWriter::new(Stuck),
                rx,
                flow.clone(),
                move || shut2.set(true),
            ));
            let frame = Bytes::from(vec![b'x'; 4096]);
            for _ in 0..8 {
                assert!(flow.reserve(frame.len()));
                assert!(tx.try_send(Outbound::Frame(frame.clone())).is_ok());
            }
            glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            assert_eq!(flow.queued_frames(), 8, "the first write never completes");
            flow.set_lagging();
            drop(tx);
            writer.await;
            assert!(shut.get(), "the socket is shut down");
            assert_eq!((flow.queued_bytes(), flow.queued_frames()), (0, 0));
        });
    }

    #[test]
    fn writer_drains_in_order_until_the_close_frame() {
        run_local(|| async {
            // Unbounded: `Outflow` holds the queue to its limits, and glommio's bounded channels
            // allocate their whole capacity up front (4,096 frames: 160 KB a socket, touched as
            // the ring turns).
            let (tx, rx) = local_channel::new_unbounded();
            let flow = Rc::new(Outflow::default());
            let sink = Rc::new(std::cell::RefCell::new(Vec::new()));
            let shut = Rc::new(Cell::new(false));
            let shut2 = shut.clone();
            let out = SharedSink(sink.clone());
            let writer = glommio::spawn_local(write_loop(
                WsWriter::new(out),
                rx,
                flow.clone(),
                move || shut2.set(true),
            ));
            for item in [
                Outbound::Frame(Bytes::from_static(b"one")),
                Outbound::Frame(Bytes::from_static(b"two")),
                Outbound::Close(Bytes::from_static(b"end")),
                Outbound::Frame(Bytes::from_static(b"never")),
            ] {
                assert!(flow.reserve(item.len()));
                assert!(tx.try_send(item).is_ok());
            }
            writer.await;
            assert_eq!(sink.borrow().as_slice(), b"onetwoend");
            assert!(!shut.get(), "an orderly close only shuts the write side");
        });
    }

    #[test]
    fn lagging_idle_writer_sends_close_1013() {
        run_local(|| async {
            let (tx, rx) = local_channel::new_bounded::<Outbound>(OUTBOUND_FRAMES_MAX);
            let flow = Rc::new(Outflow::default());
            let sink = Rc::new(std::cell::RefCell::new(Vec::new()));
            let shut = Rc::new(Cell::new(false));
            let shut2 = shut.clone();
            let writer = glommio::spawn_local(write_loop(
                WsWriter::new(SharedSink(sink.clone())),
                rx,
                flow.clone(),
                move || shut2.set(true),
            ));
            glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            flow.set_lagging();
            writer.await;
            drop(tx);
            let out = sink.borrow();
            assert_eq!(out[0], 0x88, "a close frame");
            assert_eq!(&out[2..4], &CLOSE_CODE_TRY_AGAIN_LATER.to_be_bytes());
            assert!(shut.get());
        });
    }

    struct SharedSink(Rc<std::cell::RefCell<Vec<u8>>>);

    impl futures_lite::io::AsyncWrite for SharedSink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.borrow_mut().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn version_from_path() {
        assert_eq!(protocol_version("/sync/v51/connect"), Some(51));
        assert_eq!(protocol_version("/api/zero/sync/v30/connect"), Some(30));
        assert_eq!(protocol_version("/sync/vx/connect"), None);
        assert_eq!(protocol_version("/other"), None);
    }
}
