//! Client JWTs arrive before any authentication: verification must never panic, whatever the
//! bytes. Raw inputs exercise the compact split and base64; inputs base64url-encoded here reach
//! the header JSON (`alg`, `crit`, `b64`) and the key/algorithm checks of each key type. (The
//! claim checks sit behind the signature, which this crate cannot make without a crypto
//! dependency; src/auth/tests.rs covers them.) No JWKS verifier: it would do network I/O.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use zcache::auth::Verifier;

const SECRET: &str = "fuzz secret";
const NOW: u64 = 1_800_000_000;

struct Verifiers {
    secret: Verifier,
    ec: Verifier,
    rsa: Verifier,
}

fn verifiers() -> &'static Verifiers {
    static V: OnceLock<Verifiers> = OnceLock::new();
    V.get_or_init(|| {
        let fixtures: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/jwt/fixtures.json"))
                .expect("fixtures");
        let jwk = |name: &str| fixtures["keys"][name]["jwk"].to_string();
        Verifiers {
            secret: Verifier::with_secret(SECRET, None, None).expect("secret"),
            ec: Verifier::with_jwk(&jwk("p256"), None, None).expect("ec jwk"),
            rsa: Verifier::with_jwk(&jwk("rsa"), None, None).expect("rsa jwk"),
        }
    })
}

/// Unpadded base64url (RFC 4648 §5), so that structured inputs decode.
fn b64u(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

fn check_all(token: &str) {
    let v = verifiers();
    for verifier in [&v.secret, &v.ec, &v.rsa] {
        assert!(!verifier.may_block(token), "only a JWKS verifier blocks");
        let first = verifier.verify(token, "u", NOW);
        let again = verifier.verify(token, "u", NOW);
        assert_eq!(first, again, "verification is deterministic");
        if let Err(e) = first {
            let s = e.to_string();
            assert!(
                s.starts_with(e.name()) && s[e.name().len()..].starts_with(": "),
                "{s}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check_all(&String::from_utf8_lossy(rest));
    } else {
        // header bytes, 0, payload bytes, 0, signature bytes, each base64url-encoded.
        let mut parts = rest.splitn(3, |&b| b == 0);
        let header = parts.next().unwrap_or_default();
        let payload = parts.next().unwrap_or(&br#"{"sub":"u"}"#[..]);
        let signature = parts.next().unwrap_or_default();
        check_all(&format!(
            "{}.{}.{}",
            b64u(header),
            b64u(payload),
            b64u(signature)
        ));
    }
});
