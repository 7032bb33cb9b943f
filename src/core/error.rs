//! `CryptoError`: the conditions a key operation can end in, named for what happened.
//!
//! Each front end's `error.rs` maps these to its wire errors exactly once. Messages carried here
//! are safe to log (no key material, plaintext or PINs); front ends decide what reaches the wire.

use std::fmt;

/// Why a core or backend operation failed.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// No key with this id exists (or it is not exposed to this caller's key store).
    KeyNotFound,
    /// The key exists but may not be used now: disabled by policy, the kill switch, or refused by
    /// the custody check (extractable / not sensitive). The reason is operator-facing.
    KeyDisabled(String),
    /// The key's own attributes forbid the operation (e.g. `CKA_DECRYPT` false).
    InvalidKeyUsage(String),
    /// Authentication of the ciphertext failed, or its framing is malformed.
    InvalidCiphertext,
    /// The operation, algorithm or input size is not supported by this proxy or key.
    Unsupported(String),
    /// The HSM work queue is full; the caller should back off and retry.
    HsmBusy,
    /// The HSM did not answer within the request deadline.
    HsmTimeout,
    /// The HSM (token, session, device) cannot serve requests right now.
    HsmUnavailable(String),
    /// Anything else. The detail is logged, never sent.
    Internal(String),
}

impl CryptoError {
    /// A short, stable label for metrics and audit lines.
    pub fn kind(&self) -> &'static str {
        match self {
            CryptoError::KeyNotFound => "key_not_found",
            CryptoError::KeyDisabled(_) => "key_disabled",
            CryptoError::InvalidKeyUsage(_) => "invalid_key_usage",
            CryptoError::InvalidCiphertext => "invalid_ciphertext",
            CryptoError::Unsupported(_) => "unsupported",
            CryptoError::HsmBusy => "hsm_busy",
            CryptoError::HsmTimeout => "hsm_timeout",
            CryptoError::HsmUnavailable(_) => "hsm_unavailable",
            CryptoError::Internal(_) => "internal",
        }
    }
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptoError::KeyNotFound => write!(f, "key not found"),
            CryptoError::KeyDisabled(why) => write!(f, "key disabled: {why}"),
            CryptoError::InvalidKeyUsage(why) => write!(f, "invalid key usage: {why}"),
            CryptoError::InvalidCiphertext => write!(f, "invalid ciphertext"),
            CryptoError::Unsupported(why) => write!(f, "unsupported: {why}"),
            CryptoError::HsmBusy => write!(f, "HSM busy"),
            CryptoError::HsmTimeout => write!(f, "HSM timed out"),
            CryptoError::HsmUnavailable(why) => write!(f, "HSM unavailable: {why}"),
            CryptoError::Internal(why) => write!(f, "internal error: {why}"),
        }
    }
}

impl std::error::Error for CryptoError {}
