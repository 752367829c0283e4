//! The query engine: the wire AST, values with the client's ordering, and evaluation.

pub mod value;
pub mod schema;
