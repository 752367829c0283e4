#![no_main]
//! pgoutput messages come off the network: no input may panic the decoder, and decoding is
//! deterministic.

use libfuzzer_sys::fuzz_target;
use zcache::pgrepl::pgoutput::decode;

fuzz_target!(|data: &[u8]| {
    let first = decode(data);
    assert_eq!(first, decode(data));
});
