//! Property tests across the codec: client-encoded fragmented messages decode back exactly, and
//! arbitrary bytes never panic any decoder.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::frame::{decode_frame, encode_client_frame, encode_frame, Opcode};
use super::handshake::parse_request;
use super::message::{Assembler, Message};

const MAX: usize = 1 << 20;

/// Cut points (sorted, deduplicated, inside 0..=len) splitting `len` bytes into fragments.
fn fragments(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points.dedup();
    let mut parts: Vec<Vec<u8>> = points
        .windows(2)
        .map(|w| data[w[0]..w[1]].to_vec())
        .collect();
    if parts.is_empty() {
        parts.push(Vec::new());
    }
    parts
}

/// Decodes everything in `stream`, fed in chunks ending at `feed_cuts`.
fn decode_all(stream: &[u8], feed_cuts: &[usize]) -> Result<Vec<Message>, super::FrameError> {
    let mut points: Vec<usize> = feed_cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut buf = BytesMut::new();
    let mut assembler = Assembler::new(MAX);
    let mut out = Vec::new();
    let mut fed = 0;
    for point in points {
        buf.extend_from_slice(&stream[fed..point]);
        fed = point;
        while let Some(frame) = decode_frame(&mut buf, MAX)? {
            out.extend(assembler.push(frame)?);
        }
    }
    assert!(buf.is_empty(), "every byte belongs to a frame");
    Ok(out)
}

fn message_strategy() -> impl Strategy<Value = (bool, Vec<u8>)> {
    prop_oneof![
        any::<String>().prop_map(|s| (true, s.into_bytes())),
        proptest::collection::vec(any::<u8>(), 0..3000).prop_map(|b| (false, b)),
    ]
}

proptest! {
    #[test]
    fn fragmented_masked_message_roundtrips(
        (is_text, data) in message_strategy(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        keys in proptest::collection::vec(any::<[u8; 4]>(), 1..10),
        ping_after in proptest::collection::vec(any::<bool>(), 0..10),
        feed_cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let parts = fragments(&data, &cuts);
        let mut stream = BytesMut::new();
        let mut expected = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let opcode = match (i, is_text) {
                (0, true) => Opcode::Text,
                (0, false) => Opcode::Binary,
                _ => Opcode::Continuation,
            };
            let last = i + 1 == parts.len();
            let first_byte = if last { 0x80 } else { 0 } | opcode.as_u8();
            encode_client_frame(first_byte, part, keys[i % keys.len()], &mut stream);
            if !last && ping_after.get(i).copied().unwrap_or(false) {
                let ping = format!("p{i}");
                encode_client_frame(0x89, ping.as_bytes(), keys[0], &mut stream);
                expected.push(Message::Ping(Bytes::from(ping)));
            }
        }
        let data = Bytes::from(data);
        expected.push(if is_text { Message::Text(data) } else { Message::Binary(data) });
        prop_assert_eq!(decode_all(&stream, &feed_cuts).unwrap(), expected);
    }

    #[test]
    fn server_frames_carry_payload_verbatim(payload in proptest::collection::vec(any::<u8>(), 0..70_000)) {
        let mut out = BytesMut::new();
        encode_frame(Opcode::Binary, &payload, &mut out);
        let (len, head) = match out[1] {
            126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
            127 => (u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize, 10),
            n => (n as usize, 2),
        };
        prop_assert_eq!(out[0], 0x82);
        prop_assert_eq!(len, payload.len());
        prop_assert_eq!(&out[head..], &payload[..]);
    }

    #[test]
    fn random_bytes_never_panic_frame_decoding(
        data in proptest::collection::vec(any::<u8>(), 0..2000),
        frame_max in 0usize..5000,
        message_max in 0usize..5000,
    ) {
        let mut buf = BytesMut::from(&data[..]);
        let mut assembler = Assembler::new(message_max);
        while let Ok(Some(frame)) = decode_frame(&mut buf, frame_max) {
            prop_assert!(frame.payload.len() <= frame_max);
            if let Ok(Some(Message::Text(text))) = assembler.push(frame) {
                prop_assert!(std::str::from_utf8(&text).is_ok());
                prop_assert!(text.len() <= message_max);
            }
        }
    }

    #[test]
    fn mostly_valid_frame_streams_never_panic(
        frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..200)), 0..12),
    ) {
        let mut stream = BytesMut::new();
        for (first, payload) in &frames {
            encode_client_frame(*first, payload, [1, 2, 3, 4], &mut stream);
        }
        let _ = decode_all(&stream, &[]);
    }

    #[test]
    fn random_bytes_never_panic_parse_request(
        data in proptest::collection::vec(any::<u8>(), 0..600),
        head_max in 0usize..700,
    ) {
        if let Ok(Some((req, used))) = parse_request(&data, head_max) {
            prop_assert!(used <= head_max && used <= data.len());
            prop_assert!(data[..used].ends_with(b"\r\n\r\n"));
            let _ = super::validate_upgrade(&req);
            let _ = req.query_param("a");
        }
    }

    #[test]
    fn header_like_input_never_panics_parse_request(
        lines in proptest::collection::vec("[ -~\t]{0,40}", 0..8),
    ) {
        let head = format!("GET /x?{} HTTP/1.1\r\n{}\r\n\r\n", lines.first().cloned().unwrap_or_default(), lines.join("\r\n"));
        if let Ok(Some((req, _))) = parse_request(head.as_bytes(), 4096) {
            let _ = super::validate_upgrade(&req);
            for line in &lines {
                let _ = req.query_param(line);
            }
        }
    }
}
