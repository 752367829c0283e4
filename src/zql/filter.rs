//! Compiled `where` predicates with the client's semantics (`zql/src/builder/filter.ts`):
//! every operator but IS / IS NOT is false when either side is null; `=` and IN are
//! JavaScript strict equality; range operators use `compareValues` (UTF-8 string order).

use std::borrow::Cow;
use std::cmp::Ordering;

use super::like::LikePattern;
use super::value::{Row, Value};

/// A compiled condition tree. `Exists` refers to the level's correlated-subquery conditions
/// by index, so that evaluation can fetch (and cache) their child rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Const(bool),
    Simple(SimplePredicate),
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Exists { condition: usize, negate: bool },
}

/// `column <test>`, with the right-hand side already a value.
#[derive(Debug, Clone, PartialEq)]
pub struct SimplePredicate {
    pub column: usize,
    pub test: Test,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Is(Value),
    IsNot(Value),
    Eq(Value),
    Ne(Value),
    /// Holds when `compare(lhs, rhs)` is one of `accepted`.
    Range {
        rhs: Value,
        accepted: [Option<Ordering>; 2],
    },
    Like {
        pattern: LikePattern,
        negate: bool,
    },
    In {
        set: Vec<Value>,
        negate: bool,
    },
}

impl SimplePredicate {
    pub fn holds(&self, row: &Row) -> bool {
        row.get(self.column).is_some_and(|lhs| self.test.holds(lhs))
    }
}

impl Test {
    /// Applies the test to a left-hand value (a column's value or a literal).
    pub fn holds(&self, lhs: &Value) -> bool {
        let lhs = js_view(lhs);
        match self {
            Test::Is(rhs) => js_strict_eq(&lhs, rhs),
            Test::IsNot(rhs) => !js_strict_eq(&lhs, rhs),
            _ if lhs.is_null() => false,
            Test::Eq(rhs) => js_strict_eq(&lhs, rhs),
            Test::Ne(rhs) => !js_strict_eq(&lhs, rhs),
            Test::Range { rhs, accepted } => {
                let ord = Some(lhs.compare(rhs));
                accepted.contains(&ord)
            }
            // The client throws on a non-string LIKE operand; such a row never matches here.
            Test::Like { pattern, negate } => match lhs.as_ref() {
                Value::Text(s) => pattern.matches(s) != *negate,
                _ => false,
            },
            Test::In { set, negate } => set.iter().any(|v| js_strict_eq(&lhs, v)) != *negate,
        }
    }
}

/// A value as the client holds it: JSON columns are parsed, so a JSON scalar compares like
/// the corresponding plain value (objects and arrays stay opaque and equal nothing).
pub fn js_view(v: &Value) -> Cow<'_, Value> {
    let Value::Json(text) = v else {
        return Cow::Borrowed(v);
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Null) => Cow::Owned(Value::Null),
        Ok(serde_json::Value::Bool(b)) => Cow::Owned(Value::Bool(b)),
        Ok(serde_json::Value::Number(n)) => Cow::Owned(number_value(&n)),
        Ok(serde_json::Value::String(s)) => Cow::Owned(Value::Text(s)),
        _ => Cow::Borrowed(v),
    }
}

/// JavaScript `===` over client values (numbers are one type; objects are never equal).
pub fn js_strict_eq(a: &Value, b: &Value) -> bool {
    use Value::*;
    match (a, b) {
        (Null, Null) => true,
        (Bool(x), Bool(y)) => x == y,
        (Int(x), Int(y)) => x == y,
        (Int(_) | Float(_), Int(_) | Float(_)) => a.compare(b) == Ordering::Equal && !is_nan(a),
        (Text(x), Text(y)) => x == y,
        _ => false,
    }
}

fn is_nan(v: &Value) -> bool {
    matches!(v, Value::Float(f) if f.is_nan())
}

/// A JSON number as a value: integers that fit stay exact.
pub fn number_value(n: &serde_json::Number) -> Value {
    match n.as_i64() {
        Some(i) => Value::Int(i),
        None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_equality() {
        assert!(js_strict_eq(&Value::Int(3), &Value::Float(3.0)));
        assert!(!js_strict_eq(&Value::Int(1), &Value::Bool(true)));
        assert!(!js_strict_eq(&Value::Text("1".into()), &Value::Int(1)));
        assert!(js_strict_eq(&Value::Null, &Value::Null));
        assert!(!js_strict_eq(
            &Value::Float(f64::NAN),
            &Value::Float(f64::NAN)
        ));
    }

    #[test]
    fn json_scalars_compare_as_values() {
        let t = Test::Is(Value::Null);
        assert!(t.holds(&Value::Json("null".into())));
        assert!(!t.holds(&Value::Json("{}".into())));
        let eq = Test::Eq(Value::Text("x".into()));
        assert!(eq.holds(&Value::Json("\"x\"".into())));
        assert!(!eq.holds(&Value::Json("[\"x\"]".into())));
    }
}
