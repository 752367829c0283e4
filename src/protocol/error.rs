//! Error kinds sent to clients as `['error', {kind, message, origin}]`. The kind decides what
//! the client does next (zero-protocol.md §2.6), so each is chosen deliberately.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    VersionNotSupported,
    InvalidMessage,
    InvalidConnectionRequest,
    InvalidConnectionRequestBaseCookie,
    ClientNotFound,
    InvalidPush,
    SchemaVersionNotSupported,
    Unauthorized,
    Internal,
    Rehome,
    ServerOverloaded,
    TransformFailed,
    PushFailed,
    AuthInvalidated,
    MutationFailed,
    MutationRateLimited,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::VersionNotSupported => "VersionNotSupported",
            ErrorKind::InvalidMessage => "InvalidMessage",
            ErrorKind::InvalidConnectionRequest => "InvalidConnectionRequest",
            ErrorKind::InvalidConnectionRequestBaseCookie => "InvalidConnectionRequestBaseCookie",
            ErrorKind::ClientNotFound => "ClientNotFound",
            ErrorKind::InvalidPush => "InvalidPush",
            ErrorKind::SchemaVersionNotSupported => "SchemaVersionNotSupported",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::Internal => "Internal",
            ErrorKind::Rehome => "Rehome",
            ErrorKind::ServerOverloaded => "ServerOverloaded",
            ErrorKind::TransformFailed => "TransformFailed",
            ErrorKind::PushFailed => "PushFailed",
            ErrorKind::AuthInvalidated => "AuthInvalidated",
            ErrorKind::MutationFailed => "MutationFailed",
            ErrorKind::MutationRateLimited => "MutationRateLimited",
        }
    }
}

/// An error that ends a connection with an `error` frame.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct ProtocolError {
    pub kind: ErrorKind,
    pub message: String,
    /// Extra body fields as JSON object members (`"reason":"internal",...`), already encoded.
    pub extra_json: Option<String>,
}

impl ProtocolError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProtocolError {
            kind,
            message: message.into(),
            extra_json: None,
        }
    }
}

impl ProtocolError {
    /// An error whose body carries `fields` after its kind and message, in their order.
    pub fn with_fields(
        kind: ErrorKind,
        message: impl Into<String>,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        ProtocolError {
            kind,
            message: message.into(),
            extra_json: Some(object_members(&fields)),
        }
    }

    /// An error body as another party sent it (an app server's `PushFailed` or
    /// `TransformFailed`), forwarded with every field it has; `kind` is the kind it claims.
    pub fn from_body(kind: ErrorKind, body: &serde_json::Map<String, serde_json::Value>) -> Self {
        let message = body
            .get("message")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut fields = body.clone();
        fields.shift_remove("kind");
        fields.shift_remove("message");
        if !fields.contains_key("origin") {
            fields.insert("origin".into(), "server".into());
        }
        ProtocolError::with_fields(kind, message, fields)
    }

    /// The value of a body field beyond kind and message (tests and logs).
    pub fn field(&self, name: &str) -> Option<serde_json::Value> {
        let extra = self.extra_json.as_deref()?;
        let obj: serde_json::Value = serde_json::from_str(&format!("{{{extra}}}")).ok()?;
        obj.get(name).cloned()
    }
}

/// `"a":1,"b":2`: an object's members without the braces.
fn object_members(fields: &serde_json::Map<String, serde_json::Value>) -> String {
    let text = serde_json::Value::Object(fields.clone()).to_string();
    debug_assert!(text.starts_with('{') && text.ends_with('}'));
    text[1..text.len() - 1].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_follow_kind_and_message() {
        let fields = json!({"origin": "zeroCache", "reason": "http", "status": 500});
        let e = ProtocolError::with_fields(
            ErrorKind::PushFailed,
            "m",
            fields.as_object().cloned().unwrap_or_default(),
        );
        let frame = crate::protocol::down::error(&e);
        assert_eq!(
            frame,
            r#"["error",{"kind":"PushFailed","message":"m","origin":"zeroCache","reason":"http","status":500}]"#
        );
        assert_eq!(e.field("status"), Some(json!(500)));
    }

    #[test]
    fn forwarded_body_keeps_its_fields() {
        let body = json!({"kind":"TransformFailed","origin":"server","reason":"database","message":"db down","queryIDs":["q1"],"details":{"x":1}});
        let e = ProtocolError::from_body(
            ErrorKind::TransformFailed,
            body.as_object().expect("object"),
        );
        let frame: serde_json::Value =
            serde_json::from_str(&crate::protocol::down::error(&e)).expect("json");
        assert_eq!(frame[1], body);
    }
}
