//! Simulated token removal and restore with `after_restore = "sessions_invalid"` (one test in
//! its own process: it relies on session handles no other test could reuse).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

mod common;

use std::time::Duration;

use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;

#[test]
fn removal_then_restore_invalidates_old_sessions() {
    let p = pkcs11();
    let (slot, label) = new_token(p);
    let (other_slot, _other) = new_token(p);
    let s = user_session(p, slot);
    let key = aes_key(&s);
    s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).unwrap();

    set_faults(&label, r#"{"removed": true}"#);
    assert_eq!(rv_of(s.get_session_info()), RvError::DeviceRemoved);
    assert_eq!(
        rv_of(s.encrypt(&Mechanism::AesEcb, key, &[0u8; 16])),
        RvError::DeviceRemoved
    );
    assert_eq!(rv_of(p.get_token_info(slot)), RvError::TokenNotPresent);
    assert_eq!(rv_of(p.open_rw_session(slot)), RvError::TokenNotPresent);
    assert_eq!(rv_of(p.get_mechanism_list(slot)), RvError::TokenNotPresent);
    let present = p.get_slots_with_token().unwrap();
    assert!(!present.contains(&slot));
    assert!(present.contains(&other_slot));
    assert!(p.get_all_slots().unwrap().contains(&slot));
    assert!(!p.get_slot_info(slot).unwrap().token_present());
    // The other token is unaffected.
    let o = user_session(p, other_slot);
    o.get_session_info().unwrap();

    clear_faults(&label);
    assert_eq!(rv_of(s.get_session_info()), RvError::SessionHandleInvalid);
    assert!(p.get_slots_with_token().unwrap().contains(&slot));
    assert!(p.get_slot_info(slot).unwrap().token_present());
    let s2 = user_session(p, slot);
    let key = find_key(&s2);
    s2.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).unwrap();
    drop(s);

    // A removal the process makes no call during is still noticed (watcher thread).
    set_faults(&label, r#"{"removed": true}"#);
    std::thread::sleep(Duration::from_millis(300));
    clear_faults(&label);
    assert_eq!(rv_of(s2.get_session_info()), RvError::SessionHandleInvalid);
    let s3 = user_session(p, slot);
    let key = find_key(&s3);
    s3.encrypt(&Mechanism::AesEcb, key, &[0u8; 16]).unwrap();
}
