//! Validation of the `[azure]` section into [`AzureSettings`]: path prefixes (the API's character
//! and length rules), each prefix's certificate policy (an optional CA bundle narrower than the
//! listener's, the allowed subjects), exposed keys, rules and request-rate quota. Every problem is
//! reported with its key path.

use std::collections::HashSet;
use std::path::Path;

use super::raw::{RawAzure, RawAzurePrefix};
use super::validate::{Collector, exposed_keys, policy_rule, quota, resolve};
use crate::auth::client_cert::CertificateAuth;
use crate::authz::decide::AZURE_ATTRIBUTES;
use crate::authz::{Policy, Rule};
use crate::core::Operation;
use crate::front::azure::settings::{AzureSettings, MAX_PREFIX_LEN, PrefixSettings, valid_prefix};
use crate::server::tls::load_ca_roots;

/// Validate `[azure]`. `other_prefixes` are the paths other fronts claim first (Cloud EKM's
/// prefix, XKS's API root), which an Azure prefix must not fall under.
pub(super) fn azure(
    raw: &RawAzure,
    base: &Path,
    health_key: &str,
    other_prefixes: &[String],
    c: &mut Collector,
) -> Option<AzureSettings> {
    let before = c.problems.len();
    if raw.prefix.is_empty() {
        c.add(
            "azure.prefix",
            "at least one [[azure.prefix]] is required: it names the path and the client certificates",
        );
    }
    let mut names = HashSet::new();
    let mut paths = HashSet::new();
    let mut prefixes = Vec::new();
    for (i, p) in raw.prefix.iter().enumerate() {
        let at = format!("azure.prefix[{i}]");
        if !names.insert(p.name.clone()) {
            c.add(format!("{at}.name"), "duplicate prefix name");
        }
        if !paths.insert(p.path_prefix.clone()) {
            c.add(format!("{at}.path_prefix"), "duplicate path prefix");
        }
        if let Some(other) = other_prefixes
            .iter()
            .find(|o| p.path_prefix.starts_with(o.as_str()) || o.starts_with(&p.path_prefix))
        {
            c.add(
                format!("{at}.path_prefix"),
                format!("overlaps '{other}', which another front end serves"),
            );
        }
        if let Some(prefix) = prefix(p, &at, base, health_key, c) {
            prefixes.push(prefix);
        }
    }
    (c.problems.len() == before).then(|| AzureSettings {
        prefixes,
        vendor: raw.vendor.clone().unwrap_or_else(|| "ekm-proxy".into()),
        ekm_vendor: raw.ekm_vendor.clone().unwrap_or_else(|| "PKCS#11".into()),
        ekm_product: raw.ekm_product.clone().unwrap_or_else(|| "HSM".into()),
    })
}

fn prefix(
    p: &RawAzurePrefix,
    at: &str,
    base: &Path,
    health_key: &str,
    c: &mut Collector,
) -> Option<PrefixSettings> {
    let before = c.problems.len();
    if !valid_prefix(&p.path_prefix) {
        c.add(
            format!("{at}.path_prefix"),
            format!(
                "must be '/segment[/segment…]' of at most {MAX_PREFIX_LEN} characters of A-Z a-z 0-9 / -, no trailing '/'"
            ),
        );
    }
    let roots = match &p.ca_bundle {
        None => None,
        Some(path) => match load_ca_roots(&resolve(base, path)) {
            Ok(roots) => Some(roots),
            Err(e) => {
                c.add(format!("{at}.ca_bundle"), e.to_string());
                None
            }
        },
    };
    let auth = match CertificateAuth::new(roots, p.allowed_subjects.clone()) {
        Ok(auth) => Some(auth),
        Err(e) => {
            c.add(format!("{at}.allowed_subjects"), e);
            None
        }
    };
    let keys = exposed_keys(&p.keys, at, health_key, c);
    const OPERATIONS: [Operation; 3] = [Operation::KeyMetadata, Operation::Wrap, Operation::Unwrap];
    let rules: Vec<Rule> = p
        .rule
        .iter()
        .enumerate()
        .map(|(j, r)| {
            policy_rule(
                r,
                &format!("{at}.rule[{j}]"),
                &AZURE_ATTRIBUTES,
                &OPERATIONS,
                c,
            )
        })
        .collect();
    let quota = p
        .quota
        .as_ref()
        .and_then(|q| quota(q, &format!("{at}.quota"), c));
    (c.problems.len() == before)
        .then_some(auth)
        .flatten()
        .map(|auth| PrefixSettings {
            name: p.name.clone(),
            prefix: p.path_prefix.clone(),
            auth,
            keys,
            policy: Policy::new(rules),
            enabled: p.enabled.unwrap_or(true),
            quota,
        })
}
