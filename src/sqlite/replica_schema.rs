//! Schema changes applied to the replica in place (see `replicator::ddl`): columns added,
//! dropped and renamed, tables renamed and dropped, primary keys changed.

use super::*;

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
            crate::sqlite::pgtypes::sqlite_decl(column.pg_type_oid, column.kind)
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
        self.save_spec(spec)?;
        // SQLite cannot rename an index; the key index is named after its table, so that a
        // new table under the old name can have its own.
        self.conn.execute_batch(&format!(
            "DROP INDEX IF EXISTS {}",
            quote_ident(&key_index_name(from))
        ))?;
        self.create_key_index(to)
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
        self.create_key_index(table)?;
        for columns in indexes {
            self.create_index(table, &columns)?;
        }
        Ok(())
    }

    /// Drops the table's secondary indexes (not its key index) and returns their column lists.
    fn take_indexes(&self, table: &str) -> Result<Vec<Vec<String>>, ReplicaError> {
        let names: Vec<String> = {
            let mut stmt = self.conn.prepare(
                "SELECT name FROM pragma_index_list(?1) WHERE origin = 'c' AND name != ?2",
            )?;
            let rows = stmt.query_map(params![table, key_index_name(table)], |r| r.get(0))?;
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
    pub(super) fn schema_changed(&self) {
        self.conn.flush_prepared_statement_cache();
    }
}
