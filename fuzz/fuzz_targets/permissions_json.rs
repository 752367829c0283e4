//! The `{app}.permissions` JSON comes from upstream, written by whoever deploys permissions:
//! `permissions::parse` never panics, and a parsed deployment transforms a fixed query (with
//! related and EXISTS subqueries) for an anonymous and a signed-in user without panicking,
//! leaving no static parameter unbound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcache::permissions::{authorize_read, parse};
use zcache::zql::ast::Ast;

const QUERY: &str = r#"{"table":"issue","where":{"type":"and","conditions":[
  {"type":"simple","op":"=","left":{"type":"column","name":"open"},"right":{"type":"literal","value":true}},
  {"type":"correlatedSubquery","op":"EXISTS","related":{
    "correlation":{"parentField":["id"],"childField":["issue_id"]},
    "subquery":{"table":"comment","where":{"type":"simple","op":"=",
      "left":{"type":"column","name":"author"},
      "right":{"type":"static","anchor":"authData","field":"sub"}}}}}]},
  "related":[{"correlation":{"parentField":["owner_id"],"childField":["id"]},
    "subquery":{"table":"user","alias":"owner"}}],
  "orderBy":[["id","asc"]],"limit":10}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(perms) = parse(text) else {
        return;
    };
    let Ok(query) = serde_json::from_str::<Ast>(QUERY) else {
        return;
    };
    let auth = serde_json::json!({"sub":"u1","meta":{"level":3,"roles":["a","b"]}});
    for auth_data in [None, Some(&auth)] {
        let out = authorize_read(&query, Some(&perms), auth_data);
        let json = serde_json::to_string(&out).expect("a transformed AST serializes");
        assert!(
            !json.contains(r#""type":"static""#),
            "unbound static parameter: {json}"
        );
    }
});
