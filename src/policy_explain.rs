//! `ekm-proxy policy explain`: given the configuration and a sample request (front, key store or
//! prefix, key, operation, caller and protocol metadata such as `awsPrincipalArn`, `kmsKeyArn`,
//! the Key Access Justification or the certificate subject), say whether the server would allow
//! it and what decided: the key store's or key's own switch and key list, then the rule that
//! denied, the Cloud EKM grant that allowed, or that no rule applied.
//!
//! The decision is made by the code the server runs: each front's `serves` check and
//! `authz::decide`. Authentication is assumed to have succeeded (the sample names the caller it
//! would have proved), and checks of the request body that are not policy (sizes, base64, a Cloud
//! EKM blob's key version) are not explained.
//!
//! Depends on `config` (to read the file without its secrets), the fronts' settings types and
//! `authz`. Must never depend on `hsm` or `server`: explaining a policy must work without the
//! token and without listening, e.g. on an operator's laptop.
//!
//! The request file is JSON, one object with `front` = `xks`, `gcp` or `azure` (README, "Policy");
//! unknown or missing fields are refused, never guessed.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::authz::Policy;
use crate::authz::access_reason::AccessReason;
use crate::authz::decide::{
    self, AccessRequest, AzureRequest, DecidedBy, Decision, StepKind, StepResult, XksMetadata,
    XksRequest,
};
use crate::authz::grants::RULE_GRANTS;
use crate::config::{self, ConfigError, EXIT_CONFIG, Settings};
use crate::core::Operation;
use crate::front::xks::NotServed;

/// Exit code when the request is allowed.
pub const EXIT_ALLOW: i32 = 0;
/// Exit code when the request is denied.
pub const EXIT_DENY: i32 = 1;

/// Why there is no explanation.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The configuration file is unusable.
    #[error("{0}")]
    Config(ConfigError),
    /// The request file cannot be read, is not the documented JSON, or names a key store,
    /// prefix or section the configuration does not have.
    #[error("request: {0}")]
    Request(String),
}

impl ExplainError {
    /// Both are bad input: exit 64, as for configuration errors.
    pub fn exit_code(&self) -> i32 {
        EXIT_CONFIG
    }
}

/// What decided, in output form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decider {
    /// `setting` (the key store's, prefix's or key's switch or key list), `rule`, `grant`,
    /// `rules` (every rule that applied allowed) or `none` (no rule applied).
    pub kind: &'static str,
    /// The setting, rule or grant name, when one decided.
    pub name: Option<String>,
}

/// One line of the evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// `setting`, `rule`, `grant` or `check` (a Cloud EKM check).
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// `passed`, `allowed`, `denied`, `skipped` or `not reached`.
    pub result: &'static str,
    /// Why, or what matched.
    pub detail: Option<String>,
}

/// The answer: the decision, what decided, and everything evaluated on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// `xks`, `gcp` or `azure`.
    pub front: &'static str,
    /// The XKS key store or Azure prefix (by name); `None` for Cloud EKM.
    pub scope: Option<String>,
    /// The key as the request names it.
    pub key: String,
    /// The operation.
    pub operation: Operation,
    /// Whether the server would allow it.
    pub allowed: bool,
    /// What decided.
    pub decided_by: Decider,
    /// Why it was denied (the denial's reason, as the server logs it).
    pub reason: Option<String>,
    /// Settings, rules, grants and checks in evaluation order.
    pub lines: Vec<Line>,
}

impl Explanation {
    /// [`EXIT_ALLOW`] or [`EXIT_DENY`].
    pub fn exit_code(&self) -> i32 {
        if self.allowed { EXIT_ALLOW } else { EXIT_DENY }
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "decision:   {}\n",
            if self.allowed { "ALLOW" } else { "DENY" }
        );
        let decider = match (self.decided_by.kind, &self.decided_by.name) {
            ("rules", _) => "every rule that applied allowed it".to_owned(),
            ("none", _) => "no rule applied (none covers this key and operation)".to_owned(),
            (kind, Some(name)) => format!("{kind} '{name}'"),
            (kind, None) => kind.to_owned(),
        };
        out.push_str(&format!("decided by: {decider}\n"));
        if let Some(reason) = &self.reason {
            out.push_str(&format!("reason:     {reason}\n"));
        }
        let scope = match (self.front, &self.scope) {
            ("xks", Some(s)) => format!("XKS key store '{s}', "),
            ("azure", Some(s)) => format!("Azure prefix '{s}', "),
            ("gcp", _) => "Cloud EKM ".to_owned(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "request:    {scope}key '{}', {}\n",
            self.key,
            self.operation.as_str()
        ));
        out.push_str("evaluated:\n");
        let width = self
            .lines
            .iter()
            .map(|l| l.name.chars().count())
            .max()
            .unwrap_or(0);
        for l in &self.lines {
            let result = if l.result == "denied" {
                "DENIED"
            } else {
                l.result
            };
            let detail = l.detail.as_deref().unwrap_or("");
            let line = format!("  {:<7} {:<width$}  {result:<11}  {detail}", l.kind, l.name);
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if self.lines.is_empty() {
            out.push_str("  (no rules)\n");
        }
        out
    }

    /// The machine-readable report (one JSON object).
    pub fn to_json(&self) -> String {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .map(|l| {
                json!({
                    "kind": l.kind,
                    "name": l.name,
                    "result": l.result,
                    "detail": l.detail,
                })
            })
            .collect();
        let mut v = json!({
            "front": self.front,
            "key": self.key,
            "operation": self.operation.as_str(),
            "decision": if self.allowed { "allow" } else { "deny" },
            "decidedBy": { "kind": self.decided_by.kind, "name": self.decided_by.name },
            "reason": self.reason,
            "evaluated": lines,
        });
        if let (Some(scope), Some(obj)) = (&self.scope, v.as_object_mut()) {
            let field = if self.front == "azure" {
                "prefix"
            } else {
                "keyStore"
            };
            obj.insert(field.into(), json!(scope));
        }
        // Serializing a Value of strings cannot fail; an empty object is still valid JSON.
        serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into())
    }
}

/// Load `config` (without resolving the HSM PIN or SigV4 secrets) and explain the request in the file `request`
/// (`-` for standard input).
pub fn run(config: &Path, request: &Path) -> Result<Explanation, ExplainError> {
    let settings = config::load_without_secrets(config).map_err(ExplainError::Config)?;
    let text = if request == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(request)
    }
    .map_err(|e| ExplainError::Request(format!("cannot read {}: {e}", request.display())))?;
    explain(&settings, &text)
}

/// Explain one sample request (the JSON text of the request file) against validated settings.
pub fn explain(settings: &Settings, request: &str) -> Result<Explanation, ExplainError> {
    let sample: Sample =
        serde_json::from_str(request).map_err(|e| ExplainError::Request(e.to_string()))?;
    match sample {
        Sample::Xks(s) => explain_xks(settings, &s),
        Sample::Gcp(s) => explain_gcp(settings, &s),
        Sample::Azure(s) => explain_azure(settings, &s),
    }
}

// ---------------------------------------------------------------------------------------------
// The request file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(tag = "front", rename_all = "lowercase")]
enum Sample {
    Xks(XksSample),
    Gcp(GcpSample),
    Azure(AzureSample),
}

/// `{"front": "xks", "keyStore", "key", "operation", "principal"?, "metadata"?}`
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct XksSample {
    /// Key store name or path prefix.
    key_store: String,
    key: String,
    operation: String,
    /// The SigV4 access key id (the rules do not look at it).
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    metadata: XksSampleMetadata,
}

/// The `requestMetadata` fields rules may constrain; absent ones are absent from the request.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct XksSampleMetadata {
    aws_principal_arn: Option<String>,
    aws_source_vpc: Option<String>,
    aws_source_vpce: Option<String>,
    kms_key_arn: Option<String>,
    kms_operation: Option<String>,
    kms_request_id: Option<String>,
    kms_via_service: Option<String>,
}

/// `{"front": "gcp", "key", "operation", "principal", "reason"?, "resource"?, "healthCheck"?}`
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GcpSample {
    /// The key path.
    key: String,
    operation: String,
    /// The token's `email`: the service account.
    principal: String,
    /// The KAJ reason as Cloud KMS sends it (enum name or number); absent: no justification.
    #[serde(default)]
    reason: Option<Value>,
    /// `relativeResourceName`.
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    health_check: bool,
}

/// `{"front": "azure", "prefix", "key", "operation", "subject", "poolName"}`
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AzureSample {
    /// Prefix name or path prefix.
    prefix: String,
    key: String,
    operation: String,
    /// The client certificate subject the prefix accepted (CN or DNS SAN).
    subject: String,
    /// `request_context.pool_name`.
    pool_name: String,
}

/// Operation names each front's sample may use: the protocol's and the config's.
const XKS_OPERATIONS: &[(&str, Operation)] = &[
    ("GetKeyMetadata", Operation::KeyMetadata),
    ("metadata", Operation::KeyMetadata),
    ("Encrypt", Operation::Encrypt),
    ("encrypt", Operation::Encrypt),
    ("Decrypt", Operation::Decrypt),
    ("decrypt", Operation::Decrypt),
];
const GCP_OPERATIONS: &[(&str, Operation)] =
    &[("wrap", Operation::Wrap), ("unwrap", Operation::Unwrap)];
const AZURE_OPERATIONS: &[(&str, Operation)] = &[
    ("metadata", Operation::KeyMetadata),
    ("wrapKey", Operation::Wrap),
    ("wrapkey", Operation::Wrap),
    ("wrap", Operation::Wrap),
    ("unwrapKey", Operation::Unwrap),
    ("unwrapkey", Operation::Unwrap),
    ("unwrap", Operation::Unwrap),
];

fn operation(table: &[(&str, Operation)], name: &str) -> Result<Operation, ExplainError> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, op)| *op)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            ExplainError::Request(format!(
                "operation '{name}' is not one of {}",
                names.join(", ")
            ))
        })
}

// ---------------------------------------------------------------------------------------------
// Per front
// ---------------------------------------------------------------------------------------------

fn explain_xks(settings: &Settings, s: &XksSample) -> Result<Explanation, ExplainError> {
    let op = operation(XKS_OPERATIONS, &s.operation)?;
    let stores = &settings.xks.key_stores;
    let store = stores
        .iter()
        .find(|k| k.name == s.key_store)
        .or_else(|| stores.iter().find(|k| k.prefix == s.key_store))
        .ok_or_else(|| {
            let names: Vec<&str> = stores.iter().map(|k| k.name.as_str()).collect();
            ExplainError::Request(format!(
                "no XKS key store is named or prefixed '{}' (key stores: {})",
                s.key_store,
                list(&names)
            ))
        })?;
    let mut out = Explanation {
        front: "xks",
        scope: Some(store.name.clone()),
        key: s.key.clone(),
        operation: op,
        allowed: false,
        decided_by: Decider {
            kind: "none",
            name: None,
        },
        reason: None,
        lines: Vec::new(),
    };
    if let Err(refusal) = store.serves(&s.key) {
        let why = match refusal {
            NotServed::Disabled => "the key store is disabled (enabled = false)".to_owned(),
            NotServed::NotExposed => format!(
                "key '{}' is not among the key store's keys (or is the health-check key)",
                s.key
            ),
        };
        return Ok(refused(out, refusal.setting(), why, Some(&store.policy)));
    }
    out.lines.extend(served(&s.key));
    let principal = Principal::SigV4 {
        access_key_id: s.principal.clone().unwrap_or_else(|| "-".into()),
        region: String::new(),
    };
    let m = &s.metadata;
    let metadata = XksMetadata {
        aws_principal_arn: m.aws_principal_arn.as_deref(),
        aws_source_vpc: m.aws_source_vpc.as_deref(),
        aws_source_vpce: m.aws_source_vpce.as_deref(),
        kms_key_arn: m.kms_key_arn.as_deref(),
        kms_operation: m.kms_operation.as_deref(),
        kms_request_id: m.kms_request_id.as_deref(),
        kms_via_service: m.kms_via_service.as_deref(),
    };
    let decision = decide::xks(
        &store.policy,
        &XksRequest {
            principal: &principal,
            key: &s.key,
            op,
            metadata,
        },
    );
    Ok(decided(out, &decision))
}

fn explain_gcp(settings: &Settings, s: &GcpSample) -> Result<Explanation, ExplainError> {
    let op = operation(GCP_OPERATIONS, &s.operation)?;
    let gcp = settings.gcp.as_ref().ok_or_else(|| {
        ExplainError::Request("the configuration has no [gcp] section".to_owned())
    })?;
    let reason = match &s.reason {
        None | Some(Value::Null) => AccessReason::Absent,
        Some(Value::String(text)) => AccessReason::from_json_string(text)
            .map_err(|e| ExplainError::Request(format!("reason: {e}")))?,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not an integer"))
            .and_then(|n| AccessReason::from_json_number(n).map_err(|e| e.to_string()))
            .map_err(|e| ExplainError::Request(format!("reason: {e}")))?,
        Some(other) => {
            return Err(ExplainError::Request(format!(
                "reason must be a Reason enum name or number, not {other}"
            )));
        }
    };
    let mut out = Explanation {
        front: "gcp",
        scope: None,
        key: s.key.clone(),
        operation: op,
        allowed: false,
        decided_by: Decider {
            kind: "none",
            name: None,
        },
        reason: None,
        lines: Vec::new(),
    };
    // The server's lookup, by exact key path, then the key's switch.
    let Some(key) = gcp.keys.iter().find(|k| k.path == s.key) else {
        let why = format!("no [[gcp.key]] has path '{}'", s.key);
        return Ok(refused(out, "key", why, None));
    };
    if !key.enabled {
        let why = "the key is disabled (enabled = false)".to_owned();
        return Ok(refused(out, "enabled", why, None));
    }
    let found = format!("key path '{}' is configured", key.path);
    out.lines.push(setting("key", "passed", Some(found)));
    out.lines.push(setting("enabled", "passed", None));
    let principal = Principal::Jwt {
        issuer: String::new(),
        subject: String::new(),
        email: s.principal.clone(),
    };
    let decision = decide::cloud_ekm(
        &key.access,
        &AccessRequest {
            principal: &principal,
            key: &key.path,
            hsm_key: &key.hsm_key,
            op,
            resource_name: s.resource.as_deref().filter(|r| !r.is_empty()),
            reason: &reason,
            health_check: s.health_check,
        },
    );
    Ok(decided(out, &decision))
}

fn explain_azure(settings: &Settings, s: &AzureSample) -> Result<Explanation, ExplainError> {
    let op = operation(AZURE_OPERATIONS, &s.operation)?;
    let azure = settings.azure.as_ref().ok_or_else(|| {
        ExplainError::Request("the configuration has no [azure] section".to_owned())
    })?;
    let prefixes = &azure.prefixes;
    let prefix = prefixes
        .iter()
        .find(|p| p.name == s.prefix)
        .or_else(|| prefixes.iter().find(|p| p.prefix == s.prefix))
        .ok_or_else(|| {
            let names: Vec<&str> = prefixes.iter().map(|p| p.name.as_str()).collect();
            ExplainError::Request(format!(
                "no Azure prefix is named or has path '{}' (prefixes: {})",
                s.prefix,
                list(&names)
            ))
        })?;
    let mut out = Explanation {
        front: "azure",
        scope: Some(prefix.name.clone()),
        key: s.key.clone(),
        operation: op,
        allowed: false,
        decided_by: Decider {
            kind: "none",
            name: None,
        },
        reason: None,
        lines: Vec::new(),
    };
    if let Err(refusal) = prefix.serves(&s.key) {
        let why = match refusal {
            NotServed::Disabled => "the prefix is disabled (enabled = false)".to_owned(),
            NotServed::NotExposed => format!(
                "key '{}' is not among the prefix's keys (or is the health-check key)",
                s.key
            ),
        };
        return Ok(refused(out, refusal.setting(), why, Some(&prefix.policy)));
    }
    out.lines.extend(served(&s.key));
    let principal = Principal::Certificate {
        subject: s.subject.clone(),
        fingerprint: String::new(),
    };
    let decision = decide::azure(
        &prefix.policy,
        &AzureRequest {
            principal: &principal,
            key: &s.key,
            op,
            pool_name: &s.pool_name,
        },
    );
    Ok(decided(out, &decision))
}

// ---------------------------------------------------------------------------------------------
// Building the report
// ---------------------------------------------------------------------------------------------

fn setting(name: &str, result: &'static str, detail: Option<String>) -> Line {
    Line {
        kind: "setting",
        name: name.to_owned(),
        result,
        detail,
    }
}

/// The lines of a key store or prefix that serves the key.
fn served(key: &str) -> [Line; 2] {
    [
        setting("enabled", "passed", None),
        setting("keys", "passed", Some(format!("key '{key}' is exposed"))),
    ]
}

/// Refused by a setting before any rule: the policy's rules (if any) are listed as not reached.
fn refused(mut out: Explanation, name: &str, why: String, policy: Option<&Policy>) -> Explanation {
    out.lines.push(setting(name, "denied", Some(why.clone())));
    let rules = policy.map(Policy::rules).unwrap_or_default();
    out.lines.extend(rules.iter().map(|r| Line {
        kind: "rule",
        name: r.name.clone(),
        result: "not reached",
        detail: None,
    }));
    out.allowed = false;
    out.decided_by = Decider {
        kind: "setting",
        name: Some(name.to_owned()),
    };
    out.reason = Some(why);
    out
}

/// The decision of `authz::decide`, in output form.
fn decided(mut out: Explanation, decision: &Decision<'_>) -> Explanation {
    for step in &decision.steps {
        let (result, detail) = match &step.result {
            StepResult::Allowed { matched } => (
                "allowed",
                matched.map(|m| match (step.kind, step.attribute) {
                    (_, Some(attribute)) => format!("{attribute} matches '{m}'"),
                    (StepKind::Grant, None) => format!("service account matches '{m}'"),
                    (_, None) if step.name == RULE_GRANTS => format!("by grant '{m}'"),
                    (_, None) => format!("matches '{m}'"),
                }),
            ),
            StepResult::Denied(reason) => ("denied", Some(reason.clone())),
            StepResult::Skipped(why) => ("skipped", Some((*why).to_owned())),
            StepResult::NotReached => ("not reached", None),
        };
        out.lines.push(Line {
            kind: step.kind.as_str(),
            name: step.name.to_owned(),
            result,
            detail,
        });
    }
    out.allowed = decision.is_allowed();
    out.reason = decision.outcome.as_ref().err().map(|d| d.reason.clone());
    out.decided_by = Decider {
        kind: match decision.decided_by {
            DecidedBy::Rule(_) => "rule",
            DecidedBy::Grant(_) => "grant",
            DecidedBy::RulesAllowed => "rules",
            DecidedBy::NoRuleApplied => "none",
        },
        name: decision.decided_by.name().map(str::to_owned),
    };
    out
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_fields_are_refused() {
        for (text, want) in [
            (r#"{"key":"k"}"#, "missing field `front`"),
            (r#"{"front":"aws"}"#, "unknown variant `aws`"),
            (
                r#"{"front":"xks","keyStore":"dev","key":"k","operation":"Encrypt","colour":1}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"front":"xks","keyStore":"dev","key":"k","operation":"Encrypt","metadata":{"kmsKeyARN":"x"}}"#,
                "unknown field `kmsKeyARN`",
            ),
            (
                r#"{"front":"gcp","key":"k","operation":"wrap"}"#,
                "missing field `principal`",
            ),
            (
                r#"{"front":"azure","prefix":"p","key":"k","operation":"wrapKey","subject":"s"}"#,
                "missing field `poolName`",
            ),
        ] {
            let err = serde_json::from_str::<Sample>(text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let ok: Sample = serde_json::from_str(
            r#"{"front":"xks","keyStore":"dev","key":"k","operation":"Encrypt","metadata":{"kmsKeyArn":"x"}}"#,
        )
        .unwrap();
        assert!(matches!(ok, Sample::Xks(ref s) if s.metadata.kms_key_arn.as_deref() == Some("x")));
    }

    #[test]
    fn operations_accept_protocol_and_config_names_only() {
        assert_eq!(
            operation(XKS_OPERATIONS, "GetKeyMetadata").unwrap(),
            Operation::KeyMetadata
        );
        assert_eq!(
            operation(AZURE_OPERATIONS, "unwrapKey").unwrap(),
            Operation::Unwrap
        );
        let err = operation(GCP_OPERATIONS, "encrypt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrap, unwrap"), "{err}");
    }

    #[test]
    fn reports_read_as_documented() {
        let out = Explanation {
            front: "xks",
            scope: Some("dev".into()),
            key: "k1".into(),
            operation: Operation::Encrypt,
            allowed: false,
            decided_by: Decider {
                kind: "rule",
                name: Some("bind-key".into()),
            },
            reason: Some("kmsKeyArn is not an allowed value".into()),
            lines: vec![
                Line {
                    kind: "rule",
                    name: "account".into(),
                    result: "allowed",
                    detail: Some("awsPrincipalArn matches 'arn:*'".into()),
                },
                Line {
                    kind: "rule",
                    name: "bind-key".into(),
                    result: "denied",
                    detail: Some("kmsKeyArn is not an allowed value".into()),
                },
            ],
        };
        let text = out.to_text();
        assert!(
            text.starts_with("decision:   DENY\ndecided by: rule 'bind-key'\n"),
            "{text}"
        );
        assert!(
            text.contains("  rule    bind-key  DENIED       kmsKeyArn"),
            "{text}"
        );
        assert_eq!(out.exit_code(), EXIT_DENY);
        let v: Value = serde_json::from_str(&out.to_json()).unwrap();
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["keyStore"], "dev");
        assert_eq!(v["decidedBy"]["name"], "bind-key");
        assert_eq!(v["evaluated"][1]["result"], "denied");
    }
}
