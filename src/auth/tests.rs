//! Internals: header/crit parsing, claim order, key checks and JWKS key selection. The
//! end-to-end cases (fixtures from Node's crypto, a JWKS server) are in tests/auth_jwt.rs.

use super::jwks::{parse_set, select};
use super::key::{jwk_alg, secret_alg, Jwk};
use super::*;
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const SECRET: &str = "unit secret";

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// An HS256 token over arbitrary header and payload JSON.
fn hs256(header: Value, payload: &str) -> String {
    let input = format!("{}.{}", b64(&header), URL_SAFE_NO_PAD.encode(payload));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn verifier(issuer: Option<&str>, audience: Option<&str>) -> Verifier {
    Verifier::with_secret(SECRET, issuer.map(Into::into), audience.map(Into::into))
        .expect("verifier")
}

fn check(v: &Verifier, token: &str) -> Result<Claims, String> {
    v.verify(token, "u", NOW).map_err(|e| e.to_string())
}

#[test]
fn display_is_name_colon_message() {
    let all = [
        JwtError::JwsInvalid("m".into()),
        JwtError::JwtInvalid("m".into()),
        JwtError::JwsSignatureVerificationFailed,
        JwtError::claim("m"),
        JwtError::JwtExpired,
        JwtError::JoseNotSupported("m".into()),
        JwtError::TypeError("m".into()),
        JwtError::JwkInvalid("m".into()),
        JwtError::JwksInvalid("m".into()),
        JwtError::JwksNoMatchingKey,
        JwtError::JwksMultipleMatchingKeys,
        JwtError::JwksTimeout,
        JwtError::Jose("m".into()),
        JwtError::Fetch("m".into()),
    ];
    for e in all {
        let s = e.to_string();
        assert!(s.starts_with(&format!("{}: ", e.name())), "{s}");
    }
    assert_eq!(
        JwtError::JwksTimeout.to_string(),
        "JWKSTimeout: request timed out"
    );
}

#[test]
fn crit_is_refused_unless_it_is_b64() {
    let v = verifier(None, None);
    let p = r#"{"sub":"u"}"#;
    let t = |h: Value| check(&v, &hs256(h, p));
    assert_eq!(
        t(json!({"alg": "HS256", "crit": ["exp"], "exp": 1})).unwrap_err(),
        "JOSENotSupported: Extension Header Parameter \"exp\" is not recognized"
    );
    for crit in [
        json!([]),
        json!("b64"),
        json!([""]),
        json!([1]),
        Value::Null,
    ] {
        assert_eq!(
            t(json!({"alg": "HS256", "crit": crit})).unwrap_err(),
            "JWSInvalid: \"crit\" (Critical) Header Parameter MUST be an array of non-empty strings when present"
        );
    }
    assert_eq!(
        t(json!({"alg": "HS256", "crit": ["b64"]})).unwrap_err(),
        "JWSInvalid: Extension Header Parameter \"b64\" is missing"
    );
    assert_eq!(
        t(json!({"alg": "HS256", "crit": ["b64"], "b64": "no"})).unwrap_err(),
        "JWSInvalid: The \"b64\" (base64url-encode payload) Header Parameter must be a boolean"
    );
    t(json!({"alg": "HS256", "crit": ["b64"], "b64": true})).expect("b64 true is plain JWS");
    // b64:false is verifiable JWS but never a JWT; the signature is checked first.
    let unencoded = format!(
        "{}.{p}",
        b64(&json!({"alg": "HS256", "crit": ["b64"], "b64": false}))
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, unencoded.as_bytes()));
    assert_eq!(
        check(&v, &format!("{unencoded}.{tag}")).unwrap_err(),
        "JWTInvalid: JWTs MUST NOT use unencoded payload"
    );
    assert_eq!(
        check(&v, &format!("{unencoded}.AAAA")).unwrap_err(),
        "JWSSignatureVerificationFailed: signature verification failed"
    );
}

#[test]
fn header_forms() {
    let v = verifier(None, None);
    let missing = "JWSInvalid: JWS \"alg\" (Algorithm) Header Parameter missing or invalid";
    // An empty protected header is `{}` to jose; JSON that is not an object has no `alg`.
    assert_eq!(check(&v, ".e30.AAAA").unwrap_err(), missing);
    for h in [
        json!([1]),
        json!("HS256"),
        json!(null),
        json!({"alg": ""}),
        json!({"alg": 256}),
    ] {
        assert_eq!(
            check(&v, &hs256(h.clone(), "{}")).unwrap_err(),
            missing,
            "{h}"
        );
    }
    for bad in ["e30=", "%%%", "bm90IGpzb24"] {
        assert_eq!(
            check(&v, &format!("{bad}.e30.AAAA")).unwrap_err(),
            "JWSInvalid: JWS Protected Header is invalid",
            "{bad}"
        );
    }
    let good = hs256(json!({"alg": "HS256"}), r#"{"sub":"u"}"#);
    let (input, _) = good.rsplit_once('.').expect("three parts");
    assert_eq!(
        check(&v, &format!("{input}.AAAA=")).unwrap_err(),
        "JWSInvalid: Failed to base64url decode the signature"
    );
    // A byte-order mark before the JSON is dropped, as Node's TextDecoder does.
    let bom = hs256(json!({"alg": "HS256"}), "\u{feff}{\"sub\":\"u\"}");
    check(&v, &bom).expect("BOM");
}

#[test]
fn payload_must_be_an_object() {
    let v = verifier(None, None);
    for p in ["[]", "1", "\"sub\"", "null", "{", ""] {
        assert_eq!(
            check(&v, &hs256(json!({"alg": "HS256"}), p)).unwrap_err(),
            "JWTInvalid: JWT Claims Set must be a top-level JSON object",
            "{p}"
        );
    }
}

#[test]
fn claim_checks_run_in_jose_order() {
    let v = verifier(Some("iss"), Some("aud"));
    let t = |p: Value| check(&v, &hs256(json!({"alg": "HS256"}), &p.to_string()));
    // Presence: iss, then sub, then aud; then values: iss, sub, aud; then iat, nbf, exp.
    assert!(t(json!({}))
        .unwrap_err()
        .ends_with("missing required \"iss\" claim"));
    assert!(t(json!({"iss": 1}))
        .unwrap_err()
        .ends_with("missing required \"sub\" claim"));
    assert!(t(json!({"iss": 1, "sub": 1}))
        .unwrap_err()
        .ends_with("missing required \"aud\" claim"));
    let all = json!({"iss": 1, "sub": 1, "aud": 1, "iat": "x", "nbf": NOW + 1, "exp": 0});
    assert!(t(all.clone())
        .unwrap_err()
        .ends_with("unexpected \"iss\" claim value"));
    let mut c = all;
    c["iss"] = json!("iss");
    assert!(t(c.clone())
        .unwrap_err()
        .ends_with("unexpected \"sub\" claim value"));
    c["sub"] = json!("u");
    assert!(t(c.clone())
        .unwrap_err()
        .ends_with("unexpected \"aud\" claim value"));
    c["aud"] = json!(["x", "aud"]);
    assert!(t(c.clone())
        .unwrap_err()
        .ends_with("\"iat\" claim must be a number"));
    c["iat"] = json!(1.5);
    assert!(t(c.clone())
        .unwrap_err()
        .ends_with("\"nbf\" claim timestamp check failed"));
    c["nbf"] = json!("soon");
    assert!(t(c.clone())
        .unwrap_err()
        .ends_with("\"nbf\" claim must be a number"));
    c["nbf"] = json!(NOW);
    assert_eq!(
        t(c.clone()).unwrap_err(),
        "JWTExpired: \"exp\" claim timestamp check failed"
    );
    c["exp"] = Value::Null;
    assert!(t(c.clone())
        .unwrap_err()
        .ends_with("\"exp\" claim must be a number"));
    c["exp"] = json!(NOW + 1);
    assert_eq!(t(c).expect("valid")["iat"], json!(1.5));
    // A present-but-null claim counts as present (JS `in`), then fails its value check.
    assert!(verifier(None, None)
        .verify(&hs256(json!({"alg": "HS256"}), r#"{"sub":null}"#), "u", NOW)
        .unwrap_err()
        .to_string()
        .ends_with("unexpected \"sub\" claim value"));
    // Empty issuer/audience options are unset ones.
    let v = verifier(Some(""), Some(""));
    check(&v, &hs256(json!({"alg": "HS256"}), r#"{"sub":"u"}"#)).expect("no iss/aud needed");
}

#[test]
fn secret_only_verifies_hs() {
    assert!(secret_alg("HS256").is_ok());
    assert!(secret_alg("HS384").is_ok());
    assert!(secret_alg("HS512").is_ok());
    assert_eq!(
        secret_alg("HS1").unwrap_err().to_string(),
        "JOSENotSupported: alg HS1 is not supported either by JOSE or your javascript runtime"
    );
    for alg in ["dir", "PBES2-HS256+A128KW", "A128KW", "A256GCMKW"] {
        assert_eq!(
            secret_alg(alg).unwrap_err().to_string(),
            "TypeError: Key must be one of type KeyObject or CryptoKey. Received an instance of Uint8Array",
            "{alg}"
        );
    }
    for alg in ["RS256", "ES256", "EdDSA", "none", "A128CBC-HS256", "A12KW"] {
        assert!(
            secret_alg(alg)
                .unwrap_err()
                .to_string()
                .starts_with(&format!("TypeError: Key for the {alg} algorithm")),
            "{alg}"
        );
    }
}

fn ec_jwk(extra: Value) -> Jwk {
    let mut j = json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32]),
    });
    j.as_object_mut()
        .expect("obj")
        .extend(extra.as_object().expect("obj").clone());
    Jwk::parse(j.as_object().expect("obj"))
}

#[test]
fn jwk_checks_and_messages() {
    let k = ec_jwk(json!({}));
    assert!(jwk_alg("ES256", &k).is_ok());
    let e = |alg: &str, k: &Jwk| jwk_alg(alg, k).unwrap_err().to_string();
    assert_eq!(
        e("ES512", &k),
        "TypeError: Invalid key curve for the algorithm, its curve must be P-521, got P-256"
    );
    assert_eq!(
        e("PS256", &k),
        "TypeError: Invalid key for this operation, its asymmetricKeyType must be rsa or rsa-pss"
    );
    assert_eq!(
        e("EdDSA", &k),
        "TypeError: Invalid key for this operation, its asymmetricKeyType must be ed25519 or ed448"
    );
    assert_eq!(
        e("Ed25519", &k),
        "TypeError: Invalid key for this operation, its asymmetricKeyType must be ed25519"
    );
    assert_eq!(
        e("RS1", &k),
        "JOSENotSupported: alg RS1 is not supported either by JOSE or your javascript runtime"
    );
    assert_eq!(
        e("ES256", &ec_jwk(json!({"d": "AAAA"}))),
        "TypeError: JSON Web Key for this operation be a public JWK"
    );
    // A non-string alg on the JWK never equals the header's.
    assert_eq!(
        e("ES256", &ec_jwk(json!({"alg": 256}))),
        "TypeError: Invalid key for this operation, when present its alg must be ES256"
    );
    assert_eq!(
        e("ES256", &ec_jwk(json!({"key_ops": "verify"}))),
        "TypeError: Invalid key for this operation, when present its key_ops must include verify"
    );
    let oct = Jwk::parse(
        json!({"kty": "oct", "k": "c2VjcmV0"})
            .as_object()
            .expect("obj"),
    );
    assert!(jwk_alg("HS256", &oct).is_ok());
    assert_eq!(
        e("RS256", &oct),
        "TypeError: JSON Web Key for this operation be a public JWK"
    );
    let rsa_small = Jwk::parse(
        json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB"})
            .as_object()
            .expect("obj"),
    );
    assert_eq!(
        e("RS256", &rsa_small),
        "TypeError: RS256 requires key modulusLength to be 2048 bits or larger"
    );
    let ed448 = Jwk::parse(
        json!({"kty": "OKP", "crv": "Ed448", "x": "AA"})
            .as_object()
            .expect("obj"),
    );
    assert!(
        e("EdDSA", &ed448).starts_with("JOSENotSupported: "),
        "{}",
        e("EdDSA", &ed448)
    );
}

#[test]
fn jwks_selection_as_jose_local_set() {
    let keys = parse_set(&json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "a", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-384", "kid": "b", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-256", "kid": "c", "use": "enc", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-256", "kid": "d", "key_ops": ["sign"], "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "P-384", "kid": "e", "alg": "ES384", "x": "AA", "y": "AA"},
        {"kty": "RSA", "kid": "a", "n": "AA", "e": "AQAB"},
        {"kid": "nokty"},
    ]}))
    .expect("set");
    assert_eq!(select(&keys, "ES256", Some("a")), Ok(0));
    assert_eq!(select(&keys, "ES384", Some("b")), Ok(1));
    assert_eq!(select(&keys, "RS256", Some("a")), Ok(5));
    for kid in ["b", "c", "d", "e", "nokty", "zzz"] {
        assert_eq!(
            select(&keys, "ES256", Some(kid)),
            Err(JwtError::JwksNoMatchingKey),
            "{kid}"
        );
    }
    // Without a kid: ES256 matches only "a"; ES384 matches "b" and "e".
    assert_eq!(select(&keys, "ES256", None), Ok(0));
    assert_eq!(
        select(&keys, "ES384", None),
        Err(JwtError::JwksMultipleMatchingKeys)
    );
    assert_eq!(
        select(&keys, "HS256", None).unwrap_err().to_string(),
        "JOSENotSupported: Unsupported \"alg\" value for a JSON Web Key Set"
    );
    for bad in [
        json!(null),
        json!([]),
        json!({"keys": {}}),
        json!({"keys": [1]}),
    ] {
        assert_eq!(
            parse_set(&bad).unwrap_err().to_string(),
            "JWKSInvalid: JSON Web Key Set malformed",
            "{bad}"
        );
    }
    let many: Vec<Value> = (0..=JWKS_KEYS_MAX).map(|i| json!({"kid": i})).collect();
    assert!(parse_set(&json!({ "keys": many })).is_err());
}

#[test]
fn may_block_only_for_jwks() {
    let t = hs256(json!({"alg": "HS256"}), r#"{"sub":"u"}"#);
    assert!(!verifier(None, None).may_block(&t));
    let v = Verifier::with_jwks_url("http://127.0.0.1:9/jwks", None, None).expect("v");
    assert!(
        v.may_block(&t),
        "nothing cached: even an HS256 token fetches first, as jose"
    );
    assert!(!v.may_block("not a token"), "refused before any key lookup");
    assert_eq!(v.jwks_fetches(), 0);
}
