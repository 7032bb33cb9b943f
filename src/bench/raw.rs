//! The raw HSM lane: the same AES-GCM operation as the HTTP lane, straight through
//! [`Pkcs11Backend`] in this process (no HTTP, TLS, SigV4, JWT or JSON), at the same concurrency.
//! Cloud EKM wrap is an encrypt and unwrap a decrypt, under the key behind the key path, with the
//! AAD the front end binds a blob with ([`crate::front::gcp::blob::aad`]), so the HSM processes the
//! same bytes in both lanes. Azure wrapkey and unwrapkey are the backend's `key_wrap` and
//! `key_unwrap` of the same 32-byte key, under the same key and algorithm.
//!
//! It goes through the backend's queue and worker threads on purpose: that is the floor the proxy
//! adds its front end to, so `proxy rps / raw rps` is what the front end costs. The backend opens
//! its own sessions on the same token as the server (SoftHSM shares token files between processes
//! safely for reads); the lanes never run at the same time, so they do not compete for CPU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use zeroize::Zeroizing;

use super::options::{BenchOptions, Scenario};
use super::stats::LaneStats;
use super::{BenchError, RunningLane, Window};
use crate::core::framing::{AadFraming, full_aad};
use crate::core::{
    AeadDecrypt, AeadEncrypt, Backend, CryptoError, GCM_TAG_LEN, KeyUnwrap, KeyWrap, WrapAlgorithm,
};
use crate::front::gcp::blob;
use crate::hsm::{HsmSettings, Pkcs11Backend};

/// The backend of the raw lane, started once per run.
pub struct RawHsm {
    backend: Pkcs11Backend,
}

impl RawHsm {
    /// Start the backend (module load, login, key cache warm-up) off the async threads.
    pub async fn start(settings: HsmSettings) -> Result<Self, BenchError> {
        let metrics = crate::metrics::Metrics::standalone();
        let started = tokio::task::spawn_blocking(move || {
            Pkcs11Backend::start(settings, metrics.hsm.clone(), metrics.cache.clone())
        })
        .await
        .map_err(|e| BenchError::Internal(format!("HSM start-up task: {e}")))?;
        let backend = started.map_err(|e| BenchError::Hsm(e.to_string()))?;
        Ok(Self { backend })
    }

    /// Stop the backend's workers (closes their sessions).
    pub async fn shutdown(self) {
        let backend = self.backend;
        // `shutdown` joins the worker threads: blocking, so not on an async thread.
        let _ = tokio::task::spawn_blocking(move || backend.shutdown()).await;
    }

    /// The raw operation for `scenario` (`None` for scenarios without one). Decrypt scenarios
    /// encrypt once first; every operation is tried once, so a problem is one clear line.
    pub async fn operation(
        &self,
        scenario: Scenario,
        opts: &BenchOptions,
    ) -> Result<Option<RawOp>, String> {
        if !scenario.has_raw_lane() {
            return Ok(None);
        }
        if scenario.is_azure() {
            return self.azure_operation(scenario, opts).await.map(Some);
        }
        let plaintext = super::load::pattern(opts.plaintext_size, 0);
        let aad_field = (opts.aad_size > 0).then(|| super::load::pattern(opts.aad_size, 7));
        // The server frames the caller's AAD before the HSM sees it; frame it the same way so the
        // HSM processes the same number of bytes in both lanes.
        let (key, aad) = if scenario.is_gcp() {
            let g = &opts.gcp;
            let aad = blob::aad(
                &g.key_path,
                0,
                &g.hsm_key,
                aad_field.as_deref().unwrap_or_default(),
            );
            (g.hsm_key.clone(), aad)
        } else {
            let aad = full_aad(AadFraming::SpecLiteral, aad_field.as_deref(), &[])
                .map_err(|e| format!("AAD: {e:?}"))?;
            (opts.key.clone(), aad)
        };
        let mut op = RawOp {
            key,
            plaintext,
            aad,
            kind: RawKind::Encrypt,
        };
        let encrypts = matches!(
            scenario,
            Scenario::Encrypt | Scenario::GcpWrap | Scenario::GcpWrapFresh
        );
        if !encrypts {
            let sealed = self
                .backend
                .aead_encrypt(op.encrypt_request())
                .await
                .map_err(|e| format!("encrypting the test ciphertext: {e}"))?;
            let mut tag = sealed.tag;
            let expect_invalid = scenario == Scenario::DecryptBadTag;
            if expect_invalid {
                tag[0] ^= 0x01;
            }
            op.kind = RawKind::Decrypt {
                iv: sealed.iv,
                ciphertext: sealed.ciphertext,
                tag,
                expect_invalid,
            };
        }
        op.run(&self.backend)
            .await
            .map_err(|(kind, detail)| format!("probe ({kind}): {detail}"))?;
        Ok(Some(op))
    }

    /// The key wrap (or unwrap of one value wrapped here first) the Azure scenario asks the
    /// server for: same key, algorithm and key length.
    async fn azure_operation(
        &self,
        scenario: Scenario,
        opts: &BenchOptions,
    ) -> Result<RawOp, String> {
        let az = &opts.azure;
        let mut op = RawOp {
            key: az.key.clone(),
            plaintext: super::load::pattern(super::load::AZURE_DEK_LEN, 0),
            aad: Vec::new(),
            kind: RawKind::Wrap(az.alg),
        };
        if scenario == Scenario::AzureUnwrap {
            let wrapped = self
                .backend
                .key_wrap(op.wrap_request(az.alg))
                .await
                .map_err(|e| format!("wrapping the test key: {e}"))?;
            op.kind = RawKind::Unwrap {
                alg: az.alg,
                wrapped,
            };
        }
        op.run(&self.backend)
            .await
            .map_err(|(kind, detail)| format!("probe ({kind}): {detail}"))?;
        Ok(op)
    }

    /// Start `concurrency` tasks that run `op` back to back; warm-up now, then the window.
    pub fn start_lane(
        &self,
        op: Arc<RawOp>,
        concurrency: usize,
        warmup: Duration,
        duration: Duration,
    ) -> Result<RunningLane, BenchError> {
        let window = Window::after(warmup, duration);
        let mut workers = JoinSet::new();
        for _ in 0..concurrency {
            let stats = LaneStats::new()?;
            workers.spawn(worker(self.backend.clone(), Arc::clone(&op), stats, window));
        }
        Ok(RunningLane { window, workers })
    }
}

/// One prepared raw operation.
pub struct RawOp {
    key: String,
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    kind: RawKind,
}

enum RawKind {
    Encrypt,
    Decrypt {
        iv: Vec<u8>,
        ciphertext: Vec<u8>,
        tag: [u8; GCM_TAG_LEN],
        expect_invalid: bool,
    },
    /// `key_wrap` of the plaintext.
    Wrap(WrapAlgorithm),
    /// `key_unwrap` of a value wrapped before measuring.
    Unwrap {
        alg: WrapAlgorithm,
        wrapped: Vec<u8>,
    },
}

impl RawOp {
    fn encrypt_request(&self) -> AeadEncrypt {
        AeadEncrypt {
            key: self.key.clone(),
            plaintext: Zeroizing::new(self.plaintext.clone()),
            aad: self.aad.clone(),
        }
    }

    fn wrap_request(&self, alg: WrapAlgorithm) -> KeyWrap {
        KeyWrap {
            key: self.key.clone(),
            alg,
            plaintext: Zeroizing::new(self.plaintext.clone()),
        }
    }

    /// Run once; `Err((kind, detail))` when the outcome is not the expected one.
    async fn run(&self, backend: &Pkcs11Backend) -> Result<(), (&'static str, String)> {
        let fail = |e: CryptoError| (e.kind(), e.to_string());
        match &self.kind {
            RawKind::Encrypt => backend
                .aead_encrypt(self.encrypt_request())
                .await
                .map(drop)
                .map_err(fail),
            RawKind::Decrypt {
                iv,
                ciphertext,
                tag,
                expect_invalid,
            } => {
                let req = AeadDecrypt {
                    key: self.key.clone(),
                    iv: iv.clone(),
                    ciphertext: ciphertext.clone(),
                    tag: *tag,
                    aad: self.aad.clone(),
                };
                match (backend.aead_decrypt(req).await, expect_invalid) {
                    (Ok(_), false) | (Err(CryptoError::InvalidCiphertext), true) => Ok(()),
                    (Ok(_), true) => Err((
                        "unexpected_success",
                        "a bad-tag decrypt succeeded".to_owned(),
                    )),
                    (Err(e), _) => Err(fail(e)),
                }
            }
            RawKind::Wrap(alg) => backend
                .key_wrap(self.wrap_request(*alg))
                .await
                .map(drop)
                .map_err(fail),
            RawKind::Unwrap { alg, wrapped } => backend
                .key_unwrap(KeyUnwrap {
                    key: self.key.clone(),
                    alg: *alg,
                    wrapped: wrapped.clone(),
                })
                .await
                .map(drop)
                .map_err(fail),
        }
    }
}

async fn worker(
    backend: Pkcs11Backend,
    op: Arc<RawOp>,
    mut stats: LaneStats,
    window: Window,
) -> LaneStats {
    while Instant::now() < window.end {
        let sent = Instant::now();
        let result = op.run(&backend).await;
        let done = Instant::now();
        let counted = window.contains(done);
        match result {
            Ok(()) if counted => stats.record_ok(done - sent),
            Ok(()) => {}
            Err((kind, detail)) => {
                if counted {
                    stats.record_kind(kind, || detail);
                }
                // Failures can return without ever waiting; yield so the sampler and the other
                // workers still run on a single-threaded runtime.
                tokio::task::yield_now().await;
            }
        }
    }
    stats
}
