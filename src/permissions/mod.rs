//! Row-level permissions from `{app}.permissions`: the read transform of legacy queries and the write authorizer of CRUD mutations.
//!
//! The JSON format is `zero-schema/src/compiled-permissions.ts` (legacy-features.md 2.2), parsed
//! strictly as valita does: unknown keys, `null` for optional fields and wrong shapes are errors.

mod condition;
mod parse;
mod read;
mod write;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::zql::ast::Condition;

pub use condition::{bind_static_parameters, simplify, StaticParameters};
pub use read::authorize_read;
pub use write::{authorize_write, WriteError, MUTATION_OPS_MAX};

/// One policy: the conditions of its `["allow", condition]` rules, in order. A row passes the
/// policy when any rule's condition holds; an empty (or absent) policy passes nothing.
pub type Policy = Vec<Condition>;

/// Parsed `{app}.permissions` JSON (strict: unknown keys rejected, as valita strict mode).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Permissions {
    /// By server table name; a missing `tables` is empty (every table denied).
    pub tables: BTreeMap<String, TablePermissions>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TablePermissions {
    pub row: Option<Asset>,
    /// By server column name, in the JSON's order.
    pub cell: Option<Vec<(String, Asset)>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Asset {
    pub select: Option<Policy>,
    pub insert: Option<Policy>,
    pub update: Option<UpdatePolicies>,
    pub delete: Option<Policy>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdatePolicies {
    pub pre_mutation: Option<Policy>,
    pub post_mutation: Option<Policy>,
}

impl Permissions {
    pub fn table(&self, name: &str) -> Option<&TablePermissions> {
        self.tables.get(name)
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum PermissionsError {
    /// load-permissions.ts's message (the text elided to 100 bytes), then why.
    #[error(
        "Could not parse upstream permissions: '{text}'.\nThis may happen if Permissions with a new internal format are deployed before the supporting server has been fully rolled out. ({reason})"
    )]
    Parse { text: String, reason: String },
    #[error("could not read the permissions row of '{table}': {reason}")]
    Replica { table: String, reason: String },
}

/// Longest prefix of the permissions text quoted in a parse error (`elide(.., 100)`).
pub const ELIDED_TEXT_BYTES_MAX: usize = 100;

/// `elide`: the text itself when it fits in `max` bytes, else its longest prefix that fits
/// with `...` appended.
pub(crate) fn elide(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Parses the permissions JSON text.
pub fn parse(json: &str) -> Result<Permissions, PermissionsError> {
    let fail = |reason: String| PermissionsError::Parse {
        text: elide(json, ELIDED_TEXT_BYTES_MAX),
        reason,
    };
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| fail(e.to_string()))?;
    parse::permissions(&value).map_err(fail)
}

/// The replica's permissions row: Ok(None) when the table/row is missing or NULL (nothing deployed).
/// Returns (permissions, hash text) — the hash is the row's `hash` column.
pub fn load(
    reader: &crate::sqlite::ReplicaReader,
    app_id: &str,
) -> Result<Option<(Permissions, String)>, PermissionsError> {
    use crate::zql::value::Value;
    let table = format!("{app_id}.permissions");
    let Some(spec) = reader.table_spec(&table) else {
        return Ok(None);
    };
    let replica_error = |reason: String| PermissionsError::Replica {
        table: table.clone(),
        reason,
    };
    let column = |name: &str| {
        spec.column_index(name)
            .ok_or_else(|| replica_error(format!("no column '{name}'")))
    };
    let (perms_col, hash_col) = (column("permissions")?, column("hash")?);
    let rows = reader
        .fetch_rows(&table, &[])
        .map_err(|e| replica_error(e.to_string()))?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    let text = match row.get(perms_col) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Json(t) | Value::Text(t)) => t.clone(),
        Some(other) => {
            let mut t = String::new();
            other.write_json(&mut t);
            t
        }
    };
    // A JSON `null` document is as good as a NULL column: nothing deployed.
    if text.trim() == "null" {
        return Ok(None);
    }
    let perms = parse(&text)?;
    let hash = match row.get(hash_col) {
        Some(Value::Text(h) | Value::Json(h)) => h.clone(),
        _ => String::new(),
    };
    Ok(Some((perms, hash)))
}

#[cfg(test)]
mod tests;
