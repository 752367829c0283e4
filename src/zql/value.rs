//! Row values and the client's ordering of them.
//!
//! The client re-runs every query locally, so the server must order values exactly as
//! `zql/src/ivm/data.ts:compareValues` does: null lowest, strings by UTF-8 bytes, numbers
//! numerically (integers and floats compare with each other), false < true.

use std::cmp::Ordering;

/// One column value of a row, as the replica stores it and the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// Integers are kept exact; on the wire they are JSON numbers.
    Int(i64),
    Float(f64),
    Text(String),
    /// json/jsonb and arrays: kept as their JSON text, sent verbatim.
    Json(String),
}

/// Largest integer a JavaScript number holds exactly (2^53 - 1).
pub const JS_SAFE_INTEGER_MAX: i64 = (1 << 53) - 1;

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// `compareValues`: total over the values that can meet in one column. Values of
    /// different non-null kinds (which the client would throw on) order by kind so that
    /// sorting never panics.
    pub fn compare(&self, other: &Value) -> Ordering {
        use Value::*;
        match (self, other) {
            (Null, Null) => Ordering::Equal,
            (Null, _) => Ordering::Less,
            (_, Null) => Ordering::Greater,
            (Bool(a), Bool(b)) => a.cmp(b),
            (Int(a), Int(b)) => a.cmp(b),
            (Text(a), Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Json(a), Json(b)) => a.cmp(b),
            (a, b) => match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
                _ => a.kind_rank().cmp(&b.kind_rank()),
            },
        }
    }

    /// `valuesEqual`: like `compare` == Equal, except that null equals nothing (SQL semantics,
    /// used for `=`, join matching and constraints).
    pub fn sql_eq(&self, other: &Value) -> bool {
        !self.is_null() && !other.is_null() && self.compare(other) == Ordering::Equal
    }

    fn kind_rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 2,
            Value::Text(_) => 3,
            Value::Json(_) => 4,
        }
    }

    /// Appends this value as JSON, the way the client expects it on the wire.
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(f) if f.is_finite() => {
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    let _ = write!(out, "{}", *f as i64);
                } else {
                    let _ = write!(out, "{f}");
                }
            }
            // JSON has no NaN or infinity; the client would read null.
            Value::Float(_) => out.push_str("null"),
            Value::Text(s) => write_json_string(s, out),
            Value::Json(j) => out.push_str(j),
        }
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_string(s: &str, out: &mut String) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A row: values by column position in its table's `TableSpec`.
pub type Row = Vec<Value>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_is_lowest_and_numbers_mix() {
        assert_eq!(Value::Null.compare(&Value::Int(-5)), Ordering::Less);
        assert_eq!(Value::Int(2).compare(&Value::Float(1.5)), Ordering::Greater);
        assert_eq!(
            Value::Bool(false).compare(&Value::Bool(true)),
            Ordering::Less
        );
    }

    #[test]
    fn strings_compare_as_utf8_bytes() {
        // U+FF5E (3 UTF-8 bytes, EF BD 9E) sorts before U+1F600 (F0 ...) in UTF-8 order,
        // but after it in UTF-16 order (surrogate D83D < FF5E).
        let a = Value::Text("\u{ff5e}".into());
        let b = Value::Text("\u{1f600}".into());
        assert_eq!(a.compare(&b), Ordering::Less);
    }

    #[test]
    fn sql_eq_null_matches_nothing() {
        assert!(!Value::Null.sql_eq(&Value::Null));
        assert!(Value::Int(3).sql_eq(&Value::Float(3.0)));
    }

    #[test]
    fn json_output() {
        let mut s = String::new();
        Value::Float(1700009999000.0).write_json(&mut s);
        s.push(',');
        Value::Text("a\"b\n".into()).write_json(&mut s);
        assert_eq!(s, "1700009999000,\"a\\\"b\\n\"");
    }
}
