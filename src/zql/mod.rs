//! The query engine: the wire AST, values with the client's ordering, and evaluation.

pub mod ast;
pub mod error;
pub mod eval;
pub mod filter;
pub mod ivm;
pub mod like;
pub mod plan;
pub mod rowkey;
pub mod schema;
pub mod value;

pub use ast::{parse_ast, Ast};
pub use error::ZqlError;
pub use eval::{evaluate, evaluate_plan, row_key_json, Evaluation, Node, Source};
pub use plan::{compile, Plan};
pub use rowkey::RowKey;
