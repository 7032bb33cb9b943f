//! A jsonwebtoken `CryptoProvider` whose signature checks run on ring (the constant-time,
//! assembly-optimized library rustls already links), instead of the pure-Rust RSA of the
//! `rust_crypto` backend: an RS256 check drops from ~0.4 ms to tens of µs, which bounds what a
//! flood of well-formed tokens the cache has not seen can cost.
//!
//! It verifies only asymmetric signatures. HMAC is refused here as well as by configuration and by
//! the verifier's algorithm check, so no path can ever treat a public key as an HMAC secret.
//! Signing and key utilities (used by the dev tools and tests) stay on the `rust_crypto` provider.
//!
//! Installed as jsonwebtoken's process-wide provider by [`install`]; that is the library's own
//! selection mechanism (like rustls's), not a settings global. Depends on nothing else in the crate.

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier, KeyUtils, rust_crypto};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::signature::{Error as SignatureError, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use ring::signature::{self as rs, RsaPublicKeyComponents, UnparsedPublicKey};

const FALLBACK: &CryptoProvider = &rust_crypto::DEFAULT_PROVIDER;

/// The provider: ring verifiers, `rust_crypto` signers and key utilities.
static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: FALLBACK.signer_factory,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: FALLBACK.key_utils.rsa_pub_components_from_private_key,
        rsa_pub_components_from_public_key: FALLBACK.key_utils.rsa_pub_components_from_public_key,
        ec_pub_components_from_private_key: FALLBACK.key_utils.ec_pub_components_from_private_key,
        ed_pub_components_from_private_key: FALLBACK.key_utils.ed_pub_components_from_private_key,
        compute_digest: FALLBACK.key_utils.compute_digest,
    },
};

/// Make this jsonwebtoken's provider for the process. Idempotent; called before any verification.
pub fn install() {
    // Only this module installs a provider, so an error means it is installed already.
    let _ = PROVIDER.install_default();
}

/// Whether verification currently runs on this provider (for tests and the start-up log).
pub fn installed() -> bool {
    // `install_default` refuses a second provider: if ours is refused as "already installed",
    // it is ours exactly when the installed one has our verifier factory.
    match PROVIDER.install_default() {
        Ok(()) => true,
        Err(current) => std::ptr::fn_addr_eq(
            current.verifier_factory,
            new_verifier as fn(&Algorithm, &DecodingKey) -> Result<Box<dyn JwtVerifier>>,
        ),
    }
}

/// The ring algorithm for a JWS `alg`; `None` for HMAC, which this provider never verifies.
fn ring_algorithm(alg: Algorithm) -> Option<&'static dyn rs::VerificationAlgorithm> {
    if let Some(rsa) = rsa_parameters(alg) {
        return Some(rsa);
    }
    Some(match alg {
        Algorithm::ES256 => &rs::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &rs::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &rs::ED25519,
        // HMAC, and any algorithm a future jsonwebtoken adds, is never verified here.
        _ => return None,
    })
}

/// The RSA parameters for an RSA `alg` (the components form needs the concrete type).
fn rsa_parameters(alg: Algorithm) -> Option<&'static rs::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &rs::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &rs::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &rs::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &rs::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &rs::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &rs::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let alg = *alg;
    let Some(algorithm) = ring_algorithm(alg) else {
        return Err(ErrorKind::InvalidAlgorithm.into());
    };
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let key = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } => {
            let params = rsa_parameters(alg).ok_or(ErrorKind::InvalidKeyFormat)?;
            Key::RsaComponents {
                n: n.clone(),
                e: e.clone(),
                params,
            }
        }
        // RSA: DER RSAPublicKey; EC: the uncompressed point; Ed25519: the raw public key.
        DecodingKeyKind::SecretOrDer(bytes) => Key::Encoded(bytes.clone()),
    };
    Ok(Box::new(RingVerifier {
        alg,
        algorithm,
        key,
    }))
}

enum Key {
    RsaComponents {
        n: Vec<u8>,
        e: Vec<u8>,
        params: &'static rs::RsaParameters,
    },
    Encoded(Vec<u8>),
}

struct RingVerifier {
    alg: Algorithm,
    algorithm: &'static dyn rs::VerificationAlgorithm,
    key: Key,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), SignatureError> {
        let checked = match &self.key {
            Key::RsaComponents { n, e, params } => {
                RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
            Key::Encoded(bytes) => {
                UnparsedPublicKey::new(self.algorithm, bytes).verify(msg, signature)
            }
        };
        checked.map_err(|_| SignatureError::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_is_never_verified() {
        let key = DecodingKey::from_secret(b"a public key used as an HMAC secret");
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert!(new_verifier(&alg, &key).is_err(), "{alg:?}");
        }
    }

    #[test]
    fn key_family_must_match_the_algorithm() {
        let rsa = DecodingKey::from_rsa_raw_components(&[0xc5; 256], &[1, 0, 1]);
        assert!(new_verifier(&Algorithm::RS256, &rsa).is_ok());
        assert!(new_verifier(&Algorithm::ES256, &rsa).is_err());
    }

    #[test]
    fn install_makes_it_the_provider() {
        install();
        assert!(installed());
    }
}
