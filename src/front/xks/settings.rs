//! Validated settings of the XKS front end: logical key stores (path prefix, credentials, regions,
//! keys, policy, limits, request-rate quota, AAD framing). Built by `config`; swapped whole on
//! reload.

use crate::auth::sigv4::{RegionPolicy, SigV4Credential};
use crate::authz::{Pattern, Policy};
use crate::core::framing::AadFraming;
use crate::core::quota::TokenBucket;

/// The spec's minimum plaintext size a proxy must accept (bytes).
pub const SPEC_MIN_PLAINTEXT: usize = 4300;
/// The spec's minimum AAD size a proxy must accept (bytes).
pub const SPEC_MIN_AAD: usize = 8192;
/// The hard ceiling on AAD imposed by the 2-byte length prefix.
pub const AAD_CEILING: usize = 65535;
/// The spec's ceiling on `ciphertextMetadata`.
pub const MAX_METADATA: usize = 20;

/// All XKS key stores.
#[derive(Debug, Clone, Default)]
pub struct XksSettings {
    /// Logical key stores, each under its own path prefix.
    pub key_stores: Vec<KeyStoreSettings>,
    /// `xksProxyFleetSize` reported by health.
    pub fleet_size: u32,
    /// `xksProxyVendor`.
    pub vendor: String,
}

/// Which external key ids a key store exposes.
#[derive(Debug, Clone)]
pub struct KeyAllowList {
    /// `None`: every key on the token (still subject to the custody check); else these globs.
    patterns: Option<Vec<Pattern>>,
    /// The health-check key: never exposed, whatever the patterns say.
    reserved: String,
}

impl KeyAllowList {
    /// Every key except `reserved` (the health-check key).
    pub fn any(reserved: &str) -> Self {
        Self {
            patterns: None,
            reserved: reserved.to_owned(),
        }
    }

    /// The keys matching `patterns`, except `reserved` (the health-check key).
    pub fn only(patterns: Vec<Pattern>, reserved: &str) -> Self {
        Self {
            patterns: Some(patterns),
            reserved: reserved.to_owned(),
        }
    }

    /// Whether `key` is exposed.
    pub fn allows(&self, key: &str) -> bool {
        if key == self.reserved {
            return false;
        }
        match &self.patterns {
            None => true,
            Some(patterns) => patterns.iter().any(|p| p.matches(key)),
        }
    }
}

/// Why a key store or prefix does not serve a key, before any policy rule is consulted. Each front
/// maps it onto its own wire error; `policy explain` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotServed {
    /// The key store or prefix is switched off (`enabled = false`).
    Disabled,
    /// The key is not among the exposed keys (or is the health-check key).
    NotExposed,
}

impl NotServed {
    /// The setting that refused, as `policy explain` names it.
    pub fn setting(self) -> &'static str {
        match self {
            NotServed::Disabled => "enabled",
            NotServed::NotExposed => "keys",
        }
    }
}

/// Size limits (decoded bytes). Each is at least the spec minimum; above it → UnsupportedOperation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XksLimits {
    /// Largest plaintext (encrypt) or ciphertext (decrypt).
    pub max_plaintext: usize,
    /// Largest AAD.
    pub max_aad: usize,
}

impl Default for XksLimits {
    fn default() -> Self {
        Self {
            max_plaintext: 65536,
            max_aad: AAD_CEILING,
        }
    }
}

/// One logical key store.
#[derive(Debug, Clone)]
pub struct KeyStoreSettings {
    /// Operator-chosen name (logs, metrics, audit).
    pub name: String,
    /// URI path prefix before `/kms/xks/v1` (empty or `/a/b`).
    pub prefix: String,
    /// SigV4 credentials (two or more during a rotation).
    pub credentials: Vec<SigV4Credential>,
    /// Accepted SigV4 regions.
    pub regions: RegionPolicy,
    /// How AAD and metadata are bound into the cipher's AAD.
    pub framing: AadFraming,
    /// The `ciphertextMetadata` returned by Encrypt. Spec framing: the format-version byte.
    /// AWS-sample framing: the sample proxy's configured static value (often empty).
    pub ciphertext_metadata: Vec<u8>,
    /// Exposed keys.
    pub keys: KeyAllowList,
    /// Secondary authorization.
    pub policy: Policy,
    /// Size limits.
    pub limits: XksLimits,
    /// When false the whole key store answers InvalidStateException (per-store kill switch).
    pub enabled: bool,
    /// Request-rate quota shared by every request to this key store (one bucket per store);
    /// `None`: unlimited.
    pub quota: Option<TokenBucket>,
}

impl KeyStoreSettings {
    /// Whether the key store serves `key` at all: first its switch, then its exposed keys (a
    /// disabled store answers the same for every key, known or not).
    pub fn serves(&self, key: &str) -> Result<(), NotServed> {
        if !self.enabled {
            return Err(NotServed::Disabled);
        }
        if !self.keys.allows(key) {
            return Err(NotServed::NotExposed);
        }
        Ok(())
    }
}
