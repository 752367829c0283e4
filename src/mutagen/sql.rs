//! The SQL of CRUD mutations (legacy-features.md §3.4), rendered as text for the simple
//! query protocol, since zcache's Postgres client has no parameters.
//!
//! Literals: every value is a single-quoted *untyped* literal, so Postgres coerces it to the
//! column's type as it does postgres.js's untyped parameters (`'abc'` into an integer column
//! gives `invalid input syntax for type integer: "abc"`). They are standard strings: only `'`
//! is special and is doubled; a backslash stands for itself. That is right only with
//! `standard_conforming_strings = on`, Postgres's default since 9.1, which the pool sets on
//! every connection it opens (`apply.rs`), so a server or role configured otherwise cannot
//! turn a backslash into an escape. NUL cannot be sent in a query nor stored in Postgres text,
//! so a value or name holding one is refused here with a clear error.

use crate::protocol::crud::{CrudArgs, CrudOp};
use serde_json::Value as Json;
use std::fmt::Write as _;

/// Why a mutation could not be rendered; the mutation then fails (`MutationFailed`, lmid bumped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("{what} holds a NUL character, which Postgres cannot store in text")]
    Nul { what: String },
    #[error("Primary key column '{column}' is missing from operation value for table {table}")]
    KeyMissing { table: String, column: String },
    #[error(
        "The {op} of table {table}: primary key column '{column}' must be a string, number or boolean, not {found}"
    )]
    KeyType {
        table: String,
        column: String,
        op: &'static str,
        found: &'static str,
    },
}

/// `"name"`, with embedded quotes doubled.
pub fn ident(name: &str) -> Result<String, RenderError> {
    if name.contains('\0') {
        return Err(RenderError::Nul {
            what: format!("the name {:?}", name.replace('\0', "\\0")),
        });
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// A table name as postgres.js renders an identifier: each `.` separates a qualifier, so
/// `s.t` is `"s"."t"`. (Column names are quoted whole: a `.` in one is part of the name.)
pub fn table(name: &str) -> Result<String, RenderError> {
    let parts = name.split('.').map(ident).collect::<Result<Vec<_>, _>>()?;
    Ok(parts.join("."))
}

/// A standard string literal: `'` doubled, nothing else escaped (see the module comment).
pub fn literal(s: &str) -> Result<String, RenderError> {
    if s.contains('\0') {
        return Err(RenderError::Nul {
            what: "a value".into(),
        });
    }
    Ok(format!("'{}'", s.replace('\'', "''")))
}

/// A column value: NULL, or an untyped literal of its text (JSON objects and arrays as their
/// JSON text; booleans and numbers as JSON writes them).
pub fn value(v: &Json) -> Result<String, RenderError> {
    match v {
        Json::Null => Ok("NULL".into()),
        Json::String(s) => literal(s),
        Json::Bool(b) => literal(if *b { "true" } else { "false" }),
        Json::Number(n) => literal(&n.to_string()),
        // serde_json escapes control characters, so this text holds no raw NUL.
        Json::Array(_) | Json::Object(_) => literal(&v.to_string()),
    }
}

/// The statement that bumps the client's last mutation ID and returns the new one.
pub fn lmid(shard_schema: &str, group: &str, client: &str) -> Result<String, RenderError> {
    Ok(format!(
        "INSERT INTO {}.clients as current (\"clientGroupID\",\"clientID\",\"lastMutationID\") \
         VALUES ({},{},1) ON CONFLICT (\"clientGroupID\",\"clientID\") \
         DO UPDATE SET \"lastMutationID\" = current.\"lastMutationID\" + 1 \
         RETURNING \"lastMutationID\"",
        ident(shard_schema)?,
        literal(group)?,
        literal(client)?,
    ))
}

/// One statement per op, each ended by `;`, in order.
pub fn ops(ops: &[CrudOp]) -> Result<String, RenderError> {
    let mut sql = String::new();
    for o in ops {
        sql.push_str(&op(o)?);
        sql.push(';');
    }
    Ok(sql)
}

/// The statement of one op.
pub fn op(op: &CrudOp) -> Result<String, RenderError> {
    match op {
        CrudOp::Insert(a) => Ok(format!("{} DO NOTHING", insert_head(a)?)),
        CrudOp::Upsert(a) => Ok(format!(
            "{} DO UPDATE SET {}",
            insert_head(a)?,
            assignments(a)?
        )),
        CrudOp::Update(a) => Ok(format!(
            "UPDATE {} SET {} WHERE {}",
            table(&a.table_name)?,
            assignments(a)?,
            key_condition(a, "update")?
        )),
        CrudOp::Delete(a) => Ok(format!(
            "DELETE FROM {} WHERE {}",
            table(&a.table_name)?,
            key_condition(a, "delete")?
        )),
    }
}

/// `INSERT INTO "t" ("c1","c2") VALUES ('v1','v2') ON CONFLICT ("pk1")`.
fn insert_head(a: &CrudArgs) -> Result<String, RenderError> {
    let columns = a
        .value
        .keys()
        .map(|c| ident(c))
        .collect::<Result<Vec<_>, _>>()?;
    let values = a.value.values().map(value).collect::<Result<Vec<_>, _>>()?;
    let key = a
        .primary_key
        .iter()
        .map(|c| ident(c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({})",
        table(&a.table_name)?,
        columns.join(","),
        values.join(","),
        key.join(",")
    ))
}

/// `"c1"='v1',"c2"='v2'`: every column of the value, primary key columns included.
fn assignments(a: &CrudArgs) -> Result<String, RenderError> {
    let mut out = String::new();
    for (i, (c, v)) in a.value.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, "{sep}{}={}", ident(c)?, value(v)?);
    }
    Ok(out)
}

/// `"pk1" = 'a' AND "pk2" = 'b'`. Key values must be strings, numbers or booleans
/// (zero-cache's mutagen.ts:409-424 parses them so).
fn key_condition(a: &CrudArgs, op: &'static str) -> Result<String, RenderError> {
    let mut out = String::new();
    for (i, c) in a.primary_key.iter().enumerate() {
        let v = match a.value.get(c) {
            None => {
                return Err(RenderError::KeyMissing {
                    table: a.table_name.clone(),
                    column: c.clone(),
                })
            }
            Some(v @ (Json::String(_) | Json::Number(_) | Json::Bool(_))) => v,
            Some(other) => {
                return Err(RenderError::KeyType {
                    table: a.table_name.clone(),
                    column: c.clone(),
                    op,
                    found: json_type(other),
                })
            }
        };
        let sep = if i == 0 { "" } else { " AND " };
        let _ = write!(out, "{sep}{} = {}", ident(c)?, value(v)?);
    }
    Ok(out)
}

fn json_type(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(table: &str, pk: &[&str], value: Json) -> CrudArgs {
        CrudArgs {
            table_name: table.into(),
            primary_key: pk.iter().map(|s| s.to_string()).collect(),
            value: value.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("a\"b").unwrap(), "\"a\"\"b\"");
        assert_eq!(ident("Issue").unwrap(), "\"Issue\"");
        assert_eq!(literal("it's").unwrap(), "'it''s'");
        // Standard strings: a backslash is itself, not an escape.
        assert_eq!(literal("a\\'b").unwrap(), "'a\\''b'");
        assert!(matches!(literal("a\0b"), Err(RenderError::Nul { .. })));
        assert!(matches!(ident("a\0b"), Err(RenderError::Nul { .. })));
        assert_eq!(table("s.t").unwrap(), "\"s\".\"t\"");
        assert_eq!(table("a\".b").unwrap(), "\"a\"\"\".\"b\"");
        assert_eq!(table("issue").unwrap(), "\"issue\"");
    }

    #[test]
    fn values() {
        assert_eq!(value(&json!(null)).unwrap(), "NULL");
        assert_eq!(value(&json!(true)).unwrap(), "'true'");
        assert_eq!(value(&json!(false)).unwrap(), "'false'");
        assert_eq!(value(&json!(42)).unwrap(), "'42'");
        assert_eq!(value(&json!(-1.5)).unwrap(), "'-1.5'");
        assert_eq!(value(&json!("x'y")).unwrap(), "'x''y'");
        assert_eq!(
            value(&json!({"a": "it's", "b": [1, 2]})).unwrap(),
            r#"'{"a":"it''s","b":[1,2]}'"#
        );
        assert_eq!(value(&json!([1, "a"])).unwrap(), r#"'[1,"a"]'"#);
        // A NUL in JSON is escaped by serde_json, not sent raw.
        assert_eq!(
            value(&json!({"a": "\u{0}"})).unwrap(),
            r#"'{"a":"\u0000"}'"#
        );
        assert!(value(&json!("a\u{0}")).is_err());
    }

    #[test]
    fn lmid_statement() {
        assert_eq!(
            lmid("zero_0", "cg'1", "c1").unwrap(),
            "INSERT INTO \"zero_0\".clients as current (\"clientGroupID\",\"clientID\",\"lastMutationID\") \
             VALUES ('cg''1','c1',1) ON CONFLICT (\"clientGroupID\",\"clientID\") \
             DO UPDATE SET \"lastMutationID\" = current.\"lastMutationID\" + 1 \
             RETURNING \"lastMutationID\""
        );
    }

    #[test]
    fn each_op() {
        let v = json!({"id": "i1", "title": "x", "n": 3});
        assert_eq!(
            op(&CrudOp::Insert(args("issue", &["id"], v.clone()))).unwrap(),
            r#"INSERT INTO "issue" ("id","title","n") VALUES ('i1','x','3') ON CONFLICT ("id") DO NOTHING"#
        );
        assert_eq!(
            op(&CrudOp::Upsert(args("s.issue", &["id", "n"], v.clone()))).unwrap(),
            r#"INSERT INTO "s"."issue" ("id","title","n") VALUES ('i1','x','3') ON CONFLICT ("id","n") DO UPDATE SET "id"='i1',"title"='x',"n"='3'"#
        );
        assert_eq!(
            op(&CrudOp::Update(args("issue", &["id", "n"], v.clone()))).unwrap(),
            r#"UPDATE "issue" SET "id"='i1',"title"='x',"n"='3' WHERE "id" = 'i1' AND "n" = '3'"#
        );
        assert_eq!(
            op(&CrudOp::Delete(args("issue", &["id"], json!({"id": "i1"})))).unwrap(),
            r#"DELETE FROM "issue" WHERE "id" = 'i1'"#
        );
        assert_eq!(
            op(&CrudOp::Delete(args("t", &["b"], json!({"b": true})))).unwrap(),
            r#"DELETE FROM "t" WHERE "b" = 'true'"#
        );
        let two = [
            CrudOp::Delete(args("t", &["id"], json!({"id": 1}))),
            CrudOp::Delete(args("t", &["id"], json!({"id": 2}))),
        ];
        assert_eq!(
            ops(&two).unwrap(),
            r#"DELETE FROM "t" WHERE "id" = '1';DELETE FROM "t" WHERE "id" = '2';"#
        );
    }

    #[test]
    fn key_values_must_be_scalars() {
        let bad = CrudOp::Update(args("issue", &["id"], json!({"id": {"x": 1}, "t": 1})));
        assert_eq!(
            op(&bad).unwrap_err().to_string(),
            "The update of table issue: primary key column 'id' must be a string, number or boolean, not an object"
        );
        let null = CrudOp::Delete(args("issue", &["id"], json!({"id": null})));
        assert!(matches!(op(&null), Err(RenderError::KeyType { .. })));
        let missing = CrudOp::Delete(args("issue", &["id"], json!({"x": 1})));
        assert_eq!(
            op(&missing).unwrap_err().to_string(),
            "Primary key column 'id' is missing from operation value for table issue"
        );
        // Inserts and upserts leave key checks to Postgres.
        let ins = CrudOp::Insert(args("issue", &["id"], json!({"id": null})));
        assert!(op(&ins).is_ok());
    }
}
