//! From-scratch ("fresh") evaluation of a query: the client-visible view and every row the
//! client needs to re-run the query locally, with how many paths reach each row.

use std::collections::HashMap;
use std::rc::Rc;

use super::ast::{Ast, Direction};
use super::error::ZqlError;
use super::filter::Filter;
use super::plan::{compare_rows, compile, Join, Level, Plan, SubqueryCondition};
use super::schema::TableSpec;
use super::value::{write_json_string, Row, Value};

/// Where rows come from (the replica, or an in-memory table in tests).
pub trait Source {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>>;
    /// Rows of `table` whose columns (by position) equal the given values under SQL equality
    /// (Value::sql_eq; an empty list = every row). Any order.
    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError>;

    /// The first `limit` rows under `eq` in `order` (the client's ordering: nulls lowest,
    /// strings by UTF-8 bytes), from the cursor on when given: rows whose `order` columns come
    /// after `cursor.0` (or at it, when `cursor.1`). None when this source cannot order; the
    /// caller then fetches everything and sorts.
    /// Rows of `table` whose `column` equals one of `values` (none null) and whose columns
    /// equal `eq`, in any order; None when this source cannot (the caller reads per value).
    fn fetch_in(
        &self,
        _table: &str,
        _column: usize,
        _values: &[Value],
        _eq: &[(usize, Value)],
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        Ok(None)
    }

    fn fetch_ordered(
        &self,
        _table: &str,
        _eq: &[(usize, Value)],
        _order: &[(usize, Direction)],
        _cursor: Option<(&[Value], bool)>,
        _limit: usize,
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        Ok(None)
    }
}

/// A row of the view with its visible relationships (junction hops already lifted).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub row: Row,
    pub relationships: Vec<(String /*alias*/, Vec<Node>)>,
}

/// The rows a client must hold, keyed by (table name, `row_key_json`), with the row and the
/// number of paths through the query tree that reach it.
pub type RowCounts = FastMap<super::RowKey, (Row, u32)>;

/// The engine's maps, keyed by row keys and table names: foldhash instead of SipHash (6% of a
/// hydration), still seeded per process since row keys come from upstream data.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// The view, in order, for tests and the client-visible result.
    pub nodes: Vec<Node>,
    /// Every row the client needs to re-run the query locally (root rows, related rows at every
    /// depth including hidden junction rows, rows of EXISTS subqueries; NOT rows under
    /// system:'permissions'), keyed by (table name, primary-key JSON as produced by `row_key_json`),
    /// with the row and how many times it was reached.
    pub rows: RowCounts,
}

pub fn evaluate(ast: &Ast, src: &dyn Source) -> Result<Evaluation, ZqlError> {
    let plan = compile(ast, src)?;
    evaluate_plan(&plan, src)
}

/// Evaluates a plan compiled (by `plan::compile`) against the same source's tables.
pub fn evaluate_plan(plan: &Plan, src: &dyn Source) -> Result<Evaluation, ZqlError> {
    let mut ev = Evaluator::new(src);
    let roots = ev.select(&plan.root, &[])?;
    let nodes = ev.build(&plan.root, roots)?;
    Ok(Evaluation {
        nodes,
        rows: ev.rows,
    })
}

/// `{"id":"i1"}`: the primary-key columns in key order, as the wire's row `id` object.
pub fn row_key_json(spec: &TableSpec, row: &Row) -> String {
    let mut out = String::from("{");
    for (i, &pk) in spec.primary_key.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_json_string(&spec.columns[pk].name, &mut out);
        out.push(':');
        row.get(pk).unwrap_or(&Value::Null).write_json(&mut out);
    }
    out.push('}');
    out
}

/// Rows asked of an ordering source at once while filling a window.
pub const ORDERED_BATCH_ROWS_MAX: usize = 1024;

/// One evaluation pass over an unchanging source (its EXISTS cache is valid only as long as
/// the source does not change). `ivm` drives it one root row at a time.
pub(crate) struct Evaluator<'a> {
    src: &'a dyn Source,
    /// Child rows of correlated-subquery conditions by (condition id, parent key values), so
    /// that parents sharing a key, and the later row sync, cost one fetch.
    exists_cache: FastMap<(usize, String), Rc<Vec<Row>>>,
    rows: RowCounts,
    /// Children read ahead by `prefetch_related`, by `prefetch_key`.
    prefetched: FastMap<String, Vec<Row>>,
    /// Count the rows reached without building view nodes (`subtree`).
    count_only: bool,
}

/// Only a misbehaving source (rows repeated, or sharing a primary key) breaks the strict
/// order of a completed ordering; checked in debug builds only.
fn has_duplicate_keys(level: &Level, rows: &[Row]) -> bool {
    let mut keys: Vec<String> = rows.iter().map(|r| row_key_json(&level.spec, r)).collect();
    keys.sort();
    keys.windows(2).any(|w| w[0] == w[1])
}

/// A source returning rows of the wrong width is broken: an error, not a panic later.
fn check_width(level: &Level, row: &Row) -> Result<(), ZqlError> {
    let width = level.spec.columns.len();
    if row.len() == width {
        return Ok(());
    }
    Err(ZqlError::Source(format!(
        "table '{}' returned a row of {} values for {} columns",
        level.spec.name,
        row.len(),
        width
    )))
}

/// Orders a level's members and keeps its limit's worth.
fn window(level: &Level, mut kept: Vec<Row>) -> Vec<Row> {
    let cmp = |a: &Row, b: &Row| compare_rows(&level.order, a, b);
    if let Some(limit) = level.limit {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        if limit == 0 {
            kept.clear();
        } else if limit < kept.len() {
            kept.select_nth_unstable_by(limit - 1, cmp);
            kept.truncate(limit);
        }
    }
    kept.sort_by(cmp);
    debug_assert!(level.limit.is_none_or(|l| kept.len() as u64 <= l));
    debug_assert!(
        kept.windows(2).all(|w| cmp(&w[0], &w[1]).is_lt()) || has_duplicate_keys(level, &kept)
    );
    kept
}

/// Parents whose children one prefetch statement reads.
pub const PREFETCH_VALUES_MAX: usize = 500;

/// Identifies one level's children for one join value: the level (by address: the plan
/// outlives the evaluator), the column and the value.
fn prefetch_key(level: &Level, column: usize, value: &Value) -> String {
    let mut key = format!("{:p}/{column}/", level as *const Level);
    value.write_json(&mut key);
    key
}

/// The child constraint for `parent`, or None when a parent key is null (matches nothing).
fn join_constraint(join: &Join, parent: &Row) -> Option<Vec<(usize, Value)>> {
    join.parent_columns
        .iter()
        .zip(&join.child_columns)
        .map(|(&p, &c)| {
            let v = &parent[p];
            (!v.is_null()).then(|| (c, v.clone()))
        })
        .collect()
}

impl<'a> Evaluator<'a> {
    pub(crate) fn new(src: &'a dyn Source) -> Self {
        Evaluator {
            src,
            exists_cache: FastMap::default(),
            rows: FastMap::default(),
            prefetched: FastMap::default(),
            count_only: false,
        }
    }

    pub(crate) fn source(&self) -> &'a dyn Source {
        self.src
    }

    /// The rows of one level under `join_eq`: filtered, ordered, windowed by start and limit.
    pub(crate) fn select(
        &mut self,
        level: &Level,
        join_eq: &[(usize, Value)],
    ) -> Result<Vec<Row>, ZqlError> {
        if let [(column, value)] = join_eq {
            let key = prefetch_key(level, *column, value);
            if let Some(rows) = self.prefetched.get(&key) {
                return Ok(rows.clone());
            }
        }
        if let Some(limit) = level.limit {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let cursor = level
                .start
                .as_ref()
                .map(|s| (s.values.clone(), !s.exclusive));
            if let Some(rows) = self.first_members(level, join_eq, cursor, limit)? {
                return Ok(rows);
            }
        }
        let kept = self.members(level, join_eq)?;
        Ok(window(level, kept))
    }

    /// Reads the children of every row of `rows` for each single-column related subquery of
    /// `level` in one statement per (up to `PREFETCH_VALUES_MAX`) parents, instead of one per
    /// parent; `select` then answers from what was read.
    pub(crate) fn prefetch_related(&mut self, level: &Level, rows: &[Row]) -> Result<(), ZqlError> {
        if rows.len() < 2 {
            return Ok(());
        }
        for rel in &level.related {
            let join = &rel.join;
            let ([parent_col], [child_col]) = (&join.parent_columns[..], &join.child_columns[..])
            else {
                continue;
            };
            let child = &join.child;
            let mut seen = std::collections::HashSet::new();
            let mut values = Vec::new();
            for row in rows {
                let v = &row[*parent_col];
                if !v.is_null() && seen.insert(prefetch_key(child, *child_col, v)) {
                    values.push(v.clone());
                }
            }
            for chunk in values.chunks(PREFETCH_VALUES_MAX) {
                let Some(fetched) =
                    self.src
                        .fetch_in(&child.spec.name, *child_col, chunk, &child.pushdown)?
                else {
                    return Ok(());
                };
                let mut by_value: HashMap<String, Vec<Row>> = HashMap::new();
                for row in fetched {
                    if let Some(v) = row.get(*child_col) {
                        by_value
                            .entry(prefetch_key(child, *child_col, v))
                            .or_default()
                            .push(row);
                    }
                }
                for v in chunk {
                    let key = prefetch_key(child, *child_col, v);
                    let candidates = by_value.remove(&key).unwrap_or_default();
                    let mut eq = vec![(*child_col, v.clone())];
                    eq.extend_from_slice(&child.pushdown);
                    let kept = self.keep_members(child, &eq, candidates)?;
                    self.prefetched.insert(key, window(child, kept));
                }
            }
        }
        Ok(())
    }

    /// The first `n` members of `level` under `join_eq` from `cursor` on (values of the
    /// ordering columns; inclusive when `.1`), read in order from the source a batch at a
    /// time, so that a window over a large table reads little more than the window. None when
    /// the source cannot read in order.
    pub(crate) fn first_members(
        &mut self,
        level: &Level,
        join_eq: &[(usize, Value)],
        mut cursor: Option<(Vec<Value>, bool)>,
        n: usize,
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        let mut eq = Vec::with_capacity(join_eq.len() + level.pushdown.len());
        eq.extend_from_slice(join_eq);
        eq.extend_from_slice(&level.pushdown);
        let mut out = Vec::new();
        if n == 0 {
            return Ok(Some(out));
        }
        let batch = n.saturating_add(n / 2).clamp(16, ORDERED_BATCH_ROWS_MAX);
        loop {
            let Some(rows) = self.src.fetch_ordered(
                &level.spec.name,
                &eq,
                &level.order,
                cursor
                    .as_ref()
                    .map(|(v, inclusive)| (v.as_slice(), *inclusive)),
                batch,
            )?
            else {
                return Ok(None);
            };
            let fetched = rows.len();
            for row in rows {
                check_width(level, &row)?;
                debug_assert!(out
                    .last()
                    .is_none_or(|l: &Row| compare_rows(&level.order, l, &row).is_lt()));
                cursor = Some((
                    level.order.iter().map(|(c, _)| row[*c].clone()).collect(),
                    false,
                ));
                if eq.iter().all(|(c, v)| row[*c].sql_eq(v)) && self.admits(level, &row)? {
                    out.push(row);
                    if out.len() == n {
                        return Ok(Some(out));
                    }
                }
            }
            if fetched < batch {
                return Ok(Some(out));
            }
        }
    }

    /// Whether `row` belongs to `level` (constraints, start cursor and filter; not the limit).
    pub(crate) fn admits(&mut self, level: &Level, row: &Row) -> Result<bool, ZqlError> {
        if !level.pushdown.iter().all(|(c, v)| row[*c].sql_eq(v)) {
            return Ok(false);
        }
        if let Some(start) = &level.start {
            if !start.admits(&level.order, row) {
                return Ok(false);
            }
        }
        match &level.filter {
            Some(filter) => self.test(level, filter, row),
            None => Ok(true),
        }
    }

    /// Every row of `level` under `join_eq` that `admits` accepts, in no order.
    pub(crate) fn members(
        &mut self,
        level: &Level,
        join_eq: &[(usize, Value)],
    ) -> Result<Vec<Row>, ZqlError> {
        let mut eq = Vec::with_capacity(join_eq.len() + level.pushdown.len());
        eq.extend_from_slice(join_eq);
        eq.extend_from_slice(&level.pushdown);
        let fetched = self.src.fetch(&level.spec.name, &eq)?;
        self.keep_members(level, &eq, fetched)
    }

    /// The rows of `fetched` that belong to `level` under `eq` (all constraints included).
    fn keep_members(
        &mut self,
        level: &Level,
        eq: &[(usize, Value)],
        fetched: Vec<Row>,
    ) -> Result<Vec<Row>, ZqlError> {
        let mut kept = Vec::new();
        for row in fetched {
            check_width(level, &row)?;
            // The source may over-approximate (SQLite affinity); equality is ours to decide.
            if !eq.iter().all(|(c, v)| row[*c].sql_eq(v)) {
                continue;
            }
            if let Some(start) = &level.start {
                if !start.admits(&level.order, &row) {
                    continue;
                }
            }
            if let Some(filter) = &level.filter {
                if !self.test(level, filter, &row)? {
                    continue;
                }
            }
            kept.push(row);
        }
        Ok(kept)
    }

    fn test(&mut self, level: &Level, filter: &Filter, row: &Row) -> Result<bool, ZqlError> {
        Ok(match filter {
            Filter::Const(b) => *b,
            Filter::Simple(p) => p.holds(row),
            Filter::And(fs) => {
                for f in fs {
                    if !self.test(level, f, row)? {
                        return Ok(false);
                    }
                }
                true
            }
            Filter::Or(fs) => {
                for f in fs {
                    if self.test(level, f, row)? {
                        return Ok(true);
                    }
                }
                false
            }
            Filter::Exists { condition, negate } => {
                let cond = &level.conditions[*condition];
                self.condition_rows(cond, row)?.is_empty() == *negate
            }
        })
    }

    fn condition_rows(
        &mut self,
        cond: &SubqueryCondition,
        parent: &Row,
    ) -> Result<Rc<Vec<Row>>, ZqlError> {
        let Some(eq) = join_constraint(&cond.join, parent) else {
            return Ok(Rc::new(Vec::new()));
        };
        let mut key = String::new();
        for (_, v) in &eq {
            v.write_json(&mut key);
            key.push(',');
        }
        if let Some(rows) = self.exists_cache.get(&(cond.id, key.clone())) {
            return Ok(rows.clone());
        }
        let rows = Rc::new(self.select(&cond.join.child, &eq)?);
        self.exists_cache.insert((cond.id, key), rows.clone());
        Ok(rows)
    }

    /// The rows reached from one row of `level` (itself included), with their counts.
    pub(crate) fn subtree(&mut self, level: &Level, row: Row) -> Result<RowCounts, ZqlError> {
        let outer = std::mem::take(&mut self.rows);
        let was = std::mem::replace(&mut self.count_only, true);
        let built = self.build(level, vec![row]);
        self.count_only = was;
        let reached = std::mem::replace(&mut self.rows, outer);
        built.map(|_| reached)
    }

    /// Builds the view nodes for `rows` of `level` and counts every row reached, walking all
    /// relationships the way zero-cache's Streamer does.
    pub(crate) fn build(&mut self, level: &Level, rows: Vec<Row>) -> Result<Vec<Node>, ZqlError> {
        self.prefetch_related(level, &rows)?;
        let mut nodes = Vec::with_capacity(if self.count_only { 0 } else { rows.len() });
        for row in rows {
            if !self.count_only {
                self.count(&level.spec, &row);
            }
            let mut relationships = Vec::with_capacity(level.related.len());
            for rel in &level.related {
                let children = match join_constraint(&rel.join, &row) {
                    Some(eq) => self.select(&rel.join.child, &eq)?,
                    None => Vec::new(),
                };
                let children = self.build(&rel.join.child, children)?;
                if self.count_only {
                    continue;
                }
                if rel.hidden {
                    lift_junction(&rel.join.child, children, &mut relationships);
                } else {
                    relationships.push((rel.alias.clone(), children));
                }
            }
            // Rows that only satisfied (or failed) a subquery condition are synced too,
            // except under permission rules; they are not part of the view.
            for cond in level.conditions.iter().filter(|c| !c.permissions) {
                let children = self.condition_rows(cond, &row)?;
                self.build(&cond.join.child, children.as_ref().clone())?;
            }
            if self.count_only {
                self.count_owned(&level.spec, row);
            } else {
                nodes.push(Node { row, relationships });
            }
        }
        Ok(nodes)
    }

    /// `count`, moving the row in instead of copying it.
    fn count_owned(&mut self, spec: &TableSpec, row: Row) {
        let key = super::RowKey::new(&spec.name, row_key_json(spec, &row));
        self.rows.entry(key).or_insert((row, 0)).1 += 1;
    }

    fn count(&mut self, spec: &TableSpec, row: &Row) {
        let key = super::RowKey::new(&spec.name, row_key_json(spec, row));
        self.rows.entry(key).or_insert_with(|| (row.clone(), 0)).1 += 1;
    }
}

/// A hidden (junction) hop is invisible in the client's view: the junction rows' own
/// relationships are merged into the parent, each kept in its subquery's order and with rows
/// reached through several junction rows shown once.
fn lift_junction(junction: &Level, nodes: Vec<Node>, into: &mut Vec<(String, Vec<Node>)>) {
    // Every target relationship shows, empty or not, as it would under a plain hop.
    let mut lifted: Vec<(String, Vec<Node>)> = junction
        .related
        .iter()
        .map(|r| (r.alias.clone(), Vec::new()))
        .collect();
    for node in nodes {
        for (alias, children) in node.relationships {
            match lifted.iter_mut().find(|(a, _)| *a == alias) {
                Some((_, list)) => list.extend(children),
                None => lifted.push((alias, children)),
            }
        }
    }
    for (alias, mut list) in lifted {
        if let Some(target) = junction.related.iter().find(|r| r.alias == alias) {
            let order = &target.join.child.order;
            list.sort_by(|a, b| compare_rows(order, &a.row, &b.row));
            list.dedup_by(|a, b| compare_rows(order, &a.row, &b.row).is_eq());
        }
        into.push((alias, list));
    }
}
