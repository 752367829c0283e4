//! Errors of query parsing and evaluation. Their messages go back to users, so they name the
//! table, column or construct at fault.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ZqlError {
    #[error("unknown table '{0}'")]
    UnknownTable(String),
    #[error("unknown column '{column}' in table '{table}'")]
    UnknownColumn { table: String, column: String },
    #[error("invalid query AST: {0}")]
    InvalidAst(String),
    #[error("invalid LIKE pattern {pattern:?}: {reason}")]
    InvalidLikePattern { pattern: String, reason: String },
    #[error("query nested deeper than {depth_max} levels")]
    TooDeep { depth_max: usize },
    #[error("row source failed: {0}")]
    Source(String),
}
