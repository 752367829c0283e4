//! The reference kit's data (its setup.sh): table specs and rows as the kit seeds them,
//! shared by the benchmarks.

#![allow(dead_code)] // each benchmark uses its own part

use zcache::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use zcache::zql::value::{Row, Value};

pub const ISSUES: u32 = 10_000;
pub const COMMENTS: u32 = 50_000;
pub const USERS: u32 = 100;
pub const STATUSES: [&str; 3] = ["open", "closed", "in_progress"];
pub const CREATED_BASE_MS: i64 = 1_700_000_000_000;

/// Postgres type OIDs of the kit's columns.
pub const TEXT_OID: u32 = 25;
pub const INT4_OID: u32 = 23;
pub const INT8_OID: u32 = 20;

pub fn column(name: &str, kind: ColumnKind, pg_type_oid: u32) -> ColumnSpec {
    ColumnSpec {
        name: name.into(),
        kind,
        pg_type_oid,
    }
}

/// `issue(id text pk, title text, status text, priority int, created bigint, owner_id text)`.
pub fn issue_spec() -> TableSpec {
    TableSpec {
        name: "issue".into(),
        columns: vec![
            column("id", ColumnKind::String, TEXT_OID),
            column("title", ColumnKind::String, TEXT_OID),
            column("status", ColumnKind::String, TEXT_OID),
            column("priority", ColumnKind::Number, INT4_OID),
            column("created", ColumnKind::Number, INT8_OID),
            column("owner_id", ColumnKind::String, TEXT_OID),
        ],
        primary_key: vec![0],
    }
}

/// `comment(id text pk, issue_id text, body text, created bigint)`.
pub fn comment_spec() -> TableSpec {
    TableSpec {
        name: "comment".into(),
        columns: vec![
            column("id", ColumnKind::String, TEXT_OID),
            column("issue_id", ColumnKind::String, TEXT_OID),
            column("body", ColumnKind::String, TEXT_OID),
            column("created", ColumnKind::Number, INT8_OID),
        ],
        primary_key: vec![0],
    }
}

/// Issue `i` exactly as setup.sh seeds it.
pub fn issue_row(i: u32) -> Row {
    vec![
        Value::Text(format!("i{i}")),
        Value::Text(format!("Issue title {i}")),
        Value::Text(STATUSES[(i % 3) as usize].into()),
        Value::Int(i64::from(i % 5)),
        Value::Int(CREATED_BASE_MS + i64::from(i) * 1000),
        Value::Text(format!("u{}", 1 + i % USERS)),
    ]
}

/// Comment `i` exactly as setup.sh seeds it.
pub fn comment_row(i: u32) -> Row {
    vec![
        Value::Text(format!("c{i}")),
        Value::Text(format!("i{}", 1 + i % ISSUES)),
        Value::Text(format!("Comment body {i}")),
        Value::Int(CREATED_BASE_MS + i64::from(i) * 100),
    ]
}
