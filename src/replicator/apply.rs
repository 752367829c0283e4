//! Applies pgoutput transactions to the replica: one SQLite transaction per upstream
//! transaction, committed with its end LSN as the watermark.

use super::schema::replica_table_name;
use super::{ddl, ReplError};
use crate::pgrepl::pgoutput::{OldTuple, PgOutput, Relation, TupleValue};
use crate::shards::ChangedRow;
use crate::sqlite::pgtypes::decode_text;
use crate::sqlite::Replica;
use crate::zql::schema::TableSpec;
use crate::zql::value::{Row, Value};
use std::collections::{BTreeSet, HashMap, HashSet};

/// A relation as announced by the stream, mapped onto its replica table.
struct RelationMap {
    table: String,
    /// The relation message's column names, to map them again after a schema change.
    columns: Vec<String>,
    /// For each column of the relation message, its position in the replica row.
    positions: Vec<Option<usize>>,
}

/// What a commit hands on: the new watermark, the tables it touched, and the rows it
/// changed with their state before (None when a table-wide change, a schema change, or more
/// than `CHANGED_ROWS_PER_VERSION_MAX` rows make that list useless or too big: syncers then
/// re-run the queries of the touched tables).
pub struct Committed {
    pub watermark: u64,
    pub tables: Vec<String>,
    pub rows: Option<Vec<ChangedRow>>,
}

/// Rows one version may list; a bigger transaction is announced by its tables alone.
pub const CHANGED_ROWS_PER_VERSION_MAX: usize = 10_000;

#[derive(Default)]
pub struct Applier {
    relations: HashMap<u32, RelationMap>,
    in_tx: bool,
    touched: BTreeSet<String>,
    /// The logical message prefix of this shard's schema-change messages (setup.rs).
    ddl_prefix: String,
    /// OIDs of the tables the current transaction created.
    created_in_tx: HashSet<u32>,
    /// The rows the current transaction changed (see `Committed::rows`).
    changed: Option<Vec<ChangedRow>>,
}

impl Applier {
    /// An applier that applies the schema-change messages sent with `ddl_prefix`.
    pub fn new(ddl_prefix: String) -> Self {
        Applier {
            ddl_prefix,
            ..Applier::default()
        }
    }

    /// Applies one message; returns the commit when a transaction ends.
    pub fn apply(
        &mut self,
        replica: &mut Replica,
        msg: PgOutput,
    ) -> Result<Option<Committed>, ReplError> {
        match msg {
            PgOutput::Begin { .. } => {
                debug_assert!(!self.in_tx, "BEGIN inside a transaction");
                replica.begin()?;
                self.in_tx = true;
                self.touched.clear();
                self.created_in_tx.clear();
                self.changed = Some(Vec::new());
            }
            PgOutput::Commit {
                end_lsn,
                commit_time_us,
                ..
            } => {
                replica.commit(end_lsn.0)?;
                crate::metrics::observe_upstream_commit(commit_time_us);
                self.in_tx = false;
                return Ok(Some(Committed {
                    watermark: end_lsn.0,
                    tables: std::mem::take(&mut self.touched).into_iter().collect(),
                    rows: self.changed.take(),
                }));
            }
            PgOutput::Relation(rel) => self.relation(replica, rel)?,
            PgOutput::Insert { relation_oid, new } => {
                let Some((table, row)) = self.row(replica, relation_oid, &new, None)? else {
                    return Ok(None);
                };
                let key = key_of(replica.spec(&table)?, &row);
                self.note_change(&table, key, None, Some(&row));
                replica.upsert(&table, &row)?;
            }
            PgOutput::Update {
                relation_oid,
                old,
                new,
            } => self.update(replica, relation_oid, old, new)?,
            PgOutput::Delete { relation_oid, old } => {
                let Some((table, key)) = self.key(replica, relation_oid, &old.values)? else {
                    return Ok(None);
                };
                if self.changed.is_some() {
                    if let Some(previous) = replica.get(&table, &key)? {
                        self.note_change(&table, key.clone(), Some(previous), None);
                    }
                }
                replica.delete(&table, &key)?;
            }
            PgOutput::Truncate { relation_oids, .. } => {
                self.changed = None;
                for oid in relation_oids {
                    if let Some(rel) = self.relations.get(&oid) {
                        replica.truncate(&rel.table)?;
                        self.touched.insert(rel.table.clone());
                    }
                }
            }
            PgOutput::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == self.ddl_prefix && !prefix.is_empty() => {
                self.changed = None;
                let change = ddl::apply_message(replica, &content, &mut self.created_in_tx)?;
                self.remap(replica);
                self.touched.extend(change.touched);
            }
            PgOutput::Origin { .. } | PgOutput::Type { .. } | PgOutput::Message { .. } => {}
        }
        Ok(None)
    }

    pub fn in_transaction(&self) -> bool {
        self.in_tx
    }

    fn relation(&mut self, replica: &mut Replica, rel: Relation) -> Result<(), ReplError> {
        let table = replica_table_name(&rel.namespace, &rel.name);
        if !replica.tables().contains_key(&table) {
            // Not synced (no primary key), or created while schema changes go undetected.
            tracing::warn!(%table, "change to a table the replica does not have; ignored");
            self.relations.remove(&rel.oid);
            return Ok(());
        }
        // Schema-change messages keep the spec in step; this catches what came without one
        // (no event triggers: the role is not a superuser). Dropped columns and a changed key
        // are followed in place; a new column is not: what the rows already there hold in it
        // (a default, a renamed column's values, a rewrite) is not in the stream. The
        // transaction that reconcile changed is rolled back before the reset.
        let before = replica.spec(&table)?.clone();
        if ddl::reconcile_relation(replica, &table, &rel)? {
            if let Some(added) = replica
                .spec(&table)?
                .columns
                .iter()
                .find(|c| before.column_index(&c.name).is_none())
            {
                self.changed = None;
                return Err(ReplError::ResetRequired(format!(
                    "column {table}.{} appeared upstream without a schema-change message (no \
                     event triggers: is zcache's role a superuser?); what the rows already \
                     there hold in it is not in the replication stream",
                    added.name
                )));
            }
            self.touched.insert(table.clone());
            self.changed = None;
        }
        let columns = rel.columns.into_iter().map(|c| c.name).collect();
        let mut map = RelationMap {
            table,
            columns,
            positions: Vec::new(),
        };
        map.positions = positions(replica, &map);
        self.relations.insert(rel.oid, map);
        Ok(())
    }

    /// Maps the known relations again after the replica's schema changed. Upstream sends a
    /// new Relation message before the next change to a changed table, so forgetting the
    /// dropped and renamed ones loses nothing.
    fn remap(&mut self, replica: &Replica) {
        self.relations
            .retain(|_, m| replica.tables().contains_key(&m.table));
        for map in self.relations.values_mut() {
            map.positions = positions(replica, map);
        }
    }

    fn map(&self, oid: u32) -> Option<&RelationMap> {
        self.relations.get(&oid)
    }

    /// Decodes a new tuple into a full replica row. Unchanged TOAST values come from `old`.
    fn row(
        &mut self,
        replica: &Replica,
        oid: u32,
        values: &[TupleValue],
        old: Option<&Row>,
    ) -> Result<Option<(String, Row)>, ReplError> {
        let Some(map) = self.map(oid) else {
            return Ok(None);
        };
        let spec = replica.spec(&map.table)?;
        let mut row: Row = vec![Value::Null; spec.columns.len()];
        for (value, pos) in values.iter().zip(&map.positions) {
            let Some(pos) = *pos else { continue };
            row[pos] = match value {
                TupleValue::Null => Value::Null,
                TupleValue::UnchangedToast => old.map(|o| o[pos].clone()).unwrap_or(Value::Null),
                TupleValue::Text(b) | TupleValue::Binary(b) => decode(spec, pos, b)?,
            };
        }
        let table = map.table.clone();
        self.touched.insert(table.clone());
        Ok(Some((table, row)))
    }

    /// The primary-key values of an old tuple (or of a full new row).
    fn key(
        &mut self,
        replica: &Replica,
        oid: u32,
        values: &[TupleValue],
    ) -> Result<Option<(String, Vec<Value>)>, ReplError> {
        let Some((table, row)) = self.row(replica, oid, values, None)? else {
            return Ok(None);
        };
        let spec = replica.spec(&table)?;
        Ok(Some((
            table,
            spec.primary_key.iter().map(|&i| row[i].clone()).collect(),
        )))
    }

    fn update(
        &mut self,
        replica: &Replica,
        oid: u32,
        old: Option<OldTuple>,
        new: Vec<TupleValue>,
    ) -> Result<(), ReplError> {
        let Some(map) = self.map(oid) else {
            return Ok(());
        };
        let table = map.table.clone();
        let needs_old = new.iter().any(|v| matches!(v, TupleValue::UnchangedToast));
        // The old key is sent only when the key changed (or with REPLICA IDENTITY FULL).
        let old_key = match &old {
            Some(o) => self.key(replica, oid, &o.values)?.map(|(_, k)| k),
            None => None,
        };
        let Some((_, mut row)) = self.row(replica, oid, &new, None)? else {
            return Ok(());
        };
        let spec: TableSpec = replica.spec(&table)?.clone();
        let new_key: Vec<Value> = key_of(&spec, &row);
        let lookup = old_key.clone().unwrap_or_else(|| new_key.clone());
        let previous = if needs_old || self.changed.is_some() {
            replica.get(&table, &lookup)?
        } else {
            None
        };
        if needs_old {
            if let Some(previous) = &previous {
                row = self
                    .row(replica, oid, &new, Some(previous))?
                    .map(|(_, r)| r)
                    .unwrap_or(row);
            }
        }
        match old_key.filter(|k| *k != new_key) {
            Some(k) => {
                if self.changed.is_some() {
                    let displaced = replica.get(&table, &new_key)?;
                    self.note_change(&table, new_key, displaced, Some(&row));
                }
                self.note_change(&table, k.clone(), previous, None);
                replica.delete(&table, &k)?;
            }
            None => self.note_change(&table, new_key, previous, Some(&row)),
        }
        replica.upsert(&table, &row)?;
        Ok(())
    }

    /// Records a changed row (its key, its state before and after) unless the list is given
    /// up.
    fn note_change(&mut self, table: &str, key: Vec<Value>, old: Option<Row>, new: Option<&Row>) {
        let Some(list) = &mut self.changed else {
            return;
        };
        if list.len() >= CHANGED_ROWS_PER_VERSION_MAX {
            self.changed = None;
            return;
        }
        list.push(ChangedRow {
            table: table.to_string(),
            key,
            old,
            new: new.cloned(),
        });
    }
}

fn key_of(spec: &TableSpec, row: &Row) -> Vec<Value> {
    spec.primary_key.iter().map(|&i| row[i].clone()).collect()
}

/// For each column of a relation, its position in the replica table's rows.
fn positions(replica: &Replica, map: &RelationMap) -> Vec<Option<usize>> {
    let Ok(spec) = replica.spec(&map.table) else {
        return vec![None; map.columns.len()];
    };
    map.columns.iter().map(|c| spec.column_index(c)).collect()
}

fn decode(spec: &TableSpec, pos: usize, bytes: &[u8]) -> Result<Value, ReplError> {
    let col = &spec.columns[pos];
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ReplError::Value(format!("{}.{} is not UTF-8", spec.name, col.name)))?;
    Ok(decode_text(col.pg_type_oid, col.kind, text)?)
}
