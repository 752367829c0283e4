//! Settings: the same names as zero-cache's (`ZERO_*` environment variables and the matching
//! `--kebab-case` flags, same defaults), plus zcache's own tuning flags (`ZCACHE_*`).

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "zcache",
    version,
    about = "A drop-in replacement for Rocicorp Zero's zero-cache: thread-per-core, io_uring.",
    long_about = "A drop-in replacement for Rocicorp Zero's zero-cache server (sync protocol v51, \
                  @rocicorp/zero 1.9). Every zero-cache setting is read from its ZERO_* environment \
                  variable or the matching flag. With no --upstream-db, zcache starts a PostgreSQL \
                  of its own under --data-dir with demo data and serves that."
)]
pub struct Config {
    /// The upstream authoritative Postgres database (URL). Unset: start an embedded PostgreSQL
    /// with demo data under --data-dir.
    #[arg(long, env = "ZERO_UPSTREAM_DB")]
    pub upstream_db: Option<String>,

    /// Postgres database for client view records. Defaults to the upstream database.
    #[arg(long, env = "ZERO_CVR_DB")]
    pub cvr_db: Option<String>,

    /// Connections to the CVR database, divided evenly amongst syncer shards: each shard
    /// writes on one and loads on the others (up to 4); at least two each.
    #[arg(long, env = "ZERO_CVR_MAX_CONNS", default_value_t = 30)]
    pub cvr_max_conns: usize,

    /// Postgres database for the replication log. Defaults to the upstream database.
    #[arg(long, env = "ZERO_CHANGE_DB")]
    pub change_db: Option<String>,

    /// File path of the SQLite replica.
    #[arg(long, env = "ZERO_REPLICA_FILE", default_value = "zero.db")]
    pub replica_file: PathBuf,

    /// Port for sync WebSocket connections (and plain HTTP health checks).
    #[arg(long, env = "ZERO_PORT", default_value_t = 4848)]
    pub port: u16,

    /// Unique identifier of the app: names its upstream schemas, publications and slots.
    #[arg(long, env = "ZERO_APP_ID", default_value = "zero")]
    pub app_id: String,

    /// Shard number of the app (names the `{app-id}_{shard-num}` schema).
    #[arg(long, env = "ZERO_SHARD_NUM", default_value_t = 0)]
    pub shard_num: u32,

    /// Postgres publications that define the tables to replicate. Empty: zcache creates one
    /// for every table in schema `public`. Comma separated.
    #[arg(long, env = "ZERO_APP_PUBLICATIONS", value_delimiter = ',')]
    pub app_publications: Vec<String>,

    /// URL(s) of the app server's synced-queries endpoint. Comma separated; the first is used
    /// unless a client asks for another one on the list.
    #[arg(long, env = "ZERO_QUERY_URL", value_delimiter = ',')]
    pub query_url: Vec<String>,

    /// URL(s) of the app server's custom-mutators endpoint. Comma separated.
    #[arg(long, env = "ZERO_MUTATE_URL", value_delimiter = ',')]
    pub mutate_url: Vec<String>,

    /// API key sent as X-Api-Key to the query endpoint.
    #[arg(long, env = "ZERO_QUERY_API_KEY")]
    pub query_api_key: Option<String>,

    /// API key sent as X-Api-Key to the mutate endpoint.
    #[arg(long, env = "ZERO_MUTATE_API_KEY")]
    pub mutate_api_key: Option<String>,

    /// Number of syncer shards. Unset: one per available core, less the replication core when
    /// there are more than two.
    #[arg(long, env = "ZERO_NUM_SYNC_WORKERS")]
    pub num_sync_workers: Option<usize>,

    /// debug, info, warn or error.
    #[arg(long, env = "ZERO_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format: text for people, json (one JSON object per line) for log services.
    #[arg(long, env = "ZERO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Password for the inspector / admin endpoints.
    #[arg(long, env = "ZERO_ADMIN_PASSWORD")]
    pub admin_password: Option<String>,

    /// A public JWK (JSON) that verifies client JWTs (legacy auth; only one key option).
    #[arg(long, env = "ZERO_AUTH_JWK")]
    pub auth_jwk: Option<String>,

    /// URL of a JWK set that verifies client JWTs (legacy auth; only one key option).
    #[arg(long, env = "ZERO_AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<String>,

    /// HMAC secret (its UTF-8 bytes) that verifies client JWTs (legacy auth; only one key
    /// option).
    #[arg(long, env = "ZERO_AUTH_SECRET")]
    pub auth_secret: Option<String>,

    /// When set, a client JWT must carry this `iss`.
    #[arg(long, env = "ZERO_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// When set, a client JWT's `aud` must be (or contain) this.
    #[arg(long, env = "ZERO_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,

    /// Apply legacy CRUD mutations (`z.mutate.<table>.insert` ...) to upstream.
    #[arg(long, env = "ZERO_ENABLE_CRUD_MUTATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_crud_mutations: bool,

    /// Upstream connections for CRUD mutations, divided evenly amongst syncer shards (at
    /// least one each).
    #[arg(long, env = "ZERO_UPSTREAM_MAX_CONNS", default_value_t = 20)]
    pub upstream_max_conns: usize,

    /// CRUD mutations one user may make per window (unset: no limit). zcache counts per user
    /// (the JWT's sub, else the connection's userID) across all shards.
    #[arg(long, env = "ZERO_PER_USER_MUTATION_LIMIT_MAX")]
    pub per_user_mutation_limit_max: Option<u64>,

    /// The rate limit's sliding window, in milliseconds.
    #[arg(
        long,
        env = "ZERO_PER_USER_MUTATION_LIMIT_WINDOW_MS",
        default_value_t = 60_000
    )]
    pub per_user_mutation_limit_window_ms: u64,

    /// The version the inspector reports (default: the zero-cache version zcache speaks for).
    #[arg(long, env = "ZERO_SERVER_VERSION")]
    pub server_version: Option<String>,

    /// Largest WebSocket message accepted from a client, in bytes.
    #[arg(long, env = "ZERO_WEBSOCKET_MAX_PAYLOAD_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub websocket_max_payload_bytes: usize,

    /// Rebuild the replica from scratch (a new initial sync) when upstream makes a schema
    /// change that cannot be applied to it in place, such as a column type change. Off:
    /// replication stops with an error instead.
    #[arg(long, env = "ZERO_AUTO_RESET", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_reset: bool,

    /// zcache: pin each shard's executor to its own core.
    #[arg(long, env = "ZCACHE_PIN_CORES", default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_cores: bool,

    /// zcache: the core the replication shard runs on.
    #[arg(long, env = "ZCACHE_REPL_CORE", default_value_t = 0)]
    pub repl_core: usize,

    /// zcache: directory of the embedded PostgreSQL used when no --upstream-db is given.
    #[arg(long, env = "ZCACHE_DATA_DIR", default_value = "zcache-data")]
    pub data_dir: PathBuf,

    /// zcache: I/O memory each executor registers with io_uring, in KiB (counts against
    /// `ulimit -l`).
    #[arg(long, env = "ZCACHE_IO_MEMORY_KIB", default_value_t = 512)]
    pub io_memory_kib: usize,

    /// zcache: milliseconds after its last client disconnects before a client group is
    /// written out and dropped from memory (it is loaded again from the CVR database when a
    /// client returns).
    #[arg(long, env = "ZCACHE_GROUP_IDLE_MS", default_value_t = crate::shards::GROUP_IDLE_EVICT_MS)]
    pub group_idle_ms: u64,
}

/// `--log-format`, as zero-cache's `ZERO_LOG_FORMAT`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Why the settings cannot be used. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--app-id {0:?} is invalid: use only lowercase letters, digits and _")]
    AppId(String),
    #[error("--log-level {0:?} is invalid: use debug, info, warn or error")]
    LogLevel(String),
    #[error("--app-publications {0:?} is invalid: names starting with _ are reserved")]
    Publication(String),
    #[error("--num-sync-workers must be at least 1 (zcache has no replication-only mode yet)")]
    NoSyncWorkers,
    #[error("only one of --auth-jwk, --auth-jwks-url and --auth-secret (ZERO_AUTH_JWK, ZERO_AUTH_JWKS_URL, ZERO_AUTH_SECRET) may be set; these are: {0}")]
    AuthKeys(String),
    #[error("--per-user-mutation-limit-window-ms must be at least 1")]
    LimitWindow,
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let app_ok = !self.app_id.is_empty()
            && self
                .app_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !app_ok {
            return Err(ConfigError::AppId(self.app_id.clone()));
        }
        if !matches!(self.log_level.as_str(), "debug" | "info" | "warn" | "error") {
            return Err(ConfigError::LogLevel(self.log_level.clone()));
        }
        if let Some(p) = self.app_publications.iter().find(|p| p.starts_with('_')) {
            return Err(ConfigError::Publication(p.clone()));
        }
        if self.num_sync_workers == Some(0) {
            return Err(ConfigError::NoSyncWorkers);
        }
        let keys: Vec<&str> = [
            ("--auth-jwk", &self.auth_jwk),
            ("--auth-jwks-url", &self.auth_jwks_url),
            ("--auth-secret", &self.auth_secret),
        ]
        .iter()
        .filter(|(_, v)| v.as_deref().is_some_and(|v| !v.is_empty()))
        .map(|(n, _)| *n)
        .collect();
        if keys.len() > 1 {
            return Err(ConfigError::AuthKeys(keys.join(", ")));
        }
        if self.per_user_mutation_limit_window_ms == 0 {
            return Err(ConfigError::LimitWindow);
        }
        Ok(())
    }

    /// `{app}_{shard}`: the upstream schema holding `clients` and `mutations`.
    pub fn shard_schema(&self) -> String {
        format!("{}_{}", self.app_id, self.shard_num)
    }

    pub fn sync_shard_count(&self, cores: usize) -> usize {
        self.num_sync_workers
            .unwrap_or(if cores > 2 { cores - 1 } else { cores.max(1) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("zcache").chain(args.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn defaults_match_zero_cache() {
        let c = parse(&[]);
        assert_eq!(c.port, 4848);
        assert_eq!(c.app_id, "zero");
        assert_eq!(c.shard_num, 0);
        assert_eq!(c.replica_file, PathBuf::from("zero.db"));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.shard_schema(), "zero_0");
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn lists_split_on_commas() {
        let c = parse(&[
            "--query-url",
            "http://a/q,http://b/q",
            "--app-id",
            "my_app2",
        ]);
        assert_eq!(c.query_url, vec!["http://a/q", "http://b/q"]);
        c.validate().expect("valid");
    }

    #[test]
    fn log_format_takes_text_or_json() {
        assert_eq!(parse(&["--log-format", "json"]).log_format, LogFormat::Json);
        let bad = Config::try_parse_from(["zcache", "--log-format", "xml"]);
        assert!(bad.is_err());
    }

    #[test]
    fn more_than_one_key_option_is_refused() {
        let c = parse(&["--auth-secret", "s", "--auth-jwks-url", "http://x/jwks"]);
        let e = c.validate().expect_err("two key options");
        assert!(
            e.to_string().contains("--auth-jwks-url, --auth-secret"),
            "{e}"
        );
        parse(&["--auth-secret", "s"])
            .validate()
            .expect("one is fine");
    }

    #[test]
    fn bad_app_id_is_refused() {
        let c = parse(&["--app-id", "My-App"]);
        assert!(matches!(c.validate(), Err(ConfigError::AppId(_))));
    }
}
