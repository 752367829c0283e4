//! The client's schema checked against the replica, as zero-cache does at pipeline start
//! (zero-protocol.md §4): every client table replicated, every client column replicated with
//! the same value type, and the client's primary key the table's. Every mismatch is named,
//! one per line, in a single `SchemaVersionNotSupported` error.

use crate::protocol::{ErrorKind, ProtocolError};
use crate::zql::schema::TableSpec;
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// Checks `client_schema` (`{tables: {name: {columns: {col: {type}}, primaryKey}}}`) against
/// the replicated tables. `internal_prefixes` are the app and shard schemas' table-name
/// prefixes (`zero.`, `zero_0.`), left out of the list of tables an error offers.
pub fn check(
    client_schema: &Json,
    replicated: &BTreeMap<String, Rc<TableSpec>>,
    internal_prefixes: &[String],
) -> Result<(), ProtocolError> {
    if replicated.is_empty() {
        return Err(ProtocolError::new(
            ErrorKind::Internal,
            "No tables have been synced from upstream. Please check that the \
             ZERO_UPSTREAM_DB has been properly set.",
        ));
    }
    let Some(tables) = client_schema.get("tables").and_then(Json::as_object) else {
        return Err(ProtocolError::new(
            ErrorKind::InvalidConnectionRequest,
            "the client schema has no tables object",
        ));
    };
    let mut errors = Vec::new();
    let mut names: Vec<&String> = tables.keys().collect();
    names.sort();
    for name in names {
        match replicated.get(name.as_str()) {
            None => errors.push(missing_table(name, replicated, internal_prefixes)),
            Some(spec) => check_table(name, &tables[name.as_str()], spec, &mut errors),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorKind::SchemaVersionNotSupported,
            errors.join("\n"),
        ))
    }
}

fn missing_table(
    name: &str,
    replicated: &BTreeMap<String, Rc<TableSpec>>,
    internal_prefixes: &[String],
) -> String {
    let synced: Vec<String> = replicated
        .keys()
        .filter(|t| !internal_prefixes.iter().any(|p| t.starts_with(p.as_str())))
        .map(|t| format!("\"{t}\""))
        .collect();
    let synced = synced.join(",");
    let tip = if name.contains('.') && !synced.contains('.') {
        " Note that zero does not sync tables from non-public schemas by default. Make sure \
         you have defined a custom ZERO_APP_PUBLICATION to sync tables from non-public schemas."
    } else {
        ""
    };
    format!("The \"{name}\" table does not exist or is not one of the replicated tables: {synced}.{tip}")
}

fn check_table(name: &str, client: &Json, spec: &TableSpec, errors: &mut Vec<String>) {
    let columns = client.get("columns").and_then(Json::as_object);
    let mut client_columns: Vec<&String> = columns.map(|c| c.keys().collect()).unwrap_or_default();
    client_columns.sort();
    for column in client_columns {
        let Some(server) = spec.columns.iter().find(|c| &c.name == column) else {
            let mut replicated: Vec<String> = spec
                .columns
                .iter()
                .map(|c| format!("\"{}\"", c.name))
                .collect();
            replicated.sort();
            errors.push(format!(
                "The \"{name}\".\"{column}\" column does not exist or is not one of the \
                 replicated columns: {}.",
                replicated.join(",")
            ));
            continue;
        };
        let client_type = columns
            .and_then(|c| c.get(column.as_str()))
            .and_then(|c| c.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("");
        if client_type != server.kind.as_str() {
            errors.push(format!(
                "The \"{name}\".\"{column}\" column's upstream type \"{}\" does not match the \
                 client type \"{client_type}\"",
                server.kind.as_str()
            ));
        }
    }
    match client.get("primaryKey").and_then(Json::as_array) {
        None => errors.push(format!(
            "The \"{name}\" table's client schema does not specify a primary key."
        )),
        Some(pk) => {
            let client_pk: BTreeSet<&str> = pk.iter().filter_map(Json::as_str).collect();
            let server_pk: BTreeSet<&str> = spec
                .primary_key
                .iter()
                .map(|&i| spec.columns[i].name.as_str())
                .collect();
            if client_pk != server_pk {
                let listed: Vec<&str> = pk.iter().filter_map(Json::as_str).collect();
                errors.push(format!(
                    "The \"{name}\" table's primaryKey <{}> is not associated with a non-null \
                     unique index.",
                    listed.join(",")
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zql::schema::{ColumnKind, ColumnSpec};
    use serde_json::json;

    fn replicated() -> BTreeMap<String, Rc<TableSpec>> {
        let col = |name: &str, kind| ColumnSpec {
            name: name.into(),
            kind,
            pg_type_oid: 25,
        };
        let issue = TableSpec {
            name: "issue".into(),
            columns: vec![
                col("id", ColumnKind::String),
                col("title", ColumnKind::String),
                col("created", ColumnKind::Number),
            ],
            primary_key: vec![0],
        };
        let clients = TableSpec {
            name: "zero_0.clients".into(),
            columns: vec![col("clientID", ColumnKind::String)],
            primary_key: vec![0],
        };
        [issue, clients]
            .into_iter()
            .map(|t| (t.name.clone(), Rc::new(t)))
            .collect()
    }

    fn prefixes() -> Vec<String> {
        vec!["zero.".into(), "zero_0.".into()]
    }

    #[test]
    fn a_matching_schema_passes_and_a_subset_of_columns_is_fine() {
        let schema = json!({"tables": {"issue": {
            "columns": {"id": {"type": "string"}, "created": {"type": "number"}},
            "primaryKey": ["id"]}}});
        assert!(check(&schema, &replicated(), &prefixes()).is_ok());
    }

    #[test]
    fn every_mismatch_is_named_in_one_error() {
        let schema = json!({"tables": {
            "issue": {"columns": {
                "id": {"type": "string"}, "created": {"type": "string"}, "nope": {"type": "number"}},
                "primaryKey": ["title"]},
            "label": {"columns": {"id": {"type": "string"}}, "primaryKey": ["id"]},
            "comment": {"columns": {}}}});
        let err = check(&schema, &replicated(), &prefixes()).expect_err("mismatch");
        assert_eq!(err.kind, ErrorKind::SchemaVersionNotSupported);
        let lines: Vec<&str> = err.message.lines().collect();
        assert_eq!(
            lines,
            vec![
                "The \"comment\" table does not exist or is not one of the replicated tables: \"issue\".",
                "The \"issue\".\"created\" column's upstream type \"number\" does not match the client type \"string\"",
                "The \"issue\".\"nope\" column does not exist or is not one of the replicated columns: \"created\",\"id\",\"title\".",
                "The \"issue\" table's primaryKey <title> is not associated with a non-null unique index.",
                "The \"label\" table does not exist or is not one of the replicated tables: \"issue\".",
            ]
        );
    }

    #[test]
    fn no_replicated_tables_is_internal_and_a_schema_without_tables_is_invalid() {
        let err = check(&json!({"tables": {}}), &BTreeMap::new(), &prefixes()).expect_err("none");
        assert_eq!(err.kind, ErrorKind::Internal);
        let err = check(&json!({}), &replicated(), &prefixes()).expect_err("no tables");
        assert_eq!(err.kind, ErrorKind::InvalidConnectionRequest);
    }

    #[test]
    fn a_missing_primary_key_and_a_non_public_table_get_their_own_words() {
        let schema = json!({"tables": {
            "issue": {"columns": {"id": {"type": "string"}}},
            "other.thing": {"columns": {}, "primaryKey": ["id"]}}});
        let err = check(&schema, &replicated(), &prefixes()).expect_err("mismatch");
        assert!(err
            .message
            .contains("client schema does not specify a primary key"));
        assert!(err.message.contains("non-public schemas"));
    }
}
