//! Feeds arbitrary bytes to the WebSocket decoders: the first byte picks the limits, the rest is
//! both a client frame stream (decoded in two feeds, to cover incomplete frames) and a request
//! head.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use zcache::ws::{decode_frame, parse_request, validate_upgrade, Assembler, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let frame_bytes_max = 1usize << (knob & 0x0F);
    let message_bytes_max = 1usize << (knob >> 4);
    decode_stream(rest, frame_bytes_max, message_bytes_max);
    head(rest, 1 + usize::from(knob) * 16);
});

fn decode_stream(bytes: &[u8], frame_bytes_max: usize, message_bytes_max: usize) {
    let split = bytes.len() / 2;
    let mut buf = BytesMut::new();
    let mut assembler = Assembler::new(message_bytes_max);
    for part in [&bytes[..split], &bytes[split..]] {
        buf.extend_from_slice(part);
        loop {
            let before = buf.len();
            match decode_frame(&mut buf, frame_bytes_max) {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= frame_bytes_max);
                    assert!(buf.len() < before);
                    match assembler.push(frame) {
                        Ok(Some(Message::Text(text))) => {
                            assert!(std::str::from_utf8(&text).is_ok());
                            assert!(text.len() <= message_bytes_max);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = e.close_code();
                            return;
                        }
                    }
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(e) => {
                    let _ = e.close_code();
                    return;
                }
            }
        }
    }
}

fn head(bytes: &[u8], head_bytes_max: usize) {
    if let Ok(Some((req, used))) = parse_request(bytes, head_bytes_max) {
        assert!(used <= head_bytes_max && used <= bytes.len());
        let _ = req.is_websocket_upgrade();
        let _ = req.query_param("clientID");
        let _ = req.selected_protocol();
        let _ = validate_upgrade(&req);
    }
}
