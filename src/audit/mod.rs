//! Audit events: one line per cryptographic decision (allowed, denied, failed) and per fleet
//! state change.
//!
//! With `logging.audit_file` they go to a tamper-evident chain ([`sink`], format in [`chain`],
//! checked by [`verify`]): numbered, hash-linked JSON lines with HMAC checkpoints made in the HSM.
//! Without it they are events on their own tracing target (`ekm_audit`) in the operational log.
//! [`Audit`] is the handle the composition root gives the front ends.
//!
//! A leaf module (it uses `metrics` for its counters). Events carry who, which key, which
//! operation, the outcome, the request id, the rule that denied and the latency; never plaintext,
//! key material, tokens or secrets. For key operations the audit event is also the request's log
//! line (one line per request, not two).

pub mod chain;
pub mod sink;
pub mod verify;

use std::sync::Arc;

use serde::Serialize;

use sink::ChainSink;

/// The tracing target of audit events.
pub const TARGET: &str = "ekm_audit";

/// Where audit events go, and whether a key operation may complete when its event cannot be
/// written. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    chain: Option<Arc<ChainSink>>,
    required: bool,
}

/// The audit event could not be written and `logging.audit_required` is set: the request must
/// fail (closed) rather than complete unrecorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrecorded;

impl Audit {
    /// Events as tracing events on [`TARGET`] (no audit file).
    pub fn to_log() -> Self {
        Self::default()
    }

    /// Events into the chained file; with `required`, a failed write fails the request.
    pub fn to_chain(sink: Arc<ChainSink>, required: bool) -> Self {
        Self {
            chain: Some(sink),
            required,
        }
    }

    /// The chained file, if any (for checkpoints and rotation).
    pub fn chain(&self) -> Option<&Arc<ChainSink>> {
        self.chain.as_ref()
    }

    /// Record one decision. `Err` only when the event could not be written and writing it is
    /// required.
    pub fn record(&self, event: &AuditEvent<'_>) -> Result<(), Unrecorded> {
        match &self.chain {
            None => {
                record(event);
                Ok(())
            }
            Some(sink) => self.write(sink, &DecisionLine::new(event)),
        }
    }

    /// Record a fleet state change a replica observed (who made it comes from the HSM record).
    pub fn record_state(&self, event: &StateEvent<'_>) -> Result<(), Unrecorded> {
        match &self.chain {
            None => {
                tracing::info!(
                    target: TARGET,
                    change = event.change,
                    target_name = %bounded(event.target),
                    by = %bounded(event.by),
                    at = event.at,
                    reason = %bounded(event.reason),
                    "state change"
                );
                Ok(())
            }
            Some(sink) => {
                let ts = chain::now_rfc3339();
                self.write(
                    sink,
                    &StateLine {
                        ts: &ts,
                        kind: chain::kind::STATE,
                        change: event.change,
                        target: &bounded(event.target),
                        by: &bounded(event.by),
                        at: event.at,
                        reason: &bounded(event.reason),
                    },
                )
            }
        }
    }

    fn write<T: Serialize>(&self, sink: &ChainSink, line: &T) -> Result<(), Unrecorded> {
        match sink.append(line) {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::error!(file = %sink.path().display(), error = %e, required = self.required, "audit line could not be written");
                if self.required {
                    Err(Unrecorded)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A fleet state change for the audit trail.
#[derive(Debug, Clone, Copy)]
pub struct StateEvent<'a> {
    /// `set` (disabled / engaged) or `cleared` (enabled / released).
    pub change: &'a str,
    /// The target's label (`key:dev-aes-1`, `keystore:xks:dev`, `killswitch`).
    pub target: &'a str,
    /// Who made the change (from the state record).
    pub by: &'a str,
    /// When, seconds since the epoch (from the state record).
    pub at: u64,
    /// Why (from the state record).
    pub reason: &'a str,
}

#[derive(Serialize)]
struct StateLine<'a> {
    ts: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    change: &'a str,
    target: &'a str,
    by: &'a str,
    at: u64,
    reason: &'a str,
}

/// A decision as a chain line (caller-supplied strings bounded).
#[derive(Serialize)]
struct DecisionLine<'a> {
    ts: String,
    #[serde(rename = "type")]
    kind: &'static str,
    front: &'a str,
    tenant: std::borrow::Cow<'a, str>,
    op: &'a str,
    key: std::borrow::Cow<'a, str>,
    principal: std::borrow::Cow<'a, str>,
    request_id: std::borrow::Cow<'a, str>,
    decision: &'a str,
    outcome: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    justification: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<std::borrow::Cow<'a, str>>,
    latency_us: u64,
}

impl<'a> DecisionLine<'a> {
    fn new(e: &AuditEvent<'a>) -> Self {
        // JSON escaping makes any string safe in a line; only the length needs bounding.
        let opt = |v: Option<&'a str>| v.map(bounded);
        Self {
            ts: chain::now_rfc3339(),
            kind: chain::kind::DECISION,
            front: e.front,
            tenant: bounded(e.tenant),
            op: e.op,
            key: bounded(e.key),
            principal: bounded(e.principal),
            request_id: bounded(e.request_id),
            decision: e.decision,
            outcome: bounded(e.outcome),
            rule: opt(e.rule),
            grant: opt(e.grant),
            justification: opt(e.justification),
            resource: opt(e.resource),
            correlation_id: opt(e.correlation_id),
            pool: opt(e.pool),
            latency_us: e.latency_us,
        }
    }
}

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
    /// The caller's correlation id, where the protocol has one besides the request id (Azure).
    pub correlation_id: Option<&'a str>,
    /// The caller's pool or tenant name, where the protocol names one (Azure `pool_name`).
    pub pool: Option<&'a str>,
    /// Time spent in the proxy, in microseconds.
    pub latency_us: u64,
}

/// The most bytes of one caller-supplied string written into a log or audit field.
pub const MAX_LOGGED_BYTES: usize = 256;

/// The marker appended to a string cut to [`MAX_LOGGED_BYTES`].
pub const TRUNCATED_MARKER: &str = "…[truncated]";

/// `text` as it may appear in a log or audit field: unchanged up to [`MAX_LOGGED_BYTES`],
/// otherwise cut on a character boundary and marked with [`TRUNCATED_MARKER`]. Every string that
/// reaches a log line from a caller goes through this (a 200 KB request id must not become a
/// 200 KB audit line).
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_LOGGED_BYTES {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = MAX_LOGGED_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{TRUNCATED_MARKER}", &text[..end]))
}

/// Emit `event` on the audit target (the operational log).
fn record(event: &AuditEvent<'_>) {
    let opt = |v: Option<&'_ str>| v.map(|v| bounded(v).into_owned());
    let (grant, justification, resource) = (
        opt(event.grant),
        opt(event.justification),
        opt(event.resource),
    );
    let (correlation_id, pool) = (opt(event.correlation_id), opt(event.pool));
    tracing::info!(
        target: TARGET,
        front = event.front,
        tenant = %bounded(event.tenant),
        op = event.op,
        key = %bounded(event.key),
        principal = %bounded(event.principal),
        request_id = %LogSafe(event.request_id),
        decision = event.decision,
        outcome = %bounded(event.outcome),
        rule = %bounded(event.rule.unwrap_or("")),
        grant = grant.as_deref(),
        justification = justification.as_deref(),
        resource = resource.as_deref(),
        correlation_id = correlation_id.as_deref().map(|v| tracing::field::display(LogSafe(v))),
        pool = pool.as_deref().map(|v| tracing::field::display(LogSafe(v))),
        latency_us = event.latency_us,
        "audit"
    );
}

/// Caller-supplied text for a log field, bounded by [`bounded`]: written as is when it is plain
/// printable ASCII (so the value matches the id the caller sees), otherwise in escaped form so it
/// cannot forge log lines.
pub struct LogSafe<'a>(pub &'a str);

impl std::fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = bounded(self.0);
        if self.0.bytes().all(|b| b.is_ascii_graphic()) {
            f.write_str(&text)
        } else {
            write!(f, "{:?}", &*text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogSafe;

    #[test]
    fn long_strings_are_cut_on_a_char_boundary_and_marked() {
        use super::{MAX_LOGGED_BYTES, TRUNCATED_MARKER, bounded};
        let short = "x".repeat(MAX_LOGGED_BYTES);
        assert_eq!(bounded(&short), short.as_str());
        let long = "y".repeat(200 * 1024);
        let cut = bounded(&long);
        assert_eq!(cut.len(), MAX_LOGGED_BYTES + TRUNCATED_MARKER.len());
        assert!(cut.ends_with(TRUNCATED_MARKER));
        // 'é' is two bytes: 255 'a' then 'é' straddles the limit and must not be split.
        let straddle = format!("{}é{}", "a".repeat(MAX_LOGGED_BYTES - 1), "b".repeat(10));
        let cut = bounded(&straddle);
        assert_eq!(
            cut,
            format!("{}{TRUNCATED_MARKER}", "a".repeat(MAX_LOGGED_BYTES - 1))
        );
        assert!(LogSafe(&long).to_string().len() < MAX_LOGGED_BYTES + 32);
        assert!(LogSafe(&format!("\n{long}")).to_string().len() < MAX_LOGGED_BYTES + 40);
    }

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
