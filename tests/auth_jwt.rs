//! Client JWT verification (legacy-features.md §1): every algorithm and key source against
//! tokens signed by Node's crypto (tests/fixtures/jwt, made by gen.mjs), time-dependent and
//! negative cases signed here with ring, and the JWKS cache against a local HTTP server.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Parser;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use zcache::auth::{JwtError, Verifier, JWKS_BYTES_MAX, TOKEN_BYTES_MAX};
use zcache::config::Config;

/// Any time after the fixtures' iat; the fixture tokens have no exp.
const NOW: u64 = 1_800_000_000;
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "zcache";

fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/jwt/fixtures.json")).expect("fixtures.json")
}

fn token(name: &str) -> String {
    fixtures()["tokens"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no fixture token {name}"))
        .to_owned()
}

fn jwk(name: &str) -> Value {
    fixtures()["keys"][name]["jwk"].clone()
}

fn secret() -> String {
    fixtures()["secret"].as_str().expect("secret").to_owned()
}

fn b64u(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64u(header.to_string().as_bytes()),
        b64u(claims.to_string().as_bytes())
    )
}

fn sign_hs(alg: &str, key: &[u8], claims: &Value) -> String {
    let a = match alg {
        "HS256" => ring::hmac::HMAC_SHA256,
        "HS384" => ring::hmac::HMAC_SHA384,
        _ => ring::hmac::HMAC_SHA512,
    };
    let input = signing_input(&json!({"alg": alg, "typ": "JWT"}), claims);
    let tag = ring::hmac::sign(&ring::hmac::Key::new(a, key), input.as_bytes());
    format!("{input}.{}", b64u(tag.as_ref()))
}

fn sign_secret(claims: &Value) -> String {
    sign_hs("HS256", secret().as_bytes(), claims)
}

/// A P-256 key made here, with its public JWK.
struct EcKey {
    pair: EcdsaKeyPair,
    kid: String,
}

impl EcKey {
    fn new(kid: &str) -> EcKey {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("pkcs8");
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("pair");
        EcKey {
            pair,
            kid: kid.to_owned(),
        }
    }

    fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "x": b64u(&p[1..33]), "y": b64u(&p[33..65]), "kid": self.kid})
    }

    fn sign_with(&self, header: Value, claims: &Value) -> String {
        let input = signing_input(&header, claims);
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", b64u(sig.as_ref()))
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with(json!({"alg": "ES256", "kid": self.kid}), claims)
    }
}

fn sign_ed25519(claims: &Value) -> (Value, String) {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("pkcs8");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64u(pair.public_key().as_ref())});
    let input = signing_input(&json!({"alg": "EdDSA"}), claims);
    let sig = pair.sign(input.as_bytes());
    (jwk, format!("{input}.{}", b64u(sig.as_ref())))
}

/// RS256 with the fixture RSA key (ring cannot generate RSA keys).
fn sign_rs256(claims: &Value) -> String {
    let pkcs8 = URL_SAFE_NO_PAD
        .decode(fixtures()["keys"]["rsa"]["pkcs8"].as_str().expect("pkcs8"))
        .expect("b64");
    let pair = RsaKeyPair::from_pkcs8(&pkcs8).expect("rsa pkcs8");
    let input = signing_input(&json!({"alg": "RS256", "kid": "rsa"}), claims);
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    format!("{input}.{}", b64u(&sig))
}

fn by_secret() -> Verifier {
    Verifier::with_secret(&secret(), None, None).expect("secret verifier")
}

fn by_jwk(jwk: &Value) -> Verifier {
    Verifier::with_jwk(&jwk.to_string(), None, None).expect("jwk verifier")
}

fn err(v: &Verifier, token: &str, user: &str) -> String {
    match v.verify(token, user, NOW) {
        Ok(c) => panic!("verified, expected an error: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// Serves `body` with `status` to every GET and counts the requests.
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    reply: Arc<Mutex<(u16, String)>>,
}

impl JwksServer {
    fn start(keys: &[Value]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        let hits = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(Mutex::new((200, json!({ "keys": keys }).to_string())));
        let (h, r) = (hits.clone(), reply.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if !req.starts_with(b"GET ") {
                    continue;
                }
                h.fetch_add(1, Ordering::SeqCst);
                let (status, body) = r.lock().expect("reply").clone();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        JwksServer { url, hits, reply }
    }

    fn set_keys(&self, keys: &[Value]) {
        *self.reply.lock().expect("reply") = (200, json!({ "keys": keys }).to_string());
    }

    fn set_reply(&self, status: u16, body: &str) {
        *self.reply.lock().expect("reply") = (status, body.to_owned());
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn all_public_jwks() -> Vec<Value> {
    ["rsa", "p256", "p384", "ed25519"].map(jwk).to_vec()
}

#[test]
fn verifier_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Verifier>();
}

#[test]
fn secret_verifies_hs256_hs384_hs512() {
    let v = by_secret();
    for alg in ["HS256", "HS384", "HS512"] {
        let claims = v
            .verify(&token(alg), "alice", NOW)
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(claims["role"], "admin", "{alg}");
        assert_eq!(claims["sub"], "alice");
    }
}

#[test]
fn jwk_verifies_rs_ps_es_eddsa() {
    let cases = [
        (
            "rsa",
            &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"][..],
        ),
        ("p256", &["ES256"]),
        ("p384", &["ES384"]),
        ("ed25519", &["EdDSA"]),
    ];
    for (key, algs) in cases {
        let v = by_jwk(&jwk(key));
        for alg in algs {
            let claims = v
                .verify(&token(alg), "alice", NOW)
                .unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert_eq!(claims["role"], "admin");
        }
    }
}

#[test]
fn jwks_verifies_every_asymmetric_alg_with_one_fetch() {
    let server = JwksServer::start(&all_public_jwks());
    let v = Verifier::with_jwks_url(&server.url, None, None).expect("jwks verifier");
    assert_eq!(server.hits(), 0, "no fetch before the first token");
    for alg in [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ] {
        v.verify(&token(alg), "alice", NOW)
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
    }
    assert_eq!(server.hits(), 1);
    assert_eq!(v.jwks_fetches(), 1);
}

#[test]
fn time_checks_exp_and_nbf() {
    let v = by_secret();
    let at = |extra: Value| {
        let mut c = json!({"sub": "alice"});
        c.as_object_mut()
            .expect("obj")
            .extend(extra.as_object().expect("obj").clone());
        sign_secret(&c)
    };
    assert_eq!(
        err(&v, &at(json!({"exp": NOW})), "alice"),
        "JWTExpired: \"exp\" claim timestamp check failed"
    );
    v.verify(&at(json!({"exp": NOW + 1})), "alice", NOW)
        .expect("exp in the future");
    v.verify(&at(json!({"exp": NOW as f64 + 0.5})), "alice", NOW)
        .expect("fractional exp");
    assert_eq!(
        err(&v, &at(json!({"nbf": NOW + 1})), "alice"),
        "JWTClaimValidationFailed: \"nbf\" claim timestamp check failed"
    );
    v.verify(&at(json!({"nbf": NOW})), "alice", NOW)
        .expect("nbf now");
    assert_eq!(
        err(&v, &at(json!({"iat": "yesterday"})), "alice"),
        "JWTClaimValidationFailed: \"iat\" claim must be a number"
    );
    // The same checks with an asymmetric key signed here.
    let ec = EcKey::new("k");
    let v = by_jwk(&ec.jwk());
    let expired = ec.sign(&json!({"sub": "alice", "exp": NOW - 10}));
    assert_eq!(
        err(&v, &expired, "alice"),
        "JWTExpired: \"exp\" claim timestamp check failed"
    );
    v.verify(&expired, "alice", NOW - 11)
        .expect("valid before exp");
    let rs = sign_rs256(&json!({"sub": "alice", "nbf": NOW + 60}));
    assert_eq!(
        err(&by_jwk(&jwk("rsa")), &rs, "alice"),
        "JWTClaimValidationFailed: \"nbf\" claim timestamp check failed"
    );
}

#[test]
fn sub_must_be_present_and_equal_the_user_id() {
    let v = by_secret();
    assert_eq!(
        err(&v, &token("HS256"), "bob"),
        "JWTClaimValidationFailed: unexpected \"sub\" claim value"
    );
    assert_eq!(
        err(&v, &sign_secret(&json!({"name": "alice"})), "alice"),
        "JWTClaimValidationFailed: missing required \"sub\" claim"
    );
    assert_eq!(
        err(&v, &sign_secret(&json!({"sub": 7})), "7"),
        "JWTClaimValidationFailed: unexpected \"sub\" claim value"
    );
    let (ed, t) = sign_ed25519(&json!({"sub": "carol"}));
    let v = by_jwk(&ed);
    v.verify(&t, "carol", NOW).expect("ed25519 signed here");
    assert_eq!(
        err(&v, &t, "alice"),
        "JWTClaimValidationFailed: unexpected \"sub\" claim value"
    );
}

#[test]
fn wrong_key_and_tampered_payload_fail_the_signature() {
    const FAILED: &str = "JWSSignatureVerificationFailed: signature verification failed";
    let other = sign_hs("HS256", b"another secret", &json!({"sub": "alice"}));
    assert_eq!(err(&by_secret(), &other, "alice"), FAILED);
    let rsa = by_jwk(&jwk("rsa"));
    assert_eq!(err(&rsa, &token("RS256_other_key"), "alice"), FAILED);
    assert_eq!(
        err(&by_jwk(&EcKey::new("x").jwk()), &token("ES256"), "alice"),
        FAILED
    );
    // Another payload under a valid signature.
    for (v, name) in [
        (&rsa, "RS256"),
        (&by_secret(), "HS256"),
        (&by_jwk(&jwk("ed25519")), "EdDSA"),
    ] {
        let t = token(name);
        let parts: Vec<&str> = t.split('.').collect();
        let forged = b64u(
            json!({"sub": "alice", "role": "root"})
                .to_string()
                .as_bytes(),
        );
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_eq!(err(v, &tampered, "alice"), FAILED, "{name}");
        // A cut signature is a failed check too, not a crash.
        let cut = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..12]);
        assert_eq!(err(v, &cut, "alice"), FAILED, "{name}");
    }
}

#[test]
fn not_a_jwt_is_an_invalid_compact_jws() {
    let v = by_secret();
    for t in ["", "abc", "a.b", "a.b.c.d", "....", "Bearer x"] {
        assert_eq!(
            err(&v, t, "alice"),
            "JWSInvalid: Invalid Compact JWS",
            "{t:?}"
        );
    }
    assert_eq!(
        err(&v, "!!!.e30.x", "alice"),
        "JWSInvalid: JWS Protected Header is invalid"
    );
    let long = format!("{}.{}", token("HS256"), "a".repeat(TOKEN_BYTES_MAX));
    assert_eq!(
        err(&v, &long[..TOKEN_BYTES_MAX + 1], "alice"),
        "JWSInvalid: Invalid Compact JWS"
    );
    // A payload that is not an object, under a valid signature.
    let input = format!("{}.{}", b64u(br#"{"alg":"HS256"}"#), b64u(b"[1,2]"));
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret().as_bytes()),
        input.as_bytes(),
    );
    let t = format!("{input}.{}", b64u(tag.as_ref()));
    assert_eq!(
        err(&v, &t, "alice"),
        "JWTInvalid: JWT Claims Set must be a top-level JSON object"
    );
}

#[test]
fn alg_none_is_refused_by_every_key_source() {
    let unsigned = format!(
        "{}.{}.",
        b64u(br#"{"alg":"none"}"#),
        b64u(br#"{"sub":"alice"}"#)
    );
    assert_eq!(
        err(&by_secret(), &unsigned, "alice"),
        "TypeError: Key for the none algorithm must be one of type KeyObject, CryptoKey, or JSON Web Key. \
         Received an instance of Uint8Array"
    );
    assert_eq!(
        err(&by_jwk(&jwk("rsa")), &unsigned, "alice"),
        "JOSENotSupported: alg none is not supported either by JOSE or your javascript runtime"
    );
    let server = JwksServer::start(&all_public_jwks());
    let v = Verifier::with_jwks_url(&server.url, None, None).expect("jwks");
    assert_eq!(
        err(&v, &unsigned, "alice"),
        "JOSENotSupported: Unsupported \"alg\" value for a JSON Web Key Set"
    );
    let no_alg = format!(
        "{}.{}.",
        b64u(br#"{"typ":"JWT"}"#),
        b64u(br#"{"sub":"alice"}"#)
    );
    assert_eq!(
        err(&by_secret(), &no_alg, "alice"),
        "JWSInvalid: JWS \"alg\" (Algorithm) Header Parameter missing or invalid"
    );
}

#[test]
fn hs_rs_confusion_fails() {
    let rsa = by_jwk(&jwk("rsa"));
    for name in ["HS256_rsa_public_pem", "HS256_rsa_public_jwk"] {
        assert_eq!(
            err(&rsa, &token(name), "alice"),
            "TypeError: JSON Web Key for symmetric algorithms must have JWK \"kty\" (Key Type) equal to \"oct\" \
             and the JWK \"k\" (Key Value) present",
            "{name}"
        );
    }
    let server = JwksServer::start(&all_public_jwks());
    let v = Verifier::with_jwks_url(&server.url, None, None).expect("jwks");
    assert_eq!(
        err(&v, &token("HS256_rsa_public_pem"), "alice"),
        "JOSENotSupported: Unsupported \"alg\" value for a JSON Web Key Set"
    );
}

#[test]
fn asymmetric_token_against_a_secret_is_jose_type_error() {
    // legacy-features.md §1.5: the message zero-cache 1.9.0 gives (and then crashes on).
    assert_eq!(
        err(&by_secret(), &token("RS256"), "alice"),
        "TypeError: Key for the RS256 algorithm must be one of type KeyObject, CryptoKey, or JSON Web Key. \
         Received an instance of Uint8Array"
    );
    assert_eq!(
        err(&by_jwk(&jwk("p256")), &token("RS256"), "alice"),
        "TypeError: Invalid key for this operation, its asymmetricKeyType must be rsa"
    );
    assert_eq!(
        err(&by_jwk(&jwk("p256")), &token("ES384"), "alice"),
        "TypeError: Invalid key curve for the algorithm, its curve must be P-384, got P-256"
    );
}

#[test]
fn jwk_alg_use_and_key_ops_are_enforced() {
    let with = |extra: Value| {
        let mut k = jwk("rsa");
        k.as_object_mut()
            .expect("obj")
            .extend(extra.as_object().expect("obj").clone());
        by_jwk(&k)
    };
    let rs512 = with(json!({"alg": "RS512"}));
    rs512
        .verify(&token("RS512"), "alice", NOW)
        .expect("alg matches");
    assert_eq!(
        err(&rs512, &token("RS256"), "alice"),
        "TypeError: Invalid key for this operation, when present its alg must be RS256"
    );
    assert_eq!(
        err(&with(json!({"use": "enc"})), &token("RS256"), "alice"),
        "TypeError: Invalid key for this operation, when present its use must be sig"
    );
    assert_eq!(
        err(
            &with(json!({"key_ops": ["sign"]})),
            &token("RS256"),
            "alice"
        ),
        "TypeError: Invalid key for this operation, when present its key_ops must include verify"
    );
    with(json!({"use": "sig", "key_ops": ["verify"]}))
        .verify(&token("PS256"), "alice", NOW)
        .expect("use sig, key_ops verify");
}

#[test]
fn issuer_and_audience_when_configured() {
    let v =
        Verifier::with_secret(&secret(), Some(ISSUER.into()), Some(AUDIENCE.into())).expect("v");
    v.verify(&token("HS256"), "alice", NOW)
        .expect("fixture has iss and aud");
    let t = |c: Value| sign_secret(&c);
    assert_eq!(
        err(&v, &t(json!({"sub": "alice", "aud": AUDIENCE})), "alice"),
        "JWTClaimValidationFailed: missing required \"iss\" claim"
    );
    assert_eq!(
        err(
            &v,
            &t(json!({"sub": "alice", "iss": "https://evil.example", "aud": AUDIENCE})),
            "alice"
        ),
        "JWTClaimValidationFailed: unexpected \"iss\" claim value"
    );
    assert_eq!(
        err(&v, &t(json!({"sub": "alice", "iss": ISSUER})), "alice"),
        "JWTClaimValidationFailed: missing required \"aud\" claim"
    );
    assert_eq!(
        err(
            &v,
            &t(json!({"sub": "alice", "iss": ISSUER, "aud": "other"})),
            "alice"
        ),
        "JWTClaimValidationFailed: unexpected \"aud\" claim value"
    );
    v.verify(
        &t(json!({"sub": "alice", "iss": ISSUER, "aud": ["other", AUDIENCE]})),
        "alice",
        NOW,
    )
    .expect("aud array containing the audience");
    assert_eq!(
        err(
            &v,
            &t(json!({"sub": "alice", "iss": ISSUER, "aud": ["other"]})),
            "alice"
        ),
        "JWTClaimValidationFailed: unexpected \"aud\" claim value"
    );
    // Without the options, neither claim is required.
    by_secret()
        .verify(&t(json!({"sub": "alice"})), "alice", NOW)
        .expect("no iss/aud needed");
}

#[test]
fn jwks_unknown_kid_waits_for_the_cooldown() {
    let (k1, k2) = (EcKey::new("k1"), EcKey::new("k2"));
    let server = JwksServer::start(&[k1.jwk()]);
    let cooldown = Duration::from_millis(400);
    let v = Verifier::with_jwks_timing(&server.url, None, None, Duration::from_secs(600), cooldown)
        .expect("jwks");
    let (t1, t2) = (
        k1.sign(&json!({"sub": "alice"})),
        k2.sign(&json!({"sub": "alice"})),
    );
    assert!(v.may_block(&t1), "nothing cached yet");
    v.verify(&t1, "alice", NOW).expect("k1");
    assert_eq!((server.hits(), v.jwks_fetches()), (1, 1));
    assert!(!v.may_block(&t1), "k1 is cached");

    // k2 is published, but inside the cooldown the cached set answers at once.
    server.set_keys(&[k1.jwk(), k2.jwk()]);
    assert!(!v.may_block(&t2), "inside the cooldown nothing is fetched");
    assert_eq!(
        err(&v, &t2, "alice"),
        "JWKSNoMatchingKey: no applicable key found in the JSON Web Key Set"
    );
    assert_eq!(server.hits(), 1, "no fetch inside the cooldown");

    std::thread::sleep(cooldown + Duration::from_millis(100));
    assert!(v.may_block(&t2), "unknown kid after the cooldown fetches");
    assert!(!v.may_block(&t1), "a known kid never fetches while fresh");
    v.verify(&t2, "alice", NOW).expect("k2 after the refetch");
    assert_eq!(server.hits(), 2, "exactly one more fetch");
    v.verify(&t2, "alice", NOW).expect("k2 cached");
    v.verify(&t1, "alice", NOW).expect("k1 still there");
    assert_eq!(server.hits(), 2);

    // A kid that stays unknown: one refetch after the cooldown, then the error.
    std::thread::sleep(cooldown + Duration::from_millis(100));
    let t3 = EcKey::new("k3").sign(&json!({"sub": "alice"}));
    assert_eq!(
        err(&v, &t3, "alice"),
        "JWKSNoMatchingKey: no applicable key found in the JSON Web Key Set"
    );
    assert_eq!(server.hits(), 3);
    assert!(!v.may_block(&t3), "the refetch restarted the cooldown");
}

#[test]
fn jwks_is_refetched_past_its_max_age() {
    let k = EcKey::new("k");
    let server = JwksServer::start(&[k.jwk()]);
    let max_age = Duration::from_millis(300);
    let v = Verifier::with_jwks_timing(&server.url, None, None, max_age, Duration::from_secs(30))
        .expect("jwks");
    let t = k.sign(&json!({"sub": "alice"}));
    v.verify(&t, "alice", NOW).expect("first");
    v.verify(&t, "alice", NOW).expect("cached");
    assert_eq!(server.hits(), 1);
    std::thread::sleep(max_age + Duration::from_millis(100));
    assert!(v.may_block(&t));
    v.verify(&t, "alice", NOW).expect("after max age");
    assert_eq!(server.hits(), 2);
}

#[test]
fn jwks_key_selection_needs_exactly_one_key() {
    let (a, b) = (EcKey::new("a"), EcKey::new("b"));
    let no_kid = |k: &EcKey| {
        let mut j = k.jwk();
        j.as_object_mut().expect("obj").remove("kid");
        j
    };
    let server = JwksServer::start(&[no_kid(&a), no_kid(&b)]);
    let v = Verifier::with_jwks_url(&server.url, None, None).expect("jwks");
    let t = a.sign_with(json!({"alg": "ES256"}), &json!({"sub": "alice"}));
    assert_eq!(
        err(&v, &t, "alice"),
        "JWKSMultipleMatchingKeys: multiple matching keys found in the JSON Web Key Set"
    );
    // The kid narrows it down; use/key_ops/alg filter too.
    let mut enc = b.jwk();
    enc["use"] = json!("enc");
    let mut es384_only = b.jwk();
    es384_only["alg"] = json!("ES384");
    let server = JwksServer::start(&[a.jwk(), enc, es384_only]);
    let v = Verifier::with_jwks_url(&server.url, None, None).expect("jwks");
    v.verify(&a.sign(&json!({"sub": "alice"})), "alice", NOW)
        .expect("a by kid");
    assert_eq!(
        err(&v, &b.sign(&json!({"sub": "alice"})), "alice"),
        "JWKSNoMatchingKey: no applicable key found in the JSON Web Key Set"
    );
}

#[test]
fn jwks_fetch_failures_are_errors_and_not_cached() {
    let k = EcKey::new("k");
    let t = k.sign(&json!({"sub": "alice"}));

    // Server down: nothing listens on the port.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let v =
        Verifier::with_jwks_url(&format!("http://127.0.0.1:{port}/jwks"), None, None).expect("v");
    let e = v.verify(&t, "alice", NOW).expect_err("server down");
    assert_eq!(e.name(), "Error", "{e}");
    assert!(v.may_block(&t), "a failed fetch caches nothing");
    assert_eq!(v.jwks_fetches(), 1);

    let server = JwksServer::start(&[k.jwk()]);
    let v = Verifier::with_jwks_url(&server.url, None, None).expect("v");
    server.set_reply(500, "oops");
    assert_eq!(
        err(&v, &t, "alice"),
        "JOSEError: Expected 200 OK from the JSON Web Key Set HTTP response"
    );
    server.set_reply(200, "{not json");
    assert_eq!(
        err(&v, &t, "alice"),
        "JOSEError: Failed to parse the JSON Web Key Set HTTP response as JSON"
    );
    server.set_reply(200, r#"{"keys": {}}"#);
    assert_eq!(
        err(&v, &t, "alice"),
        "JWKSInvalid: JSON Web Key Set malformed"
    );
    server.set_reply(
        200,
        &format!(r#"{{"keys": [], "pad": "{}"}}"#, "x".repeat(JWKS_BYTES_MAX)),
    );
    assert!(
        err(&v, &t, "alice").starts_with("JOSEError: the JSON Web Key Set HTTP response is larger")
    );
    assert_eq!(
        server.hits(),
        4,
        "every failure is retried by the next token"
    );
    server.set_keys(&[k.jwk()]);
    v.verify(&t, "alice", NOW).expect("recovered");
    assert_eq!(server.hits(), 5);
}

#[test]
fn error_strings_match_the_spec_table() {
    // legacy-features.md §1.4, "Observed connect outcomes (secret config)".
    let prefix = |e: JwtError| format!("Failed to decode auth token: {e}");
    let v = Verifier::with_secret(&secret(), None, None).expect("v");
    let iss = Verifier::with_secret(&secret(), Some(ISSUER.into()), None).expect("v");
    let aud = Verifier::with_secret(&secret(), None, Some(AUDIENCE.into())).expect("v");
    let run = |v: &Verifier, claims: Value, user: &str| {
        prefix(
            v.verify(&sign_secret(&claims), user, NOW)
                .expect_err("must fail"),
        )
    };
    let cases = [
        (run(&v, json!({"sub": "u", "exp": NOW - 1}), "u"),
         "Failed to decode auth token: JWTExpired: \"exp\" claim timestamp check failed"),
        (run(&v, json!({"sub": "u", "nbf": NOW + 100}), "u"),
         "Failed to decode auth token: JWTClaimValidationFailed: \"nbf\" claim timestamp check failed"),
        (run(&v, json!({"sub": "u"}), "other"),
         "Failed to decode auth token: JWTClaimValidationFailed: unexpected \"sub\" claim value"),
        (run(&v, json!({}), "u"),
         "Failed to decode auth token: JWTClaimValidationFailed: missing required \"sub\" claim"),
        (prefix(v.verify(&sign_hs("HS256", b"wrong", &json!({"sub": "u"})), "u", NOW).expect_err("wrong key")),
         "Failed to decode auth token: JWSSignatureVerificationFailed: signature verification failed"),
        (prefix(v.verify("not-a-jwt", "u", NOW).expect_err("not a jwt")),
         "Failed to decode auth token: JWSInvalid: Invalid Compact JWS"),
        (run(&iss, json!({"sub": "u"}), "u"),
         "Failed to decode auth token: JWTClaimValidationFailed: missing required \"iss\" claim"),
        (run(&aud, json!({"sub": "u", "aud": "nope"}), "u"),
         "Failed to decode auth token: JWTClaimValidationFailed: unexpected \"aud\" claim value"),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
    let k = EcKey::new("known");
    let server = JwksServer::start(&[k.jwk()]);
    let v = Verifier::with_jwks_url(&server.url, None, None).expect("jwks");
    let unknown = EcKey::new("unknown").sign(&json!({"sub": "u"}));
    assert_eq!(
        prefix(v.verify(&unknown, "u", NOW).expect_err("unknown kid")),
        "Failed to decode auth token: JWKSNoMatchingKey: no applicable key found in the JSON Web Key Set"
    );
}

fn config(args: &[&str]) -> Config {
    Config::try_parse_from(std::iter::once("zcache").chain(args.iter().copied())).expect("config")
}

#[test]
fn from_config_picks_the_key_and_refuses_unusable_material() {
    assert!(Verifier::from_config(&config(&[]))
        .expect("no key")
        .is_none());
    let v = Verifier::from_config(&config(&["--auth-secret", &secret()]))
        .expect("secret")
        .expect("some");
    v.verify(&token("HS512"), "alice", NOW)
        .expect("secret from config");
    let jwk_s = jwk("ed25519").to_string();
    let v = Verifier::from_config(&config(&["--auth-jwk", &jwk_s]))
        .expect("jwk")
        .expect("some");
    v.verify(&token("EdDSA"), "alice", NOW)
        .expect("jwk from config");
    let v = Verifier::from_config(&config(&[
        "--auth-secret",
        &secret(),
        "--auth-issuer",
        ISSUER,
        "--auth-audience",
        "nobody",
    ]))
    .expect("ok")
    .expect("some");
    assert_eq!(
        err(&v, &token("HS256"), "alice"),
        "JWTClaimValidationFailed: unexpected \"aud\" claim value"
    );
    assert!(
        Verifier::from_config(&config(&["--auth-jwks-url", "https://example.com/jwks"]))
            .expect("https url")
            .is_some()
    );

    let refused = |args: &[&str]| match Verifier::from_config(&config(args)) {
        Ok(_) => panic!("{args:?} accepted"),
        Err(e) => e.to_string(),
    };
    assert!(refused(&["--auth-jwk", "not json"]).contains("ZERO_AUTH_JWK"));
    assert!(refused(&["--auth-jwk", "[1]"]).contains("not a JSON object"));
    assert!(refused(&["--auth-jwk", r#"{"kty":"XYZ"}"#]).contains("kty"));
    assert!(refused(&[
        "--auth-jwk",
        r#"{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}"#
    ])
    .contains("P-521"));
    assert!(refused(&["--auth-jwk", r#"{"kty":"OKP","crv":"Ed448","x":"AA"}"#]).contains("Ed448"));
    assert!(refused(&[
        "--auth-jwk",
        r#"{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}"#
    ])
    .contains("\"x\""));
    let mut private = jwk("p256");
    private["d"] = json!("AAAA");
    assert!(refused(&["--auth-jwk", &private.to_string()]).contains("private"));
    assert!(refused(&["--auth-jwks-url", "ftp://example.com/jwks"]).contains("http"));
    assert!(refused(&["--auth-jwks-url", "/jwks.json"]).contains("http"));
    assert!(refused(&["--auth-secret", ""]).contains("empty"));
}
