//! What the replica knows about a table: its columns, their kinds and its primary key.

/// The client-facing kind of a column (`zero-protocol` client schema `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    String,
    Number,
    Boolean,
    Json,
    Null,
}

impl ColumnKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnKind::String => "string",
            ColumnKind::Number => "number",
            ColumnKind::Boolean => "boolean",
            ColumnKind::Json => "json",
            ColumnKind::Null => "null",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSpec {
    pub name: String,
    pub kind: ColumnKind,
    /// Upstream Postgres type OID, kept to decode replication values.
    pub pg_type_oid: u32,
}

/// A replicated table. `name` is the name the client uses: the upstream table name for
/// tables in `public`, else `schema.table` (as zero-cache names them).
#[derive(Debug, Clone, PartialEq)]
pub struct TableSpec {
    pub name: String,
    pub columns: Vec<ColumnSpec>,
    /// Positions of the primary-key columns in `columns`, in key order.
    pub primary_key: Vec<usize>,
}

impl TableSpec {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}
