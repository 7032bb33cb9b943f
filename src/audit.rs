//! Audit events: one line per cryptographic decision (allowed, denied, failed), on their own
//! tracing target (`ekm_audit`) so operators can route them to a separate sink.
//!
//! A leaf module. Events carry who, which key, which operation, the outcome, the request id, the
//! rule that denied and the latency; never plaintext, key material, tokens or secrets. For key
//! operations the audit event is also the request's log line (one line per request, not two).

/// The tracing target of audit events.
pub const TARGET: &str = "ekm_audit";

/// One audit record.
#[derive(Debug, Clone, Copy)]
pub struct AuditEvent<'a> {
    /// Front end (`xks`, `gcp`, ...).
    pub front: &'a str,
    /// Key store or tenant the request was addressed to.
    pub tenant: &'a str,
    /// Operation name.
    pub op: &'a str,
    /// External key id.
    pub key: &'a str,
    /// Authenticated principal name (access key id, service account, certificate subject).
    pub principal: &'a str,
    /// The caller's request id (e.g. `kmsRequestId`).
    pub request_id: &'a str,
    /// `allow`, `deny` or `error`.
    pub decision: &'a str,
    /// Outcome detail: `ok`, an error kind, or the denial reason.
    pub outcome: &'a str,
    /// The policy rule that denied, if any.
    pub rule: Option<&'a str>,
    /// Time spent in the proxy, in microseconds.
    pub latency_us: u64,
}

/// Emit `event` on the audit target.
pub fn record(event: &AuditEvent<'_>) {
    tracing::info!(
        target: TARGET,
        front = event.front,
        tenant = event.tenant,
        op = event.op,
        key = event.key,
        principal = event.principal,
        request_id = ?event.request_id,
        decision = event.decision,
        outcome = event.outcome,
        rule = event.rule.unwrap_or(""),
        latency_us = event.latency_us,
        "audit"
    );
}
