//! Change-streamer protocol v6 messages (multi-node.md §2.2-2.5; zero-cache's
//! `change-streamer.ts`, `protocol/current/downstream.ts`, `types/streams.ts`).
//!
//! Downstream, each WebSocket text frame is `{"id":n,"msg":<message>}` with `n` counting from
//! 1; upstream, the subscriber acks each message it has processed, in order, as `{"ack":n}`.
//! A row or schema change (`data`) is carried as the JSON it is: its shapes belong to the
//! change log and the replica, which read them.

use serde_json::{json, Value};

/// The protocol version zero-cache 1.9.0 speaks (`PROTOCOL_VERSION`).
pub const PROTOCOL_VERSION: u32 = 6;
/// The oldest version a 1.9.0 server accepts in `/replication/v{N}/changes`.
pub const PROTOCOL_VERSION_MIN: u32 = 1;
/// A frame a subscriber accepts, at most: far above any single change zero-cache sends
/// (it streams big rows as one message), and a bound on a bad peer.
pub const MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("change-stream message is not JSON: {0}")]
    Json(String),
    #[error("change-stream message of {0} bytes is over the {MESSAGE_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    #[error("malformed change-stream message: {0}")]
    Shape(String),
    #[error("ack {got} out of order: expected {expected}")]
    AckOutOfOrder { expected: u64, got: u64 },
    #[error("bad /changes request: {0}")]
    Request(String),
}

type Result<T> = std::result::Result<T, ProtocolError>;

/// Why a subscription is refused (`ErrorType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Unknown = 0,
    /// The subscriber's replica comes from another initial sync.
    WrongReplicaVersion = 1,
    /// The change log no longer reaches back to the subscriber's watermark.
    WatermarkTooOld = 2,
}

/// JSON values of `json` columns in a transaction: parsed (`"p"`, the default) or left as the
/// strings upstream sent (`"s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonFormat {
    Parsed,
    Strings,
}

/// One downstream message.
#[derive(Debug, Clone, PartialEq)]
pub enum Downstream {
    /// First message of a subscription (after its watermark is validated), and again with
    /// each new lag report.
    Status {
        lag_report: Option<Value>,
    },
    Begin {
        json: Option<JsonFormat>,
        skip_ack: bool,
        commit_watermark: String,
    },
    /// A row or schema change of the open transaction.
    Data(Value),
    Commit {
        /// As sent (zero-cache writes milliseconds as an integer).
        commit_time_ms: Option<serde_json::Number>,
        watermark: String,
    },
    Rollback,
    Error {
        kind: ErrorType,
        message: Option<String>,
    },
}

impl Downstream {
    /// The message as zero-cache writes it (`["begin",{...},{...}]` ...).
    pub fn to_json(&self) -> Value {
        match self {
            Downstream::Status { lag_report } => {
                let mut body = json!({"tag": "status"});
                if let Some(r) = lag_report {
                    body["lagReport"] = r.clone();
                }
                json!(["status", body])
            }
            Downstream::Begin {
                json: format,
                skip_ack,
                commit_watermark,
            } => {
                let mut body = json!({"tag": "begin"});
                match format {
                    Some(JsonFormat::Parsed) => body["json"] = json!("p"),
                    Some(JsonFormat::Strings) => body["json"] = json!("s"),
                    None => {}
                }
                if *skip_ack {
                    body["skipAck"] = json!(true);
                }
                json!(["begin", body, {"commitWatermark": commit_watermark}])
            }
            Downstream::Data(change) => json!(["data", change]),
            Downstream::Commit {
                commit_time_ms,
                watermark,
            } => {
                let mut body = json!({"tag": "commit"});
                if let Some(t) = commit_time_ms {
                    body["commitTimeMs"] = json!(t);
                }
                json!(["commit", body, {"watermark": watermark}])
            }
            Downstream::Rollback => json!(["rollback", {"tag": "rollback"}]),
            Downstream::Error { kind, message } => {
                let mut body = json!({"type": *kind as u8});
                if let Some(m) = message {
                    body["message"] = json!(m);
                }
                json!(["error", body])
            }
        }
    }

    /// Reads a message written by either end's server.
    pub fn from_json(v: &Value) -> Result<Downstream> {
        let parts = v.as_array().ok_or_else(|| shape("a message is an array"))?;
        let tag = parts
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| shape("a message starts with its tag"))?;
        let body = parts.get(1).ok_or_else(|| shape("a message has a body"))?;
        let watermark_of = |field: &str| -> Result<String> {
            parts
                .get(2)
                .and_then(|t| t.get(field))
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| shape(&format!("{tag} carries {field}")))
        };
        match tag {
            "status" => Ok(Downstream::Status {
                lag_report: body.get("lagReport").cloned(),
            }),
            "begin" => Ok(Downstream::Begin {
                json: match body.get("json").and_then(Value::as_str) {
                    None => None,
                    Some("p") => Some(JsonFormat::Parsed),
                    Some("s") => Some(JsonFormat::Strings),
                    Some(other) => return Err(shape(&format!("begin json format {other:?}"))),
                },
                skip_ack: body.get("skipAck").and_then(Value::as_bool) == Some(true),
                commit_watermark: watermark_of("commitWatermark")?,
            }),
            "data" => Ok(Downstream::Data(body.clone())),
            "commit" => Ok(Downstream::Commit {
                commit_time_ms: match body.get("commitTimeMs") {
                    None => None,
                    Some(Value::Number(n)) => Some(n.clone()),
                    Some(other) => return Err(shape(&format!("commitTimeMs {other}"))),
                },
                watermark: watermark_of("watermark")?,
            }),
            "rollback" => Ok(Downstream::Rollback),
            "error" => Ok(Downstream::Error {
                kind: match body.get("type").and_then(Value::as_u64) {
                    Some(1) => ErrorType::WrongReplicaVersion,
                    Some(2) => ErrorType::WatermarkTooOld,
                    _ => ErrorType::Unknown,
                },
                message: body
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }),
            other => Err(shape(&format!("unknown message tag {other:?}"))),
        }
    }
}

fn shape(what: &str) -> ProtocolError {
    ProtocolError::Shape(what.to_string())
}

/// The text of downstream message number `id` (ids count from 1).
pub fn encode_frame(id: u64, msg: &Downstream) -> String {
    debug_assert!(id >= 1, "message ids count from 1");
    json!({"id": id, "msg": msg.to_json()}).to_string()
}

/// A downstream frame's id and message.
pub fn decode_frame(text: &str) -> Result<(u64, Downstream)> {
    if text.len() > MESSAGE_BYTES_MAX {
        return Err(ProtocolError::TooLarge(text.len()));
    }
    let v: Value = serde_json::from_str(text).map_err(|e| ProtocolError::Json(e.to_string()))?;
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .filter(|id| *id >= 1)
        .ok_or_else(|| shape("a frame has an id from 1"))?;
    let msg = v.get("msg").ok_or_else(|| shape("a frame has a msg"))?;
    Ok((id, Downstream::from_json(msg)?))
}

/// `{"ack":n}`.
pub fn encode_ack(id: u64) -> String {
    json!({ "ack": id }).to_string()
}

/// The acks a server expects: each the next message id, in order.
#[derive(Debug, Default)]
pub struct Acks {
    last: u64,
}

impl Acks {
    /// Takes one ack frame; the id it acknowledges.
    pub fn take(&mut self, text: &str) -> Result<u64> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ProtocolError::Json(e.to_string()))?;
        let got = v
            .get("ack")
            .and_then(Value::as_u64)
            .ok_or_else(|| shape("an ack is {\"ack\":n}"))?;
        let expected = self.last + 1;
        if got != expected {
            return Err(ProtocolError::AckOutOfOrder { expected, got });
        }
        self.last = got;
        Ok(got)
    }

    pub fn last(&self) -> u64 {
        self.last
    }
}

/// A `/replication/v{N}/changes` subscription's parameters (§2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub version: u32,
    /// A debug name.
    pub id: String,
    pub task_id: String,
    /// The replication-manager's own backup replicator (`mode=backup`).
    pub backup: bool,
    pub replica_version: String,
    /// The last commit the subscriber applied; streaming resumes after it.
    pub watermark: String,
    /// The task's first subscription (its replica restored or found at start-up).
    pub initial: bool,
}

impl Subscription {
    /// Reads the request path and query, e.g.
    /// `/replication/v6/changes?id=vs1&replicaVersion=..&watermark=..`.
    pub fn parse(path_and_query: &str) -> Result<Subscription> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let version = path
            .strip_suffix("/changes")
            .and_then(|p| p.rsplit_once("/v"))
            .filter(|(base, _)| base.ends_with("replication"))
            .and_then(|(_, v)| v.parse::<u32>().ok())
            .ok_or_else(|| ProtocolError::Request(format!("not a changes path: {path}")))?;
        if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&version) {
            return Err(ProtocolError::Request(format!(
                "unsupported protocol version {version}"
            )));
        }
        let get = |k: &str| crate::ws::handshake::query_param(query, k);
        let required = |k: &str| {
            get(k).ok_or_else(|| ProtocolError::Request(format!("missing query parameter {k}")))
        };
        Ok(Subscription {
            version,
            id: required("id")?,
            task_id: get("taskID").unwrap_or_default(),
            backup: get("mode").as_deref() == Some("backup"),
            replica_version: required("replicaVersion")?,
            watermark: required("watermark")?,
            initial: get("initial").as_deref() == Some("true"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message as zero-cache writes it (multi-node.md §2.4), read and written back
    /// unchanged.
    #[test]
    fn messages_read_and_write_as_zero_cache_writes_them() {
        let cases = [
            r#"["status",{"tag":"status"}]"#,
            r#"["status",{"lagReport":{"nextSendTimeMs":5},"tag":"status"}]"#,
            r#"["begin",{"tag":"begin"},{"commitWatermark":"0a"}]"#,
            r#"["begin",{"json":"s","skipAck":true,"tag":"begin"},{"commitWatermark":"0b"}]"#,
            r#"["data",{"new":{"id":"i1"},"relation":{"name":"issue","rowKey":{"columns":["id"]},"schema":"public"},"tag":"insert"}]"#,
            r#"["commit",{"tag":"commit"},{"watermark":"0a"}]"#,
            r#"["commit",{"commitTimeMs":1733300000000,"tag":"commit"},{"watermark":"0b"}]"#,
            r#"["rollback",{"tag":"rollback"}]"#,
            r#"["error",{"message":"too old","type":2}]"#,
            r#"["error",{"type":1}]"#,
        ];
        for text in cases {
            let v: Value = serde_json::from_str(text).expect("json");
            let msg = Downstream::from_json(&v).expect(text);
            assert_eq!(msg.to_json(), v, "{text}");
        }
    }

    #[test]
    fn frames_carry_ids_and_acks_must_come_in_order() {
        let commit = Downstream::Commit {
            commit_time_ms: None,
            watermark: "0c".into(),
        };
        let text = encode_frame(3, &commit);
        assert_eq!(
            text,
            r#"{"id":3,"msg":["commit",{"tag":"commit"},{"watermark":"0c"}]}"#
        );
        assert_eq!(decode_frame(&text), Ok((3, commit)));
        let mut acks = Acks::default();
        assert_eq!(acks.take(&encode_ack(1)), Ok(1));
        assert_eq!(acks.take(&encode_ack(2)), Ok(2));
        assert_eq!(
            acks.take(&encode_ack(4)),
            Err(ProtocolError::AckOutOfOrder {
                expected: 3,
                got: 4
            })
        );
        assert_eq!(acks.last(), 2);
    }

    #[test]
    fn malformed_frames_are_errors() {
        for bad in [
            "",
            "[]",
            r#"{"id":0,"msg":["rollback",{}]}"#,
            r#"{"id":1}"#,
            r#"{"id":1,"msg":"commit"}"#,
            r#"{"id":1,"msg":["commit",{"tag":"commit"}]}"#,
            r#"{"id":1,"msg":["begin",{"json":"x"},{"commitWatermark":"0a"}]}"#,
            r#"{"id":1,"msg":["bogus",{}]}"#,
        ] {
            assert!(decode_frame(bad).is_err(), "{bad}");
        }
        assert!(Acks::default().take(r#"{"ack":"1"}"#).is_err());
    }

    #[test]
    fn subscriptions_parse_as_zero_cache_sends_them() {
        let s = Subscription::parse(
            "/replication/v6/changes?id=vs-1&taskID=t%201&mode=serving&replicaVersion=0a&watermark=0b&initial=true",
        )
        .expect("parses");
        assert_eq!(
            s,
            Subscription {
                version: 6,
                id: "vs-1".into(),
                task_id: "t 1".into(),
                backup: false,
                replica_version: "0a".into(),
                watermark: "0b".into(),
                initial: true,
            }
        );
        let backup = Subscription::parse(
            "/zero/replication/v5/changes?id=b&mode=backup&replicaVersion=0a&watermark=0a",
        )
        .expect("parses");
        assert!(backup.backup && !backup.initial && backup.task_id.is_empty());
        for bad in [
            "/replication/v7/changes?id=a&replicaVersion=0a&watermark=0a",
            "/replication/v6/snapshot?id=a&replicaVersion=0a&watermark=0a",
            "/replication/v6/changes?replicaVersion=0a&watermark=0a",
            "/replication/v6/changes?id=a&watermark=0a",
            "/sync/v6/changes?id=a&replicaVersion=0a&watermark=0a",
        ] {
            assert!(Subscription::parse(bad).is_err(), "{bad}");
        }
    }
}
