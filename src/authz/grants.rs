//! Per-key grants: which principals may do which operations on one external key, which resources
//! may name it, and which access justifications it accepts. Used by fronts whose callers are
//! identified per key (Google Cloud EKM service agents), where the XKS-style attribute rules of
//! [`super::Policy`] do not fit.
//!
//! Checks run in a fixed order (grant, resource name, justification) and the first failure is the
//! denial, naming its rule. Knows nothing of HTTP, JSON or the HSM.

use super::access_reason::{AccessReason, AccessReasonPolicy};
use super::{Denial, Pattern, Permit};
use crate::auth::Principal;
use crate::core::Operation;

/// Rule name reported when no grant matches.
pub const RULE_GRANTS: &str = "grants";
/// Rule name reported when the resource name is not allowed.
pub const RULE_RESOURCE_NAMES: &str = "resource_names";
/// Rule name reported when the justification is not allowed.
pub const RULE_ACCESS_REASONS: &str = "access_reasons";

/// One named grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Operator-chosen name (audit lines show which grant allowed a request).
    pub name: String,
    /// Principal names (e.g. service-account emails) allowed, as globs.
    pub principals: Vec<Pattern>,
    /// Operations allowed.
    pub operations: Vec<Operation>,
}

/// The access rules of one external key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAccess {
    /// Grants; a request needs one that matches its principal and operation.
    pub grants: Vec<Grant>,
    /// When set, the request's resource name must match one of these.
    pub resource_names: Option<Vec<Pattern>>,
    /// Accepted justifications.
    pub reasons: AccessReasonPolicy,
}

/// What one request asks for.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    /// Who is calling.
    pub principal: &'a Principal,
    /// The external key (as the caller names it).
    pub key: &'a str,
    /// The HSM key the operation will use (what the permit is for).
    pub hsm_key: &'a str,
    /// The operation.
    pub op: Operation,
    /// The caller's name for the resource using the key, if given.
    pub resource_name: Option<&'a str>,
    /// The justification.
    pub reason: &'a AccessReason,
    /// Whether the caller marked the request as a key health check.
    pub health_check: bool,
}

/// A positive decision: the permit and the grant that allowed it.
#[derive(Debug, Clone)]
pub struct Granted {
    /// Proof for the core.
    pub permit: Permit,
    /// The grant's name, for the audit line.
    pub grant: String,
}

impl KeyAccess {
    /// Decide.
    pub fn authorize(&self, req: &AccessRequest<'_>) -> Result<Granted, Denial> {
        let who = req.principal.name();
        let grant = self
            .grants
            .iter()
            .find(|g| g.operations.contains(&req.op) && g.principals.iter().any(|p| p.matches(who)))
            .ok_or_else(|| Denial {
                rule: RULE_GRANTS.into(),
                reason: format!(
                    "no grant allows {who} to {} key {}",
                    req.op.as_str(),
                    req.key
                ),
            })?;
        if let Some(allowed) = &self.resource_names {
            match req.resource_name {
                None => {
                    return Err(Denial {
                        rule: RULE_RESOURCE_NAMES.into(),
                        reason:
                            "the request names no resource, and this key is pinned to resources"
                                .into(),
                    });
                }
                Some(name) if !allowed.iter().any(|p| p.matches(name)) => {
                    return Err(Denial {
                        rule: RULE_RESOURCE_NAMES.into(),
                        reason: format!("resource {name} may not use this key"),
                    });
                }
                Some(_) => {}
            }
        }
        self.reasons
            .check(req.reason, req.health_check)
            .map_err(|reason| Denial {
                rule: RULE_ACCESS_REASONS.into(),
                reason,
            })?;
        Ok(Granted {
            permit: Permit {
                principal: who.to_owned(),
                key: req.hsm_key.to_owned(),
                op: req.op,
            },
            grant: grant.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::access_reason::KnownReason;
    use super::*;

    fn access() -> KeyAccess {
        KeyAccess {
            grants: vec![
                Grant {
                    name: "kms-prod".into(),
                    principals: vec![Pattern::new(
                        "service-1@gcp-sa-ekms.iam.gserviceaccount.com",
                    )],
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
                allow: vec![KnownReason::from_code(5).unwrap()],
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
    fn grant_resource_and_reason_each_deny_with_their_rule() {
        let a = access();
        let p1 = jwt("service-1@gcp-sa-ekms.iam.gserviceaccount.com");
        let p2 = jwt("service-2@gcp-sa-ekms.iam.gserviceaccount.com");
        let ok_reason = AccessReason::from_code(5);
        let req = AccessRequest {
            principal: &p1,
            key: "k",
            hsm_key: "hsm-k",
            op: Operation::Unwrap,
            resource_name: Some("projects/p1/keys/x"),
            reason: &ok_reason,
            health_check: false,
        };
        let granted = a.authorize(&req).unwrap();
        assert_eq!(granted.grant, "kms-prod");
        assert_eq!(granted.permit.key(), "hsm-k");
        assert_eq!(granted.permit.operation(), Operation::Unwrap);
        assert_eq!(
            granted.permit.principal(),
            "service-1@gcp-sa-ekms.iam.gserviceaccount.com"
        );

        let d = a
            .authorize(&AccessRequest {
                principal: &p2,
                ..req
            })
            .unwrap_err();
        assert_eq!(d.rule, RULE_GRANTS);
        assert!(d.reason.contains("service-2@") && d.reason.contains("unwrap"));
        assert!(
            a.authorize(&AccessRequest {
                principal: &p2,
                op: Operation::Wrap,
                ..req
            })
            .is_ok()
        );

        let d = a
            .authorize(&AccessRequest {
                resource_name: Some("projects/p2/keys/x"),
                ..req
            })
            .unwrap_err();
        assert_eq!(d.rule, RULE_RESOURCE_NAMES);
        let d = a
            .authorize(&AccessRequest {
                resource_name: None,
                ..req
            })
            .unwrap_err();
        assert_eq!(d.rule, RULE_RESOURCE_NAMES);

        let bad = AccessReason::from_code(3);
        let d = a
            .authorize(&AccessRequest {
                reason: &bad,
                ..req
            })
            .unwrap_err();
        assert_eq!(d.rule, RULE_ACCESS_REASONS);
        assert!(d.reason.contains("THIRD_PARTY_DATA_REQUEST"));
    }
}
