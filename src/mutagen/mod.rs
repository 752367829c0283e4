//! Legacy CRUD mutations applied by zcache itself to upstream, and the per-user rate limit.
//!
//! - `apply`: `Mutagen`, one shard's upstream pool, applying one CRUD mutation per
//!   SERIALIZABLE transaction (legacy-features.md §3). Authorization is the shard's: it hands
//!   its `Verdict` in.
//! - `sql`: the statements, rendered with quoted literals (the Postgres client has no
//!   parameters).
//! - `limit`: `UserLimits`, the sliding-window rate limit per user (§4).

pub mod apply;
pub mod limit;
pub mod sql;

pub use apply::{Mutagen, Outcome, Verdict, SERIALIZATION_ATTEMPTS_MAX};
pub use limit::{UserLimits, USERS_TRACKED_MAX};
pub use sql::RenderError;
