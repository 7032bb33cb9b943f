//! HMAC-SHA-256 inside the HSM (`CKM_SHA256_HMAC`): the audit chain's checkpoints are MACs of the
//! chain head made with a dedicated token key (e.g. `ekm-audit-hmac`), so whoever can edit the
//! audit file but cannot use the HSM cannot forge a chain that verifies.
//!
//! Must not depend on HTTP, wire formats or front ends.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::errors::{Fault, Op, map_ckr};
use crate::core::CryptoError;

/// `HMAC-SHA-256(key, data)` computed by the HSM.
pub(crate) fn hmac_sha256(
    session: &Session,
    key: ObjectHandle,
    data: &[u8],
) -> Result<[u8; 32], Fault> {
    let mac = session
        .sign(&Mechanism::Sha256Hmac, key, data)
        .map_err(|e| map_ckr(Op::Mac, &e))?;
    <[u8; 32]>::try_from(mac.as_slice()).map_err(|_| {
        Fault::plain(CryptoError::Internal(format!(
            "CKM_SHA256_HMAC returned {} bytes, not 32",
            mac.len()
        )))
    })
}
