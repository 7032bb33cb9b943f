//! The wrapped-blob format of the Cloud EKM front end, and the AAD that binds a blob to its key.
//!
//! Cloud EKM leaves the blob format to the EKM. Ours is self-describing so that key rotation and
//! format changes never need a side table:
//!
//! ```text
//! format (1 = v1) ‖ flags ‖ u8 len(key version id) ‖ key version id ‖ IV (12) ‖ ciphertext ‖ tag (16)
//! ```
//!
//! The key version id is the label of the HSM key that wrapped the blob. The AES-GCM AAD is
//!
//! ```text
//! "ekm-proxy/gcp/v1" ‖ 0x00 ‖ format ‖ flags ‖ u16be len(key path) ‖ key path ‖ u8 len(id) ‖ id ‖ caller AAD
//! ```
//!
//! so a blob opens only under the same key path, key version, flags and caller AAD: changing any
//! header byte, or presenting the blob under another key path, fails authentication in the HSM.
//! Flag bit 0 marks a blob made by a key health check; a health-check unwrap may only open such
//! blobs, which is what makes it safe to exempt health checks from justification policy.
//!
//! Pure byte handling: no HTTP, JSON or HSM types.

use crate::core::GCM_TAG_LEN;

/// Format version 1.
pub const FORMAT_V1: u8 = 1;
/// Flag: made by a key health check.
pub const FLAG_HEALTH_CHECK: u8 = 0x01;
/// IV length of v1 blobs (the HSM's 96-bit GCM IV).
pub const IV_LEN: usize = 12;
/// Domain separation for the AAD, so our blobs can never be confused with another protocol's.
const AAD_LABEL: &[u8] = b"ekm-proxy/gcp/v1";
/// Flags this build understands.
const KNOWN_FLAGS: u8 = FLAG_HEALTH_CHECK;

/// A parsed blob, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob<'a> {
    /// Flag bits.
    pub flags: u8,
    /// The HSM key (label) that wrapped it.
    pub key_version: &'a str,
    /// The GCM IV.
    pub iv: &'a [u8],
    /// The ciphertext.
    pub ciphertext: &'a [u8],
    /// The GCM tag.
    pub tag: [u8; GCM_TAG_LEN],
}

/// Why bytes are not a blob of ours (safe to return to the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Shorter than the smallest possible blob.
    #[error("wrapped blob is truncated")]
    Truncated,
    /// Unknown format byte.
    #[error("wrapped blob has an unknown format version")]
    UnknownFormat,
    /// Flag bits this build does not know.
    #[error("wrapped blob has unknown flags")]
    UnknownFlags,
    /// The key version id is empty or not UTF-8.
    #[error("wrapped blob has an invalid key version id")]
    BadKeyVersion,
}

impl Blob<'_> {
    /// Whether a key health check made this blob.
    pub fn is_health_check(&self) -> bool {
        self.flags & FLAG_HEALTH_CHECK != 0
    }
}

/// Serialize a v1 blob.
pub fn encode(flags: u8, key_version: &str, iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> Vec<u8> {
    let id = key_version.as_bytes();
    let mut out = Vec::with_capacity(3 + id.len() + iv.len() + ciphertext.len() + tag.len());
    out.push(FORMAT_V1);
    out.push(flags);
    // Labels are at most 255 bytes (checked by config validation); truncation cannot happen.
    out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(id);
    out.extend_from_slice(iv);
    out.extend_from_slice(ciphertext);
    out.extend_from_slice(tag);
    out
}

/// Parse a v1 blob.
pub fn parse(bytes: &[u8]) -> Result<Blob<'_>, BlobError> {
    let [format, flags, id_len, rest @ ..] = bytes else {
        return Err(BlobError::Truncated);
    };
    if *format != FORMAT_V1 {
        return Err(BlobError::UnknownFormat);
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(BlobError::UnknownFlags);
    }
    let id_len = usize::from(*id_len);
    if id_len == 0 {
        return Err(BlobError::BadKeyVersion);
    }
    if rest.len() < id_len + IV_LEN + GCM_TAG_LEN {
        return Err(BlobError::Truncated);
    }
    let (id, rest) = rest.split_at(id_len);
    let key_version = std::str::from_utf8(id).map_err(|_| BlobError::BadKeyVersion)?;
    let (iv, rest) = rest.split_at(IV_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - GCM_TAG_LEN);
    let tag: [u8; GCM_TAG_LEN] = tag.try_into().map_err(|_| BlobError::Truncated)?;
    Ok(Blob {
        flags: *flags,
        key_version,
        iv,
        ciphertext,
        tag,
    })
}

/// The AES-GCM AAD for a blob of `key_path` made by `key_version` with `flags`.
pub fn aad(key_path: &str, flags: u8, key_version: &str, caller_aad: &[u8]) -> Vec<u8> {
    let path = key_path.as_bytes();
    let id = key_version.as_bytes();
    let mut out =
        Vec::with_capacity(AAD_LABEL.len() + 7 + path.len() + id.len() + caller_aad.len());
    out.extend_from_slice(AAD_LABEL);
    out.push(0);
    out.push(FORMAT_V1);
    out.push(flags);
    // Key paths are at most 256 bytes and labels 255 (config validation).
    out.extend_from_slice(&u16::try_from(path.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(path);
    out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(id);
    out.extend_from_slice(caller_aad);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let blob = encode(FLAG_HEALTH_CHECK, "k-v2", &[7; 12], b"ct", &[9; 16]);
        assert_eq!(&blob[..3], &[1, 1, 4]);
        assert_eq!(&blob[3..7], b"k-v2");
        let parsed = parse(&blob).unwrap();
        assert!(parsed.is_health_check());
        assert_eq!(parsed.key_version, "k-v2");
        assert_eq!(parsed.iv, &[7; 12]);
        assert_eq!(parsed.ciphertext, b"ct");
        assert_eq!(parsed.tag, [9; 16]);
        let empty_ct = encode(0, "k", &[1; 12], b"", &[2; 16]);
        assert_eq!(parse(&empty_ct).unwrap().ciphertext, b"");
    }

    #[test]
    fn refuses_malformed_blobs() {
        let good = encode(0, "key", &[0; 12], b"abc", &[0; 16]);
        assert_eq!(parse(&good[..2]), Err(BlobError::Truncated));
        assert_eq!(parse(&good[..3 + 3 + 12 + 15]), Err(BlobError::Truncated));
        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(parse(&bad), Err(BlobError::UnknownFormat));
        let mut bad = good.clone();
        bad[1] = 0x80;
        assert_eq!(parse(&bad), Err(BlobError::UnknownFlags));
        let mut bad = good.clone();
        bad[2] = 0;
        assert_eq!(parse(&bad), Err(BlobError::BadKeyVersion));
        let mut bad = good;
        bad[3] = 0xff;
        assert_eq!(parse(&bad), Err(BlobError::BadKeyVersion));
    }

    #[test]
    fn aad_binds_every_header_field() {
        let base = aad("keys/a", 0, "v1", b"ctx");
        assert_ne!(base, aad("keys/b", 0, "v1", b"ctx"));
        assert_ne!(base, aad("keys/a", FLAG_HEALTH_CHECK, "v1", b"ctx"));
        assert_ne!(base, aad("keys/a", 0, "v2", b"ctx"));
        assert_ne!(base, aad("keys/a", 0, "v1", b"ctx2"));
        // Length prefixes stop boundary shifting between path, id and AAD.
        assert_ne!(aad("ab", 0, "c", b""), aad("a", 0, "bc", b""));
        assert!(base.starts_with(b"ekm-proxy/gcp/v1\0\x01\x00\x00\x06keys/a\x02v1ctx"));
    }
}
