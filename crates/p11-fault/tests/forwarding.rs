//! Plain forwarding, injected errors, latency and hangs (tokens of their own; tests share the
//! process-wide context).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

mod common;

use std::time::{Duration, Instant};

use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;

fn gcm_round_trip(s: &cryptoki::session::Session, key: cryptoki::object::ObjectHandle) {
    let mut iv = [7u8; 12];
    let pt = b"forwarded through p11-fault";
    let ct = s
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
            key,
            pt,
        )
        .unwrap();
    assert_eq!(ct.len(), pt.len() + 16);
    let back = s
        .decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
            key,
            &ct,
        )
        .unwrap();
    assert_eq!(back, pt);
}

#[test]
fn forwards_keygen_and_gcm_round_trip() {
    let p = pkcs11();
    let (slot, label) = new_token(p);
    assert!(p.get_slots_with_token().unwrap().contains(&slot));
    assert_eq!(p.get_token_info(slot).unwrap().label(), label);
    assert!(!p.get_mechanism_list(slot).unwrap().is_empty());
    p.get_library_info().unwrap();
    let s = user_session(p, slot);
    let key = aes_key(&s);
    gcm_round_trip(&s, key);
    assert_eq!(s.generate_random_vec(16).unwrap().len(), 16);
    // A second C_Initialize on the initialized module.
    assert_eq!(
        rv_of(p.initialize(cryptoki::context::CInitializeArgs::new(
            cryptoki::context::CInitializeFlags::OS_LOCKING_OK
        ))),
        RvError::CryptokiAlreadyInitialized
    );
}

#[test]
fn errors_with_count_then_recover_on_the_same_session() {
    let p = pkcs11();
    let (slot, label) = new_token(p);
    let s = user_session(p, slot);
    let key = aes_key(&s);
    set_faults(
        &label,
        r#"{"errors": [{"functions": ["C_Encrypt", "C_Decrypt"], "ckr": "CKR_DEVICE_ERROR", "count": 2}]}"#,
    );
    let mut iv = [1u8; 12];
    for _ in 0..2 {
        let r = s.encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, &[], 128.into()).unwrap()),
            key,
            b"x",
        );
        assert_eq!(rv_of(r), RvError::DeviceError);
    }
    // The injected failure terminated the real operation: the same session works again.
    gcm_round_trip(&s, key);

    // Numeric ckr, `*`, no count = always; other tokens unaffected.
    set_faults(&label, r#"{"errors": [{"functions": ["*"], "ckr": 48}]}"#);
    assert_eq!(rv_of(s.get_session_info()), RvError::DeviceError);
    assert_eq!(rv_of(p.get_token_info(slot)), RvError::DeviceError);
    clear_faults(&label);
    gcm_round_trip(&s, key);

    // A file that does not parse means no faults.
    set_faults(
        &label,
        r#"{"errors": [{"functions": ["C_Encrypt"], "ckr": "CKR_NOPE"}]}"#,
    );
    gcm_round_trip(&s, key);

    // probability 1.0 always fails, 0.0 never does.
    set_faults(
        &label,
        r#"{"errors": [{"functions": ["C_GenerateRandom"], "ckr": "CKR_FUNCTION_FAILED", "probability": 0.0},
                       {"functions": ["C_GetSessionInfo"], "ckr": "CKR_FUNCTION_FAILED", "probability": 1.0}]}"#,
    );
    for _ in 0..20 {
        s.generate_random_vec(4).unwrap();
        assert_eq!(rv_of(s.get_session_info()), RvError::FunctionFailed);
    }
}

#[test]
fn latency_and_hang_delay_calls() {
    let p = pkcs11();
    let (slot, label) = new_token(p);
    let s = user_session(p, slot);
    set_faults(
        &label,
        r#"{"latency_us": {"C_GenerateRandom": 30000, "*": 0}}"#,
    );
    let t = Instant::now();
    s.generate_random_vec(8).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(30));

    set_faults(
        &label,
        r#"{"hang": {"functions": ["C_GetSessionInfo"], "ms": 120, "count": 1}}"#,
    );
    let t = Instant::now();
    s.get_session_info().unwrap();
    assert!(t.elapsed() >= Duration::from_millis(120));
    // count exhausted: the next call does not hang (not asserted: timing upper bounds flake).
    s.get_session_info().unwrap();
}
