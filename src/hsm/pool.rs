//! The worker pool: the worker threads, their control channels, the supervisor thread, and the
//! replacement of workers stuck in a PKCS#11 call.
//!
//! The backend owns one [`Pool`]; the supervisor holds it too, to replace hung workers. Stopping
//! is cooperative: every worker answers what is queued, closes its session and exits; a worker
//! that was given up on (hung) is not waited for.
//!
//! Must not depend on HTTP, wire formats or front ends.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::errors::HsmError;
use super::recovery::Supervisor;
use super::worker::{Control, Job, OwnedSession, Shared, Worker};

/// What the supervisor can see of one worker without talking to it.
#[derive(Default)]
pub(crate) struct WorkerState {
    /// When the current job started (nanoseconds since `Shared::clock_base`, plus one), 0 when idle.
    busy_since: AtomicU64,
    /// Given up on: exit as soon as the current call returns.
    abandoned: AtomicBool,
    /// Counted in `Shared::sessions_up` (and the sessions gauge).
    up: AtomicBool,
}

impl WorkerState {
    pub(crate) fn start_job(&self, shared: &Shared) {
        let now = shared.clock_base.elapsed().as_nanos() as u64;
        self.busy_since
            .store(now.saturating_add(1), Ordering::Release);
    }

    pub(crate) fn end_job(&self) {
        self.busy_since.store(0, Ordering::Release);
    }

    pub(crate) fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Count this worker's session as up (idempotent).
    pub(crate) fn mark_up(&self, shared: &Shared) {
        if !self.up.swap(true, Ordering::AcqRel) {
            shared.sessions_up.fetch_add(1, Ordering::AcqRel);
            shared.metrics.sessions.inc();
        }
    }

    /// Count this worker's session as down (idempotent).
    pub(crate) fn mark_down(&self, shared: &Shared) {
        if self.up.swap(false, Ordering::AcqRel) {
            shared.sessions_up.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.sessions.dec();
        }
    }
}

struct WorkerHandle {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
    state: Arc<WorkerState>,
}

/// The worker threads and the supervisor.
pub(crate) struct Pool {
    handles: Mutex<Vec<WorkerHandle>>,
    jobs: Receiver<Job>,
    stopping: AtomicBool,
    next_index: AtomicUsize,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// Start one worker per session (already opened and logged in) and the supervisor.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        sessions: Vec<OwnedSession>,
        jobs: Receiver<Job>,
    ) -> Result<Arc<Self>, HsmError> {
        let pool = Arc::new(Pool {
            handles: Mutex::new(Vec::with_capacity(sessions.len())),
            jobs,
            stopping: AtomicBool::new(false),
            next_index: AtomicUsize::new(0),
            supervisor: Mutex::new(None),
        });
        for session in sessions {
            if let Err(e) = pool.spawn(shared, Some(session)) {
                pool.stop(shared);
                return Err(e);
            }
        }
        let supervisor = Supervisor::new(Arc::clone(shared), Arc::clone(&pool));
        match std::thread::Builder::new()
            .name("hsm-supervisor".to_owned())
            .spawn(move || supervisor.run())
        {
            Ok(thread) => *lock(&pool.supervisor) = Some(thread),
            Err(e) => {
                pool.stop(shared);
                return Err(HsmError::Thread(e.to_string()));
            }
        }
        Ok(pool)
    }

    /// Start a worker thread (with a session, or without one: it opens its own).
    fn spawn(&self, shared: &Arc<Shared>, session: Option<OwnedSession>) -> Result<(), HsmError> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let (control_tx, control_rx) = crossbeam_channel::unbounded::<Control>();
        let state = Arc::new(WorkerState::default());
        let worker = Worker::new(index, session, Arc::clone(shared), Arc::clone(&state));
        let jobs = self.jobs.clone();
        let thread = std::thread::Builder::new()
            .name(format!("hsm-worker-{index}"))
            .spawn(move || worker.run(jobs, control_rx))
            .map_err(|e| HsmError::Thread(e.to_string()))?;
        lock(&self.handles).push(WorkerHandle {
            control: control_tx,
            thread: Some(thread),
            state,
        });
        Ok(())
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Control channels of the live workers.
    pub(crate) fn controls(&self) -> Vec<Sender<Control>> {
        lock(&self.handles)
            .iter()
            .map(|w| w.control.clone())
            .collect()
    }

    /// Give up on workers stuck in one call past `hung_call_limit` and start fresh ones.
    pub(crate) fn replace_hung_workers(&self, shared: &Arc<Shared>) {
        let limit = shared.hung_call_limit;
        if limit.is_zero() || self.is_stopping() {
            return;
        }
        let now = shared.clock_base.elapsed().as_nanos() as u64;
        let limit_nanos = limit.as_nanos() as u64;
        let hung: Vec<WorkerHandle> = {
            let mut handles = lock(&self.handles);
            let (hung, alive): (Vec<_>, Vec<_>) = handles.drain(..).partition(|w| {
                let since = w.state.busy_since.load(Ordering::Acquire);
                since != 0 && now.saturating_sub(since - 1) > limit_nanos
            });
            *handles = alive;
            hung
        };
        for mut w in hung {
            w.state.abandoned.store(true, Ordering::Release);
            w.state.mark_down(shared);
            // Detach: the thread exits by itself if the call ever returns.
            w.thread.take();
            shared.metrics.workers_replaced.inc();
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "an HSM worker is stuck in a PKCS#11 call; replacing it with a fresh worker"
            );
            if let Err(e) = self.spawn(shared, None) {
                tracing::error!(error = %e, "could not start a replacement HSM worker");
            }
        }
    }

    /// Stop the supervisor and every worker; each worker answers what is queued, closes its
    /// session and exits. Blocks until they have (hung workers were detached and are not waited
    /// for). Idempotent.
    pub(crate) fn stop(&self, shared: &Shared) {
        self.stopping.store(true, Ordering::Release);
        shared.token.wake_supervisor();
        if let Some(thread) = lock(&self.supervisor).take()
            && thread.join().is_err()
        {
            tracing::error!("the HSM supervisor thread panicked");
        }
        let mut workers = std::mem::take(&mut *lock(&self.handles));
        for w in &workers {
            let _ = w.control.send(Control::Stop);
        }
        for w in &mut workers {
            if let Some(thread) = w.thread.take()
                && thread.join().is_err()
            {
                tracing::error!("an HSM worker thread panicked");
            }
        }
    }
}
