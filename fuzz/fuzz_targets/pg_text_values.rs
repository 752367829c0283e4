//! Postgres text-format values (COPY lines during the initial sync, timestamps and array
//! literals during replication) are upstream data: decoding never panics, and what it
//! produces holds its own invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcache::sqlite::pgtypes::{array_to_json, parse_timestamp_ms, split_copy_line, ArrayElems};

fuzz_target!(|data: &[u8]| {
    if let Ok(fields) = split_copy_line(data) {
        // A line without escapes splits on every tab, so there is one field per tab plus one.
        let line = data.strip_suffix(b"\n").unwrap_or(data);
        assert!(fields.len() <= line.len() + 1);
        if !line.contains(&b'\\') {
            assert_eq!(
                fields.len(),
                line.iter().filter(|&&b| b == b'\t').count() + 1
            );
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(ms) = parse_timestamp_ms(text) {
        assert!(!ms.is_nan());
    }
    for elems in [ArrayElems::Numbers, ArrayElems::Booleans, ArrayElems::Strings] {
        if let Some(json) = array_to_json(text, elems) {
            check_json_array(&json);
        }
    }
});

/// The client reads the text with `JSON.parse`. serde_json is stricter in one way only: it
/// rejects numbers beyond f64 (JSON.parse gives Infinity), so those are not failures.
fn check_json_array(json: &str) {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(value) => assert!(value.is_array(), "not an array: {json}"),
        Err(e) if e.to_string().contains("number out of range") => {}
        Err(e) => panic!("array_to_json emitted invalid JSON {json:?}: {e}"),
    }
}
