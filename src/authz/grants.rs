//! Per-key grants: which principals may do which operations on one external key, which resources
//! may name it, and which access justifications it accepts. Used by fronts whose callers are
//! identified per key (Google Cloud EKM service agents), where the XKS-style attribute rules of
//! [`super::Policy`] do not fit.
//!
//! This is data; [`super::decide::cloud_ekm`] evaluates it: checks run in a fixed order (grant,
//! resource name, justification) and the first failure is the denial, named by one of the rule
//! names below. Knows nothing of HTTP, JSON or the HSM.

use super::Pattern;
use super::access_reason::{AccessReason, AccessReasonPolicy};
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
