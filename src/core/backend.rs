//! The `Backend` seam: protocol-neutral operations performed inside the HSM.
//!
//! Implemented by `hsm::Pkcs11Backend`. Async at the seam (callers are request handlers on the
//! tokio runtime); implementations run the blocking work elsewhere. Must not depend on HTTP or
//! PKCS#11 types.

use std::future::Future;
use std::sync::Arc;

use super::state::StateMark;
use super::{
    AeadDecrypt, AeadEncrypt, AeadSealed, CryptoError, HsmHealth, KeyInfo, KeyUnwrap, KeyWrap,
    Plaintext, WrapSupport,
};

/// Operations the core needs from a key manager. Every cryptographic operation happens inside it.
pub trait Backend: Send + Sync + 'static {
    /// AES-GCM encrypt with a key in the HSM and an IV the HSM generates.
    fn aead_encrypt(
        &self,
        req: AeadEncrypt,
    ) -> impl Future<Output = Result<AeadSealed, CryptoError>> + Send;

    /// AES-GCM decrypt; a tag mismatch is `InvalidCiphertext` and costs no session.
    fn aead_decrypt(
        &self,
        req: AeadDecrypt,
    ) -> impl Future<Output = Result<Plaintext, CryptoError>> + Send;

    /// Wrap key material with an AES key (RFC 3394/5649) or an RSA key pair (OAEP).
    fn key_wrap(&self, req: KeyWrap) -> impl Future<Output = Result<Vec<u8>, CryptoError>> + Send;

    /// Unwrap: the inverse of [`Backend::key_wrap`]; a failed integrity check or OAEP decoding
    /// is `InvalidCiphertext`.
    fn key_unwrap(
        &self,
        req: KeyUnwrap,
    ) -> impl Future<Output = Result<Plaintext, CryptoError>> + Send;

    /// The key-wrapping algorithms the HSM supports (found by trial at start; a shared handle,
    /// cheap on the request path).
    fn wrap_support(&self) -> Arc<WrapSupport>;

    /// The key's attributes (cached; no per-request object search).
    fn key_info(&self, key: &str) -> impl Future<Output = Result<KeyInfo, CryptoError>> + Send;

    /// Random bytes from the HSM's generator.
    fn random(&self, len: usize) -> impl Future<Output = Result<Vec<u8>, CryptoError>> + Send;

    /// Token and session state (cheap; no cryptographic operation).
    fn health(&self) -> impl Future<Output = HsmHealth> + Send;

    /// The fleet state every replica shares (disabled keys and key stores, the kill switch),
    /// read from the HSM now.
    fn fleet_state(&self) -> impl Future<Output = Result<Vec<StateMark>, CryptoError>> + Send;

    /// HMAC-SHA-256 of `data` with the secret key labelled `key`, computed inside the HSM (the
    /// audit chain's checkpoints).
    fn hmac_sha256(
        &self,
        key: &str,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<[u8; 32], CryptoError>> + Send;
}
