//! Change-stream frames come from another machine (a replication-manager, or a view-syncer's
//! acks and subscription request): decoding must never panic, and whatever decodes writes
//! back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcache::changestream::protocol::{decode_frame, encode_frame, Acks, Subscription};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((id, msg)) = decode_frame(text) {
        let again = encode_frame(id, &msg);
        assert_eq!(decode_frame(&again).ok(), Some((id, msg)));
    }
    let _ = Acks::default().take(text);
    let _ = Subscription::parse(text);
});
