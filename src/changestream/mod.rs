//! The change stream between a replication-manager and its view-syncers (issue 14): zero-cache
//! 1.9.0's change-streamer protocol v6 (`../shared/multi-node.md` §2), so that a zcache
//! view-syncer can follow a zero-cache replication-manager and the other way round.
//!
//! So far: the protocol's messages, as both ends write and read them (`protocol`), and the
//! change DB's tables (`changedb`). The endpoint, the log's writing and reading, backups and
//! the roles come next.

pub mod changedb;
pub mod protocol;
