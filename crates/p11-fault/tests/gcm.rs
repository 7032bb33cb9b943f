//! Vendor GCM IV conventions (`gcm_iv`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers outside #[test]

mod common;

use common::*;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

const PT: &[u8] = b"vendor IV conventions";

fn gcm_encrypt(
    s: &Session,
    key: ObjectHandle,
    iv: &mut [u8; 12],
) -> cryptoki::error::Result<Vec<u8>> {
    s.encrypt(
        &Mechanism::AesGcm(GcmParams::new(iv, b"aad", 128.into()).unwrap()),
        key,
        PT,
    )
}

fn gcm_decrypt(s: &Session, key: ObjectHandle, iv: &[u8], ct: &[u8]) -> Vec<u8> {
    let mut iv = iv.to_vec();
    s.decrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
        key,
        ct,
    )
    .unwrap()
}

#[test]
fn hsm_in_params_writes_the_generated_iv() {
    let p = pkcs11();
    let (slot, label) = new_token(p);
    let s = user_session(p, slot);
    let key = aes_key(&s);
    set_faults(&label, r#"{"gcm_iv": "hsm-in-params"}"#);

    let mut iv = [0u8; 12];
    iv[11] = 1;
    assert_eq!(
        rv_of(gcm_encrypt(&s, key, &mut iv)),
        RvError::MechanismParamInvalid
    );

    let mut iv = [0u8; 12];
    let ct = gcm_encrypt(&s, key, &mut iv).unwrap();
    assert_eq!(ct.len(), PT.len() + 16);
    assert_ne!(
        iv, [0u8; 12],
        "the module wrote its IV into the caller's buffer"
    );
    assert_eq!(gcm_decrypt(&s, key, &iv, &ct), PT);

    // And through the plain path (no convention) too.
    set_faults(&label, r#"{"gcm_iv": "proxy"}"#);
    assert_eq!(gcm_decrypt(&s, key, &iv, &ct), PT);
    // Pass-through accepts a caller IV again.
    let mut iv = [9u8; 12];
    gcm_encrypt(&s, key, &mut iv).unwrap();
}

#[test]
fn hsm_appended_appends_the_generated_iv() {
    let p = pkcs11();
    let (slot, label) = new_token(p);
    let s = user_session(p, slot);
    let key = aes_key(&s);
    set_faults(&label, r#"{"gcm_iv": "hsm-appended"}"#);

    let mut iv = [3u8; 12];
    assert_eq!(
        rv_of(gcm_encrypt(&s, key, &mut iv)),
        RvError::MechanismParamInvalid
    );

    let mut iv = [0u8; 12];
    let out = gcm_encrypt(&s, key, &mut iv).unwrap();
    assert_eq!(out.len(), PT.len() + 16 + 12);
    assert_eq!(iv, [0u8; 12], "the caller's IV buffer is not written");
    let (ct, tail_iv) = out.split_at(out.len() - 12);
    assert_ne!(tail_iv, [0u8; 12]);
    assert_eq!(gcm_decrypt(&s, key, tail_iv, ct), PT);

    // Two encryptions get different IVs.
    let mut iv = [0u8; 12];
    let out2 = gcm_encrypt(&s, key, &mut iv).unwrap();
    assert_ne!(out2[out2.len() - 12..], out[out.len() - 12..]);

    // Multi-part GCM is not emulated; the session stays usable.
    let mut iv = [0u8; 12];
    s.encrypt_init(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, &[], 128.into()).unwrap()),
        key,
    )
    .unwrap();
    assert_eq!(rv_of(s.encrypt_update(PT)), RvError::FunctionNotSupported);
    gcm_encrypt(&s, key, &mut [0u8; 12]).unwrap();
}

/// The raw sequence, including a too-small buffer (cryptoki always asks for the size first).
#[test]
fn hsm_appended_buffer_too_small_keeps_the_operation() {
    use cryptoki_sys::*;
    let p = pkcs11();
    let (slot, label) = new_token(p);
    let s = user_session(p, slot);
    let key = aes_key(&s);
    set_faults(&label, r#"{"gcm_iv": "hsm-appended"}"#);

    // SAFETY: the same module cryptoki loaded (same instance); its C_GetFunctionList signature.
    let lib = unsafe { libloading::Library::new(fault_lib()) }.unwrap();
    // SAFETY: the exported symbol has this type.
    let get: libloading::Symbol<'_, unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
        unsafe { lib.get(b"C_GetFunctionList\0") }.unwrap();
    let mut list = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { get(&mut list) }, CKR_OK);
    // SAFETY: the module returned its static list.
    let fl = unsafe { &*list };
    assert_eq!((fl.version.major, fl.version.minor), (2, 40));

    let mut iv = [0u8; 12];
    let mut params = CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: std::ptr::null_mut(),
        ulAADLen: 0,
        ulTagBits: 128,
    };
    let mut mech = CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: (&raw mut params).cast(),
        ulParameterLen: size_of::<CK_GCM_PARAMS>() as CK_ULONG,
    };
    let h = s.handle();
    let mut data = PT.to_vec();
    // SAFETY: valid session and key handles; every buffer is at least as long as passed.
    unsafe {
        assert_eq!(
            (fl.C_EncryptInit.unwrap())(h, &mut mech, key.handle()),
            CKR_OK
        );
        let enc = fl.C_Encrypt.unwrap();
        let mut n: CK_ULONG = 0;
        let rv = enc(
            h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            std::ptr::null_mut(),
            &mut n,
        );
        assert_eq!(rv, CKR_OK);
        assert_eq!(n as usize, PT.len() + 16 + 12);
        let mut out = vec![0u8; n as usize];
        let mut small = n - 1;
        let rv = enc(
            h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut small,
        );
        assert_eq!(rv, CKR_BUFFER_TOO_SMALL);
        assert_eq!(small, n);
        let mut len = n;
        let rv = enc(
            h,
            data.as_mut_ptr(),
            data.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut len,
        );
        assert_eq!(rv, CKR_OK);
        assert_eq!(len, n);
        let (ct, tail_iv) = out.split_at(out.len() - 12);
        let mut iv = tail_iv.to_vec();
        let back = s
            .decrypt(
                &Mechanism::AesGcm(GcmParams::new(&mut iv, &[], 128.into()).unwrap()),
                key,
                ct,
            )
            .unwrap();
        assert_eq!(back, PT);
    }
}
