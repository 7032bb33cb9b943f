//! The top rungs of the recovery ladder (DESIGN.md §4) and the token state every worker and the
//! backend consult.
//!
//! Workers climb the bottom rungs themselves: refresh a stale key handle, end a stuck operation,
//! log in again, reopen their own session. When a session cannot be reopened, when a
//! `CKR_GENERAL_ERROR` survives a reopen, or when the device itself reports a loss
//! (`CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, ...), a worker marks the token **down**, drops its
//! session and waits. From then on one supervisor thread is the only thing that touches the HSM,
//! so an error storm never turns into a reopen storm:
//!
//! 1. **slot**: find the token again by label or serial (slot numbers move after a reboot or a
//!    fail-over) and open a logged-in probe session on it;
//! 2. **module**: if that fails, stop the workers' calls, `C_Finalize` + `C_Initialize` the module
//!    (client libraries that lost their connection often recover only this way) and try rung 1.
//!
//! Each failed attempt doubles the wait (with jitter) up to `recovery_backoff_max`. On success the
//! supervisor reloads the key cache (handles change after a re-initialisation), bumps the epoch so
//! workers drop sessions from before, and releases them. Meanwhile callers fail fast with
//! `HsmUnavailable`, the protocols' retryable error, and health reports UNAVAILABLE. One log line
//! per transition (down, each failed attempt while backing off at debug, up), a metric per rung.
//!
//! The supervisor also watches for workers stuck in one PKCS#11 call longer than
//! `hung_call_limit`: such a worker is given up on (its caller got `HsmTimeout` at its deadline
//! already) and a fresh worker takes its place, so a hung call never costs the pool a worker for
//! good. The stuck thread exits by itself if the call ever returns.
//!
//! Must not depend on HTTP, wire formats or front ends.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::slot::Slot;

use super::errors::{RecoveryLevel, ck_error_name, login_is_fatal};
use super::pool::Pool;
use super::worker::{Control, OpenError, Shared, open_logged_in_on};

/// How long the supervisor waits for workers to leave their PKCS#11 calls before re-initialising
/// the module. A worker still inside a call after this is presumed hung: re-initialising under it
/// would be undefined behaviour for some modules, so the attempt is skipped and retried later.
const PAUSE_WAIT: Duration = Duration::from_secs(2);
/// How often the supervisor looks for hung workers when nothing else wakes it.
const TICK: Duration = Duration::from_millis(250);

/// Shared, lock-free view of the token's state.
pub(crate) struct TokenState {
    slot: Mutex<Slot>,
    /// Bumped on every token-level recovery: sessions opened in an older epoch are gone.
    epoch: AtomicU64,
    /// Bumped on every module re-initialisation: session handles from before may have been reused
    /// by new sessions, so they are forgotten, never closed.
    module_generation: AtomicU64,
    down: AtomicBool,
    /// Set while the supervisor re-initialises the module: workers start no PKCS#11 call.
    pausing: AtomicBool,
    /// Workers inside a PKCS#11 call right now.
    in_call: AtomicUsize,
    /// Wakes the supervisor (a worker escalated, or stop).
    wake: (Mutex<bool>, Condvar),
    down_since: Mutex<Option<Instant>>,
}

/// Proof that a worker may run a PKCS#11 call (the module is not being re-initialised).
pub(crate) struct CallGuard<'a>(&'a TokenState);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.in_call.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TokenState {
    pub(crate) fn new(slot: Slot) -> Self {
        Self {
            slot: Mutex::new(slot),
            epoch: AtomicU64::new(0),
            module_generation: AtomicU64::new(0),
            down: AtomicBool::new(false),
            pausing: AtomicBool::new(false),
            in_call: AtomicUsize::new(0),
            wake: (Mutex::new(false), Condvar::new()),
            down_since: Mutex::new(None),
        }
    }

    /// The slot the token is in now.
    pub(crate) fn slot(&self) -> Slot {
        *lock(&self.slot)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn module_generation(&self) -> u64 {
        self.module_generation.load(Ordering::Acquire)
    }

    /// The token is lost and being recovered: fail fast.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Enter a PKCS#11 call, unless the module is being re-initialised. Dekker-style: count
    /// first, then look at the flag, so the supervisor (flag first, then count) never misses a
    /// call in progress.
    pub(crate) fn enter(&self) -> Option<CallGuard<'_>> {
        self.in_call.fetch_add(1, Ordering::SeqCst);
        let guard = CallGuard(self);
        if self.pausing.load(Ordering::SeqCst) {
            return None;
        }
        Some(guard)
    }

    /// Mark the token lost (the first caller logs the transition) and wake the supervisor.
    pub(crate) fn mark_down(&self, shared: &Shared, why: &str) {
        if !self.down.swap(true, Ordering::AcqRel) {
            *lock(&self.down_since) = Some(Instant::now());
            shared.metrics.token_down.set(1);
            tracing::warn!(
                token = %shared.token_label,
                reason = why,
                "HSM token lost: failing requests fast while the supervisor recovers it"
            );
        }
        let (flag, cv) = &self.wake;
        *lock(flag) = true;
        cv.notify_all();
    }

    /// Wake the supervisor (stop, or a worker escalated).
    pub(crate) fn wake_supervisor(&self) {
        let (flag, cv) = &self.wake;
        *lock(flag) = true;
        cv.notify_all();
    }

    fn sleep_supervisor(&self, timeout: Duration) {
        let (flag, cv) = &self.wake;
        let mut woken = lock(flag);
        if !*woken {
            woken = cv
                .wait_timeout(woken, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *woken = false;
    }

    /// Mark the token back: new epoch; waiting workers notice within their poll interval.
    fn mark_up(&self, shared: &Shared, slot: Slot, level: RecoveryLevel) {
        *lock(&self.slot) = slot;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let since = lock(&self.down_since).take();
        self.down.store(false, Ordering::Release);
        shared.metrics.token_down.set(0);
        shared.metrics.recovered(level.as_str());
        tracing::info!(
            token = %shared.token_label,
            slot = slot.id(),
            level = level.as_str(),
            down_ms = since.map_or(0, |t| t.elapsed().as_millis() as u64),
            "HSM token recovered"
        );
    }

    /// Stop new calls and wait (bounded) until none is in progress.
    fn pause(&self) -> bool {
        self.pausing.store(true, Ordering::SeqCst);
        let started = Instant::now();
        while self.in_call.load(Ordering::SeqCst) > 0 {
            if started.elapsed() > PAUSE_WAIT {
                self.pausing.store(false, Ordering::SeqCst);
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn resume(&self) {
        self.pausing.store(false, Ordering::SeqCst);
    }
}

/// The supervisor thread's state.
pub(crate) struct Supervisor {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    backoff: Duration,
    next_attempt: Instant,
    failures: u64,
}

impl Supervisor {
    pub(crate) fn new(shared: Arc<Shared>, pool: Arc<Pool>) -> Self {
        let backoff = shared.recovery_backoff_initial;
        Self {
            shared,
            pool,
            backoff,
            next_attempt: Instant::now(),
            failures: 0,
        }
    }

    /// The thread body: until the pool stops.
    pub(crate) fn run(mut self) {
        tracing::debug!("HSM supervisor started");
        while !self.pool.is_stopping() {
            let token = &self.shared.token;
            let wait = if token.is_down() {
                self.next_attempt
                    .saturating_duration_since(Instant::now())
                    .min(TICK)
            } else {
                TICK
            };
            token.sleep_supervisor(wait);
            if self.pool.is_stopping() {
                break;
            }
            self.pool.replace_hung_workers(&self.shared);
            let refused = self.shared.login_refused.load(Ordering::Acquire);
            if token.is_down() && !refused && Instant::now() >= self.next_attempt {
                self.attempt();
            }
        }
        tracing::debug!("HSM supervisor stopped");
    }

    /// One climb of the ladder.
    fn attempt(&mut self) {
        let shared = Arc::clone(&self.shared);
        // Workers let go of their sessions when they see the token down; wait for that (bounded:
        // a worker stuck in a call cannot), so no new session is handed the number of a session
        // a worker still holds.
        for control in self.pool.controls() {
            let _ = control.send(Control::Wake);
        }
        let started = Instant::now();
        while shared.sessions_up.load(Ordering::Acquire) > 0 && started.elapsed() < PAUSE_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Rung 1: find the token again (maybe in another slot) and prove a session can be opened.
        let outcome = match self.probe() {
            Ok(slot) => Ok((slot, RecoveryLevel::Slot)),
            Err(first) => {
                // Rung 2: re-initialise the module, then try again.
                match self.reinitialize() {
                    Ok(()) => self
                        .probe()
                        .map(|slot| (slot, RecoveryLevel::Module))
                        .map_err(|e| format!("{first}; after re-initialising the module: {e}")),
                    Err(e) => Err(format!("{first}; {e}")),
                }
            }
        };
        match outcome {
            Ok((slot, level)) => {
                self.backoff = shared.recovery_backoff_initial;
                self.failures = 0;
                shared.token.mark_up(&shared, slot, level);
            }
            Err(why) => {
                self.failures += 1;
                shared.metrics.recovery_failures.inc();
                // Jitter (up to a quarter of the wait) so a fleet does not hammer a recovering HSM
                // in lockstep; derived from the clock, good enough for spreading.
                let nanos = u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0),
                );
                let quarter = (self.backoff.as_millis() as u64 / 4).max(1);
                let jitter = Duration::from_millis(nanos % quarter);
                let wait = self.backoff + jitter;
                self.next_attempt = Instant::now() + wait;
                if self.failures == 1 {
                    tracing::warn!(token = %shared.token_label, error = %why, retry_in_ms = wait.as_millis() as u64, "HSM recovery attempt failed; backing off");
                } else {
                    tracing::debug!(token = %shared.token_label, error = %why, attempt = self.failures, retry_in_ms = wait.as_millis() as u64, "HSM recovery attempt failed");
                }
                self.backoff = self
                    .backoff
                    .saturating_mul(2)
                    .min(shared.recovery_backoff_max);
            }
        }
    }

    /// Find the token, open a logged-in session on it and reload the key cache with it.
    fn probe(&self) -> Result<Slot, String> {
        let shared = &self.shared;
        let (slot, _) = shared
            .module
            .find_token(&shared.selector)
            .map_err(|e| e.to_string())?;
        let session = open_logged_in_on(shared, slot).map_err(|e| match e {
            OpenError::Pkcs11(e) => format!("opening a session: {}", ck_error_name(&e)),
            OpenError::LoginRefused(e) => {
                if login_is_fatal(&e) && !shared.login_refused.swap(true, Ordering::AcqRel) {
                    // Never again: retrying a wrong PIN walks the token towards a lockout.
                    tracing::error!(token = %shared.token_label, ckr = %ck_error_name(&e), "the HSM refused the user PIN while recovering; no further attempts (fix it and restart)");
                }
                format!("login refused: {}", ck_error_name(&e))
            }
        })?;
        let result = match session.session() {
            Some(s) => {
                // Handles may have changed (always after a re-initialisation): start afresh.
                shared.keys.reset();
                shared
                    .keys
                    .warm(s)
                    .map(|_| ())
                    .map_err(|f| format!("reloading the key cache: {}", f.error))
            }
            None => Err("no session".to_owned()),
        };
        session.close();
        result.map(|()| slot)
    }

    /// `C_Finalize` + `C_Initialize`, with every worker out of its calls.
    fn reinitialize(&self) -> Result<(), String> {
        let token = &self.shared.token;
        if !token.pause() {
            return Err("a worker is stuck in a PKCS#11 call; not re-initialising under it".into());
        }
        // Every session of this process dies here: workers must forget theirs, never close them.
        token.module_generation.fetch_add(1, Ordering::AcqRel);
        token.epoch.fetch_add(1, Ordering::AcqRel);
        let result = self.shared.module.reinitialize().map_err(|e| e.to_string());
        token.resume();
        result
    }
}
