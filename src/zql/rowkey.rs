//! A row's identity: its table and primary-key JSON, shared rather than copied.
//!
//! Every client group's record holds the keys of the rows it was sent, several times over
//! (the row map, each query's key set, the unflushed set): at 10,000 groups, two owned
//! strings per copy made those maps most of a shard's memory. A `RowKey` is one pointer;
//! clones share the strings, and its hash is computed once.

use std::cmp::Ordering;
use std::hash::{BuildHasher, Hash, Hasher};
use std::rc::Rc;

#[derive(Clone)]
pub struct RowKey(Rc<Inner>);

struct Inner {
    hash: u64,
    table: Box<str>,
    key: Box<str>,
}

impl RowKey {
    /// `key` is the row's primary key as zero's JSON object (`row_key_json`).
    pub fn new(table: &str, key: String) -> Self {
        // A fixed seed: the hash feeds in-process maps only, never storage or the wire.
        let hash =
            foldhash::fast::FixedState::with_seed(0x5a_63_61_63_68_65).hash_one((table, &key));
        RowKey(Rc::new(Inner {
            hash,
            table: table.into(),
            key: key.into_boxed_str(),
        }))
    }

    pub fn table(&self) -> &str {
        &self.0.table
    }

    pub fn key(&self) -> &str {
        &self.0.key
    }
}

impl Hash for RowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl PartialEq for RowKey {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash
                && self.0.table == other.0.table
                && self.0.key == other.0.key)
    }
}

impl Eq for RowKey {}

impl Ord for RowKey {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.table(), self.key()).cmp(&(other.table(), other.key()))
    }
}

impl PartialOrd for RowKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Debug for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({:?}, {:?})", self.table(), self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn keys_with_equal_parts_are_one_key() {
        let a = RowKey::new("issue", r#"{"id":"1"}"#.into());
        let b = RowKey::new("issue", r#"{"id":"1"}"#.into());
        let c = RowKey::new("comment", r#"{"id":"1"}"#.into());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let set: HashSet<RowKey> = [a.clone(), b, c.clone()].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert!(c < a, "ordered by table, then key");
        assert_eq!((a.table(), a.key()), ("issue", r#"{"id":"1"}"#));
        // The parts are not run together: ("ab", "c") is not ("a", "bc").
        assert_ne!(RowKey::new("ab", "c".into()), RowKey::new("a", "bc".into()));
    }
}
