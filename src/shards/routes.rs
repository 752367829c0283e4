//! Which of a shard's client groups a replica version can concern. Each group registers what
//! its queries read: whole tables, or, where a query's root is pinned by `column = value`
//! (issueById, a user's own rows, the group's lastMutationIDs), only the rows holding that
//! value. A version's changed rows (their states before and after) then reach only the
//! groups they may change, so a shard holding many groups pays per version for the groups
//! concerned, not for every group it holds.
//!
//! Routing is conservative: a group left out is one that no row state of the version can
//! enter or leave a view of. Whatever cannot be told exactly (rows not listed, a layout the
//! shard's specs may not match, a value without a key) goes to every group reading the table.

use super::{ChangedRow, VersionReady};
use crate::zql::filter::js_view;
use crate::zql::ivm::LiveQuery;
use crate::zql::schema::TableSpec;
use crate::zql::value::Value;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::rc::Rc;

/// What one of a group's queries reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interest {
    /// Any row of the table.
    Table(String),
    /// Only rows of the table whose `column` is strictly equal to the value of `key`.
    Keyed {
        table: String,
        column: String,
        key: RouteKey,
    },
}

/// A value's identity under the client's `=` (JavaScript strict equality, `filter.rs`):
/// strictly equal values have equal keys. Numbers are keyed as doubles, as they compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKey {
    Bool(bool),
    Number(u64),
    Text(String),
}

/// The key of `v`, or None for a value equal to nothing (null, NaN, a JSON object or array).
pub fn route_key(v: &Value) -> Option<RouteKey> {
    fn number(f: f64) -> Option<RouteKey> {
        // -0 === 0; NaN equals nothing.
        match f {
            f if f.is_nan() => None,
            0.0 => Some(RouteKey::Number(0)),
            f => Some(RouteKey::Number(f.to_bits())),
        }
    }
    match js_view(v).as_ref() {
        Value::Bool(b) => Some(RouteKey::Bool(*b)),
        Value::Int(i) => number(*i as f64),
        Value::Float(f) => number(*f),
        Value::Text(s) => Some(RouteKey::Text(s.clone())),
        Value::Null | Value::Json(_) => None,
    }
}

/// What a maintained query reads: its root pinned by `column = value` reads only the rows
/// holding that value (unless the root table is read below the root too); every other table
/// it reads, whole.
pub fn interests_of(q: &LiveQuery, out: &mut BTreeSet<Interest>) {
    let (root, constraints, read_below) = q.root_constraints();
    let pinned = constraints
        .iter()
        .filter(|_| !read_below)
        .find_map(|(column, v)| route_key(v).map(|key| (*column, key)));
    for table in q.tables() {
        match &pinned {
            Some((column, key)) if table == root => out.insert(Interest::Keyed {
                table: table.to_string(),
                column: column.to_string(),
                key: key.clone(),
            }),
            _ => out.insert(Interest::Table(table.to_string())),
        };
    }
}

type GroupSet = HashSet<Rc<str>>;

/// The shard's index from tables and values to the groups that read them. Its size follows
/// the groups the shard holds (`CLIENT_GROUPS_PER_SHARD_MAX`) and their queries.
#[derive(Default)]
pub struct Routes {
    /// Per table, the groups reading any of its rows.
    tables: HashMap<String, GroupSet>,
    /// Per table and column, per value key, the groups reading only rows with that value.
    keyed: HashMap<String, HashMap<String, HashMap<RouteKey, GroupSet>>>,
    /// What each group registered, to undo it.
    by_group: HashMap<Rc<str>, BTreeSet<Interest>>,
}

impl Routes {
    /// Replaces what `group` reads with `interests`.
    pub fn set(&mut self, group: &str, interests: BTreeSet<Interest>) {
        let (id, old) = match self.by_group.remove_entry(group) {
            Some((id, old)) => (id, old),
            None => (Rc::from(group), BTreeSet::new()),
        };
        if old == interests {
            if !old.is_empty() {
                self.by_group.insert(id, old);
            }
            return;
        }
        for i in old.difference(&interests) {
            self.unlink(&id, i);
        }
        for i in interests.difference(&old) {
            self.link(&id, i);
        }
        if !interests.is_empty() {
            self.by_group.insert(id, interests);
        }
    }

    pub fn remove(&mut self, group: &str) {
        self.set(group, BTreeSet::new());
    }

    /// What `group` registered (empty when nothing).
    pub fn interests(&self, group: &str) -> Option<&BTreeSet<Interest>> {
        self.by_group.get(group)
    }

    fn link(&mut self, id: &Rc<str>, i: &Interest) {
        match i {
            Interest::Table(t) => {
                self.tables.entry(t.clone()).or_default().insert(id.clone());
            }
            Interest::Keyed { table, column, key } => {
                self.keyed
                    .entry(table.clone())
                    .or_default()
                    .entry(column.clone())
                    .or_default()
                    .entry(key.clone())
                    .or_default()
                    .insert(id.clone());
            }
        }
    }

    fn unlink(&mut self, id: &str, i: &Interest) {
        match i {
            Interest::Table(t) => {
                if let Some(set) = self.tables.get_mut(t) {
                    set.remove(id);
                    if set.is_empty() {
                        self.tables.remove(t);
                    }
                }
            }
            Interest::Keyed { table, column, key } => {
                let Some(columns) = self.keyed.get_mut(table) else {
                    return;
                };
                if let Some(keys) = columns.get_mut(column) {
                    if let Some(set) = keys.get_mut(key) {
                        set.remove(id);
                        if set.is_empty() {
                            keys.remove(key);
                        }
                    }
                    if keys.is_empty() {
                        columns.remove(column);
                    }
                }
                if columns.is_empty() {
                    self.keyed.remove(table);
                }
            }
        }
    }

    /// The groups `v` may concern. `rows_usable`: the version's rows are laid out as the
    /// specs `spec_of` gives (see `Shard::refresh_specs`); otherwise every group reading a
    /// changed table is concerned.
    pub fn groups_for(
        &self,
        v: &VersionReady,
        spec_of: impl Fn(&str) -> Option<Rc<TableSpec>>,
        rows_usable: bool,
    ) -> HashSet<Rc<str>> {
        let mut out = HashSet::new();
        match v.rows.as_deref().filter(|_| rows_usable) {
            Some(rows) => {
                for row in rows {
                    self.route_row(row, spec_of(&row.table).as_deref(), &mut out);
                }
            }
            None => {
                for t in &v.tables {
                    self.all_of_table(t, &mut out);
                }
            }
        }
        out
    }

    fn route_row(&self, row: &ChangedRow, spec: Option<&TableSpec>, out: &mut HashSet<Rc<str>>) {
        if let Some(set) = self.tables.get(&row.table) {
            out.extend(set.iter().cloned());
        }
        let Some(columns) = self.keyed.get(&row.table) else {
            return;
        };
        let states = [&row.old, &row.new];
        let laid_out = |s: &TableSpec| {
            states
                .iter()
                .all(|r| r.as_ref().is_none_or(|r| r.len() == s.columns.len()))
        };
        let Some(spec) = spec.filter(|s| laid_out(s)) else {
            // Not the layout of the specs held (a schema change in flight): no value tells.
            self.all_of_table(&row.table, out);
            return;
        };
        for (column, keys) in columns {
            let Some(i) = spec.column_index(column) else {
                keys.values()
                    .for_each(|set| out.extend(set.iter().cloned()));
                continue;
            };
            for state in states.into_iter().flatten() {
                if let Some(set) = route_key(&state[i]).and_then(|k| keys.get(&k)) {
                    out.extend(set.iter().cloned());
                }
            }
        }
    }

    fn all_of_table(&self, table: &str, out: &mut HashSet<Rc<str>>) {
        if let Some(set) = self.tables.get(table) {
            out.extend(set.iter().cloned());
        }
        for keys in self.keyed.get(table).into_iter().flat_map(|c| c.values()) {
            keys.values()
                .for_each(|set| out.extend(set.iter().cloned()));
        }
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
