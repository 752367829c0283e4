//! Downstream (server -> client) messages, written directly as JSON text.
//!
//! A poke is encoded once per client group; the same frames go to every socket of the group.

use super::error::ProtocolError;
use crate::zql::schema::TableSpec;
use crate::zql::value::{write_json_string, Row, Value};
use std::fmt::Write;

/// zero-cache flushes a `pokePart` every 100 patch entries (`PART_COUNT_FLUSH_THRESHOLD`).
pub const POKE_PART_PATCHES_MAX: usize = 100;
/// A `pokePart` is also flushed once its entries pass this size, so that no frame is huge
/// (100 wide rows can be many megabytes). One entry larger than this is a part on its own.
pub const POKE_PART_BYTES_MAX: usize = 1024 * 1024;
/// JSON around a query or lmid entry beyond its strings (`{"op":"put","hash":...}` etc.).
const ENTRY_OVERHEAD_BYTES: usize = 32;

pub fn connected(wsid: &str, timestamp_ms: u64) -> String {
    let mut s = String::from("[\"connected\",{\"wsid\":");
    write_json_string(wsid, &mut s);
    let _ = write!(s, ",\"timestamp\":{timestamp_ms}}}]");
    s
}

pub const PONG: &str = "[\"pong\",{}]";

pub fn error(err: &ProtocolError) -> String {
    let mut s = String::from("[\"error\",{\"kind\":");
    write_json_string(err.kind.as_str(), &mut s);
    s.push_str(",\"message\":");
    write_json_string(&err.message, &mut s);
    match &err.extra_json {
        Some(extra) => {
            s.push(',');
            s.push_str(extra);
        }
        None => s.push_str(",\"origin\":\"zeroCache\""),
    }
    s.push_str("}]");
    s
}

/// `['transformError', [...]]`: per-query errors from the app server, forwarded as received.
pub fn transform_error(errors_json: &str) -> String {
    format!("[\"transformError\",{errors_json}]")
}

/// `['deleteClients', {clientIDs}]`: confirms deleted clients.
pub fn delete_clients(client_ids: &[String]) -> String {
    let mut s = String::from("[\"deleteClients\",{\"clientIDs\":[");
    for (i, id) in client_ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        write_json_string(id, &mut s);
    }
    s.push_str("]}]");
    s
}

/// A query patch entry going down: `{op, hash}` (no ttl is echoed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryOp {
    Put,
    Del,
}

/// The rowsPatch `put` op of `row`.
pub fn put_row_json(spec: &TableSpec, row: &Row) -> String {
    let mut s = String::from("{\"op\":\"put\",\"tableName\":");
    write_json_string(&spec.name, &mut s);
    s.push_str(",\"value\":");
    write_row_object(spec, row, &mut s);
    s.push('}');
    s
}

/// Builds the messages of one poke: pokeStart, pokeParts of at most
/// `POKE_PART_PATCHES_MAX` patch entries each, pokeEnd.
pub struct PokeBuilder {
    poke_id: String,
    messages: Vec<String>,
    part: Part,
}

#[derive(Default)]
struct Part {
    entries: usize,
    /// The encoded size of the entries so far (queries and lmids estimated).
    bytes: usize,
    desired: Vec<(String, QueryOp, String)>,
    got: Vec<(QueryOp, String)>,
    lmids: Vec<(String, u64)>,
    rows: Vec<String>,
    mutations: Vec<String>,
}

impl PokeBuilder {
    pub fn new(poke_id: &str, base_cookie: Option<&str>) -> Self {
        PokeBuilder {
            poke_id: poke_id.to_string(),
            messages: vec![poke_start(poke_id, base_cookie)],
            part: Part::default(),
        }
    }

    /// Makes room for an entry of `bytes`: flushes the part first if the entry would take
    /// it past `POKE_PART_BYTES_MAX`.
    fn admit(&mut self, bytes: usize) {
        if self.part.entries > 0 && self.part.bytes + bytes > POKE_PART_BYTES_MAX {
            self.flush_part();
        }
    }

    fn counted(&mut self, bytes: usize) {
        self.part.entries += 1;
        self.part.bytes += bytes;
        if self.part.entries >= POKE_PART_PATCHES_MAX || self.part.bytes >= POKE_PART_BYTES_MAX {
            self.flush_part();
        }
    }

    pub fn desired_query(&mut self, client_id: &str, op: QueryOp, hash: &str) {
        let bytes = client_id.len() + hash.len() + ENTRY_OVERHEAD_BYTES;
        self.admit(bytes);
        self.part
            .desired
            .push((client_id.to_string(), op, hash.to_string()));
        self.counted(bytes);
    }

    pub fn got_query(&mut self, op: QueryOp, hash: &str) {
        let bytes = hash.len() + ENTRY_OVERHEAD_BYTES;
        self.admit(bytes);
        self.part.got.push((op, hash.to_string()));
        self.counted(bytes);
    }

    pub fn last_mutation_id(&mut self, client_id: &str, lmid: u64) {
        let bytes = client_id.len() + ENTRY_OVERHEAD_BYTES;
        self.admit(bytes);
        self.part.lmids.push((client_id.to_string(), lmid));
        self.counted(bytes);
    }

    fn push_row(&mut self, encoded: String) {
        let bytes = encoded.len() + 1;
        self.admit(bytes);
        self.part.rows.push(encoded);
        self.counted(bytes);
    }

    fn push_mutation(&mut self, encoded: String) {
        let bytes = encoded.len() + 1;
        self.admit(bytes);
        self.part.mutations.push(encoded);
        self.counted(bytes);
    }

    pub fn put_row(&mut self, spec: &TableSpec, row: &Row) {
        self.push_row(put_row_json(spec, row));
    }

    /// A `put` op already encoded by `put_row_json` (shared by the groups it goes to).
    pub fn put_row_json(&mut self, encoded: &str) {
        self.push_row(encoded.to_string());
    }

    /// `id_json` is the primary-key object, e.g. `{"id":"i1"}`.
    pub fn del_row(&mut self, table: &str, id_json: &str) {
        let mut s = String::from("{\"op\":\"del\",\"tableName\":");
        write_json_string(table, &mut s);
        s.push_str(",\"id\":");
        s.push_str(id_json);
        s.push('}');
        self.push_row(s);
    }

    /// A `mutationsPatch` put: `result_json` is the stored result object.
    pub fn put_mutation_result(&mut self, client_id: &str, id: u64, result_json: &str) {
        let mut s = String::from("{\"op\":\"put\",\"mutation\":{\"id\":{\"clientID\":");
        write_json_string(client_id, &mut s);
        let _ = write!(s, ",\"id\":{id}}},\"result\":{result_json}}}}}");
        self.push_mutation(s);
    }

    pub fn del_mutation_result(&mut self, client_id: &str, id: u64) {
        let mut s = String::from("{\"op\":\"del\",\"id\":{\"clientID\":");
        write_json_string(client_id, &mut s);
        let _ = write!(s, ",\"id\":{id}}}}}");
        self.push_mutation(s);
    }

    pub fn is_empty(&self) -> bool {
        self.messages.len() == 1 && self.part.entries == 0
    }

    fn flush_part(&mut self) {
        let part = std::mem::take(&mut self.part);
        if part.entries == 0 {
            return;
        }
        let mut s = String::from("[\"pokePart\",{\"pokeID\":");
        write_json_string(&self.poke_id, &mut s);
        if !part.lmids.is_empty() {
            s.push_str(",\"lastMutationIDChanges\":{");
            for (i, (client, lmid)) in part.lmids.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_json_string(client, &mut s);
                let _ = write!(s, ":{lmid}");
            }
            s.push('}');
        }
        if !part.desired.is_empty() {
            s.push_str(",\"desiredQueriesPatches\":{");
            write_desired(&part.desired, &mut s);
            s.push('}');
        }
        if !part.got.is_empty() {
            s.push_str(",\"gotQueriesPatch\":[");
            for (i, (op, hash)) in part.got.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_query_op(*op, hash, &mut s);
            }
            s.push(']');
        }
        write_list(",\"rowsPatch\":[", &part.rows, &mut s);
        write_list(",\"mutationsPatch\":[", &part.mutations, &mut s);
        s.push_str("}]");
        self.messages.push(s);
    }

    /// Ends the poke at `cookie` and returns its messages in order.
    pub fn finish(mut self, cookie: &str) -> Vec<String> {
        self.flush_part();
        self.messages.push(poke_end(&self.poke_id, cookie));
        self.messages
    }
}

/// `["pokeStart",{"pokeID","baseCookie"}]`.
pub fn poke_start(poke_id: &str, base_cookie: Option<&str>) -> String {
    let mut start = String::from("[\"pokeStart\",{\"pokeID\":");
    write_json_string(poke_id, &mut start);
    start.push_str(",\"baseCookie\":");
    match base_cookie {
        Some(c) => write_json_string(c, &mut start),
        None => start.push_str("null"),
    }
    start.push_str("}]");
    start
}

/// `["pokeEnd",{"pokeID","cookie"}]`.
pub fn poke_end(poke_id: &str, cookie: &str) -> String {
    let mut end = String::from("[\"pokeEnd\",{\"pokeID\":");
    write_json_string(poke_id, &mut end);
    end.push_str(",\"cookie\":");
    write_json_string(cookie, &mut end);
    end.push_str("}]");
    end
}

fn write_list(prefix: &str, items: &[String], out: &mut String) {
    if items.is_empty() {
        return;
    }
    out.push_str(prefix);
    out.push_str(&items.join(","));
    out.push(']');
}

fn write_query_op(op: QueryOp, hash: &str, out: &mut String) {
    out.push_str(match op {
        QueryOp::Put => "{\"op\":\"put\",\"hash\":",
        QueryOp::Del => "{\"op\":\"del\",\"hash\":",
    });
    write_json_string(hash, out);
    out.push('}');
}

/// Groups the entries by client, keeping each client's order.
fn write_desired(entries: &[(String, QueryOp, String)], out: &mut String) {
    let mut clients: Vec<&str> = Vec::new();
    for (c, _, _) in entries {
        if !clients.contains(&c.as_str()) {
            clients.push(c);
        }
    }
    for (i, client) in clients.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_json_string(client, out);
        out.push_str(":[");
        let mut first = true;
        for (_, op, hash) in entries.iter().filter(|(c, _, _)| c == client) {
            if !first {
                out.push(',');
            }
            first = false;
            write_query_op(*op, hash, out);
        }
        out.push(']');
    }
}

/// `{"col":value,...}` over every column of the row.
pub fn write_row_object(spec: &TableSpec, row: &Row, out: &mut String) {
    debug_assert_eq!(spec.columns.len(), row.len());
    out.push('{');
    for (i, (col, value)) in spec.columns.iter().zip(row.iter()).enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_json_string(&col.name, out);
        out.push(':');
        value.write_json(out);
    }
    out.push('}');
}

/// The first column whose integer a JavaScript number cannot hold exactly (zero-cache's
/// ensureSafeJSON refuses such rows rather than send a wrong number).
pub fn unsafe_integer_column<'a>(spec: &'a TableSpec, row: &Row) -> Option<(&'a str, i64)> {
    spec.columns.iter().zip(row).find_map(|(col, v)| match v {
        Value::Int(i) if i.unsigned_abs() > crate::zql::value::JS_SAFE_INTEGER_MAX as u64 => {
            Some((col.name.as_str(), *i))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zql::schema::{ColumnKind, ColumnSpec};

    fn issue_spec() -> TableSpec {
        let col = |name: &str, kind| ColumnSpec {
            name: name.into(),
            kind,
            pg_type_oid: 25,
        };
        TableSpec {
            name: "issue".into(),
            columns: vec![
                col("id", ColumnKind::String),
                col("created", ColumnKind::Number),
            ],
            primary_key: vec![0],
        }
    }

    #[test]
    fn poke_matches_captured_shape() {
        let mut p = PokeBuilder::new("5337lns", Some("532ws6w"));
        p.last_mutation_id("qid", 1);
        p.put_row(
            &issue_spec(),
            &vec![Value::Text("i9999".into()), Value::Int(1700009999000)],
        );
        let msgs = p.finish("5337lns");
        assert_eq!(
            msgs[0],
            r#"["pokeStart",{"pokeID":"5337lns","baseCookie":"532ws6w"}]"#
        );
        assert_eq!(
            msgs[1],
            r#"["pokePart",{"pokeID":"5337lns","lastMutationIDChanges":{"qid":1},"rowsPatch":[{"op":"put","tableName":"issue","value":{"id":"i9999","created":1700009999000}}]}]"#
        );
        assert_eq!(
            msgs[2],
            r#"["pokeEnd",{"pokeID":"5337lns","cookie":"5337lns"}]"#
        );
        for m in &msgs {
            serde_json::from_str::<serde_json::Value>(m).expect("valid JSON");
        }
    }

    #[test]
    fn parts_split_every_hundred_entries() {
        let mut p = PokeBuilder::new("p", None);
        p.desired_query("c1", QueryOp::Put, "h1");
        p.got_query(QueryOp::Put, "h1");
        for i in 0..250 {
            p.del_row("issue", &format!("{{\"id\":\"i{i}\"}}"));
        }
        let msgs = p.finish("c");
        // start, 3 parts (100, 100, 52), end
        assert_eq!(msgs.len(), 5);
        let first: serde_json::Value = serde_json::from_str(&msgs[1]).expect("json");
        assert_eq!(first[1]["desiredQueriesPatches"]["c1"][0]["hash"], "h1");
        assert_eq!(first[1]["rowsPatch"].as_array().map(|a| a.len()), Some(98));
    }

    fn wide_row(id: usize, body_bytes: usize) -> Row {
        vec![
            Value::Text(format!("i{id}")),
            Value::Text("x".repeat(body_bytes)),
        ]
    }

    fn wide_spec() -> TableSpec {
        let mut spec = issue_spec();
        spec.columns[1] = ColumnSpec {
            name: "body".into(),
            kind: ColumnKind::String,
            pg_type_oid: 25,
        };
        spec
    }

    fn parts(msgs: &[String]) -> Vec<serde_json::Value> {
        msgs[1..msgs.len() - 1]
            .iter()
            .map(|m| serde_json::from_str(m).expect("json"))
            .collect()
    }

    #[test]
    fn parts_split_by_bytes() {
        let spec = wide_spec();
        let mut p = PokeBuilder::new("p", None);
        // 40 rows of ~100 KiB: 100 entries would be ~4 MiB in one frame
        for i in 0..40 {
            p.put_row(&spec, &wide_row(i, 100 * 1024));
        }
        let msgs = p.finish("c");
        let parts = parts(&msgs);
        assert!(parts.len() >= 4, "{} parts", parts.len());
        let mut ids = Vec::new();
        for (m, part) in msgs[1..msgs.len() - 1].iter().zip(&parts) {
            assert!(
                m.len() <= POKE_PART_BYTES_MAX + 1024,
                "part of {} bytes",
                m.len()
            );
            for r in part[1]["rowsPatch"].as_array().expect("rows") {
                ids.push(r["value"]["id"].as_str().expect("id").to_string());
            }
        }
        let want: Vec<String> = (0..40).map(|i| format!("i{i}")).collect();
        assert_eq!(ids, want, "every row once, in order");
    }

    #[test]
    fn an_oversized_row_is_a_part_on_its_own() {
        let spec = wide_spec();
        let mut p = PokeBuilder::new("p", None);
        p.got_query(QueryOp::Put, "h1");
        p.put_row(&spec, &wide_row(1, 10));
        p.put_row(&spec, &wide_row(2, POKE_PART_BYTES_MAX + 10));
        p.put_row(&spec, &wide_row(3, 10));
        let msgs = p.finish("c");
        let parts = parts(&msgs);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0][1]["gotQueriesPatch"][0]["hash"], "h1");
        assert_eq!(parts[0][1]["rowsPatch"][0]["value"]["id"], "i1");
        assert_eq!(parts[1][1]["rowsPatch"].as_array().map(Vec::len), Some(1));
        assert_eq!(parts[1][1]["rowsPatch"][0]["value"]["id"], "i2");
        assert_eq!(parts[2][1]["rowsPatch"][0]["value"]["id"], "i3");
    }

    #[test]
    fn small_entries_split_only_by_count() {
        let mut p = PokeBuilder::new("p", None);
        for i in 0..POKE_PART_PATCHES_MAX {
            p.put_mutation_result("c1", i as u64, "{}");
        }
        let msgs = p.finish("c");
        assert_eq!(msgs.len(), 3, "one full part");
    }

    #[test]
    fn integers_beyond_2_53_are_found() {
        let spec = issue_spec();
        let ok = vec![
            Value::Text("a".into()),
            Value::Int(crate::zql::value::JS_SAFE_INTEGER_MAX),
        ];
        assert_eq!(unsafe_integer_column(&spec, &ok), None);
        let bad = vec![Value::Text("a".into()), Value::Int(1 << 53)];
        assert_eq!(
            unsafe_integer_column(&spec, &bad),
            Some(("created", 1 << 53))
        );
    }

    #[test]
    fn empty_poke_is_start_and_end() {
        let p = PokeBuilder::new("00:01", None);
        assert!(p.is_empty());
        assert_eq!(p.finish("00:01").len(), 2);
    }
}
