//! Key wrapping as Azure Managed HSM asks for it: AES Key Wrap (RFC 3394), AES Key Wrap with
//! Padding (RFC 5649) and RSA-OAEP with SHA-1 or SHA-256, each done inside the HSM. This module
//! holds the protocol-neutral request types, the input rules of each algorithm (checked before a
//! request costs an HSM call) and the record of what the token can do.
//!
//! Must not depend on HTTP, wire JSON or PKCS#11 types.

use std::fmt;

use super::{KeyInfo, KeyType, Plaintext};

/// A key-wrapping algorithm, by its JOSE name (RFC 7518).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrapAlgorithm {
    /// `A256KW`: AES Key Wrap (RFC 3394) under a 256-bit AES key.
    A256Kw,
    /// `A256KWP`: AES Key Wrap with Padding (RFC 5649) under a 256-bit AES key.
    A256Kwp,
    /// `RSA-OAEP`: RSAES-OAEP with SHA-1 and MGF1-SHA-1.
    RsaOaep,
    /// `RSA-OAEP-256`: RSAES-OAEP with SHA-256 and MGF1-SHA-256.
    RsaOaep256,
}

impl WrapAlgorithm {
    /// Every algorithm, in the order reports list them.
    pub const ALL: [WrapAlgorithm; 4] = [
        WrapAlgorithm::A256Kw,
        WrapAlgorithm::A256Kwp,
        WrapAlgorithm::RsaOaep,
        WrapAlgorithm::RsaOaep256,
    ];

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            WrapAlgorithm::A256Kw => "A256KW",
            WrapAlgorithm::A256Kwp => "A256KWP",
            WrapAlgorithm::RsaOaep => "RSA-OAEP",
            WrapAlgorithm::RsaOaep256 => "RSA-OAEP-256",
        }
    }

    /// Parse a JOSE name (exact spelling).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|alg| alg.name() == name)
    }

    /// Whether the algorithm takes an RSA key (else a 256-bit AES key).
    pub fn is_rsa(self) -> bool {
        matches!(self, WrapAlgorithm::RsaOaep | WrapAlgorithm::RsaOaep256)
    }

    /// Length of the OAEP hash in bytes (RSA algorithms only; 0 for AES).
    fn oaep_hash_len(self) -> usize {
        match self {
            WrapAlgorithm::RsaOaep => 20,
            WrapAlgorithm::RsaOaep256 => 32,
            WrapAlgorithm::A256Kw | WrapAlgorithm::A256Kwp => 0,
        }
    }

    /// Whether `key` is of the type and size this algorithm takes; the reason when not.
    pub fn check_key(self, key: &KeyInfo) -> Result<(), String> {
        let fits = if self.is_rsa() {
            key.key_type == KeyType::Rsa && matches!(key.bits, 2048 | 3072 | 4096)
        } else {
            key.is_aes_256()
        };
        if fits {
            Ok(())
        } else {
            Err(format!(
                "algorithm {} does not apply to key {} ({})",
                self.name(),
                key.label,
                key.key_spec()
            ))
        }
    }

    /// Whether `len` bytes may be wrapped under this algorithm with a key of `key_bits`; the
    /// reason when not. RFC 3394 wraps at least two 64-bit blocks; RFC 5649 at least one byte;
    /// OAEP at most k − 2·hLen − 2 bytes (RFC 8017 §7.1.1).
    pub fn check_plaintext_len(self, len: usize, key_bits: u32) -> Result<(), String> {
        let ok = match self {
            WrapAlgorithm::A256Kw => len >= 16 && len.is_multiple_of(8),
            WrapAlgorithm::A256Kwp => len >= 1,
            WrapAlgorithm::RsaOaep | WrapAlgorithm::RsaOaep256 => {
                len <= rsa_len(key_bits).saturating_sub(2 * self.oaep_hash_len() + 2)
            }
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            WrapAlgorithm::A256Kw => {
                format!("A256KW wraps a multiple of 8 bytes, at least 16; got {len}")
            }
            WrapAlgorithm::A256Kwp => "A256KWP wraps at least 1 byte; got 0".to_owned(),
            _ => format!(
                "{} with a {key_bits}-bit key wraps at most {} bytes; got {len}",
                self.name(),
                rsa_len(key_bits).saturating_sub(2 * self.oaep_hash_len() + 2)
            ),
        })
    }

    /// Whether `len` bytes can be a wrapped value under this algorithm with a key of `key_bits`;
    /// the reason when not. AES wrapping outputs whole 64-bit blocks (at least 3 for RFC 3394, 2
    /// for RFC 5649); RSA outputs exactly the modulus length.
    pub fn check_wrapped_len(self, len: usize, key_bits: u32) -> Result<(), String> {
        let ok = match self {
            WrapAlgorithm::A256Kw => len >= 24 && len.is_multiple_of(8),
            WrapAlgorithm::A256Kwp => len >= 16 && len.is_multiple_of(8),
            WrapAlgorithm::RsaOaep | WrapAlgorithm::RsaOaep256 => len == rsa_len(key_bits),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "a {} wrapped value cannot be {len} bytes long",
                self.name()
            ))
        }
    }
}

impl fmt::Display for WrapAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes in an RSA modulus of `bits` bits.
fn rsa_len(bits: u32) -> usize {
    usize::try_from(bits.div_ceil(8)).unwrap_or(usize::MAX)
}

/// Wrap `plaintext` (key material to protect) under the key `key` with `alg`.
pub struct KeyWrap {
    /// Key label.
    pub key: String,
    /// The algorithm.
    pub alg: WrapAlgorithm,
    /// The bytes to wrap (zeroized on drop).
    pub plaintext: Plaintext,
}

/// Unwrap `wrapped` with the key `key` and `alg`.
pub struct KeyUnwrap {
    /// Key label.
    pub key: String,
    /// The algorithm.
    pub alg: WrapAlgorithm,
    /// The wrapped bytes.
    pub wrapped: Vec<u8>,
}

/// How the token performs one AES wrapping algorithm (found by a trial at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapPath {
    /// `C_Encrypt`/`C_Decrypt` on the bytes.
    EncryptDecrypt,
    /// `C_WrapKey`/`C_UnwrapKey` of a short-lived session object holding the bytes.
    WrapUnwrapKey,
}

impl WrapPath {
    /// Name for logs and `/info`.
    pub fn as_str(self) -> &'static str {
        match self {
            WrapPath::EncryptDecrypt => "C_Encrypt/C_Decrypt",
            WrapPath::WrapUnwrapKey => "C_WrapKey/C_UnwrapKey",
        }
    }
}

/// What the token can do, by trial: for each algorithm, how (AES) or whether (RSA), with the
/// PKCS#11 mechanism name that serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrapSupport {
    /// Supported algorithms with the mechanism and path used.
    pub supported: Vec<(WrapAlgorithm, &'static str, Option<WrapPath>)>,
    /// Algorithms the trial refused, with the HSM's answer.
    pub unsupported: Vec<(WrapAlgorithm, String)>,
    /// Supported algorithms that wrap correctly only inputs that are a multiple of 8 bytes (their
    /// unwrapping is complete). SoftHSM 2.6.1's `CKM_AES_KEY_WRAP_PAD` zero-pads other inputs
    /// before wrapping, so they would come back longer than they went in.
    pub block_aligned_wrap: Vec<WrapAlgorithm>,
}

impl WrapSupport {
    /// Whether `alg` works on this token.
    pub fn supports(&self, alg: WrapAlgorithm) -> bool {
        self.path(alg).is_some()
    }

    /// How the token performs `alg` (`None` for RSA, where there is one path: `Some(None)`).
    pub fn path(&self, alg: WrapAlgorithm) -> Option<Option<WrapPath>> {
        self.supported
            .iter()
            .find(|(a, ..)| *a == alg)
            .map(|(_, _, path)| *path)
    }

    /// Why `alg` does not work on this token, when it does not.
    pub fn refusal(&self, alg: WrapAlgorithm) -> Option<&str> {
        self.unsupported
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, why)| why.as_str())
    }

    /// Whether this token can wrap `len` bytes with `alg` correctly; the reason when not.
    pub fn check_wrap_len(&self, alg: WrapAlgorithm, len: usize) -> Result<(), String> {
        if self.block_aligned_wrap.contains(&alg) && !len.is_multiple_of(8) {
            return Err(format!(
                "this HSM's {alg} wraps only multiples of 8 bytes correctly (its mechanism \
                 zero-pads other lengths before wrapping, so they would not unwrap to what was \
                 sent); got {len} bytes"
            ));
        }
        Ok(())
    }

    /// The supported algorithms' names, in [`WrapAlgorithm::ALL`] order.
    pub fn names(&self) -> Vec<&'static str> {
        WrapAlgorithm::ALL
            .into_iter()
            .filter(|alg| self.supports(*alg))
            .map(WrapAlgorithm::name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::KeyUsage;

    fn key(key_type: KeyType, bits: u32) -> KeyInfo {
        KeyInfo {
            label: "k".to_owned(),
            key_type,
            bits,
            usage: KeyUsage::default(),
            sensitive: true,
            extractable: false,
            custody_violation: None,
            rsa_public: None,
        }
    }

    #[test]
    fn names_round_trip_exactly() {
        for alg in WrapAlgorithm::ALL {
            assert_eq!(WrapAlgorithm::from_name(alg.name()), Some(alg));
        }
        assert_eq!(WrapAlgorithm::from_name("a256kw"), None);
        assert_eq!(WrapAlgorithm::from_name("RSA-OAEP-384"), None);
        assert_eq!(WrapAlgorithm::from_name(""), None);
    }

    #[test]
    fn key_fit() {
        assert!(
            WrapAlgorithm::A256Kw
                .check_key(&key(KeyType::Aes, 256))
                .is_ok()
        );
        assert!(
            WrapAlgorithm::A256Kwp
                .check_key(&key(KeyType::Aes, 128))
                .is_err()
        );
        assert!(
            WrapAlgorithm::A256Kw
                .check_key(&key(KeyType::Rsa, 2048))
                .is_err()
        );
        for bits in [2048, 3072, 4096] {
            assert!(
                WrapAlgorithm::RsaOaep
                    .check_key(&key(KeyType::Rsa, bits))
                    .is_ok()
            );
        }
        assert!(
            WrapAlgorithm::RsaOaep256
                .check_key(&key(KeyType::Rsa, 1024))
                .is_err()
        );
        let err = WrapAlgorithm::RsaOaep
            .check_key(&key(KeyType::Aes, 256))
            .unwrap_err();
        assert!(err.contains("RSA-OAEP") && err.contains("AES_256"), "{err}");
    }

    #[test]
    fn plaintext_lengths() {
        let kw = WrapAlgorithm::A256Kw;
        assert!(kw.check_plaintext_len(16, 256).is_ok());
        assert!(kw.check_plaintext_len(32, 256).is_ok());
        assert!(kw.check_plaintext_len(8, 256).is_err());
        assert!(kw.check_plaintext_len(20, 256).is_err());
        let kwp = WrapAlgorithm::A256Kwp;
        assert!(kwp.check_plaintext_len(1, 256).is_ok());
        assert!(kwp.check_plaintext_len(0, 256).is_err());
        // 2048-bit: 256 − 2·20 − 2 = 214 (SHA-1), 256 − 2·32 − 2 = 190 (SHA-256).
        assert!(
            WrapAlgorithm::RsaOaep
                .check_plaintext_len(214, 2048)
                .is_ok()
        );
        assert!(
            WrapAlgorithm::RsaOaep
                .check_plaintext_len(215, 2048)
                .is_err()
        );
        assert!(
            WrapAlgorithm::RsaOaep256
                .check_plaintext_len(190, 2048)
                .is_ok()
        );
        assert!(
            WrapAlgorithm::RsaOaep256
                .check_plaintext_len(191, 2048)
                .is_err()
        );
        assert!(
            WrapAlgorithm::RsaOaep256
                .check_plaintext_len(318, 3072)
                .is_ok()
        );
    }

    #[test]
    fn wrapped_lengths() {
        let kw = WrapAlgorithm::A256Kw;
        assert!(kw.check_wrapped_len(24, 256).is_ok());
        assert!(kw.check_wrapped_len(16, 256).is_err());
        assert!(kw.check_wrapped_len(25, 256).is_err());
        let kwp = WrapAlgorithm::A256Kwp;
        assert!(kwp.check_wrapped_len(16, 256).is_ok());
        assert!(kwp.check_wrapped_len(8, 256).is_err());
        assert!(WrapAlgorithm::RsaOaep.check_wrapped_len(256, 2048).is_ok());
        assert!(WrapAlgorithm::RsaOaep.check_wrapped_len(255, 2048).is_err());
        assert!(
            WrapAlgorithm::RsaOaep256
                .check_wrapped_len(384, 3072)
                .is_ok()
        );
    }

    #[test]
    fn support_lookup() {
        let support = WrapSupport {
            supported: vec![
                (
                    WrapAlgorithm::A256Kw,
                    "CKM_AES_KEY_WRAP",
                    Some(WrapPath::WrapUnwrapKey),
                ),
                (WrapAlgorithm::RsaOaep, "CKM_RSA_PKCS_OAEP", None),
            ],
            unsupported: vec![(WrapAlgorithm::RsaOaep256, "CKR_ARGUMENTS_BAD".to_owned())],
            block_aligned_wrap: vec![WrapAlgorithm::A256Kw],
        };
        assert!(support.check_wrap_len(WrapAlgorithm::A256Kw, 24).is_ok());
        assert!(support.check_wrap_len(WrapAlgorithm::A256Kw, 20).is_err());
        assert!(support.check_wrap_len(WrapAlgorithm::RsaOaep, 20).is_ok());
        assert_eq!(
            support.path(WrapAlgorithm::A256Kw),
            Some(Some(WrapPath::WrapUnwrapKey))
        );
        assert_eq!(support.path(WrapAlgorithm::RsaOaep), Some(None));
        assert!(!support.supports(WrapAlgorithm::A256Kwp));
        assert_eq!(
            support.refusal(WrapAlgorithm::RsaOaep256),
            Some("CKR_ARGUMENTS_BAD")
        );
        assert_eq!(support.names(), vec!["A256KW", "RSA-OAEP"]);
    }
}
