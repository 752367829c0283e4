//! The write authorizer of CRUD mutations (auth/write-authorizer.ts; legacy-features.md 2.6),
//! evaluated against the replica: pre checks on its current state, post checks on an overlay
//! holding the mutation's changes (nothing is written to SQLite).

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use serde_json::{Map, Value as Json};
use thiserror::Error;

use super::condition::{always_false, bind_static_parameters, literal, simplify, StaticParameters};
use super::{Permissions, Policy};
use crate::protocol::crud::{CrudArgs, CrudOp};
use crate::zql::ast::{
    Ast, Condition, Direction, LiteralValue, SimpleCondition, SimpleOperator, ValuePosition,
};
use crate::zql::plan::json_value;
use crate::zql::schema::TableSpec;
use crate::zql::value::{Row, Value};
use crate::zql::{evaluate, row_key_json, Source, ZqlError};

/// Operations of one mutation the authorizer evaluates; a longer mutation fails. Each costs
/// one or more policy queries, so this bounds the work one mutation can ask for.
pub const MUTATION_OPS_MAX: usize = 1_000;

/// Why a mutation could not be authorized (zero-cache's `MutationFailed` messages, without
/// JavaScript's `Error: ` prefix). A denial is not an error: it is `Ok(false)`.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum WriteError {
    #[error("Table '{0}' is not a valid table.")]
    InvalidTable(String),
    /// The change as JSON: `[0,{value},null]`.
    #[error("Row already exists {0}")]
    RowExists(String),
    /// The operation's value as JSON.
    #[error("Pre-mutation row not found for {0}")]
    PreMutationRowNotFound(String),
    #[error("Primary key column '{column}' is missing from operation value for table {table}")]
    MissingPrimaryKey { column: String, table: String },
    #[error("Primary key column '{column}' of table {table} must be a string, number or boolean, not {value}")]
    InvalidPrimaryKeyValue {
        column: String,
        table: String,
        value: String,
    },
    #[error("a mutation may have at most {max} operations; this one has {count}")]
    TooManyOps { count: usize, max: usize },
    #[error("permission query failed: {0}")]
    Query(#[from] ZqlError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Insert,
    Update,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pre,
    Post,
}

/// An operation after `normalizeOps` (upserts resolved), with its table's spec.
struct Op<'a> {
    action: Action,
    args: &'a CrudArgs,
    spec: Rc<TableSpec>,
}

/// The write authorizer (2.6) for one CRUD mutation, against the replica as `src` (a read snapshot):
/// Ok(true) allowed, Ok(false) denied (not an error), Err = zero-cache's MutationFailed messages
/// ("Table 'nope' is not a valid table.", "Row already exists [...]", "Pre-mutation row not found for {...}",
/// "Primary key column 'id' is missing from operation value for table issue").
///
/// Both phases always run (zero-cache runs them under `Promise.all`, where an error in either
/// rejects the whole even when the other denied); an error wins over a denial.
pub fn authorize_write(
    src: &dyn Source,
    perms: Option<&Permissions>,
    ops: &[CrudOp],
    auth_data: Option<&Json>,
) -> Result<bool, WriteError> {
    if ops.len() > MUTATION_OPS_MAX {
        return Err(WriteError::TooManyOps {
            count: ops.len(),
            max: MUTATION_OPS_MAX,
        });
    }
    // validateTableNames
    let mut specs = Vec::with_capacity(ops.len());
    for op in ops {
        let name = &op.args().table_name;
        specs.push(
            src.table(name)
                .ok_or_else(|| WriteError::InvalidTable(name.clone()))?,
        );
    }
    // normalizeOps: an upsert is an update when the row is in the replica, else an insert.
    let mut normalized = Vec::with_capacity(ops.len());
    for (op, spec) in ops.iter().zip(specs) {
        let action = match op {
            CrudOp::Insert(_) => Action::Insert,
            CrudOp::Update(_) => Action::Update,
            CrudOp::Delete(_) => Action::Delete,
            CrudOp::Upsert(args) => match current_row(src, &spec, args)? {
                Some(_) => Action::Update,
                None => Action::Insert,
            },
        };
        normalized.push(Op {
            action,
            args: op.args(),
            spec,
        });
    }
    let empty = Permissions::default();
    let perms = perms.unwrap_or(&empty);
    let params = StaticParameters {
        auth_data,
        pre_mutation_row: None,
    };
    let pre = can_pre_mutation(src, perms, &normalized, &params);
    let post = can_post_mutation(src, perms, &normalized, &params);
    // Both `?` before the `&&`: a denial by one phase must not hide the other's error.
    let (pre, post) = (pre?, post?);
    Ok(pre && post)
}

fn can_pre_mutation(
    src: &dyn Source,
    perms: &Permissions,
    ops: &[Op<'_>],
    params: &StaticParameters<'_>,
) -> Result<bool, WriteError> {
    for op in ops {
        // Inserts have no pre-mutation check.
        if op.action != Action::Insert && !can_do(src, perms, Phase::Pre, op, params)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn can_post_mutation(
    src: &dyn Source,
    perms: &Permissions,
    ops: &[Op<'_>],
    params: &StaticParameters<'_>,
) -> Result<bool, WriteError> {
    let mut overlay = Overlay {
        base: src,
        changes: HashMap::new(),
    };
    for op in ops {
        let spec = &op.spec;
        let value = &op.args.value;
        match op.action {
            Action::Insert => {
                primary_key(spec, value)?;
                let row = row_from_value(spec, value, None);
                if overlay.get(spec, &row)?.is_some() {
                    let change =
                        Json::Array(vec![Json::from(0), Json::Object(value.clone()), Json::Null]);
                    return Err(WriteError::RowExists(change.to_string()));
                }
                overlay.put(spec, row);
            }
            Action::Update | Action::Delete => {
                let key = key_row(spec, value)?;
                let Some(pre) = overlay.get(spec, &key)? else {
                    return Err(WriteError::PreMutationRowNotFound(
                        Json::Object(value.clone()).to_string(),
                    ));
                };
                overlay.remove(spec, &pre);
                if op.action == Action::Update {
                    overlay.put(spec, row_from_value(spec, value, Some(pre)));
                }
            }
        }
    }
    for op in ops {
        // Deletes have no post-mutation check.
        if op.action != Action::Delete && !can_do(&overlay, perms, Phase::Post, op, params)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `#canDo`: the row policy of the action and phase, then each applicable cell policy, must
/// pass for the operation's row (found by its primary key) in `src`.
fn can_do(
    src: &dyn Source,
    perms: &Permissions,
    phase: Phase,
    op: &Op<'_>,
    params: &StaticParameters<'_>,
) -> Result<bool, WriteError> {
    let table = perms.table(&op.args.table_name);
    let pk = primary_key(&op.spec, &op.args.value)?;
    let pick = |asset: &super::Asset| -> Option<Policy> {
        match (op.action, phase) {
            (Action::Insert, Phase::Post) => asset.insert.clone(),
            (Action::Update, Phase::Pre) => asset.update.as_ref()?.pre_mutation.clone(),
            (Action::Update, Phase::Post) => asset.update.as_ref()?.post_mutation.clone(),
            (Action::Delete, Phase::Pre) => asset.delete.clone(),
            _ => None,
        }
    };
    let row_policy = table.and_then(|t| t.row.as_ref()).and_then(pick);
    if !passes_policy(src, &op.spec, row_policy.as_ref(), &pk, params)? {
        return Ok(false);
    }
    for (column, asset) in table.and_then(|t| t.cell.as_ref()).into_iter().flatten() {
        // An update checks only the cells it sets.
        if op.action == Action::Update && !op.args.value.contains_key(column) {
            continue;
        }
        if let Some(policy) = pick(asset) {
            if !passes_policy(src, &op.spec, Some(&policy), &pk, params)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// `#passesPolicy`: an absent or empty policy denies; otherwise the row passes when
/// `{table, where: and(pk_i = value_i..., or(rules))}` (simplified, then bound) returns a row.
fn passes_policy(
    src: &dyn Source,
    spec: &TableSpec,
    policy: Option<&Policy>,
    pk: &[(&str, &Json)],
    params: &StaticParameters<'_>,
) -> Result<bool, WriteError> {
    let Some(policy) = policy.filter(|p| !p.is_empty()) else {
        return Ok(false);
    };
    let mut conditions: Vec<Condition> = pk
        .iter()
        .map(|(column, value)| match literal((*value).clone()) {
            Some(LiteralValue::Array(_)) | None => always_false(),
            Some(value) => Condition::Simple(SimpleCondition {
                op: SimpleOperator::Eq,
                left: ValuePosition::Column {
                    name: (*column).to_owned(),
                },
                right: ValuePosition::Literal { value },
            }),
        })
        .collect();
    conditions.push(Condition::Or {
        conditions: policy.clone(),
    });
    let query = Ast {
        schema: None,
        table: spec.name.clone(),
        alias: None,
        where_: Some(simplify(Condition::And { conditions })),
        related: None,
        start: None,
        limit: None,
        order_by: None,
    };
    let bound = bind_static_parameters(&query, params);
    Ok(!evaluate(&bound, src)?.nodes.is_empty())
}

/// `#getPrimaryKey`: the replica's primary-key columns with the operation's values.
fn primary_key<'v>(
    spec: &'v TableSpec,
    value: &'v Map<String, Json>,
) -> Result<Vec<(&'v str, &'v Json)>, WriteError> {
    spec.primary_key
        .iter()
        .filter_map(|&i| spec.columns.get(i))
        .map(|col| {
            value
                .get(&col.name)
                .map(|v| (col.name.as_str(), v))
                .ok_or_else(|| WriteError::MissingPrimaryKey {
                    column: col.name.clone(),
                    table: spec.name.clone(),
                })
        })
        .collect()
}

/// A row holding only the operation's primary-key values (for lookups by key), which must be
/// strings, numbers or booleans (`primaryKeyValueSchema`).
fn key_row(spec: &TableSpec, value: &Map<String, Json>) -> Result<Row, WriteError> {
    let mut row = vec![Value::Null; spec.columns.len()];
    for (&i, (column, v)) in spec.primary_key.iter().zip(primary_key(spec, value)?) {
        if !matches!(v, Json::String(_) | Json::Number(_) | Json::Bool(_)) {
            return Err(WriteError::InvalidPrimaryKeyValue {
                column: column.to_owned(),
                table: spec.name.clone(),
                value: v.to_string(),
            });
        }
        if let Some(slot) = row.get_mut(i) {
            *slot = json_value(v, spec.columns[i].kind);
        }
    }
    Ok(row)
}

/// The operation's value as a row of the table, over `base` (an update's pre-mutation row;
/// missing columns are null otherwise). Keys that are not columns are ignored.
fn row_from_value(spec: &TableSpec, value: &Map<String, Json>, base: Option<Row>) -> Row {
    let mut row = base.unwrap_or_else(|| vec![Value::Null; spec.columns.len()]);
    row.resize(spec.columns.len(), Value::Null);
    for (slot, col) in row.iter_mut().zip(&spec.columns) {
        if let Some(v) = value.get(&col.name) {
            *slot = json_value(v, col.kind);
        }
    }
    row
}

/// The replica's row with the operation's primary key (`#getPreMutationRow`).
fn current_row(
    src: &dyn Source,
    spec: &TableSpec,
    args: &CrudArgs,
) -> Result<Option<Row>, WriteError> {
    let key = key_row(spec, &args.value)?;
    row_by_key(src, spec, &key)
}

fn key_eq(spec: &TableSpec, key: &Row) -> Vec<(usize, Value)> {
    spec.primary_key
        .iter()
        .map(|&i| (i, key.get(i).cloned().unwrap_or(Value::Null)))
        .collect()
}

fn row_by_key(src: &dyn Source, spec: &TableSpec, key: &Row) -> Result<Option<Row>, WriteError> {
    let eq = key_eq(spec, key);
    Ok(src.fetch(&spec.name, &eq)?.into_iter().find(|r| {
        eq.iter()
            .all(|(c, v)| r.get(*c).is_some_and(|x| x.sql_eq(v)))
    }))
}

/// The replica with a mutation's changes applied: rows of changed tables by primary-key JSON,
/// `None` where deleted.
struct Overlay<'a> {
    base: &'a dyn Source,
    changes: HashMap<String, BTreeMap<String, Option<Row>>>,
}

impl Overlay<'_> {
    /// The current row with `key`'s primary-key values.
    fn get(&self, spec: &TableSpec, key: &Row) -> Result<Option<Row>, WriteError> {
        if let Some(changed) = self
            .changes
            .get(&spec.name)
            .and_then(|rows| rows.get(&row_key_json(spec, key)))
        {
            return Ok(changed.clone());
        }
        row_by_key(self.base, spec, key)
    }

    fn put(&mut self, spec: &TableSpec, row: Row) {
        let key = row_key_json(spec, &row);
        self.changes
            .entry(spec.name.clone())
            .or_default()
            .insert(key, Some(row));
    }

    fn remove(&mut self, spec: &TableSpec, row: &Row) {
        let key = row_key_json(spec, row);
        self.changes
            .entry(spec.name.clone())
            .or_default()
            .insert(key, None);
    }
}

impl Source for Overlay<'_> {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.base.table(name)
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        let base = self.base.fetch(table, eq)?;
        let Some(changed) = self.changes.get(table) else {
            return Ok(base);
        };
        let spec = self
            .base
            .table(table)
            .ok_or_else(|| ZqlError::UnknownTable(table.to_owned()))?;
        let mut rows: Vec<Row> = base
            .into_iter()
            .filter(|r| !changed.contains_key(&row_key_json(&spec, r)))
            .collect();
        rows.extend(
            changed
                .values()
                .flatten()
                .filter(|r| {
                    eq.iter()
                        .all(|(c, v)| r.get(*c).is_some_and(|x| x.sql_eq(v)))
                })
                .cloned(),
        );
        Ok(rows)
    }

    fn fetch_in(
        &self,
        table: &str,
        column: usize,
        values: &[Value],
        eq: &[(usize, Value)],
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        if self.changes.contains_key(table) {
            return Ok(None);
        }
        self.base.fetch_in(table, column, values, eq)
    }

    fn fetch_ordered(
        &self,
        table: &str,
        eq: &[(usize, Value)],
        order: &[(usize, Direction)],
        cursor: Option<(&[Value], bool)>,
        limit: usize,
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        if self.changes.contains_key(table) {
            return Ok(None);
        }
        self.base.fetch_ordered(table, eq, order, cursor, limit)
    }
}
