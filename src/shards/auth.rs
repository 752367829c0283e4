//! Who a connection speaks for: its userID and token, verified when a JWT key option is set
//! (zero-cache's auth.ts `resolveAuth` and `pickToken`, legacy-features.md §1.4 and §1.6).

use crate::auth::{Claims, Verifier};
use crate::protocol::{ErrorKind, ProtocolError};
use std::sync::Arc;

/// A connection's credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    /// A token verified against the configured key: its payload binds legacy permissions.
    Jwt { raw: String, claims: Claims },
    /// No key option is set: the token is only forwarded to the app server.
    Opaque(String),
}

impl Auth {
    pub fn raw(&self) -> &str {
        match self {
            Auth::Jwt { raw, .. } | Auth::Opaque(raw) => raw,
        }
    }

    /// What legacy permissions bind `authData` to: a JWT's payload. zero-cache binds only
    /// JWT auth, so an opaque token reads as anonymous.
    pub fn auth_data(&self) -> Option<serde_json::Value> {
        match self {
            Auth::Jwt { claims, .. } => Some(serde_json::Value::Object(claims.clone())),
            Auth::Opaque(_) => None,
        }
    }

    /// The JWT's `sub`, the rate limit's key.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Auth::Jwt { claims, .. } => claims.get("sub").and_then(|s| s.as_str()),
            Auth::Opaque(_) => None,
        }
    }

    fn issued_at(&self) -> Option<f64> {
        match self {
            Auth::Jwt { claims, .. } => claims.get("iat").and_then(|v| v.as_f64()),
            Auth::Opaque(_) => None,
        }
    }
}

fn unauthorized(message: &str) -> ProtocolError {
    ProtocolError::new(ErrorKind::Unauthorized, message)
}

/// Verifies `token` for `user_id`; a JWKS fetch runs on the blocking pool, never on the shard.
async fn verify(
    verifier: &Arc<Verifier>,
    token: &str,
    user_id: &str,
) -> Result<Claims, ProtocolError> {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let result = if verifier.may_block(token) {
        let (v, t, u) = (verifier.clone(), token.to_string(), user_id.to_string());
        glommio::executor()
            .spawn_blocking(move || v.verify(&t, &u, now_s))
            .await
    } else {
        verifier.verify(token, user_id, now_s)
    };
    result.map_err(|e| {
        ProtocolError::new(
            ErrorKind::AuthInvalidated,
            format!("Failed to decode auth token: {e}"),
        )
    })
}

/// A connection's auth from its connect request (`resolveAuth` without a previous auth):
/// no token is anonymous, even with a key configured.
pub async fn resolve(
    verifier: Option<&Arc<Verifier>>,
    user_id: Option<&str>,
    token: Option<&str>,
) -> Result<Option<Auth>, ProtocolError> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let Some(user_id) = user_id else {
        return Err(unauthorized("Authenticated connections require a userID."));
    };
    Ok(Some(match verifier {
        Some(v) => Auth::Jwt {
            raw: token.to_string(),
            claims: verify(v, token, user_id).await?,
        },
        None => Auth::Opaque(token.to_string()),
    }))
}

/// `updateAuth`: the auth the connection holds from now on, or None when it keeps `prev`
/// (the same token, or a JWT not newer than the one held). Every error is fatal.
pub async fn update(
    verifier: Option<&Arc<Verifier>>,
    prev: Option<&Auth>,
    user_id: Option<&str>,
    token: &str,
) -> Result<Option<Auth>, ProtocolError> {
    if token.is_empty() {
        return match prev {
            Some(_) => Err(unauthorized(
                "No token provided. An unauthenticated client cannot connect to an authenticated client group.",
            )),
            None => Ok(None),
        };
    }
    if prev.is_some_and(|p| p.raw() == token) {
        return Ok(None);
    }
    let Some(next) = resolve(verifier, user_id, Some(token)).await? else {
        return Ok(None);
    };
    pick(prev, next)
}

/// zero-cache's `pickToken`: which of the held and the new credentials the connection keeps.
fn pick(prev: Option<&Auth>, next: Auth) -> Result<Option<Auth>, ProtocolError> {
    let Some(prev) = prev else {
        return Ok(Some(next));
    };
    match (prev, &next) {
        (Auth::Opaque(_), Auth::Jwt { .. }) => Err(unauthorized(
            "Token type cannot change from opaque to JWT. The client must reconnect.",
        )),
        (Auth::Jwt { .. }, Auth::Opaque(_)) => Err(unauthorized(
            "Token type cannot change from JWT to opaque. The client must reconnect.",
        )),
        (Auth::Opaque(_), Auth::Opaque(_)) => Ok(Some(next)),
        (Auth::Jwt { .. }, Auth::Jwt { .. }) => {
            if prev.subject() != next.subject() {
                return Err(unauthorized(
                    "The user id in the new token does not match the user id of the existing token.",
                ));
            }
            match (prev.issued_at(), next.issued_at()) {
                (None, _) => Ok(Some(next)),
                (Some(_), None) => Err(unauthorized(
                    "The new token does not have an issued at time but the prior token does. Tokens for a client group must either all have issued at times or all not have issued at times.",
                )),
                (Some(old), Some(new)) if new > old => Ok(Some(next)),
                // An older or equal token is ignored silently (zero-cache keeps the newer).
                _ => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwt(sub: &str, iat: Option<u64>) -> Auth {
        let mut claims = Claims::new();
        claims.insert("sub".into(), json!(sub));
        if let Some(i) = iat {
            claims.insert("iat".into(), json!(i));
        }
        Auth::Jwt {
            raw: format!("{sub}.{iat:?}"),
            claims,
        }
    }

    #[test]
    fn newer_jwt_replaces_older_is_ignored() {
        let held = jwt("u1", Some(10));
        assert_eq!(
            pick(Some(&held), jwt("u1", Some(11))).expect("ok"),
            Some(jwt("u1", Some(11)))
        );
        assert_eq!(pick(Some(&held), jwt("u1", Some(9))).expect("ok"), None);
        assert_eq!(pick(Some(&held), jwt("u1", Some(10))).expect("ok"), None);
        assert_eq!(
            pick(Some(&jwt("u1", None)), jwt("u1", Some(1))).expect("ok"),
            Some(jwt("u1", Some(1)))
        );
    }

    #[test]
    fn type_changes_and_lost_iat_are_refused() {
        let e = pick(Some(&Auth::Opaque("t".into())), jwt("u1", Some(1))).expect_err("opaque");
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        let e = pick(Some(&jwt("u1", Some(1))), Auth::Opaque("t".into())).expect_err("to opaque");
        assert!(e.message.contains("from JWT to opaque"), "{e}");
        let e = pick(Some(&jwt("u1", Some(1))), jwt("u1", None)).expect_err("no iat");
        assert!(e.message.contains("issued at"), "{e}");
        let e = pick(Some(&jwt("u1", Some(1))), jwt("u2", Some(2))).expect_err("other user");
        assert!(e.message.contains("user id"), "{e}");
    }

    #[test]
    fn opaque_data_is_anonymous() {
        assert_eq!(Auth::Opaque("x".into()).auth_data(), None);
        assert_eq!(jwt("u1", None).auth_data(), Some(json!({"sub": "u1"})));
        assert_eq!(jwt("u1", None).subject(), Some("u1"));
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        futures_lite::future::block_on(f)
    }

    #[test]
    fn tokens_need_a_user_and_empty_updates_refused_when_held() {
        assert_eq!(block_on(resolve(None, None, None)).expect("anon"), None);
        assert_eq!(
            block_on(resolve(None, Some("u"), Some(""))).expect("empty"),
            None
        );
        let e = block_on(resolve(None, None, Some("t"))).expect_err("no user");
        assert_eq!(e.message, "Authenticated connections require a userID.");
        assert_eq!(
            block_on(resolve(None, Some("u"), Some("t"))).expect("opaque"),
            Some(Auth::Opaque("t".into()))
        );
        let held = Auth::Opaque("t".into());
        let e = block_on(update(None, Some(&held), Some("u"), "")).expect_err("empty");
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        assert_eq!(
            block_on(update(None, Some(&held), Some("u"), "t")).expect("same"),
            None
        );
    }
}
