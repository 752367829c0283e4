//! Legacy CRUD mutations (`_zero_crud`), as the client sends them in a `push` when its
//! schema sets `enableLegacyMutators` (zero-protocol/src/push.ts, mutation.ts).

use super::error::{ErrorKind, ProtocolError};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

/// The one mutation name a CRUD mutation may carry.
pub const CRUD_MUTATION_NAME: &str = "_zero_crud";

/// One operation of a CRUD mutation. Table and column names are server names.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum CrudOp {
    Insert(CrudArgs),
    Upsert(CrudArgs),
    Update(CrudArgs),
    Delete(CrudArgs),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CrudArgs {
    #[serde(rename = "tableName")]
    pub table_name: String,
    /// The client's idea of the primary key; non-empty.
    #[serde(rename = "primaryKey")]
    pub primary_key: Vec<String>,
    /// Column values (for a delete: at least the primary key).
    pub value: Map<String, Json>,
}

impl CrudOp {
    pub fn args(&self) -> &CrudArgs {
        match self {
            CrudOp::Insert(a) | CrudOp::Upsert(a) | CrudOp::Update(a) | CrudOp::Delete(a) => a,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            CrudOp::Insert(_) => "insert",
            CrudOp::Upsert(_) => "upsert",
            CrudOp::Update(_) => "update",
            CrudOp::Delete(_) => "delete",
        }
    }
}

/// A whole CRUD mutation of a push.
#[derive(Debug, Clone, PartialEq)]
pub struct CrudMutation {
    pub id: u64,
    pub client_id: String,
    pub ops: Vec<CrudOp>,
}

#[derive(Deserialize)]
struct RawMutation {
    id: u64,
    #[serde(rename = "clientID")]
    client_id: String,
    name: String,
    args: (RawArgs,),
}

#[derive(Deserialize)]
struct RawArgs {
    ops: Vec<CrudOp>,
}

/// Parses one element of a push's `mutations` whose `type` is `crud`.
pub fn parse_crud_mutation(m: &Json) -> Result<CrudMutation, ProtocolError> {
    let raw: RawMutation = serde_json::from_value(m.clone()).map_err(|e| {
        ProtocolError::new(
            ErrorKind::InvalidPush,
            format!("invalid CRUD mutation: {e}"),
        )
    })?;
    if raw.name != CRUD_MUTATION_NAME {
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            format!(
                "a CRUD mutation is named {CRUD_MUTATION_NAME}, not {:?}",
                raw.name
            ),
        ));
    }
    if let Some(op) = raw
        .args
        .0
        .ops
        .iter()
        .find(|o| o.args().primary_key.is_empty())
    {
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            format!(
                "the {} of {} names no primary key",
                op.name(),
                op.args().table_name
            ),
        ));
    }
    Ok(CrudMutation {
        id: raw.id,
        client_id: raw.client_id,
        ops: raw.args.0.ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_clients_crud_mutation() {
        let m = json!({"type":"crud","id":5,"clientID":"c1","name":"_zero_crud","timestamp":1,
            "args":[{"ops":[
                {"op":"insert","tableName":"issue","primaryKey":["id"],"value":{"id":"i1","title":"x"}},
                {"op":"delete","tableName":"issue","primaryKey":["id"],"value":{"id":"i1"}}]}]});
        let c = parse_crud_mutation(&m).expect("valid");
        assert_eq!((c.id, c.client_id.as_str(), c.ops.len()), (5, "c1", 2));
        assert_eq!(c.ops[0].name(), "insert");
        assert_eq!(c.ops[1].args().value["id"], json!("i1"));
    }

    #[test]
    fn refuses_other_names_and_empty_keys() {
        let named = json!({"id":1,"clientID":"c","name":"x","args":[{"ops":[]}]});
        assert!(parse_crud_mutation(&named).is_err());
        let nokey = json!({"id":1,"clientID":"c","name":"_zero_crud","args":[{"ops":[
            {"op":"update","tableName":"t","primaryKey":[],"value":{}}]}]});
        assert!(parse_crud_mutation(&nokey).is_err());
    }
}
