//! Validation of the `[gcp]` section into [`GcpSettings`]: the key URI prefix, token issuers
//! (JWKS source, audiences, algorithms), the default and per-key Key Access Justification
//! policies, the keys with their grants, and the per-service-account request-rate quotas. Every
//! problem is reported with its key path.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use super::raw::{RawAccessReasons, RawGcp, RawGcpKey, RawIssuer, RawQuotaOverride};
use super::validate::{Collector, quota, resolve, token_bucket};
use crate::auth::jwt::{IssuerSettings, JwksSource, JwtSettings, check_jwks_file, parse_algorithm};
use crate::authz::Pattern;
use crate::authz::access_reason::{AccessReasonPolicy, KnownReason};
use crate::authz::grants::{Grant, KeyAccess};
use crate::core::Operation;
use crate::core::quota::TokenBucket;
use crate::front::gcp::settings::{GcpKeySettings, GcpLimits, GcpQuotas, GcpSettings, key_path_ok};

/// Default verified-token cache size.
const DEFAULT_TOKEN_CACHE: u64 = 10_000;

/// Validate `[gcp]`.
pub(super) fn gcp(
    raw: &RawGcp,
    base: &Path,
    health_key: &str,
    c: &mut Collector,
) -> Option<GcpSettings> {
    let before = c.problems.len();
    let p = &raw.path_prefix;
    if !p.starts_with('/')
        || p.ends_with('/')
        || p.contains("//")
        || p.contains(':')
        || !p.bytes().all(|b| b.is_ascii_graphic())
    {
        c.add(
            "gcp.path_prefix",
            "must be '/segment[/segment…]' of printable characters, no ':' and no trailing '/'",
        );
    }
    let limits = GcpLimits {
        max_plaintext: raw
            .max_plaintext_bytes
            .unwrap_or(GcpLimits::default().max_plaintext),
        max_aad: raw.max_aad_bytes.unwrap_or(GcpLimits::default().max_aad),
    };
    if limits.max_plaintext == 0 {
        c.add("gcp.max_plaintext_bytes", "must be greater than 0");
    }
    if raw.issuer.is_empty() {
        c.add(
            "gcp.issuer",
            "at least one [[gcp.issuer]] is required: tokens are verified against it",
        );
    }
    let mut names = HashSet::new();
    let issuers: Vec<IssuerSettings> = raw
        .issuer
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let at = format!("gcp.issuer[{i}]");
            if !names.insert(r.name.clone()) {
                c.add(
                    format!("{at}.name"),
                    format!("duplicate issuer name '{}'", r.name),
                );
            }
            issuer(r, &at, base, c)
        })
        .collect();
    let default_reasons = match &raw.access_reasons {
        Some(r) => access_reasons(r, "gcp.access_reasons", c),
        None => {
            if !raw.key.is_empty() {
                c.add(
                    "gcp.access_reasons",
                    "[gcp.access_reasons] is required: decide which Key Access Justifications may use your keys",
                );
            }
            None
        }
    };
    if raw.key.is_empty() {
        c.add("gcp.key", "at least one [[gcp.key]] is required");
    }
    let mut paths = HashSet::new();
    let keys: Vec<GcpKeySettings> = raw
        .key
        .iter()
        .enumerate()
        .filter_map(|(i, k)| {
            let at = format!("gcp.key[{i}]");
            if !paths.insert(k.path.clone()) {
                c.add(
                    format!("{at}.path"),
                    format!("duplicate key path '{}'", k.path),
                );
            }
            key(k, &at, default_reasons.as_ref(), health_key, c)
        })
        .collect();
    let quotas = GcpQuotas {
        default: raw.quota.as_ref().and_then(|q| quota(q, "gcp.quota", c)),
        overrides: quota_overrides(&raw.quota_override, &raw.issuer, c),
    };
    (c.problems.len() == before).then(|| GcpSettings {
        prefix: raw.path_prefix.clone(),
        jwt: JwtSettings {
            issuers,
            token_cache_capacity: raw.token_cache_capacity.unwrap_or(DEFAULT_TOKEN_CACHE),
        },
        keys,
        limits,
        quotas,
    })
}

/// `[[gcp.quota_override]]`: one per service account, each naming an account some issuer accepts
/// (an override nobody can authenticate as is a typo, found now rather than under load).
fn quota_overrides(
    raw: &[RawQuotaOverride],
    issuers: &[RawIssuer],
    c: &mut Collector,
) -> HashMap<String, TokenBucket> {
    let mut out = HashMap::new();
    let mut seen = HashSet::new();
    for (i, o) in raw.iter().enumerate() {
        let at = format!("gcp.quota_override[{i}]");
        let account = o.service_account.as_str();
        if account.is_empty() || !account.contains('@') {
            c.add(
                format!("{at}.service_account"),
                "must be a service account email (the token's 'email' claim)",
            );
        } else if !seen.insert(account) {
            c.add(
                format!("{at}.service_account"),
                format!("duplicate quota override for '{account}'"),
            );
        } else if !issuers.iter().any(|issuer| {
            issuer
                .service_accounts
                .iter()
                .any(|glob| Pattern::new(glob).matches(account))
        }) {
            c.add(
                format!("{at}.service_account"),
                format!(
                    "'{account}' matches no issuer's service_accounts: its tokens are refused, so the override never applies"
                ),
            );
        }
        if let Some(limit) = token_bucket(o.rate, o.burst, &at, c) {
            out.entry(account.to_owned()).or_insert(limit);
        }
    }
    out
}

fn issuer(r: &RawIssuer, at: &str, base: &Path, c: &mut Collector) -> Option<IssuerSettings> {
    let before = c.problems.len();
    if r.issuers.is_empty() || r.issuers.iter().any(String::is_empty) {
        c.add(
            format!("{at}.issuers"),
            "list the accepted 'iss' values (e.g. \"https://accounts.google.com\")",
        );
    }
    if r.audiences.is_empty() || r.audiences.iter().any(String::is_empty) {
        c.add(
            format!("{at}.audiences"),
            "list the accepted 'aud' values (e.g. \"https://ekm.example.com\")",
        );
    }
    if r.service_accounts.is_empty() {
        c.add(
            format!("{at}.service_accounts"),
            "list the service accounts whose tokens are accepted (globs)",
        );
    }
    let jwks = match (&r.jwks_url, &r.jwks_file) {
        (Some(url), None) => {
            if !url.starts_with("https://") {
                c.add(
                    format!("{at}.jwks_url"),
                    "must be an https:// URL (signing keys must not travel in clear)",
                );
            }
            Some(JwksSource::Url {
                url: url.clone(),
                ca_file: r.jwks_ca_file.as_deref().map(|f| resolve(base, f)),
            })
        }
        (None, Some(file)) => {
            if r.jwks_ca_file.is_some() {
                c.add(format!("{at}.jwks_ca_file"), "only applies to jwks_url");
            }
            let path = resolve(base, file);
            // Refused now rather than found out on the first request (or, on a reload, after
            // the working set was thrown away).
            if let Err(why) = check_jwks_file(&path) {
                c.add(
                    format!("{at}.jwks_file"),
                    format!("not a usable key set: {why}"),
                );
            }
            Some(JwksSource::File(path))
        }
        _ => {
            c.add(
                format!("{at}.jwks_url"),
                "set exactly one of jwks_url and jwks_file",
            );
            None
        }
    };
    let algorithms: Vec<_> = r
        .algorithms
        .clone()
        .unwrap_or_else(|| vec!["RS256".into()])
        .iter()
        .filter_map(|a| {
            parse_algorithm(a)
                .map_err(|e| c.add(format!("{at}.algorithms"), e))
                .ok()
        })
        .collect();
    if algorithms.is_empty() && c.problems.len() == before {
        c.add(format!("{at}.algorithms"), "list at least one algorithm");
    }
    let refresh = r.jwks_refresh_min_interval_secs.unwrap_or(30);
    if refresh == 0 {
        c.add(
            format!("{at}.jwks_refresh_min_interval_secs"),
            "must be at least 1: it bounds how often a flood of unknown kids can hit the issuer",
        );
    }
    let leeway = r.leeway_secs.unwrap_or(30);
    if leeway > 300 {
        c.add(
            format!("{at}.leeway_secs"),
            "at most 300: a larger skew keeps expired tokens alive",
        );
    }
    let jwks = jwks?;
    (c.problems.len() == before).then(|| IssuerSettings {
        name: r.name.clone(),
        issuers: r.issuers.clone(),
        jwks,
        audiences: r.audiences.clone(),
        algorithms,
        leeway: Duration::from_secs(leeway),
        service_accounts: r.service_accounts.iter().map(Pattern::new).collect(),
        require_email_verified: r.require_email_verified.unwrap_or(true),
        refresh_min_interval: Duration::from_secs(refresh),
        default_ttl: Duration::from_secs(r.jwks_default_ttl_secs.unwrap_or(3600)),
        fetch_timeout: Duration::from_millis(r.jwks_fetch_timeout_ms.unwrap_or(5000)),
    })
}

fn access_reasons(r: &RawAccessReasons, at: &str, c: &mut Collector) -> Option<AccessReasonPolicy> {
    let before = c.problems.len();
    let mut allow = Vec::new();
    for v in &r.allow {
        let known = match v {
            toml::Value::String(name) => KnownReason::from_name(name),
            toml::Value::Integer(code) => {
                u32::try_from(*code).ok().and_then(KnownReason::from_code)
            }
            _ => None,
        };
        match known {
            Some(k) => allow.push(k),
            None => c.add(
                format!("{at}.allow"),
                format!(
                    "'{v}' is not a known reason (use allow_unspecified / allow_unknown for the special cases); known: {}",
                    KnownReason::all()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }
    (c.problems.len() == before).then(|| AccessReasonPolicy {
        allow,
        allow_absent: r.allow_absent,
        allow_unspecified: r.allow_unspecified,
        allow_unknown: r.allow_unknown,
        allow_health_checks: r.allow_health_checks.unwrap_or(true),
    })
}

fn key(
    k: &RawGcpKey,
    at: &str,
    default_reasons: Option<&AccessReasonPolicy>,
    health_key: &str,
    c: &mut Collector,
) -> Option<GcpKeySettings> {
    let before = c.problems.len();
    if !key_path_ok(&k.path) {
        c.add(
            format!("{at}.path"),
            "must be segments of [A-Za-z0-9._-] joined by '/', at most 256 characters",
        );
    }
    let hsm_key = k.hsm_key.clone().unwrap_or_else(|| k.path.clone());
    for (j, label) in std::iter::once(&hsm_key)
        .chain(&k.previous_hsm_keys)
        .enumerate()
    {
        // The label is recorded in every blob behind a one-byte length.
        if label.is_empty() || label.len() > 255 {
            let field = if j == 0 {
                "hsm_key".to_owned()
            } else {
                format!("previous_hsm_keys[{}]", j - 1)
            };
            c.add(format!("{at}.{field}"), "must be 1-255 bytes");
        }
        if label == health_key {
            // The health-check key is probed with throwaway data by design; it must never
            // also protect customer data.
            let field = if j == 0 {
                "hsm_key".to_owned()
            } else {
                format!("previous_hsm_keys[{}]", j - 1)
            };
            c.add(
                format!("{at}.{field}"),
                format!(
                    "'{label}' is the health-check key (health.key); it cannot be a customer key"
                ),
            );
        }
    }
    if k.grant.is_empty() {
        c.add(
            format!("{at}.grant"),
            "at least one [[gcp.key.grant]] is required: name the service accounts that may use this key",
        );
    }
    let mut grants = Vec::new();
    for (j, g) in k.grant.iter().enumerate() {
        let gat = format!("{at}.grant[{j}]");
        if g.service_accounts.is_empty() {
            c.add(
                format!("{gat}.service_accounts"),
                "list at least one service account",
            );
        }
        let mut operations = Vec::new();
        for op in g
            .operations
            .clone()
            .unwrap_or_else(|| vec!["wrap".into(), "unwrap".into()])
        {
            match Operation::parse(&op) {
                Some(o @ (Operation::Wrap | Operation::Unwrap)) => operations.push(o),
                _ => c.add(
                    format!("{gat}.operations"),
                    format!("'{op}' is not wrap or unwrap"),
                ),
            }
        }
        grants.push(Grant {
            name: g.name.clone(),
            principals: g.service_accounts.iter().map(Pattern::new).collect(),
            operations,
        });
    }
    let reasons = match &k.access_reasons {
        Some(r) => access_reasons(r, &format!("{at}.access_reasons"), c),
        None => default_reasons.cloned(),
    };
    let resource_names = k
        .resource_names
        .as_ref()
        .map(|names| names.iter().map(Pattern::new).collect::<Vec<_>>());
    if resource_names.as_ref().is_some_and(Vec::is_empty) {
        c.add(
            format!("{at}.resource_names"),
            "an empty list denies every request; remove it or list patterns",
        );
    }
    let reasons = reasons?;
    (c.problems.len() == before).then(|| GcpKeySettings {
        path: k.path.clone(),
        hsm_key,
        previous_hsm_keys: k.previous_hsm_keys.clone(),
        enabled: k.enabled.unwrap_or(true),
        access: KeyAccess {
            grants,
            resource_names,
            reasons,
        },
    })
}
