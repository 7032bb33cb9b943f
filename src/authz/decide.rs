//! The one authorization entry point of every front end. Each front describes what a request asks
//! for in protocol-neutral terms ([`XksRequest`], [`AccessRequest`] for Cloud EKM,
//! [`AzureRequest`]) and calls its function here ([`xks`], [`cloud_ekm`], [`azure`]); the answer
//! is a [`Decision`]: the [`Permit`] or the [`Denial`], what decided it (the rule that denied,
//! the Cloud EKM grant that allowed, or no rule at all), and every rule, grant and check looked
//! at on the way.
//!
//! The server and `ekm-proxy policy explain` call these same functions, so an explanation cannot
//! drift from what the server does. This is also the only place rules and grants are evaluated:
//! [`Policy`] and [`KeyAccess`] are data.
//!
//! Must not depend on HTTP, wire formats, configuration or the HSM: fronts translate their wire
//! requests into these descriptions and map a denial onto their wire themselves.

use std::fmt;

/// What a Cloud EKM wrap or unwrap asks for (defined beside the grants it is checked against).
pub use super::grants::AccessRequest;
use super::grants::{KeyAccess, RULE_ACCESS_REASONS, RULE_GRANTS, RULE_RESOURCE_NAMES};
use super::{Denial, Permit, Policy, Rule};
use crate::auth::Principal;
use crate::core::Operation;

/// The XKS `requestMetadata` attributes an XKS rule may constrain, in their XKS spelling.
pub const XKS_ATTRIBUTES: [&str; 7] = [
    "awsPrincipalArn",
    "awsSourceVpc",
    "awsSourceVpce",
    "kmsKeyArn",
    "kmsOperation",
    "kmsRequestId",
    "kmsViaService",
];

/// The request attributes an Azure rule may constrain.
pub const AZURE_ATTRIBUTES: [&str; 2] = ["clientCertificateSubject", "poolName"];

/// The `requestMetadata` KMS sends with an XKS call; `None` where the request has no such field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XksMetadata<'a> {
    /// `awsPrincipalArn`: the caller of the KMS API.
    pub aws_principal_arn: Option<&'a str>,
    /// `awsSourceVpc`.
    pub aws_source_vpc: Option<&'a str>,
    /// `awsSourceVpce`.
    pub aws_source_vpce: Option<&'a str>,
    /// `kmsKeyArn`: the KMS key the external key backs.
    pub kms_key_arn: Option<&'a str>,
    /// `kmsOperation`: the KMS API called (`Encrypt`, `GenerateDataKey`, …).
    pub kms_operation: Option<&'a str>,
    /// `kmsRequestId`.
    pub kms_request_id: Option<&'a str>,
    /// `kmsViaService`: the AWS service acting for the caller.
    pub kms_via_service: Option<&'a str>,
}

impl<'a> XksMetadata<'a> {
    /// Every attribute by the name rules use ([`XKS_ATTRIBUTES`], same order).
    pub fn attributes(&self) -> [(&'static str, Option<&'a str>); 7] {
        let [arn, vpc, vpce, key_arn, operation, request_id, via] = XKS_ATTRIBUTES;
        [
            (arn, self.aws_principal_arn),
            (vpc, self.aws_source_vpc),
            (vpce, self.aws_source_vpce),
            (key_arn, self.kms_key_arn),
            (operation, self.kms_operation),
            (request_id, self.kms_request_id),
            (via, self.kms_via_service),
        ]
    }
}

/// What an XKS key operation asks for.
#[derive(Debug, Clone, Copy)]
pub struct XksRequest<'a> {
    /// Who signed the request.
    pub principal: &'a Principal,
    /// The external key id.
    pub key: &'a str,
    /// Metadata, encrypt or decrypt.
    pub op: Operation,
    /// The request's `requestMetadata`.
    pub metadata: XksMetadata<'a>,
}

/// What an Azure Managed HSM key operation asks for.
#[derive(Debug, Clone, Copy)]
pub struct AzureRequest<'a> {
    /// The client certificate's accepted subject (the `clientCertificateSubject` attribute).
    pub principal: &'a Principal,
    /// The key identifier.
    pub key: &'a str,
    /// Metadata, wrap or unwrap.
    pub op: Operation,
    /// `request_context.pool_name` (the `poolName` attribute).
    pub pool_name: &'a str,
}

/// The outcome of one authorization, and how it was reached. Borrows names from the policy.
#[derive(Debug)]
pub struct Decision<'p> {
    /// The proof core operations require, or the denial (rule and reason).
    pub outcome: Result<Permit, Denial>,
    /// What decided.
    pub decided_by: DecidedBy<'p>,
    /// Every rule, grant and check, in evaluation order, and what it did.
    pub steps: Vec<Step<'p>>,
}

impl Decision<'_> {
    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// What decided a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy<'p> {
    /// This rule denied: a policy rule's name, or a Cloud EKM check (`grants`, `resource_names`,
    /// `access_reasons`). It is the name the denial and the audit line carry.
    Rule(&'p str),
    /// This Cloud EKM grant allowed (and the resource and justification checks passed).
    Grant(&'p str),
    /// At least one rule applied to the request, and every one that did allowed it.
    RulesAllowed,
    /// No rule applies to this key and operation (an empty policy allows everything).
    NoRuleApplied,
}

impl<'p> DecidedBy<'p> {
    /// The rule or grant name, if a named rule or grant decided.
    pub fn name(&self) -> Option<&'p str> {
        match self {
            DecidedBy::Rule(name) | DecidedBy::Grant(name) => Some(name),
            DecidedBy::RulesAllowed | DecidedBy::NoRuleApplied => None,
        }
    }
}

impl fmt::Display for DecidedBy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecidedBy::Rule(name) => write!(f, "rule '{name}'"),
            DecidedBy::Grant(name) => write!(f, "grant '{name}'"),
            DecidedBy::RulesAllowed => f.write_str("every rule that applied allowed it"),
            DecidedBy::NoRuleApplied => {
                f.write_str("no rule applied (no rule covers this key and operation)")
            }
        }
    }
}

/// One rule, grant or check looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step<'p> {
    /// What it is.
    pub kind: StepKind,
    /// Its name (rule or grant name as configured; a check's fixed name).
    pub name: &'p str,
    /// For a rule, the request attribute it constrains.
    pub attribute: Option<&'p str>,
    /// What it did.
    pub result: StepResult<'p>,
}

/// The kinds of [`Step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A policy rule (XKS, Azure).
    Rule,
    /// A Cloud EKM grant.
    Grant,
    /// A fixed Cloud EKM check (`grants`, `resource_names`, `access_reasons`).
    Check,
}

impl StepKind {
    /// Lowercase name for output.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Rule => "rule",
            StepKind::Grant => "grant",
            StepKind::Check => "check",
        }
    }
}

/// What one [`Step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult<'p> {
    /// It applied and allowed the request; for a rule or grant, the pattern that matched.
    Allowed {
        /// The allow pattern (rule) or service-account pattern (grant) that matched.
        matched: Option<&'p str>,
    },
    /// It applied and denied the request, for this reason (the denial's reason).
    Denied(String),
    /// It does not apply to this request, for this reason.
    Skipped(&'static str),
    /// Evaluation ended before it (an earlier step decided).
    NotReached,
}

/// Authorize an XKS key operation against a key store's policy.
pub fn xks<'p>(policy: &'p Policy, req: &XksRequest<'_>) -> Decision<'p> {
    evaluate(
        policy,
        req.principal,
        req.key,
        req.op,
        &req.metadata.attributes(),
    )
}

/// Authorize an Azure key operation against a prefix's policy.
pub fn azure<'p>(policy: &'p Policy, req: &AzureRequest<'_>) -> Decision<'p> {
    let [subject, pool] = AZURE_ATTRIBUTES;
    let attributes = [
        (subject, Some(req.principal.name())),
        (pool, Some(req.pool_name)),
    ];
    evaluate(policy, req.principal, req.key, req.op, &attributes)
}

/// Authorize a Cloud EKM wrap or unwrap against the key's grants, resource pin and Key Access
/// Justification policy, in that order; the first failure is the denial.
pub fn cloud_ekm<'p>(access: &'p KeyAccess, req: &AccessRequest<'_>) -> Decision<'p> {
    let who = req.principal.name();
    let mut steps = Vec::with_capacity(access.grants.len() + 3);
    let mut granted = None;
    for grant in &access.grants {
        let result = if granted.is_some() {
            StepResult::NotReached
        } else if let Some(p) = grant.principals.iter().find(|p| p.matches(who)) {
            if grant.operations.contains(&req.op) {
                granted = Some(grant.name.as_str());
                StepResult::Allowed {
                    matched: Some(p.as_str()),
                }
            } else {
                StepResult::Skipped("the grant does not cover this operation")
            }
        } else {
            StepResult::Skipped("the caller is not one of the grant's service accounts")
        };
        steps.push(Step {
            kind: StepKind::Grant,
            name: &grant.name,
            attribute: None,
            result,
        });
    }
    let check = |name: &'static str, result: StepResult<'p>| Step {
        kind: StepKind::Check,
        name,
        attribute: None,
        result,
    };
    let Some(grant) = granted else {
        let reason = format!(
            "no grant allows {who} to {} key {}",
            req.op.as_str(),
            req.key
        );
        steps.push(check(RULE_GRANTS, StepResult::Denied(reason.clone())));
        steps.push(check(RULE_RESOURCE_NAMES, StepResult::NotReached));
        steps.push(check(RULE_ACCESS_REASONS, StepResult::NotReached));
        return deny(RULE_GRANTS, reason, steps);
    };
    steps.push(check(
        RULE_GRANTS,
        StepResult::Allowed {
            matched: Some(grant),
        },
    ));
    let resource = match (&access.resource_names, req.resource_name) {
        (None, _) => Ok(StepResult::Skipped("the key is not pinned to resources")),
        (Some(_), None) => {
            Err("the request names no resource, and this key is pinned to resources".to_owned())
        }
        (Some(allowed), Some(name)) => match allowed.iter().find(|p| p.matches(name)) {
            Some(p) => Ok(StepResult::Allowed {
                matched: Some(p.as_str()),
            }),
            None => Err(format!("resource {name} may not use this key")),
        },
    };
    match resource {
        Ok(result) => steps.push(check(RULE_RESOURCE_NAMES, result)),
        Err(reason) => {
            steps.push(check(
                RULE_RESOURCE_NAMES,
                StepResult::Denied(reason.clone()),
            ));
            steps.push(check(RULE_ACCESS_REASONS, StepResult::NotReached));
            return deny(RULE_RESOURCE_NAMES, reason, steps);
        }
    }
    if let Err(reason) = access.reasons.check(req.reason, req.health_check) {
        steps.push(check(
            RULE_ACCESS_REASONS,
            StepResult::Denied(reason.clone()),
        ));
        return deny(RULE_ACCESS_REASONS, reason, steps);
    }
    steps.push(check(
        RULE_ACCESS_REASONS,
        StepResult::Allowed { matched: None },
    ));
    Decision {
        outcome: Ok(Permit {
            principal: who.to_owned(),
            key: req.hsm_key.to_owned(),
            op: req.op,
        }),
        decided_by: DecidedBy::Grant(grant),
        steps,
    }
}

/// The rule evaluation of XKS and Azure: every rule that applies to the key and operation must
/// allow the value of its attribute; the first that does not is the denial.
fn evaluate<'p>(
    policy: &'p Policy,
    principal: &Principal,
    key: &str,
    op: Operation,
    attributes: &[(&str, Option<&str>)],
) -> Decision<'p> {
    let mut steps = Vec::with_capacity(policy.rules.len());
    let mut applied = false;
    let mut denial: Option<(&'p str, String)> = None;
    for rule in &policy.rules {
        let result = if denial.is_some() {
            StepResult::NotReached
        } else if !rule.keys.iter().any(|k| k.matches(key)) {
            StepResult::Skipped("the rule's keys do not include this key")
        } else if rule
            .operations
            .as_ref()
            .is_some_and(|ops| !ops.contains(&op))
        {
            StepResult::Skipped("the rule does not cover this operation")
        } else {
            applied = true;
            match check_rule(rule, attributes) {
                Ok(matched) => StepResult::Allowed {
                    matched: Some(matched),
                },
                Err(reason) => {
                    denial = Some((&rule.name, reason.clone()));
                    StepResult::Denied(reason)
                }
            }
        };
        steps.push(Step {
            kind: StepKind::Rule,
            name: &rule.name,
            attribute: Some(&rule.attribute),
            result,
        });
    }
    match denial {
        Some((rule, reason)) => deny(rule, reason, steps),
        None => Decision {
            outcome: Ok(Permit {
                principal: principal.name().to_owned(),
                key: key.to_owned(),
                op,
            }),
            decided_by: if applied {
                DecidedBy::RulesAllowed
            } else {
                DecidedBy::NoRuleApplied
            },
            steps,
        },
    }
}

/// The allow pattern that matches the rule's attribute, or why none does. An absent attribute
/// never matches (a rule is a requirement, not a filter).
fn check_rule<'p>(rule: &'p Rule, attributes: &[(&str, Option<&str>)]) -> Result<&'p str, String> {
    let value = attributes
        .iter()
        .find(|(name, _)| *name == rule.attribute)
        .and_then(|(_, v)| *v);
    let Some(value) = value else {
        return Err(format!("{} is absent from the request", rule.attribute));
    };
    rule.allow
        .iter()
        .find(|p| p.matches(value))
        .map(|p| p.as_str())
        .ok_or_else(|| format!("{} is not an allowed value", rule.attribute))
}

fn deny<'p>(rule: &'p str, reason: String, steps: Vec<Step<'p>>) -> Decision<'p> {
    Decision {
        outcome: Err(Denial {
            rule: rule.to_owned(),
            reason,
        }),
        decided_by: DecidedBy::Rule(rule),
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::super::access_reason::{AccessReason, AccessReasonPolicy, KnownReason};
    use super::super::grants::Grant;
    use super::super::{Pattern, Rule};
    use super::*;

    fn sigv4() -> Principal {
        Principal::SigV4 {
            access_key_id: "AKID".into(),
            region: "us-east-1".into(),
        }
    }

    fn rule(
        name: &str,
        keys: &[&str],
        ops: Option<&[Operation]>,
        attr: &str,
        allow: &[&str],
    ) -> Rule {
        Rule {
            name: name.into(),
            keys: keys.iter().map(|k| Pattern::new(*k)).collect(),
            operations: ops.map(<[Operation]>::to_vec),
            attribute: attr.into(),
            allow: allow.iter().map(|a| Pattern::new(*a)).collect(),
        }
    }

    fn xks_policy() -> Policy {
        Policy::new(vec![
            rule(
                "account",
                &["*"],
                None,
                "awsPrincipalArn",
                &["arn:aws:iam::111122223333:*"],
            ),
            rule(
                "bind-key",
                &["k1"],
                Some(&[Operation::Encrypt, Operation::Decrypt]),
                "kmsKeyArn",
                &["arn:aws:kms:us-east-1:111122223333:key/abc"],
            ),
            rule(
                "via-ebs",
                &["k1"],
                Some(&[Operation::Decrypt]),
                "kmsViaService",
                &["ebs"],
            ),
        ])
    }

    fn results<'a>(d: &'a Decision<'_>) -> Vec<(&'a str, &'a StepResult<'a>)> {
        d.steps.iter().map(|s| (s.name, &s.result)).collect()
    }

    #[test]
    fn an_empty_policy_allows_and_says_no_rule_applied() {
        let p = sigv4();
        let policy = Policy::default();
        let d = xks(
            &policy,
            &XksRequest {
                principal: &p,
                key: "k1",
                op: Operation::Encrypt,
                metadata: XksMetadata::default(),
            },
        );
        let permit = d.outcome.as_ref().unwrap();
        assert_eq!(permit.key(), "k1");
        assert_eq!(permit.operation(), Operation::Encrypt);
        assert_eq!(permit.principal(), "AKID");
        assert_eq!(d.decided_by, DecidedBy::NoRuleApplied);
        assert_eq!(d.decided_by.name(), None);
        assert!(d.steps.is_empty());
    }

    #[test]
    fn xks_allow_names_the_rules_that_applied_and_skips_the_rest() {
        let p = sigv4();
        let policy = xks_policy();
        let metadata = XksMetadata {
            aws_principal_arn: Some("arn:aws:iam::111122223333:role/x"),
            kms_key_arn: Some("arn:aws:kms:us-east-1:111122223333:key/abc"),
            ..XksMetadata::default()
        };
        let d = xks(
            &policy,
            &XksRequest {
                principal: &p,
                key: "k1",
                op: Operation::Encrypt,
                metadata,
            },
        );
        assert!(d.is_allowed());
        assert_eq!(d.decided_by, DecidedBy::RulesAllowed);
        assert_eq!(
            results(&d),
            vec![
                (
                    "account",
                    &StepResult::Allowed {
                        matched: Some("arn:aws:iam::111122223333:*")
                    }
                ),
                (
                    "bind-key",
                    &StepResult::Allowed {
                        matched: Some("arn:aws:kms:us-east-1:111122223333:key/abc")
                    }
                ),
                (
                    "via-ebs",
                    &StepResult::Skipped("the rule does not cover this operation")
                ),
            ]
        );
        assert_eq!(d.steps[1].attribute, Some("kmsKeyArn"));

        // Metadata of another key: only the account rule applies.
        let d = xks(
            &policy,
            &XksRequest {
                principal: &p,
                key: "k2",
                op: Operation::KeyMetadata,
                metadata,
            },
        );
        assert_eq!(d.decided_by, DecidedBy::RulesAllowed);
        assert!(matches!(
            d.steps[1].result,
            StepResult::Skipped("the rule's keys do not include this key")
        ));
    }

    #[test]
    fn xks_denial_names_the_first_failing_rule_and_stops_there() {
        let p = sigv4();
        let policy = xks_policy();
        let metadata = XksMetadata {
            aws_principal_arn: Some("arn:aws:iam::111122223333:role/x"),
            kms_key_arn: Some("arn:aws:kms:us-east-1:999999999999:key/abc"),
            ..XksMetadata::default()
        };
        let d = xks(
            &policy,
            &XksRequest {
                principal: &p,
                key: "k1",
                op: Operation::Decrypt,
                metadata,
            },
        );
        assert_eq!(d.decided_by, DecidedBy::Rule("bind-key"));
        assert_eq!(d.decided_by.name(), Some("bind-key"));
        let denial = d.outcome.as_ref().unwrap_err();
        assert_eq!(denial.rule, "bind-key");
        assert_eq!(denial.reason, "kmsKeyArn is not an allowed value");
        assert_eq!(
            denial.to_string(),
            "denied by rule 'bind-key': kmsKeyArn is not an allowed value"
        );
        assert_eq!(
            d.steps[1].result,
            StepResult::Denied("kmsKeyArn is not an allowed value".into())
        );
        assert_eq!(d.steps[2].result, StepResult::NotReached);

        // An absent attribute never matches.
        let d = xks(
            &policy,
            &XksRequest {
                principal: &p,
                key: "k2",
                op: Operation::Encrypt,
                metadata: XksMetadata::default(),
            },
        );
        assert_eq!(d.decided_by, DecidedBy::Rule("account"));
        assert_eq!(
            d.outcome.unwrap_err().reason,
            "awsPrincipalArn is absent from the request"
        );
    }

    #[test]
    fn azure_rules_see_the_subject_and_the_pool() {
        let p = Principal::Certificate {
            subject: "mhsm-a.example".into(),
            fingerprint: "ab".into(),
        };
        let policy = Policy::new(vec![
            rule(
                "subject",
                &["*"],
                None,
                "clientCertificateSubject",
                &["mhsm-*.example"],
            ),
            rule(
                "pool",
                &["*"],
                Some(&[Operation::Wrap, Operation::Unwrap]),
                "poolName",
                &["pool-a"],
            ),
        ]);
        let req = AzureRequest {
            principal: &p,
            key: "k",
            op: Operation::Wrap,
            pool_name: "pool-a",
        };
        let d = azure(&policy, &req);
        assert_eq!(d.decided_by, DecidedBy::RulesAllowed);
        assert_eq!(d.outcome.unwrap().principal(), "mhsm-a.example");
        let d = azure(
            &policy,
            &AzureRequest {
                pool_name: "pool-b",
                ..req
            },
        );
        assert_eq!(d.decided_by, DecidedBy::Rule("pool"));
        // The pool rule does not cover metadata.
        let d = azure(
            &policy,
            &AzureRequest {
                pool_name: "pool-b",
                op: Operation::KeyMetadata,
                ..req
            },
        );
        assert!(d.is_allowed());
        let other = Principal::Certificate {
            subject: "other.example".into(),
            fingerprint: "cd".into(),
        };
        let d = azure(
            &policy,
            &AzureRequest {
                principal: &other,
                ..req
            },
        );
        assert_eq!(d.decided_by, DecidedBy::Rule("subject"));
        assert_eq!(
            d.outcome.unwrap_err().reason,
            "clientCertificateSubject is not an allowed value"
        );
    }

    fn access() -> KeyAccess {
        KeyAccess {
            grants: vec![
                Grant {
                    name: "kms-prod".into(),
                    principals: vec![Pattern::new("service-1@*")],
                    operations: vec![Operation::Wrap, Operation::Unwrap],
                },
                Grant {
                    name: "wrap-only".into(),
                    principals: vec![Pattern::new("service-2@*")],
                    operations: vec![Operation::Wrap],
                },
            ],
            resource_names: Some(vec![Pattern::new("projects/p1/*")]),
            reasons: AccessReasonPolicy {
                allow: KnownReason::from_name("CUSTOMER_INITIATED_ACCESS")
                    .into_iter()
                    .collect(),
                allow_absent: false,
                allow_unspecified: false,
                allow_unknown: false,
                allow_health_checks: false,
            },
        }
    }

    fn jwt(email: &str) -> Principal {
        Principal::Jwt {
            issuer: "google".into(),
            subject: "1".into(),
            email: email.into(),
        }
    }

    #[test]
    fn cloud_ekm_allow_names_the_grant_and_each_check() {
        let a = access();
        let p2 = jwt("service-2@x");
        let reason = AccessReason::from_code(5);
        let req = AccessRequest {
            principal: &p2,
            key: "k",
            hsm_key: "hsm-k",
            op: Operation::Wrap,
            resource_name: Some("projects/p1/keys/x"),
            reason: &reason,
            health_check: false,
        };
        let d = cloud_ekm(&a, &req);
        assert_eq!(d.decided_by, DecidedBy::Grant("wrap-only"));
        assert_eq!(d.decided_by.name(), Some("wrap-only"));
        let permit = d.outcome.as_ref().unwrap();
        assert_eq!(permit.key(), "hsm-k");
        assert_eq!(permit.principal(), "service-2@x");
        assert_eq!(
            results(&d),
            vec![
                (
                    "kms-prod",
                    &StepResult::Skipped("the caller is not one of the grant's service accounts")
                ),
                (
                    "wrap-only",
                    &StepResult::Allowed {
                        matched: Some("service-2@*")
                    }
                ),
                (
                    RULE_GRANTS,
                    &StepResult::Allowed {
                        matched: Some("wrap-only")
                    }
                ),
                (
                    RULE_RESOURCE_NAMES,
                    &StepResult::Allowed {
                        matched: Some("projects/p1/*")
                    }
                ),
                (RULE_ACCESS_REASONS, &StepResult::Allowed { matched: None }),
            ]
        );
    }

    #[test]
    fn cloud_ekm_denials_name_their_check() {
        let a = access();
        let p1 = jwt("service-1@x");
        let p2 = jwt("service-2@x");
        let ok = AccessReason::from_code(5);
        let req = AccessRequest {
            principal: &p1,
            key: "k",
            hsm_key: "hsm-k",
            op: Operation::Unwrap,
            resource_name: Some("projects/p1/keys/x"),
            reason: &ok,
            health_check: false,
        };
        assert_eq!(cloud_ekm(&a, &req).decided_by, DecidedBy::Grant("kms-prod"));

        // No grant covers service-2 unwrapping: the `grants` check denies, the rest is not reached.
        let d = cloud_ekm(
            &a,
            &AccessRequest {
                principal: &p2,
                ..req
            },
        );
        assert_eq!(d.decided_by, DecidedBy::Rule(RULE_GRANTS));
        let denial = d.outcome.as_ref().unwrap_err();
        assert_eq!(denial.rule, RULE_GRANTS);
        assert!(denial.reason.contains("service-2@x") && denial.reason.contains("unwrap"));
        assert_eq!(
            d.steps[1].result,
            StepResult::Skipped("the grant does not cover this operation")
        );
        assert_eq!(d.steps[3].result, StepResult::NotReached);
        assert_eq!(d.steps[4].result, StepResult::NotReached);

        for resource in [Some("projects/p2/keys/x"), None] {
            let d = cloud_ekm(
                &a,
                &AccessRequest {
                    resource_name: resource,
                    ..req
                },
            );
            assert_eq!(d.decided_by, DecidedBy::Rule(RULE_RESOURCE_NAMES));
        }

        let bad = AccessReason::from_code(3);
        let d = cloud_ekm(
            &a,
            &AccessRequest {
                reason: &bad,
                ..req
            },
        );
        assert_eq!(d.decided_by, DecidedBy::Rule(RULE_ACCESS_REASONS));
        let denial = d.outcome.unwrap_err();
        assert_eq!(denial.rule, RULE_ACCESS_REASONS);
        assert!(denial.reason.contains("THIRD_PARTY_DATA_REQUEST"));
    }

    #[test]
    fn decided_by_reads_well() {
        assert_eq!(DecidedBy::Rule("r").to_string(), "rule 'r'");
        assert_eq!(DecidedBy::Grant("g").to_string(), "grant 'g'");
        assert!(
            DecidedBy::NoRuleApplied
                .to_string()
                .starts_with("no rule applied")
        );
    }
}
