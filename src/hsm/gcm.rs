//! AES-GCM inside the HSM: `CKM_AES_GCM`, single-part, 128-bit tag, with the IV made as the
//! vendor's convention requires ([`GcmIvMode`]): drawn by the proxy from `C_GenerateRandom`,
//! written into the parameter buffer by the HSM (CloudHSM, nShield), or appended by the HSM after
//! the tag (Luna in FIPS mode). Decryption is the same in every mode.
//!
//! Runs on a worker thread with that worker's session and a resolved key handle. Knows nothing of
//! queues, caches or recovery (those are `worker`'s); failures go through `errors::map_ckr`.

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use zeroize::Zeroizing;

use super::errors::{Fault, Op, map_ckr};
use super::settings::GcmIvMode;
use crate::core::{AeadSealed, CryptoError, GCM_TAG_LEN, Plaintext};

/// IV length used for encryption (the GCM-recommended 96 bits), in every mode.
pub(crate) const IV_LEN: usize = 12;
/// IV lengths accepted for decryption (12 is what we produce; 16 is what some peers send).
const DECRYPT_IV_LENS: [usize; 2] = [12, 16];
const TAG_BITS: u64 = (GCM_TAG_LEN * 8) as u64;

/// Encrypt `plaintext` under a fresh IV made as `mode` says; `aad` is the complete (framed) AAD.
pub(crate) fn encrypt(
    session: &Session,
    key: ObjectHandle,
    plaintext: &[u8],
    aad: &[u8],
    mode: GcmIvMode,
) -> Result<AeadSealed, Fault> {
    // HSMs that generate the IV themselves want a zero IV buffer on input.
    let mut iv = [0u8; IV_LEN];
    if mode == GcmIvMode::ProxyRandom {
        session
            .generate_random_slice(&mut iv)
            .map_err(|e| map_ckr(Op::Random, &e))?;
    }
    let out = {
        let params = GcmParams::new(&mut iv, aad, Ulong::new(TAG_BITS))
            .map_err(|e| map_ckr(Op::Encrypt, &e))?;
        session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(|e| map_ckr(Op::Encrypt, &e))?
    };
    split_output(out, iv, mode)
}

/// Take `C_Encrypt`'s output apart: ciphertext ‖ tag, plus the IV after the tag in
/// [`GcmIvMode::HsmAppended`]; in [`GcmIvMode::HsmInParams`] the HSM wrote the IV into `iv`.
/// An HSM mode that hands back no IV, or an all-zero one, is an internal error: sealing under a
/// zero IV would be catastrophic for GCM, and the result could never be decrypted anyway.
fn split_output(
    mut out: Vec<u8>,
    mut iv: [u8; IV_LEN],
    mode: GcmIvMode,
) -> Result<AeadSealed, Fault> {
    let short = |len: usize, what: &str| {
        Fault::plain(CryptoError::Internal(format!(
            "CKM_AES_GCM returned {len} bytes, less than {what}"
        )))
    };
    if mode == GcmIvMode::HsmAppended {
        let len = out.len();
        let Some(iv_at) = len.checked_sub(IV_LEN).filter(|at| *at >= GCM_TAG_LEN) else {
            return Err(short(len, "a tag and an IV"));
        };
        iv.copy_from_slice(&out[iv_at..]);
        out.truncate(iv_at);
    }
    if mode != GcmIvMode::ProxyRandom && iv.iter().all(|b| *b == 0) {
        return Err(Fault::plain(CryptoError::Internal(format!(
            "the HSM returned no GCM IV (hsm.gcm_iv = \"{}\"): check the HSM profile",
            mode.as_str()
        ))));
    }
    // C_Encrypt returns ciphertext ‖ tag.
    let Some(ct_len) = out.len().checked_sub(GCM_TAG_LEN) else {
        return Err(short(out.len(), "a tag"));
    };
    let mut tag = [0u8; GCM_TAG_LEN];
    tag.copy_from_slice(&out[ct_len..]);
    out.truncate(ct_len);
    Ok(AeadSealed {
        iv: iv.to_vec(),
        ciphertext: out,
        tag,
    })
}

/// Decrypt `ciphertext` ‖ `tag` (the caller's buffer is reused for the concatenation). A tag
/// mismatch is `InvalidCiphertext` and leaves the session usable.
pub(crate) fn decrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    ciphertext: &mut Vec<u8>,
    tag: &[u8; GCM_TAG_LEN],
    aad: &[u8],
) -> Result<Plaintext, Fault> {
    if !DECRYPT_IV_LENS.contains(&iv.len()) {
        return Err(Fault::plain(CryptoError::InvalidCiphertext));
    }
    // The mechanism wants a mutable IV buffer; copy to the stack rather than mutate the request.
    let mut iv_buf = [0u8; 16];
    let iv_buf = &mut iv_buf[..iv.len()];
    iv_buf.copy_from_slice(iv);
    let original_len = ciphertext.len();
    ciphertext.extend_from_slice(tag);
    let params =
        GcmParams::new(iv_buf, aad, Ulong::new(TAG_BITS)).map_err(|e| map_ckr(Op::Decrypt, &e))?;
    let result = session.decrypt(&Mechanism::AesGcm(params), key, ciphertext);
    // Restore the buffer so a retry sees the same input.
    ciphertext.truncate(original_len);
    result
        .map(Zeroizing::new)
        .map_err(|e| map_ckr(Op::Decrypt, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(ct: &[u8], tag: u8, iv: Option<[u8; IV_LEN]>) -> Vec<u8> {
        let mut out = ct.to_vec();
        out.extend_from_slice(&[tag; GCM_TAG_LEN]);
        if let Some(iv) = iv {
            out.extend_from_slice(&iv);
        }
        out
    }

    #[test]
    fn proxy_and_in_params_modes_take_the_iv_from_the_buffer() {
        let iv = [7u8; IV_LEN];
        for mode in [GcmIvMode::ProxyRandom, GcmIvMode::HsmInParams] {
            let sealed = split_output(output(b"abc", 9, None), iv, mode).unwrap();
            assert_eq!(sealed.ciphertext, b"abc");
            assert_eq!(sealed.tag, [9u8; GCM_TAG_LEN]);
            assert_eq!(sealed.iv, iv);
        }
    }

    #[test]
    fn appended_mode_takes_the_iv_after_the_tag() {
        let hsm_iv = [3u8; IV_LEN];
        let sealed = split_output(
            output(b"hello", 1, Some(hsm_iv)),
            [0; IV_LEN],
            GcmIvMode::HsmAppended,
        )
        .unwrap();
        assert_eq!(sealed.ciphertext, b"hello");
        assert_eq!(sealed.tag, [1u8; GCM_TAG_LEN]);
        assert_eq!(sealed.iv, hsm_iv);
        // Empty plaintext: tag and IV only.
        let sealed = split_output(
            output(b"", 1, Some(hsm_iv)),
            [0; IV_LEN],
            GcmIvMode::HsmAppended,
        )
        .unwrap();
        assert!(sealed.ciphertext.is_empty());
    }

    #[test]
    fn hsm_modes_refuse_a_missing_or_zero_iv() {
        // The HSM did not write the buffer.
        let err =
            split_output(output(b"x", 1, None), [0; IV_LEN], GcmIvMode::HsmInParams).unwrap_err();
        assert!(matches!(err.error, CryptoError::Internal(ref m) if m.contains("hsm-in-params")));
        // An all-zero IV after the tag.
        let err = split_output(
            output(b"x", 1, Some([0; IV_LEN])),
            [0; IV_LEN],
            GcmIvMode::HsmAppended,
        )
        .unwrap_err();
        assert!(matches!(err.error, CryptoError::Internal(_)));
        // Too short to hold a tag and an IV.
        let err = split_output(
            vec![0u8; GCM_TAG_LEN + IV_LEN - 1],
            [0; IV_LEN],
            GcmIvMode::HsmAppended,
        )
        .unwrap_err();
        assert!(matches!(err.error, CryptoError::Internal(ref m) if m.contains("less than")));
        // The proxy's own IV may be anything the RNG gave (all-zero is astronomically unlikely
        // but not wrong).
        assert!(split_output(output(b"x", 1, None), [0; IV_LEN], GcmIvMode::ProxyRandom).is_ok());
    }
}
