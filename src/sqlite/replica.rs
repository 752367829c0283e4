//! The replica writer: owned by the replication shard, one SQLite transaction per upstream
//! transaction, the watermark committed in the same transaction.

use super::quote_ident;
use crate::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use crate::zql::value::{Row, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, CachedStatement, Connection, OptionalExtension};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Pages in the WAL after which a commit runs SQLite's passive auto-checkpoint (its default,
/// set explicitly because the bound below is derived from it).
pub const REPLICA_WAL_AUTOCHECKPOINT_PAGES: u32 = 1000;
/// Size of the `-wal` file above which the writer forces a TRUNCATE checkpoint after a commit.
/// Auto-checkpoints alone keep the WAL near 1000 pages (4 MiB with 4 KiB pages) only when they
/// complete; a reader whose snapshot overlaps every one of them stops the WAL from restarting,
/// and stock SQLite has no WAL2 to fall back on. The file can exceed this by at most one
/// transaction (the check runs after each commit) or while readers hold snapshots longer
/// than `REPLICA_CHECKPOINT_WAIT_MS_MAX`.
pub const REPLICA_WAL_BYTES_MAX: u64 = 8 << 20;
/// How long a forced checkpoint waits for readers to move to the newest snapshot. Short:
/// the replication shard blocks meanwhile, and the next commit tries again.
pub const REPLICA_CHECKPOINT_WAIT_MS_MAX: u64 = 100;
/// After a forced checkpoint a reader blocked, the next one waits until the WAL has grown by
/// this much more: a reader holding one snapshot for seconds must not make every commit wait
/// `REPLICA_CHECKPOINT_WAIT_MS_MAX` (that would throttle replication to ~10 commits/s).
pub const REPLICA_CHECKPOINT_RETRY_BYTES: u64 = 256 << 10;
/// How long a statement waits for a lock held by another connection on the replica.
pub const REPLICA_BUSY_TIMEOUT_MS: u64 = 5_000;

/// Prepared statements the writer keeps: a few per table (upsert, delete, get) plus metadata.
pub(crate) const STATEMENT_CACHE_CAPACITY: usize = 256;
/// SQLite page cache of the writer during the initial copy, in KiB, bounded whatever the
/// table size. Measured on 1M rows: 64 MiB beat 16 MiB (more page reloads) and 256 MiB
/// (first-touch page faults cost more than the pages saved).
const BULK_CACHE_KIB: i64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("replica has no table {0:?}")]
    UnknownTable(String),
    #[error("replica metadata is corrupt: {0}")]
    Corrupt(String),
}

pub struct Replica {
    conn: Connection,
    tables: HashMap<String, TableSpec>,
    /// The `-wal` file, watched after each commit.
    wal_path: PathBuf,
    /// Row statements' SQL per table, made once instead of per row; each entry remembers the
    /// spec it was made from, so a changed spec (whoever changed it) makes it anew.
    row_sql: RefCell<HashMap<String, std::rc::Rc<RowSql>>>,
    /// Set between `begin_bulk_load` and `end_bulk_load`.
    bulk: bool,
    /// The WAL size below which no forced checkpoint is tried (raised after one is blocked).
    checkpoint_at_bytes: std::cell::Cell<u64>,
}

/// The SQL of one table's row statements.
struct RowSql {
    spec: TableSpec,
    upsert: String,
    delete: String,
    get: String,
}

impl RowSql {
    fn new(spec: &TableSpec) -> Self {
        let placeholders: Vec<String> = (1..=spec.columns.len()).map(|i| format!("?{i}")).collect();
        let table = quote_ident(&spec.name);
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        RowSql {
            spec: spec.clone(),
            upsert: format!(
                "INSERT OR REPLACE INTO {table} VALUES ({})",
                placeholders.join(", ")
            ),
            delete: format!("DELETE FROM {table} WHERE {}", key_condition(spec)),
            get: format!(
                "SELECT {} FROM {table} WHERE {}",
                cols.join(", "),
                key_condition(spec)
            ),
        }
    }
}

/// Inserts rows into one table through one prepared statement, kept for as long as the
/// writer lives (the initial copy holds one per table for the whole table).
pub struct RowWriter<'a> {
    stmt: CachedStatement<'a>,
    columns: usize,
}

impl RowWriter<'_> {
    /// Binds column `i` (0-based) of the next row.
    #[inline]
    pub fn bind(&mut self, i: usize, value: ToSqlOutput<'_>) -> Result<(), ReplicaError> {
        debug_assert!(i < self.columns, "column {i} of {}", self.columns);
        self.stmt.raw_bind_parameter(i + 1, value)?;
        Ok(())
    }

    /// Writes the row whose columns were all bound (a column not bound since the last row
    /// keeps its previous value, so callers bind every column).
    #[inline]
    pub fn insert(&mut self) -> Result<(), ReplicaError> {
        self.stmt.raw_execute()?;
        Ok(())
    }

    pub fn columns(&self) -> usize {
        self.columns
    }
}

const META_DDL: &str = "
CREATE TABLE IF NOT EXISTS _zcache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS _zcache_tables (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
";

/// Opens replica.db with the settings every connection to it uses.
pub fn open_connection(path: &Path, read_only: bool) -> Result<Connection, rusqlite::Error> {
    use rusqlite::OpenFlags;
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_millis(REPLICA_BUSY_TIMEOUT_MS))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "wal")?;
        // NORMAL: a commit reaches the OS at once (a killed process loses nothing) without
        // waiting for the disk; `sync_wal` makes it durable before the LSN it holds is
        // confirmed to Postgres, once per confirmation instead of once per transaction.
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.pragma_update(None, "wal_autocheckpoint", REPLICA_WAL_AUTOCHECKPOINT_PAGES)?;
        // When the WAL restarts after a complete checkpoint, the file shrinks to this size
        // instead of keeping its high-water mark.
        conn.pragma_update(None, "journal_size_limit", REPLICA_WAL_BYTES_MAX as i64)?;
    }
    Ok(conn)
}

impl Replica {
    pub fn open(path: &Path) -> Result<Self, ReplicaError> {
        let conn = open_connection(path, false)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        conn.execute_batch(META_DDL)?;
        let tables = load_specs(&conn)?
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        Ok(Replica {
            conn,
            tables,
            wal_path: PathBuf::from(wal_path),
            row_sql: RefCell::new(HashMap::new()),
            bulk: false,
            checkpoint_at_bytes: std::cell::Cell::new(REPLICA_WAL_BYTES_MAX),
        })
    }

    /// Starts the initial copy's transaction. Until `end_bulk_load` the file is not durable
    /// and not crash-safe (no journal, no syncs): it is worthless anyway until the watermark
    /// commits, which happens after `end_bulk_load` in an ordinary durable transaction. A
    /// process killed mid-copy leaves a file without a watermark, possibly corrupt, which
    /// `replicator::prepare_at_startup` removes. With readers on the file (a rebuild while
    /// syncers run) the journal cannot be switched off, and the copy stays crash-safe in WAL.
    /// (A rollback journal instead of none cost 30% of the kit-shaped sync when the file's
    /// freed pages are reused.)
    pub fn begin_bulk_load(&mut self) -> Result<(), ReplicaError> {
        debug_assert!(self.conn.is_autocommit(), "bulk load inside a transaction");
        self.conn.pragma_update(None, "synchronous", "off")?;
        self.conn
            .pragma_update(None, "cache_size", -BULK_CACHE_KIB)?;
        // Leaving WAL needs the only connection to the file; if a reader holds it, the copy
        // still goes through WAL, which is slower but just as correct.
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = off", [], |r| r.get(0))
            .unwrap_or_else(|_| "wal".into());
        if !mode.eq_ignore_ascii_case("off") {
            tracing::info!(journal_mode = %mode, "initial copy keeps the journal (the replica is in use)");
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.bulk = true;
        Ok(())
    }

    /// Commits the initial copy (without a watermark), syncs it to disk and restores the
    /// durable settings (WAL, synchronous=NORMAL, `sync_wal`) for the watermark and after.
    pub fn end_bulk_load(&mut self) -> Result<(), ReplicaError> {
        debug_assert!(self.bulk, "end_bulk_load without begin_bulk_load");
        self.conn.execute_batch("COMMIT")?;
        self.bulk = false;
        self.conn.pragma_update(None, "cache_size", -2000)?;
        // A checkpointed, fsynced main file before any watermark can refer to its content.
        self.conn.pragma_update(None, "synchronous", "normal")?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = wal", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ReplicaError::Corrupt(format!(
                "cannot return to WAL (journal_mode {mode})"
            )));
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        if let Some(path) = self.conn.path().filter(|p| !p.is_empty()) {
            std::fs::File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| ReplicaError::Corrupt(format!("cannot sync {path}: {e}")))?;
        }
        Ok(())
    }

    /// A writer of whole rows into `table` (INSERT OR REPLACE), for the initial copy.
    pub fn row_writer(&self, table: &str) -> Result<RowWriter<'_>, ReplicaError> {
        let sql = self.row_sql(table)?;
        Ok(RowWriter {
            stmt: self.conn.prepare_cached(&sql.upsert)?,
            columns: sql.spec.columns.len(),
        })
    }

    fn row_sql(&self, table: &str) -> Result<std::rc::Rc<RowSql>, ReplicaError> {
        let spec = self.spec(table)?;
        let mut cache = self.row_sql.borrow_mut();
        match cache.get(table) {
            Some(sql) if sql.spec == *spec => Ok(sql.clone()),
            _ => {
                let sql = std::rc::Rc::new(RowSql::new(spec));
                cache.insert(table.to_string(), sql.clone());
                Ok(sql)
            }
        }
    }

    /// Empties the replica for a new initial sync: every table dropped, the metadata (and so
    /// the watermark) cleared, in one transaction. The file itself stays: syncer shards hold
    /// read connections on it, and unlinking it would leave them reading the old inode
    /// forever while the writer fills a new one. Readers see either the old replica or an
    /// empty one without a watermark (which they report as not ready).
    pub fn reset(&mut self) -> Result<(), ReplicaError> {
        self.rollback()?;
        self.begin()?;
        let dropped = self.drop_all_tables();
        match dropped {
            Ok(()) => self.conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = self.rollback();
                return Err(e);
            }
        }
        self.tables.clear();
        self.schema_changed();
        // The dropped tables' pages went through the WAL; start the new sync with an empty one.
        self.checkpoint_truncate();
        debug_assert!(matches!(self.watermark(), Ok(None)));
        Ok(())
    }

    fn drop_all_tables(&self) -> Result<(), ReplicaError> {
        let names: Vec<String> = {
            let mut stmt = self.conn.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table'
                 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                 AND name NOT LIKE '\\_zcache\\_%' ESCAPE '\\'",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for name in names {
            self.conn
                .execute_batch(&format!("DROP TABLE {}", quote_ident(&name)))?;
        }
        self.conn
            .execute_batch("DELETE FROM _zcache_tables; DELETE FROM _zcache_meta;")?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, ReplicaError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM _zcache_meta WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), ReplicaError> {
        self.conn.execute(
            "INSERT INTO _zcache_meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// The LSN the replica reflects; None until the initial sync committed.
    pub fn watermark(&self) -> Result<Option<u64>, ReplicaError> {
        match self.meta("watermark")? {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| ReplicaError::Corrupt(format!("watermark {s:?}"))),
        }
    }

    pub fn tables(&self) -> &HashMap<String, TableSpec> {
        &self.tables
    }

    pub fn spec(&self, table: &str) -> Result<&TableSpec, ReplicaError> {
        self.tables
            .get(table)
            .ok_or_else(|| ReplicaError::UnknownTable(table.to_string()))
    }

    pub fn begin(&self) -> Result<(), ReplicaError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Commits the open transaction together with its watermark.
    pub fn commit(&self, watermark: u64) -> Result<(), ReplicaError> {
        self.set_meta("watermark", &watermark.to_string())?;
        self.conn.execute_batch("COMMIT")?;
        self.bound_wal();
        Ok(())
    }

    /// Makes every committed transaction durable: syncs the `-wal` file, which holds each
    /// commit not yet checkpointed (checkpoints sync the main file themselves under
    /// synchronous=NORMAL). Until this returns, a power loss may take back recent commits;
    /// so the replicator calls it before confirming an LSN to Postgres.
    pub fn sync_wal(&self) -> Result<(), ReplicaError> {
        debug_assert!(self.conn.is_autocommit(), "sync_wal inside a transaction");
        match std::fs::File::open(&self.wal_path) {
            Ok(file) => file.sync_data().map_err(|e| {
                ReplicaError::Corrupt(format!("cannot sync {}: {e}", self.wal_path.display()))
            }),
            // No WAL (closed cleanly, or the journal is off): every commit is in the main file,
            // which the checkpoint that removed the WAL synced.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ReplicaError::Corrupt(format!(
                "cannot open {}: {e}",
                self.wal_path.display()
            ))),
        }
    }

    /// The `-wal` file's size in bytes (0 when absent).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(&self.wal_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Forces a checkpoint when the WAL outgrew `REPLICA_WAL_BYTES_MAX`. A failure here does
    /// not undo the commit just made: it is logged and the next commit tries again.
    pub fn bound_wal(&self) {
        let bytes = self.wal_bytes();
        if bytes <= REPLICA_WAL_BYTES_MAX {
            // Back under the bound (SQLite's own checkpoints restart the WAL when they can).
            self.checkpoint_at_bytes.set(REPLICA_WAL_BYTES_MAX);
            return;
        }
        if bytes <= self.checkpoint_at_bytes.get() {
            return;
        }
        let next = if self.checkpoint_truncate() {
            REPLICA_WAL_BYTES_MAX
        } else {
            bytes + REPLICA_CHECKPOINT_RETRY_BYTES
        };
        self.checkpoint_at_bytes.set(next);
    }

    /// `wal_checkpoint(TRUNCATE)`: copies the whole WAL into the database file and truncates
    /// it, waiting at most `REPLICA_CHECKPOINT_WAIT_MS_MAX` for readers on older snapshots.
    /// It goes through even when some reader holds a snapshot at every instant (shown in
    /// tests/wal_bound.rs): once the WAL is wholly copied, snapshots that begin read the
    /// database file alone, so it waits only for those already open, which are short.
    /// Returns whether it went through.
    fn checkpoint_truncate(&self) -> bool {
        let wait = Duration::from_millis(REPLICA_CHECKPOINT_WAIT_MS_MAX);
        let result = self.conn.busy_timeout(wait).and_then(|()| {
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                })
        });
        let _ = self
            .conn
            .busy_timeout(Duration::from_millis(REPLICA_BUSY_TIMEOUT_MS));
        match result {
            Ok(0) => true,
            Ok(_) => {
                tracing::debug!(
                    wal_bytes = self.wal_bytes(),
                    "replica checkpoint blocked by a reader; retrying once the WAL grows more"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "replica checkpoint failed");
                false
            }
        }
    }

    /// Rolls back the open transaction; table specs changed in it are re-read, since schema
    /// changes roll back with it.
    pub fn rollback(&mut self) -> Result<(), ReplicaError> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("ROLLBACK")?;
            self.tables = load_specs(&self.conn)?
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect();
        }
        Ok(())
    }

    /// Creates (or re-creates) a table and records its spec.
    /// Creates (or re-creates, empty) a table with its key index.
    pub fn create_table(&mut self, spec: &TableSpec) -> Result<(), ReplicaError> {
        self.create_table_unkeyed(spec)?;
        self.create_key_index(&spec.name)
    }

    /// Creates (or re-creates, empty) a table without its key index, for the initial copy:
    /// appending rows to a table with no index and then building the index in one sorted pass
    /// is much cheaper than inserting every row into a B-tree keyed by (often random) text.
    /// Until `create_key_index` runs, nothing enforces or finds rows by the key.
    pub fn create_table_unkeyed(&mut self, spec: &TableSpec) -> Result<(), ReplicaError> {
        let name = quote_ident(&spec.name);
        self.conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {name}; {};",
            create_table_sql(spec, &spec.name)
        ))?;
        self.save_spec(spec.clone())
    }

    /// The unique index on the table's primary key (upstream's key). The replica's tables
    /// declare no PRIMARY KEY, since SQLite cannot add one to a filled table; this index
    /// gives the same uniqueness, `INSERT OR REPLACE` conflict target and lookups.
    pub fn create_key_index(&self, table: &str) -> Result<(), ReplicaError> {
        let spec = self.spec(table)?;
        self.conn.execute_batch(&key_index_sql(spec, table))?;
        Ok(())
    }

    /// Records a table's spec in `_zcache_tables` (where syncers' `reload_specs` reads it)
    /// and in memory.
    fn save_spec(&mut self, spec: TableSpec) -> Result<(), ReplicaError> {
        self.conn.execute(
            "INSERT INTO _zcache_tables (name, spec) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
            params![spec.name, spec_to_json(&spec)],
        )?;
        self.tables.insert(spec.name.clone(), spec);
        Ok(())
    }

    pub fn create_index(&self, table: &str, columns: &[String]) -> Result<(), ReplicaError> {
        let spec = self.spec(table)?;
        if columns.iter().any(|c| spec.column_index(c).is_none()) {
            return Ok(()); // an index over a column zcache does not sync
        }
        let index_name = format!("{}_{}_idx", table, columns.join("_"));
        let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        self.conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} ({})",
            quote_ident(&index_name),
            quote_ident(table),
            cols.join(", ")
        ))?;
        Ok(())
    }

    /// Inserts or replaces a whole row.
    pub fn upsert(&self, table: &str, row: &Row) -> Result<(), ReplicaError> {
        let sql = self.row_sql(table)?;
        debug_assert_eq!(sql.spec.columns.len(), row.len());
        let mut stmt = self.conn.prepare_cached(&sql.upsert)?;
        execute_bound(&mut stmt, row)
    }

    /// Deletes the row with this primary key (values in key order).
    pub fn delete(&self, table: &str, key: &[Value]) -> Result<(), ReplicaError> {
        let sql = self.row_sql(table)?;
        debug_assert_eq!(sql.spec.primary_key.len(), key.len());
        let mut stmt = self.conn.prepare_cached(&sql.delete)?;
        execute_bound(&mut stmt, key)
    }

    /// The row with this primary key, if present.
    pub fn get(&self, table: &str, key: &[Value]) -> Result<Option<Row>, ReplicaError> {
        let sql = self.row_sql(table)?;
        let spec = &sql.spec;
        let mut stmt = self.conn.prepare_cached(&sql.get)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(key.iter().map(to_sql)))?;
        match rows.next()? {
            Some(r) => {
                let mut row = Vec::with_capacity(spec.columns.len());
                for (i, col) in spec.columns.iter().enumerate() {
                    row.push(super::reader::from_sql(col.kind, r.get_ref(i)?));
                }
                Ok(Some(row))
            }
            None => Ok(None),
        }
    }

    pub fn truncate(&self, table: &str) -> Result<(), ReplicaError> {
        self.spec(table)?;
        self.conn
            .execute_batch(&format!("DELETE FROM {}", quote_ident(table)))?;
        Ok(())
    }

    /// Moves WAL content into the main file once readers have let go of it, so the WAL stays
    /// bounded (stock SQLite has no WAL2).
    pub fn checkpoint(&self) -> Result<(), ReplicaError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }
}

#[path = "replica_schema.rs"]
mod schema_change;

/// `CREATE TABLE name (...)` for a spec's columns and key.
fn create_table_sql(spec: &TableSpec, name: &str) -> String {
    debug_assert!(!spec.primary_key.is_empty(), "tables need a key to sync");
    let cols: Vec<String> = spec
        .columns
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                quote_ident(&c.name),
                super::pgtypes::sqlite_decl(c.pg_type_oid, c.kind)
            )
        })
        .collect();
    format!("CREATE TABLE {} ({})", quote_ident(name), cols.join(", "))
}

/// The key index's name: one per table name, so renaming a table renames its key index too.
pub(super) fn key_index_name(table: &str) -> String {
    format!("{KEY_INDEX_PREFIX}{table}")
}

/// Names of key indexes start with this; `take_indexes` and `drop_column` leave them alone.
pub(super) const KEY_INDEX_PREFIX: &str = "_zcache_key_";

fn key_index_sql(spec: &TableSpec, table: &str) -> String {
    let pk: Vec<String> = spec
        .primary_key
        .iter()
        .map(|&i| quote_ident(&spec.columns[i].name))
        .collect();
    format!(
        "CREATE UNIQUE INDEX {} ON {} ({})",
        quote_ident(&key_index_name(table)),
        quote_ident(table),
        pk.join(", ")
    )
}

/// `"k1" = ?1 AND "k2" = ?2`: the primary key, bound in key order.
fn key_condition(spec: &TableSpec) -> String {
    let conds: Vec<String> = spec
        .primary_key
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("{} = ?{}", quote_ident(&spec.columns[i].name), n + 1))
        .collect();
    conds.join(" AND ")
}

/// Binds `values` to ?1.. (borrowing, not copying, their text) and runs the statement.
fn execute_bound(stmt: &mut rusqlite::Statement<'_>, values: &[Value]) -> Result<(), ReplicaError> {
    for (i, v) in values.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, to_sql_ref(v))?;
    }
    stmt.raw_execute()?;
    Ok(())
}

/// The SQLite value of `v`, borrowing its text: the same mapping as `to_sql`.
#[inline]
pub fn to_sql_ref(v: &Value) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(match v {
        Value::Null => ValueRef::Null,
        Value::Bool(b) => ValueRef::Integer(*b as i64),
        Value::Int(i) => ValueRef::Integer(*i),
        Value::Float(f) if f.is_nan() => ValueRef::Null,
        Value::Float(f) => ValueRef::Real(*f),
        Value::Text(s) | Value::Json(s) => ValueRef::Text(s.as_bytes()),
    })
}

pub fn to_sql(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Bool(b) => S::Integer(*b as i64),
        Value::Int(i) => S::Integer(*i),
        Value::Float(f) if f.is_nan() => S::Null,
        Value::Float(f) => S::Real(*f),
        Value::Text(s) | Value::Json(s) => S::Text(s.clone()),
    }
}

fn kind_from_str(s: &str) -> Option<ColumnKind> {
    Some(match s {
        "string" => ColumnKind::String,
        "number" => ColumnKind::Number,
        "boolean" => ColumnKind::Boolean,
        "json" => ColumnKind::Json,
        "null" => ColumnKind::Null,
        _ => return None,
    })
}

fn spec_to_json(spec: &TableSpec) -> String {
    let cols: Vec<serde_json::Value> = spec
        .columns
        .iter()
        .map(|c| serde_json::json!([c.name, c.kind.as_str(), c.pg_type_oid]))
        .collect();
    serde_json::json!({"columns": cols, "primaryKey": spec.primary_key}).to_string()
}

fn spec_from_json(name: &str, json: &str) -> Result<TableSpec, ReplicaError> {
    let corrupt = || ReplicaError::Corrupt(format!("spec of table {name:?}"));
    #[derive(serde::Deserialize)]
    struct Raw {
        columns: Vec<(String, String, u32)>,
        #[serde(rename = "primaryKey")]
        primary_key: Vec<usize>,
    }
    let raw: Raw = serde_json::from_str(json).map_err(|_| corrupt())?;
    let columns = raw
        .columns
        .into_iter()
        .map(|(name, kind, oid)| {
            Ok(ColumnSpec {
                name,
                kind: kind_from_str(&kind).ok_or_else(corrupt)?,
                pg_type_oid: oid,
            })
        })
        .collect::<Result<Vec<_>, ReplicaError>>()?;
    if raw.primary_key.iter().any(|&i| i >= columns.len()) {
        return Err(corrupt());
    }
    Ok(TableSpec {
        name: name.to_string(),
        columns,
        primary_key: raw.primary_key,
    })
}

/// The table specs recorded in a replica file.
pub fn load_specs(conn: &Connection) -> Result<Vec<TableSpec>, ReplicaError> {
    let mut stmt = conn.prepare("SELECT name, spec FROM _zcache_tables ORDER BY name")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (name, json) = row?;
        out.push(spec_from_json(&name, &json)?);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "replica_tests.rs"]
pub(crate) mod tests;
