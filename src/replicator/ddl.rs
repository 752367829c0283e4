//! Upstream schema changes applied to the replica in place, inside the SQLite transaction of
//! the upstream transaction that made them.
//!
//! Two sources: the DDL messages of the shard's event triggers (setup.rs), which describe
//! the published tables before and after each command, matched by table OID and column
//! attnum, so renames are told from drops and adds; and, without event triggers, a Relation
//! message whose columns differ from the replica's spec (columns matched by name only).
//! What cannot be applied in place (a type change, a table rewrite, rows the stream will
//! never send) is `ReplError::ResetRequired`.

use super::schema::replica_table_name;
use super::setup::DDL_MESSAGE_VERSION;
use super::ReplError;
use crate::pgrepl::pgoutput::Relation;
use crate::sqlite::pgtypes::{column_kind, decode_text};
use crate::sqlite::Replica;
use crate::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use crate::zql::value::Value;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Command tags that make a table that did not exist before: empty, or with rows that the
/// same transaction streams as inserts.
const CREATING_TAGS: [&str; 3] = ["CREATE TABLE", "CREATE TABLE AS", "SELECT INTO"];

/// One DDL message (setup.rs `ddl_end`).
#[derive(Debug, serde::Deserialize)]
struct DdlMessage {
    version: u64,
    tag: String,
    before: Option<Vec<UpTable>>,
    after: Vec<UpTable>,
    #[serde(default)]
    query: String,
}

/// A published upstream table as the trigger describes it.
#[derive(Debug, Clone, serde::Deserialize)]
struct UpTable {
    oid: u32,
    schema: String,
    name: String,
    relfilenode: u32,
    columns: Vec<UpColumn>,
    #[serde(rename = "primaryKey")]
    primary_key: Option<Vec<String>>,
}

/// `[attnum, name, type oid, is array, value of rows present when it was added]`.
#[derive(Debug, Clone, serde::Deserialize)]
struct UpColumn(i16, String, u32, bool, Option<String>);

impl UpColumn {
    fn attnum(&self) -> i16 {
        self.0
    }
    fn name(&self) -> &str {
        &self.1
    }
    fn kind(&self) -> Option<ColumnKind> {
        column_kind(self.2, self.3)
    }
    fn same_type(&self, other: &UpColumn) -> bool {
        self.2 == other.2 && self.3 == other.3
    }
    fn spec(&self) -> Option<ColumnSpec> {
        Some(ColumnSpec {
            name: self.1.clone(),
            kind: self.kind()?,
            pg_type_oid: self.2,
        })
    }
}

impl UpTable {
    fn replica_name(&self) -> String {
        replica_table_name(&self.schema, &self.name)
    }

    /// The replica's spec, as the initial sync would make it; None when not synced.
    fn spec(&self) -> Option<TableSpec> {
        let columns: Vec<ColumnSpec> = self.columns.iter().filter_map(UpColumn::spec).collect();
        let key = self.primary_key.as_ref()?;
        let primary_key = key
            .iter()
            .map(|k| columns.iter().position(|c| &c.name == k))
            .collect::<Option<Vec<usize>>>()?;
        (!primary_key.is_empty()).then(|| TableSpec {
            name: self.replica_name(),
            columns,
            primary_key,
        })
    }
}

/// What a schema change did to the replica's tables.
#[derive(Debug, Default)]
pub struct SchemaChange {
    /// Replica tables changed, created or dropped (old and new names of renamed ones).
    pub touched: BTreeSet<String>,
}

/// Applies one DDL message. `created_in_tx` holds the OIDs of the tables the current upstream
/// transaction created: those may appear in the replica empty (their rows arrive as inserts).
pub fn apply_message(
    replica: &mut Replica,
    content: &[u8],
    created_in_tx: &mut HashSet<u32>,
) -> Result<SchemaChange, ReplError> {
    let msg: DdlMessage = serde_json::from_slice(content)
        .map_err(|e| ReplError::Value(format!("malformed schema-change message: {e}")))?;
    if msg.version != DDL_MESSAGE_VERSION {
        return Err(ReplError::ResetRequired(format!(
            "schema-change message version {} (zcache reads {DDL_MESSAGE_VERSION})",
            msg.version
        )));
    }
    let Some(before) = msg.before.as_ref() else {
        return Err(ReplError::ResetRequired(format!(
            "schema change {:?} came without the schema before it",
            msg.tag
        )));
    };
    tracing::info!(tag = %msg.tag, query = %msg.query, "applying an upstream schema change");
    let before: HashMap<u32, &UpTable> = before.iter().map(|t| (t.oid, t)).collect();
    let after: HashMap<u32, &UpTable> = msg.after.iter().map(|t| (t.oid, t)).collect();
    let mut change = SchemaChange::default();
    // Drops first, so a name freed by one table can be taken by another.
    for (oid, b) in &before {
        let name = b.replica_name();
        if !after.contains_key(oid) && replica.tables().contains_key(&name) {
            replica.drop_table(&name)?;
            change.touched.insert(name);
        }
    }
    for (oid, b) in &before {
        if let Some(a) = after.get(oid) {
            alter(replica, &msg.tag, b, a, created_in_tx, &mut change)?;
        }
    }
    let creating = CREATING_TAGS.contains(&msg.tag.as_str());
    for (oid, a) in &after {
        if !before.contains_key(oid) {
            if creating {
                created_in_tx.insert(*oid);
            }
            appear(replica, &msg.tag, a, created_in_tx, &mut change)?;
        }
    }
    Ok(change)
}

/// A table the replica does not have became synced: created empty when the transaction
/// created it, else its rows exist upstream and only a new initial sync can copy them.
fn appear(
    replica: &mut Replica,
    tag: &str,
    a: &UpTable,
    created_in_tx: &HashSet<u32>,
    change: &mut SchemaChange,
) -> Result<(), ReplError> {
    let Some(spec) = a.spec() else {
        tracing::warn!(table = %a.replica_name(), "not synced: it has no primary key of synced columns");
        return Ok(());
    };
    if !created_in_tx.contains(&a.oid) {
        return Err(ReplError::ResetRequired(format!(
            "{tag} made the existing table {} synced: its rows must be copied",
            spec.name
        )));
    }
    replica.create_table(&spec)?;
    change.touched.insert(spec.name);
    Ok(())
}

/// A table present before and after the command.
fn alter(
    replica: &mut Replica,
    tag: &str,
    b: &UpTable,
    a: &UpTable,
    created_in_tx: &HashSet<u32>,
    change: &mut SchemaChange,
) -> Result<(), ReplError> {
    let table = b.replica_name();
    if !replica.tables().contains_key(&table) {
        return appear(replica, tag, a, created_in_tx, change);
    }
    let reset = |why: String| Err(ReplError::ResetRequired(format!("{tag} on {table}: {why}")));
    if a.relfilenode != b.relfilenode && !created_in_tx.contains(&a.oid) {
        // Rewritten rows (a volatile default, a type change) are not streamed.
        return reset("the table was rewritten".into());
    }
    let old_cols: HashMap<i16, &UpColumn> = b.columns.iter().map(|c| (c.attnum(), c)).collect();
    let new_attnums: HashSet<i16> = a.columns.iter().map(UpColumn::attnum).collect();
    let mut drops: Vec<String> = b
        .columns
        .iter()
        .filter(|c| !new_attnums.contains(&c.attnum()))
        .map(|c| c.name().to_string())
        .collect();
    let has = |replica: &Replica, col: &str| {
        replica
            .spec(&table)
            .map(|s| s.column_index(col).is_some())
            .unwrap_or(false)
    };
    for ac in &a.columns {
        match old_cols.get(&ac.attnum()) {
            Some(bc) if !bc.same_type(ac) => match (has(replica, bc.name()), ac.kind()) {
                (false, None) => {}
                (true, None) => drops.push(bc.name().to_string()),
                _ => return reset(format!("column {} changed type", bc.name())),
            },
            Some(bc) if bc.name() != ac.name() && has(replica, bc.name()) => {
                replica.rename_column(&table, bc.name(), ac.name())?;
            }
            Some(_) => {}
            None => {
                let Some(col) = ac.spec() else { continue };
                let fill = match &ac.4 {
                    Some(text) => decode_text(col.pg_type_oid, col.kind, text)?,
                    None => Value::Null,
                };
                replica.add_column(&table, col, &fill)?;
            }
        }
    }
    if let Some(key) = &a.primary_key {
        let spec = replica.spec(&table)?;
        let Some(positions) = key
            .iter()
            .map(|k| spec.column_index(k))
            .collect::<Option<Vec<usize>>>()
        else {
            return reset("the new primary key has a column zcache does not sync".into());
        };
        if positions != spec.primary_key {
            replica.set_primary_key(&table, &positions)?;
        }
    } else {
        tracing::warn!(%table, "upstream dropped the primary key: the replica keeps the old one");
    }
    for col in drops {
        let Ok(spec) = replica.spec(&table) else {
            break;
        };
        match spec.column_index(&col) {
            None => {}
            Some(i) if spec.primary_key.contains(&i) => {
                return reset(format!("key column {col} dropped with no new primary key"))
            }
            Some(_) => replica.drop_column(&table, &col)?,
        }
    }
    let new_name = a.replica_name();
    if new_name != table {
        if replica.tables().contains_key(&new_name) {
            return reset(format!("renamed to {new_name}, which the replica holds"));
        }
        replica.rename_table(&table, &new_name)?;
        change.touched.insert(new_name);
    }
    change.touched.insert(table);
    Ok(())
}

/// Brings the replica's spec of `table` in line with a Relation message (no DDL message came:
/// no event triggers). Columns are matched by name: a renamed column becomes a dropped one
/// and an added one whose existing rows hold NULL until they change. Returns whether the
/// table changed.
pub fn reconcile_relation(
    replica: &mut Replica,
    table: &str,
    rel: &Relation,
) -> Result<bool, ReplError> {
    let mut changed = false;
    for c in &rel.columns {
        let kind = column_kind(c.type_oid, is_builtin_array(c.type_oid));
        let spec = replica.spec(table)?;
        match (spec.column_index(&c.name), kind) {
            (Some(i), _) if spec.columns[i].pg_type_oid == c.type_oid => {}
            (Some(_), None) => {} // became unsupported: dropped below
            (Some(_), Some(_)) => {
                return Err(ReplError::ResetRequired(format!(
                    "column {table}.{} changed type",
                    c.name
                )))
            }
            (None, None) => {}
            (None, Some(kind)) => {
                tracing::warn!(%table, column = %c.name,
                    "column added upstream without a schema-change message: rows present get NULL");
                let col = ColumnSpec {
                    name: c.name.clone(),
                    kind,
                    pg_type_oid: c.type_oid,
                };
                replica.add_column(table, col, &Value::Null)?;
                changed = true;
            }
        }
    }
    if rel.replica_identity == b'd' {
        let key: Vec<&str> = rel
            .columns
            .iter()
            .filter(|c| c.is_key())
            .map(|c| c.name.as_str())
            .collect();
        let spec = replica.spec(table)?;
        let current: BTreeSet<&str> = spec
            .primary_key
            .iter()
            .map(|&i| spec.columns[i].name.as_str())
            .collect();
        if !key.is_empty() && key.iter().copied().collect::<BTreeSet<_>>() != current {
            let Some(positions) = key
                .iter()
                .map(|k| spec.column_index(k))
                .collect::<Option<Vec<usize>>>()
            else {
                return Err(ReplError::ResetRequired(format!(
                    "the new primary key of {table} has a column zcache does not sync"
                )));
            };
            replica.set_primary_key(table, &positions)?;
            changed = true;
        }
    }
    let present: HashSet<&str> = rel
        .columns
        .iter()
        .filter(|c| column_kind(c.type_oid, is_builtin_array(c.type_oid)).is_some())
        .map(|c| c.name.as_str())
        .collect();
    let spec = replica.spec(table)?;
    let gone: Vec<(String, bool)> = spec
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| !present.contains(c.name.as_str()))
        .map(|(i, c)| (c.name.clone(), spec.primary_key.contains(&i)))
        .collect();
    for (col, in_key) in gone {
        if in_key {
            return Err(ReplError::ResetRequired(format!(
                "key column {table}.{col} dropped upstream"
            )));
        }
        replica.drop_column(table, &col)?;
        changed = true;
    }
    Ok(changed)
}

/// Array types among the built-in ones (a Relation message carries only the type OID; the
/// catalog, which the event triggers read, knows every array type).
fn is_builtin_array(type_oid: u32) -> bool {
    const ARRAY_TYPE_OIDS: [u32; 22] = [
        199, 1000, 1001, 1005, 1007, 1009, 1014, 1015, 1016, 1021, 1022, 1028, 1115, 1182, 1183,
        1185, 1231, 1270, 2951, 3807, 1041, 1187,
    ];
    ARRAY_TYPE_OIDS.contains(&type_oid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_trigger_message_and_builds_specs() {
        let json = r#"{"version":1,"tag":"ALTER TABLE","query":"x","before":[],
            "after":[{"oid":5,"schema":"s","name":"t","relfilenode":9,
              "columns":[[1,"id",23,false,null],[2,"b",17,false,null],[3,"n",1007,true,"{1,2}"]],
              "primaryKey":["id"]}]}"#;
        let msg: DdlMessage = serde_json::from_str(json).expect("parses");
        let spec = msg.after[0].spec().expect("synced");
        assert_eq!(spec.name, "s.t");
        let names: Vec<&str> = spec.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "n"]); // bytea is not synced
        assert_eq!(spec.columns[1].kind, ColumnKind::Json);
        assert_eq!(spec.primary_key, [0]);
        let keyless = UpTable {
            primary_key: None,
            ..msg.after[0].clone()
        };
        assert!(keyless.spec().is_none());
    }
}
