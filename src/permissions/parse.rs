//! Strict parsing of the permissions JSON (`permissionsConfigSchema` and the AST condition
//! schema of zero-protocol/src/ast.ts, under valita's strict mode): every object may carry only
//! its schema's keys, optional keys must be absent rather than `null`, and literals, operators
//! and anchors must be of the listed kinds. Once a condition has been checked here, the zql
//! AST types deserialize it.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Asset, Permissions, Policy, TablePermissions, UpdatePolicies};
use crate::zql::ast::Condition;

type R<T> = Result<T, String>;

fn object<'a>(v: &'a Value, what: &str, allowed: &[&str]) -> R<&'a Map<String, Value>> {
    let Value::Object(map) = v else {
        return Err(format!("{what}: expected an object, got {}", kind(v)));
    };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("{what}: unexpected key {k:?}"));
    }
    Ok(map)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// An optional key: absent is None; present must be valid (`null` is not "absent").
fn optional<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key)
}

fn required<'a>(map: &'a Map<String, Value>, key: &str, what: &str) -> R<&'a Value> {
    map.get(key)
        .ok_or_else(|| format!("{what}: missing key {key:?}"))
}

fn string<'a>(v: &'a Value, what: &str) -> R<&'a str> {
    v.as_str()
        .ok_or_else(|| format!("{what}: expected a string, got {}", kind(v)))
}

fn boolean(v: &Value, what: &str) -> R<()> {
    match v {
        Value::Bool(_) => Ok(()),
        _ => Err(format!("{what}: expected a boolean, got {}", kind(v))),
    }
}

fn one_of(v: &Value, what: &str, allowed: &[&str]) -> R<()> {
    match v.as_str() {
        Some(s) if allowed.contains(&s) => Ok(()),
        _ => Err(format!("{what}: expected one of {allowed:?}, got {v}")),
    }
}

pub(super) fn permissions(v: &Value) -> R<Permissions> {
    let map = object(v, "permissions", &["tables"])?;
    let mut out = Permissions::default();
    if let Some(tables) = optional(map, "tables") {
        let tables = object_any(tables, "tables")?;
        for (name, t) in tables {
            out.tables
                .insert(name.clone(), table(t, &format!("tables.{name}"))?);
        }
    }
    Ok(out)
}

fn object_any<'a>(v: &'a Value, what: &str) -> R<&'a Map<String, Value>> {
    match v {
        Value::Object(map) => Ok(map),
        _ => Err(format!("{what}: expected an object, got {}", kind(v))),
    }
}

fn table(v: &Value, what: &str) -> R<TablePermissions> {
    let map = object(v, what, &["row", "cell"])?;
    let row = match optional(map, "row") {
        Some(a) => Some(asset(a, &format!("{what}.row"))?),
        None => None,
    };
    let cell = match optional(map, "cell") {
        Some(c) => {
            let cells = object_any(c, &format!("{what}.cell"))?;
            let mut out = Vec::with_capacity(cells.len());
            for (column, a) in cells {
                out.push((column.clone(), asset(a, &format!("{what}.cell.{column}"))?));
            }
            Some(out)
        }
        None => None,
    };
    Ok(TablePermissions { row, cell })
}

fn asset(v: &Value, what: &str) -> R<Asset> {
    let map = object(v, what, &["select", "insert", "update", "delete"])?;
    let pol = |key: &str| -> R<Option<Policy>> {
        optional(map, key)
            .map(|p| policy(p, &format!("{what}.{key}")))
            .transpose()
    };
    let update = match optional(map, "update") {
        Some(u) => {
            let w = format!("{what}.update");
            let umap = object(u, &w, &["preMutation", "postMutation"])?;
            let upol = |key: &str| -> R<Option<Policy>> {
                optional(umap, key)
                    .map(|p| policy(p, &format!("{w}.{key}")))
                    .transpose()
            };
            Some(UpdatePolicies {
                pre_mutation: upol("preMutation")?,
                post_mutation: upol("postMutation")?,
            })
        }
        None => None,
    };
    Ok(Asset {
        select: pol("select")?,
        insert: pol("insert")?,
        update,
        delete: pol("delete")?,
    })
}

fn policy(v: &Value, what: &str) -> R<Policy> {
    let Value::Array(rules) = v else {
        return Err(format!(
            "{what}: expected an array of rules, got {}",
            kind(v)
        ));
    };
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r, &format!("{what}[{i}]")))
        .collect()
}

fn rule(v: &Value, what: &str) -> R<Condition> {
    match v {
        Value::Array(parts) if parts.len() == 2 => {
            if parts[0] != Value::String("allow".into()) {
                return Err(format!(
                    "{what}: a rule starts with \"allow\", not {}",
                    parts[0]
                ));
            }
            check_condition(&parts[1], &format!("{what}[1]"))?;
            Condition::deserialize(&parts[1]).map_err(|e| format!("{what}[1]: {e}"))
        }
        _ => Err(format!("{what}: expected [\"allow\", condition], got {v}")),
    }
}

const SIMPLE_OPS: &[&str] = &[
    "=",
    "!=",
    "IS",
    "IS NOT",
    "<",
    ">",
    "<=",
    ">=",
    "LIKE",
    "NOT LIKE",
    "ILIKE",
    "NOT ILIKE",
    "IN",
    "NOT IN",
];

fn check_condition(v: &Value, what: &str) -> R<()> {
    let ty = object_any(v, what)?
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match ty {
        "simple" => {
            let map = object(v, what, &["type", "op", "left", "right"])?;
            one_of(
                required(map, "op", what)?,
                &format!("{what}.op"),
                SIMPLE_OPS,
            )?;
            check_value(required(map, "left", what)?, &format!("{what}.left"), true)?;
            check_value(
                required(map, "right", what)?,
                &format!("{what}.right"),
                false,
            )
        }
        "and" | "or" => {
            let map = object(v, what, &["type", "conditions"])?;
            let Value::Array(cs) = required(map, "conditions", what)? else {
                return Err(format!("{what}.conditions: expected an array"));
            };
            for (i, c) in cs.iter().enumerate() {
                check_condition(c, &format!("{what}.conditions[{i}]"))?;
            }
            Ok(())
        }
        "correlatedSubquery" => {
            let map = object(v, what, &["type", "related", "op", "flip", "scalar"])?;
            check_related(required(map, "related", what)?, &format!("{what}.related"))?;
            one_of(
                required(map, "op", what)?,
                &format!("{what}.op"),
                &["EXISTS", "NOT EXISTS"],
            )?;
            for key in ["flip", "scalar"] {
                if let Some(b) = optional(map, key) {
                    boolean(b, &format!("{what}.{key}"))?;
                }
            }
            Ok(())
        }
        other => Err(format!("{what}: unknown condition type {other:?}")),
    }
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

/// A value position: literal, static parameter, or (on the left only) a column.
fn check_value(v: &Value, what: &str, left: bool) -> R<()> {
    let ty = object_any(v, what)?
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match ty {
        "literal" => {
            let map = object(v, what, &["type", "value"])?;
            let value = required(map, "value", what)?;
            let ok = match value {
                Value::Null => true,
                Value::Array(items) => items.iter().all(is_scalar),
                other => is_scalar(other),
            };
            if ok {
                Ok(())
            } else {
                Err(format!("{what}.value: not a literal value: {value}"))
            }
        }
        "column" if left => {
            let map = object(v, what, &["type", "name"])?;
            string(required(map, "name", what)?, &format!("{what}.name")).map(|_| ())
        }
        "static" => {
            let map = object(v, what, &["type", "anchor", "field"])?;
            one_of(
                required(map, "anchor", what)?,
                &format!("{what}.anchor"),
                &["authData", "preMutationRow"],
            )?;
            match required(map, "field", what)? {
                Value::String(_) => Ok(()),
                Value::Array(parts) if parts.iter().all(Value::is_string) => Ok(()),
                other => Err(format!(
                    "{what}.field: expected a string or strings, got {other}"
                )),
            }
        }
        other => Err(format!("{what}: unexpected value type {other:?}")),
    }
}

fn check_related(v: &Value, what: &str) -> R<()> {
    let map = object(v, what, &["correlation", "hidden", "system", "subquery"])?;
    let w = format!("{what}.correlation");
    let corr = object(
        required(map, "correlation", what)?,
        &w,
        &["parentField", "childField"],
    )?;
    for key in ["parentField", "childField"] {
        match required(corr, key, &w)? {
            Value::Array(f) if !f.is_empty() && f.iter().all(Value::is_string) => {}
            other => {
                return Err(format!(
                    "{w}.{key}: expected a non-empty string array, got {other}"
                ))
            }
        }
    }
    if let Some(h) = optional(map, "hidden") {
        boolean(h, &format!("{what}.hidden"))?;
    }
    if let Some(s) = optional(map, "system") {
        one_of(
            s,
            &format!("{what}.system"),
            &["permissions", "client", "test"],
        )?;
    }
    check_ast(
        required(map, "subquery", what)?,
        &format!("{what}.subquery"),
    )
}

fn check_ast(v: &Value, what: &str) -> R<()> {
    let map = object(
        v,
        what,
        &[
            "schema", "table", "alias", "where", "related", "limit", "orderBy", "start",
        ],
    )?;
    string(required(map, "table", what)?, &format!("{what}.table"))?;
    for key in ["schema", "alias"] {
        if let Some(s) = optional(map, key) {
            string(s, &format!("{what}.{key}"))?;
        }
    }
    if let Some(w) = optional(map, "where") {
        check_condition(w, &format!("{what}.where"))?;
    }
    if let Some(r) = optional(map, "related") {
        let Value::Array(rs) = r else {
            return Err(format!("{what}.related: expected an array"));
        };
        for (i, r) in rs.iter().enumerate() {
            check_related(r, &format!("{what}.related[{i}]"))?;
        }
    }
    if let Some(l) = optional(map, "limit") {
        if !l.is_number() {
            return Err(format!("{what}.limit: expected a number, got {l}"));
        }
    }
    if let Some(o) = optional(map, "orderBy") {
        let ok = match o {
            Value::Array(parts) => parts.iter().all(|p| match p {
                Value::Array(pair) if pair.len() == 2 => {
                    pair[0].is_string() && one_of(&pair[1], "", &["asc", "desc"]).is_ok()
                }
                _ => false,
            }),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "{what}.orderBy: expected [[column, \"asc\"|\"desc\"]...]"
            ));
        }
    }
    if let Some(s) = optional(map, "start") {
        let w = format!("{what}.start");
        let start = object(s, &w, &["row", "exclusive"])?;
        object_any(required(start, "row", &w)?, &format!("{w}.row"))?;
        boolean(required(start, "exclusive", &w)?, &format!("{w}.exclusive"))?;
    }
    Ok(())
}
