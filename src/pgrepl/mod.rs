//! The Postgres side of zcache: a wire-protocol client of our own (startup, trust / cleartext /
//! md5 / SCRAM-SHA-256 auth, TLS per libpq's `sslmode`, simple queries, COPY out) and logical
//! replication (slot with an exported snapshot, `START_REPLICATION` with pgoutput, status updates, the pgoutput decoder).
//! Message codecs come from `postgres-protocol`; framing, the replication stream and pgoutput
//! are ours.

pub mod conn;
pub mod error;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod session;
pub mod tls;
pub mod url;

pub use conn::{connect, BackendKey, PgConn, QueryResult, MESSAGE_BYTES_MAX_DEFAULT};
pub use error::PgError;
pub use lsn::{Lsn, ParseLsnError};
pub use replication::{pg_now_us, ReplEvent, ReplicationStream, SlotCreated};
pub use session::Session;
pub use tls::PgStream;
pub use url::{ConnConfig, RootCerts, SslMode};
