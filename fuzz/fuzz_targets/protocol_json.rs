//! Upstream WebSocket text frames and the `Sec-WebSocket-Protocol` header come straight from
//! clients: neither parser may panic, and parsing is deterministic (simd-json mutates its
//! buffer, so each parse gets a fresh copy).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcache::protocol::up::{decode_sec_protocol, parse, Upstream};

fuzz_target!(|data: &[u8]| {
    let first = parse(&mut data.to_vec());
    let second = parse(&mut data.to_vec());
    assert_eq!(first.is_ok(), second.is_ok());
    if let (Ok(a), Ok(b)) = (&first, &second) {
        assert_eq!(a, b);
        check_push(a);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode_sec_protocol(text);
    }
});

/// A push's body is forwarded to the app server verbatim, so it must be valid JSON.
fn check_push(msg: &Upstream) {
    if let Upstream::Push(_, body) = msg {
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
