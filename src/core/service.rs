//! `KeyService`: the protocol-neutral key operations every front end calls.
//!
//! It enforces what must hold whatever the protocol: the operation matches the [`Permit`], the
//! kill switch is off, the key is not disabled by the operator, the key passes the custody check,
//! and the key's own attributes allow the operation (decided here, deterministically, rather than
//! from whatever error code an HSM returns). Then it calls the [`Backend`].
//!
//! Must not depend on HTTP, wire JSON or PKCS#11 types.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use super::health::{HealthMonitor, HealthReport};
use super::{
    AeadDecrypt, AeadEncrypt, AeadSealed, Backend, CryptoError, GCM_TAG_LEN, KeyInfo, KeyUnwrap,
    KeyWrap, Operation, Plaintext, WrapAlgorithm, WrapPath, WrapSupport,
};
use crate::authz::Permit;

/// Operator settings for the core that can change at run time (SIGHUP reload).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyServiceSettings {
    /// Keys the operator has disabled, by label: every operation is refused with `KeyDisabled`.
    pub disabled_keys: HashSet<String>,
}

/// Whether a key may be used now, as reported by [`KeyService::key_metadata`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    /// Usable.
    Enabled,
    /// Not usable; the reason is operator-facing.
    Disabled(String),
}

/// The kill switch: when engaged every key operation is refused. Shared with whatever flips it
/// (the file watcher in `app`, the admin listener).
#[derive(Debug, Default)]
pub struct KillSwitch(AtomicBool);

impl KillSwitch {
    /// Engage or release.
    pub fn set(&self, engaged: bool) {
        self.0.store(engaged, Ordering::Relaxed);
    }

    /// Whether engaged.
    pub fn engaged(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Key operations over a [`Backend`].
pub struct KeyService<B: Backend> {
    backend: Arc<B>,
    settings: ArcSwap<KeyServiceSettings>,
    kill: Arc<KillSwitch>,
    health: HealthMonitor<B>,
}

impl<B: Backend> KeyService<B> {
    /// Build the service. `health` runs deep checks against the same backend.
    pub fn new(
        backend: Arc<B>,
        settings: KeyServiceSettings,
        kill: Arc<KillSwitch>,
        health: HealthMonitor<B>,
    ) -> Self {
        Self {
            backend,
            settings: ArcSwap::from_pointee(settings),
            kill,
            health,
        }
    }

    /// Replace the run-time settings (SIGHUP).
    pub fn reload(&self, settings: KeyServiceSettings) {
        self.settings.store(Arc::new(settings));
    }

    /// The backend (for the benchmark's raw lane and for tools).
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The kill switch.
    pub fn kill_switch(&self) -> &Arc<KillSwitch> {
        &self.kill
    }

    /// The deep health monitor.
    pub fn health(&self) -> &HealthMonitor<B> {
        &self.health
    }

    /// Current health (cached deep check, at most `max_age` old). While the kill switch is
    /// engaged the status is UNAVAILABLE: a healthy answer must mean key operations would succeed.
    pub async fn health_report(&self) -> HealthReport {
        let mut report = self.health.report().await;
        if self.kill.engaged() {
            report.status = super::HealthStatus::Unavailable;
            report.detail = "the kill switch is engaged".into();
        }
        report
    }

    /// The key's attributes and whether it may be used now.
    pub async fn key_metadata(&self, permit: &Permit) -> Result<(KeyInfo, KeyStatus), CryptoError> {
        expect_op(permit, &[Operation::KeyMetadata])?;
        let info = self.backend.key_info(permit.key()).await?;
        let status = match self.refusal(&info) {
            Some(reason) => KeyStatus::Disabled(reason),
            None => KeyStatus::Enabled,
        };
        Ok((info, status))
    }

    /// AES-256-GCM encrypt `plaintext` under the permit's key with the already-framed `aad`.
    /// With `verify` (XKS CDIV) the key must also allow decryption, because the caller will
    /// run [`KeyService::verify_sealed`] on the result.
    pub async fn encrypt(
        &self,
        permit: &Permit,
        plaintext: Plaintext,
        aad: Vec<u8>,
        verify: bool,
    ) -> Result<AeadSealed, CryptoError> {
        expect_op(permit, &[Operation::Encrypt, Operation::Wrap])?;
        let info = self.usable_aes_key(permit.key()).await?;
        if !info.usage.encrypt {
            return Err(CryptoError::InvalidKeyUsage(
                "key does not allow encryption (CKA_ENCRYPT is false)".into(),
            ));
        }
        if verify && !info.usage.decrypt {
            return Err(CryptoError::InvalidKeyUsage(
                "integrity value requested but key does not allow the verification decrypt (CKA_DECRYPT is false)"
                    .into(),
            ));
        }
        self.backend
            .aead_encrypt(AeadEncrypt {
                key: permit.key().to_owned(),
                plaintext,
                aad,
            })
            .await
    }

    /// Decrypt `sealed` again and discard the plaintext: the verification step of XKS Appendix C.
    /// Any failure is `Internal` (the proxy just produced this ciphertext).
    pub async fn verify_sealed(
        &self,
        permit: &Permit,
        sealed: &AeadSealed,
        aad: Vec<u8>,
    ) -> Result<(), CryptoError> {
        expect_op(permit, &[Operation::Encrypt, Operation::Wrap])?;
        let req = AeadDecrypt {
            key: permit.key().to_owned(),
            iv: sealed.iv.clone(),
            ciphertext: sealed.ciphertext.clone(),
            tag: sealed.tag,
            aad,
        };
        match self.backend.aead_decrypt(req).await {
            Ok(_plaintext) => Ok(()),
            Err(
                e @ (CryptoError::HsmBusy
                | CryptoError::HsmTimeout
                | CryptoError::HsmUnavailable(_)),
            ) => Err(e),
            Err(e) => Err(CryptoError::Internal(format!(
                "verification decrypt failed: {e}"
            ))),
        }
    }

    /// AES-256-GCM decrypt under the permit's key with the already-framed `aad`.
    pub async fn decrypt(
        &self,
        permit: &Permit,
        iv: Vec<u8>,
        ciphertext: Vec<u8>,
        tag: [u8; GCM_TAG_LEN],
        aad: Vec<u8>,
    ) -> Result<Plaintext, CryptoError> {
        expect_op(permit, &[Operation::Decrypt, Operation::Unwrap])?;
        let info = self.usable_aes_key(permit.key()).await?;
        if !info.usage.decrypt {
            return Err(CryptoError::InvalidKeyUsage(
                "key does not allow decryption (CKA_DECRYPT is false)".into(),
            ));
        }
        self.backend
            .aead_decrypt(AeadDecrypt {
                key: permit.key().to_owned(),
                iv,
                ciphertext,
                tag,
                aad,
            })
            .await
    }

    /// Wrap key material (`plaintext`) under the permit's key with `alg`, inside the HSM.
    pub async fn wrap_key(
        &self,
        permit: &Permit,
        alg: WrapAlgorithm,
        plaintext: Plaintext,
    ) -> Result<Vec<u8>, CryptoError> {
        expect_op(permit, &[Operation::Wrap])?;
        let info = self.usable_key(permit.key()).await?;
        alg.check_key(&info).map_err(CryptoError::Unsupported)?;
        if !self.wrap_usage(&info, alg).0 {
            return Err(CryptoError::InvalidKeyUsage(format!(
                "the key's attributes do not allow {alg} wrapping on this HSM ({})",
                self.usage_needed(alg, true)
            )));
        }
        alg.check_plaintext_len(plaintext.len(), info.bits)
            .map_err(CryptoError::Unsupported)?;
        self.backend
            .key_wrap(KeyWrap {
                key: permit.key().to_owned(),
                alg,
                plaintext,
            })
            .await
    }

    /// Unwrap `wrapped` with the permit's key and `alg`, inside the HSM.
    pub async fn unwrap_key(
        &self,
        permit: &Permit,
        alg: WrapAlgorithm,
        wrapped: Vec<u8>,
    ) -> Result<Plaintext, CryptoError> {
        expect_op(permit, &[Operation::Unwrap])?;
        let info = self.usable_key(permit.key()).await?;
        alg.check_key(&info).map_err(CryptoError::Unsupported)?;
        if !self.wrap_usage(&info, alg).1 {
            return Err(CryptoError::InvalidKeyUsage(format!(
                "the key's attributes do not allow {alg} unwrapping on this HSM ({})",
                self.usage_needed(alg, false)
            )));
        }
        // A length no wrapping can produce is a malformed input, refused before the HSM.
        if alg.check_wrapped_len(wrapped.len(), info.bits).is_err() {
            return Err(CryptoError::InvalidCiphertext);
        }
        self.backend
            .key_unwrap(KeyUnwrap {
                key: permit.key().to_owned(),
                alg,
                wrapped,
            })
            .await
    }

    /// What the HSM can wrap with (found by trial at start).
    pub fn wrap_support(&self) -> Arc<WrapSupport> {
        self.backend.wrap_support()
    }

    /// Whether `key`'s own attributes let it (wrap, unwrap) with `alg` on this HSM: the
    /// attribute the HSM checks depends on how it does the algorithm. AES by `C_Encrypt` needs
    /// `CKA_ENCRYPT`/`CKA_DECRYPT`, by `C_WrapKey` `CKA_WRAP`/`CKA_UNWRAP`; RSA-OAEP unwraps with
    /// `C_Decrypt` on the private key and wraps with the public key object (whose attributes the
    /// HSM checks; here: that the pair has one).
    pub fn wrap_usage(&self, key: &KeyInfo, alg: WrapAlgorithm) -> (bool, bool) {
        let u = &key.usage;
        if alg.is_rsa() {
            return (key.rsa_public.is_some(), u.decrypt);
        }
        match self.backend.wrap_support().path(alg) {
            Some(Some(WrapPath::EncryptDecrypt)) => (u.encrypt, u.decrypt),
            Some(_) => (u.wrap, u.unwrap),
            // The HSM cannot do it at all; the backend names the algorithm.
            None => (true, true),
        }
    }

    /// The attribute `wrap_usage` checks, for messages.
    fn usage_needed(&self, alg: WrapAlgorithm, wrap: bool) -> &'static str {
        match (alg.is_rsa(), self.backend.wrap_support().path(alg), wrap) {
            (true, _, true) => "a public key object to wrap with",
            (true, _, false) => "CKA_DECRYPT",
            (false, Some(Some(WrapPath::EncryptDecrypt)), true) => "CKA_ENCRYPT",
            (false, Some(Some(WrapPath::EncryptDecrypt)), false) => "CKA_DECRYPT",
            (false, _, true) => "CKA_WRAP",
            (false, _, false) => "CKA_UNWRAP",
        }
    }

    /// The key's attributes, if it may be used now (kill switch, operator, custody).
    async fn usable_key(&self, key: &str) -> Result<KeyInfo, CryptoError> {
        // The kill switch is checked before touching the backend at all.
        if self.kill.engaged() {
            return Err(CryptoError::KeyDisabled(
                "the kill switch is engaged".into(),
            ));
        }
        let info = self.backend.key_info(key).await?;
        if let Some(reason) = self.refusal(&info) {
            return Err(CryptoError::KeyDisabled(reason));
        }
        Ok(info)
    }

    async fn usable_aes_key(&self, key: &str) -> Result<KeyInfo, CryptoError> {
        let info = self.usable_key(key).await?;
        if !info.is_aes_256() {
            return Err(CryptoError::InvalidKeyUsage(format!(
                "key is {}, not an AES-256 key",
                info.key_spec()
            )));
        }
        Ok(info)
    }

    /// Why the key may not be used now, if it may not.
    fn refusal(&self, info: &KeyInfo) -> Option<String> {
        if self.kill.engaged() {
            return Some("the kill switch is engaged".into());
        }
        if self.settings.load().disabled_keys.contains(&info.label) {
            return Some("key disabled by the operator".into());
        }
        info.custody_violation.clone()
    }
}

fn expect_op(permit: &Permit, allowed: &[Operation]) -> Result<(), CryptoError> {
    if allowed.contains(&permit.operation()) {
        Ok(())
    } else {
        // A front end bug, not a caller error: the permit was made for another operation.
        Err(CryptoError::Internal(format!(
            "permit is for {}, not this operation",
            permit.operation().as_str()
        )))
    }
}
