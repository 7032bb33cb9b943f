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
    /// The grant that allowed, where the front has named grants (Cloud EKM).
    pub grant: Option<&'a str>,
    /// The caller's access justification, where the protocol has one (Cloud EKM KAJ reason).
    pub justification: Option<&'a str>,
    /// The caller's resource using the key (e.g. a Cloud KMS key version), when given.
    pub resource: Option<&'a str>,
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
        request_id = %LogSafe(event.request_id),
        decision = event.decision,
        outcome = event.outcome,
        rule = event.rule.unwrap_or(""),
        grant = event.grant,
        justification = event.justification,
        resource = event.resource,
        latency_us = event.latency_us,
        "audit"
    );
}

/// Caller-supplied text for a log field: written as is when it is plain printable ASCII (so the
/// value matches the id the caller sees), otherwise in escaped form so it cannot forge log lines.
struct LogSafe<'a>(&'a str);

impl std::fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.bytes().all(|b| b.is_ascii_graphic()) {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogSafe;

    #[test]
    fn plain_ids_are_written_as_is_and_others_escaped() {
        assert_eq!(LogSafe("gcp-1a2b-7").to_string(), "gcp-1a2b-7");
        assert_eq!(
            LogSafe("x\naudit decision=allow").to_string(),
            "\"x\\naudit decision=allow\""
        );
        assert_eq!(LogSafe("a b").to_string(), "\"a b\"");
        assert_eq!(LogSafe("id\n").to_string(), "\"id\\n\"");
    }
}
