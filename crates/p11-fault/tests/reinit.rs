//! `after_restore = "reinit_required"`: everything fails until C_Finalize + C_Initialize (own
//! process: it finalizes the module).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

mod common;

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;

#[test]
fn restore_requires_reinitialization() {
    let p = new_context();
    let (slot, label) = new_token(&p);
    let s = user_session(&p, slot);
    let key = aes_key(&s);
    s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).unwrap();

    set_faults(
        &label,
        r#"{"removed": true, "after_restore": "reinit_required"}"#,
    );
    assert_eq!(rv_of(s.get_session_info()), RvError::DeviceRemoved);
    set_faults(&label, r#"{"after_restore": "reinit_required"}"#);
    assert_eq!(rv_of(p.open_rw_session(slot)), RvError::GeneralError);
    assert_eq!(rv_of(p.get_token_info(slot)), RvError::GeneralError);
    assert_eq!(rv_of(s.get_session_info()), RvError::GeneralError);
    drop(s);

    let stale = p.clone();
    p.finalize().unwrap();
    assert_eq!(
        rv_of(stale.get_slot_info(slot)),
        RvError::CryptokiNotInitialized
    );
    assert_eq!(
        rv_of(stale.get_library_info()),
        RvError::CryptokiNotInitialized
    );
    stale
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    drop(stale);

    let p = new_context_after_reinit();
    let s = user_session(&p, slot);
    let key = find_key(&s);
    s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).unwrap();
    assert_eq!(p.get_token_info(slot).unwrap().label(), label);
}

/// A second context on the (already re-initialized) module: loading the library again gives
/// the same instance, and its `C_Initialize` reports "already initialized".
fn new_context_after_reinit() -> cryptoki::context::Pkcs11 {
    let p = cryptoki::context::Pkcs11::new(fault_lib()).unwrap();
    assert_eq!(
        rv_of(p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))),
        RvError::CryptokiAlreadyInitialized
    );
    p
}
