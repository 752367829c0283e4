//! RFC 6455 §5 frame codec: decodes masked client frames, encodes unmasked server frames.
//!
//! Protocol errors of the whole codec layer (frame and message level) live in [`FrameError`], so
//! a connection has one place to map a failure to the close code it must send.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest payload a control frame may carry (RFC 6455 §5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;

/// Close codes this layer sends (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN7_BITS: u8 = 0x7F;
const LEN7_U16: u8 = 126;
const LEN7_U64: u8 = 127;
const MASK_KEY_BYTES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    pub fn from_u8(bits: u8) -> Option<Opcode> {
        match bits {
            0x0 => Some(Opcode::Continuation),
            0x1 => Some(Opcode::Text),
            0x2 => Some(Opcode::Binary),
            0x8 => Some(Opcode::Close),
            0x9 => Some(Opcode::Ping),
            0xA => Some(Opcode::Pong),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: Opcode,
    pub payload: Bytes,
}

/// A protocol violation by the peer, at frame or message level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("client frame is not masked")]
    Unmasked,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    #[error("64-bit payload length has its most significant bit set")]
    LengthOverflow,
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooBig { len: u64, max: usize },
    #[error("message of at least {len} bytes exceeds the limit of {max} bytes")]
    MessageTooBig { len: u64, max: usize },
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is unfinished")]
    ExpectedContinuation,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("close frame payload of 1 byte")]
    CloseTooShort,
    #[error("close code {0} may not be sent by a peer")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
}

impl FrameError {
    /// The close code to send the peer before dropping the connection.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooBig { .. } | FrameError::MessageTooBig { .. } => {
                close_code::MESSAGE_TOO_BIG
            }
            FrameError::InvalidUtf8 | FrameError::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            FrameError::Unmasked
            | FrameError::ReservedBits
            | FrameError::UnknownOpcode(_)
            | FrameError::FragmentedControl
            | FrameError::ControlTooLong(_)
            | FrameError::LengthOverflow
            | FrameError::UnexpectedContinuation
            | FrameError::ExpectedContinuation
            | FrameError::CloseTooShort
            | FrameError::InvalidCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Where a frame's payload starts and how long it is, once the header is complete.
struct FrameHead {
    fin: bool,
    opcode: Opcode,
    mask_key: [u8; MASK_KEY_BYTES],
    head_bytes: usize,
    payload_bytes: usize,
}

/// Parses the frame header at the front of `buf` without consuming anything.
///
/// Everything that can be rejected is rejected as soon as the bytes deciding it are present,
/// so a hostile length never makes the caller buffer the payload first.
fn decode_head(buf: &[u8], frame_bytes_max: usize) -> Result<Option<FrameHead>, FrameError> {
    let (b0, b1) = match buf {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    if b0 & RSV_BITS != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode_bits = b0 & OPCODE_BITS;
    let opcode = Opcode::from_u8(opcode_bits).ok_or(FrameError::UnknownOpcode(opcode_bits))?;
    let fin = b0 & FIN_BIT != 0;
    if b1 & MASK_BIT == 0 {
        return Err(FrameError::Unmasked);
    }
    if opcode.is_control() && !fin {
        return Err(FrameError::FragmentedControl);
    }
    let len7 = b1 & LEN7_BITS;
    let (payload_len, len_bytes) = match len7 {
        LEN7_U16 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        LEN7_U64 => match buf.get(2..10) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                (u64::from_be_bytes(be), 8)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 0),
    };
    if payload_len > i64::MAX as u64 {
        return Err(FrameError::LengthOverflow);
    }
    if opcode.is_control() && payload_len > CONTROL_PAYLOAD_BYTES_MAX as u64 {
        return Err(FrameError::ControlTooLong(payload_len));
    }
    let payload_bytes = match usize::try_from(payload_len) {
        Ok(n) if n <= frame_bytes_max => n,
        _ => {
            return Err(FrameError::TooBig {
                len: payload_len,
                max: frame_bytes_max,
            })
        }
    };
    let key_at = 2 + len_bytes;
    let head_bytes = key_at + MASK_KEY_BYTES;
    let Some(key) = buf.get(key_at..head_bytes) else {
        return Ok(None);
    };
    let mut mask_key = [0u8; MASK_KEY_BYTES];
    mask_key.copy_from_slice(key);
    Ok(Some(FrameHead {
        fin,
        opcode,
        mask_key,
        head_bytes,
        payload_bytes,
    }))
}

/// Total bytes (header + payload) of the frame at the front of `buf`, once its header is
/// complete and valid; lets a reader size its next read.
pub(crate) fn frame_bytes_needed(buf: &[u8], frame_bytes_max: usize) -> Option<usize> {
    match decode_head(buf, frame_bytes_max) {
        Ok(Some(head)) => Some(head.head_bytes + head.payload_bytes),
        _ => None,
    }
}

/// Decodes one client frame from the front of `buf`.
///
/// Returns `Ok(None)` and leaves `buf` untouched when the frame is incomplete; on success exactly
/// that frame's bytes are consumed and the payload is unmasked.
pub fn decode_frame(
    buf: &mut BytesMut,
    frame_bytes_max: usize,
) -> Result<Option<Frame>, FrameError> {
    let Some(head) = decode_head(buf, frame_bytes_max)? else {
        return Ok(None);
    };
    let frame_bytes = head.head_bytes + head.payload_bytes;
    if buf.len() < frame_bytes {
        return Ok(None);
    }
    let before = buf.len();
    let mut payload = buf.split_to(frame_bytes);
    payload.advance(head.head_bytes);
    apply_mask(&mut payload, head.mask_key);
    debug_assert_eq!(buf.len(), before - frame_bytes);
    debug_assert_eq!(payload.len(), head.payload_bytes);
    Ok(Some(Frame {
        fin: head.fin,
        opcode: head.opcode,
        payload: payload.freeze(),
    }))
}

/// XORs `data` with the repeating 4-byte key, eight bytes at a time where possible.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; MASK_KEY_BYTES]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, hence of 4, so the key phase restarts at 0.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % MASK_KEY_BYTES];
    }
}

fn head_bytes_for(payload_bytes: usize) -> usize {
    match payload_bytes {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Appends one unmasked, final server frame to `out`.
pub fn encode_frame(opcode: Opcode, payload: &[u8], out: &mut BytesMut) {
    debug_assert!(
        opcode != Opcode::Continuation,
        "server frames are never fragmented"
    );
    debug_assert!(!opcode.is_control() || payload.len() <= CONTROL_PAYLOAD_BYTES_MAX);
    let before = out.len();
    out.reserve(head_bytes_for(payload.len()) + payload.len());
    out.put_u8(FIN_BIT | opcode.as_u8());
    match payload.len() {
        n @ 0..=125 => out.put_u8(n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(LEN7_U16);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(LEN7_U64);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    debug_assert_eq!(
        out.len() - before,
        head_bytes_for(payload.len()) + payload.len()
    );
}

fn encode_to_bytes(opcode: Opcode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(head_bytes_for(payload.len()) + payload.len());
    encode_frame(opcode, payload, &mut out);
    out.freeze()
}

/// A whole encoded text frame; the same `Bytes` can be written to many sockets.
pub fn text_frame(payload: &[u8]) -> Bytes {
    encode_to_bytes(Opcode::Text, payload)
}

/// A whole encoded binary frame.
pub fn binary_frame(payload: &[u8]) -> Bytes {
    encode_to_bytes(Opcode::Binary, payload)
}

/// A whole encoded close frame; the reason is cut at a character boundary to fit the 125-byte
/// control frame limit.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let reason = truncate_utf8(reason, CONTROL_PAYLOAD_BYTES_MAX - 2);
    let mut payload = [0u8; CONTROL_PAYLOAD_BYTES_MAX];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    encode_to_bytes(Opcode::Close, &payload[..2 + reason.len()])
}

/// A close frame without a status code: what the other side reports as 1005 ("no status
/// received"), as after zero-cache's `ws.close()`.
pub fn close_frame_no_status() -> Bytes {
    encode_to_bytes(Opcode::Close, &[])
}

fn truncate_utf8(s: &str, bytes_max: usize) -> &str {
    if s.len() <= bytes_max {
        return s;
    }
    let mut end = bytes_max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Test-only client encoder: masked frames with any header bits, as a (possibly broken) client
/// would send them.
#[cfg(test)]
pub(crate) fn encode_client_frame(
    first_byte: u8,
    payload: &[u8],
    key: [u8; MASK_KEY_BYTES],
    out: &mut BytesMut,
) {
    out.put_u8(first_byte);
    match payload.len() {
        n @ 0..=125 => out.put_u8(MASK_BIT | n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(MASK_BIT | LEN7_U16);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(MASK_BIT | LEN7_U64);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(&key);
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], key);
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const MAX: usize = 1 << 20;

    fn client(first_byte: u8, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_client_frame(first_byte, payload, KEY, &mut out);
        out
    }

    #[test]
    fn rfc_masked_hello_example() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let mut buf = BytesMut::from(
            &[
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
            ][..],
        );
        let frame = decode_frame(&mut buf, MAX).unwrap().unwrap();
        assert!(frame.fin);
        assert_eq!(frame.opcode, Opcode::Text);
        assert_eq!(&frame.payload[..], b"Hello");
        assert!(buf.is_empty());
    }

    #[test]
    fn rfc_unmasked_server_examples() {
        // RFC 6455 §5.7: unmasked "Hello", and the 256-byte / 64 KiB length encodings.
        assert_eq!(
            &text_frame(b"Hello")[..],
            &[0x81, 0x05, b'H', b'e', b'l', b'l', b'o']
        );
        let f = binary_frame(&[0u8; 256]);
        assert_eq!(&f[..4], &[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(f.len(), 4 + 256);
        let f = binary_frame(&vec![0u8; 65536]);
        assert_eq!(&f[..10], &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(f.len(), 10 + 65536);
    }

    #[test]
    fn incomplete_frames_leave_buf_untouched() {
        let whole = client(0x82, &[7u8; 300]);
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(decode_frame(&mut buf, MAX).unwrap(), None, "cut at {cut}");
            assert_eq!(&buf[..], &whole[..cut]);
        }
    }

    #[test]
    fn consumes_exactly_one_frame() {
        let mut buf = client(0x81, b"one");
        buf.extend_from_slice(&client(0x81, b"two"));
        buf.extend_from_slice(&[0x81]); // start of a third
        assert_eq!(
            &decode_frame(&mut buf, MAX).unwrap().unwrap().payload[..],
            b"one"
        );
        assert_eq!(
            &decode_frame(&mut buf, MAX).unwrap().unwrap().payload[..],
            b"two"
        );
        assert_eq!(decode_frame(&mut buf, MAX).unwrap(), None);
        assert_eq!(&buf[..], &[0x81]);
    }

    #[test]
    fn length_encodings_decode() {
        for len in [0usize, 1, 125, 126, 127, 0xFFFF, 0x10000, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let mut buf = client(0x82, &payload);
            let frame = decode_frame(&mut buf, MAX).unwrap().unwrap();
            assert_eq!(&frame.payload[..], &payload[..], "len {len}");
        }
    }

    #[test]
    fn non_minimal_length_is_accepted() {
        // 5-byte payload with a 16-bit length field.
        let mut buf = BytesMut::from(&[0x81, 0x80 | 126, 0, 5, 0, 0, 0, 0][..]);
        buf.extend_from_slice(b"hello");
        assert_eq!(
            &decode_frame(&mut buf, MAX).unwrap().unwrap().payload[..],
            b"hello"
        );
    }

    #[test]
    fn rejects_unmasked() {
        let mut buf = BytesMut::from(&[0x81, 0x05, b'H', b'e', b'l', b'l', b'o'][..]);
        assert_eq!(decode_frame(&mut buf, MAX), Err(FrameError::Unmasked));
    }

    #[test]
    fn rejects_rsv_bits() {
        for rsv in [0x40, 0x20, 0x10] {
            let mut buf = client(0x81 | rsv, b"x");
            assert_eq!(decode_frame(&mut buf, MAX), Err(FrameError::ReservedBits));
        }
    }

    #[test]
    fn rejects_unknown_opcodes() {
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            let mut buf = client(0x80 | op, b"");
            assert_eq!(
                decode_frame(&mut buf, MAX),
                Err(FrameError::UnknownOpcode(op))
            );
        }
    }

    #[test]
    fn rejects_bad_control_frames() {
        let mut buf = client(0x09, b"ping"); // ping without fin
        assert_eq!(
            decode_frame(&mut buf, MAX),
            Err(FrameError::FragmentedControl)
        );
        let mut buf = client(0x89, &[0u8; 126]);
        assert_eq!(
            decode_frame(&mut buf, MAX),
            Err(FrameError::ControlTooLong(126))
        );
        let mut buf = client(0x89, &[0u8; 125]);
        assert_eq!(
            decode_frame(&mut buf, MAX).unwrap().unwrap().payload.len(),
            125
        );
    }

    #[test]
    fn too_big_is_decided_from_the_header_alone() {
        // Only the header of a 1 MiB + 1 frame is present.
        let mut buf = BytesMut::from(&[0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0x10, 0, 1][..]);
        assert_eq!(
            decode_frame(&mut buf, MAX),
            Err(FrameError::TooBig {
                len: MAX as u64 + 1,
                max: MAX
            })
        );
        let mut exact = client(0x82, &vec![0u8; 1000]);
        assert_eq!(
            decode_frame(&mut exact, 1000)
                .unwrap()
                .unwrap()
                .payload
                .len(),
            1000
        );
        let mut over = client(0x82, &vec![0u8; 1001]);
        assert_eq!(
            FrameError::TooBig {
                len: 1001,
                max: 1000
            }
            .close_code(),
            1009
        );
        assert_eq!(
            decode_frame(&mut over, 1000),
            Err(FrameError::TooBig {
                len: 1001,
                max: 1000
            })
        );
    }

    #[test]
    fn rejects_length_with_msb_set() {
        let mut buf = BytesMut::from(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut buf, MAX), Err(FrameError::LengthOverflow));
    }

    #[test]
    fn mask_roundtrips_at_every_length() {
        for len in 0..40 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut data = original.clone();
            apply_mask(&mut data, KEY);
            for (i, (m, o)) in data.iter().zip(&original).enumerate() {
                assert_eq!(*m, o ^ KEY[i % 4]);
            }
            apply_mask(&mut data, KEY);
            assert_eq!(data, original);
        }
    }

    #[test]
    fn close_frame_layout_and_truncation() {
        assert_eq!(&close_frame(1000, "")[..], &[0x88, 0x02, 0x03, 0xE8]);
        assert_eq!(&close_frame_no_status()[..], &[0x88, 0x00]);
        assert_eq!(
            &close_frame(1009, "big")[..],
            &[0x88, 0x05, 0x03, 0xF1, b'b', b'i', b'g']
        );
        let long = "é".repeat(100); // 200 bytes
        let f = close_frame(1000, &long);
        assert_eq!(f[1] as usize, f.len() - 2);
        assert!(f.len() - 2 <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
        assert_eq!(f.len() - 4, 122); // 61 whole two-byte characters
    }

    #[test]
    fn close_codes_per_error() {
        assert_eq!(FrameError::Unmasked.close_code(), 1002);
        assert_eq!(FrameError::InvalidUtf8.close_code(), 1007);
        assert_eq!(
            FrameError::MessageTooBig { len: 2, max: 1 }.close_code(),
            1009
        );
    }
}
