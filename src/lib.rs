//! zcache: a drop-in replacement for Rocicorp Zero's `zero-cache`.
//!
//! The modules read as the data flow: `pgrepl` (Postgres replication) feeds `sqlite` (the
//! replica), which `zql` queries evaluate against; `shards` (view syncers) turn query results into
//! `protocol` pokes tracked by `cvr`, written to clients through `ws`; `reactor` runs it all on
//! pinned thread-per-core executors.

pub mod appserver;
pub mod auth;
pub mod changestream;
pub mod config;
pub mod cvr;
pub mod embedded;
pub mod metrics;
pub mod mutagen;
pub mod permissions;
pub mod pgrepl;
pub mod protocol;
pub mod reactor;
pub mod replicator;
pub mod shards;
pub mod sqlite;
pub mod ws;
pub mod zql;
