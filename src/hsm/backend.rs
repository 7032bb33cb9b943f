//! `Pkcs11Backend`: the async face of the HSM layer and its implementation of `core::Backend`.
//!
//! Async callers never run a PKCS#11 call: they read the key cache (hot path, no queue), then
//! enqueue a job on the bounded queue and await the worker's reply with a deadline. Full queue →
//! `HsmBusy`, deadline → `HsmTimeout`, token being recovered or no session up → `HsmUnavailable`
//! at once (the protocols' retryable error, never "key not found").
//!
//! Must not depend on HTTP, wire formats or front ends; `app` builds it, `core` uses it through
//! the `Backend` trait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use super::errors::{HsmError, ck_error_name, login_is_fatal};
use super::keys::{KeyCache, KeyEntry};
use super::keywrap;
use super::module::Module;
use super::pool::Pool;
use super::recovery::TokenState;
use super::settings::HsmSettings;
use super::worker::{
    Control, Job, OpTimers, OpenError, Reply, Shared, TokenSummary, Work, open_logged_in,
};
use crate::core::state::StateMark;
use crate::core::{
    AeadDecrypt, AeadEncrypt, AeadSealed, Backend, CryptoError, GCM_TAG_LEN, HealthStatus,
    HsmHealth, KeyInfo, KeyType, KeyUnwrap, KeyWrap, Plaintext, WrapAlgorithm, WrapPath,
    WrapSupport,
};
use crate::metrics::{CacheMetrics, HsmMetrics};

/// Largest `random` request served (the HSM's RNG is shared by every caller).
pub const MAX_RANDOM_LEN: usize = 1024 * 1024;

/// The least deadline of background work (fleet-state reads, audit checkpoint MACs and the
/// lookup of their key). It is not on a cloud's 250 ms clock, and a tight `op_timeout_ms` on a
/// busy HSM must not keep a replica from ever reading the fleet state it needs to serve.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// The PKCS#11 backend. Cheap to clone (one `Arc`); `Send + Sync`. Workers stop when
/// [`Pkcs11Backend::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Pkcs11Backend {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    jobs: Sender<Job>,
    /// A receiver of our own, to answer jobs still queued once every worker has stopped.
    leftovers: Receiver<Job>,
    pool: Arc<Pool>,
    sessions_total: usize,
    closed: AtomicBool,
    op_timeout: Duration,
    /// The HSM's largest AES-GCM input, if it has one.
    max_data_bytes: Option<usize>,
    /// Token identity read at start, for health reports when no worker can answer.
    identity: TokenSummary,
    /// What the token can wrap with, found by trial at start.
    wrap_support: Arc<WrapSupport>,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("module", &self.inner.shared.module.path())
            .field("token", &self.inner.identity.label)
            .field("sessions_total", &self.inner.sessions_total)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Backend {
    /// Load the module (shared process-wide per path), select the token by label or serial, open
    /// and log in one session per worker, warm the key cache with every secret key on the token,
    /// and start the workers.
    ///
    /// Blocking (PKCS#11 calls on the calling thread): call it before serving, or from
    /// `spawn_blocking`. A refused PIN fails here after a single `C_Login` attempt.
    pub fn start(
        settings: HsmSettings,
        metrics: HsmMetrics,
        cache_metrics: CacheMetrics,
    ) -> Result<Self, HsmError> {
        let problems = settings.problems();
        if !problems.is_empty() {
            return Err(HsmError::InvalidSettings(problems));
        }
        let module = Module::acquire(&settings.module)?;
        let (slot, token_info) = module.find_token(&settings.token)?;
        let mut identity = TokenSummary::from(&token_info);
        // A count from start-up would be stale in later health reports.
        identity.session_count = None;
        let shared = Arc::new(Shared {
            module,
            token: TokenState::new(slot),
            selector: settings.token.clone(),
            token_label: identity.label.clone(),
            user_pin: settings.user_pin,
            keys: KeyCache::new(
                settings.key_cache_capacity,
                settings.key_cache_ttl,
                settings.negative_cache_ttl,
                cache_metrics,
                settings.allow_exportable_keys,
            ),
            timers: OpTimers::new(&metrics),
            metrics,
            sessions_up: Default::default(),
            login_refused: AtomicBool::new(false),
            session_key_copies: settings.session_key_copies,
            gcm_iv: settings.gcm_iv,
            recovery_backoff_initial: settings.recovery_backoff_initial,
            recovery_backoff_max: settings.recovery_backoff_max,
            hung_call_limit: settings.hung_call_limit,
            clock_base: Instant::now(),
        });

        // Sessions are opened here, sequentially: the first C_Login decides for all of them (later
        // sessions inherit the login), so a wrong PIN costs exactly one attempt.
        let mut sessions = Vec::with_capacity(settings.workers);
        for _ in 0..settings.workers {
            let session = open_logged_in(&shared).map_err(|e| match e {
                OpenError::LoginRefused(e) => HsmError::Login {
                    user: "user",
                    token: identity.label.clone(),
                    ckr: ck_error_name(&e).into_owned(),
                },
                OpenError::Pkcs11(e) if login_is_fatal(&e) => HsmError::Login {
                    user: "user",
                    token: identity.label.clone(),
                    ckr: ck_error_name(&e).into_owned(),
                },
                OpenError::Pkcs11(e) => HsmError::pkcs11("opening a worker session", &e),
            })?;
            sessions.push(session);
        }
        let warmed = match sessions.first().and_then(|s| s.session()) {
            Some(session) => shared.keys.warm(session).map_err(|f| HsmError::Pkcs11 {
                op: "key cache warm-up",
                ckr: f.error.to_string(),
            })?,
            None => 0,
        };
        let wrap_support = sessions
            .first()
            .and_then(|s| s.session())
            .map(keywrap::probe)
            .unwrap_or_default();
        log_wrap_support(&identity.label, &wrap_support);

        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(settings.queue_capacity);
        let pool = Pool::start(&shared, sessions, jobs_rx.clone())?;
        tracing::info!(
            module = %shared.module.path().display(),
            token = %identity.label,
            serial = %identity.serial,
            workers = settings.workers,
            gcm_iv = settings.gcm_iv.as_str(),
            keys_cached = warmed,
            "HSM backend started"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                jobs: jobs_tx,
                leftovers: jobs_rx,
                sessions_total: settings.workers,
                pool,
                closed: AtomicBool::new(false),
                op_timeout: settings.op_timeout,
                max_data_bytes: settings.max_data_bytes,
                identity,
                wrap_support: Arc::new(wrap_support),
            }),
        })
    }

    /// Every key on the token (secret keys, RSA and EC private keys), sorted by label, with the
    /// custody verdict. For `ekm-proxy keys list`; runs on a worker.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, CryptoError> {
        self.call(|reply| Work::ListKeys { reply }).await
    }

    /// Simulate an HSM dropping every session, used by recovery tests and operators' drills.
    ///
    /// cryptoki 0.12 has no safe binding for `C_CloseAllSessions` (and this crate forbids
    /// `unsafe`), so each worker closes its own session with a real `C_CloseSession`; only when all
    /// have closed are they released to reconnect, so the token sees no session left and forgets
    /// the login, exactly as after `C_CloseAllSessions`. Returns how many sessions were closed.
    /// Requests arriving meanwhile fail with `HsmUnavailable` or wait in the queue.
    pub async fn close_all_sessions(&self) -> Result<usize, CryptoError> {
        let controls = self.controls();
        let (resume_tx, resume_rx) = crossbeam_channel::bounded::<()>(0);
        let mut acks = Vec::with_capacity(controls.len());
        for control in &controls {
            let (tx, rx) = oneshot::channel();
            if control
                .send(Control::CloseSession {
                    closed: tx,
                    resume: resume_rx.clone(),
                })
                .is_ok()
            {
                acks.push(rx);
            }
        }
        let mut closed = 0;
        for ack in acks {
            if let Ok(Ok(true)) = tokio::time::timeout(self.inner.op_timeout, ack).await {
                closed += 1;
            }
        }
        // Disconnecting releases every worker to reconnect.
        drop(resume_tx);
        tracing::warn!(closed, "drill: closed every HSM worker session");
        Ok(closed)
    }

    /// Simulate the HSM forgetting our login (partition reset, HA fail-over): one worker calls
    /// `C_Logout`, which logs out every session of this process on the token. Workers discover it
    /// from the return codes of their next calls and log in again. For recovery tests and drills.
    pub async fn logout_all_sessions(&self) -> Result<(), CryptoError> {
        let controls = self.controls();
        let Some(control) = controls.first() else {
            return Err(CryptoError::HsmUnavailable("no HSM worker".to_owned()));
        };
        let (tx, rx) = oneshot::channel();
        control
            .send(Control::Logout { done: tx })
            .map_err(|_| CryptoError::HsmUnavailable("HSM worker stopped".to_owned()))?;
        match tokio::time::timeout(self.inner.op_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CryptoError::HsmUnavailable("HSM worker stopped".to_owned())),
            Err(_) => Err(CryptoError::HsmTimeout),
        }
    }

    /// Stop the workers: each answers what is still queued, closes its session and exits; new
    /// requests fail with `HsmUnavailable`. Idempotent; also done when the last clone is dropped.
    /// Blocks until the workers have exited (at most one in-flight operation each).
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    fn controls(&self) -> Vec<Sender<Control>> {
        self.inner.pool.controls()
    }

    /// The cached entry for `label`, or one `C_FindObjects` on a worker. A label that a recent
    /// search on a healthy token did not find is answered from the negative cache.
    async fn entry(&self, label: &str) -> Result<Arc<KeyEntry>, CryptoError> {
        self.entry_within(label, self.inner.op_timeout).await
    }

    /// [`Self::entry`], a lookup on the token waiting at most `timeout`.
    async fn entry_within(
        &self,
        label: &str,
        timeout: Duration,
    ) -> Result<Arc<KeyEntry>, CryptoError> {
        let shared = &self.inner.shared;
        if let Some(entry) = shared.keys.get(label) {
            return Ok(entry);
        }
        if !shared.token.is_down() && shared.keys.known_unknown(label) {
            return Err(CryptoError::KeyNotFound);
        }
        let label = label.to_owned();
        self.call_within(timeout, |reply| Work::Lookup { label, reply })
            .await
    }

    /// Enqueue one job of a request and await its reply within `op_timeout`.
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Work) -> Result<T, CryptoError> {
        self.call_within(self.inner.op_timeout, make).await
    }

    /// The deadline of background work: `op_timeout`, but at least [`BACKGROUND_TIMEOUT`].
    fn background_timeout(&self) -> Duration {
        self.inner.op_timeout.max(BACKGROUND_TIMEOUT)
    }

    /// Enqueue one job and await its reply within `timeout`.
    async fn call_within<T>(
        &self,
        timeout: Duration,
        make: impl FnOnce(Reply<T>) -> Work,
    ) -> Result<T, CryptoError> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(CryptoError::HsmUnavailable(
                "HSM backend is shut down".to_owned(),
            ));
        }
        if inner.hsm_down() {
            inner.shared.metrics.fail_fast.inc();
            return Err(CryptoError::HsmUnavailable(inner.down_detail()));
        }
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or(now);
        let metrics = &inner.shared.metrics;
        // Count before sending: the worker may dequeue (and decrement) before try_send returns.
        metrics.queue_depth.inc();
        match inner.jobs.try_send(Job {
            deadline,
            work: make(tx),
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics.queue_depth.dec();
                metrics.queue_rejections.inc();
                return Err(CryptoError::HsmBusy);
            }
            Err(TrySendError::Disconnected(_)) => {
                metrics.queue_depth.dec();
                return Err(CryptoError::HsmUnavailable(
                    "HSM workers stopped".to_owned(),
                ));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            // The worker dropped the job: it had expired, or the workers stopped.
            Ok(Err(_)) if Instant::now() >= deadline => Err(CryptoError::HsmTimeout),
            Ok(Err(_)) => Err(CryptoError::HsmUnavailable(
                "HSM workers stopped".to_owned(),
            )),
            Err(_) => Err(CryptoError::HsmTimeout),
        }
    }
}

impl Inner {
    /// The token is being recovered, or the PIN was refused and no session is up: fail fast.
    /// Right after a single session loss, while its worker reopens, jobs are queued instead and
    /// served by the other workers or as soon as it is back.
    fn hsm_down(&self) -> bool {
        let shared = &self.shared;
        shared.token.is_down()
            || (shared.sessions_up.load(Ordering::Acquire) == 0
                && shared.login_refused.load(Ordering::Acquire))
    }

    fn down_detail(&self) -> String {
        if self.shared.login_refused.load(Ordering::Acquire) {
            "the HSM refused the user PIN; fix hsm.user_pin and restart".to_owned()
        } else if self.shared.token.is_down() {
            "the HSM token is unavailable; recovering".to_owned()
        } else {
            "no HSM session is logged in; reconnecting".to_owned()
        }
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.pool.stop(&self.shared);
        // Jobs enqueued after the workers drained: dropping them answers their callers.
        while let Ok(job) = self.leftovers.try_recv() {
            self.shared.metrics.queue_depth.dec();
            drop(job);
        }
        tracing::info!(token = %self.identity.label, "HSM backend stopped");
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Pkcs11Backend {
    /// Refuse an AES-GCM input larger than the HSM takes (before it costs a queue slot).
    fn check_data_len(&self, len: usize) -> Result<(), CryptoError> {
        match self.inner.max_data_bytes {
            Some(limit) if len > limit => Err(CryptoError::Unsupported(format!(
                "input of {len} bytes exceeds the HSM's limit of {limit} bytes per operation"
            ))),
            _ => Ok(()),
        }
    }
}

/// One line for what the token can wrap with, one per algorithm it cannot (with the HSM's answer).
fn log_wrap_support(token: &str, support: &WrapSupport) {
    let supported: Vec<String> = support
        .supported
        .iter()
        .map(|(alg, mech, path)| match path {
            Some(path) => format!("{alg} ({mech} via {})", path.as_str()),
            None => format!("{alg} ({mech})"),
        })
        .collect();
    tracing::info!(token, supported = %supported.join(", "), "key-wrapping algorithms found by trial");
    for alg in &support.block_aligned_wrap {
        tracing::info!(token, algorithm = %alg, "the HSM wraps only multiples of 8 bytes correctly with this algorithm; other lengths are refused");
    }
    for (alg, why) in &support.unsupported {
        tracing::info!(token, algorithm = %alg, hsm_answer = %why, "key-wrapping algorithm not supported by the HSM");
    }
}

impl Pkcs11Backend {
    /// How the token does `alg`, or the clear refusal naming it.
    fn wrap_path(&self, alg: WrapAlgorithm) -> Result<WrapPath, CryptoError> {
        let support = &self.inner.wrap_support;
        match support.path(alg) {
            Some(path) => Ok(path.unwrap_or(WrapPath::EncryptDecrypt)),
            // The HSM's own answer to the trial was logged at start; CKR names stay out of what
            // a peer sees.
            None => Err(CryptoError::Unsupported(format!(
                "the HSM does not support {alg}"
            ))),
        }
    }
}

impl Backend for Pkcs11Backend {
    async fn key_wrap(&self, req: KeyWrap) -> Result<Vec<u8>, CryptoError> {
        let path = self.wrap_path(req.alg)?;
        self.inner
            .wrap_support
            .check_wrap_len(req.alg, req.plaintext.len())
            .map_err(CryptoError::Unsupported)?;
        let key = self.entry(&req.key).await?;
        if let Some(why) = &key.info.custody_violation {
            return Err(CryptoError::KeyDisabled(why.clone()));
        }
        let KeyWrap { alg, plaintext, .. } = req;
        self.call(|reply| Work::Wrap {
            key,
            alg,
            path,
            plaintext,
            reply,
        })
        .await
    }

    async fn key_unwrap(&self, req: KeyUnwrap) -> Result<Plaintext, CryptoError> {
        let path = self.wrap_path(req.alg)?;
        let key = self.entry(&req.key).await?;
        if let Some(why) = &key.info.custody_violation {
            return Err(CryptoError::KeyDisabled(why.clone()));
        }
        let KeyUnwrap { alg, wrapped, .. } = req;
        self.call(|reply| Work::Unwrap {
            key,
            alg,
            path,
            wrapped,
            reply,
        })
        .await
    }

    fn wrap_support(&self) -> Arc<WrapSupport> {
        Arc::clone(&self.inner.wrap_support)
    }

    async fn aead_encrypt(&self, req: AeadEncrypt) -> Result<AeadSealed, CryptoError> {
        self.check_data_len(req.plaintext.len())?;
        let key = self.entry(&req.key).await?;
        if let Some(why) = &key.info.custody_violation {
            return Err(CryptoError::KeyDisabled(why.clone()));
        }
        let AeadEncrypt { plaintext, aad, .. } = req;
        self.call(|reply| Work::Encrypt {
            key,
            plaintext,
            aad,
            reply,
        })
        .await
    }

    async fn aead_decrypt(&self, req: AeadDecrypt) -> Result<Plaintext, CryptoError> {
        self.check_data_len(req.ciphertext.len().saturating_add(GCM_TAG_LEN))?;
        let key = self.entry(&req.key).await?;
        if let Some(why) = &key.info.custody_violation {
            return Err(CryptoError::KeyDisabled(why.clone()));
        }
        let AeadDecrypt {
            iv,
            ciphertext,
            tag,
            aad,
            ..
        } = req;
        self.call(|reply| Work::Decrypt {
            key,
            iv,
            ciphertext,
            tag,
            aad,
            reply,
        })
        .await
    }

    async fn key_info(&self, key: &str) -> Result<KeyInfo, CryptoError> {
        Ok(self.entry(key).await?.info.clone())
    }

    async fn fleet_state(&self) -> Result<Vec<StateMark>, CryptoError> {
        self.call_within(self.background_timeout(), |reply| Work::ReadState { reply })
            .await
    }

    async fn hmac_sha256(&self, key: &str, data: Vec<u8>) -> Result<[u8; 32], CryptoError> {
        let background = self.background_timeout();
        let entry = self.entry_within(key, background).await?;
        let info = &entry.info;
        let hmac_type = match &info.key_type {
            KeyType::GenericSecret => true,
            // Some vendors type HMAC keys by hash (CKK_SHA256_HMAC).
            KeyType::Other(name) => name == "SHA256_HMAC",
            _ => false,
        };
        if !hmac_type || !info.usage.sign {
            return Err(CryptoError::InvalidKeyUsage(format!(
                "{} is {} with usage {}, not a generic secret key that may sign (create it with \
                 `ekm-proxy keys create --type hmac-sha256`)",
                info.label,
                info.key_spec(),
                info.usage.names().join(",")
            )));
        }
        self.call_within(background, |reply| Work::Mac {
            key: entry,
            data,
            reply,
        })
        .await
    }

    async fn random(&self, len: usize) -> Result<Vec<u8>, CryptoError> {
        if len > MAX_RANDOM_LEN {
            return Err(CryptoError::Unsupported(format!(
                "random length {len} exceeds {MAX_RANDOM_LEN}"
            )));
        }
        self.call(|reply| Work::Random { len, reply }).await
    }

    async fn health(&self) -> HsmHealth {
        let inner = &*self.inner;
        let from = |status: HealthStatus, token: &TokenSummary, detail: String| HsmHealth {
            status,
            token_label: token.label.clone(),
            manufacturer: token.manufacturer.clone(),
            model: token.model.clone(),
            serial: token.serial.clone(),
            versions: token.versions.clone(),
            sessions_up: inner.shared.sessions_up.load(Ordering::Acquire),
            sessions_total: inner.sessions_total,
            token_sessions: token.session_count,
            detail,
        };
        if inner.closed.load(Ordering::Acquire) {
            return from(
                HealthStatus::Unavailable,
                &inner.identity,
                "HSM backend is shut down".to_owned(),
            );
        }
        if inner.hsm_down() || inner.shared.sessions_up.load(Ordering::Acquire) == 0 {
            // Nothing could answer a token-info job: say so now rather than wait for the deadline.
            return from(
                HealthStatus::Unavailable,
                &inner.identity,
                inner.down_detail(),
            );
        }
        match self.call(|reply| Work::TokenInfo { reply }).await {
            Ok(token) => {
                let up = inner.shared.sessions_up.load(Ordering::Acquire);
                let (status, detail) = if token.user_pin_locked {
                    (
                        HealthStatus::Degraded,
                        "the token reports the user PIN as locked".to_owned(),
                    )
                } else if up < inner.sessions_total {
                    (
                        HealthStatus::Degraded,
                        format!(
                            "{} of {} HSM sessions are down; reconnecting",
                            inner.sessions_total - up,
                            inner.sessions_total
                        ),
                    )
                } else {
                    (HealthStatus::Active, String::new())
                };
                from(status, &token, detail)
            }
            Err(CryptoError::HsmBusy) => from(
                HealthStatus::Degraded,
                &inner.identity,
                "HSM queue is full".to_owned(),
            ),
            Err(CryptoError::HsmTimeout) => from(
                HealthStatus::Degraded,
                &inner.identity,
                format!(
                    "the HSM did not answer within {} ms",
                    inner.op_timeout.as_millis()
                ),
            ),
            Err(CryptoError::HsmUnavailable(detail)) => {
                from(HealthStatus::Unavailable, &inner.identity, detail)
            }
            Err(other) => from(
                HealthStatus::Unavailable,
                &inner.identity,
                other.to_string(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn backend_is_send_sync_clone() {
        assert_send_sync::<Pkcs11Backend>();
    }
}
