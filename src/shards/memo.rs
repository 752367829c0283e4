//! Hydrations shared by a shard's client groups. Groups that ask for the same query (the
//! same AST after transformation) in snapshots at the same watermark get the same result, so
//! when a query is hydrated a second time at a watermark, its result is kept and the groups
//! after that get a copy instead of reading the replica again (many clients opening the same
//! view at once). A new version empties it.

use crate::sqlite::ReplicaReader;
use crate::zql::ast::Ast;
use crate::zql::error::ZqlError;
use crate::zql::ivm::LiveQuery;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Queries remembered per watermark (seen once, or kept with their result).
pub const HYDRATION_MEMO_QUERIES_MAX: usize = 16;
/// Rows a kept result may have: bigger ones are hydrated by every group.
pub const HYDRATION_MEMO_ROWS_MAX: usize = 20_000;

/// A query seen at the watermark, with its result once it was hydrated twice.
type Entry = (Rc<Ast>, Option<Rc<LiveQuery>>);

#[derive(Default)]
pub struct HydrationMemo {
    watermark: Cell<u64>,
    /// In the order first seen.
    entries: RefCell<Vec<Entry>>,
}

impl HydrationMemo {
    /// Forgets every result (a new version makes them stale).
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }

    /// `ast` hydrated in `reader`'s open snapshot: a copy of a kept result at that snapshot's
    /// watermark, or a new hydration.
    pub fn hydrate(&self, ast: &Rc<Ast>, reader: &ReplicaReader) -> Result<LiveQuery, ZqlError> {
        let watermark = reader.snapshot_watermark();
        if self.watermark.replace(watermark) != watermark {
            self.clear();
        }
        let seen = {
            let entries = self.entries.borrow();
            match entries
                .iter()
                .find(|(a, _)| Rc::ptr_eq(a, ast) || **a == **ast)
            {
                Some((_, Some(kept))) => return Ok((**kept).clone()),
                Some((_, None)) => true,
                None => false,
            }
        };
        let live = LiveQuery::hydrate(ast, reader)?;
        let mut entries = self.entries.borrow_mut();
        if seen {
            if live.rows().len() <= HYDRATION_MEMO_ROWS_MAX {
                if let Some(e) = entries.iter_mut().find(|(a, _)| **a == **ast) {
                    e.1 = Some(Rc::new(live.clone()));
                }
            }
        } else {
            if entries.len() >= HYDRATION_MEMO_QUERIES_MAX {
                entries.remove(0);
            }
            entries.push((ast.clone(), None));
        }
        debug_assert!(entries.len() <= HYDRATION_MEMO_QUERIES_MAX);
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::Replica;
    use crate::zql::parse_ast;
    use crate::zql::value::Value;

    fn ast() -> Rc<Ast> {
        let json = serde_json::json!({"table": "issue", "orderBy": [["id", "asc"]],
            "where": {"type": "simple", "op": "=", "left": {"type": "column", "name": "done"},
                      "right": {"type": "literal", "value": true}}});
        Rc::new(parse_ast(&json).expect("ast"))
    }

    fn roots(q: &LiveQuery) -> Vec<Value> {
        q.roots().iter().map(|r| r[0].clone()).collect()
    }

    fn put(r: &Replica, id: &str, done: bool, watermark: u64) {
        r.begin().expect("begin");
        let row = vec![Value::Text(id.into()), Value::Int(1), Value::Bool(done)];
        r.upsert("issue", &row).expect("upsert");
        r.commit(watermark).expect("commit");
    }

    #[test]
    fn equal_queries_at_one_watermark_share_a_result_and_a_new_one_reads_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("replica.db");
        let mut r = Replica::open(&path).expect("open");
        r.create_table(&crate::sqlite::replica::tests::issue_spec())
            .expect("create");
        put(&r, "a", true, 5);
        let reader = ReplicaReader::open(&path).expect("reader");
        let memo = HydrationMemo::default();
        reader.begin_snapshot().expect("snapshot");
        let first = memo.hydrate(&ast(), &reader).expect("first");
        assert!(
            memo.entries.borrow()[0].1.is_none(),
            "seen once: nothing kept"
        );
        let second = memo.hydrate(&ast(), &reader).expect("second");
        assert!(memo.entries.borrow()[0].1.is_some(), "kept at the second");
        let third = memo.hydrate(&ast(), &reader).expect("third");
        reader.end_snapshot().expect("end");
        for q in [&first, &second, &third] {
            assert_eq!(roots(q), vec![Value::Text("a".into())]);
            assert_eq!(q.rows(), first.rows());
        }

        // A commit moves the watermark: the kept result is stale and not handed out.
        put(&r, "b", true, 6);
        reader.begin_snapshot().expect("snapshot");
        let after = memo.hydrate(&ast(), &reader).expect("after");
        reader.end_snapshot().expect("end");
        assert_eq!(
            roots(&after),
            vec![Value::Text("a".into()), Value::Text("b".into())]
        );
        assert!(memo.entries.borrow().iter().all(|e| e.1.is_none()));
    }
}
