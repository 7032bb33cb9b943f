//! `KeyService`: the protocol-neutral key operations every front end calls.
//!
//! It enforces what must hold whatever the protocol: the operation matches the [`Permit`], the
//! kill switch is off (the local break-glass file and the fleet's, in the HSM), the key is not
//! disabled by the operator (in the configuration or fleet-wide), the key passes the custody check,
//! and the key's own attributes allow the operation (decided here, deterministically, rather than
//! from whatever error code an HSM returns). Then it calls the [`Backend`].
//!
//! Must not depend on HTTP, wire JSON or PKCS#11 types.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use super::health::{HealthMonitor, HealthReport};
use super::state::{FleetState, StateChange, StateTarget, StoreId, describe};
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
    /// Keys that serve the proxy itself (the audit chain's MAC key): no front may use or even
    /// see them (`KeyNotFound`).
    pub reserved_keys: HashSet<String>,
}

/// Whether a key may be used now, as reported by [`KeyService::key_metadata`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    /// Usable.
    Enabled,
    /// Not usable; the reason is operator-facing.
    Disabled(String),
}

/// The kill switch: when engaged every key operation is refused. Two sources, either engages it:
/// the local break-glass file (one host, watched by `app`) and the fleet's switch in the HSM
/// (every replica, set by `ekm-proxy killswitch engage`).
#[derive(Debug, Default)]
pub struct KillSwitch {
    local: AtomicBool,
    fleet: AtomicBool,
}

impl KillSwitch {
    /// Engage or release the local (break-glass file) switch.
    pub fn set(&self, engaged: bool) {
        self.local.store(engaged, Ordering::Relaxed);
    }

    /// Engage or release the fleet switch (from the HSM's state).
    pub fn set_fleet(&self, engaged: bool) {
        self.fleet.store(engaged, Ordering::Relaxed);
    }

    /// Whether engaged, by either source.
    pub fn engaged(&self) -> bool {
        self.local.load(Ordering::Relaxed) || self.fleet.load(Ordering::Relaxed)
    }

    /// Whether the local file engaged it.
    pub fn local(&self) -> bool {
        self.local.load(Ordering::Relaxed)
    }

    /// Whether the fleet switch in the HSM engaged it.
    pub fn fleet(&self) -> bool {
        self.fleet.load(Ordering::Relaxed)
    }
}

/// Key operations over a [`Backend`].
pub struct KeyService<B: Backend> {
    backend: Arc<B>,
    settings: ArcSwap<KeyServiceSettings>,
    kill: Arc<KillSwitch>,
    fleet: ArcSwap<FleetState>,
    health: HealthMonitor<B>,
}

impl<B: Backend> KeyService<B> {
    /// Build the service. `health` runs deep checks against the same backend. `fleet` is the
    /// shared state known at start: [`FleetState::default`] (not loaded: key operations wait for
    /// the first read from the HSM) for a server, a loaded one for tools.
    pub fn new(
        backend: Arc<B>,
        settings: KeyServiceSettings,
        kill: Arc<KillSwitch>,
        health: HealthMonitor<B>,
        fleet: FleetState,
    ) -> Self {
        kill.set_fleet(fleet.get(&StateTarget::KillSwitch).is_some());
        Self {
            backend,
            settings: ArcSwap::from_pointee(settings),
            kill,
            fleet: ArcSwap::from_pointee(fleet),
            health,
        }
    }

    /// Adopt a fresh read of the fleet state; returns what changed since the last one (nothing
    /// on the first read: that is the state the replica starts from, not a change).
    pub fn set_fleet_state(&self, state: FleetState) -> Vec<StateChange> {
        let before = self.fleet.load();
        let changes = if before.loaded {
            state.changes_since(&before)
        } else {
            Vec::new()
        };
        self.kill
            .set_fleet(state.get(&StateTarget::KillSwitch).is_some());
        self.fleet.store(Arc::new(state));
        changes
    }

    /// The fleet state as last read.
    pub fn fleet_state(&self) -> Arc<FleetState> {
        self.fleet.load_full()
    }

    /// Why the key store `store` may not be used now, if it is disabled fleet-wide.
    pub fn store_refusal(&self, store: &StoreId) -> Option<String> {
        self.fleet
            .load()
            .get(&StateTarget::Store(store.clone()))
            .map(|record| describe("key store disabled fleet-wide", record))
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
            report.detail = self.kill_reason();
        }
        report
    }

    /// Why the kill switch is engaged (local file, or the fleet's, by whom).
    fn kill_reason(&self) -> String {
        if self.kill.local() {
            return "the kill switch is engaged (local file)".into();
        }
        match self.fleet.load().get(&StateTarget::KillSwitch) {
            Some(record) => describe("the kill switch was engaged fleet-wide", record),
            None => "the kill switch is engaged".into(),
        }
    }

    fn not_reserved(&self, key: &str) -> Result<(), CryptoError> {
        if self.settings.load().reserved_keys.contains(key) {
            Err(CryptoError::KeyNotFound)
        } else {
            Ok(())
        }
    }

    /// Key operations wait for the first read of the fleet state: until then a key the fleet has
    /// disabled could be served. The wait answers the protocols' retryable error.
    fn fleet_loaded(&self) -> Result<(), CryptoError> {
        if self.fleet.load().loaded {
            Ok(())
        } else {
            Err(CryptoError::HsmUnavailable(
                "the fleet state (disabled keys, kill switch) has not been read from the HSM yet"
                    .into(),
            ))
        }
    }

    /// The key's attributes and whether it may be used now.
    pub async fn key_metadata(&self, permit: &Permit) -> Result<(KeyInfo, KeyStatus), CryptoError> {
        expect_op(permit, &[Operation::KeyMetadata])?;
        self.not_reserved(permit.key())?;
        self.fleet_loaded()?;
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
            return Err(CryptoError::KeyDisabled(self.kill_reason()));
        }
        self.not_reserved(key)?;
        self.fleet_loaded()?;
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
            return Some(self.kill_reason());
        }
        if self.settings.load().disabled_keys.contains(&info.label) {
            return Some("key disabled by the operator".into());
        }
        if let Some(record) = self.fleet.load().get(&StateTarget::Key(info.label.clone())) {
            return Some(describe("key disabled fleet-wide", record));
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
