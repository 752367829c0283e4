//! The client schema zero-cache requires in a group's first initConnection, derived from the
//! upstream database's tables in `public` (columns and primary keys).

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::{json, Map, Value};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ValueType {
    String,
    Number,
    Boolean,
    Json,
}

impl ValueType {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::String => "string",
            ValueType::Number => "number",
            ValueType::Boolean => "boolean",
            ValueType::Json => "json",
        }
    }
}

/// Postgres type (by `pg_type.typname` and `typcategory`) to the value type zero syncs it as;
/// `None` for types zero-cache does not sync (bytea, intervals, geometric, ...), which are left
/// out of the client schema.
pub fn map_pg_type(typname: &str, typcategory: &str) -> Option<ValueType> {
    match typname {
        "json" | "jsonb" => return Some(ValueType::Json),
        "bool" => return Some(ValueType::Boolean),
        "uuid" | "inet" | "cidr" | "macaddr" | "macaddr8" => return Some(ValueType::String),
        "bytea" | "interval" => return None,
        _ => {}
    }
    match typcategory {
        // arrays
        "A" => Some(ValueType::Json),
        // int2/4/8, float4/8, numeric, oid
        "N" => Some(ValueType::Number),
        // date, time, timestamp, timestamptz: epoch milliseconds
        "D" => Some(ValueType::Number),
        // text, varchar, char, name; enums
        "S" | "E" => Some(ValueType::String),
        "B" => Some(ValueType::Boolean),
        _ => None,
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableSchema {
    pub columns: BTreeMap<String, ValueType>,
    /// `format_type` of every column, for casts in the writer's SQL.
    pub pg_types: BTreeMap<String, String>,
    pub primary_key: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientSchema {
    pub tables: BTreeMap<String, TableSchema>,
}

impl ClientSchema {
    /// `{tables: {t: {columns: {c: {type}}, primaryKey: [..]}}}` as in zero-protocol's
    /// client-schema.ts. Tables without a primary key are left out (zero-cache refuses them).
    pub fn to_json(&self) -> Value {
        let mut tables = Map::new();
        for (name, t) in &self.tables {
            if t.primary_key.is_empty() || !t.primary_key.iter().all(|k| t.columns.contains_key(k))
            {
                continue;
            }
            let mut cols = Map::new();
            for (c, ty) in &t.columns {
                cols.insert(c.clone(), json!({"type": ty.as_str()}));
            }
            tables.insert(
                name.clone(),
                json!({"columns": Value::Object(cols), "primaryKey": t.primary_key}),
            );
        }
        json!({"tables": Value::Object(tables)})
    }

    pub fn add_column(
        &mut self,
        table: &str,
        column: &str,
        typname: &str,
        category: &str,
        formatted: &str,
    ) {
        let t = self.tables.entry(table.to_string()).or_default();
        if let Some(ty) = map_pg_type(typname, category) {
            t.columns.insert(column.to_string(), ty);
            t.pg_types.insert(column.to_string(), formatted.to_string());
        }
    }
}

const COLUMNS_SQL: &str = "
SELECT c.relname::text, a.attname::text, t.typname::text, t.typcategory::text,
       format_type(a.atttypid, a.atttypmod)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum";

const PRIMARY_KEYS_SQL: &str = "
SELECT c.relname::text, a.attname::text
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE n.nspname = 'public' AND i.indisprimary
ORDER BY c.relname, k.ord";

pub async fn load_client_schema(pg: &tokio_postgres::Client) -> anyhow::Result<ClientSchema> {
    let mut schema = ClientSchema::default();
    for row in pg
        .query(COLUMNS_SQL, &[])
        .await
        .context("reading columns")?
    {
        schema.add_column(
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
        );
    }
    for row in pg
        .query(PRIMARY_KEYS_SQL, &[])
        .await
        .context("reading primary keys")?
    {
        let table: &str = row.try_get(0)?;
        let column: &str = row.try_get(1)?;
        if let Some(t) = schema.tables.get_mut(table) {
            t.primary_key.push(column.to_string());
        }
    }
    Ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_types_map_to_zero_value_types() {
        let cases = [
            ("text", "S", Some(ValueType::String)),
            ("varchar", "S", Some(ValueType::String)),
            ("bpchar", "S", Some(ValueType::String)),
            ("uuid", "U", Some(ValueType::String)),
            ("mood", "E", Some(ValueType::String)),
            ("int4", "N", Some(ValueType::Number)),
            ("int8", "N", Some(ValueType::Number)),
            ("float8", "N", Some(ValueType::Number)),
            ("numeric", "N", Some(ValueType::Number)),
            ("timestamptz", "D", Some(ValueType::Number)),
            ("timestamp", "D", Some(ValueType::Number)),
            ("date", "D", Some(ValueType::Number)),
            ("bool", "B", Some(ValueType::Boolean)),
            ("json", "U", Some(ValueType::Json)),
            ("jsonb", "U", Some(ValueType::Json)),
            ("_int4", "A", Some(ValueType::Json)),
            ("_text", "A", Some(ValueType::Json)),
            ("bytea", "U", None),
            ("interval", "T", None),
            ("point", "G", None),
        ];
        for (name, cat, want) in cases {
            assert_eq!(map_pg_type(name, cat), want, "{name}");
        }
    }

    #[test]
    fn client_schema_json_shape() {
        let mut s = ClientSchema::default();
        s.add_column("issue", "id", "text", "S", "text");
        s.add_column("issue", "priority", "int4", "N", "integer");
        s.add_column("issue", "blob", "bytea", "U", "bytea");
        s.tables.get_mut("issue").unwrap().primary_key = vec!["id".into()];
        s.add_column("nopk", "x", "text", "S", "text");
        assert_eq!(
            s.to_json(),
            json!({"tables": {"issue": {
                "columns": {"id": {"type": "string"}, "priority": {"type": "number"}},
                "primaryKey": ["id"]}}})
        );
        assert_eq!(s.tables["issue"].pg_types["priority"], "integer");
    }

    /// Against a real PostgreSQL seeded by the reference kit's setup.sh:
    /// `LOADTEST_PG_URL=postgres://postgres@127.0.0.1:55440/zbench cargo test -p zcache-loadtest -- --ignored`
    #[tokio::test]
    #[ignore = "needs LOADTEST_PG_URL pointing at the reference kit's database"]
    async fn derives_the_kit_schema_from_postgres() {
        let url = std::env::var("LOADTEST_PG_URL").expect("set LOADTEST_PG_URL");
        let pg = crate::writer::connect(&url).await.unwrap();
        let schema = load_client_schema(&pg).await.unwrap().to_json();
        assert_eq!(
            schema["tables"]["issue"],
            json!({"columns": {
                "created": {"type": "number"}, "id": {"type": "string"},
                "owner_id": {"type": "string"}, "priority": {"type": "number"},
                "status": {"type": "string"}, "title": {"type": "string"}},
              "primaryKey": ["id"]})
        );
        assert_eq!(
            schema["tables"]["user"],
            json!({"columns": {"id": {"type": "string"}, "name": {"type": "string"}},
              "primaryKey": ["id"]})
        );
        assert_eq!(schema["tables"]["comment"]["primaryKey"], json!(["id"]));
    }
}
