//! The two error layers of client-JWT auth: start-up (`AuthError`) and per-token (`JwtError`).

/// Why a token was refused. `Display` is what zero-cache 1.9.0 puts after
/// `Failed to decode auth token: `, i.e. jose 5.10's `String(err)` = `<ErrorName>: <message>`,
/// so clients and logs see the same text from zcache as from zero-cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("JWSInvalid: {0}")]
    JwsInvalid(String),
    #[error("JWTInvalid: {0}")]
    JwtInvalid(String),
    #[error("JWSSignatureVerificationFailed: signature verification failed")]
    JwsSignatureVerificationFailed,
    #[error("JWTClaimValidationFailed: {0}")]
    JwtClaimValidationFailed(String),
    #[error("JWTExpired: \"exp\" claim timestamp check failed")]
    JwtExpired,
    #[error("JOSENotSupported: {0}")]
    JoseNotSupported(String),
    /// jose throws plain `TypeError`s for key/algorithm mismatches (an RS256 token against a
    /// secret, an HS256 token against an RSA JWK, a JWK whose `alg` differs, ...).
    #[error("TypeError: {0}")]
    TypeError(String),
    #[error("JWKInvalid: {0}")]
    JwkInvalid(String),
    #[error("JWKSInvalid: {0}")]
    JwksInvalid(String),
    #[error("JWKSNoMatchingKey: no applicable key found in the JSON Web Key Set")]
    JwksNoMatchingKey,
    #[error("JWKSMultipleMatchingKeys: multiple matching keys found in the JSON Web Key Set")]
    JwksMultipleMatchingKeys,
    #[error("JWKSTimeout: request timed out")]
    JwksTimeout,
    /// jose's base class: a non-200 JWKS response, a body that is not JSON.
    #[error("JOSEError: {0}")]
    Jose(String),
    /// The JWKS request failed below HTTP (refused, reset, DNS). Node surfaces these as a plain
    /// `Error` with its own text, which cannot be reproduced byte for byte.
    #[error("Error: {0}")]
    Fetch(String),
}

impl JwtError {
    /// The jose error class name (the part of `Display` before `: `).
    pub fn name(&self) -> &'static str {
        match self {
            JwtError::JwsInvalid(_) => "JWSInvalid",
            JwtError::JwtInvalid(_) => "JWTInvalid",
            JwtError::JwsSignatureVerificationFailed => "JWSSignatureVerificationFailed",
            JwtError::JwtClaimValidationFailed(_) => "JWTClaimValidationFailed",
            JwtError::JwtExpired => "JWTExpired",
            JwtError::JoseNotSupported(_) => "JOSENotSupported",
            JwtError::TypeError(_) => "TypeError",
            JwtError::JwkInvalid(_) => "JWKInvalid",
            JwtError::JwksInvalid(_) => "JWKSInvalid",
            JwtError::JwksNoMatchingKey => "JWKSNoMatchingKey",
            JwtError::JwksMultipleMatchingKeys => "JWKSMultipleMatchingKeys",
            JwtError::JwksTimeout => "JWKSTimeout",
            JwtError::Jose(_) => "JOSEError",
            JwtError::Fetch(_) => "Error",
        }
    }

    pub(crate) fn invalid_compact() -> JwtError {
        JwtError::JwsInvalid("Invalid Compact JWS".into())
    }

    pub(crate) fn claim(msg: impl Into<String>) -> JwtError {
        JwtError::JwtClaimValidationFailed(msg.into())
    }
}

/// Key material that cannot verify anything: refused at start-up rather than at every connect.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("ZERO_AUTH_JWK is not a JSON object: {0}")]
    JwkNotJson(String),
    #[error("ZERO_AUTH_JWK cannot verify tokens: {0}")]
    Jwk(String),
    #[error("ZERO_AUTH_JWKS_URL must be an http:// or https:// URL, got {0:?}")]
    JwksUrl(String),
    #[error("ZERO_AUTH_SECRET is empty")]
    EmptySecret,
}
