//! JWK import and signature verification with ring, with jose 5.10's key/algorithm checks
//! (lib/check_key_type.js, runtime/node_key.js, runtime/get_sign_verify_key.js) and its messages.

use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ring::{hmac, signature};
use serde_json::{Map, Value};

use super::error::JwtError;

/// JWK members from lax producers may be padded or carry stray trailing bits; Node decodes them
/// anyway, so a key that works with zero-cache must work here.
const JWK_B64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// jose refuses shorter RSA moduli for RS*/PS* (runtime/check_key_length.js).
const RSA_BITS_MIN: usize = 2048;
/// ring's RSA verification stops here.
const RSA_BITS_MAX: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Curve {
    P256,
    P384,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }
}

/// Public key material ring can verify with.
#[derive(Clone, Debug)]
pub(crate) enum KeyMaterial {
    Secret(Vec<u8>),
    /// Big-endian, leading zero bytes stripped (ring refuses them).
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point, 0x04 || x || y.
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519(Vec<u8>),
}

/// A JWK: the members jose's key selection and checks read, and its imported material.
#[derive(Clone, Debug)]
pub(crate) struct Jwk {
    pub kty: Option<String>,
    pub kid: Option<Value>,
    pub alg: Option<Value>,
    pub use_: Option<Value>,
    pub key_ops: Option<Value>,
    pub crv: Option<Value>,
    /// Has a string `d`: jose treats it as private, which can never verify.
    pub private: bool,
    /// Err when the members are broken or ring has no verifier for the key type/curve.
    pub material: Result<KeyMaterial, JwtError>,
}

impl Jwk {
    pub(crate) fn parse(obj: &Map<String, Value>) -> Jwk {
        Jwk {
            kty: obj.get("kty").and_then(Value::as_str).map(str::to_owned),
            kid: obj.get("kid").cloned(),
            alg: obj.get("alg").cloned(),
            use_: obj.get("use").cloned(),
            key_ops: obj.get("key_ops").cloned(),
            crv: obj.get("crv").cloned(),
            private: obj.get("d").is_some_and(Value::is_string),
            material: import(obj),
        }
    }
}

fn member(obj: &Map<String, Value>, name: &str) -> Result<Vec<u8>, JwtError> {
    let s = obj
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::JwkInvalid(format!("missing or invalid \"{name}\" member")))?;
    JWK_B64
        .decode(s)
        .map_err(|_| JwtError::JwkInvalid(format!("\"{name}\" is not base64url")))
}

fn fixed(obj: &Map<String, Value>, name: &str, len: usize) -> Result<Vec<u8>, JwtError> {
    let v = member(obj, name)?;
    if v.len() != len {
        return Err(JwtError::JwkInvalid(format!(
            "\"{name}\" must be {len} bytes, got {}",
            v.len()
        )));
    }
    Ok(v)
}

fn import(obj: &Map<String, Value>) -> Result<KeyMaterial, JwtError> {
    let crv = obj.get("crv").and_then(Value::as_str).unwrap_or("");
    match obj.get("kty").and_then(Value::as_str) {
        Some("oct") => Ok(KeyMaterial::Secret(member(obj, "k")?)),
        Some("RSA") => {
            if obj.contains_key("oth") {
                return Err(JwtError::JoseNotSupported(
                    "RSA JWK \"oth\" (Other Primes Info) Parameter value is not supported".into(),
                ));
            }
            let mut n = member(obj, "n")?;
            let zeros = n.iter().take_while(|b| **b == 0).count();
            n.drain(..zeros);
            let mut e = member(obj, "e")?;
            let zeros = e.iter().take_while(|b| **b == 0).count();
            e.drain(..zeros);
            if n.is_empty() || e.is_empty() {
                return Err(JwtError::JwkInvalid("RSA \"n\" or \"e\" is zero".into()));
            }
            if n.len() * 8 > RSA_BITS_MAX {
                return Err(JwtError::JoseNotSupported(format!(
                    "RSA keys over {RSA_BITS_MAX} bits are not supported"
                )));
            }
            Ok(KeyMaterial::Rsa { n, e })
        }
        Some("EC") => {
            let (curve, len) = match crv {
                "P-256" => (Curve::P256, 32),
                "P-384" => (Curve::P384, 48),
                other => {
                    return Err(JwtError::JoseNotSupported(format!(
                        "EC curve {other:?} is not supported (P-256 and P-384 are)"
                    )))
                }
            };
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend(fixed(obj, "x", len)?);
            point.extend(fixed(obj, "y", len)?);
            Ok(KeyMaterial::Ec { curve, point })
        }
        Some("OKP") => match crv {
            "Ed25519" => Ok(KeyMaterial::Ed25519(fixed(obj, "x", 32)?)),
            other => Err(JwtError::JoseNotSupported(format!(
                "OKP curve {other:?} is not supported (Ed25519 is)"
            ))),
        },
        _ => Err(JwtError::JoseNotSupported(
            "Unsupported \"kty\" (Key Type) Parameter value".into(),
        )),
    }
}

/// A ring verifier chosen by the header `alg` once the key has passed jose's checks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum VerifyAlg {
    Hmac(hmac::Algorithm),
    Rsa(&'static signature::RsaParameters),
    Ecdsa(&'static signature::EcdsaVerificationAlgorithm),
    Ed25519,
}

/// jose's notion of a symmetric algorithm (lib/check_key_type.js), which decides which key
/// checks run, including for algorithms no JWS can use.
fn is_symmetric(alg: &str) -> bool {
    if alg.starts_with("HS") || alg == "dir" || alg.starts_with("PBES2") {
        return true;
    }
    // /^A\d{3}(?:GCM)?KW$/
    let b = alg.as_bytes();
    b.len() >= 6
        && b[0] == b'A'
        && b[1..4].iter().all(u8::is_ascii_digit)
        && (&b[4..] == b"KW" || &b[4..] == b"GCMKW")
}

fn not_supported(alg: &str) -> JwtError {
    JwtError::JoseNotSupported(format!(
        "alg {alg} is not supported either by JOSE or your javascript runtime"
    ))
}

fn hmac_alg(alg: &str) -> Result<VerifyAlg, JwtError> {
    match alg {
        "HS256" => Ok(VerifyAlg::Hmac(hmac::HMAC_SHA256)),
        "HS384" => Ok(VerifyAlg::Hmac(hmac::HMAC_SHA384)),
        "HS512" => Ok(VerifyAlg::Hmac(hmac::HMAC_SHA512)),
        _ => Err(not_supported(alg)),
    }
}

/// The key check of a `Uint8Array` key (ZERO_AUTH_SECRET): only HS* can use it.
pub(crate) fn secret_alg(alg: &str) -> Result<VerifyAlg, JwtError> {
    if !is_symmetric(alg) {
        return Err(JwtError::TypeError(format!(
            "Key for the {alg} algorithm must be one of type KeyObject, CryptoKey, or JSON Web Key. \
             Received an instance of Uint8Array"
        )));
    }
    if !alg.starts_with("HS") {
        return Err(JwtError::TypeError(
            "Key must be one of type KeyObject or CryptoKey. Received an instance of Uint8Array"
                .into(),
        ));
    }
    hmac_alg(alg)
}

/// jose's `jwkMatchesOp` for a JWK passed straight to `jwtVerify` (ZERO_AUTH_JWK).
fn jwk_matches_op(alg: &str, jwk: &Jwk) -> Result<(), JwtError> {
    if jwk.use_.as_ref().is_some_and(|u| u != "sig") {
        return Err(JwtError::TypeError(
            "Invalid key for this operation, when present its use must be sig".into(),
        ));
    }
    if let Some(ops) = &jwk.key_ops {
        let has = ops
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o == "verify"));
        if !has {
            return Err(JwtError::TypeError(
                "Invalid key for this operation, when present its key_ops must include verify"
                    .into(),
            ));
        }
    }
    if jwk.alg.as_ref().is_some_and(|a| a != alg) {
        return Err(JwtError::TypeError(format!(
            "Invalid key for this operation, when present its alg must be {alg}"
        )));
    }
    Ok(())
}

/// All checks jose runs for `jwtVerify(token, jwk)` before the signature (check_key_type.js,
/// then get_sign_verify_key.js / dsa_digest.js / node_key.js).
pub(crate) fn jwk_alg(alg: &str, jwk: &Jwk) -> Result<VerifyAlg, JwtError> {
    if is_symmetric(alg) {
        if jwk.kty.as_deref() == Some("oct") && matches!(jwk.material, Ok(KeyMaterial::Secret(_))) {
            jwk_matches_op(alg, jwk)?;
            return if alg.starts_with("HS") {
                hmac_alg(alg)
            } else {
                Err(not_supported(alg))
            };
        }
        return Err(JwtError::TypeError(
            "JSON Web Key for symmetric algorithms must have JWK \"kty\" (Key Type) equal to \"oct\" \
             and the JWK \"k\" (Key Value) present"
                .into(),
        ));
    }
    if jwk.kty.as_deref() == Some("oct") || jwk.private {
        return Err(JwtError::TypeError(
            "JSON Web Key for this operation be a public JWK".into(),
        ));
    }
    jwk_matches_op(alg, jwk)?;
    asymmetric_alg(alg, jwk)
}

/// runtime/dsa_digest.js then runtime/node_key.js: is `alg` known, and does the key suit it.
pub(crate) fn asymmetric_alg(alg: &str, jwk: &Jwk) -> Result<VerifyAlg, JwtError> {
    use signature::*;
    if !matches!(
        alg,
        "PS256"
            | "RS256"
            | "ES256"
            | "ES256K"
            | "PS384"
            | "RS384"
            | "ES384"
            | "PS512"
            | "RS512"
            | "ES512"
            | "Ed25519"
            | "EdDSA"
    ) {
        return Err(not_supported(alg));
    }
    let key_type = match jwk.kty.as_deref() {
        Some("RSA") => "rsa",
        Some("EC") => "ec",
        Some("OKP") => match jwk.crv.as_ref().and_then(Value::as_str) {
            Some("Ed25519") => "ed25519",
            Some("Ed448") => "ed448",
            _ => {
                return Err(JwtError::TypeError(
                    "Invalid key for this operation, its crv must be Ed25519 or Ed448".into(),
                ))
            }
        },
        _ => {
            return Err(JwtError::TypeError(
                "Invalid key for this operation, its kty must be RSA, OKP, or EC".into(),
            ))
        }
    };
    let wrong_type = |want: &str| {
        JwtError::TypeError(format!(
            "Invalid key for this operation, its asymmetricKeyType must be {want}"
        ))
    };
    let rsa_len = |jwk: &Jwk| match &jwk.material {
        Ok(KeyMaterial::Rsa { n, .. }) if n.len() * 8 >= RSA_BITS_MIN => Ok(()),
        Err(e) => Err(e.clone()),
        _ => Err(JwtError::TypeError(format!(
            "{alg} requires key modulusLength to be {RSA_BITS_MIN} bits or larger"
        ))),
    };
    let valg = match alg {
        "RS256" | "RS384" | "RS512" => {
            if key_type != "rsa" {
                return Err(wrong_type("rsa"));
            }
            rsa_len(jwk)?;
            VerifyAlg::Rsa(match alg {
                "RS256" => &RSA_PKCS1_2048_8192_SHA256,
                "RS384" => &RSA_PKCS1_2048_8192_SHA384,
                _ => &RSA_PKCS1_2048_8192_SHA512,
            })
        }
        "PS256" | "PS384" | "PS512" => {
            if key_type != "rsa" {
                return Err(wrong_type("rsa or rsa-pss"));
            }
            rsa_len(jwk)?;
            // jose verifies with RSA_PSS_SALTLEN_DIGEST: ring's PSS parameters use the same.
            VerifyAlg::Rsa(match alg {
                "PS256" => &RSA_PSS_2048_8192_SHA256,
                "PS384" => &RSA_PSS_2048_8192_SHA384,
                _ => &RSA_PSS_2048_8192_SHA512,
            })
        }
        "ES256" | "ES256K" | "ES384" | "ES512" => {
            if key_type != "ec" {
                return Err(wrong_type("ec"));
            }
            let expected = match alg {
                "ES256" => "P-256",
                "ES256K" => "secp256k1",
                "ES384" => "P-384",
                _ => "P-521",
            };
            let actual = match &jwk.material {
                Ok(KeyMaterial::Ec { curve, .. }) => curve.name(),
                Ok(_) => "",
                Err(e) => return Err(e.clone()),
            };
            if actual != expected {
                return Err(JwtError::TypeError(format!(
                    "Invalid key curve for the algorithm, its curve must be {expected}, got {actual}"
                )));
            }
            VerifyAlg::Ecdsa(if alg == "ES256" {
                &ECDSA_P256_SHA256_FIXED
            } else {
                &ECDSA_P384_SHA384_FIXED
            })
        }
        "Ed25519" => {
            if key_type != "ed25519" {
                return Err(wrong_type("ed25519"));
            }
            VerifyAlg::Ed25519
        }
        _ => {
            // EdDSA
            if key_type != "ed25519" && key_type != "ed448" {
                return Err(wrong_type("ed25519 or ed448"));
            }
            VerifyAlg::Ed25519
        }
    };
    // A key type/curve ring cannot verify (Ed448) or broken members surface here.
    match &jwk.material {
        Err(e) => Err(e.clone()),
        Ok(KeyMaterial::Ed25519(_)) if !matches!(valg, VerifyAlg::Ed25519) => {
            Err(not_supported(alg))
        }
        Ok(_) => Ok(valg),
    }
}

/// The signature check itself; false for any mismatch, as Node's `crypto.verify` and
/// `timingSafeEqual` (which throws, caught as false, on a length mismatch).
pub(crate) fn verify_signature(
    valg: VerifyAlg,
    key: &KeyMaterial,
    data: &[u8],
    sig: &[u8],
) -> bool {
    match (valg, key) {
        (VerifyAlg::Hmac(a), KeyMaterial::Secret(k)) => {
            hmac::verify(&hmac::Key::new(a, k), data, sig).is_ok()
        }
        (VerifyAlg::Rsa(p), KeyMaterial::Rsa { n, e }) => signature::RsaPublicKeyComponents {
            n: n.as_slice(),
            e: e.as_slice(),
        }
        .verify(p, data, sig)
        .is_ok(),
        (VerifyAlg::Ecdsa(a), KeyMaterial::Ec { point, .. }) => {
            signature::UnparsedPublicKey::new(a, point)
                .verify(data, sig)
                .is_ok()
        }
        (VerifyAlg::Ed25519, KeyMaterial::Ed25519(x)) => {
            signature::UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(data, sig)
                .is_ok()
        }
        _ => false,
    }
}
