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
