//! Log sequence numbers: positions in the Postgres write-ahead log, written `X/Y` in hex.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers of up to 8 digits, like 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| {
            let ok =
                !part.is_empty() && part.len() <= 8 && part.bytes().all(|b| b.is_ascii_hexdigit());
            ok.then(|| u32::from_str_radix(part, 16).ok()).flatten()
        };
        let (hi, lo) = (half(hi).ok_or_else(err)?, half(lo).ok_or_else(err)?);
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_like_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/1a".parse::<Lsn>(), Ok(Lsn(0x1a)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "g/1",
            "1/123456789",
            "+1/2",
            "1 /2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn display_parse_roundtrip(v in any::<u64>()) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }

        #[test]
        fn parse_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Lsn>();
        }
    }
}
