//! A socket's outbound side: the queue the shard fills (`Outflow` holds it to its limits)
//! and the writer task that empties it, joining queued frames into one send, and that stops
//! a lagging client at once.

use crate::ws::conn::WsWriter;
use crate::ws::frame::close_frame;
use bytes::Bytes;
use futures_lite::io::AsyncWriteExt;
use glommio::channels::local_channel;
use std::cell::Cell;
use std::rc::Rc;

/// Frames queued for one socket before the client counts as too slow and is disconnected
/// (it reconnects and catches up from its cookie).
pub const OUTBOUND_FRAMES_MAX: usize = 4096;
/// Bytes queued for one socket before the client counts as too slow. Frames are shared
/// between the sockets of a group, but each socket counts its whole view of them: a lagging
/// socket is what keeps them alive.
pub const OUTBOUND_BYTES_MAX: usize = 16 * 1024 * 1024;
/// WebSocket close code for a lagging client: "try again later". The Zero client reconnects
/// with backoff after any close without an error frame (except 1009), and resumes from its
/// cookie.
pub const CLOSE_CODE_TRY_AGAIN_LATER: u16 = 1013;
/// Queued frames the writer joins into one send, at most (more wait for the next).
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Time the writer gives the close frame of a lagging client before dropping the socket.
const LAGGING_CLOSE_TIMEOUT_MS: u64 = 1000;

pub(super) enum Outbound {
    Frame(Bytes),
    Close(Bytes),
}

impl Outbound {
    pub(super) fn len(&self) -> usize {
        match self {
            Outbound::Frame(f) | Outbound::Close(f) => f.len(),
        }
    }
}

/// What one socket has queued and not yet written, shared by the shard (which queues) and
/// the socket's writer task (which writes and discounts).
#[derive(Default)]
pub struct Outflow {
    bytes: Cell<usize>,
    frames: Cell<usize>,
    lagging: Cell<bool>,
    /// The writer, parked on `lagging()` while it waits for a frame or the socket.
    waker: std::cell::RefCell<Option<std::task::Waker>>,
}

impl Outflow {
    pub fn queued_bytes(&self) -> usize {
        self.bytes.get()
    }

    pub fn queued_frames(&self) -> usize {
        self.frames.get()
    }

    pub fn is_lagging(&self) -> bool {
        self.lagging.get()
    }

    /// Counts `len` more bytes as queued, unless that passes either limit. A frame larger
    /// than the byte limit still goes out when nothing else is queued.
    pub fn reserve(&self, len: usize) -> bool {
        let (bytes, frames) = (self.bytes.get(), self.frames.get());
        if self.lagging.get()
            || frames >= OUTBOUND_FRAMES_MAX
            || (bytes > 0 && bytes.saturating_add(len) > OUTBOUND_BYTES_MAX)
        {
            return false;
        }
        self.bytes.set(bytes + len);
        self.frames.set(frames + 1);
        true
    }

    /// Frames that were counted together, (frames, bytes), left the queue.
    pub fn release_many(&self, (frames, bytes): (usize, usize)) {
        debug_assert!(self.frames.get() >= frames && self.bytes.get() >= bytes);
        self.bytes.set(self.bytes.get().saturating_sub(bytes));
        self.frames.set(self.frames.get().saturating_sub(frames));
    }

    /// One frame of `len` bytes left the queue (written, discarded, or never sent).
    pub fn release(&self, len: usize) {
        debug_assert!(self.frames.get() > 0 && self.bytes.get() >= len);
        self.bytes.set(self.bytes.get().saturating_sub(len));
        self.frames.set(self.frames.get().saturating_sub(1));
    }

    /// Marks the socket as lagging and wakes its writer, which stops writing at once.
    pub fn set_lagging(&self) {
        self.lagging.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Resolves once the socket is marked lagging.
    pub fn lagging(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.lagging.get() {
                return std::task::Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
    }
}

/// How the writer stopped.
#[derive(Debug, PartialEq, Eq)]
enum WriteEnd {
    /// A close frame was sent, the queue ended, or the socket failed.
    Done,
    /// The client lags; no frame is half written.
    LaggingBetweenFrames,
    /// The client lags with a frame half written: no close frame can follow.
    LaggingMidFrame,
}

/// Writes queued frames until a close frame, an error, or the queue's end; then shuts the
/// socket's write side so the client sees the end and the reader half finishes too. When the
/// socket is marked lagging it stops at once, even inside a write the client never reads:
/// it discards what is queued, sends close 1013 if it can, and shuts the socket down both ways.
pub(super) async fn write_loop<W: futures_lite::io::AsyncWrite + Unpin>(
    mut ws: WsWriter<W>,
    rx: local_channel::LocalReceiver<Outbound>,
    flow: Rc<Outflow>,
    shutdown: impl FnOnce(),
) {
    let end = write_frames(&mut ws, &rx, &flow).await;
    if end != WriteEnd::Done {
        // Frees the queued frames now, not when the socket is gone.
        while let Some(Some(item)) = futures_lite::future::poll_once(rx.recv()).await {
            flow.release(item.len());
        }
    }
    if end == WriteEnd::LaggingBetweenFrames {
        let close = close_frame(
            CLOSE_CODE_TRY_AGAIN_LATER,
            "client is not reading fast enough",
        );
        let timeout =
            glommio::timer::sleep(std::time::Duration::from_millis(LAGGING_CLOSE_TIMEOUT_MS));
        let _ = futures_lite::future::or(async { Some(ws.send_frame(&close).await) }, async {
            timeout.await;
            None
        })
        .await;
    }
    if end != WriteEnd::Done {
        shutdown();
    }
    let _ = ws.into_inner().close().await;
}

/// Takes the frames queued behind `first` (up to WRITE_BATCH_BYTES_MAX, and not past a
/// close frame) into one buffer, so a poke's frames go out in one send: a send per frame was
/// a third of a shard's time at 10,000 sockets. Returns the bytes to write, what each frame
/// counted in `Outflow` (frames, bytes), and whether a close frame ends them.
async fn gather(
    rx: &local_channel::LocalReceiver<Outbound>,
    first: Outbound,
) -> (Bytes, (usize, usize), bool) {
    let mut counted = (1, first.len());
    let (first, mut last) = match first {
        Outbound::Frame(f) => (f, false),
        Outbound::Close(f) => (f, true),
    };
    let mut joined: Option<Vec<u8>> = None;
    while !last && counted.1 < WRITE_BATCH_BYTES_MAX {
        let Some(Some(next)) = futures_lite::future::poll_once(rx.recv()).await else {
            break;
        };
        counted = (counted.0 + 1, counted.1 + next.len());
        let frame = match next {
            Outbound::Frame(f) => f,
            Outbound::Close(f) => {
                last = true;
                f
            }
        };
        joined
            .get_or_insert_with(|| first.to_vec())
            .extend_from_slice(&frame);
    }
    let bytes = joined.map_or(first, Bytes::from);
    debug_assert_eq!(bytes.len(), counted.1);
    (bytes, counted, last)
}

async fn write_frames<W: futures_lite::io::AsyncWrite + Unpin>(
    ws: &mut WsWriter<W>,
    rx: &local_channel::LocalReceiver<Outbound>,
    flow: &Outflow,
) -> WriteEnd {
    use futures_lite::future::or;
    loop {
        let next = or(async { Some(rx.recv().await) }, async {
            flow.lagging().await;
            None
        })
        .await;
        let item = match next {
            None => return WriteEnd::LaggingBetweenFrames,
            Some(None) => return WriteEnd::Done,
            Some(Some(item)) => item,
        };
        let (frame, len, last) = gather(rx, item).await;
        let sent = or(async { Some(ws.send_frame(&frame).await) }, async {
            flow.lagging().await;
            None
        })
        .await;
        flow.release_many(len);
        match sent {
            None => return WriteEnd::LaggingMidFrame,
            Some(Err(_)) => return WriteEnd::Done,
            Some(Ok(())) if last => return WriteEnd::Done,
            Some(Ok(())) => {}
        }
    }
}
