//! Client JWTs (legacy auth): verification against ZERO_AUTH_SECRET, ZERO_AUTH_JWK or
//! ZERO_AUTH_JWKS_URL, as zero-cache 1.9.0 does it with jose 5.10's `jwtVerify(token, key,
//! {subject: userID, issuer?, audience?})` (legacy-features.md §1.2): the same checks in the same
//! order, and the same error names and messages, because clients see them in AuthInvalidated.

mod error;
mod jwks;
mod key;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

pub use error::{AuthError, JwtError};
pub use jwks::{JWKS_BYTES_MAX, JWKS_CACHE_MAX_AGE, JWKS_COOLDOWN, JWKS_KEYS_MAX, JWKS_TIMEOUT};

use jwks::RemoteJwks;
use key::{Jwk, KeyMaterial, VerifyAlg};

/// A JWT's payload.
pub type Claims = Map<String, Value>;

/// Longer tokens are refused before any decoding (`JWSInvalid: Invalid Compact JWS`): real
/// tokens are well under 2 KiB, and this bounds the work an unauthenticated client can cause.
pub const TOKEN_BYTES_MAX: usize = 16 * 1024;

/// Verifies client JWTs with the configured key. Shared by all shards (Send + Sync); only the
/// JWKS cache is mutable, behind short locks.
pub struct Verifier {
    key: KeySource,
    issuer: Option<String>,
    audience: Option<String>,
}

enum KeySource {
    /// ZERO_AUTH_SECRET: jose gets a `Uint8Array`.
    Secret(KeyMaterial),
    /// ZERO_AUTH_JWK: jose gets the JWK object itself.
    Jwk(Box<Jwk>),
    Jwks(Arc<RemoteJwks>),
}

/// A compact JWS split and its protected header read (flattened/verify.js up to the key).
struct Compact<'a> {
    signing_input: &'a str,
    payload: &'a str,
    signature: &'a str,
    alg: String,
    kid: Option<String>,
    /// `crit: ["b64"]` with `b64: false`: verifiable, but no JWT may use it.
    unencoded: bool,
}

/// Node's TextDecoder drops a leading byte-order mark and replaces invalid UTF-8.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    String::from_utf8_lossy(bytes)
}

fn parse_compact(token: &str) -> Result<Compact<'_>, JwtError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(JwtError::invalid_compact());
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::invalid_compact());
    };
    // An empty protected header is jose's `{}`; a JSON value that is not an object spreads to
    // one without `alg`.
    let signing_input = &token[..header.len() + 1 + payload.len()];
    let header: Map<String, Value> = if header.is_empty() {
        Map::new()
    } else {
        let invalid = || JwtError::JwsInvalid("JWS Protected Header is invalid".into());
        let raw = URL_SAFE_NO_PAD.decode(header).map_err(|_| invalid())?;
        match serde_json::from_str::<Value>(&text(&raw)).map_err(|_| invalid())? {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    };
    let unencoded = check_crit(&header)?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) if !a.is_empty() => a.clone(),
        _ => {
            return Err(JwtError::JwsInvalid(
                "JWS \"alg\" (Algorithm) Header Parameter missing or invalid".into(),
            ))
        }
    };
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
    Ok(Compact {
        signing_input,
        payload,
        signature,
        alg,
        kid,
        unencoded,
    })
}

/// lib/validate_crit.js with jose's only known extension, `b64`; returns whether the payload is
/// unencoded (`b64: false`).
fn check_crit(header: &Map<String, Value>) -> Result<bool, JwtError> {
    let Some(crit) = header.get("crit") else {
        return Ok(false);
    };
    let names: Vec<&str> = match crit.as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|v| v.as_str().filter(|s| !s.is_empty()))
            .collect::<Option<_>>()
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        return Err(JwtError::JwsInvalid(
            "\"crit\" (Critical) Header Parameter MUST be an array of non-empty strings when present"
                .into(),
        ));
    }
    for name in names {
        if name != "b64" {
            return Err(JwtError::JoseNotSupported(format!(
                "Extension Header Parameter \"{name}\" is not recognized"
            )));
        }
        if !header.contains_key(name) {
            return Err(JwtError::JwsInvalid(format!(
                "Extension Header Parameter \"{name}\" is missing"
            )));
        }
    }
    match header.get("b64") {
        Some(Value::Bool(b)) => Ok(!b),
        _ => Err(JwtError::JwsInvalid(
            "The \"b64\" (base64url-encode payload) Header Parameter must be a boolean".into(),
        )),
    }
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref().filter(|s| !s.is_empty()).cloned()
}

impl Verifier {
    /// None when no key option is set (tokens then stay opaque). Err when the key material is
    /// unusable, so that a bad ZERO_AUTH_* stops the start-up instead of refusing every client.
    /// Precedence is zero-cache's (jwk > secret > jwksUrl), though config validation already
    /// refuses more than one.
    pub fn from_config(cfg: &crate::config::Config) -> Result<Option<Verifier>, AuthError> {
        let (issuer, audience) = (cfg.auth_issuer.clone(), cfg.auth_audience.clone());
        if let Some(jwk) = &cfg.auth_jwk {
            return Verifier::with_jwk(jwk, issuer, audience).map(Some);
        }
        if let Some(secret) = &cfg.auth_secret {
            return Verifier::with_secret(secret, issuer, audience).map(Some);
        }
        if let Some(url) = &cfg.auth_jwks_url {
            return Verifier::with_jwks_url(url, issuer, audience).map(Some);
        }
        Ok(None)
    }

    /// ZERO_AUTH_SECRET: the HMAC key is the string's UTF-8 bytes (not base64-decoded).
    pub fn with_secret(
        secret: &str,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<Verifier, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        Ok(Verifier {
            key: KeySource::Secret(KeyMaterial::Secret(secret.as_bytes().to_vec())),
            issuer: non_empty(&issuer),
            audience: non_empty(&audience),
        })
    }

    /// ZERO_AUTH_JWK: a public RSA, EC (P-256, P-384) or OKP (Ed25519) JWK, or an `oct` one.
    pub fn with_jwk(
        jwk_json: &str,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<Verifier, AuthError> {
        let obj = match serde_json::from_str::<Value>(jwk_json) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Err(AuthError::JwkNotJson("not an object".into())),
            Err(e) => return Err(AuthError::JwkNotJson(e.to_string())),
        };
        let jwk = Jwk::parse(&obj);
        if jwk.kty.is_none() {
            return Err(AuthError::Jwk("no \"kty\" member".into()));
        }
        if let Err(e) = &jwk.material {
            return Err(AuthError::Jwk(e.to_string()));
        }
        if jwk.private {
            // jose refuses a private JWK for every verification.
            return Err(AuthError::Jwk(
                "it is a private key (has \"d\"); give the public JWK".into(),
            ));
        }
        if let Ok(KeyMaterial::Rsa { n, .. }) = &jwk.material {
            if n.len() * 8 < 2048 {
                return Err(AuthError::Jwk(
                    "RSA keys under 2048 bits cannot verify RS*/PS* tokens".into(),
                ));
            }
        }
        Ok(Verifier {
            key: KeySource::Jwk(Box::new(jwk)),
            issuer: non_empty(&issuer),
            audience: non_empty(&audience),
        })
    }

    /// ZERO_AUTH_JWKS_URL with jose's default timing (600 s cache, 30 s cooldown). Nothing is
    /// fetched until the first token arrives.
    pub fn with_jwks_url(
        url: &str,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<Verifier, AuthError> {
        Verifier::with_jwks_timing(url, issuer, audience, JWKS_CACHE_MAX_AGE, JWKS_COOLDOWN)
    }

    /// As `with_jwks_url`, with the cache max age and the unknown-key refetch cooldown given
    /// (tests and benches).
    pub fn with_jwks_timing(
        url: &str,
        issuer: Option<String>,
        audience: Option<String>,
        cache_max_age: Duration,
        cooldown: Duration,
    ) -> Result<Verifier, AuthError> {
        let lower = url.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"));
        if !rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) {
            return Err(AuthError::JwksUrl(url.to_owned()));
        }
        Ok(Verifier {
            key: KeySource::Jwks(Arc::new(RemoteJwks::new(
                url.to_owned(),
                cache_max_age,
                cooldown,
            ))),
            issuer: non_empty(&issuer),
            audience: non_empty(&audience),
        })
    }

    /// How many JWKS requests were made (0 without a JWKS URL).
    pub fn jwks_fetches(&self) -> u64 {
        match &self.key {
            KeySource::Jwks(j) => j.fetch_count(),
            _ => 0,
        }
    }

    /// Whether verifying `token` may fetch the JWKS (no cached set, a cached set past its max
    /// age, or an unknown key outside the cooldown): run `verify` on a blocking pool then.
    pub fn may_block(&self, token: &str) -> bool {
        let KeySource::Jwks(jwks) = &self.key else {
            return false;
        };
        match parse_compact(token) {
            Ok(c) => jwks.may_fetch(&c.alg, c.kid.as_deref()),
            // Refused before any key is looked up.
            Err(_) => false,
        }
    }

    /// Verifies the signature and the claims and returns the payload. `user_id` is the
    /// connection's userID, which `sub` must equal; `now_s` is the Unix time in seconds.
    pub fn verify(&self, token: &str, user_id: &str, now_s: u64) -> Result<Claims, JwtError> {
        let c = parse_compact(token)?;
        // The key lookup (and JWKS fetch) happens before the signature is even decoded, as in
        // jose, so the same token gets the same error.
        let jwks_key;
        let (valg, material): (VerifyAlg, &KeyMaterial) = match &self.key {
            KeySource::Secret(k) => (key::secret_alg(&c.alg)?, k),
            KeySource::Jwk(jwk) => {
                let valg = key::jwk_alg(&c.alg, jwk)?;
                match &jwk.material {
                    Ok(m) => (valg, m),
                    Err(e) => return Err(e.clone()),
                }
            }
            KeySource::Jwks(jwks) => {
                let (keys, i, valg) = jwks.key(&c.alg, c.kid.as_deref())?;
                jwks_key = keys;
                match &jwks_key[i].material {
                    Ok(m) => (valg, m),
                    Err(e) => return Err(e.clone()),
                }
            }
        };
        let signature = URL_SAFE_NO_PAD
            .decode(c.signature)
            .map_err(|_| JwtError::JwsInvalid("Failed to base64url decode the signature".into()))?;
        if !key::verify_signature(valg, material, c.signing_input.as_bytes(), &signature) {
            return Err(JwtError::JwsSignatureVerificationFailed);
        }
        if c.unencoded {
            return Err(JwtError::JwtInvalid(
                "JWTs MUST NOT use unencoded payload".into(),
            ));
        }
        let payload = URL_SAFE_NO_PAD
            .decode(c.payload)
            .map_err(|_| JwtError::JwsInvalid("Failed to base64url decode the payload".into()))?;
        self.check_claims(&payload, user_id, now_s)
    }

    /// lib/jwt_claims_set.js with `{subject, issuer?, audience?}` and no clock tolerance.
    fn check_claims(&self, payload: &[u8], user_id: &str, now_s: u64) -> Result<Claims, JwtError> {
        let claims = match serde_json::from_str::<Value>(&text(payload)) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Err(JwtError::JwtInvalid(
                    "JWT Claims Set must be a top-level JSON object".into(),
                ))
            }
        };
        // jose checks presence in reverse order of [aud, sub, iss].
        let required = [
            self.issuer.as_ref().map(|_| "iss"),
            Some("sub"),
            self.audience.as_ref().map(|_| "aud"),
        ];
        for claim in required.into_iter().flatten() {
            if !claims.contains_key(claim) {
                return Err(JwtError::claim(format!(
                    "missing required \"{claim}\" claim"
                )));
            }
        }
        if let Some(iss) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err(JwtError::claim("unexpected \"iss\" claim value"));
            }
        }
        // jose skips the value check for an empty subject (`subject && ...`).
        if !user_id.is_empty() && claims.get("sub").and_then(Value::as_str) != Some(user_id) {
            return Err(JwtError::claim("unexpected \"sub\" claim value"));
        }
        if let Some(aud) = &self.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(s)) => s == aud,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(aud.as_str())),
                _ => false,
            };
            if !ok {
                return Err(JwtError::claim("unexpected \"aud\" claim value"));
            }
        }
        let now = now_s as f64;
        if let Some(iat) = claims.get("iat") {
            if !iat.is_number() {
                return Err(JwtError::claim("\"iat\" claim must be a number"));
            }
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf
                .as_f64()
                .ok_or_else(|| JwtError::claim("\"nbf\" claim must be a number"))?;
            if nbf > now {
                return Err(JwtError::claim("\"nbf\" claim timestamp check failed"));
            }
        }
        if let Some(exp) = claims.get("exp") {
            let exp = exp
                .as_f64()
                .ok_or_else(|| JwtError::claim("\"exp\" claim must be a number"))?;
            if exp <= now {
                return Err(JwtError::JwtExpired);
            }
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests;
