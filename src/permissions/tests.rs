//! Parsing the shapes `zero-deploy-permissions` really emits (legacy-features.md 2.2), the
//! strictness of the parse, and the read transform's output.

use serde_json::json;

use super::*;
use crate::zql::ast::{Ast, CorrelatedSubqueryCondition, ExistsOperator, System};

/// A deployment like the spec's [run] outputs: ANYONE_CAN, NOBODY_CAN, an authData.sub cmp, a
/// path field and an EXISTS with `system: "permissions"`; rows always carry `update`.
fn deployed() -> serde_json::Value {
    json!({"tables":{
        "issue":{"row":{
            "select":[["allow",{"type":"simple","left":{"type":"column","name":"owner_id"},
                "right":{"type":"static","anchor":"authData","field":"sub"},"op":"="}],
                ["allow",{"type":"simple","left":{"type":"column","name":"level"},
                "right":{"type":"static","anchor":"authData","field":["meta","level"]},"op":"<="}]],
            "insert":[["allow",{"type":"and","conditions":[]}]],
            "update":{"preMutation":[],"postMutation":[["allow",{"type":"and","conditions":[]}]]},
            "delete":[]},
          "cell":{"title":{"update":{}}}},
        "comment":{"row":{
            "select":[["allow",{"type":"correlatedSubquery","related":{"system":"permissions",
                "correlation":{"parentField":["issue_id"],"childField":["id"]},
                "subquery":{"table":"issue","alias":"zsubq_issue","where":{"type":"simple",
                    "left":{"type":"column","name":"owner_id"},
                    "right":{"type":"static","anchor":"authData","field":"sub"},"op":"="}}},
                "op":"EXISTS"}]],
            "update":{}}},
        "label":{}
    }})
}

#[test]
fn parses_deploy_permissions_output() {
    let p = parse(&deployed().to_string()).expect("parses");
    let issue = p
        .table("issue")
        .and_then(|t| t.row.as_ref())
        .expect("issue row");
    assert_eq!(issue.select.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        issue.insert,
        Some(vec![Condition::And { conditions: vec![] }])
    );
    assert_eq!(issue.delete, Some(vec![]));
    let update = issue.update.as_ref().expect("update");
    assert_eq!(update.pre_mutation, Some(vec![]));
    assert_eq!(update.post_mutation.as_ref().map(Vec::len), Some(1));
    let cells = p
        .table("issue")
        .and_then(|t| t.cell.as_ref())
        .expect("cells");
    assert_eq!(cells[0].0, "title");
    assert_eq!(cells[0].1.update, Some(UpdatePolicies::default()));

    let comment = p
        .table("comment")
        .and_then(|t| t.row.as_ref())
        .expect("comment row");
    let Some([Condition::CorrelatedSubquery(CorrelatedSubqueryCondition { related, op, .. })]) =
        comment.select.as_deref()
    else {
        panic!("exists rule: {comment:?}");
    };
    assert_eq!(*op, ExistsOperator::Exists);
    assert_eq!(related.system, Some(System::Permissions));
    assert_eq!(related.subquery.alias.as_deref(), Some("zsubq_issue"));
    assert_eq!(comment.update, Some(UpdatePolicies::default()));
    assert_eq!(p.table("label"), Some(&TablePermissions::default()));

    assert_eq!(parse("{}").expect("empty"), Permissions::default());
    assert_eq!(
        parse(r#"{"tables":{}}"#).expect("no tables"),
        Permissions::default()
    );
}

#[test]
fn parse_is_strict() {
    let bad = [
        // unknown keys at every level
        json!({"tables":{},"x":1}),
        json!({"tables":{"t":{"row":{},"column":{}}}}),
        json!({"tables":{"t":{"row":{"read":[]}}}}),
        json!({"tables":{"t":{"row":{"update":{"pre":[]}}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"and","conditions":[],"x":1}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"simple","op":"=",
            "left":{"type":"column","name":"a","x":1},"right":{"type":"literal","value":1}}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"correlatedSubquery","op":"EXISTS",
            "related":{"correlation":{"parentField":["a"],"childField":["b"]},
                "subquery":{"table":"u","bogus":true}}}]]}}}}),
        // null is not absent
        json!({"tables":null}),
        json!({"tables":{"t":{"row":null}}}),
        json!({"tables":{"t":{"row":{"select":null}}}}),
        // wrong shapes and kinds
        json!({"tables":{"t":{"row":{"select":[["deny",{"type":"and","conditions":[]}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow"]]}}}}),
        json!({"tables":{"t":{"row":{"select":{"type":"and","conditions":[]}}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"simple","op":"~",
            "left":{"type":"column","name":"a"},"right":{"type":"literal","value":1}}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"simple","op":"=",
            "left":{"type":"literal","value":1},"right":{"type":"column","name":"a"}}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"simple","op":"=",
            "left":{"type":"column","name":"a"},"right":{"type":"static","anchor":"env","field":"x"}}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"simple","op":"IN",
            "left":{"type":"column","name":"a"},"right":{"type":"literal","value":[[1]]}}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"simple","op":"=",
            "left":{"type":"column","name":"a"},"right":{"type":"literal","value":{"a":1}}}]]}}}}),
        json!({"tables":{"t":{"row":{"select":[["allow",{"type":"correlatedSubquery","op":"EXISTS",
            "related":{"correlation":{"parentField":[],"childField":[]},"subquery":{"table":"u"}}}]]}}}}),
        json!([]),
    ];
    for b in bad {
        let err = parse(&b.to_string());
        assert!(
            matches!(err, Err(PermissionsError::Parse { .. })),
            "{b} parsed: {err:?}"
        );
    }
    assert!(parse("{").is_err());
    assert!(parse("").is_err());
}

#[test]
fn parse_errors_quote_the_elided_text() {
    let long = format!(
        r#"{{"tables":{{"t":{{"row":{{"select":"{}"}}}}}}}}"#,
        "é".repeat(100)
    );
    let Err(PermissionsError::Parse { text, .. }) = parse(&long) else {
        panic!("must fail");
    };
    assert!(
        text.len() <= ELIDED_TEXT_BYTES_MAX && text.ends_with("..."),
        "{text}"
    );
    assert_eq!(elide("short", 100), "short");
    let msg = parse("nope").expect_err("fails").to_string();
    assert!(
        msg.starts_with("Could not parse upstream permissions: 'nope'."),
        "{msg}"
    );
}

fn query(v: serde_json::Value) -> Ast {
    serde_json::from_value(v).expect("ast")
}

#[test]
fn read_transform_adds_rules_at_every_level_and_binds() {
    let p = parse(&deployed().to_string()).expect("parses");
    let q = query(json!({
        "table":"comment",
        "where":{"type":"correlatedSubquery","op":"EXISTS","related":{
            "correlation":{"parentField":["issue_id"],"childField":["id"]},
            "subquery":{"table":"issue"}}},
        "related":[{"correlation":{"parentField":["id"],"childField":["comment_id"]},
            "subquery":{"table":"label","alias":"labels"}}],
        "limit":3
    }));
    let auth = json!({"sub":"u1","meta":{"level":2}});
    let out = authorize_read(&q, Some(&p), Some(&auth));
    let expected = query(json!({
        "table":"comment",
        "where":{"type":"and","conditions":[
            {"type":"correlatedSubquery","op":"EXISTS","related":{
                "correlation":{"parentField":["issue_id"],"childField":["id"]},
                "subquery":{"table":"issue","where":{"type":"or","conditions":[
                    {"type":"simple","left":{"type":"column","name":"owner_id"},
                        "right":{"type":"literal","value":"u1"},"op":"="},
                    {"type":"simple","left":{"type":"column","name":"level"},
                        "right":{"type":"literal","value":2},"op":"<="}]}}}},
            {"type":"correlatedSubquery","related":{"system":"permissions",
                "correlation":{"parentField":["issue_id"],"childField":["id"]},
                "subquery":{"table":"issue","alias":"zsubq_issue","where":{"type":"simple",
                    "left":{"type":"column","name":"owner_id"},
                    "right":{"type":"literal","value":"u1"},"op":"="}}},
                "op":"EXISTS"}]},
        // label has no rules: deny all.
        "related":[{"correlation":{"parentField":["id"],"childField":["comment_id"]},
            "subquery":{"table":"label","alias":"labels","where":{"type":"or","conditions":[]}}}],
        "limit":3
    }));
    assert_eq!(out, expected);

    // Anonymous: authData is {}, so every authData reference binds null.
    let anon = serde_json::to_string(&authorize_read(&q, Some(&p), None)).expect("json");
    assert!(!anon.contains("static") && !anon.contains("u1"), "{anon}");
    assert!(
        anon.contains(r#""right":{"type":"literal","value":null}"#),
        "{anon}"
    );

    // Nothing deployed, or no rules for the table: FALSE.
    for perms in [None, Some(&Permissions::default())] {
        let out = authorize_read(&query(json!({"table":"issue"})), perms, Some(&auth));
        assert_eq!(out.where_, Some(condition::always_false()));
    }
    // ANYONE_CAN leaves the user's where in a one-element and (simplify flattens the TRUE away
    // after collapsing, as upstream does).
    let anyone =
        parse(r#"{"tables":{"t":{"row":{"select":[["allow",{"type":"and","conditions":[]}]]}}}}"#)
            .expect("parses");
    let w = json!({"type":"simple","op":">","left":{"type":"column","name":"a"},"right":{"type":"literal","value":1}});
    let out = authorize_read(&query(json!({"table":"t","where":w})), Some(&anyone), None);
    let w: Condition = serde_json::from_value(w).expect("cond");
    assert_eq!(
        out.where_,
        Some(Condition::And {
            conditions: vec![w]
        })
    );
    let out = authorize_read(&query(json!({"table":"t"})), Some(&anyone), None);
    assert_eq!(out.where_, Some(condition::always_true()));
}
