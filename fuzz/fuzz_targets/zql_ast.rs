//! Query ASTs arrive from clients and the app server as JSON: parsing never panics, and a
//! parsed AST survives a serialize/parse roundtrip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcache::zql::parse_ast;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(ast) = parse_ast(&json) else {
        return;
    };
    let again = serde_json::to_value(&ast).expect("a parsed AST serializes");
    assert_eq!(parse_ast(&again).expect("a serialized AST parses"), ast);
});
