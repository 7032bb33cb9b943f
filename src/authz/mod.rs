//! Authorization: decides whether a [`crate::auth::Principal`] may perform an operation on a
//! key, and proves a positive decision with a [`Permit`], the only value core key operations
//! accept.
//!
//! The policy is a list of named rules. A rule applies to some keys (and optionally some
//! operations) and constrains one request attribute (e.g. `awsPrincipalArn`, `kmsKeyArn`,
//! `kmsOperation`) to a list of glob patterns. A request is allowed when every rule that applies
//! to it is satisfied; a denial names the first rule that failed and why. An empty policy allows
//! everything (authentication still applies).
//!
//! Fronts whose callers are granted access per key (Google Cloud EKM) use [`grants::KeyAccess`]
//! instead, with the Key Access Justification policy of [`access_reason`].
//!
//! Rules and grants are data here; [`decide`] is the one place they are evaluated, for every
//! front and for `ekm-proxy policy explain`.
//!
//! Depends on `auth` (who) and `core::Operation` (what). Knows nothing of HTTP, wire formats or
//! the HSM.

pub mod access_reason;
pub mod decide;
pub mod grants;

use std::fmt;

use crate::core::Operation;

/// Proof that an operation on a key was authorized. Only [`decide`] makes one (its fields are
/// private to `authz`), so a core operation holding a `&Permit` knows the check happened.
#[derive(Debug, Clone)]
pub struct Permit {
    principal: String,
    key: String,
    op: Operation,
}

impl Permit {
    /// The key the permit is for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operation the permit is for.
    pub fn operation(&self) -> Operation {
        self.op
    }

    /// The loggable name of the principal that was allowed.
    pub fn principal(&self) -> &str {
        &self.principal
    }
}

/// A glob pattern: `*` matches any run of characters (including none); everything else is literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Wrap a pattern string.
    pub fn new(pattern: impl Into<String>) -> Self {
        Self(pattern.into())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        glob_match(self.0.as_bytes(), value.as_bytes())
    }
}

/// Iterative glob matching with backtracking to the last `*` (linear in practice, no recursion).
fn glob_match(pattern: &[u8], value: &[u8]) -> bool {
    let (mut p, mut v) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while v < value.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, v));
            p += 1;
        } else if p < pattern.len() && pattern[p] == value[v] {
            p += 1;
            v += 1;
        } else if let Some((sp, sv)) = star {
            p = sp + 1;
            v = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One named constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Operator-chosen name, reported in denials and audit lines.
    pub name: String,
    /// Keys the rule applies to (`*` for all).
    pub keys: Vec<Pattern>,
    /// Operations the rule applies to; `None` for all.
    pub operations: Option<Vec<Operation>>,
    /// The request attribute constrained (e.g. `awsPrincipalArn`).
    pub attribute: String,
    /// Allowed values; an absent attribute never matches.
    pub allow: Vec<Pattern>,
}

/// An ordered set of rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// A denial: which rule failed and why. Safe to log and to send as an error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The rule's name.
    pub rule: String,
    /// Why it failed (names the attribute, never a secret).
    pub reason: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "denied by rule '{}': {}", self.rule, self.reason)
    }
}

impl Policy {
    /// A policy made of `rules`, evaluated in order.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in evaluation order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        for (p, v, want) in [
            ("*", "", true),
            ("*", "abc", true),
            (
                "arn:aws:iam::111122223333:*",
                "arn:aws:iam::111122223333:role/x",
                true,
            ),
            (
                "arn:aws:iam::111122223333:*",
                "arn:aws:iam::999922223333:role/x",
                false,
            ),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*-prod", "db-prod", true),
        ] {
            assert_eq!(Pattern::new(p).matches(v), want, "{p} vs {v}");
        }
    }
}
