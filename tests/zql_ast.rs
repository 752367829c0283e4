//! Robustness of AST parsing and evaluation on arbitrary input: random JSON built from the
//! AST's own vocabulary never panics the parser or the evaluator, and whatever parses
//! round-trips through serialisation unchanged.

use std::rc::Rc;

use proptest::prelude::*;
use serde_json::{Map, Value as J};
use zcache::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, parse_ast, Source, ZqlError};

/// Two small tables, `t(id, n, s)` and `u(id, t_id)`, scanned in memory.
struct Tiny {
    specs: Vec<Rc<TableSpec>>,
    rows: Vec<Vec<Row>>,
}

impl Tiny {
    fn new() -> Tiny {
        let col = |n: &str, kind| ColumnSpec {
            name: n.into(),
            kind,
            pg_type_oid: 0,
        };
        let t = TableSpec {
            name: "t".into(),
            columns: vec![
                col("id", ColumnKind::Number),
                col("n", ColumnKind::Number),
                col("s", ColumnKind::String),
            ],
            primary_key: vec![0],
        };
        let u = TableSpec {
            name: "u".into(),
            columns: vec![
                col("id", ColumnKind::Number),
                col("t_id", ColumnKind::Number),
            ],
            primary_key: vec![0],
        };
        let s = |x: &str| Value::Text(x.into());
        Tiny {
            specs: vec![Rc::new(t), Rc::new(u)],
            rows: vec![
                vec![
                    vec![Value::Int(1), Value::Int(5), s("a")],
                    vec![Value::Int(2), Value::Null, s("b%")],
                    vec![Value::Int(3), Value::Float(0.5), Value::Null],
                ],
                vec![
                    vec![Value::Int(1), Value::Int(1)],
                    vec![Value::Int(2), Value::Int(1)],
                    vec![Value::Int(3), Value::Null],
                ],
            ],
        }
    }
}

impl Source for Tiny {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.specs.iter().find(|s| s.name == name).cloned()
    }
    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        let i = self
            .specs
            .iter()
            .position(|s| s.name == table)
            .ok_or_else(|| ZqlError::Source(table.into()))?;
        Ok(self.rows[i]
            .iter()
            .filter(|r| eq.iter().all(|(c, v)| r[*c].sql_eq(v)))
            .cloned()
            .collect())
    }
}

const KEYS: &[&str] = &[
    "table",
    "where",
    "related",
    "limit",
    "orderBy",
    "start",
    "alias",
    "type",
    "op",
    "left",
    "right",
    "name",
    "value",
    "conditions",
    "correlation",
    "parentField",
    "childField",
    "subquery",
    "hidden",
    "system",
    "flip",
    "row",
    "exclusive",
    "anchor",
    "field",
    "x",
];
const STRINGS: &[&str] = &[
    "t",
    "u",
    "id",
    "n",
    "s",
    "t_id",
    "simple",
    "and",
    "or",
    "correlatedSubquery",
    "literal",
    "column",
    "static",
    "=",
    "!=",
    "IS",
    "IS NOT",
    "<",
    ">=",
    "LIKE",
    "ILIKE",
    "NOT IN",
    "IN",
    "EXISTS",
    "NOT EXISTS",
    "asc",
    "desc",
    "client",
    "permissions",
    "a%",
    "\\",
    "b\\%",
];

fn json() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        (-3i64..10).prop_map(J::from),
        Just(J::from(2.5)),
        prop::sample::select(STRINGS).prop_map(|s| J::String(s.into())),
    ];
    leaf.prop_recursive(6, 64, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                J::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_json_never_panics_and_round_trips(input in json()) {
        let mut input = input;
        if let J::Object(m) = &mut input {
            // Most interesting shapes need a root table.
            m.entry("table").or_insert_with(|| J::String("t".into()));
        }
        if let Ok(ast) = parse_ast(&input) {
            let again = parse_ast(&serde_json::to_value(&ast).unwrap()).unwrap();
            prop_assert_eq!(&again, &ast);
            let _ = evaluate(&ast, &Tiny::new());
        }
    }
}

#[test]
fn exists_over_the_tiny_source() {
    let ast = serde_json::json!({"table":"t","where":{"type":"correlatedSubquery","op":"EXISTS",
        "related":{"correlation":{"parentField":["id"],"childField":["t_id"]},"subquery":{"table":"u","alias":"zsubq_u"}}}});
    let e = evaluate(&parse_ast(&ast).unwrap(), &Tiny::new()).unwrap();
    assert_eq!(e.nodes.len(), 1);
    assert_eq!(e.rows.len(), 3);
}
