//! Key Access Justifications (KAJ): the reason Google gives with each Cloud EKM request, and the
//! customer's policy over those reasons.
//!
//! Parsing follows the proto3 JSON enum rules exactly: the exact enum name, or the enum number
//! (as a JSON number or a decimal string), both mapping to the same reason. New reason codes keep
//! appearing, so a *number* this build does not know becomes [`AccessReason::Unknown`] and the
//! policy decides; any other text (lower case, spaces, an unrecognized name) is malformed, never
//! "unknown", so `allow_unknown` cannot be reached by misspelling a denied reason. The three
//! special cases, reason absent (KAJ not enrolled), `REASON_UNSPECIFIED`, and unknown, are each an
//! explicit policy switch, because each has a different operational meaning.
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
    /// A number this build does not know (kept for the log line).
    Unknown(String),
}

/// A reason value that is neither an enum name nor an enum number (safe to log and return).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedReason(pub String);

impl fmt::Display for MalformedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accessReasonContext.reason {:?} is not a Reason enum name or number",
            self.0
        )
    }
}

impl AccessReason {
    /// Parse a proto3 JSON enum string: exactly an enum name, or the enum number in decimal
    /// (`"3"` means what `3` means). Anything else is malformed.
    pub fn from_json_string(text: &str) -> Result<Self, MalformedReason> {
        if text == UNSPECIFIED {
            return Ok(AccessReason::Unspecified);
        }
        if let Some(k) = KnownReason::from_name(text) {
            return Ok(AccessReason::Known(k));
        }
        let digits = text.strip_prefix('-').unwrap_or(text);
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'))
            && text != "-0";
        match text.parse::<i32>() {
            Ok(code) if canonical => Ok(Self::from_code(i64::from(code))),
            _ => Err(MalformedReason(printable(text))),
        }
    }

    /// Parse a proto3 JSON enum number (an `int32`; larger values are malformed).
    pub fn from_json_number(code: i64) -> Result<Self, MalformedReason> {
        match i32::try_from(code) {
            Ok(code) => Ok(Self::from_code(i64::from(code))),
            Err(_) => Err(MalformedReason(code.to_string())),
        }
    }

    /// The reason numbered `code` (0 is unspecified; a number this build does not know is
    /// unknown).
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
            AccessReason::from_json_string("CUSTOMER_INITIATED_ACCESS"),
            Ok(AccessReason::Known(KnownReason(5)))
        );
        assert_eq!(
            AccessReason::from_code(6),
            AccessReason::Known(KnownReason(6))
        );
        assert_eq!(
            AccessReason::from_json_string("REASON_UNSPECIFIED"),
            Ok(AccessReason::Unspecified)
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
            AccessReason::from_json_string("NEW_REASON\n\u{7}"),
            Err(MalformedReason("NEW_REASON".into()))
        );
        for k in KnownReason::all() {
            assert_eq!(KnownReason::from_name(k.name()), Some(k));
            assert_eq!(KnownReason::from_code(k.code()), Some(k));
        }
    }

    #[test]
    fn strings_follow_proto3_json_enum_rules() {
        // Names and numeric strings map to the same reason as the JSON number.
        for (text, code) in [("3", 3), ("THIRD_PARTY_DATA_REQUEST", 3), ("11", 11)] {
            assert_eq!(
                AccessReason::from_json_string(text),
                AccessReason::from_json_number(code),
                "{text}"
            );
        }
        assert_eq!(
            AccessReason::from_json_string("0"),
            Ok(AccessReason::Unspecified)
        );
        assert_eq!(
            AccessReason::from_json_string("99"),
            Ok(AccessReason::Unknown("99".into()))
        );
        // Everything else is malformed, never "unknown".
        for text in [
            "",
            "third_party_data_request",
            " THIRD_PARTY_DATA_REQUEST",
            "THIRD_PARTY_DATA_REQUEST ",
            " 3",
            "3 ",
            "+3",
            "03",
            "3.0",
            "0x3",
            "-0",
            "BRAND_NEW",
            "99999999999",
        ] {
            assert!(
                AccessReason::from_json_string(text).is_err(),
                "{text:?} must be malformed"
            );
        }
        assert!(AccessReason::from_json_number(1 << 40).is_err());
        // The refusal names the field and the (printable part of the) value it refused.
        let refusal = AccessReason::from_json_string("third_party\n")
            .unwrap_err()
            .to_string();
        assert!(
            refusal.contains("accessReasonContext.reason") && refusal.contains("\"third_party\""),
            "{refusal}"
        );
        assert_eq!(
            AccessReason::from_json_number(-1),
            Ok(AccessReason::Unknown("-1".into()))
        );
    }

    #[test]
    fn known_reasons_are_exactly_the_documented_list() {
        // Config errors list these names; pin the list so a lost or renamed entry is noticed.
        let names: Vec<(u32, &str)> = KnownReason::all().map(|k| (k.code(), k.name())).collect();
        assert_eq!(
            names,
            vec![
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
            ]
        );
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
