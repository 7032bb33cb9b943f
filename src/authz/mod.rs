//! Authorization: decides whether a [`Principal`] may perform an operation on a key, and proves a
//! positive decision with a [`Permit`], the only value core key operations accept.
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
//! Depends on `auth` (who) and `core::Operation` (what). Knows nothing of HTTP, wire formats or
//! the HSM.

pub mod access_reason;
pub mod grants;

use std::fmt;

use crate::auth::Principal;
use crate::core::Operation;

/// Proof that an operation on a key was authorized. Only [`Policy::authorize`] makes one (its
/// fields are private), so a core operation holding a `&Permit` knows the check happened.
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

/// What the policy decides on: the caller, the key, the operation, and named request attributes.
pub struct Facts<'a> {
    /// Who is calling.
    pub principal: &'a Principal,
    /// The key asked for.
    pub key: &'a str,
    /// The operation asked for.
    pub op: Operation,
    /// Request attributes by name (`None` when absent from the request).
    pub attributes: &'a [(&'a str, Option<&'a str>)],
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

    /// Decide; on success the returned [`Permit`] is the proof core operations require.
    pub fn authorize(&self, facts: &Facts<'_>) -> Result<Permit, Denial> {
        for rule in &self.rules {
            if !rule.keys.iter().any(|k| k.matches(facts.key)) {
                continue;
            }
            if rule
                .operations
                .as_ref()
                .is_some_and(|ops| !ops.contains(&facts.op))
            {
                continue;
            }
            let value = facts
                .attributes
                .iter()
                .find(|(name, _)| *name == rule.attribute)
                .and_then(|(_, v)| *v);
            match value {
                None => {
                    return Err(Denial {
                        rule: rule.name.clone(),
                        reason: format!("{} is absent from the request", rule.attribute),
                    });
                }
                Some(v) if !rule.allow.iter().any(|p| p.matches(v)) => {
                    return Err(Denial {
                        rule: rule.name.clone(),
                        reason: format!("{} is not an allowed value", rule.attribute),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(Permit {
            principal: facts.principal.name().to_owned(),
            key: facts.key.to_owned(),
            op: facts.op,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal::SigV4 {
            access_key_id: "AKID".into(),
            region: "us-east-1".into(),
        }
    }

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

    #[test]
    fn empty_policy_allows_and_permit_records_request() {
        let p = principal();
        let permit = Policy::default()
            .authorize(&Facts {
                principal: &p,
                key: "k1",
                op: Operation::Encrypt,
                attributes: &[],
            })
            .unwrap();
        assert_eq!(permit.key(), "k1");
        assert_eq!(permit.operation(), Operation::Encrypt);
        assert_eq!(permit.principal(), "AKID");
    }

    #[test]
    fn rules_apply_by_key_and_operation_and_name_the_denial() {
        let policy = Policy::new(vec![
            Rule {
                name: "account".into(),
                keys: vec![Pattern::new("*")],
                operations: None,
                attribute: "awsPrincipalArn".into(),
                allow: vec![Pattern::new("arn:aws:iam::111122223333:*")],
            },
            Rule {
                name: "bind-key".into(),
                keys: vec![Pattern::new("k1")],
                operations: Some(vec![Operation::Encrypt, Operation::Decrypt]),
                attribute: "kmsKeyArn".into(),
                allow: vec![Pattern::new("arn:aws:kms:us-east-1:111122223333:key/abc")],
            },
        ]);
        let p = principal();
        let good = [
            ("awsPrincipalArn", Some("arn:aws:iam::111122223333:root")),
            (
                "kmsKeyArn",
                Some("arn:aws:kms:us-east-1:111122223333:key/abc"),
            ),
        ];
        assert!(
            policy
                .authorize(&Facts {
                    principal: &p,
                    key: "k1",
                    op: Operation::Encrypt,
                    attributes: &good
                })
                .is_ok()
        );
        let other_key = [
            ("awsPrincipalArn", Some("arn:aws:iam::111122223333:root")),
            ("kmsKeyArn", Some("x")),
        ];
        // bind-key does not apply to k2.
        assert!(
            policy
                .authorize(&Facts {
                    principal: &p,
                    key: "k2",
                    op: Operation::Encrypt,
                    attributes: &other_key
                })
                .is_ok()
        );
        // ...nor to metadata.
        assert!(
            policy
                .authorize(&Facts {
                    principal: &p,
                    key: "k1",
                    op: Operation::KeyMetadata,
                    attributes: &other_key
                })
                .is_ok()
        );
        let denied = policy
            .authorize(&Facts {
                principal: &p,
                key: "k1",
                op: Operation::Decrypt,
                attributes: &other_key,
            })
            .unwrap_err();
        assert_eq!(denied.rule, "bind-key");
        assert!(denied.to_string().contains("kmsKeyArn"));
        let absent = [("awsPrincipalArn", None)];
        let denied = policy
            .authorize(&Facts {
                principal: &p,
                key: "k2",
                op: Operation::Encrypt,
                attributes: &absent,
            })
            .unwrap_err();
        assert_eq!(denied.rule, "account");
        assert!(denied.reason.contains("absent"));
    }
}
