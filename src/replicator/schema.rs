//! What the publications publish: tables, their columns with types, primary keys and
//! indexes, read from the catalog (inside the initial sync's snapshot).

use super::setup::{quote_ident, quote_literal};
use crate::pgrepl::{PgConn, PgError};
use crate::sqlite::pgtypes::column_kind;
use crate::zql::schema::{ColumnSpec, TableSpec};
use futures_lite::io::{AsyncRead, AsyncWrite};

/// A published upstream table and how the replica holds it.
#[derive(Debug, Clone)]
pub struct PublishedTable {
    pub schema: String,
    pub name: String,
    pub spec: TableSpec,
    /// Column lists of the table's other indexes, copied to the replica.
    pub indexes: Vec<Vec<String>>,
    /// The planner's row estimate (`pg_class.reltuples`; 0 when never analyzed), for progress.
    pub rows_estimate: u64,
    /// The heap's size on disk, which orders the copies: largest first.
    pub heap_bytes: u64,
}

impl PublishedTable {
    pub fn upstream_ident(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// zero-cache's names: tables of `public` keep their name, others are `schema.table`.
pub fn replica_table_name(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_string()
    } else {
        format!("{schema}.{table}")
    }
}

fn cell(row: &[Option<String>], i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

pub async fn published_tables<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<S>,
    publications: &[String],
) -> Result<Vec<PublishedTable>, PgError> {
    let names: Vec<String> = publications.iter().map(|p| quote_literal(p)).collect();
    let sql = format!(
        "SELECT DISTINCT schemaname, tablename FROM pg_publication_tables WHERE pubname IN ({}) ORDER BY 1, 2",
        names.join(", ")
    );
    let tables: Vec<(String, String)> = conn
        .simple_query(&sql)
        .await?
        .into_iter()
        .flat_map(|r| r.rows)
        .map(|r| (cell(&r, 0), cell(&r, 1)))
        .collect();
    let mut out = Vec::with_capacity(tables.len());
    for (schema, name) in tables {
        match describe(conn, &schema, &name).await? {
            Some(t) => out.push(t),
            None => {
                tracing::warn!(table = %format!("{schema}.{name}"), "not synced: it has no primary key")
            }
        }
    }
    Ok(out)
}

async fn describe<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut PgConn<S>,
    schema: &str,
    name: &str,
) -> Result<Option<PublishedTable>, PgError> {
    let rel = quote_literal(&format!("{}.{}", quote_ident(schema), quote_ident(name)));
    let cols_sql = format!(
        "SELECT a.attname, a.atttypid, t.typcategory = 'A', a.attnum FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = {rel}::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
    );
    let mut columns = Vec::new();
    let mut attnums = Vec::new();
    for r in conn
        .simple_query(&cols_sql)
        .await?
        .into_iter()
        .flat_map(|r| r.rows)
    {
        let (col, oid, is_array) = (
            cell(&r, 0),
            cell(&r, 1).parse().unwrap_or(0),
            cell(&r, 2) == "t",
        );
        match column_kind(oid, is_array) {
            Some(kind) => {
                columns.push(ColumnSpec {
                    name: col,
                    kind,
                    pg_type_oid: oid,
                });
                attnums.push(cell(&r, 3));
            }
            None => {
                tracing::warn!(table = name, column = %col, type_oid = oid, "column not synced: unsupported type")
            }
        }
    }
    let idx_sql = format!(
        "SELECT i.indisprimary, array_to_string(array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o), ',')
         FROM pg_index i WHERE i.indrelid = {rel}::regclass AND i.indexprs IS NULL AND i.indpred IS NULL
         ORDER BY NOT i.indisprimary, i.indexrelid"
    );
    let mut primary_key = None;
    let mut indexes = Vec::new();
    for r in conn
        .simple_query(&idx_sql)
        .await?
        .into_iter()
        .flat_map(|r| r.rows)
    {
        let cols: Vec<String> = cell(&r, 1).split(',').map(str::to_string).collect();
        if cell(&r, 0) == "t" {
            primary_key = Some(cols);
        } else {
            indexes.push(cols);
        }
    }
    let Some(pk_names) = primary_key else {
        return Ok(None);
    };
    let primary_key: Option<Vec<usize>> = pk_names
        .iter()
        .map(|n| columns.iter().position(|c: &ColumnSpec| &c.name == n))
        .collect();
    let Some(primary_key) = primary_key else {
        return Ok(None);
    };
    let size_sql = format!(
        "SELECT greatest(c.reltuples, 0)::int8, pg_relation_size(c.oid) FROM pg_class c WHERE c.oid = {rel}::regclass"
    );
    let size = conn.simple_query(&size_sql).await?;
    let size_row = size.iter().flat_map(|r| r.rows.iter()).next();
    let number = |i: usize| {
        size_row
            .map(|r| cell(r, i))
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Some(PublishedTable {
        rows_estimate: number(0),
        heap_bytes: number(1),
        schema: schema.to_string(),
        name: name.to_string(),
        spec: TableSpec {
            name: replica_table_name(schema, name),
            columns,
            primary_key,
        },
        indexes,
    }))
}
