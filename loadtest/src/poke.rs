//! Poke assembly (pokeStart, pokePart*, pokeEnd merged in order, as zero-client does) and the
//! client's set of got queries. Only counters, got-query ops, keys and tokens are kept.

use std::collections::HashSet;
use std::fmt;

use crate::protocol::{PokePart, QueryOp, POKE_KEYS_MAX, POKE_TOKENS_MAX};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PokeError {
    /// pokeStart while another poke is open (zero-client disconnects on this).
    Interleaved,
    /// pokePart or pokeEnd with no open poke.
    NotStarted,
    /// pokePart or pokeEnd for a different pokeID than the open one.
    WrongId,
}

impl fmt::Display for PokeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PokeError::Interleaved => "poke_interleaved",
            PokeError::NotStarted => "poke_not_started",
            PokeError::WrongId => "poke_wrong_id",
        };
        f.write_str(s)
    }
}

impl std::error::Error for PokeError {}

/// A poke merged from its parts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MergedPoke {
    pub poke_id: String,
    pub base_cookie: Option<String>,
    pub cookie: String,
    pub parts: u32,
    pub got: Vec<QueryOp>,
    pub rows_put: u64,
    pub rows_del: u64,
    pub keys: Vec<String>,
    pub tokens: Vec<u64>,
}

#[derive(Debug, Default)]
pub struct PokeAssembler {
    open: Option<MergedPoke>,
}

impl PokeAssembler {
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    pub fn start(&mut self, poke_id: String, base_cookie: Option<String>) -> Result<(), PokeError> {
        if self.open.is_some() {
            return Err(PokeError::Interleaved);
        }
        self.open = Some(MergedPoke {
            poke_id,
            base_cookie,
            ..MergedPoke::default()
        });
        Ok(())
    }

    pub fn part(&mut self, part: PokePart) -> Result<(), PokeError> {
        let open = self.open.as_mut().ok_or(PokeError::NotStarted)?;
        if open.poke_id != part.poke_id {
            return Err(PokeError::WrongId);
        }
        open.parts += 1;
        open.got.extend(part.got);
        open.rows_put += part.rows_put;
        open.rows_del += part.rows_del;
        let key_room = POKE_KEYS_MAX.saturating_sub(open.keys.len());
        open.keys.extend(part.keys.into_iter().take(key_room));
        let token_room = POKE_TOKENS_MAX.saturating_sub(open.tokens.len());
        open.tokens.extend(part.tokens.into_iter().take(token_room));
        debug_assert!(open.keys.len() <= POKE_KEYS_MAX && open.tokens.len() <= POKE_TOKENS_MAX);
        Ok(())
    }

    /// Closes the open poke: `Ok(None)` when it was cancelled (its content is discarded).
    pub fn end(
        &mut self,
        poke_id: &str,
        cookie: String,
        cancel: bool,
    ) -> Result<Option<MergedPoke>, PokeError> {
        let open = self.open.take().ok_or(PokeError::NotStarted)?;
        if open.poke_id != poke_id {
            return Err(PokeError::WrongId);
        }
        if cancel {
            return Ok(None);
        }
        Ok(Some(MergedPoke { cookie, ..open }))
    }

    /// Drops a half-received poke (the connection went away).
    pub fn reset(&mut self) {
        self.open = None;
    }
}

/// The query hashes the server has reported as got (complete) for this client's group.
#[derive(Debug, Default)]
pub struct GotQueries {
    hashes: HashSet<String>,
}

impl GotQueries {
    pub fn apply(&mut self, ops: &[QueryOp]) {
        for op in ops {
            match op {
                QueryOp::Put(h) => {
                    self.hashes.insert(h.clone());
                }
                QueryOp::Del(h) => {
                    self.hashes.remove(h);
                }
                QueryOp::Clear => self.hashes.clear(),
            }
        }
    }

    pub fn contains_all<'a>(&self, mut wanted: impl Iterator<Item = &'a str>) -> bool {
        wanted.all(|h| self.hashes.contains(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(id: &str, got: Vec<QueryOp>, tokens: Vec<u64>, keys: &[&str]) -> PokePart {
        PokePart {
            poke_id: id.into(),
            got,
            rows_put: tokens.len() as u64 + 1,
            rows_del: 1,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            tokens,
        }
    }

    #[test]
    fn merges_parts_in_order() {
        let mut a = PokeAssembler::default();
        a.start("p1".into(), Some("c0".into())).unwrap();
        a.part(part(
            "p1",
            vec![QueryOp::Put("h1".into())],
            vec![1],
            &["i1"],
        ))
        .unwrap();
        a.part(part(
            "p1",
            vec![QueryOp::Del("h1".into())],
            vec![2, 3],
            &["i2"],
        ))
        .unwrap();
        let poke = a.end("p1", "c1".into(), false).unwrap().unwrap();
        assert_eq!(poke.parts, 2);
        assert_eq!(poke.base_cookie.as_deref(), Some("c0"));
        assert_eq!(poke.cookie, "c1");
        assert_eq!(
            poke.got,
            vec![QueryOp::Put("h1".into()), QueryOp::Del("h1".into())]
        );
        assert_eq!(poke.tokens, vec![1, 2, 3]);
        assert_eq!(poke.keys, vec!["i1".to_string(), "i2".to_string()]);
        assert_eq!((poke.rows_put, poke.rows_del), (5, 2));
        assert!(!a.is_open());
    }

    #[test]
    fn cancelled_poke_is_discarded() {
        let mut a = PokeAssembler::default();
        a.start("p1".into(), None).unwrap();
        a.part(part("p1", vec![], vec![9], &[])).unwrap();
        assert_eq!(a.end("p1", String::new(), true).unwrap(), None);
        assert!(!a.is_open());
    }

    #[test]
    fn protocol_violations_are_reported() {
        let mut a = PokeAssembler::default();
        assert_eq!(
            a.part(part("p1", vec![], vec![], &[])),
            Err(PokeError::NotStarted)
        );
        assert_eq!(a.end("p1", "c".into(), false), Err(PokeError::NotStarted));
        a.start("p1".into(), None).unwrap();
        assert_eq!(a.start("p2".into(), None), Err(PokeError::Interleaved));
        assert_eq!(
            a.part(part("p2", vec![], vec![], &[])),
            Err(PokeError::WrongId)
        );
        assert_eq!(a.end("p2", "c".into(), false), Err(PokeError::WrongId));
        a.start("p3".into(), None).unwrap();
        a.reset();
        assert!(!a.is_open());
    }

    #[test]
    fn token_and_key_lists_are_bounded() {
        let mut a = PokeAssembler::default();
        a.start("p".into(), None).unwrap();
        let many: Vec<u64> = (0..POKE_TOKENS_MAX as u64 + 10).collect();
        let keys: Vec<String> = (0..POKE_KEYS_MAX + 10).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        a.part(part("p", vec![], many.clone(), &keys)).unwrap();
        a.part(part("p", vec![], many, &keys)).unwrap();
        let poke = a.end("p", "c".into(), false).unwrap().unwrap();
        assert_eq!(poke.tokens.len(), POKE_TOKENS_MAX);
        assert_eq!(poke.keys.len(), POKE_KEYS_MAX);
    }

    #[test]
    fn got_queries_complete_only_with_every_hash() {
        let mut g = GotQueries::default();
        let wanted = ["a", "b"];
        g.apply(&[QueryOp::Put("a".into())]);
        assert!(!g.contains_all(wanted.iter().copied()));
        g.apply(&[QueryOp::Put("b".into())]);
        assert!(g.contains_all(wanted.iter().copied()));
        g.apply(&[QueryOp::Del("a".into())]);
        assert!(!g.contains_all(wanted.iter().copied()));
        g.apply(&[QueryOp::Put("a".into()), QueryOp::Clear]);
        assert!(!g.contains_all(["b"].iter().copied()));
    }
}
