//! HSM worker threads: each owns one logged-in session and serves jobs from the shared queue.
//!
//! A `cryptoki::Session` is `Send` but not `Sync`, and PKCS#11 sessions are not meant for
//! concurrent use, so each lives on exactly one OS thread for its whole life. Async callers never
//! touch a session: they enqueue a [`Job`] and await its oneshot reply (see `backend`). This file
//! also owns the bottom rungs of the recovery ladder: refresh a stale handle, end a stuck
//! operation, log in again, reopen the session, and retry the job; never retry a refused PIN.
//! When that is not enough (the session cannot be reopened, a general error survives the reopen,
//! the device reports a loss) the worker marks the token down and waits for the supervisor
//! (`recovery`), which alone probes the HSM until it is back.
//!
//! Must not depend on tokio's runtime (only its oneshot channel), HTTP or any front end.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use cryptoki::types::AuthPin;
use prometheus::Histogram;
use tokio::sync::oneshot;

use super::errors::{
    Fault, Op, Recovery, RecoveryLevel, ck_error_name, login_is_fatal, map_ckr, rv_of,
};
use super::gcm;
use super::keys::{self, KeyCache, KeyEntry};
use super::keywrap;
use super::mac;
use super::module::Module;
use super::pool::WorkerState;
use super::recovery::TokenState;
use super::settings::{GcmIvMode, TokenSelector};
use super::state;
use crate::core::state::StateMark;
use crate::core::{
    AeadSealed, CryptoError, GCM_TAG_LEN, KeyInfo, Plaintext, WrapAlgorithm, WrapPath,
};
use crate::metrics::HsmMetrics;
use crate::secret::SecretString;

/// How often a worker without a session looks for the token's return (or a control message).
const DOWN_POLL: Duration = Duration::from_millis(50);
/// How long a worker waits for its peers to close their sessions during a `close_all_sessions`
/// drill before reconnecting anyway.
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// A reply channel for one job.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, CryptoError>>;

/// State shared by the backend handle and every worker.
pub(crate) struct Shared {
    pub(crate) module: Arc<Module>,
    /// Slot, epoch and down state of the token (see `recovery`).
    pub(crate) token: TokenState,
    /// How to find the token again after a loss.
    pub(crate) selector: TokenSelector,
    pub(crate) token_label: String,
    pub(crate) user_pin: SecretString,
    pub(crate) keys: KeyCache,
    pub(crate) metrics: HsmMetrics,
    pub(crate) timers: OpTimers,
    /// Worker sessions open and logged in right now (health, fast failure when zero).
    pub(crate) sessions_up: AtomicUsize,
    /// Set when the HSM refused the PIN: workers stop trying (a retried wrong PIN locks the token).
    pub(crate) login_refused: AtomicBool,
    /// Use per-session key copies (see `HsmSettings::session_key_copies`).
    pub(crate) session_key_copies: bool,
    /// Who makes the GCM IV.
    pub(crate) gcm_iv: GcmIvMode,
    /// Token/module recovery backoff (see `HsmSettings`).
    pub(crate) recovery_backoff_initial: Duration,
    pub(crate) recovery_backoff_max: Duration,
    /// A call running longer than this costs its worker (0 = never).
    pub(crate) hung_call_limit: Duration,
    /// Origin of the workers' busy timestamps.
    pub(crate) clock_base: Instant,
}

/// One worker's session copies of token keys: label → (the cache entry it was copied from, the
/// copy's handle). Valid only for the key-cache generation it was made in: a reopen or re-login
/// anywhere bumps the generation and the copies are forgotten (they died with their session).
#[derive(Default)]
pub(crate) struct SessionCopies {
    generation: u64,
    by_label: std::collections::HashMap<String, (Arc<KeyEntry>, ObjectHandle)>,
}

impl SessionCopies {
    /// The handle to use for `entry` on `session`: its session copy, made on first use. A key the
    /// HSM refuses to copy is used through its token handle (and not tried again).
    fn handle_for(
        &mut self,
        shared: &Shared,
        session: &Session,
        entry: &Arc<KeyEntry>,
    ) -> ObjectHandle {
        let generation = shared.keys.generation();
        if generation != self.generation {
            self.by_label.clear();
            self.generation = generation;
        }
        if let Some((from, copy)) = self.by_label.get(&entry.info.label) {
            // Same cache entry (not merely the same label or handle number): the copy is of this key.
            if Arc::ptr_eq(from, entry) {
                return *copy;
            }
            if *copy != from.handle {
                // Best effort: the old copy is a session object and dies with the session anyway.
                let _ = session.destroy_object(*copy);
            }
        }
        let copied = {
            let _guard = keys::object_copy_lock();
            session.copy_object(entry.handle, &[Attribute::Token(false)])
        };
        let copy = match copied {
            Ok(copy) => copy,
            Err(e) => {
                tracing::warn!(key = %entry.info.label, ckr = %ck_error_name(&e), "HSM refused a session copy of the key; using the token object");
                entry.handle
            }
        };
        self.by_label
            .insert(entry.info.label.clone(), (Arc::clone(entry), copy));
        copy
    }
}

/// Latency histograms resolved once, so the hot path does no label lookup.
pub(crate) struct OpTimers {
    encrypt: Histogram,
    decrypt: Histogram,
    wrap: Histogram,
    unwrap: Histogram,
    random: Histogram,
    find_key: Histogram,
    token_info: Histogram,
    list_keys: Histogram,
    read_state: Histogram,
    mac: Histogram,
    open_session: Histogram,
    login: Histogram,
}

impl OpTimers {
    pub(crate) fn new(metrics: &HsmMetrics) -> Self {
        Self {
            encrypt: metrics.op(Op::Encrypt.as_str()),
            decrypt: metrics.op(Op::Decrypt.as_str()),
            wrap: metrics.op(Op::Wrap.as_str()),
            unwrap: metrics.op(Op::Unwrap.as_str()),
            random: metrics.op(Op::Random.as_str()),
            find_key: metrics.op(Op::FindKey.as_str()),
            token_info: metrics.op(Op::TokenInfo.as_str()),
            list_keys: metrics.op(Op::ListKeys.as_str()),
            read_state: metrics.op(Op::ReadState.as_str()),
            mac: metrics.op(Op::Mac.as_str()),
            open_session: metrics.op(Op::OpenSession.as_str()),
            login: metrics.op(Op::Login.as_str()),
        }
    }

    fn get(&self, op: Op) -> &Histogram {
        match op {
            Op::Encrypt => &self.encrypt,
            Op::Decrypt => &self.decrypt,
            Op::Wrap => &self.wrap,
            Op::Unwrap => &self.unwrap,
            Op::Random => &self.random,
            Op::FindKey | Op::ReadAttributes => &self.find_key,
            Op::TokenInfo => &self.token_info,
            Op::ListKeys => &self.list_keys,
            Op::ReadState => &self.read_state,
            Op::Mac => &self.mac,
            Op::OpenSession => &self.open_session,
            Op::Login => &self.login,
        }
    }
}

/// What `C_GetTokenInfo` says, reduced to what health reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenSummary {
    pub(crate) label: String,
    pub(crate) manufacturer: String,
    pub(crate) model: String,
    pub(crate) serial: String,
    pub(crate) versions: String,
    pub(crate) user_pin_locked: bool,
    /// Sessions the token reports open (every application's), when it says.
    pub(crate) session_count: Option<u64>,
}

impl From<&TokenInfo> for TokenSummary {
    fn from(info: &TokenInfo) -> Self {
        let (hw, fw) = (info.hardware_version(), info.firmware_version());
        Self {
            label: info.label().trim_end().to_owned(),
            manufacturer: info.manufacturer_id().trim_end().to_owned(),
            model: info.model().trim_end().to_owned(),
            serial: info.serial_number().trim_end().to_owned(),
            versions: format!(
                "hw {}.{} fw {}.{}",
                hw.major(),
                hw.minor(),
                fw.major(),
                fw.minor()
            ),
            user_pin_locked: info.user_pin_locked(),
            session_count: info.session_count(),
        }
    }
}

/// One unit of work with its deadline (queue wait included).
pub(crate) struct Job {
    pub(crate) deadline: Instant,
    pub(crate) work: Work,
}

/// The operations a worker performs. Every one is safe to retry once after a reopen: none
/// changes token state.
pub(crate) enum Work {
    Encrypt {
        key: Arc<KeyEntry>,
        plaintext: Plaintext,
        aad: Vec<u8>,
        reply: Reply<AeadSealed>,
    },
    Decrypt {
        key: Arc<KeyEntry>,
        iv: Vec<u8>,
        ciphertext: Vec<u8>,
        tag: [u8; GCM_TAG_LEN],
        aad: Vec<u8>,
        reply: Reply<Plaintext>,
    },
    Wrap {
        key: Arc<KeyEntry>,
        alg: WrapAlgorithm,
        path: WrapPath,
        plaintext: Plaintext,
        reply: Reply<Vec<u8>>,
    },
    Unwrap {
        key: Arc<KeyEntry>,
        alg: WrapAlgorithm,
        path: WrapPath,
        wrapped: Vec<u8>,
        reply: Reply<Plaintext>,
    },
    Random {
        len: usize,
        reply: Reply<Vec<u8>>,
    },
    Lookup {
        label: String,
        reply: Reply<Arc<KeyEntry>>,
    },
    /// `C_GetSessionInfo` (proves the session is alive) + `C_GetTokenInfo`.
    TokenInfo {
        reply: Reply<TokenSummary>,
    },
    ListKeys {
        reply: Reply<Vec<KeyInfo>>,
    },
    /// Read the fleet state objects.
    ReadState {
        reply: Reply<Vec<StateMark>>,
    },
    /// HMAC-SHA-256 of `data` with `key` (audit checkpoints).
    Mac {
        key: Arc<KeyEntry>,
        data: Vec<u8>,
        reply: Reply<[u8; 32]>,
    },
}

impl Work {
    /// Answer the job with `error` without running it.
    fn fail(self, error: CryptoError) {
        match self {
            Work::Encrypt { reply, .. } => drop(reply.send(Err(error))),
            Work::Decrypt { reply, .. } => drop(reply.send(Err(error))),
            Work::Wrap { reply, .. } => drop(reply.send(Err(error))),
            Work::Unwrap { reply, .. } => drop(reply.send(Err(error))),
            Work::Random { reply, .. } => drop(reply.send(Err(error))),
            Work::Lookup { reply, .. } => drop(reply.send(Err(error))),
            Work::TokenInfo { reply } => drop(reply.send(Err(error))),
            Work::ListKeys { reply } => drop(reply.send(Err(error))),
            Work::ReadState { reply } => drop(reply.send(Err(error))),
            Work::Mac { reply, .. } => drop(reply.send(Err(error))),
        }
    }

    fn op(&self) -> Op {
        match self {
            Work::Encrypt { .. } => Op::Encrypt,
            Work::Decrypt { .. } => Op::Decrypt,
            Work::Wrap { .. } => Op::Wrap,
            Work::Unwrap { .. } => Op::Unwrap,
            Work::Random { .. } => Op::Random,
            Work::Lookup { .. } => Op::FindKey,
            Work::TokenInfo { .. } => Op::TokenInfo,
            Work::ListKeys { .. } => Op::ListKeys,
            Work::ReadState { .. } => Op::ReadState,
            Work::Mac { .. } => Op::Mac,
        }
    }
}

/// Out-of-band instructions for one particular worker.
pub(crate) enum Control {
    /// Close the session for real (`C_CloseSession`), report, wait until `resume` is released (or
    /// disconnected) so all peers are closed too, then reconnect.
    CloseSession {
        closed: oneshot::Sender<bool>,
        resume: Receiver<()>,
    },
    /// `C_Logout`: the token forgets the login of every session of this process.
    Logout {
        done: oneshot::Sender<Result<(), CryptoError>>,
    },
    /// Answer what is queued, close the session, exit.
    Stop,
    /// Look at the token state now (the supervisor wakes idle workers so they let go of their
    /// sessions before it probes the HSM).
    Wake,
}

/// A session opened without cryptoki's close-on-drop, so this code decides when `C_CloseSession`
/// is called: never on a handle the HSM already dropped (modules may reuse handle numbers, and
/// closing a stale one could close a peer's new session).
pub(crate) struct OwnedSession(Option<Session>);

impl OwnedSession {
    pub(crate) fn session(&self) -> Option<&Session> {
        self.0.as_ref()
    }

    /// Close for real (the handle is known to be valid).
    pub(crate) fn close(mut self) {
        if let Some(s) = self.0.take()
            && let Err(e) = s.close()
        {
            tracing::debug!(ckr = %ck_error_name(&e), "C_CloseSession failed");
        }
    }

    /// Drop without `C_CloseSession` (the HSM has dropped it already).
    fn forget(mut self) {
        self.0.take();
    }

    /// Let go of a session whose `C_GetSessionInfo` just failed with `err`: forget it when the
    /// code says the HSM dropped it (closing could hit a newer session that got its number);
    /// otherwise it may well be alive (a general or device error says nothing about the handle),
    /// so close it, or it would stay open on the token for good.
    fn dispose_after(self, err: &CkError) {
        match rv_of(err) {
            Some(
                RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::CryptokiNotInitialized,
            ) => self.forget(),
            _ => self.close(),
        }
    }
}

impl Drop for OwnedSession {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _ = s.close();
        }
    }
}

/// Why a logged-in session could not be opened.
pub(crate) enum OpenError {
    /// `C_OpenSession` or the session check failed.
    Pkcs11(CkError),
    /// `C_Login` failed (the PIN may be wrong: never retried automatically when fatal).
    LoginRefused(CkError),
}

impl OpenError {
    pub(crate) fn into_inner(self) -> CkError {
        match self {
            OpenError::Pkcs11(e) | OpenError::LoginRefused(e) => e,
        }
    }
}

/// Open a read-only session on the token's current slot and log it in (see [`open_logged_in_on`]).
pub(crate) fn open_logged_in(shared: &Shared) -> Result<OwnedSession, OpenError> {
    open_logged_in_on(shared, shared.token.slot())
}

/// Open a read-only session on `slot` and make sure it is logged in as user. Counts `C_Login`
/// calls; a session that is already in a user state (another session of this process is logged
/// in) needs none.
pub(crate) fn open_logged_in_on(shared: &Shared, slot: Slot) -> Result<OwnedSession, OpenError> {
    let timer = Instant::now();
    // RO is enough for encrypt/decrypt/find/attributes: least privilege.
    let session = OwnedSession(Some(
        shared
            .module
            .ctx()
            .open_ro_session_no_drop(slot)
            .map_err(OpenError::Pkcs11)?,
    ));
    shared
        .timers
        .get(Op::OpenSession)
        .observe(timer.elapsed().as_secs_f64());
    if let Some(s) = session.session() {
        match login_if_needed(shared, s) {
            Ok(_) => {}
            Err(e @ CkError::Pkcs11(_, cryptoki::context::Function::Login)) => {
                return Err(OpenError::LoginRefused(e));
            }
            Err(e) => return Err(OpenError::Pkcs11(e)),
        }
    }
    Ok(session)
}

/// `C_Login(CKU_USER)` unless the session is already in a user state. Returns whether a login was
/// performed. `CKR_USER_ALREADY_LOGGED_IN` counts as success.
fn login_if_needed(shared: &Shared, session: &Session) -> Result<bool, CkError> {
    let state = session.get_session_info()?.session_state();
    if matches!(state, SessionState::RoUser | SessionState::RwUser) {
        return Ok(false);
    }
    shared.metrics.logins.inc();
    let timer = Instant::now();
    let pin = AuthPin::from(shared.user_pin.expose());
    let result = session.login(UserType::User, Some(&pin));
    shared
        .timers
        .get(Op::Login)
        .observe(timer.elapsed().as_secs_f64());
    match result {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(true),
        Err(e) => Err(e),
    }
}

/// One worker thread's state.
pub(crate) struct Worker {
    /// Declared first: a session must be closed before `shared` (and with it, possibly, the
    /// module) is dropped.
    session: Option<OwnedSession>,
    /// The token epoch and module generation the session was opened in.
    session_epoch: u64,
    session_module_generation: u64,
    shared: Arc<Shared>,
    state: Arc<WorkerState>,
    index: usize,
    /// Session copies of keys, when `Shared::session_key_copies`.
    copies: SessionCopies,
}

impl Worker {
    /// A worker around an already logged-in session (opened by `start`, so a bad PIN fails
    /// start-up with a single attempt), or without one (a replacement opens its own).
    pub(crate) fn new(
        index: usize,
        session: Option<OwnedSession>,
        shared: Arc<Shared>,
        state: Arc<WorkerState>,
    ) -> Self {
        let has_session = session.is_some();
        let worker = Worker {
            session,
            session_epoch: shared.token.epoch(),
            session_module_generation: shared.token.module_generation(),
            shared,
            state,
            index,
            copies: SessionCopies::default(),
        };
        if has_session {
            worker.state.mark_up(&worker.shared);
        }
        worker
    }

    /// The thread body: serve jobs until stopped, given up on, or the queue is gone.
    pub(crate) fn run(mut self, jobs: Receiver<Job>, control: Receiver<Control>) {
        tracing::debug!(worker = self.index, "HSM worker started");
        loop {
            if self.state.is_abandoned() {
                break;
            }
            // Control messages are rare; checking first keeps drills and shutdown prompt under load.
            match control.try_recv() {
                Ok(ctl) => {
                    if self.on_control(ctl, &jobs).is_break() {
                        break;
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            self.drop_stale_session();
            if self.session.is_some() && self.shared.token.is_down() {
                // Let go now, while no new session can have been handed our handle number (the
                // supervisor opens its probe only once every worker has let go).
                self.retire_session();
            }
            if self.session.is_none() {
                // Without a session this worker takes no jobs, so healthy peers serve them.
                if self.reconnect_or_wait(&control, &jobs).is_break() {
                    break;
                }
                continue;
            }
            match jobs.try_recv() {
                Ok(job) => {
                    self.take(job);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            crossbeam_channel::select! {
                recv(jobs) -> job => match job {
                    Ok(job) => self.take(job),
                    Err(_) => break,
                },
                recv(control) -> ctl => match ctl {
                    Ok(ctl) => if self.on_control(ctl, &jobs).is_break() { break },
                    Err(_) => break,
                },
            }
        }
        self.retire_session();
        tracing::debug!(worker = self.index, "HSM worker stopped");
    }

    fn on_control(&mut self, ctl: Control, jobs: &Receiver<Job>) -> ControlFlow<()> {
        match ctl {
            Control::Stop => {
                // Drain: whatever is still queued gets an answer rather than a timeout.
                while let Ok(job) = jobs.try_recv() {
                    self.take(job);
                }
                ControlFlow::Break(())
            }
            Control::CloseSession { closed, resume } => {
                let had_session = self.session.is_some();
                self.close_session();
                let _ = closed.send(had_session);
                // Wait for the peers: only when no session of ours is left does the token drop the
                // login, which is what the drill simulates.
                let _ = resume.recv_timeout(RESUME_WAIT);
                ControlFlow::Continue(())
            }
            Control::Wake => ControlFlow::Continue(()),
            Control::Logout { done } => {
                let result = match self.session.as_ref().and_then(OwnedSession::session) {
                    Some(s) => s.logout().map_err(|e| map_ckr(Op::Login, &e).error),
                    None => Err(CryptoError::HsmUnavailable(
                        "worker has no session".to_owned(),
                    )),
                };
                let _ = done.send(result);
                ControlFlow::Continue(())
            }
        }
    }

    /// Without a session: reopen at once unless the token is down (then the supervisor alone
    /// probes the HSM, and this worker answers queued jobs with a retryable error while it waits)
    /// or the PIN was refused (never retried).
    fn reconnect_or_wait(
        &mut self,
        control: &Receiver<Control>,
        jobs: &Receiver<Job>,
    ) -> ControlFlow<()> {
        let refused = self.shared.login_refused.load(Ordering::Acquire);
        if !refused && !self.shared.token.is_down() {
            let _ = self.reopen();
            if self.session.is_some() {
                return ControlFlow::Continue(());
            }
        }
        self.fail_queued(jobs);
        match control.recv_timeout(DOWN_POLL) {
            Ok(ctl) => self.on_control(ctl, jobs),
            Err(RecvTimeoutError::Timeout) => ControlFlow::Continue(()),
            Err(RecvTimeoutError::Disconnected) => ControlFlow::Break(()),
        }
    }

    /// Answer every queued job with a retryable error (the HSM cannot serve it now; waiting for
    /// the deadline would only make the caller's retry later).
    fn fail_queued(&self, jobs: &Receiver<Job>) {
        while let Ok(job) = jobs.try_recv() {
            self.shared.metrics.queue_depth.dec();
            self.shared.metrics.fail_fast.inc();
            job.work.fail(self.unavailable_error());
        }
    }

    fn unavailable_error(&self) -> CryptoError {
        if self.shared.login_refused.load(Ordering::Acquire) {
            self.login_refused_error()
        } else {
            CryptoError::HsmUnavailable("the HSM token is unavailable; recovering".to_owned())
        }
    }

    /// A session from before a token recovery is gone, and its handle number may belong to a
    /// newer session by now (SoftHSM, for one, reuses handle numbers): forget it, never close it.
    fn drop_stale_session(&mut self) {
        if self.session.is_some() && self.session_epoch != self.shared.token.epoch() {
            if let Some(owned) = self.session.take() {
                owned.forget();
            }
            self.state.mark_down(&self.shared);
        }
    }

    fn take(&mut self, job: Job) {
        self.shared.metrics.queue_depth.dec();
        let op = job.work.op();
        if Instant::now() >= job.deadline {
            // The caller has given up (or is about to): do not spend HSM time on it. Dropping the
            // job drops its reply channel.
            self.shared
                .metrics
                .op_error(op.as_str(), CryptoError::HsmTimeout.kind());
            return;
        }
        self.state.start_job(&self.shared);
        self.run_job(job.work);
        self.state.end_job();
    }

    fn run_job(&mut self, work: Work) {
        match work {
            Work::Encrypt {
                key,
                plaintext,
                aad,
                reply,
            } => {
                let mode = self.shared.gcm_iv;
                let r = self.with_key(Op::Encrypt, &key, |s, handle, _| {
                    gcm::encrypt(s, handle, &plaintext, &aad, mode)
                });
                let _ = reply.send(r);
            }
            Work::Decrypt {
                key,
                iv,
                mut ciphertext,
                tag,
                aad,
                reply,
            } => {
                let shared = Arc::clone(&self.shared);
                let r = self.with_key(Op::Decrypt, &key, |s, handle, _| {
                    gcm::decrypt(s, handle, &iv, &mut ciphertext, &tag, &aad)
                        .map_err(|fault| confirm_caller_fault(&shared, s, fault))
                });
                let _ = reply.send(r);
            }
            Work::Wrap {
                key,
                alg,
                path,
                plaintext,
                reply,
            } => {
                let r = self.with_key(Op::Wrap, &key, |s, handle, entry| {
                    keywrap::wrap(s, handle, entry.public, alg, path, &plaintext)
                });
                let _ = reply.send(r);
            }
            Work::Unwrap {
                key,
                alg,
                path,
                wrapped,
                reply,
            } => {
                let shared = Arc::clone(&self.shared);
                let r = self.with_key(Op::Unwrap, &key, |s, handle, _| {
                    keywrap::unwrap(s, handle, alg, path, &wrapped)
                        .map_err(|fault| confirm_caller_fault(&shared, s, fault))
                });
                let _ = reply.send(r);
            }
            Work::Random { len, reply } => {
                let r = self.with_session(Op::Random, |_, s| {
                    let mut out = vec![0u8; len];
                    s.generate_random_slice(&mut out)
                        .map_err(|e| map_ckr(Op::Random, &e))?;
                    Ok(out)
                });
                let _ = reply.send(r);
            }
            Work::Lookup { label, reply } => {
                let r = self.with_session(Op::FindKey, |shared, s| {
                    // Concurrent misses for one label: the first lookup serves the rest.
                    if let Some(fresh) = shared.keys.fresh(&label, shared.keys.generation()) {
                        return Ok(fresh);
                    }
                    if shared.keys.known_unknown(&label) {
                        return Err(Fault::plain(CryptoError::KeyNotFound));
                    }
                    // A logged-out session sees no private objects and would report "not found".
                    ensure_user(shared, s)?;
                    resolve_confirmed(shared, s, &label)
                });
                let _ = reply.send(r);
            }
            Work::TokenInfo { reply } => {
                let r = self.with_session(Op::TokenInfo, |shared, s| {
                    let state = s
                        .get_session_info()
                        .map_err(|e| map_ckr(Op::TokenInfo, &e))?
                        .session_state();
                    if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
                        // Logged out behind our back: let the recovery path log in again.
                        return Err(Fault {
                            error: not_logged_in(),
                            recovery: Recovery::ReopenSession,
                        });
                    }
                    let info = shared
                        .module
                        .ctx()
                        .get_token_info(shared.token.slot())
                        .map_err(|e| map_ckr(Op::TokenInfo, &e))?;
                    Ok(TokenSummary::from(&info))
                });
                let _ = reply.send(r);
            }
            Work::ListKeys { reply } => {
                let r = self.with_session(Op::ListKeys, |shared, s| {
                    ensure_user(shared, s)?;
                    let classes = [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY];
                    let found = keys::list(s, &classes, shared.keys.allow_exportable_keys())?;
                    Ok(found.into_iter().map(|(_, info)| info).collect())
                });
                let _ = reply.send(r);
            }
            Work::ReadState { reply } => {
                let r = self.with_session(Op::ReadState, |shared, s| {
                    // Logged out, the private state objects would be invisible: "nothing disabled".
                    ensure_user(shared, s)?;
                    state::read(s)
                });
                let _ = reply.send(r);
            }
            Work::Mac { key, data, reply } => {
                let r = self.with_key(Op::Mac, &key, |s, handle, _| {
                    mac::hmac_sha256(s, handle, &data)
                });
                let _ = reply.send(r);
            }
        }
    }

    /// Run `f` with this worker's session and the current handle of `key`, with the recovery the
    /// failure asks for and a retry. Refuses keys that fail the custody check.
    fn with_key<T>(
        &mut self,
        op: Op,
        key: &Arc<KeyEntry>,
        mut f: impl FnMut(&Session, ObjectHandle, &KeyEntry) -> Result<T, Fault>,
    ) -> Result<T, CryptoError> {
        let mut entry = Arc::clone(key);
        let mut force_refresh = false;
        // Taken out of `self` for the duration of the call (the retry loop borrows `self`).
        let mut copies = std::mem::take(&mut self.copies);
        let result = self.with_recovery(op, |shared, session| {
            let generation = shared.keys.generation();
            if force_refresh || entry.generation != generation {
                // Handles from before a reopen/re-login are suspect, and a handle the HSM just
                // refused is stale. A peer may have resolved the label again already; otherwise
                // look it up on this session.
                match shared.keys.fresh(&entry.info.label, generation) {
                    Some(fresh) if !force_refresh || fresh.handle != entry.handle => entry = fresh,
                    _ => {
                        shared.keys.invalidate(&entry.info.label);
                        let label = entry.info.label.clone();
                        entry = resolve_confirmed(shared, session, &label)?;
                    }
                }
                force_refresh = false;
            }
            if let Some(why) = &entry.info.custody_violation {
                return Err(Fault::plain(CryptoError::KeyDisabled(why.clone())));
            }
            let handle = if shared.session_key_copies {
                copies.handle_for(shared, session, &entry)
            } else {
                entry.handle
            };
            let result = f(session, handle, &entry);
            if matches!(
                result,
                Err(Fault {
                    recovery: Recovery::RefreshKey,
                    ..
                })
            ) {
                force_refresh = true;
            }
            result
        });
        self.copies = copies;
        result
    }

    fn with_session<T>(
        &mut self,
        op: Op,
        f: impl FnMut(&Shared, &Session) -> Result<T, Fault>,
    ) -> Result<T, CryptoError> {
        self.with_recovery(op, f)
    }

    /// The retry loop: each recovery the failure asks for is done at most once per job (so at
    /// most three attempts), and a lost session that comes back broken climbs to the supervisor.
    fn with_recovery<T>(
        &mut self,
        op: Op,
        mut f: impl FnMut(&Shared, &Session) -> Result<T, Fault>,
    ) -> Result<T, CryptoError> {
        let mut done: Vec<Recovery> = Vec::new();
        loop {
            let shared = Arc::clone(&self.shared);
            let fail = |e: CryptoError| {
                shared.metrics.op_error(op.as_str(), e.kind());
                Err(e)
            };
            if shared.token.is_down() {
                shared.metrics.fail_fast.inc();
                return fail(self.unavailable_error());
            }
            let Some(session) = self.session.as_ref().and_then(OwnedSession::session) else {
                return fail(self.unavailable_error());
            };
            let Some(guard) = shared.token.enter() else {
                // The supervisor is re-initialising the module.
                return fail(self.unavailable_error());
            };
            let timer = Instant::now();
            let result = f(&shared, session);
            drop(guard);
            shared.timers.get(op).observe(timer.elapsed().as_secs_f64());
            let fault = match result {
                Ok(v) => return Ok(v),
                Err(fault) => fault,
            };
            match fault.recovery {
                Recovery::None => return fail(fault.error),
                Recovery::RecoverToken => {
                    self.escalate(op, "the device reported the token lost");
                    return fail(fault.error);
                }
                Recovery::ReopenSession if done.contains(&Recovery::ReopenSession) => {
                    // The session was reopened and the failure is back: the problem is below the
                    // session (a vanished token store, a broken connection).
                    self.escalate(op, "the failure survived a session reopen");
                    return fail(fault.error);
                }
                recovery if done.contains(&recovery) || done.len() >= 2 => {
                    if recovery == Recovery::ResetOperation {
                        // Terminating the operation did not help: give later jobs a clean session.
                        let _ = self.recover_session();
                    }
                    if recovery == Recovery::RefreshKey {
                        // The key was just found again, yet its handle is refused: the HSM is
                        // inconsistent, not the key absent. Retryable, never "not found".
                        return fail(CryptoError::HsmUnavailable(
                            "the HSM keeps refusing the key's handle".to_owned(),
                        ));
                    }
                    return fail(fault.error);
                }
                recovery => {
                    done.push(recovery);
                    if let Err(e) = self.recover(recovery) {
                        return fail(e);
                    }
                }
            }
        }
    }

    /// Give up on the session and hand the token to the supervisor.
    fn escalate(&mut self, op: Op, why: &str) {
        tracing::debug!(
            worker = self.index,
            op = op.as_str(),
            why,
            "escalating to token recovery"
        );
        self.retire_session();
        self.shared.token.mark_down(&self.shared, why);
    }

    /// Bring the session back into a usable state for a retry.
    fn recover(&mut self, recovery: Recovery) -> Result<(), CryptoError> {
        match recovery {
            Recovery::None | Recovery::RecoverToken => Ok(()),
            Recovery::RefreshKey => {
                // A stale handle after a silent logout (SoftHSM drops private handles on logout):
                // log in again first, or the re-lookup would find nothing.
                let shared = Arc::clone(&self.shared);
                match self.session.as_ref().and_then(OwnedSession::session) {
                    Some(s) => match ensure_user(&shared, s) {
                        Ok(()) => Ok(()),
                        Err(fault) if fault.recovery == Recovery::ReopenSession => {
                            self.recover_session()
                        }
                        Err(fault) if fault.recovery == Recovery::RecoverToken => {
                            self.escalate(Op::Login, "the device reported the token lost");
                            Err(fault.error)
                        }
                        Err(fault) => Err(fault.error),
                    },
                    None => self.recover_session(),
                }
            }
            Recovery::ResetOperation => {
                if let Some(s) = self.session.as_ref().and_then(OwnedSession::session) {
                    // A call to C_*Final with a buffer ends whatever operation is active (the
                    // result itself is irrelevant).
                    let _ = s.decrypt_final();
                    let _ = s.encrypt_final();
                    return Ok(());
                }
                self.recover_session()
            }
            Recovery::ReopenSession => self.recover_session(),
        }
    }

    /// After a lost-session class error: log in again if only the login was lost, otherwise
    /// reopen (one immediate attempt; if it fails the token is handed to the supervisor).
    fn recover_session(&mut self) -> Result<(), CryptoError> {
        let shared = Arc::clone(&self.shared);
        if shared.login_refused.load(Ordering::Acquire) {
            self.close_session();
            return Err(self.login_refused_error());
        }
        if let Some(owned) = self.session.take() {
            match owned.session().map(Session::get_session_info) {
                Some(Ok(info))
                    if !matches!(
                        info.session_state(),
                        SessionState::RoUser | SessionState::RwUser
                    ) =>
                {
                    // The session survived, the login did not.
                    let relogin = owned.session().map(|s| login_if_needed(&shared, s));
                    match relogin {
                        Some(Ok(_)) => {
                            shared.keys.bump_generation();
                            shared.metrics.recovered(RecoveryLevel::Session.as_str());
                            tracing::info!(worker = self.index, "HSM login restored");
                            self.session = Some(owned);
                            return Ok(());
                        }
                        Some(Err(e)) if login_is_fatal(&e) => {
                            self.session = Some(owned);
                            self.refuse_login(&e);
                            return Err(self.login_refused_error());
                        }
                        _ => owned.close(),
                    }
                }
                // Alive and logged in, yet the device reported a loss: start afresh.
                Some(Ok(_)) => owned.close(),
                Some(Err(e)) => owned.dispose_after(&e),
                None => owned.forget(),
            }
            self.state.mark_down(&self.shared);
        }
        self.reopen()
    }

    /// Open a new session and log in. Counts a reopen; on failure hands the token to the
    /// supervisor (one prober for the whole pool, with backoff: no reopen storms).
    fn reopen(&mut self) -> Result<(), CryptoError> {
        if self.shared.login_refused.load(Ordering::Acquire) {
            return Err(self.login_refused_error());
        }
        let token = &self.shared.token;
        // Read the epoch after opening, under the call guard: no re-initialisation can happen
        // meanwhile (it waits for the guard), and a slot-level recovery that finished while we
        // were opening does not make this new session stale (reading before would, and the
        // session would then be forgotten, i.e. leaked).
        let (opened, epoch, generation) = match token.enter() {
            Some(_guard) => {
                let opened = open_logged_in(&self.shared);
                (opened, token.epoch(), token.module_generation())
            }
            None => return Err(self.unavailable_error()),
        };
        match opened {
            Ok(session) => {
                self.shared.metrics.session_reopens.inc();
                self.shared
                    .metrics
                    .recovered(RecoveryLevel::Session.as_str());
                self.session = Some(session);
                self.session_epoch = epoch;
                self.session_module_generation = generation;
                // New session, maybe a new login: cached handles are suspect.
                self.shared.keys.bump_generation();
                self.state.mark_up(&self.shared);
                tracing::debug!(worker = self.index, "HSM session reopened");
                Ok(())
            }
            Err(OpenError::LoginRefused(e)) if login_is_fatal(&e) => {
                self.refuse_login(&e);
                Err(self.login_refused_error())
            }
            Err(e) => {
                let e = e.into_inner();
                tracing::debug!(worker = self.index, ckr = %ck_error_name(&e), "HSM session reopen failed");
                self.shared
                    .token
                    .mark_down(&self.shared, "a session could not be reopened");
                Err(self.unavailable_error())
            }
        }
    }

    fn refuse_login(&mut self, e: &CkError) {
        if !self.shared.login_refused.swap(true, Ordering::AcqRel) {
            tracing::error!(
                token = %self.shared.token_label,
                ckr = %ck_error_name(e),
                "the HSM refused the user PIN; workers will not retry (that could lock the PIN); fix it and restart"
            );
        }
        if let Some(owned) = self.session.take() {
            owned.close();
            self.state.mark_down(&self.shared);
        }
    }

    fn login_refused_error(&self) -> CryptoError {
        CryptoError::HsmUnavailable("the HSM refused the user PIN".to_owned())
    }

    /// Close the session for real (the handle is known to be ours and valid).
    fn close_session(&mut self) {
        if let Some(owned) = self.session.take() {
            owned.close();
            self.state.mark_down(&self.shared);
        }
    }

    /// Let go of a session that may or may not still be valid: close it if the HSM still knows
    /// it (so nothing leaks on the token), forget it otherwise (never close a handle the HSM has
    /// dropped: the number may be someone else's now).
    fn retire_session(&mut self) {
        if let Some(owned) = self.session.take() {
            let token = &self.shared.token;
            let current = self.session_epoch == token.epoch()
                && self.session_module_generation == token.module_generation();
            match owned.session().map(Session::get_session_info) {
                _ if !current => owned.forget(),
                Some(Ok(_)) => owned.close(),
                Some(Err(e)) => owned.dispose_after(&e),
                None => owned.forget(),
            }
            self.state.mark_down(&self.shared);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.retire_session();
    }
}

/// A failed decrypt is the caller's ciphertext only if the session and the token still answer:
/// modules report a tag mismatch with the same codes (`CKR_GENERAL_ERROR`, ...) that a lost
/// session or a vanished token store produces, and telling a cloud its ciphertext is invalid is
/// permanent where "the HSM is unavailable" is retried. Two cheap calls, on the failure path only.
fn confirm_caller_fault(shared: &Shared, session: &Session, fault: Fault) -> Fault {
    if fault.error != CryptoError::InvalidCiphertext {
        return fault;
    }
    if let Err(e) = session.get_session_info() {
        return lost_after_decrypt(map_ckr(Op::TokenInfo, &e));
    }
    if let Err(e) = shared.module.ctx().get_token_info(shared.token.slot()) {
        return lost_after_decrypt(map_ckr(Op::TokenInfo, &e));
    }
    fault
}

/// The failure the health probe after a failed decrypt found, as a retryable one.
fn lost_after_decrypt(probe: Fault) -> Fault {
    match probe.recovery {
        Recovery::RecoverToken => probe,
        _ => Fault {
            error: CryptoError::HsmUnavailable("HSM session lost; reconnecting".to_owned()),
            recovery: Recovery::ReopenSession,
        },
    }
}

/// Resolve `label` on `session`; a miss is "not found" only when the token itself answers (a
/// search on a vanished token store finds nothing, which is no proof). A confirmed miss is
/// remembered for `negative_cache_ttl`.
fn resolve_confirmed(
    shared: &Shared,
    session: &Session,
    label: &str,
) -> Result<Arc<KeyEntry>, Fault> {
    match shared.keys.resolve(session, label) {
        Err(Fault {
            error: CryptoError::KeyNotFound,
            ..
        }) => {
            session
                .get_session_info()
                .map_err(|e| map_ckr(Op::TokenInfo, &e))?;
            shared
                .module
                .ctx()
                .get_token_info(shared.token.slot())
                .map_err(|e| map_ckr(Op::TokenInfo, &e))?;
            shared.keys.remember_unknown(label);
            Err(Fault::plain(CryptoError::KeyNotFound))
        }
        other => other,
    }
}

/// Make sure `session` is in a user state, logging in if the token forgot us.
fn ensure_user(shared: &Shared, session: &Session) -> Result<(), Fault> {
    match login_if_needed(shared, session) {
        Ok(true) => {
            shared.keys.bump_generation();
            tracing::info!("HSM login restored");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) if login_is_fatal(&e) => {
            shared.login_refused.store(true, Ordering::Release);
            tracing::error!(ckr = %ck_error_name(&e), "the HSM refused the user PIN; workers will not retry");
            // ReopenSession makes the worker close its session and stay down (see recover_session).
            Err(Fault {
                error: CryptoError::HsmUnavailable("the HSM refused the user PIN".to_owned()),
                recovery: Recovery::ReopenSession,
            })
        }
        Err(e) => match rv_of(&e) {
            Some(_) => Err(map_ckr(Op::Login, &e)),
            None => Err(Fault::plain(CryptoError::Internal(format!("login: {e}")))),
        },
    }
}

fn not_logged_in() -> CryptoError {
    CryptoError::HsmUnavailable("HSM session is not logged in; logging in again".to_owned())
}
