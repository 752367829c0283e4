//! Upstream (client -> server) messages: `[tag, body]` JSON text frames.

use super::error::{ErrorKind, ProtocolError};
use serde::Deserialize;
use serde_json::Value as Json;

/// One entry of a desired-queries patch.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum QueryPatchOp {
    Put {
        hash: String,
        #[serde(default)]
        ttl: Option<f64>,
        /// Legacy ad-hoc query: the client's AST (server names).
        #[serde(default)]
        ast: Option<Json>,
        /// Named (synced) query: resolved through the app server's query URL.
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        args: Option<Vec<Json>>,
    },
    Del {
        hash: String,
    },
    Clear,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InitConnection {
    #[serde(default)]
    pub desired_queries_patch: Vec<QueryPatchOp>,
    #[serde(default)]
    pub client_schema: Option<Json>,
    #[serde(default)]
    pub deleted: Option<DeleteClients>,
    #[serde(default, rename = "userPushURL")]
    pub user_push_url: Option<String>,
    #[serde(default, rename = "userQueryURL")]
    pub user_query_url: Option<String>,
    #[serde(default)]
    pub active_clients: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeleteClients {
    #[serde(default, rename = "clientIDs")]
    pub client_ids: Option<Vec<String>>,
    #[serde(default, rename = "clientGroupIDs")]
    pub client_group_ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ChangeDesiredQueries {
    #[serde(rename = "desiredQueriesPatch")]
    pub desired_queries_patch: Vec<QueryPatchOp>,
}

/// The fields of a `push` zcache looks at; the body itself is forwarded verbatim.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PushHeader {
    #[serde(rename = "clientGroupID")]
    pub client_group_id: String,
    pub mutations: Vec<MutationHeader>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MutationHeader {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: u64,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AckMutationResponses {
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    InitConnection(InitConnection),
    ChangeDesiredQueries(ChangeDesiredQueries),
    /// The parsed header and the raw JSON text of the body, forwarded to the app server as is.
    Push(PushHeader, String),
    Ping,
    DeleteClients(DeleteClients),
    UpdateAuth(String),
    AckMutationResponses(AckMutationResponses),
    /// An inspector request (`shards::inspect`): the body as sent, which has a string `id`.
    /// Its `op` is checked when handled, so an unknown op gets an `error` answer instead of
    /// failing the socket.
    Inspect(Json),
    /// Messages zero-cache accepts and ignores (`pull`, `closeConnection`).
    Ignored(&'static str),
}

fn invalid(msg: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorKind::InvalidMessage, msg)
}

fn body<T: serde::de::DeserializeOwned>(tag: &str, body: Json) -> Result<T, ProtocolError> {
    serde_json::from_value(body).map_err(|e| invalid(format!("invalid {tag} message: {e}")))
}

/// Parses one text frame. `text` is consumed as simd-json's scratch buffer.
pub fn parse(text: &mut [u8]) -> Result<Upstream, ProtocolError> {
    let (tag, value): (String, Json) =
        simd_json::serde::from_slice(text).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
    parse_tagged(&tag, value)
}

pub fn parse_tagged(tag: &str, value: Json) -> Result<Upstream, ProtocolError> {
    Ok(match tag {
        "initConnection" => Upstream::InitConnection(body(tag, value)?),
        "changeDesiredQueries" => Upstream::ChangeDesiredQueries(body(tag, value)?),
        "push" => {
            let header: PushHeader = body(tag, value.clone())?;
            Upstream::Push(header, value.to_string())
        }
        "ping" => Upstream::Ping,
        "deleteClients" => Upstream::DeleteClients(body(tag, value)?),
        "updateAuth" => {
            #[derive(Deserialize)]
            struct UpdateAuth {
                auth: String,
            }
            let u: UpdateAuth = body(tag, value)?;
            Upstream::UpdateAuth(u.auth)
        }
        "ackMutationResponses" => Upstream::AckMutationResponses(body(tag, value)?),
        "pull" => Upstream::Ignored("pull"),
        "closeConnection" => Upstream::Ignored("closeConnection"),
        "inspect" => {
            // Every answer echoes the id, so a body without one cannot be answered.
            if !value.get("id").is_some_and(Json::is_string) {
                return Err(invalid("invalid inspect message: no string id"));
            }
            Upstream::Inspect(value)
        }
        other => return Err(invalid(format!("unknown message type {other:?}"))),
    })
}

/// What the client puts in `Sec-WebSocket-Protocol`: base64 of the JSON
/// `{initConnectionMessage?, authToken?}`, URI-encoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecProtocol {
    pub init_connection: Option<InitConnection>,
    pub auth_token: Option<String>,
}

pub fn decode_sec_protocol(value: &str) -> Result<SecProtocol, ProtocolError> {
    use base64::Engine;
    let unescaped = percent_encoding::percent_decode_str(value.trim())
        .decode_utf8()
        .map_err(|e| invalid(format!("Sec-WebSocket-Protocol is not UTF-8: {e}")))?;
    let trimmed = unescaped.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|e| invalid(format!("Sec-WebSocket-Protocol is not base64: {e}")))?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        #[serde(default)]
        init_connection_message: Option<(String, Json)>,
        #[serde(default)]
        auth_token: Option<String>,
    }
    let raw: Raw = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(format!(
            "Sec-WebSocket-Protocol is not the expected JSON: {e}"
        ))
    })?;
    let init_connection = match raw.init_connection_message {
        Some((tag, body)) if tag == "initConnection" => Some(
            serde_json::from_value(body)
                .map_err(|e| invalid(format!("invalid embedded initConnection: {e}")))?,
        ),
        Some((tag, _)) => return Err(invalid(format!("unexpected embedded message {tag:?}"))),
        None => None,
    };
    Ok(SecProtocol {
        init_connection,
        auth_token: raw.auth_token.filter(|t| !t.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The header the real client sent in reference/trace-zero-1.9.jsonl.
    const CAPTURED: &str = "eyJpbml0Q29ubmVjdGlvbk1lc3NhZ2UiOlsiaW5pdENvbm5lY3Rpb24iLHsiZGVzaXJlZFF1ZXJpZXNQYXRjaCI6W3sib3AiOiJwdXQiLCJoYXNoIjoiM21zeGJoMzZtODZ1NiIsIm5hbWUiOiJpc3N1ZXNCeVN0YXR1cyIsImFyZ3MiOlt7InN0YXR1cyI6Im9wZW4iLCJsaW1pdCI6MTAwfV0sInR0bCI6MzAwMDAwfV0sImNsaWVudFNjaGVtYSI6eyJ0YWJsZXMiOnsiY29tbWVudCI6eyJjb2x1bW5zIjp7ImJvZHkiOnsidHlwZSI6InN0cmluZyJ9LCJjcmVhdGVkIjp7InR5cGUiOiJudW1iZXIifSwiaWQiOnsidHlwZSI6InN0cmluZyJ9LCJpc3N1ZV9pZCI6eyJ0eXBlIjoic3RyaW5nIn19LCJwcmltYXJ5S2V5IjpbImlkIl19LCJpc3N1ZSI6eyJjb2x1bW5zIjp7ImNyZWF0ZWQiOnsidHlwZSI6Im51bWJlciJ9LCJpZCI6eyJ0eXBlIjoic3RyaW5nIn0sIm93bmVyX2lkIjp7InR5cGUiOiJzdHJpbmcifSwicHJpb3JpdHkiOnsidHlwZSI6Im51bWJlciJ9LCJzdGF0dXMiOnsidHlwZSI6InN0cmluZyJ9LCJ0aXRsZSI6eyJ0eXBlIjoic3RyaW5nIn19LCJwcmltYXJ5S2V5IjpbImlkIl19LCJ1c2VyIjp7ImNvbHVtbnMiOnsiaWQiOnsidHlwZSI6InN0cmluZyJ9LCJuYW1lIjp7InR5cGUiOiJzdHJpbmcifX0sInByaW1hcnlLZXkiOlsiaWQiXX19fSwiYWN0aXZlQ2xpZW50cyI6WyJxaWRxOXB1ODJudGxxMGhoamciXX1dLCJhdXRoVG9rZW4iOiJ1MSJ9";

    #[test]
    fn decodes_captured_sec_protocol() {
        let p = decode_sec_protocol(CAPTURED).expect("captured header decodes");
        assert_eq!(p.auth_token.as_deref(), Some("u1"));
        let init = p.init_connection.expect("embedded initConnection");
        assert_eq!(
            init.desired_queries_patch,
            vec![QueryPatchOp::Put {
                hash: "3msxbh36m86u6".into(),
                ttl: Some(300000.0),
                ast: None,
                name: Some("issuesByStatus".into()),
                args: Some(vec![serde_json::json!({"status":"open","limit":100})]),
            }]
        );
        assert!(init.client_schema.is_some());
    }

    #[test]
    fn empty_protocol_object() {
        // `{}` as the client sends it with no token: e30%3D
        assert_eq!(
            decode_sec_protocol("e30%3D").expect("decodes"),
            SecProtocol::default()
        );
    }

    #[test]
    fn parses_push_and_keeps_body() {
        let mut text = br#"["push",{"clientGroupID":"g","mutations":[{"type":"custom","id":1,"clientID":"c","name":"issue.setTitle","args":[{"id":"i1"}],"timestamp":1}],"pushVersion":1,"timestamp":2,"requestID":"r"}]"#.to_vec();
        match parse(&mut text).expect("valid push") {
            Upstream::Push(h, body) => {
                assert_eq!(h.client_group_id, "g");
                assert_eq!(h.mutations[0].id, 1);
                assert!(body.contains("\"requestID\":\"r\""));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_tag_and_bad_json_are_invalid_message() {
        for bad in [
            &br#"["nope",{}]"#[..],
            b"[1,2",
            b"{}",
            br#"["changeDesiredQueries",{}]"#,
        ] {
            let err = parse(&mut bad.to_vec()).expect_err("must fail");
            assert_eq!(err.kind, ErrorKind::InvalidMessage);
        }
    }

    #[test]
    fn inspect_keeps_its_body_and_needs_a_string_id() {
        let mut text = br#"["inspect",{"op":"nope","id":"x1","extra":[1]}]"#.to_vec();
        assert_eq!(
            parse(&mut text).expect("an unknown op still parses"),
            Upstream::Inspect(serde_json::json!({"op":"nope","id":"x1","extra":[1]}))
        );
        for bad in [
            &br#"["inspect",{"op":"version"}]"#[..],
            br#"["inspect",{"op":"version","id":7}]"#,
            br#"["inspect","version"]"#,
        ] {
            let err = parse(&mut bad.to_vec()).expect_err("must fail");
            assert_eq!(err.kind, ErrorKind::InvalidMessage);
        }
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(mut bytes: Vec<u8>) {
            let _ = parse(&mut bytes);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = decode_sec_protocol(s);
            }
        }
    }
}
