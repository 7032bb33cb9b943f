//! Validated settings of the Google Cloud EKM front end: the key URI prefix, the token issuers,
//! the external keys (HSM key versions, grants, justification policy) and size limits. Built by
//! `config`; swapped whole on reload.

use crate::auth::jwt::JwtSettings;
use crate::authz::grants::KeyAccess;

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
