//! Indexes the syncer shards found missing for their queries' lookups (a join column
//! upstream never indexed would make every lookup a scan of the table), handed to the
//! replicator, the replica's only writer, which builds them between transactions.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Index requests waiting at once; more are dropped (and asked again at the next hydration).
pub const INDEX_REQUESTS_MAX: usize = 256;

/// (table, columns in index order).
pub type IndexRequest = (String, Vec<String>);

#[derive(Default)]
pub struct IndexRequests {
    pending: Mutex<BTreeSet<IndexRequest>>,
}

impl IndexRequests {
    /// Asks for an index on `columns` of `table`; false when the queue is full.
    pub fn request(&self, table: &str, columns: &[String]) -> bool {
        debug_assert!(!columns.is_empty());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= INDEX_REQUESTS_MAX {
            return false;
        }
        pending.insert((table.to_string(), columns.to_vec()));
        true
    }

    pub fn take(&self) -> Vec<IndexRequest> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *pending).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_deduplicated_bounded_and_taken_once() {
        let r = IndexRequests::default();
        let cols = vec!["issue_id".to_string()];
        assert!(r.request("comment", &cols));
        assert!(r.request("comment", &cols));
        for i in 1..INDEX_REQUESTS_MAX {
            assert!(r.request(&format!("t{i}"), &cols));
        }
        assert!(!r.request("one_too_many", &cols), "the queue is bounded");
        let taken = r.take();
        assert_eq!(taken.len(), INDEX_REQUESTS_MAX);
        assert!(taken.contains(&("comment".to_string(), cols.clone())));
        assert!(r.take().is_empty());
    }
}
