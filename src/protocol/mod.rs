//! The Zero sync protocol (v30..v51): upstream messages parsed from JSON, downstream messages
//! written directly as JSON text, error kinds and cookies.

pub mod cookie;
pub mod crud;
pub mod down;
pub mod error;
pub mod up;

/// The newest sync protocol version zcache speaks (`/sync/v51/connect`).
pub const PROTOCOL_VERSION_MAX: u32 = 51;
/// The oldest protocol version a 1.9 server accepts.
pub const PROTOCOL_VERSION_MIN: u32 = 30;

pub use error::{ErrorKind, ProtocolError};
