//! AES-GCM inside the HSM: `CKM_AES_GCM`, single-part, 128-bit tag, IV from `C_GenerateRandom`.
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
use crate::core::{AeadSealed, CryptoError, GCM_TAG_LEN, Plaintext};

/// IV length the HSM generates for encryption (the GCM-recommended 96 bits).
pub(crate) const IV_LEN: usize = 12;
/// IV lengths accepted for decryption (12 is what we produce; 16 is what some peers send).
const DECRYPT_IV_LENS: [usize; 2] = [12, 16];
const TAG_BITS: u64 = (GCM_TAG_LEN * 8) as u64;

/// Encrypt `plaintext` with a fresh HSM-generated IV; `aad` is the complete (framed) AAD.
pub(crate) fn encrypt(
    session: &Session,
    key: ObjectHandle,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<AeadSealed, Fault> {
    let mut iv = [0u8; IV_LEN];
    session
        .generate_random_slice(&mut iv)
        .map_err(|e| map_ckr(Op::Random, &e))?;
    let mut out = {
        let params = GcmParams::new(&mut iv, aad, Ulong::new(TAG_BITS))
            .map_err(|e| map_ckr(Op::Encrypt, &e))?;
        session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(|e| map_ckr(Op::Encrypt, &e))?
    };
    // C_Encrypt returns ciphertext ‖ tag.
    let Some(ct_len) = out.len().checked_sub(GCM_TAG_LEN) else {
        return Err(Fault::plain(CryptoError::Internal(format!(
            "CKM_AES_GCM returned {} bytes, less than a tag",
            out.len()
        ))));
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
