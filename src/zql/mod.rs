//! The query engine: the wire AST, values with the client's ordering, and evaluation.

pub mod schema;
pub mod value;
