//! ZERO_AUTH_JWKS_URL: jose 5.10's `createRemoteJWKSet` (jwks/remote.js, jwks/local.js,
//! runtime/fetch_jwks.js) with its default timing: no fetch at start-up, a 5 s request timeout,
//! the set reused until 600 s old, and one refetch on an unknown key once 30 s have passed.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::error::JwtError;
use super::key::{asymmetric_alg, Jwk, KeyMaterial, VerifyAlg};

/// Larger JWKS responses are refused: a real set is a few KiB, and the body is read into memory
/// on a verification path any client can trigger.
pub const JWKS_BYTES_MAX: usize = 1 << 20;
/// More keys than this are refused: key selection is a linear scan per token.
pub const JWKS_KEYS_MAX: usize = 100;
/// jose's `timeoutDuration` default.
pub const JWKS_TIMEOUT: Duration = Duration::from_millis(5000);
/// jose's `cacheMaxAge` default.
pub const JWKS_CACHE_MAX_AGE: Duration = Duration::from_secs(600);
/// jose's `cooldownDuration` default.
pub const JWKS_COOLDOWN: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Cached {
    keys: Option<Arc<Vec<Jwk>>>,
    /// When the last successful fetch finished (jose's `_jwksTimestamp`; failures leave it).
    fetched_at: Option<Instant>,
    /// Bumped on every successful fetch, so callers that queued behind a fetch reuse its result.
    generation: u64,
}

pub(crate) struct RemoteJwks {
    url: String,
    agent: ureq::Agent,
    cache_max_age: Duration,
    cooldown: Duration,
    cached: Mutex<Cached>,
    /// Serialises fetches (jose's `_pendingFetch`); never taken while `cached` is held.
    fetching: Mutex<()>,
    fetches: AtomicU64,
}

/// A poisoned lock only means another verification panicked mid-update; the cache holds whole
/// values, so carrying on is safe.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RemoteJwks {
    pub(crate) fn new(url: String, cache_max_age: Duration, cooldown: Duration) -> RemoteJwks {
        let mut b = ureq::AgentBuilder::new()
            .timeout(JWKS_TIMEOUT)
            // Node's http.get does not follow redirects: a 3xx is "not 200".
            .redirects(0);
        if url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            b = b.tls_connector(Arc::new(RustlsConnector::new()));
        }
        RemoteJwks {
            url,
            agent: b.build(),
            cache_max_age,
            cooldown,
            cached: Mutex::new(Cached::default()),
            fetching: Mutex::new(()),
            fetches: AtomicU64::new(0),
        }
    }

    pub(crate) fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> (Option<Arc<Vec<Jwk>>>, Option<Instant>, u64) {
        let c = lock(&self.cached);
        (c.keys.clone(), c.fetched_at, c.generation)
    }

    fn fresh(&self, at: Option<Instant>) -> bool {
        at.is_some_and(|t| t.elapsed() < self.cache_max_age)
    }

    fn cooling_down(&self, at: Option<Instant>) -> bool {
        at.is_some_and(|t| t.elapsed() < self.cooldown)
    }

    /// Whether `key` would fetch for this header: the same decisions as `key`, without fetching.
    pub(crate) fn may_fetch(&self, alg: &str, kid: Option<&str>) -> bool {
        let (keys, at, _) = self.snapshot();
        match keys {
            Some(keys) if self.fresh(at) => {
                matches!(select(&keys, alg, kid), Err(JwtError::JwksNoMatchingKey))
                    && !self.cooling_down(at)
            }
            _ => true,
        }
    }

    /// jose's `RemoteJWKSet.getKey` followed by the import and key checks of the chosen JWK.
    pub(crate) fn key(
        &self,
        alg: &str,
        kid: Option<&str>,
    ) -> Result<(Arc<Vec<Jwk>>, usize, VerifyAlg), JwtError> {
        let (keys, at, generation) = self.snapshot();
        let keys = match keys {
            Some(keys) if self.fresh(at) => keys,
            _ => self.reload(generation)?,
        };
        let (keys, i) = match select(&keys, alg, kid) {
            Ok(i) => (keys, i),
            Err(JwtError::JwksNoMatchingKey) => {
                let (_, at, generation) = self.snapshot();
                if self.cooling_down(at) {
                    return Err(JwtError::JwksNoMatchingKey);
                }
                let keys = self.reload(generation)?;
                let i = select(&keys, alg, kid)?;
                (keys, i)
            }
            Err(e) => return Err(e),
        };
        let jwk = &keys[i];
        // local.js importWithAlgCache: import, then refuse private keys.
        if let Err(e) = &jwk.material {
            return Err(e.clone());
        }
        if jwk.private || matches!(jwk.material, Ok(KeyMaterial::Secret(_))) {
            return Err(JwtError::JwksInvalid(
                "JSON Web Key Set members must be public keys".into(),
            ));
        }
        let valg = asymmetric_alg(alg, jwk)?;
        Ok((keys, i, valg))
    }

    /// Fetches unless another caller completed a fetch since `seen` (generation) was read.
    fn reload(&self, seen: u64) -> Result<Arc<Vec<Jwk>>, JwtError> {
        let _one_at_a_time = lock(&self.fetching);
        {
            let c = lock(&self.cached);
            if c.generation != seen {
                if let Some(keys) = &c.keys {
                    return Ok(keys.clone());
                }
            }
        }
        let keys = Arc::new(self.fetch()?);
        let mut c = lock(&self.cached);
        c.keys = Some(keys.clone());
        c.fetched_at = Some(Instant::now());
        c.generation += 1;
        Ok(keys)
    }

    fn fetch(&self) -> Result<Vec<Jwk>, JwtError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let not_ok =
            || JwtError::Jose("Expected 200 OK from the JSON Web Key Set HTTP response".into());
        let resp = match self
            .agent
            .get(&self.url)
            .set("User-Agent", concat!("zcache/", env!("CARGO_PKG_VERSION")))
            .call()
        {
            Ok(r) if r.status() == 200 => r,
            Ok(_) | Err(ureq::Error::Status(..)) => return Err(not_ok()),
            Err(ureq::Error::Transport(t)) => {
                tracing::warn!(url = %self.url, error = %t, "the JWKS cannot be fetched");
                return Err(if timed_out(&t) {
                    JwtError::JwksTimeout
                } else {
                    JwtError::Fetch(t.to_string())
                });
            }
        };
        let mut body = Vec::new();
        resp.into_reader()
            .take(JWKS_BYTES_MAX as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| match e.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => JwtError::JwksTimeout,
                _ => JwtError::Fetch(e.to_string()),
            })?;
        if body.len() > JWKS_BYTES_MAX {
            return Err(JwtError::Jose(format!(
                "the JSON Web Key Set HTTP response is larger than {JWKS_BYTES_MAX} bytes"
            )));
        }
        let json: Value = serde_json::from_str(&String::from_utf8_lossy(&body)).map_err(|_| {
            JwtError::Jose("Failed to parse the JSON Web Key Set HTTP response as JSON".into())
        })?;
        parse_set(&json)
    }
}

/// local.js `isJWKSLike` plus the key-count bound.
pub(crate) fn parse_set(json: &Value) -> Result<Vec<Jwk>, JwtError> {
    let malformed = || JwtError::JwksInvalid("JSON Web Key Set malformed".into());
    let keys = json
        .as_object()
        .and_then(|o| o.get("keys"))
        .and_then(Value::as_array)
        .ok_or_else(malformed)?;
    if keys.len() > JWKS_KEYS_MAX {
        return Err(JwtError::JwksInvalid(format!(
            "JSON Web Key Set has more than {JWKS_KEYS_MAX} keys"
        )));
    }
    keys.iter()
        .map(|k| k.as_object().map(Jwk::parse).ok_or_else(malformed))
        .collect()
}

/// local.js `getKtyFromAlg`.
fn kty_for_alg(alg: &str) -> Result<&'static str, JwtError> {
    match alg.get(..2) {
        Some("RS" | "PS") => Ok("RSA"),
        Some("ES") => Ok("EC"),
        Some("Ed") => Ok("OKP"),
        _ => Err(JwtError::JoseNotSupported(
            "Unsupported \"alg\" value for a JSON Web Key Set".into(),
        )),
    }
}

/// local.js `LocalJWKSet.getKey`'s candidate filter: exactly one key must match.
pub(crate) fn select(keys: &[Jwk], alg: &str, kid: Option<&str>) -> Result<usize, JwtError> {
    let kty = kty_for_alg(alg)?;
    let mut found = None;
    for (i, jwk) in keys.iter().enumerate() {
        if jwk.kty.as_deref() != Some(kty) {
            continue;
        }
        if kid.is_some_and(|kid| jwk.kid.as_ref().and_then(Value::as_str) != Some(kid)) {
            continue;
        }
        if jwk
            .alg
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|a| a != alg)
        {
            continue;
        }
        if jwk
            .use_
            .as_ref()
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        if let Some(ops) = jwk.key_ops.as_ref().and_then(Value::as_array) {
            if !ops.iter().any(|o| o == "verify") {
                continue;
            }
        }
        let crv = jwk.crv.as_ref().and_then(Value::as_str);
        let crv_ok = match alg {
            "ES256" => crv == Some("P-256"),
            "ES256K" => crv == Some("secp256k1"),
            "ES384" => crv == Some("P-384"),
            "ES512" => crv == Some("P-521"),
            "Ed25519" => crv == Some("Ed25519"),
            "EdDSA" => crv == Some("Ed25519") || crv == Some("Ed448"),
            _ => true,
        };
        if !crv_ok {
            continue;
        }
        if found.is_some() {
            return Err(JwtError::JwksMultipleMatchingKeys);
        }
        found = Some(i);
    }
    found.ok_or(JwtError::JwksNoMatchingKey)
}

fn timed_out(t: &ureq::Transport) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if matches!(
                io.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                return true;
            }
        }
        src = e.source();
    }
    false
}

/// https for the JWKS with the rustls (ring) and system roots the rest of zcache uses; ureq is
/// built without its own TLS feature.
struct RustlsConnector(Option<Arc<rustls::ClientConfig>>);

impl RustlsConnector {
    fn new() -> RustlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!("no system root certificates: https JWKS fetches will fail");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        match config {
            Ok(c) => RustlsConnector(Some(Arc::new(c))),
            Err(e) => {
                tracing::warn!(error = %e, "no TLS configuration: https JWKS fetches will fail");
                RustlsConnector(None)
            }
        }
    }
}

impl ureq::TlsConnector for RustlsConnector {
    fn connect(
        &self,
        dns_name: &str,
        io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let config = self
            .0
            .clone()
            .ok_or_else(|| io::Error::other("no TLS configuration"))?;
        let name = rustls::pki_types::ServerName::try_from(dns_name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        Ok(Box::new(TlsStream(rustls::StreamOwned::new(conn, io))))
    }
}

#[derive(Debug)]
struct TlsStream(rustls::StreamOwned<rustls::ClientConnection, Box<dyn ureq::ReadWrite>>);

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl ureq::ReadWrite for TlsStream {
    fn socket(&self) -> Option<&TcpStream> {
        self.0.sock.socket()
    }
}
