//! Poke frames shared by a shard's client groups. Most pokes of a version are the same row
//! entries at the same cookie (the groups on one shared query got the same diff), so each
//! distinct pokePart is serialized and framed once and the same bytes go to every socket it
//! concerns; the pokeStart (one per base cookie) and the pokeEnd (one per cookie) likewise.
//! Only rows-only pokes are shared: a poke with query, client or mutation entries is its
//! group's own and is built by `PokeBuilder` as before.

use crate::cvr::{FastMap, RowData, RowKey, RowPatch};
use crate::protocol::down::{poke_end, poke_start, PokeBuilder};
use crate::ws::frame::text_frame;
use bytes::Bytes;
use std::rc::Rc;

/// Frames kept for the current cookie (parts and starts each). When full, frames are still
/// built, only not kept; a poke at another cookie empties the cache.
pub const POKE_FRAMES_CACHED_MAX: usize = 1_024;

/// A row entry as a cache key: a put by the identity of its shared contents (alive while
/// the key holds them, so the address is not reused), a del by its row.
#[derive(Clone)]
enum EntryKey {
    Put(Rc<RowData>),
    Del(RowKey),
}

impl EntryKey {
    /// One order for the same entries: puts by their contents' address, then dels by row.
    fn order(a: &EntryKey, b: &EntryKey) -> std::cmp::Ordering {
        match (a, b) {
            (EntryKey::Put(x), EntryKey::Put(y)) => Rc::as_ptr(x).cmp(&Rc::as_ptr(y)),
            (EntryKey::Put(_), EntryKey::Del(_)) => std::cmp::Ordering::Less,
            (EntryKey::Del(_), EntryKey::Put(_)) => std::cmp::Ordering::Greater,
            (EntryKey::Del(x), EntryKey::Del(y)) => x.cmp(y),
        }
    }
}

impl PartialEq for EntryKey {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (EntryKey::Put(a), EntryKey::Put(b)) => Rc::ptr_eq(a, b),
            (EntryKey::Del(a), EntryKey::Del(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for EntryKey {}

impl std::hash::Hash for EntryKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            EntryKey::Put(data) => state.write_usize(Rc::as_ptr(data) as usize),
            EntryKey::Del(key) => key.hash(state),
        }
    }
}

#[derive(Default)]
pub struct PokeFrames {
    /// The cookie every kept frame is for.
    cookie: String,
    starts: FastMap<String, Bytes>,
    end: Option<Bytes>,
    parts: FastMap<Vec<EntryKey>, Bytes>,
    /// Parts served from the cache (a measure of the sharing; the tests read it).
    pub parts_reused: u64,
}

impl PokeFrames {
    /// The frames of a rows-only poke from `base` to `cookie` with these row entries.
    pub fn frames(&mut self, cookie: &str, base: &str, patch: Vec<RowPatch<'_>>) -> Vec<Bytes> {
        if self.cookie != cookie {
            self.clear(cookie);
        }
        let mut key: Vec<EntryKey> = patch
            .into_iter()
            .map(|p| match p {
                RowPatch::Put(data) => EntryKey::Put(data.clone()),
                RowPatch::Del(row) => EntryKey::Del(row.clone()),
            })
            .collect();
        // Whatever order each group found them in.
        key.sort_unstable_by(EntryKey::order);
        let mut frames = vec![self.start(cookie, base)];
        if !key.is_empty() {
            self.parts_into(cookie, base, key, &mut frames);
        }
        frames.push(self.end(cookie));
        debug_assert!(frames.len() >= 2, "a poke has a start and an end");
        frames
    }

    fn clear(&mut self, cookie: &str) {
        self.cookie = cookie.to_string();
        self.starts.clear();
        self.end = None;
        self.parts.clear();
    }

    fn start(&mut self, cookie: &str, base: &str) -> Bytes {
        if let Some(frame) = self.starts.get(base) {
            return frame.clone();
        }
        let frame = text_frame(poke_start(cookie, Some(base)).as_bytes());
        if self.starts.len() < POKE_FRAMES_CACHED_MAX {
            self.starts.insert(base.to_string(), frame.clone());
        }
        frame
    }

    fn end(&mut self, cookie: &str) -> Bytes {
        self.end
            .get_or_insert_with(|| text_frame(poke_end(cookie, cookie).as_bytes()))
            .clone()
    }

    fn parts_into(&mut self, cookie: &str, base: &str, key: Vec<EntryKey>, out: &mut Vec<Bytes>) {
        if let Some(frame) = self.parts.get(&key) {
            self.parts_reused += 1;
            out.push(frame.clone());
            return;
        }
        let mut poke = PokeBuilder::new(cookie, Some(base));
        for entry in &key {
            match entry {
                EntryKey::Put(data) => poke.put_row_json(data.put_json()),
                EntryKey::Del(row) => poke.del_row(row.table(), row.key()),
            }
        }
        let messages = poke.finish(cookie);
        debug_assert!(messages.len() >= 3, "start, parts, end");
        let parts: Vec<Bytes> = messages[1..messages.len() - 1]
            .iter()
            .map(|m| text_frame(m.as_bytes()))
            .collect();
        // A poke of several parts (a big diff) is rare and not kept.
        if let [one] = parts.as_slice() {
            if self.parts.len() < POKE_FRAMES_CACHED_MAX {
                self.parts.insert(key, one.clone());
            }
        }
        out.extend(parts);
    }
}

#[cfg(test)]
#[path = "poke_frames_tests.rs"]
mod tests;
