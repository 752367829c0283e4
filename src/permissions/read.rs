//! The read transform of legacy AST queries (auth/read-authorizer.ts; legacy-features.md 2.5).

use super::condition::{bind_static_parameters, clone_shallow, simplify, StaticParameters};
use super::Permissions;
use crate::zql::ast::{Ast, Condition};

/// The read transform of a legacy AST query (2.5): row.select rules ANDed at every level (root, related, EXISTS
/// subqueries), simplified, then static parameters bound from auth_data (None = anonymous: `{}`), so the result
/// has no Static values left. `perms` None = nothing deployed = {tables:{}} = deny all.
pub fn authorize_read(
    ast: &Ast,
    perms: Option<&Permissions>,
    auth_data: Option<&serde_json::Value>,
) -> Ast {
    let transformed = transform(ast, perms);
    let anonymous = serde_json::Value::Object(serde_json::Map::new());
    let params = StaticParameters {
        auth_data: Some(auth_data.unwrap_or(&anonymous)),
        pre_mutation_row: None,
    };
    bind_static_parameters(&transformed, &params)
}

/// `transformQueryInternal`: the level's select rules (a missing or empty list denies every
/// row) ANDed with its transformed `where`, and every related subquery transformed too.
fn transform(ast: &Ast, perms: Option<&Permissions>) -> Ast {
    let rules: Vec<Condition> = perms
        .and_then(|p| p.table(&ast.table))
        .and_then(|t| t.row.as_ref())
        .and_then(|r| r.select.as_ref())
        .filter(|rules| !rules.is_empty())
        .cloned()
        .unwrap_or_else(|| vec![super::condition::always_false()]);
    let mut conditions = Vec::with_capacity(2);
    if let Some(w) = &ast.where_ {
        conditions.push(transform_condition(w, perms));
    }
    conditions.push(Condition::Or { conditions: rules });
    Ast {
        where_: Some(simplify(Condition::And { conditions })),
        related: ast.related.as_ref().map(|rs| {
            rs.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.subquery = Box::new(transform(&r.subquery, perms));
                    r
                })
                .collect()
        }),
        ..clone_shallow(ast)
    }
}

/// `transformCondition`: the user's EXISTS subqueries get their tables' rules too, so that
/// they are no oracle for rows the user cannot read.
fn transform_condition(c: &Condition, perms: Option<&Permissions>) -> Condition {
    match c {
        Condition::Simple(_) => c.clone(),
        Condition::And { conditions } => Condition::And {
            conditions: conditions
                .iter()
                .map(|c| transform_condition(c, perms))
                .collect(),
        },
        Condition::Or { conditions } => Condition::Or {
            conditions: conditions
                .iter()
                .map(|c| transform_condition(c, perms))
                .collect(),
        },
        Condition::CorrelatedSubquery(csq) => {
            let mut csq = csq.clone();
            csq.related.subquery = Box::new(transform(&csq.related.subquery, perms));
            Condition::CorrelatedSubquery(csq)
        }
    }
}
