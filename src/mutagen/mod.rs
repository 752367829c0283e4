//! Legacy CRUD mutations applied by zcache itself to upstream, and the per-user rate limit.
