//! replica.db: the SQLite copy of the published upstream tables, named as upstream, plus the
//! watermark (the LSN it reflects) and the table specs, all in one file.

pub mod index_requests;
pub mod pgbinary;
pub mod pgtypes;
pub mod reader;
pub mod replica;

pub use index_requests::IndexRequests;
pub use reader::ReplicaReader;
pub use replica::{Replica, ReplicaError};

/// Quotes an SQLite identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
