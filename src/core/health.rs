//! Deep health: a real encrypt/decrypt round trip with a dedicated health-check key, cached so
//! that health requests are answered within the caller's budget (XKS §6: at most a minute old).
//!
//! The check never uses a customer key, so customers see no crypto activity without a matching
//! request. Must not depend on HTTP, wire JSON or PKCS#11 types.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::{AeadDecrypt, AeadEncrypt, Backend, CryptoError, HealthStatus, HsmHealth};

/// The outcome of one deep check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Overall status: the HSM's own status, lowered by a failed round trip.
    pub status: HealthStatus,
    /// What the HSM reported.
    pub hsm: HsmHealth,
    /// Operator-facing detail when not ACTIVE (empty otherwise).
    pub detail: String,
}

/// Runs and caches deep checks.
pub struct HealthMonitor<B: Backend> {
    backend: Arc<B>,
    key: String,
    max_age: Duration,
    last: Mutex<Option<(Instant, HealthReport)>>,
}

impl<B: Backend> HealthMonitor<B> {
    /// Check with `key` (the dedicated health-check key); reports are reused for `max_age`.
    pub fn new(backend: Arc<B>, key: String, max_age: Duration) -> Self {
        Self {
            backend,
            key,
            max_age,
            last: Mutex::new(None),
        }
    }

    /// The latest report, running a check first if the cached one is older than `max_age`.
    /// Concurrent callers share one check (the lock is held while it runs).
    pub async fn report(&self) -> HealthReport {
        let mut last = self.last.lock().await;
        if let Some((_, report)) = last.as_ref().filter(|(at, _)| at.elapsed() < self.max_age) {
            return report.clone();
        }
        let report = self.check().await;
        *last = Some((Instant::now(), report.clone()));
        report
    }

    /// Run a check now and cache it (the background refresher calls this).
    pub async fn refresh(&self) -> HealthReport {
        let report = self.check().await;
        *self.last.lock().await = Some((Instant::now(), report.clone()));
        report
    }

    async fn check(&self) -> HealthReport {
        let hsm = self.backend.health().await;
        if hsm.status == HealthStatus::Unavailable {
            let detail = hsm.detail.clone();
            return HealthReport {
                status: HealthStatus::Unavailable,
                hsm,
                detail,
            };
        }
        match self.round_trip().await {
            Ok(()) => {
                let detail = hsm.detail.clone();
                HealthReport {
                    status: hsm.status,
                    hsm,
                    detail,
                }
            }
            Err(e) => {
                let status = match e {
                    CryptoError::HsmUnavailable(_) | CryptoError::HsmTimeout => {
                        HealthStatus::Unavailable
                    }
                    _ => HealthStatus::Degraded,
                };
                tracing::warn!(key = %self.key, error = %e, "health check round trip failed");
                HealthReport {
                    status,
                    hsm,
                    detail: format!(
                        "health-check round trip with key '{}' failed: {e}",
                        self.key
                    ),
                }
            }
        }
    }

    async fn round_trip(&self) -> Result<(), CryptoError> {
        const PROBE: &[u8] = b"ekm-proxy health probe";
        let aad = b"ekm-proxy health".to_vec();
        let sealed = self
            .backend
            .aead_encrypt(AeadEncrypt {
                key: self.key.clone(),
                plaintext: zeroize::Zeroizing::new(PROBE.to_vec()),
                aad: aad.clone(),
            })
            .await?;
        let plain = self
            .backend
            .aead_decrypt(AeadDecrypt {
                key: self.key.clone(),
                iv: sealed.iv,
                ciphertext: sealed.ciphertext,
                tag: sealed.tag,
                aad,
            })
            .await?;
        if plain.as_slice() == PROBE {
            Ok(())
        } else {
            Err(CryptoError::Internal(
                "health probe decrypted to different bytes".into(),
            ))
        }
    }
}
