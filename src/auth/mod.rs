//! Client JWTs (legacy auth): verification against ZERO_AUTH_SECRET, ZERO_AUTH_JWK or ZERO_AUTH_JWKS_URL.
