//! The dev JWT signer: an RSA-2048 key in `certs/dev/jwt-signer.pem` (PKCS#8 PEM, mode 0600) and
//! its public half as a JWKS in `certs/dev/jwks.json` (kid [`DEV_KID`]), so the dev profile can
//! verify Google-style tokens without Google: `ekm-proxy dev token` signs with the key, and the dev
//! configuration's issuer reads the JWKS file.
//!
//! **Dev only, never production.** The key sits unencrypted on disk; production verifies tokens
//! against Google's JWKS URL and never holds a signing key. Created idempotently, like
//! [`super::certs::ensure_dev_pki`]: a usable key is kept (tokens minted earlier stay valid), and
//! the JWKS is rewritten whenever it does not describe exactly that key.
//!
//! Depends on `rsa` (key generation), serde_json and `client::gcp` (the token signer); must not
//! depend on the server, config, auth, front ends or the HSM.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::certs::{self, Action, CertError};
use crate::client::gcp::{TokenError, TokenSigner};

/// The dev signer's key id (the JWKS `kid` and the token header's).
pub const DEV_KID: &str = "dev-signer-1";
/// File name of the signing key.
pub const SIGNER_FILE: &str = "jwt-signer.pem";
/// File name of the JWKS.
pub const JWKS_FILE: &str = "jwks.json";
/// RSA modulus size of a generated key.
pub const KEY_BITS: usize = 2048;

/// Why the dev signer could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// RSA key generation failed.
    #[error("generating the dev JWT signing key failed: {0}")]
    Generate(String),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Files(#[from] CertError),
}

/// What [`ensure_dev_signer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevSignerReport {
    /// The directory written.
    pub dir: PathBuf,
    /// `jwt-signer.pem`.
    pub signer: Action,
    /// `jwks.json`.
    pub jwks: Action,
}

impl fmt::Display for DevSignerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dev JWT signer in {}: {SIGNER_FILE} {}, {JWKS_FILE} {} (kid {DEV_KID}, RS256)",
            self.dir.display(),
            self.signer,
            self.jwks
        )
    }
}

/// Idempotently writes the dev signer into `dir`: `jwt-signer.pem` (RSA-2048, PKCS#8 PEM, 0600)
/// and `jwks.json` (its public key, kid [`DEV_KID`]).
///
/// An existing key is kept when it is a valid RSA key of at least 2048 bits (and made private
/// again if its mode was loosened); otherwise a new one replaces it. The JWKS is kept only when it
/// is exactly the one the key gives, and rewritten from the key otherwise.
pub fn ensure_dev_signer(dir: &Path) -> Result<DevSignerReport, SignerError> {
    certs::create_dir(dir)?;
    let key_path = dir.join(SIGNER_FILE);
    let jwks_path = dir.join(JWKS_FILE);

    let existing = certs::read_optional(&key_path)?.map(Zeroizing::new);
    let (key, signer_action) = match existing.as_deref().map(|pem| usable_key(pem)) {
        Some(Ok(key)) => {
            certs::restrict(&key_path)?;
            (key, Action::Kept)
        }
        Some(Err(reason)) => (new_key(&key_path)?, Action::Replaced { reason }),
        None => (new_key(&key_path)?, Action::Created),
    };

    let expected = jwks_for(&key.to_public_key(), DEV_KID);
    let jwks_action = match certs::read_optional(&jwks_path)? {
        None => Action::Created,
        Some(text) => match serde_json::from_str::<Value>(&text) {
            Ok(v) if v == expected => Action::Kept,
            Ok(_) => Action::Replaced {
                reason: "it does not match the signing key".to_owned(),
            },
            Err(_) => Action::Replaced {
                reason: "it is not JSON".to_owned(),
            },
        },
    };
    if jwks_action != Action::Kept {
        let mut text = serde_json::to_string_pretty(&expected).unwrap_or_default();
        text.push('\n');
        certs::write_file(&jwks_path, &text, false)?;
    }
    Ok(DevSignerReport {
        dir: dir.to_path_buf(),
        signer: signer_action,
        jwks: jwks_action,
    })
}

/// The token signer for the key in `dir` (kid [`DEV_KID`]).
pub fn dev_token_signer(dir: &Path) -> Result<TokenSigner, TokenError> {
    TokenSigner::from_pem_file(&dir.join(SIGNER_FILE), DEV_KID)
}

/// A JWKS (`{"keys": [...]}`) holding `key` as one RS256 signing key named `kid`; `n` and `e` are
/// unpadded base64url of their big-endian bytes (RFC 7518 §6.3.1).
pub fn jwks_for(key: &RsaPublicKey, kid: &str) -> Value {
    json!({ "keys": [jwk_for(key, kid)] })
}

/// One RSA JWK: `kty`, `use`, `alg`, `kid`, `n`, `e`.
pub fn jwk_for(key: &RsaPublicKey, kid: &str) -> Value {
    json!({
        "kty": "RSA",
        "use": "sig",
        "alg": "RS256",
        "kid": kid,
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    })
}

/// A fresh RSA key of [`KEY_BITS`] bits (from the OS random source) and its PKCS#8 PEM.
pub fn generate_key() -> Result<(RsaPrivateKey, Zeroizing<String>), SignerError> {
    let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, KEY_BITS)
        .map_err(|e| SignerError::Generate(e.to_string()))?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| SignerError::Generate(e.to_string()))?;
    Ok((key, pem))
}

fn new_key(path: &Path) -> Result<RsaPrivateKey, SignerError> {
    let (key, pem) = generate_key()?;
    certs::write_file(path, &pem, true)?;
    Ok(key)
}

/// The key in `pem` if it can sign dev tokens; otherwise why not (never quoting the key).
fn usable_key(pem: &str) -> Result<RsaPrivateKey, String> {
    let key = RsaPrivateKey::from_pkcs8_pem(pem)
        .map_err(|_| format!("{SIGNER_FILE} is not a PKCS#8 PEM RSA private key"))?;
    key.validate()
        .map_err(|_| format!("{SIGNER_FILE} holds an inconsistent RSA key"))?;
    if key.size() * 8 < KEY_BITS {
        return Err(format!(
            "{SIGNER_FILE} holds a {}-bit key; at least {KEY_BITS} bits are required",
            key.size() * 8
        ));
    }
    // jsonwebtoken must accept it too, or `dev token` would fail later.
    TokenSigner::from_pem(pem.as_bytes(), DEV_KID)
        .map_err(|_| format!("{SIGNER_FILE} cannot sign RS256 tokens"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::gcp::TokenClaims;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use std::time::Duration;

    #[test]
    fn signer_and_jwks_are_created_kept_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_signer(dir.path()).unwrap();
        assert_eq!(
            (first.signer.clone(), first.jwks.clone()),
            (Action::Created, Action::Created)
        );
        let key_before = std::fs::read(dir.path().join(SIGNER_FILE)).unwrap();
        assert!(String::from_utf8_lossy(&key_before).starts_with("-----BEGIN PRIVATE KEY-----"));

        let second = ensure_dev_signer(dir.path()).unwrap();
        assert_eq!((second.signer, second.jwks), (Action::Kept, Action::Kept));

        // A JWKS for another key is rewritten from the signer; the signer stays.
        let (other, _) = generate_key().unwrap();
        std::fs::write(
            dir.path().join(JWKS_FILE),
            jwks_for(&other.to_public_key(), DEV_KID).to_string(),
        )
        .unwrap();
        let third = ensure_dev_signer(dir.path()).unwrap();
        assert_eq!(third.signer, Action::Kept);
        assert!(matches!(third.jwks, Action::Replaced { .. }), "{third}");
        assert_eq!(
            std::fs::read(dir.path().join(SIGNER_FILE)).unwrap(),
            key_before
        );

        // A corrupt key is replaced, and the JWKS follows it.
        std::fs::write(dir.path().join(SIGNER_FILE), "junk").unwrap();
        let fourth = ensure_dev_signer(dir.path()).unwrap();
        assert!(matches!(fourth.signer, Action::Replaced { .. }), "{fourth}");
        assert!(matches!(fourth.jwks, Action::Replaced { .. }), "{fourth}");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |f: &str| {
                std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode(SIGNER_FILE), 0o600);
            std::fs::set_permissions(
                dir.path().join(SIGNER_FILE),
                std::fs::Permissions::from_mode(0o644),
            )
            .unwrap();
            ensure_dev_signer(dir.path()).unwrap();
            assert_eq!(mode(SIGNER_FILE), 0o600);
        }
    }

    #[test]
    fn tokens_from_the_signer_verify_against_the_jwks() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dev_signer(dir.path()).unwrap();
        let signer = dev_token_signer(dir.path()).unwrap();
        let token = signer
            .mint(&TokenClaims::dev(
                "sa@example.com",
                "https://localhost:8443",
                Duration::from_secs(60),
            ))
            .unwrap();

        // The JWKS file as a verifier reads it: jsonwebtoken's own JWK parser.
        let text = std::fs::read_to_string(dir.path().join(JWKS_FILE)).unwrap();
        let set: JwkSet = serde_json::from_str(&text).unwrap();
        assert_eq!(set.keys.len(), 1);
        let jwk = set.find(DEV_KID).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let raw = &v["keys"][0];
        assert_eq!(
            (
                raw["kty"].as_str(),
                raw["use"].as_str(),
                raw["alg"].as_str()
            ),
            (Some("RSA"), Some("sig"), Some("RS256"))
        );
        assert_eq!(raw["e"], "AQAB");
        assert!(!raw["n"].as_str().unwrap().contains(['=', '+', '/']));
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&["https://localhost:8443"]);
        let data = jsonwebtoken::decode::<TokenClaims>(
            &token,
            &DecodingKey::from_jwk(jwk).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.header.kid.as_deref(), Some(DEV_KID));
        assert_eq!(data.claims.email.as_deref(), Some("sa@example.com"));
    }
}
