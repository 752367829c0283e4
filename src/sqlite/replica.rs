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
/// How long a statement waits for a lock held by another connection on the replica.
pub const REPLICA_BUSY_TIMEOUT_MS: u64 = 5_000;

/// Prepared statements the writer keeps: a few per table (upsert, delete, get) plus metadata.
const STATEMENT_CACHE_CAPACITY: usize = 256;
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
    row_sql: RefCell<HashMap<String, RowSql>>,
    /// Set between `begin_bulk_load` and `end_bulk_load`.
    bulk: bool,
}

/// The SQL of one table's row statements.
#[derive(Clone)]
struct RowSql {
    spec: TableSpec,
    upsert: std::rc::Rc<str>,
    delete: std::rc::Rc<str>,
}

impl RowSql {
    fn new(spec: &TableSpec) -> Self {
        let placeholders: Vec<String> = (1..=spec.columns.len()).map(|i| format!("?{i}")).collect();
        let table = quote_ident(&spec.name);
        RowSql {
            spec: spec.clone(),
            upsert: format!(
                "INSERT OR REPLACE INTO {table} VALUES ({})",
                placeholders.join(", ")
            )
            .into(),
            delete: format!("DELETE FROM {table} WHERE {}", key_condition(spec)).into(),
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
        // FULL: a commit is durable before the LSN it holds is confirmed to Postgres.
        conn.pragma_update(None, "synchronous", "full")?;
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
    /// durable settings (WAL, synchronous=FULL) for the watermark and everything after.
    pub fn end_bulk_load(&mut self) -> Result<(), ReplicaError> {
        debug_assert!(self.bulk, "end_bulk_load without begin_bulk_load");
        self.conn.execute_batch("COMMIT")?;
        self.bulk = false;
        self.conn.pragma_update(None, "cache_size", -2000)?;
        // A checkpointed, fsynced main file before any watermark can refer to its content.
        self.conn.pragma_update(None, "synchronous", "full")?;
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

    fn row_sql(&self, table: &str) -> Result<RowSql, ReplicaError> {
        let spec = self.spec(table)?;
        let mut cache = self.row_sql.borrow_mut();
        match cache.get(table) {
            Some(sql) if sql.spec == *spec => Ok(sql.clone()),
            _ => {
                let sql = RowSql::new(spec);
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

    /// The `-wal` file's size in bytes (0 when absent).
    pub fn wal_bytes(&self) -> u64 {
        std::fs::metadata(&self.wal_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Forces a checkpoint when the WAL outgrew `REPLICA_WAL_BYTES_MAX`. A failure here does
    /// not undo the commit just made: it is logged and the next commit tries again.
    pub fn bound_wal(&self) {
        if self.wal_bytes() > REPLICA_WAL_BYTES_MAX {
            self.checkpoint_truncate();
        }
    }

    /// `wal_checkpoint(TRUNCATE)`: copies the whole WAL into the database file and truncates
    /// it, waiting at most `REPLICA_CHECKPOINT_WAIT_MS_MAX` for readers on older snapshots.
    fn checkpoint_truncate(&self) {
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
            Ok(0) => {}
            Ok(_) => tracing::debug!(
                wal_bytes = self.wal_bytes(),
                "replica checkpoint blocked by a reader; retrying after the next commit"
            ),
            Err(e) => tracing::warn!(error = %e, "replica checkpoint failed"),
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
    pub fn create_table(&mut self, spec: &TableSpec) -> Result<(), ReplicaError> {
        let name = quote_ident(&spec.name);
        self.conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {name}; {};",
            create_table_sql(spec, &spec.name)
        ))?;
        self.save_spec(spec.clone())
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
        let spec = self.spec(table)?;
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            cols.join(", "),
            quote_ident(table),
            key_condition(spec)
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
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

/// Schema changes, applied inside the open transaction (SQLite DDL is transactional, and
/// `rollback` re-reads the specs), each keeping `_zcache_tables` in step with the tables.
impl Replica {
    /// Adds a column at the end; rows present get `fill` (upstream's value for existing rows).
    pub fn add_column(
        &mut self,
        table: &str,
        column: ColumnSpec,
        fill: &Value,
    ) -> Result<(), ReplicaError> {
        let mut spec = self.spec(table)?.clone();
        debug_assert!(spec.column_index(&column.name).is_none(), "column exists");
        let q = quote_ident(table);
        let col = quote_ident(&column.name);
        self.conn.execute_batch(&format!(
            "ALTER TABLE {q} ADD COLUMN {col} {}",
            super::pgtypes::sqlite_decl(column.pg_type_oid, column.kind)
        ))?;
        if *fill != Value::Null {
            self.conn
                .execute(&format!("UPDATE {q} SET {col} = ?1"), [to_sql(fill)])?;
        }
        spec.columns.push(column);
        self.schema_changed();
        self.save_spec(spec)
    }

    /// Drops a column that is not part of the primary key, with the indexes that use it.
    pub fn drop_column(&mut self, table: &str, column: &str) -> Result<(), ReplicaError> {
        let mut spec = self.spec(table)?.clone();
        let pos = spec
            .column_index(column)
            .ok_or_else(|| ReplicaError::UnknownTable(format!("{table}.{column}")))?;
        if spec.primary_key.contains(&pos) {
            return Err(ReplicaError::Corrupt(format!(
                "cannot drop key column {column} of {table}"
            )));
        }
        // SQLite refuses to drop an indexed column; upstream dropped those indexes too.
        let indexes: Vec<String> = {
            let mut stmt = self.conn.prepare(
                "SELECT DISTINCT il.name FROM pragma_index_list(?1) il, pragma_index_info(il.name) ii
                 WHERE il.origin = 'c' AND ii.name = ?2",
            )?;
            let rows = stmt.query_map(params![table, column], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for index in indexes {
            self.conn
                .execute_batch(&format!("DROP INDEX {}", quote_ident(&index)))?;
        }
        self.conn.execute_batch(&format!(
            "ALTER TABLE {} DROP COLUMN {}",
            quote_ident(table),
            quote_ident(column)
        ))?;
        spec.columns.remove(pos);
        for k in spec.primary_key.iter_mut() {
            if *k > pos {
                *k -= 1;
            }
        }
        self.schema_changed();
        self.save_spec(spec)
    }

    pub fn rename_column(&mut self, table: &str, from: &str, to: &str) -> Result<(), ReplicaError> {
        let mut spec = self.spec(table)?.clone();
        let pos = spec
            .column_index(from)
            .ok_or_else(|| ReplicaError::UnknownTable(format!("{table}.{from}")))?;
        self.conn.execute_batch(&format!(
            "ALTER TABLE {} RENAME COLUMN {} TO {}",
            quote_ident(table),
            quote_ident(from),
            quote_ident(to)
        ))?;
        spec.columns[pos].name = to.to_string();
        self.schema_changed();
        self.save_spec(spec)
    }

    pub fn rename_table(&mut self, from: &str, to: &str) -> Result<(), ReplicaError> {
        let mut spec = self.spec(from)?.clone();
        self.conn.execute_batch(&format!(
            "ALTER TABLE {} RENAME TO {}",
            quote_ident(from),
            quote_ident(to)
        ))?;
        self.forget_spec(from)?;
        spec.name = to.to_string();
        self.schema_changed();
        self.save_spec(spec)
    }

    pub fn drop_table(&mut self, table: &str) -> Result<(), ReplicaError> {
        self.spec(table)?;
        self.conn
            .execute_batch(&format!("DROP TABLE {}", quote_ident(table)))?;
        self.schema_changed();
        self.forget_spec(table)
    }

    /// Re-creates the table keyed by `key` (column positions), keeping its rows and the
    /// indexes whose columns it still has. SQLite cannot alter a primary key in place.
    pub fn set_primary_key(&mut self, table: &str, key: &[usize]) -> Result<(), ReplicaError> {
        let mut spec = self.spec(table)?.clone();
        debug_assert!(!key.is_empty() && key.iter().all(|&k| k < spec.columns.len()));
        let indexes = self.take_indexes(table)?;
        let tmp = format!("_zcache_rekey_{table}");
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        spec.primary_key = key.to_vec();
        self.conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {qt}; {create}; INSERT INTO {qt} ({cols}) SELECT {cols} FROM {q};
             DROP TABLE {q}; ALTER TABLE {qt} RENAME TO {q};",
            qt = quote_ident(&tmp),
            create = create_table_sql(&spec, &tmp),
            cols = cols.join(", "),
            q = quote_ident(table),
        ))?;
        self.schema_changed();
        self.save_spec(spec)?;
        for columns in indexes {
            self.create_index(table, &columns)?;
        }
        Ok(())
    }

    /// Drops the table's secondary indexes and returns their column lists.
    fn take_indexes(&self, table: &str) -> Result<Vec<Vec<String>>, ReplicaError> {
        let names: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT name FROM pragma_index_list(?1) WHERE origin = 'c'")?;
            let rows = stmt.query_map([table], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let mut stmt = self
                .conn
                .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")?;
            let rows = stmt.query_map([&name], |r| r.get(0))?;
            out.push(rows.collect::<Result<_, _>>()?);
            self.conn
                .execute_batch(&format!("DROP INDEX {}", quote_ident(&name)))?;
        }
        Ok(out)
    }

    fn forget_spec(&mut self, table: &str) -> Result<(), ReplicaError> {
        self.conn
            .execute("DELETE FROM _zcache_tables WHERE name = ?1", [table])?;
        self.tables.remove(table);
        Ok(())
    }

    /// Cached statements name tables and columns that may no longer exist.
    fn schema_changed(&self) {
        self.conn.flush_prepared_statement_cache();
    }
}

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
    let pk: Vec<String> = spec
        .primary_key
        .iter()
        .map(|&i| quote_ident(&spec.columns[i].name))
        .collect();
    format!(
        "CREATE TABLE {} ({}, PRIMARY KEY ({}))",
        quote_ident(name),
        cols.join(", "),
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
mod tests {
    use super::*;

    pub fn issue_spec() -> TableSpec {
        let col = |name: &str, kind, oid| ColumnSpec {
            name: name.into(),
            kind,
            pg_type_oid: oid,
        };
        TableSpec {
            name: "issue".into(),
            columns: vec![
                col("id", ColumnKind::String, 25),
                col("n", ColumnKind::Number, 20),
                col("done", ColumnKind::Boolean, 16),
            ],
            primary_key: vec![0],
        }
    }

    #[test]
    fn reset_empties_the_replica_in_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("replica.db");
        let mut r = Replica::open(&path).expect("open");
        r.create_table(&issue_spec()).expect("create");
        r.begin().expect("begin");
        r.upsert(
            "issue",
            &vec![Value::Text("a".into()), Value::Int(1), Value::Bool(true)],
        )
        .expect("upsert");
        r.set_meta("slot", "s1").expect("meta");
        r.commit(5).expect("commit");
        let reader = crate::sqlite::ReplicaReader::open(&path).expect("reader");
        assert_eq!(reader.begin_snapshot().expect("snapshot"), 5);
        reader.end_snapshot().expect("end");

        r.reset().expect("reset");
        assert_eq!(r.watermark().expect("watermark"), None);
        assert_eq!(r.meta("slot").expect("meta"), None);
        assert!(r.tables().is_empty());
        // The reader opened before the reset sees it: same file.
        assert!(
            reader.begin_snapshot().is_err(),
            "no watermark after a reset"
        );
        reader.end_snapshot().expect("end");
        let n: i64 = r
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'issue'",
                [],
                |x| x.get(0),
            )
            .expect("count");
        assert_eq!(n, 0);
        // And the replica fills again.
        r.create_table(&issue_spec()).expect("create again");
        r.begin().expect("begin");
        r.commit(9).expect("commit");
        assert_eq!(reader.begin_snapshot().expect("snapshot"), 9);
        reader.end_snapshot().expect("end");
    }

    #[test]
    fn commits_keep_the_wal_under_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("replica.db");
        let mut r = Replica::open(&path).expect("open");
        r.create_table(&issue_spec()).expect("create");
        // One transaction larger than the limit, then a small one: the commit of the large
        // one truncates the WAL.
        r.begin().expect("begin");
        let text = "x".repeat(4000);
        for i in 0..(REPLICA_WAL_BYTES_MAX / 4000 + 100) {
            r.upsert(
                "issue",
                &vec![
                    Value::Text(format!("{i}{text}")),
                    Value::Int(1),
                    Value::Null,
                ],
            )
            .expect("upsert");
        }
        r.commit(1).expect("commit");
        assert!(
            r.wal_bytes() <= REPLICA_WAL_BYTES_MAX,
            "WAL of {} bytes after a commit",
            r.wal_bytes()
        );
    }

    #[test]
    fn writes_commit_with_watermark_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("replica.db");
        {
            let mut r = Replica::open(&path).expect("open");
            r.create_table(&issue_spec()).expect("create");
            r.begin().expect("begin");
            r.upsert(
                "issue",
                &vec![Value::Text("a".into()), Value::Int(1), Value::Bool(true)],
            )
            .expect("upsert");
            r.upsert(
                "issue",
                &vec![Value::Text("b".into()), Value::Int(2), Value::Bool(false)],
            )
            .expect("upsert");
            r.delete("issue", &[Value::Text("a".into())])
                .expect("delete");
            r.commit(77).expect("commit");
            // an uncommitted transaction is lost, watermark included
            r.begin().expect("begin");
            r.truncate("issue").expect("truncate");
            r.rollback().expect("rollback");
        }
        let r = Replica::open(&path).expect("reopen");
        assert_eq!(r.watermark().expect("watermark"), Some(77));
        assert_eq!(r.spec("issue").expect("spec"), &issue_spec());
        let n: i64 = r
            .conn
            .query_row("SELECT count(*) FROM issue WHERE id = 'b'", [], |x| {
                x.get(0)
            })
            .expect("count");
        assert_eq!(n, 1);
        assert!(matches!(
            r.upsert("nope", &vec![]),
            Err(ReplicaError::UnknownTable(_))
        ));
    }

    #[test]
    fn bulk_load_writes_rows_then_returns_to_durable_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("replica.db");
        let mut r = Replica::open(&path).expect("open");
        r.begin_bulk_load().expect("bulk");
        let mode: String = r
            .conn
            .query_row("PRAGMA journal_mode", [], |x| x.get(0))
            .expect("mode");
        assert_eq!(mode, "off");
        r.create_table(&issue_spec()).expect("create");
        {
            let mut w = r.row_writer("issue").expect("writer");
            assert_eq!(w.columns(), 3);
            for i in 0..1000i64 {
                let id = format!("i{i}");
                w.bind(0, ToSqlOutput::Borrowed(ValueRef::Text(id.as_bytes())))
                    .expect("bind");
                w.bind(1, ToSqlOutput::Borrowed(ValueRef::Integer(i)))
                    .expect("bind");
                w.bind(2, ToSqlOutput::Borrowed(ValueRef::Null))
                    .expect("bind");
                w.insert().expect("insert");
            }
        }
        r.end_bulk_load().expect("end bulk");
        let mode: String = r
            .conn
            .query_row("PRAGMA journal_mode", [], |x| x.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        let sync: i64 = r
            .conn
            .query_row("PRAGMA synchronous", [], |x| x.get(0))
            .expect("sync");
        assert_eq!(sync, 2, "FULL again after the copy");
        r.begin().expect("begin");
        r.commit(5).expect("commit");
        drop(r);
        let r = Replica::open(&path).expect("reopen");
        assert_eq!(r.watermark().expect("watermark"), Some(5));
        let (n, sum): (i64, i64) = r
            .conn
            .query_row("SELECT count(*), sum(n) FROM issue", [], |x| {
                Ok((x.get(0)?, x.get(1)?))
            })
            .expect("count");
        assert_eq!((n, sum), (1000, 999 * 1000 / 2));
    }

    #[test]
    fn row_statements_follow_a_changed_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Replica::open(&dir.path().join("replica.db")).expect("open");
        r.create_table(&issue_spec()).expect("create");
        let row = vec![Value::Text("a".into()), Value::Int(1), Value::Bool(true)];
        r.upsert("issue", &row).expect("upsert");
        // The same table re-created with a fourth column: the cached SQL must not be reused.
        let mut wider = issue_spec();
        wider.columns.push(ColumnSpec {
            name: "extra".into(),
            kind: ColumnKind::String,
            pg_type_oid: 25,
        });
        r.create_table(&wider).expect("re-create");
        let mut row4 = row.clone();
        row4.push(Value::Text("x".into()));
        r.upsert("issue", &row4).expect("upsert 4 columns");
        assert_eq!(
            r.get("issue", &[Value::Text("a".into())]).expect("get"),
            Some(row4)
        );
        r.delete("issue", &[Value::Text("a".into())])
            .expect("delete");
        assert_eq!(
            r.get("issue", &[Value::Text("a".into())]).expect("get"),
            None
        );
    }
}
