//! A syncer shard's read connection on replica.db. Reads happen inside short snapshots
//! (`BEGIN` .. `COMMIT`) so the writer's checkpoints can make progress.

use super::quote_ident;
use super::replica::{load_specs, open_connection, to_sql, ReplicaError};
use crate::zql::ast::Direction;
use crate::zql::schema::{ColumnKind, TableSpec};
use crate::zql::value::{Row, Value};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

/// SQL text by table, then by constrained columns.
type FetchSqlCache = HashMap<String, HashMap<Vec<usize>, Rc<str>>>;

pub struct ReplicaReader {
    conn: Connection,
    tables: HashMap<String, Rc<TableSpec>>,
    /// The watermark the last snapshot began at.
    snapshot_watermark: std::cell::Cell<u64>,
    /// `fetch_rows` SQL by table and constrained columns: made once, not per read (the
    /// statement cache is keyed by this text, and building it cost more than the lookup).
    fetch_sql: std::cell::RefCell<FetchSqlCache>,
}

impl ReplicaReader {
    pub fn open(path: &Path) -> Result<Self, ReplicaError> {
        let conn = open_connection(path, true)?;
        conn.set_prepared_statement_cache_capacity(super::replica::STATEMENT_CACHE_CAPACITY);
        let mut reader = ReplicaReader {
            conn,
            tables: HashMap::new(),
            snapshot_watermark: std::cell::Cell::new(0),
            fetch_sql: std::cell::RefCell::new(HashMap::new()),
        };
        reader.reload_specs()?;
        Ok(reader)
    }

    /// Re-reads the table specs (after the replica's schema changed).
    pub fn reload_specs(&mut self) -> Result<(), ReplicaError> {
        self.fetch_sql.borrow_mut().clear();
        self.tables = load_specs(&self.conn)?
            .into_iter()
            .map(|t| (t.name.clone(), Rc::new(t)))
            .collect();
        Ok(())
    }

    /// Every replicated table, by the name the client uses.
    pub fn table_specs(&self) -> std::collections::BTreeMap<String, Rc<TableSpec>> {
        self.tables
            .iter()
            .map(|(name, spec)| (name.clone(), spec.clone()))
            .collect()
    }

    pub fn table_spec(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.tables.get(name).cloned()
    }

    /// Starts a read snapshot and returns the watermark it sees.
    pub fn begin_snapshot(&self) -> Result<u64, ReplicaError> {
        // Cached statements: a shard opens thousands of snapshots a second, and parsing
        // these each time cost more than reading them.
        self.conn.prepare_cached("BEGIN")?.execute([])?;
        let w: Option<String> = self
            .conn
            .prepare_cached("SELECT value FROM _zcache_meta WHERE key = 'watermark'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        let w: u64 = w
            .unwrap_or_default()
            .parse()
            .map_err(|_| ReplicaError::Corrupt("watermark missing".into()))?;
        self.snapshot_watermark.set(w);
        Ok(w)
    }

    /// Whether some index of `table` starts with `columns`, in that order.
    pub fn has_index_on(&self, table: &str, columns: &[String]) -> Result<bool, ReplicaError> {
        let indexes: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT name FROM pragma_index_list(?1)")?;
            let rows = stmt.query_map([table], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for index in indexes {
            let cols: Vec<String> = {
                let mut stmt = self
                    .conn
                    .prepare_cached("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")?;
                let rows = stmt.query_map([&index], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            if cols.len() >= columns.len() && cols[..columns.len()] == *columns {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The watermark of the snapshot last begun.
    pub fn snapshot_watermark(&self) -> u64 {
        self.snapshot_watermark.get()
    }

    pub fn end_snapshot(&self) -> Result<(), ReplicaError> {
        if !self.conn.is_autocommit() {
            self.conn.prepare_cached("COMMIT")?.execute([])?;
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
        let sql = self.fetch_sql(spec, eq)?;
        let params: Vec<rusqlite::types::Value> = eq.iter().map(|(_, v)| to_sql(v)).collect();
        self.query_rows(spec, &sql, &params)
    }

    /// Runs a SELECT of every column of `spec`'s table and converts its rows.
    fn query_rows(
        &self,
        spec: &TableSpec,
        sql: &str,
        params: &[rusqlite::types::Value],
    ) -> Result<Vec<Row>, ReplicaError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
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

impl ReplicaReader {
    fn fetch_sql(&self, spec: &TableSpec, eq: &[(usize, Value)]) -> Result<Rc<str>, ReplicaError> {
        let cols: Vec<usize> = eq.iter().map(|(c, _)| *c).collect();
        if let Some(sql) = self
            .fetch_sql
            .borrow()
            .get(&spec.name)
            .and_then(|by_cols| by_cols.get(&cols))
        {
            return Ok(sql.clone());
        }
        let names: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let mut sql = format!(
            "SELECT {} FROM {}",
            names.join(", "),
            quote_ident(&spec.name)
        );
        for (n, col) in cols.iter().enumerate() {
            let name = &spec
                .columns
                .get(*col)
                .ok_or_else(|| ReplicaError::Corrupt(format!("column {col} of {}", spec.name)))?
                .name;
            sql.push_str(if n == 0 { " WHERE " } else { " AND " });
            sql.push_str(&format!("{} = ?{}", quote_ident(name), n + 1));
        }
        let sql: Rc<str> = sql.into();
        self.fetch_sql
            .borrow_mut()
            .entry(spec.name.clone())
            .or_default()
            .insert(cols, sql.clone());
        Ok(sql)
    }
}

/// `WHERE` terms saying a row's `order` columns come after `cursor` (or at it), with the
/// client's null ordering: nulls lowest, so first ascending and last descending.
fn cursor_sql(
    spec: &TableSpec,
    order: &[(usize, Direction)],
    cursor: &[Value],
    inclusive: bool,
    params: &mut Vec<rusqlite::types::Value>,
) -> String {
    debug_assert_eq!(order.len(), cursor.len());
    let mut alternatives = Vec::with_capacity(order.len() + 1);
    let mut equal_prefix: Vec<String> = Vec::new();
    for (&(col, dir), v) in order.iter().zip(cursor) {
        let name = quote_ident(&spec.columns[col].name);
        let after = match (dir, v.is_null()) {
            (Direction::Asc, true) => Some(format!("{name} IS NOT NULL")),
            (Direction::Asc, false) => {
                params.push(to_sql(v));
                Some(format!("{name} > ?{}", params.len()))
            }
            (Direction::Desc, true) => None,
            (Direction::Desc, false) => {
                params.push(to_sql(v));
                Some(format!("({name} < ?{} OR {name} IS NULL)", params.len()))
            }
        };
        if let Some(after) = after {
            let mut terms = equal_prefix.clone();
            terms.push(after);
            alternatives.push(format!("({})", terms.join(" AND ")));
        }
        equal_prefix.push(if v.is_null() {
            format!("{name} IS NULL")
        } else {
            params.push(to_sql(v));
            format!("{name} = ?{}", params.len())
        });
    }
    if inclusive {
        alternatives.push(format!("({})", equal_prefix.join(" AND ")));
    }
    if alternatives.is_empty() {
        return "0".into();
    }
    format!("({})", alternatives.join(" OR "))
}

impl ReplicaReader {
    /// `column IN (values)`, the values passed as one JSON array.
    fn rows_in(
        &self,
        table: &str,
        column: usize,
        values: &[Value],
        eq: &[(usize, Value)],
    ) -> Result<Option<Vec<Row>>, ReplicaError> {
        let spec = self
            .tables
            .get(table)
            .ok_or_else(|| ReplicaError::UnknownTable(table.to_string()))?;
        let in_range = |c: usize| c < spec.columns.len();
        if !in_range(column)
            || spec.columns[column].kind == ColumnKind::Json
            || eq.iter().any(|(c, _)| !in_range(*c))
        {
            return Ok(None);
        }
        if eq.iter().any(|(_, v)| v.is_null()) {
            return Ok(Some(Vec::new()));
        }
        let mut list = String::from("[");
        for (i, v) in values.iter().filter(|v| !v.is_null()).enumerate() {
            if i > 0 {
                list.push(',');
            }
            v.write_json(&mut list);
        }
        list.push(']');
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let mut sql = format!(
            "SELECT {} FROM {} WHERE {} IN (SELECT value FROM json_each(?1))",
            cols.join(", "),
            quote_ident(table),
            quote_ident(&spec.columns[column].name)
        );
        let mut params = vec![rusqlite::types::Value::Text(list)];
        for (col, v) in eq {
            params.push(to_sql(v));
            sql.push_str(&format!(
                " AND {} = ?{}",
                quote_ident(&spec.columns[*col].name),
                params.len()
            ));
        }
        self.query_rows(spec, &sql, &params).map(Some)
    }

    fn ordered_rows(
        &self,
        table: &str,
        eq: &[(usize, Value)],
        order: &[(usize, Direction)],
        cursor: Option<(&[Value], bool)>,
        limit: usize,
    ) -> Result<Option<Vec<Row>>, ReplicaError> {
        let spec = self
            .tables
            .get(table)
            .ok_or_else(|| ReplicaError::UnknownTable(table.to_string()))?;
        let out_of_range = |c: usize| c >= spec.columns.len();
        if order
            .iter()
            .any(|(c, _)| out_of_range(*c) || spec.columns[*c].kind == ColumnKind::Json)
            || eq.iter().any(|(c, _)| out_of_range(*c))
            || cursor.is_some_and(|(v, _)| v.len() != order.len())
        {
            return Ok(None); // JSON has no order; the rest is a caller's mistake
        }
        if eq.iter().any(|(_, v)| v.is_null()) {
            return Ok(Some(Vec::new()));
        }
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let mut params: Vec<rusqlite::types::Value> = Vec::new();
        let mut terms: Vec<String> = Vec::new();
        for (col, v) in eq {
            params.push(to_sql(v));
            terms.push(format!(
                "{} = ?{}",
                quote_ident(&spec.columns[*col].name),
                params.len()
            ));
        }
        if let Some((values, inclusive)) = cursor {
            terms.push(cursor_sql(spec, order, values, inclusive, &mut params));
        }
        let order_by: Vec<String> = order
            .iter()
            .map(|(c, d)| {
                let dir = if *d == Direction::Desc { "DESC" } else { "ASC" };
                format!("{} {dir}", quote_ident(&spec.columns[*c].name))
            })
            .collect();
        let mut sql = format!("SELECT {} FROM {}", cols.join(", "), quote_ident(table));
        if !terms.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&terms.join(" AND "));
        }
        if !order_by.is_empty() {
            sql.push_str(" ORDER BY ");
            sql.push_str(&order_by.join(", "));
        }
        params.push(rusqlite::types::Value::Integer(
            i64::try_from(limit).unwrap_or(i64::MAX),
        ));
        sql.push_str(&format!(" LIMIT ?{}", params.len()));
        self.query_rows(spec, &sql, &params).map(Some)
    }
}

impl crate::zql::Source for ReplicaReader {
    fn fetch_in(
        &self,
        table: &str,
        column: usize,
        values: &[Value],
        eq: &[(usize, Value)],
    ) -> Result<Option<Vec<Row>>, crate::zql::ZqlError> {
        self.rows_in(table, column, values, eq)
            .map_err(|e| match e {
                ReplicaError::UnknownTable(t) => crate::zql::ZqlError::UnknownTable(t),
                other => crate::zql::ZqlError::Source(other.to_string()),
            })
    }

    fn fetch_ordered(
        &self,
        table: &str,
        eq: &[(usize, Value)],
        order: &[(usize, Direction)],
        cursor: Option<(&[Value], bool)>,
        limit: usize,
    ) -> Result<Option<Vec<Row>>, crate::zql::ZqlError> {
        self.ordered_rows(table, eq, order, cursor, limit)
            .map_err(|e| match e {
                ReplicaError::UnknownTable(t) => crate::zql::ZqlError::UnknownTable(t),
                other => crate::zql::ZqlError::Source(other.to_string()),
            })
    }

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

    use crate::zql::plan::compare_rows;
    use crate::zql::Source;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            1 => Just(Value::Null),
            3 => (0..4i64).prop_map(Value::Int),
        ]
    }

    fn text() -> impl Strategy<Value = Value> {
        prop_oneof![
            1 => Just(Value::Null),
            3 => proptest::sample::select(vec!["", "a", "ab", "B", "é", "😀", "z"])
                .prop_map(|s| Value::Text(s.to_string())),
        ]
    }

    fn direction() -> impl Strategy<Value = Direction> {
        prop_oneof![Just(Direction::Asc), Just(Direction::Desc)]
    }

    /// The reference: every row, sorted with the client's comparator, from the cursor on.
    fn expected(
        rows: &[Row],
        order: &[(usize, Direction)],
        cursor: Option<(&[Value], bool)>,
        limit: usize,
    ) -> Vec<Row> {
        let mut all: Vec<Row> = rows.to_vec();
        all.sort_by(|a, b| compare_rows(order, a, b));
        all.retain(|r| match cursor {
            None => true,
            Some((values, inclusive)) => {
                let mut probe = r.clone();
                for ((c, _), v) in order.iter().zip(values) {
                    probe[*c] = v.clone();
                }
                match compare_rows(order, r, &probe) {
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Equal => inclusive,
                    std::cmp::Ordering::Less => false,
                }
            }
        });
        all.truncate(limit);
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// SQL ORDER BY with the cursor expansion reads rows in exactly the client's order
        /// (nulls lowest, strings by UTF-8 bytes, mixed directions) from exactly the cursor.
        #[test]
        fn ordered_fetch_matches_the_client_ordering(
            rows in proptest::collection::vec((value(), text(), value()), 0..40),
            dirs in (direction(), direction(), direction()),
            perm in 0..6usize,
            cursor in proptest::option::of(((value(), text(), value()), any::<bool>())),
            limit in 0..50usize,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("r.db");
            let mut w = Replica::open(&path).expect("open");
            let col = |name: &str, kind, pg_type_oid| ColumnSpec { name: name.into(), kind, pg_type_oid };
            let spec = TableSpec {
                name: "t".into(),
                columns: vec![
                    col("id", ColumnKind::Number, 20),
                    col("a", ColumnKind::Number, 20),
                    col("s", ColumnKind::String, 25),
                    col("b", ColumnKind::Number, 20),
                ],
                primary_key: vec![0],
            };
            w.create_table(&spec).expect("create");
            w.begin().expect("begin");
            let rows: Vec<Row> = rows
                .into_iter()
                .enumerate()
                .map(|(i, (a, s, b))| vec![Value::Int(i as i64), a, s, b])
                .collect();
            for row in &rows {
                w.upsert("t", row).expect("upsert");
            }
            w.commit(1).expect("commit");
            let orders = [[1, 2, 3], [2, 1, 3], [3, 2, 1], [1, 3, 2], [2, 3, 1], [3, 1, 2]];
            let cols = orders[perm];
            // The key last, as completed orderings end.
            let order = vec![(cols[0], dirs.0), (cols[1], dirs.1), (cols[2], dirs.2), (0, Direction::Asc)];
            let cursor_values: Option<(Vec<Value>, bool)> = cursor.map(|((a, s, b), inc)| {
                let row = [Value::Int(7), a, s, b];
                (order.iter().map(|(c, _)| row[*c].clone()).collect(), inc)
            });
            let cursor = cursor_values.as_ref().map(|(v, inc)| (v.as_slice(), *inc));
            let r = ReplicaReader::open(&path).expect("reader");
            r.begin_snapshot().expect("snapshot");
            let got = r
                .fetch_ordered("t", &[], &order, cursor, limit)
                .expect("fetch")
                .expect("ordered");
            r.end_snapshot().expect("end");
            prop_assert_eq!(got, expected(&rows, &order, cursor, limit));
        }
    }
}
