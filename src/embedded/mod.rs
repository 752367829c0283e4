//! Things zcache can run by itself when the user points it at nothing: a local PostgreSQL
//! cluster started from the installed binaries (also what the integration tests use).

pub mod demo;
pub mod pgcluster;
