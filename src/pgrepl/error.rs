//! The errors of the Postgres client layer.

use std::fmt;

use super::url::SslMode;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("I/O error talking to Postgres: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not connect to Postgres at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Postgres protocol error: {0}")]
    Protocol(String),
    #[error("{}", ServerDisplay { severity, code, message, detail })]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
    },
    #[error("Postgres authentication failed: {0}")]
    Auth(String),
    #[error("unsupported Postgres authentication method: {0}")]
    UnsupportedAuth(String),
    #[error("invalid Postgres connection URL: {0}")]
    Url(String),
    #[error("the server does not support TLS (sslmode={mode})")]
    TlsRefused { mode: SslMode },
    #[error(
        "the server answered the TLS request with {byte:#04x}, not 'S' or 'N' (sslmode={mode})"
    )]
    TlsBadResponse { mode: SslMode, byte: u8 },
    #[error("the server's TLS certificate was rejected (sslmode={mode}): {reason}")]
    TlsCertificate { mode: SslMode, reason: String },
    #[error("TLS handshake with the server failed (sslmode={mode}): {source}")]
    TlsHandshake {
        mode: SslMode,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed (sslmode={mode}): {reason}")]
    TlsConfig { mode: SslMode, reason: String },
    #[error("Postgres message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("the Postgres connection is closed")]
    Closed,
    #[error(
        "the Postgres connection is unusable: an earlier request on it was abandoned \
         mid-way (cancelled future or fatal error)"
    )]
    Desynchronized,
}

struct ServerDisplay<'a> {
    severity: &'a str,
    code: &'a str,
    message: &'a str,
    detail: &'a Option<String>,
}

impl fmt::Display for ServerDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Postgres {} {}: {}",
            self.severity, self.code, self.message
        )?;
        if let Some(detail) = self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl PgError {
    /// The SQLSTATE of a server error (e.g. "42P01" for an undefined table).
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    pub(crate) fn protocol(what: impl Into<String>) -> Self {
        PgError::Protocol(what.into())
    }
}
