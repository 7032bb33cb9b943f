//! The request pipeline the front ends share: the per-request span, the bounded decoding of
//! binary fields, JSON parsing with a caller-safe message, and the end of every request (one
//! metric observation and one log line, which for a key operation is its audit event).
//!
//! A front supplies routing, its wire types and its one error mapping; it learns the request's
//! facts (tenant, key, principal, request id) before it runs the operation, so the operation
//! returns a plain `Result` and nothing flows back up beside it.
//!
//! It also holds the one place a request meets its rate quota ([`admit`]): right after
//! authentication, before the body is parsed, in every front.
//!
//! Depends on `audit`, `metrics`, `core::quota` and the `base64`/`serde_json` crates; never on
//! `hsm`, `core`'s backend or a particular front.

use std::time::Instant;

use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::audit::{self, Audit, AuditEvent, LogSafe, Unrecorded};
use crate::core::quota::{Quotas, Throttled, TokenBucket};
use crate::metrics::RequestMetrics;

/// Which base64 alphabet a field uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base64 {
    /// RFC 4648 §4 with padding (XKS, Cloud EKM).
    Standard,
    /// RFC 4648 §5 without padding (JOSE / RFC 7515: Azure).
    UrlNoPad,
    /// What proto3 JSON parsers accept for `bytes` (Cloud EKM): standard or URL-safe, padded or
    /// not.
    Proto3,
}

/// Why a binary field was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldError {
    /// Not valid in the field's base64 alphabet (padding where none belongs included).
    Invalid,
    /// Decodes to more than the limit.
    TooLarge {
        /// The limit in bytes.
        max: usize,
    },
}

impl FieldError {
    /// A message naming the field, safe to send.
    pub fn message(&self, name: &str, alphabet: Base64) -> String {
        match self {
            FieldError::Invalid => match alphabet {
                Base64::Standard | Base64::Proto3 => format!("{name} is not valid base64"),
                Base64::UrlNoPad => format!("{name} is not valid unpadded base64url"),
            },
            FieldError::TooLarge { max } => {
                format!("{name} exceeds this proxy's limit of {max} bytes")
            }
        }
    }
}

/// Decode `value` in `alphabet`, refusing before decoding what would certainly exceed `max`.
pub fn decode_bounded(value: &str, alphabet: Base64, max: usize) -> Result<Vec<u8>, FieldError> {
    // Every 4 characters carry at most 3 bytes; padding can make this bound 2 bytes high.
    let upper = value.len().div_ceil(4).saturating_mul(3);
    if upper > max.saturating_add(2) {
        return Err(FieldError::TooLarge { max });
    }
    let bytes = match alphabet {
        Base64::Standard => STANDARD.decode(value),
        Base64::UrlNoPad => URL_SAFE_NO_PAD.decode(value),
        Base64::Proto3 => PROTO3.decode(value).or_else(|_| PROTO3_URL.decode(value)),
    }
    .map_err(|_| FieldError::Invalid)?;
    if bytes.len() > max {
        return Err(FieldError::TooLarge { max });
    }
    Ok(bytes)
}

/// Encode `bytes` in `alphabet` (proto3 JSON writes standard base64 with padding).
pub fn encode(bytes: &[u8], alphabet: Base64) -> String {
    match alphabet {
        Base64::Standard | Base64::Proto3 => STANDARD.encode(bytes),
        Base64::UrlNoPad => URL_SAFE_NO_PAD.encode(bytes),
    }
}

/// Standard alphabet, padding optional (proto3 JSON).
const PROTO3: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// URL-safe alphabet, padding optional (proto3 JSON).
const PROTO3_URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a JSON body was refused (each front words its own message; none echoes the input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonError {
    /// Valid JSON, but a field is missing or has the wrong type.
    WrongShape,
    /// Not JSON at all (or truncated).
    NotJson,
}

/// Parse a JSON body.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, JsonError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => JsonError::WrongShape,
        _ => JsonError::NotJson,
    })
}

/// What a front learned about one request: the fields of its log line and audit event.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// Key store, prefix or issuer the request was routed to.
    pub tenant: String,
    /// The operation's name in metrics and logs.
    pub op: &'static str,
    /// The key asked for (empty when none).
    pub key: String,
    /// Who called (empty until authenticated).
    pub principal: String,
    /// The caller's request id.
    pub request_id: String,
    /// Whether this request is a key operation (its line is an audit event).
    pub audit: bool,
    /// Extra context the protocol carries (Azure: correlation id and pool).
    pub correlation_id: Option<String>,
    /// See `correlation_id`.
    pub pool: Option<String>,
    /// The grant that allowed the request, where the front names grants (Cloud EKM).
    pub grant: Option<String>,
    /// The caller's access justification (Cloud EKM KAJ reason).
    pub justification: Option<String>,
    /// The caller's resource using the key (Cloud EKM `relativeResourceName`).
    pub resource: Option<String>,
}

/// How a request ended, for the metric and the line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ending<'a> {
    /// `ok` or the protocol's error name (the metric's outcome label).
    pub outcome: &'a str,
    /// The rule that denied it, if a rule did.
    pub rule: Option<&'a str>,
    /// A finer name of the condition for the audit line (Cloud EKM's ErrorInfo reason).
    pub detail: Option<&'a str>,
    /// The refusal's message, logged when no rule explains it (Cloud EKM).
    pub why: Option<&'a str>,
}

impl<'a> Ending<'a> {
    /// Success.
    pub fn ok() -> Self {
        Self {
            outcome: "ok",
            ..Self::default()
        }
    }

    /// A failure named `outcome`, denied by `rule` if a rule did.
    pub fn failed(outcome: &'a str, rule: Option<&'a str>) -> Self {
        Self {
            outcome,
            rule,
            ..Self::default()
        }
    }
}

/// The quota one request is measured against.
#[derive(Debug, Clone, Copy)]
pub struct Quota<'a> {
    /// The bucket's settings.
    pub limit: TokenBucket,
    /// Whose bucket: one per key store, service account or certificate subject under a prefix.
    pub identity: &'a str,
    /// The quota's name in metrics and messages (bounded: a key store, a configured service
    /// account or `default`, an Azure prefix; never a free-form caller name).
    pub label: &'a str,
}

/// Ask `quotas` whether the request may go ahead now, counting the answer under the quota's
/// label. Answers at once: a throttled request is refused, never queued or delayed.
pub fn admit(
    quotas: &Quotas,
    metrics: &RequestMetrics,
    front: &'static str,
    quota: Quota<'_>,
) -> Result<(), Throttled> {
    let answer = quotas.admit(quota.identity, quota.limit, Instant::now());
    match answer {
        Ok(()) => metrics.quota_admitted(front, quota.label),
        Err(Throttled::Exhausted) => metrics.quota_throttled(front, quota.label),
        Err(Throttled::TooManyCallers) => {
            metrics.quota_throttled(front, quota.label);
            // Unusual enough to say so once per refusal: the bucket map is full of busy callers.
            tracing::warn!(front, quota = %audit::bounded(quota.label), "quota refused a new caller: too many callers are being rate-limited at once");
        }
    }
    answer
}

/// One request's span: every line logged while handling the request carries its front and,
/// once known, the tenant, key, principal and request id (and Azure's correlation id and pool).
pub fn span(front: &'static str) -> tracing::Span {
    tracing::info_span!(
        "request",
        front,
        tenant = tracing::field::Empty,
        key = tracing::field::Empty,
        principal = tracing::field::Empty,
        request_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
        pool = tracing::field::Empty,
    )
}

/// Record what is known so far on the request's span.
pub fn record(span: &tracing::Span, facts: &RequestFacts) {
    if !facts.tenant.is_empty() {
        span.record("tenant", facts.tenant.as_str());
    }
    if !facts.key.is_empty() {
        span.record("key", facts.key.as_str());
    }
    if !facts.principal.is_empty() {
        span.record("principal", facts.principal.as_str());
    }
    if !facts.request_id.is_empty() {
        span.record(
            "request_id",
            tracing::field::display(LogSafe(&facts.request_id)),
        );
    }
    if let Some(id) = &facts.correlation_id {
        span.record("correlation_id", tracing::field::display(LogSafe(id)));
    }
    if let Some(pool) = &facts.pool {
        span.record("pool", tracing::field::display(LogSafe(pool)));
    }
}

/// The metric outcome of a request whose audit event could not be written while
/// `logging.audit_required` is set (the front answers its internal error instead).
pub const UNRECORDED: &str = "AuditUnrecorded";

/// End a request: one metric observation, and one line (the audit event for a key operation).
///
/// `Err(Unrecorded)` when the audit event could not be written and `logging.audit_required` is
/// set: the front must then answer an error instead of the result it holds (fail closed).
pub fn finish(
    metrics: &RequestMetrics,
    audit: &Audit,
    front: &'static str,
    facts: &RequestFacts,
    ending: Ending<'_>,
    started: Instant,
) -> Result<(), Unrecorded> {
    let elapsed = started.elapsed();
    let op = if facts.op.is_empty() {
        "unknown"
    } else {
        facts.op
    };
    let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    let mut recorded = Ok(());
    if facts.audit {
        recorded = audit.record(&AuditEvent {
            front,
            tenant: &facts.tenant,
            op,
            key: &facts.key,
            principal: &facts.principal,
            request_id: &facts.request_id,
            decision: match (ending.outcome, ending.rule) {
                (_, Some(_)) => "deny",
                ("ok", None) => "allow",
                _ => "error",
            },
            // The specific condition (EXPIRED, ACCESS_DENIED, UNWRAP_FAILED…), not just the code.
            outcome: ending.detail.unwrap_or(ending.outcome),
            rule: ending.rule,
            grant: facts.grant.as_deref(),
            justification: facts.justification.as_deref(),
            resource: facts.resource.as_deref(),
            correlation_id: facts.correlation_id.as_deref(),
            pool: facts.pool.as_deref(),
            latency_us,
        });
        if let Some(why) = ending.why.filter(|_| ending.rule.is_none()) {
            // Named here too (not only in the span): operators match this line to its audit
            // event by request id.
            tracing::info!(request_id = %LogSafe(&facts.request_id), key = %audit::bounded(&facts.key), why = %audit::bounded(why), "request refused");
        }
    } else {
        tracing::info!(
            front,
            tenant = %audit::bounded(&facts.tenant),
            op,
            key = %audit::bounded(&facts.key),
            request_id = %LogSafe(&facts.request_id),
            principal = %audit::bounded(&facts.principal),
            outcome = ending.outcome,
            why = %audit::bounded(ending.why.unwrap_or("")),
            latency_us,
            "request"
        );
    }
    let outcome = if recorded.is_err() {
        UNRECORDED
    } else {
        ending.outcome
    };
    metrics.observe(front, op, outcome, elapsed.as_secs_f64());
    recorded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_is_strict_and_bounded() {
        assert_eq!(
            decode_bounded("AQAB", Base64::UrlNoPad, 10).unwrap(),
            [1, 0, 1]
        );
        assert_eq!(
            decode_bounded("-_8", Base64::UrlNoPad, 10).unwrap(),
            [0xfb, 0xff]
        );
        // Padding, the standard alphabet's + and /, and whitespace are refused.
        for bad in ["AQ==", "+/8", "AQ AB", "A"] {
            assert_eq!(
                decode_bounded(bad, Base64::UrlNoPad, 10),
                Err(FieldError::Invalid),
                "{bad}"
            );
        }
        assert_eq!(
            decode_bounded("AAAAAAAA", Base64::UrlNoPad, 5),
            Err(FieldError::TooLarge { max: 5 })
        );
        // Refused before decoding: far too long to be within the limit.
        assert_eq!(
            decode_bounded(&"!".repeat(100), Base64::UrlNoPad, 5),
            Err(FieldError::TooLarge { max: 5 })
        );
        assert_eq!(decode_bounded("AQ==", Base64::Standard, 10).unwrap(), [1]);
        assert_eq!(
            decode_bounded("AQ", Base64::Standard, 10),
            Err(FieldError::Invalid)
        );
        for any in ["+/8=", "+/8", "-_8=", "-_8"] {
            assert_eq!(
                decode_bounded(any, Base64::Proto3, 10).unwrap(),
                [0xfb, 0xff],
                "{any}"
            );
        }
        assert_eq!(encode(&[0xfb, 0xff], Base64::UrlNoPad), "-_8");
        assert_eq!(encode(&[1], Base64::Standard), "AQ==");
    }

    /// A buffer the fmt layer writes into.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_audit_line_and_the_span_carry_the_request_context() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let facts = RequestFacts {
            tenant: "pool-a".into(),
            op: "wrapkey",
            key: "kek-1".into(),
            principal: "mhsm.example".into(),
            request_id: "req-7".into(),
            audit: true,
            correlation_id: Some("corr-9".into()),
            pool: Some("pool-a-name".into()),
            ..RequestFacts::default()
        };
        let metrics = crate::metrics::Metrics::standalone().requests;
        tracing::subscriber::with_default(subscriber, || {
            let span = span("azure");
            let _entered = span.enter();
            record(&span, &facts);
            tracing::info!("inside");
            let recorded = finish(
                &metrics,
                &Audit::to_log(),
                "azure",
                &facts,
                Ending::failed("Forbidden", Some("r1")),
                Instant::now(),
            );
            assert_eq!(recorded, Ok(()));
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let audit = lines
            .iter()
            .find(|l| l["fields"]["message"] == "audit")
            .unwrap_or_else(|| panic!("no audit line: {text}"));
        assert_eq!(audit["fields"]["correlation_id"], "corr-9");
        assert_eq!(audit["fields"]["pool"], "pool-a-name");
        assert_eq!(audit["fields"]["request_id"], "req-7");
        assert_eq!(audit["fields"]["decision"], "deny");
        assert_eq!(audit["fields"]["rule"], "r1");
        let inside = lines
            .iter()
            .find(|l| l["fields"]["message"] == "inside")
            .unwrap_or_else(|| panic!("no inner line: {text}"));
        assert_eq!(inside["span"]["correlation_id"], "corr-9");
        assert_eq!(inside["span"]["pool"], "pool-a-name");
        assert_eq!(inside["span"]["key"], "kek-1");
        assert_eq!(inside["span"]["principal"], "mhsm.example");
    }

    #[test]
    fn json_errors_are_classified() {
        #[derive(serde::Deserialize, Debug)]
        struct T {
            #[allow(dead_code)]
            a: u8,
        }
        assert_eq!(
            parse_json::<T>(b"{\"a\": \"secret\"}").unwrap_err(),
            JsonError::WrongShape
        );
        assert_eq!(parse_json::<T>(b"{}").unwrap_err(), JsonError::WrongShape);
        assert_eq!(parse_json::<T>(b"secret{").unwrap_err(), JsonError::NotJson);
    }
}
