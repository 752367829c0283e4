//! The ZQL AST as the client and the app server send it (`zero-protocol/src/ast.ts`).
//!
//! Field names are camelCase as on the wire; unknown fields are ignored so that newer clients
//! that add optional fields still parse.

use serde::{Deserialize, Serialize};

use super::error::ZqlError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ast {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    pub table: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub where_: Option<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related: Option<Vec<CorrelatedSubquery>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Bound>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_by: Option<Vec<OrderPart>>,
}

/// One `[column, direction]` pair of an `orderBy`.
pub type OrderPart = (String, Direction);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Asc,
    Desc,
}

/// A `start` cursor: the row to start at (or just after, when `exclusive`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    pub row: serde_json::Map<String, serde_json::Value>,
    pub exclusive: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Condition {
    #[serde(rename = "simple")]
    Simple(SimpleCondition),
    #[serde(rename = "and")]
    And { conditions: Vec<Condition> },
    #[serde(rename = "or")]
    Or { conditions: Vec<Condition> },
    #[serde(rename = "correlatedSubquery")]
    CorrelatedSubquery(CorrelatedSubqueryCondition),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimpleCondition {
    pub op: SimpleOperator,
    pub left: ValuePosition,
    pub right: ValuePosition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SimpleOperator {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = "IS")]
    Is,
    #[serde(rename = "IS NOT")]
    IsNot,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "LIKE")]
    Like,
    #[serde(rename = "NOT LIKE")]
    NotLike,
    #[serde(rename = "ILIKE")]
    ILike,
    #[serde(rename = "NOT ILIKE")]
    NotILike,
    #[serde(rename = "IN")]
    In,
    #[serde(rename = "NOT IN")]
    NotIn,
}

impl SimpleOperator {
    pub fn as_str(self) -> &'static str {
        use SimpleOperator::*;
        match self {
            Eq => "=",
            Ne => "!=",
            Is => "IS",
            IsNot => "IS NOT",
            Lt => "<",
            Gt => ">",
            Le => "<=",
            Ge => ">=",
            Like => "LIKE",
            NotLike => "NOT LIKE",
            ILike => "ILIKE",
            NotILike => "NOT ILIKE",
            In => "IN",
            NotIn => "NOT IN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ValuePosition {
    Literal {
        /// A missing `value` is JavaScript `undefined`, which ZQL treats as null.
        #[serde(default)]
        value: LiteralValue,
    },
    Column {
        name: String,
    },
    Static {
        anchor: String,
        field: StaticField,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StaticField {
    One(String),
    Path(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LiteralValue {
    #[default]
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<LiteralValue>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrelatedSubqueryCondition {
    pub related: CorrelatedSubquery,
    pub op: ExistsOperator,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scalar: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExistsOperator {
    #[serde(rename = "EXISTS")]
    Exists,
    #[serde(rename = "NOT EXISTS")]
    NotExists,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrelatedSubquery {
    pub correlation: Correlation,
    pub subquery: Box<Ast>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<System>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Correlation {
    pub parent_field: Vec<String>,
    pub child_field: Vec<String>,
}

/// Who added a subquery; rows under `permissions` subqueries are never synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Permissions,
    Client,
    Test,
}

/// Parses a wire AST. Structural errors (wrong shapes, unknown operators) become
/// `ZqlError::InvalidAst`; names are checked later, against the replica's tables.
pub fn parse_ast(json: &serde_json::Value) -> Result<Ast, ZqlError> {
    Ast::deserialize(json).map_err(|e| ZqlError::InvalidAst(e.to_string()))
}
