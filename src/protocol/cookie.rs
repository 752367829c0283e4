//! Cookies: lexicographically ordered version strings (zero-cache's LexiVersion).
//!
//! LexiVersion(n) = one base-36 digit giving (length - 1) of base36(n), then base36(n), so plain
//! string comparison orders versions numerically. A cookie is `stateVersion` or
//! `stateVersion:lexi(configVersion)` when configVersion > 0.

const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Base-36 digits of `n` (lowercase, no leading zeros; "0" for zero).
fn base36(mut n: u64) -> String {
    if n == 0 {
        return "0".to_string();
    }
    let mut out = Vec::with_capacity(13);
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// `versionToLexi`: 0 -> "00", 35 -> "0z", 36 -> "110".
pub fn lexi(n: u64) -> String {
    let digits = base36(n);
    // u64::MAX has 13 base-36 digits, so the length prefix is always a single digit.
    debug_assert!(digits.len() <= 36);
    let mut out = String::with_capacity(digits.len() + 1);
    out.push(DIGITS[digits.len() - 1] as char);
    out.push_str(&digits);
    out
}

/// Parses a LexiVersion back to its number; None if malformed.
pub fn parse_lexi(s: &str) -> Option<u64> {
    let bytes = s.as_bytes();
    let (&len_digit, rest) = bytes.split_first()?;
    let len = DIGITS.iter().position(|&d| d == len_digit)? + 1;
    if rest.len() != len {
        return None;
    }
    let mut n: u64 = 0;
    for &b in rest {
        let d = DIGITS.iter().position(|&x| x == b)? as u64;
        n = n.checked_mul(36)?.checked_add(d)?;
    }
    Some(n)
}

/// A client-view version: the replica state it reflects and a counter of configuration
/// changes (queries, clients) made at that state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Version {
    pub state: u64,
    pub config: u64,
}

impl Version {
    pub fn cookie(&self) -> String {
        let mut s = lexi(self.state);
        if self.config > 0 {
            s.push(':');
            s.push_str(&lexi(self.config));
        }
        s
    }

    pub fn parse(cookie: &str) -> Option<Version> {
        let (state, config) = match cookie.split_once(':') {
            Some((s, c)) => (s, Some(c)),
            None => (cookie, None),
        };
        // zero-cache may append `.minor` to the state version; zcache never does.
        let state = parse_lexi(state)?;
        let config = match config {
            Some(c) => parse_lexi(c)?,
            None => 0,
        };
        Some(Version { state, config })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexi_matches_zero_cache_examples() {
        assert_eq!(lexi(0), "00");
        assert_eq!(lexi(35), "0z");
        assert_eq!(lexi(36), "110");
        assert_eq!(
            Version {
                state: 0,
                config: 1
            }
            .cookie(),
            "00:01"
        );
    }

    #[test]
    fn cookies_order_as_versions() {
        let vs = [
            Version {
                state: 0,
                config: 0,
            },
            Version {
                state: 0,
                config: 1,
            },
            Version {
                state: 0,
                config: 36,
            },
            Version {
                state: 35,
                config: 0,
            },
            Version {
                state: 36,
                config: 0,
            },
            Version {
                state: 36,
                config: 2,
            },
            Version {
                state: u64::MAX,
                config: 0,
            },
        ];
        for w in vs.windows(2) {
            assert!(w[0].cookie() < w[1].cookie(), "{:?} {:?}", w[0], w[1]);
            assert_eq!(Version::parse(&w[1].cookie()), Some(w[1]));
        }
    }

    proptest::proptest! {
        #[test]
        fn lexi_roundtrips_and_orders(a: u64, b: u64) {
            proptest::prop_assert_eq!(parse_lexi(&lexi(a)), Some(a));
            proptest::prop_assert_eq!(a.cmp(&b), lexi(a).cmp(&lexi(b)));
        }
    }
}
