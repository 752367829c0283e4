//! LIKE / ILIKE exactly as the client evaluates them (`zql/src/builder/like.ts`).
//!
//! The client has two paths. A pattern without `%`, `_` or `\` is a plain string comparison
//! (ILIKE: both sides through `toLowerCase`). Any other pattern becomes an anchored, dot-all
//! JavaScript RegExp *without* the `u` flag, so `_` matches one UTF-16 code unit and the `i`
//! flag folds case per code unit by upper-casing (ECMAScript `Canonicalize`). Both paths are
//! reproduced here over UTF-16 code units.

use super::error::ZqlError;

#[derive(Debug, Clone, PartialEq)]
pub struct LikePattern {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Exact(String),
    /// Already lower-cased.
    ExactFolded(String),
    Glob {
        tokens: Vec<Token>,
        fold: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Token {
    /// `%`
    AnySeq,
    /// `_`
    AnyUnit,
    /// A literal UTF-16 code unit (already canonicalised when folding).
    Unit(u16),
}

impl LikePattern {
    /// Compiles `pattern`; `case_insensitive` selects ILIKE.
    pub fn new(pattern: &str, case_insensitive: bool) -> Result<Self, ZqlError> {
        let has_special = pattern.contains(['%', '_', '\\']);
        if !has_special {
            let kind = if case_insensitive {
                Kind::ExactFolded(pattern.to_lowercase())
            } else {
                Kind::Exact(pattern.to_owned())
            };
            return Ok(LikePattern { kind });
        }
        let tokens = tokenize(pattern, case_insensitive)?;
        Ok(LikePattern {
            kind: Kind::Glob {
                tokens,
                fold: case_insensitive,
            },
        })
    }

    pub fn matches(&self, text: &str) -> bool {
        match &self.kind {
            Kind::Exact(p) => text == p,
            Kind::ExactFolded(p) => text.to_lowercase() == *p,
            Kind::Glob { tokens, fold } => {
                let mut units: Vec<u16> = text.encode_utf16().collect();
                if *fold {
                    for u in units.iter_mut() {
                        *u = canonicalize(*u);
                    }
                }
                glob_match(tokens, &units)
            }
        }
    }
}

fn tokenize(pattern: &str, fold: bool) -> Result<Vec<Token>, ZqlError> {
    let units: Vec<u16> = pattern.encode_utf16().collect();
    let mut tokens = Vec::with_capacity(units.len());
    let mut i = 0;
    while i < units.len() {
        let u = units[i];
        let token = if u == u16::from(b'%') {
            Token::AnySeq
        } else if u == u16::from(b'_') {
            Token::AnyUnit
        } else {
            let literal = if u == u16::from(b'\\') {
                i += 1;
                *units.get(i).ok_or_else(|| ZqlError::InvalidLikePattern {
                    pattern: pattern.to_owned(),
                    reason: "LIKE pattern must not end with escape character".into(),
                })?
            } else {
                u
            };
            Token::Unit(if fold { canonicalize(literal) } else { literal })
        };
        tokens.push(token);
        i += 1;
    }
    Ok(tokens)
}

/// ECMAScript `Canonicalize(ch)` for a non-unicode, ignoreCase RegExp: upper-case the code
/// unit; keep it if that does not give exactly one code unit, or would map non-ASCII to ASCII.
fn canonicalize(unit: u16) -> u16 {
    let Some(ch) = char::from_u32(u32::from(unit)) else {
        return unit; // a lone surrogate
    };
    let mut upper = ch.to_uppercase();
    let (Some(first), None) = (upper.next(), upper.next()) else {
        return unit;
    };
    let mut buf = [0u16; 2];
    let encoded = first.encode_utf16(&mut buf);
    if encoded.len() != 1 {
        return unit;
    }
    let mapped = encoded[0];
    if unit >= 128 && mapped < 128 {
        return unit;
    }
    mapped
}

/// Anchored match of `%` / `_` / literal tokens. Greedy with a single backtrack point, which
/// is exact for patterns whose only repetition is "any sequence".
fn glob_match(tokens: &[Token], text: &[u16]) -> bool {
    let (mut t, mut s) = (0usize, 0usize);
    let mut backtrack: Option<(usize, usize)> = None;
    while s < text.len() {
        match tokens.get(t) {
            Some(Token::AnySeq) => {
                backtrack = Some((t, s));
                t += 1;
                continue;
            }
            Some(Token::AnyUnit) => {
                t += 1;
                s += 1;
                continue;
            }
            Some(Token::Unit(u)) if *u == text[s] => {
                t += 1;
                s += 1;
                continue;
            }
            _ => {}
        }
        match backtrack {
            Some((bt, bs)) => {
                // Let the last `%` swallow one more unit and retry after it.
                t = bt + 1;
                s = bs + 1;
                backtrack = Some((bt, bs + 1));
            }
            None => return false,
        }
    }
    tokens[t..].iter().all(|tok| *tok == Token::AnySeq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn like(p: &str, s: &str) -> bool {
        LikePattern::new(p, false).unwrap().matches(s)
    }
    fn ilike(p: &str, s: &str) -> bool {
        LikePattern::new(p, true).unwrap().matches(s)
    }

    #[test]
    fn wildcards_are_anchored() {
        assert!(like("a%", "abc"));
        assert!(!like("b%", "abc"));
        assert!(like("%c", "abc"));
        assert!(like("%b%", "abc"));
        assert!(!like("a_", "abc"));
        assert!(like("a__", "abc"));
        assert!(like("%", ""));
        assert!(!like("_", ""));
        assert!(like("a%b%c", "aXbYbZc"));
        assert!(!like("a%b%c", "aXbYbZ"));
        assert!(like("%%a", "a"));
    }

    #[test]
    fn wildcards_cross_newlines_and_anchor_to_whole_string() {
        assert!(like("a%b", "a\nb"));
        assert!(like("a_b", "a\nb"));
        assert!(!like("foo_", "fooa\nbar"));
    }

    #[test]
    fn backslash_escapes() {
        assert!(like("100\\%", "100%"));
        assert!(!like("100\\%", "1000"));
        assert!(like("a\\_b", "a_b"));
        assert!(!like("a\\_b", "axb"));
        assert!(like("a\\\\b", "a\\b"));
        assert!(like("\\a", "a"));
        assert!(matches!(
            LikePattern::new("abc\\", false),
            Err(ZqlError::InvalidLikePattern { .. })
        ));
    }

    #[test]
    fn regex_metacharacters_are_literal() {
        assert!(like("a.c%", "a.cd"));
        assert!(!like("a.c%", "abcd"));
        assert!(like("(x)*[y]$^%", "(x)*[y]$^"));
    }

    #[test]
    fn case_sensitivity() {
        assert!(!like("ABC", "abc"));
        assert!(!like("A%", "abc"));
        assert!(ilike("ABC", "abc"));
        assert!(ilike("A%", "abc"));
        assert!(ilike("é%", "É"));
        assert!(!ilike("a%", "b"));
    }

    #[test]
    fn underscore_is_one_utf16_unit() {
        assert!(!like("_", "\u{1f600}"));
        assert!(like("__", "\u{1f600}"));
        assert!(like("_", "\u{ff5e}"));
    }

    #[test]
    fn fold_paths_differ_like_javascript() {
        // Exact path uses toLowerCase: KELVIN SIGN lower-cases to 'k'.
        assert!(ilike("k", "\u{212a}"));
        // RegExp path upper-cases per unit and refuses non-ASCII -> ASCII: no match.
        assert!(!ilike("k%", "\u{212a}"));
        // 'ß' upper-cases to "SS" (two units) and so folds only to itself.
        assert!(!ilike("ss%", "ß"));
    }
}
