//! Zero sync protocol v51, client side: the connect URL, the Sec-WebSocket-Protocol payload,
//! upstream messages, and a parser for downstream messages that keeps only what the harness
//! measures (never whole rows).

use std::fmt;

use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};

use crate::cli::NamedQuery;

pub const PROTOCOL_VERSION: u32 = 51;

/// zero-client falls back to sending initConnection as the first message when the encoded
/// header would exceed this (its `maxHeaderLength` default).
pub const SEC_PROTOCOL_BYTES_MAX: usize = 8 * 1024;

/// A poke's token and key lists are capped so that one huge poke cannot grow a client's memory.
pub const POKE_TOKENS_MAX: usize = 16 * 1024;
pub const POKE_KEYS_MAX: usize = 1024;

/// Characters `encodeURIComponent` leaves alone: A-Z a-z 0-9 - _ . ! ~ * ' ( )
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

pub fn encode_uri_component(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// `http://h:p/x` -> `ws://h:p/x/sync/v51/connect` (https -> wss; ws/wss kept).
pub fn connect_base(server: &str) -> anyhow::Result<String> {
    let s = server.trim().trim_end_matches('/');
    let rest = if let Some(r) = s.strip_prefix("http://") {
        format!("ws://{r}")
    } else if let Some(r) = s.strip_prefix("https://") {
        format!("wss://{r}")
    } else if s.starts_with("ws://") || s.starts_with("wss://") {
        s.to_string()
    } else {
        anyhow::bail!("--server must start with http://, https://, ws:// or wss://: {server}");
    };
    Ok(format!("{rest}/sync/v{PROTOCOL_VERSION}/connect"))
}

/// The per-connection query parameters of the connect URL.
#[derive(Clone, Debug)]
pub struct ConnectParams<'a> {
    pub client_id: &'a str,
    pub client_group_id: &'a str,
    pub user_id: Option<&'a str>,
    pub base_cookie: Option<&'a str>,
    pub ts_ms: f64,
    pub lmid: u64,
    pub wsid: &'a str,
}

pub fn connect_url(base: &str, p: &ConnectParams<'_>) -> String {
    let mut url = format!(
        "{base}?clientID={}&clientGroupID={}",
        encode_uri_component(p.client_id),
        encode_uri_component(p.client_group_id)
    );
    if let Some(u) = p.user_id {
        url.push_str(&format!("&userID={}", encode_uri_component(u)));
    }
    url.push_str(&format!(
        "&baseCookie={}&ts={:.3}&lmid={}&wsid={}",
        encode_uri_component(p.base_cookie.unwrap_or("")),
        p.ts_ms,
        p.lmid,
        encode_uri_component(p.wsid)
    ));
    url
}

/// `encodeURIComponent(base64(JSON{initConnectionMessage?, authToken?}))`: what zero-client
/// puts in Sec-WebSocket-Protocol and the server echoes back.
pub fn sec_websocket_protocol(init: Option<&Value>, auth: Option<&str>) -> String {
    let mut obj = Map::new();
    if let Some(m) = init {
        obj.insert("initConnectionMessage".into(), m.clone());
    }
    if let Some(a) = auth {
        obj.insert("authToken".into(), Value::String(a.to_string()));
    }
    let text = Value::Object(obj).to_string();
    encode_uri_component(&base64::engine::general_purpose::STANDARD.encode(text.as_bytes()))
}

/// The inverse of [`sec_websocket_protocol`], for tests and diagnostics.
#[cfg(test)]
pub fn decode_sec_websocket_protocol(header: &str) -> Option<Value> {
    let b64 = percent_encoding::percent_decode_str(header)
        .decode_utf8()
        .ok()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn put_op(q: &NamedQuery, ttl_ms: u64) -> Value {
    json!({"op": "put", "hash": q.hash, "name": q.name, "args": q.args, "ttl": ttl_ms})
}

/// `['initConnection', {...}]`; the client schema goes only with a null base cookie.
pub fn init_connection(
    queries: &[NamedQuery],
    ttl_ms: u64,
    client_schema: Option<&Value>,
    client_id: &str,
) -> Value {
    let patch: Vec<Value> = queries.iter().map(|q| put_op(q, ttl_ms)).collect();
    let mut body = Map::new();
    body.insert("desiredQueriesPatch".into(), Value::Array(patch));
    if let Some(s) = client_schema {
        body.insert("clientSchema".into(), s.clone());
    }
    body.insert("activeClients".into(), json!([client_id]));
    json!(["initConnection", Value::Object(body)])
}

pub fn ping_message() -> String {
    r#"["ping",{}]"#.to_string()
}

/// Which rows the harness looks into: the writer's table, its key and the token column.
#[derive(Clone, Debug)]
pub struct RowFilter {
    pub table: String,
    pub key: String,
    pub column: String,
}

/// A query-patch op (`gotQueriesPatch` entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryOp {
    Put(String),
    Del(String),
    Clear,
}

/// What the harness keeps of a pokePart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PokePart {
    pub poke_id: String,
    pub got: Vec<QueryOp>,
    pub rows_put: u64,
    pub rows_del: u64,
    /// Keys of write-table rows that were put (only collected when asked for).
    pub keys: Vec<String>,
    /// Token sequence numbers found in the write column of write-table puts.
    pub tokens: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Downstream {
    Connected,
    PokeStart {
        poke_id: String,
        base_cookie: Option<String>,
    },
    PokePart(PokePart),
    PokeEnd {
        poke_id: String,
        cookie: String,
        cancel: bool,
    },
    Pong,
    Error {
        kind: String,
        message: String,
    },
    TransformError {
        queries: usize,
    },
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    NotJson,
    Shape(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotJson => write!(f, "frame is not JSON"),
            ParseError::Shape(what) => write!(f, "unexpected message shape: {what}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// The token the writer stores: `lt-<seq>`.
pub fn token(seq: u64) -> String {
    format!("lt-{seq}")
}

pub fn parse_token(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("lt-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn str_field(body: &Value, name: &'static str) -> Result<String, ParseError> {
    body.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or(ParseError::Shape(name))
}

pub fn parse_downstream(
    text: &str,
    filter: &RowFilter,
    want_keys: bool,
) -> Result<Downstream, ParseError> {
    let v: Value = serde_json::from_str(text).map_err(|_| ParseError::NotJson)?;
    let arr = v
        .as_array()
        .ok_or(ParseError::Shape("not a [tag, body] array"))?;
    let tag = arr
        .first()
        .and_then(Value::as_str)
        .ok_or(ParseError::Shape("tag"))?;
    let null = Value::Null;
    let body = arr.get(1).unwrap_or(&null);
    Ok(match tag {
        "connected" => Downstream::Connected,
        "pokeStart" => Downstream::PokeStart {
            poke_id: str_field(body, "pokeID")?,
            base_cookie: body
                .get("baseCookie")
                .and_then(Value::as_str)
                .map(str::to_string),
        },
        "pokePart" => Downstream::PokePart(parse_poke_part(body, filter, want_keys)?),
        "pokeEnd" => Downstream::PokeEnd {
            poke_id: str_field(body, "pokeID")?,
            cookie: body
                .get("cookie")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            cancel: body.get("cancel").and_then(Value::as_bool).unwrap_or(false),
        },
        "pong" => Downstream::Pong,
        "error" => Downstream::Error {
            kind: body
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            message: body
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        },
        "transformError" => Downstream::TransformError {
            queries: body.as_array().map_or(0, Vec::len),
        },
        other => Downstream::Other(other.to_string()),
    })
}

fn parse_query_ops(ops: &Value) -> Vec<QueryOp> {
    let Some(ops) = ops.as_array() else {
        return Vec::new();
    };
    ops.iter()
        .filter_map(|op| match op.get("op").and_then(Value::as_str) {
            Some("put") => Some(QueryOp::Put(op.get("hash")?.as_str()?.to_string())),
            Some("del") => Some(QueryOp::Del(op.get("hash")?.as_str()?.to_string())),
            Some("clear") => Some(QueryOp::Clear),
            _ => None,
        })
        .collect()
}

fn key_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn parse_poke_part(
    body: &Value,
    filter: &RowFilter,
    want_keys: bool,
) -> Result<PokePart, ParseError> {
    let mut part = PokePart {
        poke_id: str_field(body, "pokeID")?,
        ..PokePart::default()
    };
    if let Some(got) = body.get("gotQueriesPatch") {
        part.got = parse_query_ops(got);
    }
    let Some(rows) = body.get("rowsPatch").and_then(Value::as_array) else {
        return Ok(part);
    };
    for row in rows {
        let op = row.get("op").and_then(Value::as_str);
        let table = row.get("tableName").and_then(Value::as_str);
        // A put replaces the whole row; an update (never sent by zero-cache) merges columns.
        let fields = match op {
            Some("put") => {
                part.rows_put += 1;
                row.get("value")
            }
            Some("update") => {
                part.rows_put += 1;
                row.get("merge")
            }
            Some("del") => {
                part.rows_del += 1;
                None
            }
            _ => None,
        };
        let (Some(fields), Some(table)) = (fields, table) else {
            continue;
        };
        if table != filter.table {
            continue;
        }
        if let Some(seq) = fields
            .get(&filter.column)
            .and_then(Value::as_str)
            .and_then(parse_token)
        {
            if part.tokens.len() < POKE_TOKENS_MAX {
                part.tokens.push(seq);
            }
        }
        if want_keys && op == Some("put") && part.keys.len() < POKE_KEYS_MAX {
            if let Some(k) = fields.get(&filter.key).and_then(key_string) {
                part.keys.push(k);
            }
        }
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> RowFilter {
        RowFilter {
            table: "issue".into(),
            key: "id".into(),
            column: "title".into(),
        }
    }

    #[test]
    fn connect_base_from_server_urls() {
        assert_eq!(
            connect_base("http://127.0.0.1:4848/").unwrap(),
            "ws://127.0.0.1:4848/sync/v51/connect"
        );
        assert_eq!(
            connect_base("https://h/zero").unwrap(),
            "wss://h/zero/sync/v51/connect"
        );
        assert_eq!(
            connect_base("ws://h:1").unwrap(),
            "ws://h:1/sync/v51/connect"
        );
        assert!(connect_base("127.0.0.1:4848").is_err());
    }

    #[test]
    fn connect_url_has_required_params() {
        let p = ConnectParams {
            client_id: "c 1",
            client_group_id: "g1",
            user_id: Some("u1"),
            base_cookie: None,
            ts_ms: 12.5,
            lmid: 0,
            wsid: "w1",
        };
        let url = connect_url("ws://h/sync/v51/connect", &p);
        assert_eq!(
            url,
            "ws://h/sync/v51/connect?clientID=c%201&clientGroupID=g1&userID=u1&baseCookie=&ts=12.500&lmid=0&wsid=w1"
        );
        let p2 = ConnectParams {
            user_id: None,
            base_cookie: Some("00:01"),
            ..p
        };
        let url2 = connect_url("ws://h", &p2);
        assert!(!url2.contains("userID"));
        assert!(url2.contains("baseCookie=00%3A01"));
    }

    #[test]
    fn sec_protocol_matches_zero_client_encoding() {
        // zero-client sends `e30%3D` (base64 of `{}`, '=' escaped) when it has neither.
        assert_eq!(sec_websocket_protocol(None, None), "e30%3D");
        let q = NamedQuery::new("issuesByStatus", vec![json!({"status":"open","limit":100})]);
        let init = init_connection(
            std::slice::from_ref(&q),
            300_000,
            Some(&json!({"tables":{}})),
            "c1",
        );
        let header = sec_websocket_protocol(Some(&init), Some("u1"));
        // Only characters encodeURIComponent leaves plus %XX escapes; no raw + / =.
        assert!(header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!~*'()%".contains(&b)));
        let decoded = decode_sec_websocket_protocol(&header).unwrap();
        assert_eq!(decoded["authToken"], "u1");
        let msg = &decoded["initConnectionMessage"];
        assert_eq!(msg[0], "initConnection");
        let put = &msg[1]["desiredQueriesPatch"][0];
        assert_eq!(put["op"], "put");
        assert_eq!(put["hash"], q.hash.as_str());
        assert_eq!(put["name"], "issuesByStatus");
        assert_eq!(put["args"], json!([{"status":"open","limit":100}]));
        assert_eq!(put["ttl"], 300_000);
        assert_eq!(msg[1]["clientSchema"], json!({"tables":{}}));
        assert_eq!(msg[1]["activeClients"], json!(["c1"]));
    }

    #[test]
    fn uri_component_escapes_like_javascript() {
        assert_eq!(encode_uri_component("a+b/c=d"), "a%2Bb%2Fc%3Dd");
        assert_eq!(encode_uri_component("-_.!~*'()"), "-_.!~*'()");
        assert_eq!(encode_uri_component("é"), "%C3%A9");
    }

    #[test]
    fn tokens_roundtrip_and_reject_lookalikes() {
        assert_eq!(parse_token(&token(42)), Some(42));
        assert_eq!(parse_token("lt-"), None);
        assert_eq!(parse_token("lt-12x"), None);
        assert_eq!(parse_token("Issue title 5"), None);
        assert_eq!(parse_token("lt--1"), None);
    }

    #[test]
    fn parses_poke_messages() {
        let f = filter();
        let start = parse_downstream(
            r#"["pokeStart",{"pokeID":"p1","baseCookie":null}]"#,
            &f,
            false,
        )
        .unwrap();
        assert_eq!(
            start,
            Downstream::PokeStart {
                poke_id: "p1".into(),
                base_cookie: None
            }
        );
        let part = r#"["pokePart",{"pokeID":"p1",
            "gotQueriesPatch":[{"op":"put","hash":"h1"},{"op":"del","hash":"h0"},{"op":"clear"}],
            "rowsPatch":[
              {"op":"put","tableName":"issue","value":{"id":"i1","title":"lt-77","status":"open"}},
              {"op":"put","tableName":"issue","value":{"id":"i2","title":"Issue title 2"}},
              {"op":"put","tableName":"comment","value":{"id":"c1","title":"lt-99"}},
              {"op":"update","tableName":"issue","id":{"id":"i3"},"merge":{"title":"lt-78"}},
              {"op":"del","tableName":"issue","id":{"id":"i4"}},
              {"op":"clear"}]}]"#;
        let Downstream::PokePart(p) = parse_downstream(part, &f, true).unwrap() else {
            panic!("not a pokePart");
        };
        assert_eq!(
            p.got,
            vec![
                QueryOp::Put("h1".into()),
                QueryOp::Del("h0".into()),
                QueryOp::Clear
            ]
        );
        assert_eq!(p.tokens, vec![77, 78]);
        assert_eq!(p.keys, vec!["i1".to_string(), "i2".to_string()]);
        assert_eq!((p.rows_put, p.rows_del), (4, 1));
        let Downstream::PokePart(no_keys) = parse_downstream(part, &f, false).unwrap() else {
            panic!("not a pokePart");
        };
        assert!(no_keys.keys.is_empty());
        let end = parse_downstream(r#"["pokeEnd",{"pokeID":"p1","cookie":"c9"}]"#, &f, false);
        assert_eq!(
            end.unwrap(),
            Downstream::PokeEnd {
                poke_id: "p1".into(),
                cookie: "c9".into(),
                cancel: false
            }
        );
    }

    #[test]
    fn parses_other_messages() {
        let f = filter();
        assert_eq!(
            parse_downstream(r#"["connected",{"wsid":"w"}]"#, &f, false).unwrap(),
            Downstream::Connected
        );
        assert_eq!(
            parse_downstream(r#"["pong",{}]"#, &f, false).unwrap(),
            Downstream::Pong
        );
        assert_eq!(
            parse_downstream(
                r#"["error",{"kind":"Unauthorized","message":"no","origin":"zeroCache"}]"#,
                &f,
                false
            )
            .unwrap(),
            Downstream::Error {
                kind: "Unauthorized".into(),
                message: "no".into()
            }
        );
        assert_eq!(
            parse_downstream(
                r#"["transformError",[{"error":"app","id":"h","name":"q"}]]"#,
                &f,
                false
            )
            .unwrap(),
            Downstream::TransformError { queries: 1 }
        );
        assert_eq!(
            parse_downstream(r#"["deleteClients",{}]"#, &f, false).unwrap(),
            Downstream::Other("deleteClients".into())
        );
        assert_eq!(
            parse_downstream("nope", &f, false),
            Err(ParseError::NotJson)
        );
        assert!(parse_downstream(r#"{"a":1}"#, &f, false).is_err());
        assert!(parse_downstream(r#"["pokeStart",{}]"#, &f, false).is_err());
    }
}
