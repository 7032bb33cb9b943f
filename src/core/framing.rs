//! AAD framing and integrity values for AES-GCM requests (XKS §5.3 and §5.5).
//!
//! Pure functions over bytes; must not depend on HTTP, JSON or PKCS#11.

use sha2::{Digest, Sha256};

/// How the caller's AAD and `ciphertextMetadata` are bound into the cipher's AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AadFraming {
    /// The XKS spec: `u16be(len AAD) ‖ AAD ‖ u8(len meta) ‖ meta`; an absent field is empty.
    SpecLiteral,
    /// The AWS sample proxy: `u16be(len AAD) ‖ SHA-256(AAD) ‖ u8(len meta) ‖ meta`, where the
    /// digest is present whenever the AAD field was present (even empty).
    AwsSample,
}

/// Why framing failed: the caller's AAD cannot be length-prefixed, or metadata is too long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// AAD longer than 65535 bytes.
    AadTooLong,
    /// Metadata longer than 255 bytes.
    MetadataTooLong,
}

/// Build the full AAD given to the cipher. `aad` is `None` when the request had no AAD field.
pub fn full_aad(
    framing: AadFraming,
    aad: Option<&[u8]>,
    metadata: &[u8],
) -> Result<Vec<u8>, FramingError> {
    let aad_len = aad.map_or(0, <[u8]>::len);
    let aad_len16 = u16::try_from(aad_len).map_err(|_| FramingError::AadTooLong)?;
    let meta_len8 = u8::try_from(metadata.len()).map_err(|_| FramingError::MetadataTooLong)?;
    let mut out = Vec::with_capacity(3 + aad_len.max(32) + metadata.len());
    out.extend_from_slice(&aad_len16.to_be_bytes());
    match (framing, aad) {
        (AadFraming::SpecLiteral, Some(aad)) => out.extend_from_slice(aad),
        (AadFraming::AwsSample, Some(aad)) => out.extend_from_slice(&Sha256::digest(aad)),
        (_, None) => {}
    }
    out.push(meta_len8);
    out.extend_from_slice(metadata);
    Ok(out)
}

/// The XKS `ciphertextDataIntegrityValue`: SHA-256 over `AAD ‖ metadata ‖ IV ‖ ciphertext ‖ tag`
/// (raw bytes, no length prefixes; absent fields are empty).
pub fn cdiv_sha256(
    aad: &[u8],
    metadata: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [aad, metadata, iv, ciphertext, tag] {
        h.update(part);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn spec_literal_examples() {
        assert_eq!(
            full_aad(AadFraming::SpecLiteral, None, b"").unwrap(),
            vec![0, 0, 0]
        );
        let aad = b"project=nile,department=marketing";
        let got = full_aad(AadFraming::SpecLiteral, Some(aad), b"key_version=1").unwrap();
        assert_eq!(got.len(), 49);
        assert_eq!(&got[..2], &[0x00, 0x21]);
        assert_eq!(&got[2..35], aad);
        assert_eq!(got[35], 0x0d);
        assert_eq!(&got[36..], b"key_version=1");
    }

    #[test]
    fn aws_sample_hashes_present_aad_even_when_empty() {
        let empty = full_aad(AadFraming::AwsSample, Some(b""), b"").unwrap();
        assert_eq!(empty.len(), 2 + 32 + 1);
        assert_eq!(&empty[2..34], Sha256::digest(b"").as_slice());
        assert_eq!(
            full_aad(AadFraming::AwsSample, None, b"").unwrap(),
            vec![0, 0, 0]
        );
        let aad = vec![7u8; 300];
        let got = full_aad(AadFraming::AwsSample, Some(&aad), b"m").unwrap();
        assert_eq!(&got[..2], &300u16.to_be_bytes());
        assert_eq!(&got[2..34], Sha256::digest(&aad).as_slice());
        assert_eq!(&got[34..], &[1, b'm']);
    }

    #[test]
    fn limits() {
        let big = vec![0u8; 65536];
        assert_eq!(
            full_aad(AadFraming::SpecLiteral, Some(&big), b""),
            Err(FramingError::AadTooLong)
        );
        assert!(full_aad(AadFraming::SpecLiteral, Some(&big[..65535]), b"").is_ok());
        assert_eq!(
            full_aad(AadFraming::SpecLiteral, None, &[0u8; 256]),
            Err(FramingError::MetadataTooLong)
        );
    }

    #[test]
    fn cdiv_spec_vector() {
        let got = cdiv_sha256(
            b"project=nile,department=marketing",
            b"key_version=1",
            &hex::decode("1ccae5470f39700254779031").unwrap(),
            &hex::decode("821c642b5b71783367deaf18").unwrap(),
            &hex::decode("bc1c4dda7707d6812447c5955e99b261").unwrap(),
        );
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(got),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }
}
