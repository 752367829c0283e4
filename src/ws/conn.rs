//! Async reader and writer halves of an upgraded WebSocket connection.
//!
//! Generic over futures-io traits so they run on glommio's `TcpStream` split with
//! `futures_lite::io::split`. The reader does not answer pings itself (it cannot write); the
//! caller answers `Message::Ping` with [`WsWriter::send_pong`] and `Message::Close` with
//! [`WsWriter::close`].

use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frame::{
    close_frame, decode_frame, encode_frame, frame_bytes_needed, FrameError, Opcode,
    CONTROL_PAYLOAD_BYTES_MAX,
};
use super::message::{Assembler, Message};

/// Zero's default `ZERO_WEBSOCKET_MAX_PAYLOAD_BYTES`.
const DEFAULT_PAYLOAD_BYTES_MAX: usize = 10 * 1024 * 1024;
/// Smallest read; glommio buffers the socket itself, so this mostly bounds syscalls per frame.
const READ_CHUNK_BYTES_MIN: usize = 16 * 1024;
/// Largest single read, so a huge declared frame does not zero-fill megabytes per poll.
const READ_CHUNK_BYTES_MAX: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    pub frame_bytes_max: usize,
    pub message_bytes_max: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        WsLimits {
            frame_bytes_max: DEFAULT_PAYLOAD_BYTES_MAX,
            message_bytes_max: DEFAULT_PAYLOAD_BYTES_MAX,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("websocket i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket protocol: {0}")]
    Frame(#[from] FrameError),
    /// The peer closed the TCP stream at a frame boundary, or this side already sent close.
    #[error("websocket closed")]
    Closed,
}

impl WsError {
    /// The close code to send the peer for this error, if the connection can still take one.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Frame(e) => Some(e.close_code()),
            WsError::Io(_) | WsError::Closed => None,
        }
    }
}

pub struct WsReader<R> {
    reader: R,
    buf: BytesMut,
    assembler: Assembler,
    limits: WsLimits,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// `already_read` holds bytes the handshake read past the request head.
    pub fn new(reader: R, already_read: BytesMut, limits: WsLimits) -> Self {
        WsReader {
            reader,
            buf: already_read,
            assembler: Assembler::new(limits.message_bytes_max),
            limits,
        }
    }

    /// The next complete message. Cancel-safe: all state lives in `self`, and a read that is
    /// dropped before completing has consumed nothing.
    ///
    /// After an `Err(WsError::Frame(_))` the stream is out of sync; send
    /// `close(err.close_code())` and drop the connection.
    pub async fn next_message(&mut self) -> Result<Message, WsError> {
        loop {
            while let Some(frame) = decode_frame(&mut self.buf, self.limits.frame_bytes_max)? {
                if let Some(message) = self.assembler.push(frame)? {
                    return Ok(message);
                }
            }
            if self.read_more().await? == 0 {
                return Err(self.eof_error());
            }
        }
    }

    /// Gives back the underlying reader and any bytes read but not yet decoded (e.g. to drain
    /// the socket after an error before closing it).
    pub fn into_inner(self) -> (R, BytesMut) {
        (self.reader, self.buf)
    }

    fn eof_error(&self) -> WsError {
        if self.buf.is_empty() && !self.assembler.in_message() {
            return WsError::Closed;
        }
        WsError::Io(std::io::ErrorKind::UnexpectedEof.into())
    }

    fn read_chunk_bytes(&self) -> usize {
        let missing = frame_bytes_needed(&self.buf, self.limits.frame_bytes_max)
            .map_or(0, |total| total.saturating_sub(self.buf.len()));
        missing.clamp(READ_CHUNK_BYTES_MIN, READ_CHUNK_BYTES_MAX)
    }

    /// Appends what one read returns to `buf`. The zero-filled read space is grown and
    /// trimmed within a single poll, so a dropped future never leaves filler bytes behind.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        let chunk = self.read_chunk_bytes();
        let WsReader { reader, buf, .. } = self;
        futures_lite::future::poll_fn(|cx| {
            let filled = buf.len();
            buf.resize(filled + chunk, 0);
            let polled = Pin::new(&mut *reader).poll_read(cx, &mut buf[filled..]);
            let n = match &polled {
                Poll::Ready(Ok(n)) => (*n).min(chunk),
                _ => 0,
            };
            buf.truncate(filled + n);
            if polled.is_pending() && buf.is_empty() {
                // An idle socket keeps no read space: the runtime reads into its own buffer
                // and copies out on completion, so this one is only needed then.
                *buf = BytesMut::new();
            }
            polled
        })
        .await
    }
}

pub struct WsWriter<W> {
    writer: W,
    scratch: BytesMut,
    closed: bool,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    pub fn new(writer: W) -> Self {
        WsWriter {
            writer,
            scratch: BytesMut::new(),
            closed: false,
        }
    }

    /// Writes a pre-encoded frame (see `text_frame`) and flushes. Not cancel-safe: a dropped
    /// write may leave half a frame on the wire, so the connection must be dropped too.
    pub async fn send_frame(&mut self, frame: &Bytes) -> Result<(), WsError> {
        self.write_frame(frame).await?;
        self.flush().await
    }

    /// Writes a pre-encoded frame without flushing, for batches (a poke's messages).
    pub async fn write_frame(&mut self, frame: &Bytes) -> Result<(), WsError> {
        if self.closed {
            return Err(WsError::Closed);
        }
        self.writer.write_all(frame).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), WsError> {
        self.writer.flush().await?;
        Ok(())
    }

    pub async fn send_text(&mut self, text: &[u8]) -> Result<(), WsError> {
        debug_assert!(std::str::from_utf8(text).is_ok());
        self.send_encoded(Opcode::Text, text).await
    }

    pub async fn send_binary(&mut self, data: &[u8]) -> Result<(), WsError> {
        self.send_encoded(Opcode::Binary, data).await
    }

    /// Answers a ping with its payload (cut to the 125-byte control limit).
    pub async fn send_pong(&mut self, payload: &[u8]) -> Result<(), WsError> {
        let n = payload.len().min(CONTROL_PAYLOAD_BYTES_MAX);
        self.send_encoded(Opcode::Pong, &payload[..n]).await
    }

    pub async fn send_ping(&mut self, payload: &[u8]) -> Result<(), WsError> {
        let n = payload.len().min(CONTROL_PAYLOAD_BYTES_MAX);
        self.send_encoded(Opcode::Ping, &payload[..n]).await
    }

    /// Sends a close frame and flushes; later sends fail with `Closed`. The caller then drops
    /// (or shuts down) the socket.
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        let frame = close_frame(code, reason);
        self.send_frame(&frame).await?;
        self.closed = true;
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Gives back the underlying writer (e.g. to shut the socket down).
    pub fn into_inner(self) -> W {
        self.writer
    }

    async fn send_encoded(&mut self, opcode: Opcode, payload: &[u8]) -> Result<(), WsError> {
        if self.closed {
            return Err(WsError::Closed);
        }
        self.scratch.clear();
        encode_frame(opcode, payload, &mut self.scratch);
        self.writer.write_all(&self.scratch).await?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode_client_frame;
    use futures_lite::future::block_on;
    use futures_lite::io::Cursor;

    fn client_bytes(frames: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for (first, payload) in frames {
            encode_client_frame(*first, payload, [9, 8, 7, 6], &mut out);
        }
        out.to_vec()
    }

    /// Returns at most `step` bytes per read, to exercise partial frames.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = self.step.min(out.len()).min(self.data.len() - self.at);
            let at = self.at;
            out[..n].copy_from_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn reads_messages_across_tiny_reads_and_handshake_leftover() {
        let bytes = client_bytes(&[
            (0x01, b"He"),
            (0x89, b"ping"),
            (0x80, b"llo"),
            (0x82, &[1, 2, 3]),
            (0x88, &1000u16.to_be_bytes()),
        ]);
        let (leftover, rest) = bytes.split_at(5);
        let reader = Trickle {
            data: rest.to_vec(),
            at: 0,
            step: 3,
        };
        let mut ws = WsReader::new(reader, BytesMut::from(leftover), WsLimits::default());
        block_on(async {
            assert_eq!(
                ws.next_message().await.unwrap(),
                Message::Ping(Bytes::from("ping"))
            );
            assert_eq!(
                ws.next_message().await.unwrap(),
                Message::Text(Bytes::from("Hello"))
            );
            assert_eq!(
                ws.next_message().await.unwrap(),
                Message::Binary(Bytes::from_static(&[1, 2, 3]))
            );
            assert_eq!(
                ws.next_message().await.unwrap(),
                Message::Close {
                    code: Some(1000),
                    reason: String::new()
                }
            );
            assert!(matches!(ws.next_message().await, Err(WsError::Closed)));
        });
    }

    /// Alternates Pending and a 2-byte read, like a socket whose data arrives in dribbles.
    struct Stutter {
        data: Vec<u8>,
        at: usize,
        ready: bool,
    }

    impl AsyncRead for Stutter {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = 2.min(out.len()).min(self.data.len() - self.at);
            let at = self.at;
            out[..n].copy_from_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn dropping_next_message_between_polls_loses_nothing() {
        let bytes = client_bytes(&[(0x01, b"Hello, "), (0x80, b"world"), (0x81, b"again")]);
        let reader = Stutter {
            data: bytes,
            at: 0,
            ready: true,
        };
        let mut ws = WsReader::new(reader, BytesMut::new(), WsLimits::default());
        let mut got = Vec::new();
        let mut drops = 0;
        while got.len() < 2 {
            // Each attempt is polled once and dropped unless it completes right away.
            match block_on(futures_lite::future::poll_once(ws.next_message())) {
                Some(message) => got.push(message.unwrap()),
                None => drops += 1,
            }
        }
        assert!(drops > 5);
        assert_eq!(got[0], Message::Text(Bytes::from("Hello, world")));
        assert_eq!(got[1], Message::Text(Bytes::from("again")));
    }

    #[test]
    fn eof_mid_frame_is_unexpected_eof() {
        let bytes = client_bytes(&[(0x81, b"Hello")]);
        let reader = Cursor::new(bytes[..bytes.len() - 1].to_vec());
        let mut ws = WsReader::new(reader, BytesMut::new(), WsLimits::default());
        let err = block_on(ws.next_message()).unwrap_err();
        assert!(matches!(err, WsError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn limits_apply() {
        let limits = WsLimits {
            frame_bytes_max: 4,
            message_bytes_max: 6,
        };
        let bytes = client_bytes(&[(0x81, b"12345")]);
        let mut ws = WsReader::new(Cursor::new(bytes), BytesMut::new(), limits);
        let err = block_on(ws.next_message()).unwrap_err();
        assert_eq!(err.close_code(), Some(1009));
        let bytes = client_bytes(&[(0x01, b"1234"), (0x80, b"567")]);
        let mut ws = WsReader::new(Cursor::new(bytes), BytesMut::new(), limits);
        let err = block_on(ws.next_message()).unwrap_err();
        assert!(matches!(
            err,
            WsError::Frame(FrameError::MessageTooBig { .. })
        ));
    }

    #[test]
    fn writer_encodes_and_refuses_after_close() {
        block_on(async {
            let mut ws = WsWriter::new(Cursor::new(Vec::new()));
            ws.send_text(b"hi").await.unwrap();
            ws.send_frame(&crate::ws::frame::text_frame(b"yo"))
                .await
                .unwrap();
            ws.send_pong(&[0u8; 200]).await.unwrap();
            ws.close(1000, "bye").await.unwrap();
            assert!(matches!(ws.send_text(b"late").await, Err(WsError::Closed)));
            let out = ws.into_inner().into_inner();
            let mut expected = vec![0x81, 2, b'h', b'i', 0x81, 2, b'y', b'o', 0x8A, 125];
            expected.extend_from_slice(&[0u8; 125]);
            expected.extend_from_slice(&[0x88, 5, 0x03, 0xE8, b'b', b'y', b'e']);
            assert_eq!(out, expected);
        });
    }
}
