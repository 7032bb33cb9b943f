//! Validated settings of the Google Cloud EKM front end: the key URI prefix, the token issuers,
//! the external keys (HSM key versions, grants, justification policy), size limits and the
//! per-service-account request-rate quotas. Built by `config`; swapped whole on reload.

use std::collections::HashMap;

use crate::auth::jwt::JwtSettings;
use crate::authz::grants::KeyAccess;
use crate::core::quota::TokenBucket;

/// Default largest wrap plaintext / unwrap blob. Cloud KMS wraps its own ciphertext of a
/// 32-byte key (well under 1 KiB); 64 KiB leaves room without inviting abuse.
pub const DEFAULT_MAX_PLAINTEXT: usize = 65536;
/// Key path characters besides ASCII letters and digits (segments are joined by `/`).
const KEY_PATH_PUNCTUATION: &[u8] = b"._-";
/// Default largest additionalAuthenticatedData.
pub const DEFAULT_MAX_AAD: usize = 65536;

/// The whole front end.
#[derive(Debug, Clone)]
pub struct GcpSettings {
    /// Path before `/<key path>:wrap`, e.g. `/gcp/v0/keys` (starts with `/`, no trailing `/`).
    pub prefix: String,
    /// Token verification.
    pub jwt: JwtSettings,
    /// External keys, by path.
    pub keys: Vec<GcpKeySettings>,
    /// Size limits.
    pub limits: GcpLimits,
    /// Request-rate quotas, per service account.
    pub quotas: GcpQuotas,
}

/// The metric label (and message name) of the default per-service-account quota. Service
/// accounts under it are not labels of their own: an issuer's allow-list may admit any number of
/// them (every project's Cloud EKM service agent), and metric series are never dropped.
pub const DEFAULT_QUOTA_LABEL: &str = "default";

/// Request-rate quotas of Cloud EKM callers: one bucket per service account (the token's
/// verified `email`), with its override's settings or the default's.
#[derive(Debug, Clone, Default)]
pub struct GcpQuotas {
    /// Settings for every service account without an override; `None`: those are unlimited.
    pub default: Option<TokenBucket>,
    /// Settings by exact service account `email`, instead of the default.
    pub overrides: HashMap<String, TokenBucket>,
}

impl GcpQuotas {
    /// The settings and metric label that apply to `service_account`, if any quota does: its
    /// override (labelled with the account itself) or the default ([`DEFAULT_QUOTA_LABEL`]).
    pub fn for_service_account<'a>(
        &'a self,
        service_account: &'a str,
    ) -> Option<(TokenBucket, &'a str)> {
        match self.overrides.get_key_value(service_account) {
            Some((account, limit)) => Some((*limit, account.as_str())),
            None => self.default.map(|limit| (limit, DEFAULT_QUOTA_LABEL)),
        }
    }

    /// Every label a configured quota counts under.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.default
            .map(|_| DEFAULT_QUOTA_LABEL)
            .into_iter()
            .chain(self.overrides.keys().map(String::as_str))
    }
}

/// Size limits (decoded bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcpLimits {
    /// Largest wrap plaintext; an unwrap blob may be this plus its framing.
    pub max_plaintext: usize,
    /// Largest additionalAuthenticatedData.
    pub max_aad: usize,
}

impl Default for GcpLimits {
    fn default() -> Self {
        Self {
            max_plaintext: DEFAULT_MAX_PLAINTEXT,
            max_aad: DEFAULT_MAX_AAD,
        }
    }
}

/// One external key as Cloud KMS addresses it.
#[derive(Debug, Clone)]
pub struct GcpKeySettings {
    /// The key path in the key URI.
    pub path: String,
    /// The HSM key (label) that wraps new blobs: the current key version.
    pub hsm_key: String,
    /// Earlier HSM keys whose blobs may still be unwrapped.
    pub previous_hsm_keys: Vec<String>,
    /// When false every request for this key is refused (per-key kill switch).
    pub enabled: bool,
    /// Who may do what, for which resources and justifications.
    pub access: KeyAccess,
}

impl GcpKeySettings {
    /// Whether a blob naming `hsm_key` as its key version may be unwrapped under this key.
    pub fn accepts_version(&self, hsm_key: &str) -> bool {
        self.hsm_key == hsm_key || self.previous_hsm_keys.iter().any(|k| k == hsm_key)
    }
}

/// Whether `path` is a valid key path: non-empty segments of `[A-Za-z0-9._-]` joined by `/`.
pub fn key_path_ok(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 256
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || KEY_PATH_PUNCTUATION.contains(&b))
        })
}
