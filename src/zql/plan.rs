//! Compiling a wire AST against the replica's table specs: names become column positions,
//! orderings are completed with the primary key, literals become values and the cheap
//! equalities are set aside to be pushed into `Source::fetch`.

use std::cmp::Ordering;
use std::rc::Rc;

use super::ast::{
    Ast, Bound, Condition, CorrelatedSubquery, CorrelatedSubqueryCondition, Direction,
    ExistsOperator, LiteralValue, SimpleCondition, SimpleOperator, System, ValuePosition,
};
use super::error::ZqlError;
use super::eval::Source;
use super::filter::{number_value, Filter, SimplePredicate, Test};
use super::like::LikePattern;
use super::schema::{ColumnKind, TableSpec};
use super::value::{Row, Value};

/// How many child rows a (non-flipped) EXISTS keeps and syncs: `EXISTS_LIMIT` in the client.
pub const EXISTS_ROWS_MAX: u64 = 3;
/// The same for subqueries added by permission rules (`PERMISSIONS_EXISTS_LIMIT`).
pub const PERMISSIONS_EXISTS_ROWS_MAX: u64 = 1;
/// Deepest nesting of subqueries accepted; bounds the evaluator's recursion.
pub const SUBQUERY_DEPTH_MAX: usize = 32;

/// A query ready to evaluate against the source it was compiled for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) root: Level,
}

/// One AST level: a table read with its filter, ordering, window and subqueries.
#[derive(Debug, Clone)]
pub(crate) struct Level {
    pub spec: Rc<TableSpec>,
    /// The completed ordering (user order, then missing primary-key columns ascending).
    pub order: Vec<(usize, Direction)>,
    pub start: Option<StartBound>,
    pub limit: Option<u64>,
    pub filter: Option<Filter>,
    /// `column = value` conjuncts of `filter`, handed to the source as constraints.
    pub pushdown: Vec<(usize, Value)>,
    pub related: Vec<Related>,
    /// Correlated-subquery conditions of `filter`, indexed by `Filter::Exists::condition`.
    pub conditions: Vec<SubqueryCondition>,
}

#[derive(Debug, Clone)]
pub(crate) struct StartBound {
    /// The cursor's values of the ordering columns, aligned with `Level::order`.
    pub values: Vec<Value>,
    pub exclusive: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Join {
    pub parent_columns: Vec<usize>,
    pub child_columns: Vec<usize>,
    pub child: Box<Level>,
}

#[derive(Debug, Clone)]
pub(crate) struct Related {
    pub alias: String,
    pub join: Join,
    pub hidden: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct SubqueryCondition {
    /// Unique within the plan: keys the per-evaluation cache of child rows.
    pub id: usize,
    pub join: Join,
    /// Rows under permission subqueries decide membership but are never synced.
    pub permissions: bool,
}

pub(crate) fn compare_rows(order: &[(usize, Direction)], a: &Row, b: &Row) -> Ordering {
    for &(column, direction) in order {
        let ord = a[column].compare(&b[column]);
        let ord = match direction {
            Direction::Asc => ord,
            Direction::Desc => ord.reverse(),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

impl StartBound {
    /// Whether `row` is at or after the cursor (strictly after when exclusive).
    pub fn admits(&self, order: &[(usize, Direction)], row: &Row) -> bool {
        debug_assert_eq!(self.values.len(), order.len());
        let mut ord = Ordering::Equal;
        for (&(column, direction), bound) in order.iter().zip(&self.values) {
            let c = bound.compare(&row[column]);
            ord = match direction {
                Direction::Asc => c,
                Direction::Desc => c.reverse(),
            };
            if ord != Ordering::Equal {
                break;
            }
        }
        if self.exclusive {
            ord == Ordering::Less
        } else {
            ord != Ordering::Greater
        }
    }
}

/// Compiles `ast` against the tables `src` knows.
pub fn compile(ast: &Ast, src: &dyn Source) -> Result<Plan, ZqlError> {
    let mut compiler = Compiler {
        src,
        next_condition_id: 0,
    };
    let root = compiler.level(ast, 0)?;
    Ok(Plan { root })
}

struct Compiler<'a> {
    src: &'a dyn Source,
    next_condition_id: usize,
}

impl Compiler<'_> {
    fn level(&mut self, ast: &Ast, depth: usize) -> Result<Level, ZqlError> {
        if depth > SUBQUERY_DEPTH_MAX {
            return Err(ZqlError::TooDeep {
                depth_max: SUBQUERY_DEPTH_MAX,
            });
        }
        let spec = self.table(ast)?;
        let order = complete_ordering(&spec, ast.order_by.as_deref().unwrap_or(&[]))?;
        let start = ast.start.as_ref().map(|b| start_bound(&spec, &order, b));
        let mut conditions = Vec::new();
        let filter = match &ast.where_ {
            Some(c) => Some(self.condition(&spec, c, &mut conditions, depth)?),
            None => None,
        };
        let pushdown = filter
            .as_ref()
            .map(|f| pushdown_equalities(&spec, f))
            .unwrap_or_default();
        let mut related: Vec<Related> = Vec::new();
        for r in ast.related.iter().flatten() {
            if r.system == Some(System::Permissions) {
                // Never synced and not part of the client's view: nothing to evaluate.
                continue;
            }
            let rel = self.related(&spec, r, depth)?;
            // Duplicate aliases: the last entry wins (as in the client's builder).
            related.retain(|existing| existing.alias != rel.alias);
            related.push(rel);
        }
        Ok(Level {
            spec,
            order,
            start,
            limit: ast.limit,
            filter,
            pushdown,
            related,
            conditions,
        })
    }

    fn table(&self, ast: &Ast) -> Result<Rc<TableSpec>, ZqlError> {
        if let Some(spec) = self.src.table(&ast.table) {
            return Ok(spec);
        }
        if let Some(schema) = ast.schema.as_deref().filter(|s| *s != "public") {
            if let Some(spec) = self.src.table(&format!("{schema}.{}", ast.table)) {
                return Ok(spec);
            }
        }
        Err(ZqlError::UnknownTable(ast.table.clone()))
    }

    fn related(
        &mut self,
        parent: &TableSpec,
        r: &CorrelatedSubquery,
        depth: usize,
    ) -> Result<Related, ZqlError> {
        let join = self.join(parent, r, depth)?;
        let alias = r
            .subquery
            .alias
            .clone()
            .unwrap_or_else(|| r.subquery.table.clone());
        Ok(Related {
            alias,
            join,
            hidden: r.hidden == Some(true),
        })
    }

    fn join(
        &mut self,
        parent: &TableSpec,
        r: &CorrelatedSubquery,
        depth: usize,
    ) -> Result<Join, ZqlError> {
        let child = self.level(&r.subquery, depth + 1)?;
        let corr = &r.correlation;
        if corr.parent_field.len() != corr.child_field.len() {
            return Err(ZqlError::InvalidAst(format!(
                "correlation between '{}' and '{}' has {} parent fields but {} child fields",
                parent.name,
                child.spec.name,
                corr.parent_field.len(),
                corr.child_field.len()
            )));
        }
        let parent_columns = columns(parent, &corr.parent_field)?;
        let child_columns = columns(&child.spec, &corr.child_field)?;
        Ok(Join {
            parent_columns,
            child_columns,
            child: Box::new(child),
        })
    }

    fn condition(
        &mut self,
        spec: &TableSpec,
        c: &Condition,
        conditions: &mut Vec<SubqueryCondition>,
        depth: usize,
    ) -> Result<Filter, ZqlError> {
        match c {
            Condition::Simple(s) => simple(spec, s),
            Condition::And { conditions: cs } => Ok(Filter::And(
                cs.iter()
                    .map(|c| self.condition(spec, c, conditions, depth))
                    .collect::<Result<_, _>>()?,
            )),
            Condition::Or { conditions: cs } => Ok(Filter::Or(
                cs.iter()
                    .map(|c| self.condition(spec, c, conditions, depth))
                    .collect::<Result<_, _>>()?,
            )),
            Condition::CorrelatedSubquery(csq) => self.exists(spec, csq, conditions, depth),
        }
    }

    fn exists(
        &mut self,
        spec: &TableSpec,
        csq: &CorrelatedSubqueryCondition,
        conditions: &mut Vec<SubqueryCondition>,
        depth: usize,
    ) -> Result<Filter, ZqlError> {
        let negate = csq.op == ExistsOperator::NotExists;
        let mut join = self.join(spec, &csq.related, depth)?;
        if join.child.limit == Some(0) {
            // No child can exist: a constant, and no rows to sync.
            return Ok(Filter::Const(negate));
        }
        let permissions = csq.related.system == Some(System::Permissions);
        // A flipped EXISTS keeps (and syncs) every matching child; otherwise the client caps
        // the child at a few rows, since only their existence matters.
        let flipped = csq.flip == Some(true) && !negate;
        if !flipped {
            join.child.limit = Some(if permissions {
                PERMISSIONS_EXISTS_ROWS_MAX
            } else {
                EXISTS_ROWS_MAX
            });
        }
        let id = self.next_condition_id;
        self.next_condition_id += 1;
        conditions.push(SubqueryCondition {
            id,
            join,
            permissions,
        });
        Ok(Filter::Exists {
            condition: conditions.len() - 1,
            negate,
        })
    }
}

fn columns(spec: &TableSpec, names: &[String]) -> Result<Vec<usize>, ZqlError> {
    names.iter().map(|n| column(spec, n)).collect()
}

fn column(spec: &TableSpec, name: &str) -> Result<usize, ZqlError> {
    spec.column_index(name)
        .ok_or_else(|| ZqlError::UnknownColumn {
            table: spec.name.clone(),
            column: name.to_owned(),
        })
}

/// `completeOrdering`: the user's ordering, then every missing primary-key column ascending.
fn complete_ordering(
    spec: &TableSpec,
    order_by: &[(String, Direction)],
) -> Result<Vec<(usize, Direction)>, ZqlError> {
    let mut order = Vec::with_capacity(order_by.len() + spec.primary_key.len());
    for (name, direction) in order_by {
        order.push((column(spec, name)?, *direction));
    }
    for &pk in &spec.primary_key {
        if !order.iter().any(|&(c, _)| c == pk) {
            order.push((pk, Direction::Asc));
        }
    }
    Ok(order)
}

fn start_bound(spec: &TableSpec, order: &[(usize, Direction)], bound: &Bound) -> StartBound {
    // The client reads only the ordering columns of the cursor row; a missing one is
    // `undefined`, which orders as null.
    let values = order
        .iter()
        .map(|&(c, _)| {
            let col = &spec.columns[c];
            bound
                .row
                .get(&col.name)
                .map(|v| json_value(v, col.kind))
                .unwrap_or(Value::Null)
        })
        .collect();
    StartBound {
        values,
        exclusive: bound.exclusive,
    }
}

/// A JSON value (from a cursor row) as a column value of the given kind.
pub(crate) fn json_value(v: &serde_json::Value, kind: ColumnKind) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Null,
        _ if kind == ColumnKind::Json => Value::Json(v.to_string()),
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => number_value(n),
        J::String(s) => Value::Text(s.clone()),
        J::Array(_) | J::Object(_) => Value::Json(v.to_string()),
    }
}

fn scalar_literal(l: &LiteralValue, op: SimpleOperator) -> Result<Value, ZqlError> {
    Ok(match l {
        LiteralValue::Null => Value::Null,
        LiteralValue::Bool(b) => Value::Bool(*b),
        LiteralValue::Number(n) => number_value(n),
        LiteralValue::String(s) => Value::Text(s.clone()),
        LiteralValue::Array(_) => {
            return Err(ZqlError::InvalidAst(format!(
                "operator {} does not take an array operand",
                op.as_str()
            )))
        }
    })
}

fn array_literal(l: &LiteralValue, op: SimpleOperator) -> Result<Vec<Value>, ZqlError> {
    let LiteralValue::Array(items) = l else {
        return Err(ZqlError::InvalidAst(format!(
            "operator {} needs an array literal on its right",
            op.as_str()
        )));
    };
    items.iter().map(|i| scalar_literal(i, op)).collect()
}

/// JavaScript `String(value)` of a LIKE pattern operand.
fn pattern_text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        other => {
            let mut s = String::new();
            other.write_json(&mut s);
            s
        }
    }
}

fn simple(spec: &TableSpec, s: &SimpleCondition) -> Result<Filter, ZqlError> {
    use SimpleOperator::*;
    let right = match &s.right {
        ValuePosition::Literal { value } => value,
        ValuePosition::Static { anchor, field } => {
            return Err(ZqlError::InvalidAst(format!(
                "static parameter {anchor}.{field:?} is not supported"
            )))
        }
        ValuePosition::Column { name } => {
            return Err(ZqlError::InvalidAst(format!(
                "the right side of {} must be a literal, not column '{name}'",
                s.op.as_str()
            )))
        }
    };
    let test = match s.op {
        In | NotIn => Test::In {
            set: array_literal(right, s.op)?,
            negate: s.op == NotIn,
        },
        op => {
            let rhs = scalar_literal(right, op)?;
            if rhs.is_null() && !matches!(op, Is | IsNot) {
                return Ok(Filter::Const(false));
            }
            scalar_test(op, rhs)?
        }
    };
    match &s.left {
        ValuePosition::Column { name } => Ok(Filter::Simple(SimplePredicate {
            column: column(spec, name)?,
            test,
        })),
        ValuePosition::Literal { value } => {
            let lhs = scalar_literal(value, s.op)?;
            Ok(Filter::Const(test.holds(&lhs)))
        }
        ValuePosition::Static { anchor, field } => Err(ZqlError::InvalidAst(format!(
            "static parameter {anchor}.{field:?} is not supported"
        ))),
    }
}

fn scalar_test(op: SimpleOperator, rhs: Value) -> Result<Test, ZqlError> {
    use Ordering::*;
    use SimpleOperator::*;
    let range = |a: Ordering, b: Option<Ordering>, rhs: Value| Test::Range {
        rhs,
        accepted: [Some(a), b],
    };
    Ok(match op {
        Is => Test::Is(rhs),
        IsNot => Test::IsNot(rhs),
        Eq => Test::Eq(rhs),
        Ne => Test::Ne(rhs),
        Lt => range(Less, None, rhs),
        Le => range(Less, Some(Equal), rhs),
        Gt => range(Greater, None, rhs),
        Ge => range(Greater, Some(Equal), rhs),
        Like | NotLike => Test::Like {
            pattern: LikePattern::new(&pattern_text(&rhs), false)?,
            negate: op == NotLike,
        },
        ILike | NotILike => Test::Like {
            pattern: LikePattern::new(&pattern_text(&rhs), true)?,
            negate: op == NotILike,
        },
        In | NotIn => unreachable_in(op)?,
    })
}

fn unreachable_in(op: SimpleOperator) -> Result<Test, ZqlError> {
    Err(ZqlError::InvalidAst(format!(
        "operator {} needs an array literal",
        op.as_str()
    )))
}

/// The `column = value` conjuncts at the top of a filter, which the source can apply as
/// indexed constraints. JSON columns are left out: their equality is not the source's.
fn pushdown_equalities(spec: &TableSpec, filter: &Filter) -> Vec<(usize, Value)> {
    let single = std::slice::from_ref(filter);
    let conjuncts = match filter {
        Filter::And(fs) => fs.as_slice(),
        _ => single,
    };
    conjuncts
        .iter()
        .filter_map(|f| match f {
            Filter::Simple(SimplePredicate {
                column,
                test: Test::Eq(v),
            }) if !v.is_null()
                && spec.columns[*column].kind != ColumnKind::Json
                && !matches!(v, Value::Json(_)) =>
            {
                Some((*column, v.clone()))
            }
            _ => None,
        })
        .collect()
}
