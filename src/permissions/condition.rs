//! `simplifyCondition` (zql/src/query/expression.ts) and `bindStaticParameters`
//! (zql/src/builder/builder.ts), which turn permission rules into plain conditions the planner
//! accepts.

use crate::zql::ast::{
    Ast, Condition, LiteralValue, SimpleCondition, SimpleOperator, StaticField, ValuePosition,
};

/// TRUE is `and[]`.
pub(crate) fn always_true() -> Condition {
    Condition::And {
        conditions: Vec::new(),
    }
}

/// FALSE is `or[]`.
pub(crate) fn always_false() -> Condition {
    Condition::Or {
        conditions: Vec::new(),
    }
}

fn is_always_true(c: &Condition) -> bool {
    matches!(c, Condition::And { conditions } if conditions.is_empty())
}

fn is_always_false(c: &Condition) -> bool {
    matches!(c, Condition::Or { conditions } if conditions.is_empty())
}

/// `simplifyCondition`, exactly: a one-element and/or is its element (simplified); otherwise
/// the simplified children are flattened one level into a parent of the same type; an `and`
/// holding FALSE is FALSE and an `or` holding TRUE is TRUE. Simple and correlated-subquery
/// conditions are returned unchanged (their subqueries are not simplified).
pub fn simplify(c: Condition) -> Condition {
    let (is_and, conditions) = match c {
        Condition::And { conditions } => (true, conditions),
        Condition::Or { conditions } => (false, conditions),
        other => return other,
    };
    if conditions.len() == 1 {
        if let Some(only) = conditions.into_iter().next() {
            return simplify(only);
        }
        return always_true(); // unreachable: one element
    }
    let mut flat = Vec::with_capacity(conditions.len());
    for child in conditions.into_iter().map(simplify) {
        match child {
            Condition::And { conditions } if is_and => flat.extend(conditions),
            Condition::Or { conditions } if !is_and => flat.extend(conditions),
            other => flat.push(other),
        }
    }
    if is_and {
        if flat.iter().any(is_always_false) {
            return always_false();
        }
        Condition::And { conditions: flat }
    } else {
        if flat.iter().any(is_always_true) {
            return always_true();
        }
        Condition::Or { conditions: flat }
    }
}

/// The anchors static parameters resolve against. An absent anchor (`None`) resolves every
/// field to null, as JavaScript `undefined` does.
#[derive(Debug, Clone, Copy, Default)]
pub struct StaticParameters<'a> {
    pub auth_data: Option<&'a serde_json::Value>,
    /// Always None on the server: zero-cache binds `preMutationRow: undefined`.
    pub pre_mutation_row: Option<&'a serde_json::Value>,
}

impl StaticParameters<'_> {
    fn anchor(&self, name: &str) -> Option<&serde_json::Value> {
        match name {
            "authData" => self.auth_data,
            "preMutationRow" => self.pre_mutation_row,
            _ => None,
        }
    }

    /// `resolveField`: `anchor[field]`, or the walk along a path (JavaScript `?.` semantics:
    /// arrays are indexed by their decimal index strings); missing gives null.
    fn resolve(&self, anchor: &str, field: &StaticField) -> serde_json::Value {
        let Some(mut at) = self.anchor(anchor) else {
            return serde_json::Value::Null;
        };
        let path: &[String] = match field {
            StaticField::One(f) => std::slice::from_ref(f),
            StaticField::Path(p) => p,
        };
        for part in path {
            let next = match at {
                serde_json::Value::Object(map) => map.get(part),
                serde_json::Value::Array(items) => index(part).and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(v) => at = v,
                None => return serde_json::Value::Null,
            }
        }
        at.clone()
    }
}

/// A JavaScript array index: a canonical decimal integer string.
fn index(s: &str) -> Option<usize> {
    let i: usize = s.parse().ok()?;
    (i.to_string() == s).then_some(i)
}

/// A resolved JSON value as a literal: None for objects and for arrays holding anything but
/// scalars (neither is a ZQL literal).
pub(crate) fn literal(v: serde_json::Value) -> Option<LiteralValue> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => LiteralValue::Null,
        J::Bool(b) => LiteralValue::Bool(b),
        J::Number(n) => LiteralValue::Number(n),
        J::String(s) => LiteralValue::String(s),
        J::Array(items) => LiteralValue::Array(
            items
                .into_iter()
                .map(|i| match i {
                    J::Array(_) | J::Object(_) => None,
                    scalar => literal(scalar),
                })
                .collect::<Option<_>>()?,
        ),
        J::Object(_) => return None,
    })
}

/// `bindStaticParameters`: every static value in the `where` of `ast`, of its related
/// subqueries and of its correlated-subquery conditions (at any depth) becomes a literal.
///
/// A bound value the planner cannot compare (an object, an array beside a scalar operator, or
/// a scalar beside IN / NOT IN) makes its comparison FALSE (`or[]`): JavaScript's comparison
/// of such values never holds for `=`, IS and the range operators (`!=` and NOT IN are also
/// made false, denying rather than allowing).
pub fn bind_static_parameters(ast: &Ast, params: &StaticParameters<'_>) -> Ast {
    Ast {
        where_: ast.where_.as_ref().map(|w| bind_condition(w, params)),
        related: ast.related.as_ref().map(|rs| {
            rs.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.subquery = Box::new(bind_static_parameters(&r.subquery, params));
                    r
                })
                .collect()
        }),
        ..clone_shallow(ast)
    }
}

/// Everything of `ast` but `where` and `related`, which the transforms rebuild.
pub(crate) fn clone_shallow(ast: &Ast) -> Ast {
    Ast {
        schema: ast.schema.clone(),
        table: ast.table.clone(),
        alias: ast.alias.clone(),
        where_: None,
        related: None,
        start: ast.start.clone(),
        limit: ast.limit,
        order_by: ast.order_by.clone(),
    }
}

fn bind_condition(c: &Condition, params: &StaticParameters<'_>) -> Condition {
    match c {
        Condition::Simple(s) => bind_simple(s, params),
        Condition::And { conditions } => Condition::And {
            conditions: conditions
                .iter()
                .map(|c| bind_condition(c, params))
                .collect(),
        },
        Condition::Or { conditions } => Condition::Or {
            conditions: conditions
                .iter()
                .map(|c| bind_condition(c, params))
                .collect(),
        },
        Condition::CorrelatedSubquery(csq) => {
            let mut csq = csq.clone();
            csq.related.subquery = Box::new(bind_static_parameters(&csq.related.subquery, params));
            Condition::CorrelatedSubquery(csq)
        }
    }
}

fn bind_simple(s: &SimpleCondition, params: &StaticParameters<'_>) -> Condition {
    let in_op = matches!(s.op, SimpleOperator::In | SimpleOperator::NotIn);
    // None: the bound value cannot take part in this comparison.
    let bind = |v: &ValuePosition, right: bool| -> Option<ValuePosition> {
        let ValuePosition::Static { anchor, field } = v else {
            return Some(v.clone());
        };
        let value = literal(params.resolve(anchor, field))?;
        let wants_array = right && in_op;
        let is_array = matches!(value, LiteralValue::Array(_));
        if is_array != wants_array {
            return None;
        }
        Some(ValuePosition::Literal { value })
    };
    match (bind(&s.left, false), bind(&s.right, true)) {
        (Some(left), Some(right)) => Condition::Simple(SimpleCondition {
            op: s.op,
            left,
            right,
        }),
        _ => always_false(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(v: serde_json::Value) -> Condition {
        serde_json::from_value(v).expect("condition")
    }

    fn col_eq(c: &str, v: i64) -> serde_json::Value {
        json!({"type":"simple","op":"=","left":{"type":"column","name":c},"right":{"type":"literal","value":v}})
    }

    #[test]
    fn simplify_true_false_and_single_elements() {
        let a = col_eq("a", 1);
        let b = col_eq("b", 2);
        // One-element and/or collapse, recursively.
        assert_eq!(
            simplify(cond(
                json!({"type":"and","conditions":[{"type":"or","conditions":[a]}]})
            )),
            cond(a.clone())
        );
        // and with FALSE is FALSE; or with TRUE is TRUE.
        assert_eq!(
            simplify(cond(
                json!({"type":"and","conditions":[a, {"type":"or","conditions":[]}]})
            )),
            always_false()
        );
        assert_eq!(
            simplify(cond(
                json!({"type":"or","conditions":[a, {"type":"and","conditions":[]}]})
            )),
            always_true()
        );
        // A TRUE inside an and flattens away (leaving a one-element and, as upstream).
        assert_eq!(
            simplify(cond(
                json!({"type":"and","conditions":[a, {"type":"and","conditions":[]}]})
            )),
            cond(json!({"type":"and","conditions":[a]}))
        );
        // Nested same-type nodes flatten one level after their own simplification.
        assert_eq!(
            simplify(cond(json!({"type":"and","conditions":[
                a, {"type":"and","conditions":[b, {"type":"and","conditions":[a, b]}]}]}))),
            cond(json!({"type":"and","conditions":[a, b, a, b]}))
        );
        // Different types do not flatten.
        assert_eq!(
            simplify(cond(
                json!({"type":"and","conditions":[a, {"type":"or","conditions":[a, b]}]})
            )),
            cond(json!({"type":"and","conditions":[a, {"type":"or","conditions":[a, b]}]}))
        );
        // The deny-all rule: and[where, or[or[]]] is FALSE.
        assert_eq!(
            simplify(cond(json!({"type":"and","conditions":[a,
                {"type":"or","conditions":[{"type":"or","conditions":[]}]}]}))),
            always_false()
        );
        // ANYONE_CAN: and[where, or[and[]]] is and[where] -> where after one more level.
        assert_eq!(
            simplify(cond(json!({"type":"and","conditions":[
                {"type":"or","conditions":[{"type":"and","conditions":[]}]}]}))),
            always_true()
        );
        assert_eq!(simplify(always_true()), always_true());
        assert_eq!(simplify(always_false()), always_false());
    }

    fn ast(where_: serde_json::Value) -> Ast {
        serde_json::from_value(json!({"table":"t","where":where_})).expect("ast")
    }

    fn static_cmp(op: &str, field: serde_json::Value) -> serde_json::Value {
        json!({"type":"simple","op":op,"left":{"type":"column","name":"owner"},
               "right":{"type":"static","anchor":"authData","field":field}})
    }

    fn bound_right(a: &Ast) -> Option<LiteralValue> {
        match a.where_.as_ref()? {
            Condition::Simple(SimpleCondition {
                right: ValuePosition::Literal { value },
                ..
            }) => Some(value.clone()),
            _ => None,
        }
    }

    #[test]
    fn binds_fields_paths_and_missing_values() {
        let auth = json!({"sub":"u1","meta":{"level":3,"roles":["a","b"]}});
        let p = StaticParameters {
            auth_data: Some(&auth),
            pre_mutation_row: None,
        };
        let b = |op, field| bind_static_parameters(&ast(static_cmp(op, field)), &p);
        assert_eq!(
            bound_right(&b("=", json!("sub"))),
            Some(LiteralValue::String("u1".into()))
        );
        assert_eq!(
            bound_right(&b("=", json!(["meta", "level"]))),
            Some(LiteralValue::Number(3.into()))
        );
        assert_eq!(
            bound_right(&b("=", json!(["meta", "roles", "1"]))),
            Some(LiteralValue::String("b".into()))
        );
        assert_eq!(
            bound_right(&b("=", json!("nope"))),
            Some(LiteralValue::Null)
        );
        assert_eq!(
            bound_right(&b("=", json!(["meta", "x", "y"]))),
            Some(LiteralValue::Null)
        );
        assert_eq!(
            bound_right(&b("=", json!(["sub", "x"]))),
            Some(LiteralValue::Null)
        );
        assert_eq!(
            bound_right(&b("IN", json!(["meta", "roles"]))),
            Some(LiteralValue::Array(vec![
                LiteralValue::String("a".into()),
                LiteralValue::String("b".into())
            ]))
        );
        // Uncomparable bindings are FALSE.
        assert_eq!(b("=", json!("meta")).where_, Some(always_false()));
        assert_eq!(
            b("=", json!(["meta", "roles"])).where_,
            Some(always_false())
        );
        assert_eq!(b("IN", json!("sub")).where_, Some(always_false()));
        // preMutationRow and unknown anchors always bind null; so does a missing anchor.
        let pre = json!({"type":"simple","op":"=","left":{"type":"column","name":"owner"},
            "right":{"type":"static","anchor":"preMutationRow","field":"owner"}});
        assert_eq!(
            bound_right(&bind_static_parameters(&ast(pre), &p)),
            Some(LiteralValue::Null)
        );
        let anon = StaticParameters::default();
        assert_eq!(
            bound_right(&bind_static_parameters(
                &ast(static_cmp("=", json!("sub"))),
                &anon
            )),
            Some(LiteralValue::Null)
        );
    }

    #[test]
    fn binds_left_side_and_inside_subqueries() {
        let auth = json!({"sub":"u1","role":"admin"});
        let p = StaticParameters {
            auth_data: Some(&auth),
            pre_mutation_row: None,
        };
        let q: Ast = serde_json::from_value(json!({
            "table":"t",
            "where":{"type":"and","conditions":[
                {"type":"simple","op":"=","left":{"type":"static","anchor":"authData","field":"role"},
                 "right":{"type":"literal","value":"admin"}},
                {"type":"correlatedSubquery","op":"EXISTS","related":{
                    "system":"permissions",
                    "correlation":{"parentField":["a"],"childField":["k"]},
                    "subquery":{"table":"u","where":static_cmp("=", json!("sub"))}}}]},
            "related":[{"correlation":{"parentField":["a"],"childField":["k"]},
                "subquery":{"table":"u","where":static_cmp("=", json!("sub"))}}]
        }))
        .expect("ast");
        let bound = bind_static_parameters(&q, &p);
        let text = serde_json::to_string(&bound).expect("json");
        assert!(!text.contains("\"static\""), "{text}");
        assert_eq!(text.matches("\"u1\"").count(), 2, "{text}");
        assert!(text.contains("{\"type\":\"literal\",\"value\":\"admin\"},\"right\""));
    }
}
