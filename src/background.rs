//! Background work the composition root starts beside the listeners: reading the fleet state
//! from the HSM every `security.state_poll_secs` (and auditing what changed), and writing the
//! audit chain's checkpoints (MAC made in the HSM) at least once a second, at rotation and at
//! shutdown.
//!
//! Depends on `core` (through [`KeyService`] and the [`Backend`] seam), `audit` and `metrics`;
//! never on HTTP, wire formats or PKCS#11 types.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::chain::{self, checkpoint_message};
use crate::audit::sink::ChainSink;
use crate::audit::{Audit, StateEvent};
use crate::core::state::{FleetState, StateChange, StateTarget};
use crate::core::{Backend, KeyService};
use crate::metrics::{AuditMetrics, FleetMetrics};

/// Read the fleet state once and adopt it; audit every change since the last read. Returns
/// whether the read succeeded.
pub async fn refresh_fleet_state<B: Backend>(
    service: &KeyService<B>,
    audit: &Audit,
    metrics: &FleetMetrics,
) -> bool {
    match service.backend().fleet_state().await {
        Ok(marks) => {
            let state = FleetState::from_marks(marks);
            let (keys, stores, kill) = state.counts();
            let first = !service.fleet_state().loaded;
            let changes = service.set_fleet_state(state);
            metrics.read(true, keys, stores);
            metrics.kill_switch("fleet", kill);
            if first {
                tracing::info!(
                    disabled_keys = keys,
                    disabled_key_stores = stores,
                    kill_switch = kill,
                    "fleet state read from the HSM"
                );
            }
            for change in &changes {
                log_and_audit(change, audit);
            }
            true
        }
        Err(e) => {
            metrics.read(false, 0, 0);
            tracing::warn!(error = %e, "cannot read the fleet state from the HSM; keeping the last one read");
            false
        }
    }
}

fn log_and_audit(change: &StateChange, audit: &Audit) {
    let (verb, mark) = match change {
        StateChange::Set(m) => ("set", m),
        StateChange::Cleared(m) => ("cleared", m),
    };
    let label = mark.target.label();
    let what = match (&mark.target, verb) {
        (StateTarget::KillSwitch, "set") => {
            "kill switch ENGAGED fleet-wide: every key operation is refused"
        }
        (StateTarget::KillSwitch, _) => "fleet kill switch released",
        (_, "set") => "disabled fleet-wide",
        _ => "enabled fleet-wide",
    };
    // Who and why are the operator's record; the release names the record that was removed.
    tracing::warn!(target_name = %label, by = %mark.record.by, reason = %mark.record.reason, "{what}");
    let event = StateEvent {
        change: verb,
        target: &label,
        by: &mark.record.by,
        at: mark.record.at,
        reason: &mark.record.reason,
    };
    // Not a request: a failed write is counted and logged by the audit module; nothing to refuse.
    let _ = audit.record_state(&event);
}

/// How soon a replica that has not read the fleet state yet tries again (at most `interval`):
/// it refuses key operations until it has.
const UNLOADED_RETRY: Duration = Duration::from_secs(1);

/// Poll the fleet state every `interval` (every [`UNLOADED_RETRY`] until a first read
/// succeeded) until `stop` resolves.
pub async fn poll_fleet_state<B: Backend>(
    service: Arc<KeyService<B>>,
    audit: Audit,
    metrics: FleetMetrics,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let wait = if service.fleet_state().loaded {
            interval
        } else {
            interval.min(UNLOADED_RETRY)
        };
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
        refresh_fleet_state(&service, &audit, &metrics).await;
    }
}

/// How the checkpoint task reaches the HSM.
pub struct Checkpointer<B: Backend> {
    /// The backend whose HSM holds the key.
    pub backend: Arc<B>,
    /// The chained file.
    pub sink: Arc<ChainSink>,
    /// The HMAC key's label.
    pub key: String,
    /// Counters.
    pub metrics: AuditMetrics,
    /// This replica's name, for rotation lines.
    pub instance: String,
}

impl<B: Backend> Checkpointer<B> {
    /// Write a checkpoint if anything was written since the last one. `Ok(false)`: nothing to
    /// cover.
    pub async fn checkpoint(&self) -> Result<bool, String> {
        let Some(head) = self.sink.pending() else {
            return Ok(false);
        };
        let ts = chain::now_rfc3339();
        let msg = checkpoint_message(head.seq, &head.hash, &ts);
        let result = match self.backend.hmac_sha256(&self.key, msg).await {
            Ok(mac) => self
                .sink
                .write_checkpoint(head, &ts, &self.key, &mac)
                .map(|_| true)
                .map_err(|e| format!("cannot write the checkpoint: {e}")),
            Err(e) => Err(format!(
                "the HSM could not MAC the chain head with '{}': {e}",
                self.key
            )),
        };
        self.metrics.checkpoint(result.is_ok());
        result
    }

    /// Checkpoint, then rotate when the file is due (the old file ends covered).
    pub async fn tick(&self) {
        match self.checkpoint().await {
            // The new file's first line waits for the next tick's checkpoint.
            Ok(_) if self.sink.rotation_due() => {
                if let Err(e) = self.sink.rotate(&self.instance) {
                    tracing::error!(error = %e, "audit file rotation failed; still writing the current file");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint failed; lines since the last one stay unprotected until one succeeds")
            }
        }
    }

    /// Run every `interval` until `stop` resolves, then write a last checkpoint and sync.
    pub async fn run(self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(interval) => {}
            }
            self.tick().await;
        }
        self.finish().await;
    }

    /// The shutdown checkpoint and `fsync`.
    pub async fn finish(&self) {
        if let Err(e) = self.checkpoint().await {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
        if let Err(e) = self.sink.sync() {
            tracing::error!(error = %e, "cannot sync the audit file");
        }
    }
}
