//! Incremental maintenance of one query's result: the rows a client needs, kept up to date
//! from row changes instead of re-running the query.
//!
//! A query's result is the sum of its roots' subtrees: each root row in the view (the top
//! level's window when it has a limit) reaches a fixed set of rows through its related
//! subqueries, junction hops and EXISTS conditions, and that set depends only on the root row
//! and the rows it reads. So a change can alter the result only through the roots it touches:
//! a changed row of the top table is a root itself; a changed row of a subquery level touches
//! the roots above it, found by walking its join keys up level by level (with the row's old
//! values and its new ones, so roots it leaves and roots it joins are both found). Each
//! touched root is re-placed: taken out of the window with its subtree, tested again against
//! the current source, put back (subtree recomputed) when it still belongs, and the window is
//! then trimmed to its limit or refilled from the rows past its old bound. Roots no change
//! reaches are left alone: an unaffected query costs a filter test per changed row, and an
//! affected one the subtrees of the roots touched, not a re-run.
//!
//! The from-scratch evaluator (`eval`) defines the semantics, and this module uses it for
//! every test and subtree, so the two cannot disagree on a rule; the differential tests
//! check the window bookkeeping against fresh evaluations after every change.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};

use super::ast::Ast;
use super::error::ZqlError;
use super::eval::{row_key_json, Evaluator, FastMap, RowCounts, Source};
use super::filter::Filter;
use super::plan::{compare_rows, compile, Join, Level, Plan};
use super::value::{Row, Value};

pub use super::rowkey::RowKey;

/// One row's net change over a batch of upstream versions: its state before the batch and
/// after it (`None`: absent). A primary-key change is two changes, one per key.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    pub table: String,
    pub old: Option<Row>,
    pub new: Option<Row>,
}

/// A step from a level to one of its subquery levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Related(usize),
    Condition(usize),
}

/// A maintained query.
#[derive(Clone)]
pub struct LiveQuery {
    plan: std::rc::Rc<Plan>,
    /// Every table the query reads, and the paths from the root to the levels reading each.
    paths: HashMap<String, Vec<Vec<Step>>>,
    /// The roots in the view, in the query's order.
    window: Vec<Row>,
    /// Whether rows past the window's last may exist (it was cut by the limit).
    window_cut: bool,
    /// Per root (by key JSON): the rows its subtree reaches, with multiplicities.
    subtrees: FastMap<String, Vec<(RowKey, u32)>>,
    /// The sum of the subtrees: every row the client needs, with its latest contents.
    counts: RowCounts,
}

impl LiveQuery {
    /// Compiles and hydrates `ast` against `src`.
    pub fn hydrate(ast: &Ast, src: &dyn Source) -> Result<Self, ZqlError> {
        let plan = std::rc::Rc::new(compile(ast, src)?);
        let mut paths = HashMap::new();
        collect_paths(&plan.root, &mut Vec::new(), &mut paths);
        let mut q = LiveQuery {
            plan,
            paths,
            window: Vec::new(),
            window_cut: false,
            subtrees: FastMap::default(),
            counts: FastMap::default(),
        };
        let mut ev = Evaluator::new(src);
        let plan = q.plan.clone();
        let root = &plan.root;
        let limit = window_limit(root);
        let first = match root.limit {
            Some(_) => {
                let cursor = root
                    .start
                    .as_ref()
                    .map(|s| (s.values.clone(), !s.exclusive));
                ev.first_members(root, &[], cursor, limit.saturating_add(1))?
            }
            None => None,
        };
        let mut members = match first {
            Some(rows) => rows,
            None => {
                let mut all = ev.members(root, &[])?;
                all.sort_by(|a, b| compare_rows(&root.order, a, b));
                all
            }
        };
        q.window_cut = members.len() > limit;
        members.truncate(limit);
        ev.prefetch_related(root, &members)?;
        for row in &members {
            q.add_subtree(&mut ev, row, None)?;
        }
        q.window = members;
        q.check();
        Ok(q)
    }

    /// Every row the client needs, with how many paths reach it.
    pub fn rows(&self) -> &RowCounts {
        &self.counts
    }

    /// The root rows of the view, in order.
    pub fn roots(&self) -> &[Row] {
        &self.window
    }

    /// The (table, columns) this query looks rows up by: each subquery's child columns
    /// (hydration reads children by them) and parent columns (a changed child finds its
    /// parents by them).
    pub fn lookups(&self) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        collect_lookups(&self.plan.root, &mut out);
        out.sort();
        out.dedup();
        out
    }

    /// Whether a change to `table` can concern this query at all.
    pub fn reads(&self, table: &str) -> bool {
        self.paths.contains_key(table)
    }

    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.paths.keys().map(String::as_str)
    }

    /// The root table, its `column = value` conjuncts (by column name: every root row of the
    /// view holds those values, so a row holding none of them neither before nor after a
    /// change leaves the roots as they are), and whether the root table is also read below
    /// the root (then any of its rows may matter).
    pub fn root_constraints(&self) -> (&str, Vec<(&str, &Value)>, bool) {
        let root = &self.plan.root;
        let constraints = root
            .pushdown
            .iter()
            .map(|(c, v)| (root.spec.columns[*c].name.as_str(), v))
            .collect();
        let below = self
            .paths
            .get(&root.spec.name)
            .is_some_and(|paths| paths.iter().any(|p| !p.is_empty()));
        (root.spec.name.as_str(), constraints, below)
    }

    /// Applies a batch of changes; `src` is already in the state after all of them. Returns
    /// the keys whose count or contents may have changed (look them up in `rows`).
    pub fn push(
        &mut self,
        changes: &[RowChange],
        src: &dyn Source,
    ) -> Result<HashSet<RowKey>, ZqlError> {
        let mut ev = Evaluator::new(src);
        let mut roots: BTreeMap<String, Row> = BTreeMap::new();
        for change in changes {
            let Some(paths) = self.paths.get(&change.table) else {
                continue;
            };
            for path in paths {
                for row in change.old.iter().chain(change.new.iter()) {
                    self.roots_above(&mut ev, path, row, &mut roots)?;
                }
            }
        }
        let mut touched = HashSet::new();
        if !roots.is_empty() {
            self.replace_roots(&mut ev, &roots, &mut touched)?;
        }
        self.check();
        Ok(touched)
    }

    /// Adds to `out` every root above `row`, a row of the level at `path`, by key JSON (with
    /// some state of the row: only its key columns are used).
    fn roots_above(
        &self,
        ev: &mut Evaluator<'_>,
        path: &[Step],
        row: &Row,
        out: &mut BTreeMap<String, Row>,
    ) -> Result<(), ZqlError> {
        let level = level_at(&self.plan.root, path);
        if row.len() != level.spec.columns.len() || !may_belong(level, row) {
            return Ok(());
        }
        let Some((last, up)) = path.split_last() else {
            out.entry(row_key_json(&level.spec, row))
                .or_insert_with(|| row.clone());
            return Ok(());
        };
        let parent = level_at(&self.plan.root, up);
        let join = step_join(parent, *last);
        let Some(eq) = parent_constraint(join, row) else {
            return Ok(()); // a null join key reaches no parent
        };
        // Below related subqueries only (no EXISTS on the way up), a child change cannot
        // bring a parent into the view: only parents the client has matter, and when the
        // join lands on the parent's key they are found in this query's rows, not the source.
        if path.iter().all(|s| matches!(s, Step::Related(_))) {
            if let Some(key) = key_json_of(parent, join, &eq) {
                if let Some((p, _)) = self.counts.get(&RowKey::new(&parent.spec.name, key)) {
                    let p = p.clone();
                    self.roots_above(ev, up, &p, out)?;
                }
                return Ok(());
            }
        }
        // Otherwise every parent row above this one (a parent outside the window may enter
        // it through an EXISTS), with the cheap tests applied first.
        let parents = ev.source().fetch(&parent.spec.name, &eq)?;
        for p in parents {
            if p.len() == parent.spec.columns.len() && eq.iter().all(|(c, v)| p[*c].sql_eq(v)) {
                self.roots_above(ev, up, &p, out)?;
            }
        }
        Ok(())
    }

    /// Takes the touched roots out, tests them again, and rebuilds the window.
    fn replace_roots(
        &mut self,
        ev: &mut Evaluator<'_>,
        roots: &BTreeMap<String, Row>,
        touched: &mut HashSet<RowKey>,
    ) -> Result<(), ZqlError> {
        let plan = self.plan.clone();
        let root = &plan.root;
        let limit = window_limit(root);
        // Every member past the old bound is untouched and stays out, or is touched and is
        // found again by the refill below.
        let old_bound = if self.window_cut {
            self.window.last().cloned()
        } else {
            None
        };
        let spec = root.spec.clone();
        let mut kept = Vec::with_capacity(self.window.len());
        for row in std::mem::take(&mut self.window) {
            if roots.contains_key(&row_key_json(&spec, &row)) {
                self.remove_subtree(&row, touched);
            } else {
                kept.push(row);
            }
        }
        let mut entering = Vec::new();
        for some_state in roots.values() {
            let Some(row) = fetch_current(ev, root, some_state)? else {
                continue;
            };
            let inside = old_bound
                .as_ref()
                .is_none_or(|b| compare_rows(&root.order, &row, b) != Ordering::Greater);
            if inside && ev.admits(root, &row)? {
                entering.push(row);
            }
        }
        let mut entering_keys: HashSet<String> =
            entering.iter().map(|r| row_key_json(&spec, r)).collect();
        let mut window = merge_sorted(&root.order, kept, entering);
        let mut cut = self.window_cut;
        if window.len() > limit {
            for evicted in window.drain(limit..) {
                if !entering_keys.remove(&row_key_json(&spec, &evicted)) {
                    self.remove_subtree(&evicted, touched);
                }
            }
            cut = true;
        } else if window.len() < limit && self.window_cut {
            let after = window.last().cloned();
            let more = next_members(ev, root, after.as_ref(), limit - window.len())?;
            cut = more.cut;
            entering_keys.extend(more.rows.iter().map(|r| row_key_json(&spec, r)));
            window.extend(more.rows);
        }
        let entering: Vec<Row> = window
            .iter()
            .filter(|r| entering_keys.contains(&row_key_json(&spec, r)))
            .cloned()
            .collect();
        ev.prefetch_related(root, &entering)?;
        for row in &window {
            if entering_keys.contains(&row_key_json(&spec, row)) {
                self.add_subtree(ev, row, Some(&mut *touched))?;
            }
        }
        self.window = window;
        self.window_cut = cut;
        Ok(())
    }

    /// Adds a root's subtree to the counts; `touched` (None while hydrating, when every row
    /// is new) collects the keys it reaches.
    fn add_subtree(
        &mut self,
        ev: &mut Evaluator<'_>,
        row: &Row,
        mut touched: Option<&mut HashSet<RowKey>>,
    ) -> Result<(), ZqlError> {
        let plan = self.plan.clone();
        let root = &plan.root;
        let key = row_key_json(&root.spec, row);
        let reached = ev.subtree(root, row.clone())?;
        let mut list = Vec::with_capacity(reached.len());
        for (k, (r, n)) in reached {
            // The key the counts already hold, when they do: every copy of a row's key
            // (touched sets, the groups' records) then shares one, and compares by pointer.
            let k = match self.counts.entry(k) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let entry = e.get_mut();
                    entry.0 = r;
                    entry.1 += n;
                    e.key().clone()
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    let k = e.key().clone();
                    e.insert((r, n));
                    k
                }
            };
            if let Some(touched) = touched.as_deref_mut() {
                touched.insert(k.clone());
            }
            list.push((k, n));
        }
        let previous = self.subtrees.insert(key, list);
        debug_assert!(previous.is_none(), "a root added twice");
        Ok(())
    }

    fn remove_subtree(&mut self, row: &Row, touched: &mut HashSet<RowKey>) {
        let key = row_key_json(&self.plan.root.spec, row);
        let Some(list) = self.subtrees.remove(&key) else {
            debug_assert!(false, "a root without a subtree");
            return;
        };
        for (k, n) in list {
            if let Some(entry) = self.counts.get_mut(&k) {
                debug_assert!(entry.1 >= n);
                entry.1 = entry.1.saturating_sub(n);
                if entry.1 == 0 {
                    self.counts.remove(&k);
                }
            }
            touched.insert(k);
        }
    }

    /// Postconditions, in debug builds: the window is ordered, within its limit, and has
    /// exactly one subtree per root.
    fn check(&self) {
        let root = &self.plan.root;
        debug_assert!(self.window.len() <= window_limit(root));
        debug_assert!(self
            .window
            .windows(2)
            .all(|w| compare_rows(&root.order, &w[0], &w[1]) == Ordering::Less));
        debug_assert_eq!(self.window.len(), self.subtrees.len());
    }
}

fn window_limit(level: &Level) -> usize {
    level
        .limit
        .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX))
}

fn collect_paths(level: &Level, path: &mut Vec<Step>, out: &mut HashMap<String, Vec<Vec<Step>>>) {
    out.entry(level.spec.name.clone())
        .or_default()
        .push(path.clone());
    for (i, rel) in level.related.iter().enumerate() {
        path.push(Step::Related(i));
        collect_paths(&rel.join.child, path, out);
        path.pop();
    }
    for (i, cond) in level.conditions.iter().enumerate() {
        path.push(Step::Condition(i));
        collect_paths(&cond.join.child, path, out);
        path.pop();
    }
}

fn collect_lookups(level: &Level, out: &mut Vec<(String, Vec<String>)>) {
    let joins = level
        .related
        .iter()
        .map(|r| &r.join)
        .chain(level.conditions.iter().map(|c| &c.join));
    for join in joins {
        let names = |spec: &super::schema::TableSpec, cols: &[usize]| -> Vec<String> {
            cols.iter().map(|&c| spec.columns[c].name.clone()).collect()
        };
        let child = &join.child.spec;
        out.push((child.name.clone(), names(child, &join.child_columns)));
        out.push((
            level.spec.name.clone(),
            names(&level.spec, &join.parent_columns),
        ));
        collect_lookups(&join.child, out);
    }
}

fn step_join(level: &Level, step: Step) -> &Join {
    match step {
        Step::Related(i) => &level.related[i].join,
        Step::Condition(i) => &level.conditions[i].join,
    }
}

fn level_at<'a>(root: &'a Level, path: &[Step]) -> &'a Level {
    path.iter()
        .fold(root, |level, &step| &step_join(level, step).child)
}

/// The parent constraint that reaches `child`, or None when a join value is null.
fn parent_constraint(join: &Join, child: &Row) -> Option<Vec<(usize, Value)>> {
    join.child_columns
        .iter()
        .zip(&join.parent_columns)
        .map(|(&c, &p)| {
            let v = &child[c];
            (!v.is_null()).then(|| (p, v.clone()))
        })
        .collect()
}

/// The key JSON (`row_key_json`) of the parent row that `eq` pins, when `eq` covers exactly
/// the parent's primary key with values of the same column types (so the JSON is the one
/// the parent's own row would give).
fn key_json_of(parent: &Level, join: &Join, eq: &[(usize, Value)]) -> Option<String> {
    let spec = &parent.spec;
    if eq.len() != spec.primary_key.len() {
        return None;
    }
    let child = &join.child.spec;
    let same_types = join
        .parent_columns
        .iter()
        .zip(&join.child_columns)
        .all(|(&p, &c)| spec.columns[p].pg_type_oid == child.columns[c].pg_type_oid);
    if !same_types {
        return None;
    }
    let mut out = String::from("{");
    for (i, &pk) in spec.primary_key.iter().enumerate() {
        let (_, v) = eq.iter().find(|(c, _)| *c == pk)?;
        if i > 0 {
            out.push(',');
        }
        super::value::write_json_string(&spec.columns[pk].name, &mut out);
        out.push(':');
        v.write_json(&mut out);
    }
    out.push('}');
    Some(out)
}

/// A cheap over-approximation of `level` admitting `row`: its constraints and its simple
/// conditions (EXISTS counted as possibly true). A row failing it before and after a
/// change cannot have been, nor become, part of that level.
fn may_belong(level: &Level, row: &Row) -> bool {
    level.pushdown.iter().all(|(c, v)| row[*c].sql_eq(v))
        && level.filter.as_ref().is_none_or(|f| may_hold(f, row))
}

fn may_hold(filter: &Filter, row: &Row) -> bool {
    match filter {
        Filter::Const(b) => *b,
        Filter::Simple(p) => p.holds(row),
        Filter::And(fs) => fs.iter().all(|f| may_hold(f, row)),
        Filter::Or(fs) => fs.iter().any(|f| may_hold(f, row)),
        Filter::Exists { .. } => true,
    }
}

/// The current row of `level` with the primary key of `some_state`, if any.
fn fetch_current(
    ev: &Evaluator<'_>,
    level: &Level,
    some_state: &Row,
) -> Result<Option<Row>, ZqlError> {
    let spec = &level.spec;
    let eq: Vec<(usize, Value)> = spec
        .primary_key
        .iter()
        .map(|&pk| (pk, some_state[pk].clone()))
        .collect();
    let rows = ev.source().fetch(&spec.name, &eq)?;
    Ok(rows.into_iter().find(|r| {
        r.len() == spec.columns.len() && eq.iter().all(|(c, v)| r[*c].compare(v).is_eq())
    }))
}

struct NextMembers {
    rows: Vec<Row>,
    /// More members exist past the last one returned.
    cut: bool,
}

/// The first `n` members of `level` strictly after `after` (from the start when None).
fn next_members(
    ev: &mut Evaluator<'_>,
    level: &Level,
    after: Option<&Row>,
    n: usize,
) -> Result<NextMembers, ZqlError> {
    let cursor = after.map(|r| {
        (
            level.order.iter().map(|(c, _)| r[*c].clone()).collect(),
            false,
        )
    });
    // One more than asked tells whether more exist.
    if let Some(mut rows) = ev.first_members(level, &[], cursor, n.saturating_add(1))? {
        let cut = rows.len() > n;
        rows.truncate(n);
        return Ok(NextMembers { rows, cut });
    }
    let mut rows = ev.members(level, &[])?;
    if let Some(after) = after {
        rows.retain(|r| compare_rows(&level.order, r, after) == Ordering::Greater);
    }
    let cut = rows.len() > n;
    if cut {
        rows.select_nth_unstable_by(n - 1, |a, b| compare_rows(&level.order, a, b));
        rows.truncate(n);
    }
    rows.sort_by(|a, b| compare_rows(&level.order, a, b));
    Ok(NextMembers { rows, cut })
}

fn merge_sorted(
    order: &[(usize, super::ast::Direction)],
    a: Vec<Row>,
    mut b: Vec<Row>,
) -> Vec<Row> {
    b.sort_by(|x, y| compare_rows(order, x, y));
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut b = b.into_iter().peekable();
    for row in a {
        while let Some(next) = b.next_if(|x| compare_rows(order, x, &row) == Ordering::Less) {
            out.push(next);
        }
        out.push(row);
    }
    out.extend(b);
    out
}
