//! Validated settings of the Azure Managed HSM front end: one entry per path prefix (a tenant or
//! an MHSM pool), each with its certificate policy, exposed keys, rules and request-rate quota.
//! Built by `config`; swapped whole on reload.

use crate::auth::client_cert::CertificateAuth;
use crate::authz::Policy;
use crate::core::quota::TokenBucket;
use crate::front::xks::{KeyAllowList, NotServed};

/// Longest path prefix the API allows (characters, without the leading `/`).
pub const MAX_PREFIX_LEN: usize = 64;
/// Longest key identifier the API allows.
pub const MAX_KEY_ID_LEN: usize = 64;

/// The whole Azure front.
#[derive(Debug, Clone, Default)]
pub struct AzureSettings {
    /// One entry per path prefix.
    pub prefixes: Vec<PrefixSettings>,
    /// `proxy_vendor` in `/info`.
    pub vendor: String,
    /// `ekm_vendor` / `ekm_product` in `/info` (the HSM behind the proxy, as the operator names it).
    pub ekm_vendor: String,
    /// See `ekm_vendor`.
    pub ekm_product: String,
}

/// One path prefix.
#[derive(Debug, Clone)]
pub struct PrefixSettings {
    /// Operator-chosen name (logs, metrics, audit).
    pub name: String,
    /// `/a/b` (no trailing slash), at most [`MAX_PREFIX_LEN`] characters of `[A-Za-z0-9/-]`.
    pub prefix: String,
    /// Which client certificates may call.
    pub auth: CertificateAuth,
    /// Exposed keys (never the health-check key).
    pub keys: KeyAllowList,
    /// Per-key rules on the caller (`clientCertificateSubject`, `poolName`).
    pub policy: Policy,
    /// When false every key operation answers 403 (per-prefix kill switch).
    pub enabled: bool,
    /// Request-rate quota of each client certificate identity (subject) under this prefix: one
    /// bucket per subject, counted in metrics under the prefix's name; `None`: unlimited.
    pub quota: Option<TokenBucket>,
}

impl PrefixSettings {
    /// Whether the prefix serves `key` at all: first its exposed keys (an unknown key is 404
    /// whatever the switch), then its switch.
    pub fn serves(&self, key: &str) -> Result<(), NotServed> {
        if !self.keys.allows(key) {
            return Err(NotServed::NotExposed);
        }
        if !self.enabled {
            return Err(NotServed::Disabled);
        }
        Ok(())
    }
}

/// Whether `prefix` (with its leading `/`) is a valid path prefix: 1 to 64 characters of
/// `[A-Za-z0-9/-]` after the slash, no empty segment, no trailing slash.
pub fn valid_prefix(prefix: &str) -> bool {
    let Some(rest) = prefix.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && rest.len() <= MAX_PREFIX_LEN
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'-')
        && rest.split('/').all(|segment| !segment.is_empty())
}

/// Whether `key` is a valid key identifier: 1 to 64 characters of `[A-Za-z0-9-]`.
pub fn valid_key_id(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_ID_LEN
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rules() {
        for ok in ["/azure", "/a/b-c/D9", &format!("/{}", "p".repeat(64))] {
            assert!(valid_prefix(ok), "{ok}");
        }
        for bad in [
            "",
            "/",
            "azure",
            "/azure/",
            "/a//b",
            "/a_b",
            "/a.b",
            "/é",
            &format!("/{}", "p".repeat(65)),
        ] {
            assert!(!valid_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn key_id_rules() {
        for ok in ["k", "dev-aes-1", &"k".repeat(64)] {
            assert!(valid_key_id(ok), "{ok}");
        }
        for bad in ["", "a_b", "a.b", "a/b", "a b", &"k".repeat(65), "ключ"] {
            assert!(!valid_key_id(bad), "{bad}");
        }
    }
}
