//! Key Access Justifications (KAJ): the reason Google gives with each Cloud EKM request, and the
//! customer's policy over those reasons.
//!
//! New reason codes keep appearing, so parsing is lenient (an unknown name or number becomes
//! [`AccessReason::Unknown`]) and the policy decides what to do with it. The three special cases,
//! reason absent (KAJ not enrolled), `REASON_UNSPECIFIED`, and unknown, are each an explicit
//! policy switch, because each has a different operational meaning.
//!
//! A leaf of `authz`: knows nothing of HTTP, JSON or the HSM.

use std::fmt;

/// The reason codes this build knows (`google.cloud.ekms.v0.AccessReasonContext.Reason`), by
/// number. `REASON_UNSPECIFIED` (0) is not a reason and is handled as [`AccessReason::Unspecified`].
const KNOWN: &[(u32, &str)] = &[
    (1, "CUSTOMER_INITIATED_SUPPORT"),
    (2, "GOOGLE_INITIATED_SERVICE"),
    (3, "THIRD_PARTY_DATA_REQUEST"),
    (4, "GOOGLE_INITIATED_REVIEW"),
    (5, "CUSTOMER_INITIATED_ACCESS"),
    (6, "GOOGLE_INITIATED_SYSTEM_OPERATION"),
    (7, "REASON_NOT_EXPECTED"),
    (8, "MODIFIED_CUSTOMER_INITIATED_ACCESS"),
    (9, "MODIFIED_GOOGLE_INITIATED_SYSTEM_OPERATION"),
    (10, "GOOGLE_RESPONSE_TO_PRODUCTION_ALERT"),
    (11, "CUSTOMER_AUTHORIZED_WORKFLOW_SERVICING"),
];

/// The name of reason 0.
const UNSPECIFIED: &str = "REASON_UNSPECIFIED";

/// A known reason code (one of the documented `Reason` values other than 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KnownReason(u32);

impl KnownReason {
    /// The reason called `name` (exact enum name), if known.
    pub fn from_name(name: &str) -> Option<Self> {
        KNOWN
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| Self(*c))
    }

    /// The reason numbered `code`, if known.
    pub fn from_code(code: u32) -> Option<Self> {
        KNOWN.iter().any(|(c, _)| *c == code).then_some(Self(code))
    }

    /// The enum name.
    pub fn name(&self) -> &'static str {
        KNOWN
            .iter()
            .find(|(c, _)| *c == self.0)
            .map_or("UNKNOWN", |(_, n)| n)
    }

    /// The enum number.
    pub fn code(&self) -> u32 {
        self.0
    }

    /// Every known reason (for documentation and the dev profile).
    pub fn all() -> impl Iterator<Item = KnownReason> {
        KNOWN.iter().map(|(c, _)| KnownReason(*c))
    }
}

/// The justification attached to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessReason {
    /// No `accessReasonContext` at all: the caller did not send a justification.
    Absent,
    /// `REASON_UNSPECIFIED`, `0`, or a context without a reason (proto3 JSON omits the zero value).
    Unspecified,
    /// A documented reason.
    Known(KnownReason),
    /// A name or number this build does not know (kept, truncated, for the log line).
    Unknown(String),
}

impl AccessReason {
    /// Parse an enum name.
    pub fn from_name(name: &str) -> Self {
        if name.is_empty() || name == UNSPECIFIED {
            return AccessReason::Unspecified;
        }
        match KnownReason::from_name(name) {
            Some(k) => AccessReason::Known(k),
            None => AccessReason::Unknown(printable(name)),
        }
    }

    /// Parse an enum number.
    pub fn from_code(code: i64) -> Self {
        if code == 0 {
            return AccessReason::Unspecified;
        }
        match u32::try_from(code).ok().and_then(KnownReason::from_code) {
            Some(k) => AccessReason::Known(k),
            None => AccessReason::Unknown(code.to_string()),
        }
    }
}

impl fmt::Display for AccessReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessReason::Absent => f.write_str("ABSENT"),
            AccessReason::Unspecified => f.write_str(UNSPECIFIED),
            AccessReason::Known(k) => f.write_str(k.name()),
            AccessReason::Unknown(raw) => write!(f, "UNKNOWN({raw})"),
        }
    }
}

/// At most 64 printable ASCII characters of caller input, for logs and messages.
fn printable(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

/// Which justifications a key accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessReasonPolicy {
    /// Documented reasons that are allowed.
    pub allow: Vec<KnownReason>,
    /// Allow requests without a justification (KAJ not enrolled).
    pub allow_absent: bool,
    /// Allow `REASON_UNSPECIFIED`.
    pub allow_unspecified: bool,
    /// Allow reason codes this build does not know.
    pub allow_unknown: bool,
    /// Let key health checks through whatever their reason. Safe because a health-check unwrap
    /// can only open a blob made by a health-check wrap (the front binds the flag into the AAD).
    pub allow_health_checks: bool,
}

impl AccessReasonPolicy {
    /// `Ok` when `reason` is acceptable; otherwise why not (safe to log and return).
    pub fn check(&self, reason: &AccessReason, health_check: bool) -> Result<(), String> {
        if health_check && self.allow_health_checks {
            return Ok(());
        }
        let allowed = match reason {
            AccessReason::Absent => self.allow_absent,
            AccessReason::Unspecified => self.allow_unspecified,
            AccessReason::Known(k) => self.allow.contains(k),
            AccessReason::Unknown(_) => self.allow_unknown,
        };
        if allowed {
            Ok(())
        } else {
            Err(match reason {
                AccessReason::Absent => "no access justification was given".to_owned(),
                other => format!("access justification {other} is not allowed"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_codes_and_the_special_cases() {
        assert_eq!(
            AccessReason::from_name("CUSTOMER_INITIATED_ACCESS"),
            AccessReason::Known(KnownReason(5))
        );
        assert_eq!(
            AccessReason::from_code(6),
            AccessReason::Known(KnownReason(6))
        );
        assert_eq!(
            AccessReason::from_name("REASON_UNSPECIFIED"),
            AccessReason::Unspecified
        );
        assert_eq!(AccessReason::from_code(0), AccessReason::Unspecified);
        assert_eq!(
            AccessReason::from_code(99),
            AccessReason::Unknown("99".into())
        );
        assert_eq!(
            AccessReason::from_code(-1),
            AccessReason::Unknown("-1".into())
        );
        assert_eq!(
            AccessReason::from_name("NEW_REASON\n\u{7}"),
            AccessReason::Unknown("NEW_REASON".into())
        );
        for k in KnownReason::all() {
            assert_eq!(KnownReason::from_name(k.name()), Some(k));
            assert_eq!(KnownReason::from_code(k.code()), Some(k));
        }
    }

    #[test]
    fn policy_decides_each_case_separately() {
        let policy = AccessReasonPolicy {
            allow: vec![KnownReason::from_name("CUSTOMER_INITIATED_ACCESS").unwrap()],
            allow_absent: true,
            allow_unspecified: false,
            allow_unknown: false,
            allow_health_checks: true,
        };
        assert!(policy.check(&AccessReason::from_code(5), false).is_ok());
        let denied = policy
            .check(&AccessReason::from_code(3), false)
            .unwrap_err();
        assert!(denied.contains("THIRD_PARTY_DATA_REQUEST"), "{denied}");
        assert!(policy.check(&AccessReason::Absent, false).is_ok());
        assert!(policy.check(&AccessReason::Unspecified, false).is_err());
        assert!(policy.check(&AccessReason::from_code(42), false).is_err());
        // Health checks pass whatever the reason, only when the switch is on.
        assert!(policy.check(&AccessReason::from_code(3), true).is_ok());
        let strict = AccessReasonPolicy {
            allow_health_checks: false,
            ..policy
        };
        assert!(strict.check(&AccessReason::from_code(3), true).is_err());
    }
}
