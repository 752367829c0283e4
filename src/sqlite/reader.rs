//! A syncer shard's read connection on replica.db. Reads happen inside short snapshots
//! (`BEGIN` .. `COMMIT`) so the writer's checkpoints can make progress.

use super::quote_ident;
use super::replica::{load_specs, open_connection, to_sql, ReplicaError};
use crate::zql::schema::{ColumnKind, TableSpec};
use crate::zql::value::{Row, Value};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

pub struct ReplicaReader {
    conn: Connection,
    tables: HashMap<String, Rc<TableSpec>>,
    /// The watermark the last snapshot began at.
    snapshot_watermark: std::cell::Cell<u64>,
}

impl ReplicaReader {
    pub fn open(path: &Path) -> Result<Self, ReplicaError> {
        let conn = open_connection(path, true)?;
        let mut reader = ReplicaReader {
            conn,
            tables: HashMap::new(),
            snapshot_watermark: std::cell::Cell::new(0),
        };
        reader.reload_specs()?;
        Ok(reader)
    }

    /// Re-reads the table specs (after the replica's schema changed).
    pub fn reload_specs(&mut self) -> Result<(), ReplicaError> {
        self.tables = load_specs(&self.conn)?
            .into_iter()
            .map(|t| (t.name.clone(), Rc::new(t)))
            .collect();
        Ok(())
    }

    pub fn table_spec(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.tables.get(name).cloned()
    }

    /// Starts a read snapshot and returns the watermark it sees.
    pub fn begin_snapshot(&self) -> Result<u64, ReplicaError> {
        self.conn.execute_batch("BEGIN")?;
        let w: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM _zcache_meta WHERE key = 'watermark'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let w: u64 = w
            .unwrap_or_default()
            .parse()
            .map_err(|_| ReplicaError::Corrupt("watermark missing".into()))?;
        self.snapshot_watermark.set(w);
        Ok(w)
    }

    /// The watermark of the snapshot last begun.
    pub fn snapshot_watermark(&self) -> u64 {
        self.snapshot_watermark.get()
    }

    pub fn end_snapshot(&self) -> Result<(), ReplicaError> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    /// Rows of `table` whose columns equal the given values (SQL equality: a null value
    /// matches nothing).
    pub fn fetch_rows(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ReplicaError> {
        let spec = self
            .tables
            .get(table)
            .ok_or_else(|| ReplicaError::UnknownTable(table.to_string()))?;
        if eq.iter().any(|(_, v)| v.is_null()) {
            return Ok(Vec::new());
        }
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let mut sql = format!("SELECT {} FROM {}", cols.join(", "), quote_ident(table));
        for (n, (col, _)) in eq.iter().enumerate() {
            let name = &spec
                .columns
                .get(*col)
                .ok_or_else(|| ReplicaError::Corrupt(format!("column {col} of {table}")))?
                .name;
            sql.push_str(if n == 0 { " WHERE " } else { " AND " });
            sql.push_str(&format!("{} = ?{}", quote_ident(name), n + 1));
        }
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(
            eq.iter().map(|(_, v)| to_sql(v)),
        ))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(spec.columns.len());
            for (i, col) in spec.columns.iter().enumerate() {
                row.push(from_sql(col.kind, r.get_ref(i)?));
            }
            out.push(row);
        }
        Ok(out)
    }
}

pub(crate) fn from_sql(kind: ColumnKind, v: ValueRef<'_>) -> Value {
    match (kind, v) {
        (_, ValueRef::Null) => Value::Null,
        (ColumnKind::Boolean, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (_, ValueRef::Integer(i)) => Value::Int(i),
        (_, ValueRef::Real(f)) => Value::Float(f),
        (ColumnKind::Json, ValueRef::Text(t)) => {
            Value::Json(String::from_utf8_lossy(t).into_owned())
        }
        (_, ValueRef::Text(t)) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        (_, ValueRef::Blob(b)) => Value::Text(String::from_utf8_lossy(b).into_owned()),
    }
}

impl crate::zql::Source for ReplicaReader {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.table_spec(name)
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, crate::zql::ZqlError> {
        self.fetch_rows(table, eq).map_err(|e| match e {
            ReplicaError::UnknownTable(t) => crate::zql::ZqlError::UnknownTable(t),
            other => crate::zql::ZqlError::Source(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::Replica;
    use crate::zql::schema::ColumnSpec;

    #[test]
    fn reads_typed_rows_with_constraints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.db");
        let mut w = Replica::open(&path).expect("open");
        let col = |name: &str, kind, oid| ColumnSpec {
            name: name.into(),
            kind,
            pg_type_oid: oid,
        };
        let spec = TableSpec {
            name: "t".into(),
            columns: vec![
                col("id", ColumnKind::String, 25),
                col("b", ColumnKind::Boolean, 16),
                col("j", ColumnKind::Json, 3802),
                col("f", ColumnKind::Number, 701),
            ],
            primary_key: vec![0],
        };
        w.create_table(&spec).expect("create");
        w.begin().expect("begin");
        let row = vec![
            Value::Text("x".into()),
            Value::Bool(true),
            Value::Json("[1]".into()),
            Value::Float(2.5),
        ];
        w.upsert("t", &row).expect("upsert");
        w.upsert(
            "t",
            &vec![
                Value::Text("y".into()),
                Value::Null,
                Value::Null,
                Value::Int(3),
            ],
        )
        .expect("upsert");
        w.commit(9).expect("commit");

        let r = ReplicaReader::open(&path).expect("reader");
        assert_eq!(r.begin_snapshot().expect("snapshot"), 9);
        assert_eq!(
            r.fetch_rows("t", &[(0, Value::Text("x".into()))])
                .expect("fetch"),
            vec![row]
        );
        assert_eq!(r.fetch_rows("t", &[]).expect("all").len(), 2);
        assert!(r
            .fetch_rows("t", &[(1, Value::Null)])
            .expect("null")
            .is_empty());
        r.end_snapshot().expect("end");
    }
}
