//! Plain data types shared by the core, the front ends and the HSM backend.
//!
//! Must not depend on HTTP, wire JSON or PKCS#11 types.

use std::fmt;
use zeroize::Zeroizing;

/// Plaintext bytes: zeroized when dropped, never printed.
pub type Plaintext = Zeroizing<Vec<u8>>;

/// The length in bytes of every AES-GCM tag this proxy produces or accepts.
pub const GCM_TAG_LEN: usize = 16;

/// The key type as read from the HSM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyType {
    /// AES secret key.
    Aes,
    /// Generic secret (HMAC etc.).
    GenericSecret,
    /// RSA key (public or private).
    Rsa,
    /// Elliptic-curve key.
    Ec,
    /// Anything else, by its PKCS#11 name without the `CKK_` prefix.
    Other(String),
}

impl KeyType {
    /// The name used in key specs: `AES`, `RSA`, ...
    pub fn name(&self) -> &str {
        match self {
            KeyType::Aes => "AES",
            KeyType::GenericSecret => "GENERIC_SECRET",
            KeyType::Rsa => "RSA",
            KeyType::Ec => "EC",
            KeyType::Other(name) => name,
        }
    }
}

/// What the key's attributes allow (`CKA_ENCRYPT`, `CKA_DECRYPT`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// `CKA_ENCRYPT`
    pub encrypt: bool,
    /// `CKA_DECRYPT`
    pub decrypt: bool,
    /// `CKA_SIGN`
    pub sign: bool,
    /// `CKA_VERIFY`
    pub verify: bool,
    /// `CKA_WRAP`
    pub wrap: bool,
    /// `CKA_UNWRAP`
    pub unwrap: bool,
    /// `CKA_DERIVE`
    pub derive: bool,
}

impl KeyUsage {
    /// The usage names in the XKS spelling (uppercase), in a fixed order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut out = Vec::with_capacity(7);
        for (on, name) in [
            (self.encrypt, "ENCRYPT"),
            (self.decrypt, "DECRYPT"),
            (self.sign, "SIGN"),
            (self.verify, "VERIFY"),
            (self.wrap, "WRAP"),
            (self.unwrap, "UNWRAP"),
            (self.derive, "DERIVE"),
        ] {
            if on {
                out.push(name);
            }
        }
        out
    }
}

/// Everything the proxy knows about one key: read from the HSM, never secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's `CKA_LABEL`, which is also its external id.
    pub label: String,
    /// `CKA_KEY_TYPE`
    pub key_type: KeyType,
    /// Key size in bits (`CKA_VALUE_LEN` × 8 for secret keys, modulus bits for RSA).
    pub bits: u32,
    /// What the key may do.
    pub usage: KeyUsage,
    /// `CKA_SENSITIVE`
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`
    pub extractable: bool,
    /// Why the custody check refuses this key, if it does (extractable, not sensitive, ...).
    pub custody_violation: Option<String>,
    /// The public half of an RSA key (`CKA_MODULUS`, `CKA_PUBLIC_EXPONENT`), public by nature.
    pub rsa_public: Option<RsaPublicKey>,
}

/// An RSA public key as big-endian unsigned integers without leading zero bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicKey {
    /// `n`
    pub modulus: Vec<u8>,
    /// `e`
    pub exponent: Vec<u8>,
}

impl KeyInfo {
    /// The key spec in XKS spelling: `AES_256`, `RSA_2048`, ...
    pub fn key_spec(&self) -> String {
        format!("{}_{}", self.key_type.name(), self.bits)
    }

    /// Whether this key can serve AES-256-GCM requests at all (type and size).
    pub fn is_aes_256(&self) -> bool {
        self.key_type == KeyType::Aes && self.bits == 256
    }
}

/// The output of an AES-GCM encryption inside the HSM.
#[derive(Clone, PartialEq, Eq)]
pub struct AeadSealed {
    /// The IV the HSM generated (12 bytes).
    pub iv: Vec<u8>,
    /// Ciphertext, same length as the plaintext.
    pub ciphertext: Vec<u8>,
    /// The 16-byte authentication tag.
    pub tag: [u8; GCM_TAG_LEN],
}

impl fmt::Debug for AeadSealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AeadSealed")
            .field("iv_len", &self.iv.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// An AES-GCM encryption request for the backend.
pub struct AeadEncrypt {
    /// Key label.
    pub key: String,
    /// The bytes to encrypt (zeroized on drop).
    pub plaintext: Plaintext,
    /// The complete AAD given to the cipher (already framed by the core).
    pub aad: Vec<u8>,
}

/// An AES-GCM decryption request for the backend.
pub struct AeadDecrypt {
    /// Key label.
    pub key: String,
    /// IV (12 or 16 bytes).
    pub iv: Vec<u8>,
    /// Ciphertext without the tag.
    pub ciphertext: Vec<u8>,
    /// The 16-byte tag.
    pub tag: [u8; GCM_TAG_LEN],
    /// The complete AAD given to the cipher (already framed by the core).
    pub aad: Vec<u8>,
}

/// Health of an HSM (or of one EKM instance) as the core reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// Serving normally.
    Active,
    /// Serving, but something is wrong (some sessions lost, recovering, slow).
    Degraded,
    /// Not serving.
    Unavailable,
}

impl HealthStatus {
    /// XKS spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthStatus::Active => "ACTIVE",
            HealthStatus::Degraded => "DEGRADED",
            HealthStatus::Unavailable => "UNAVAILABLE",
        }
    }
}

/// What the HSM backend reports about itself (from `C_GetTokenInfo` and its own worker state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmHealth {
    /// Overall state of the token and the worker sessions.
    pub status: HealthStatus,
    /// Token label.
    pub token_label: String,
    /// Token manufacturer id.
    pub manufacturer: String,
    /// Token model.
    pub model: String,
    /// Token serial number.
    pub serial: String,
    /// Hardware and firmware versions, `hw X.Y fw X.Y`.
    pub versions: String,
    /// Worker sessions currently logged in.
    pub sessions_up: usize,
    /// Worker sessions configured.
    pub sessions_total: usize,
    /// Sessions the token reports open (all applications'), when it says.
    pub token_sessions: Option<u64>,
    /// Operator-facing detail when not ACTIVE.
    pub detail: String,
}

/// A key operation, as authorized by `authz` and performed by the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Read the key's metadata.
    KeyMetadata,
    /// AES-GCM encrypt.
    Encrypt,
    /// AES-GCM decrypt.
    Decrypt,
    /// Wrap (Google Cloud EKM).
    Wrap,
    /// Unwrap (Google Cloud EKM).
    Unwrap,
}

impl Operation {
    /// Lowercase name for logs, metrics and policy files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::KeyMetadata => "metadata",
            Operation::Encrypt => "encrypt",
            Operation::Decrypt => "decrypt",
            Operation::Wrap => "wrap",
            Operation::Unwrap => "unwrap",
        }
    }

    /// Parse the lowercase name used in policy files.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "metadata" => Operation::KeyMetadata,
            "encrypt" => Operation::Encrypt,
            "decrypt" => Operation::Decrypt,
            "wrap" => Operation::Wrap,
            "unwrap" => Operation::Unwrap,
            _ => return None,
        })
    }
}
