//! What changed upstream since a client group last advanced: the tables, and each changed
//! row with its state before the first of those versions, so that the group's live queries
//! can be updated incrementally. The rows' states after are read from the replica snapshot
//! the group advances in.

use super::{ChangedRow, VersionReady};
use crate::sqlite::ReplicaReader;
use crate::zql::ivm::RowChange;
use crate::zql::value::{Row, Value};
use crate::zql::ZqlError;
use std::collections::{BTreeSet, HashMap};

/// Changed rows a group keeps between advances (it may have no socket to advance for);
/// beyond, it forgets them and re-runs the queries of the changed tables instead.
pub const PENDING_CHANGED_ROWS_MAX: usize = 50_000;

type RowsByKey = HashMap<(String, String), (Vec<Value>, Option<Row>)>;

pub struct Pending {
    pub tables: BTreeSet<String>,
    /// By (table, key JSON): the key and the row's first state before; None when some
    /// version came without its rows (or there were too many).
    rows: Option<RowsByKey>,
    /// Whether rows are kept at all (a group needs only the tables).
    track_rows: bool,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            tables: BTreeSet::new(),
            rows: Some(HashMap::new()),
            track_rows: true,
        }
    }
}

fn key_json(row: &ChangedRow) -> String {
    let mut s = String::from("[");
    for (i, v) in row.key.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        v.write_json(&mut s);
    }
    s.push(']');
    s
}

impl Pending {
    /// Only the tables, for a client group: the shard's shared queries keep the rows.
    pub fn tables_only() -> Self {
        Pending {
            tables: BTreeSet::new(),
            rows: None,
            track_rows: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn note(&mut self, v: &VersionReady) {
        self.tables.extend(v.tables.iter().cloned());
        if !self.track_rows {
            return;
        }
        let (Some(rows), Some(changed)) = (&mut self.rows, &v.rows) else {
            self.rows = None;
            return;
        };
        for c in changed.iter() {
            rows.entry((c.table.clone(), key_json(c)))
                .or_insert_with(|| (c.key.clone(), c.old.clone()));
        }
        if rows.len() > PENDING_CHANGED_ROWS_MAX {
            self.rows = None;
        }
    }

    /// Puts back what an advance took but could not use yet, before what came since.
    pub fn restore(&mut self, older: Pending) {
        self.tables.extend(older.tables);
        match (&mut self.rows, older.rows) {
            (Some(rows), Some(older_rows)) => {
                // The older state before wins.
                for (k, v) in older_rows {
                    rows.insert(k, v);
                }
                if rows.len() > PENDING_CHANGED_ROWS_MAX {
                    self.rows = None;
                }
            }
            _ => self.rows = None,
        }
    }

    /// The net row changes, reading each row's current state in `reader`'s open snapshot;
    /// None when they are not known (the queries of `tables` must be re-run).
    pub fn changes(&self, reader: &ReplicaReader) -> Result<Option<Vec<RowChange>>, ZqlError> {
        let Some(rows) = &self.rows else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(rows.len());
        for ((table, _), (key, old)) in rows {
            let Some(spec) = reader.table_spec(table) else {
                return Ok(None); // the table went away: a schema change, re-run
            };
            if key.len() != spec.primary_key.len() {
                return Ok(None);
            }
            let eq: Vec<(usize, Value)> = spec
                .primary_key
                .iter()
                .copied()
                .zip(key.iter().cloned())
                .collect();
            let new = reader
                .fetch_rows(table, &eq)
                .map_err(|e| ZqlError::Source(e.to_string()))?
                .into_iter()
                .next();
            if new.is_none() && old.is_none() {
                continue;
            }
            out.push(RowChange {
                table: table.clone(),
                old: old.clone(),
                new,
            });
        }
        Ok(Some(out))
    }
}
