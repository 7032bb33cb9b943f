//! The v2.40 function list: one `extern "C"` forwarder per entry.
//!
//! Generic forwarders come from [`forward!`]; functions with extra semantics (initialization,
//! session tracking, slot-list filtering, GCM IV conventions) are written out below it.

#![allow(non_snake_case)]

use std::ptr::null_mut;

use cryptoki_sys::*;

use crate::config::GcmIv;
use crate::state::{Attr, Go, Outcome};
use crate::{Real, guard, real, state};

/// Call the real module's `$f`, or return `CKR_FUNCTION_NOT_SUPPORTED` when it lacks it.
macro_rules! real_call {
    ($real:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $real.fl.$f {
            // SAFETY: the arguments are the caller's, passed through unchanged, or buffers owned
            // by this module that outlive the call; the caller upholds the PKCS#11 contract for
            // its own pointers, exactly as if it called the real module directly.
            Some(f) => unsafe { f($($a),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}

/// The common path of every forwarder: attribute the call, decide its faults, sleep, then
/// return a state/injected error or forward. `abort` runs after an injected error, to terminate
/// the operation the call belongs to in the real module (a real failure would have).
fn dispatch(
    name: &'static str,
    attr: Attr,
    forward: impl FnOnce(&'static Real, Go) -> CK_RV,
    abort: impl FnOnce(&'static Real),
) -> CK_RV {
    dispatch_output(name, attr, false, forward, abort)
}

/// [`dispatch`] for a call with an output buffer: a length query (`length_query`, a NULL output
/// pointer) pays the injected latency only when the control file says so.
fn dispatch_output(
    name: &'static str,
    attr: Attr,
    length_query: bool,
    forward: impl FnOnce(&'static Real, Go) -> CK_RV,
    abort: impl FnOnce(&'static Real),
) -> CK_RV {
    guard(|| {
        let Some(real) = real() else {
            return CKR_GENERAL_ERROR;
        };
        let decision = state().decide(name, attr, real);
        let sleep = decision.sleep_for(length_query);
        if !sleep.is_zero() {
            std::thread::sleep(sleep);
        }
        match decision.outcome {
            Outcome::Go(go) => forward(real, go),
            Outcome::Return(rv) => rv,
            Outcome::Inject(rv) => {
                abort(real);
                rv
            }
        }
    })
}

/// Finish a single-part operation (`C_Encrypt`-shaped) into a scratch buffer, ignoring the
/// result: terminates it in the real module.
fn finish_single(f: CK_C_Encrypt, h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG) {
    let Some(f) = f else { return };
    let mut n: CK_ULONG = 0;
    // SAFETY: `data`/`len` are the caller's input for this very call; NULL output = size query.
    let rv = unsafe { f(h, data, len, null_mut(), &mut n) };
    if rv != CKR_OK {
        return;
    }
    let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0).min(1 << 26)];
    n = CK_ULONG::try_from(buf.len()).unwrap_or(0);
    // SAFETY: `buf` is writable for `n` bytes.
    unsafe { f(h, data, len, buf.as_mut_ptr(), &mut n) };
}

/// Finish a multi-part operation (`C_EncryptFinal`-shaped) into a scratch buffer.
fn finish_final(f: CK_C_EncryptFinal, h: CK_SESSION_HANDLE) {
    let Some(f) = f else { return };
    let mut n: CK_ULONG = 0;
    // SAFETY: NULL output = size query; `n` is a valid out-pointer.
    let rv = unsafe { f(h, null_mut(), &mut n) };
    if rv != CKR_OK {
        return;
    }
    let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0).min(1 << 26)];
    n = CK_ULONG::try_from(buf.len()).unwrap_or(0);
    // SAFETY: `buf` is writable for `n` bytes.
    unsafe { f(h, buf.as_mut_ptr(), &mut n) };
}

/// Terminate a verification with a signature that cannot match.
fn finish_verify(real: &Real, h: CK_SESSION_HANDLE) {
    let mut dummy = [0u8; 1];
    real_call!(real, C_VerifyFinal(h, dummy.as_mut_ptr(), 1));
}

/// `C_Decrypt`: forwarded like the others, except that a length query (NULL output) skips the
/// injected latency unless `latency_on_length_queries` is set.
unsafe extern "C" fn C_Decrypt(
    h: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    dispatch_output(
        "C_Decrypt",
        Attr::Session(h),
        out.is_null(),
        |real, _go| real_call!(real, C_Decrypt(h, data, len, out, out_len)),
        |real: &'static Real| finish_single(real.fl.C_Decrypt, h, data, len),
    )
}

/// Generate a plain forwarder per entry: `name(args) => attribution [, abort closure];`.
macro_rules! forward {
    ($( $name:ident ( $($a:ident : $t:ty),* $(,)? ) => $attr:expr $(, abort $abort:expr)? ; )*) => {$(
        unsafe extern "C" fn $name($($a: $t),*) -> CK_RV {
            dispatch(
                stringify!($name),
                $attr,
                |real, _go| real_call!(real, $name($($a),*)),
                |_real: &'static Real| { $( ($abort)(_real); )? },
            )
        }
    )*};
}

forward! {
    C_GetInfo(info: *mut CK_INFO) => Attr::Global;
    C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) => Attr::Slot(slot);
    C_GetMechanismList(slot: CK_SLOT_ID, list: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG)
        => Attr::Slot(slot);
    C_GetMechanismInfo(slot: CK_SLOT_ID, kind: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO)
        => Attr::Slot(slot);
    C_InitPIN(h: CK_SESSION_HANDLE, pin: *mut CK_UTF8CHAR, len: CK_ULONG) => Attr::Session(h);
    C_SetPIN(h: CK_SESSION_HANDLE, old: *mut CK_UTF8CHAR, old_len: CK_ULONG,
        new: *mut CK_UTF8CHAR, new_len: CK_ULONG) => Attr::Session(h);
    C_GetSessionInfo(h: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) => Attr::Session(h);
    C_GetOperationState(h: CK_SESSION_HANDLE, st: *mut CK_BYTE, len: *mut CK_ULONG)
        => Attr::Session(h);
    C_SetOperationState(h: CK_SESSION_HANDLE, st: *mut CK_BYTE, len: CK_ULONG,
        enc_key: CK_OBJECT_HANDLE, auth_key: CK_OBJECT_HANDLE) => Attr::Session(h);
    C_Login(h: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: *mut CK_UTF8CHAR, len: CK_ULONG)
        => Attr::Session(h);
    C_Logout(h: CK_SESSION_HANDLE) => Attr::Session(h);
    C_CreateObject(h: CK_SESSION_HANDLE, tmpl: *mut CK_ATTRIBUTE, n: CK_ULONG,
        obj: *mut CK_OBJECT_HANDLE) => Attr::Session(h);
    C_CopyObject(h: CK_SESSION_HANDLE, src: CK_OBJECT_HANDLE, tmpl: *mut CK_ATTRIBUTE,
        n: CK_ULONG, obj: *mut CK_OBJECT_HANDLE) => Attr::Session(h);
    C_DestroyObject(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) => Attr::Session(h);
    C_GetObjectSize(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, size: *mut CK_ULONG)
        => Attr::Session(h);
    C_GetAttributeValue(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, tmpl: *mut CK_ATTRIBUTE,
        n: CK_ULONG) => Attr::Session(h);
    C_SetAttributeValue(h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE, tmpl: *mut CK_ATTRIBUTE,
        n: CK_ULONG) => Attr::Session(h);
    C_FindObjectsInit(h: CK_SESSION_HANDLE, tmpl: *mut CK_ATTRIBUTE, n: CK_ULONG)
        => Attr::Session(h);
    C_FindObjects(h: CK_SESSION_HANDLE, objs: *mut CK_OBJECT_HANDLE, max: CK_ULONG,
        count: *mut CK_ULONG) => Attr::Session(h);
    C_FindObjectsFinal(h: CK_SESSION_HANDLE) => Attr::Session(h);
    C_DecryptInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE)
        => Attr::Session(h);
    C_DecryptUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG, out: *mut CK_BYTE,
        out_len: *mut CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_final(real.fl.C_DecryptFinal, h);
    C_DecryptFinal(h: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG)
        => Attr::Session(h), abort |real: &Real| finish_final(real.fl.C_DecryptFinal, h);
    C_DigestInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM) => Attr::Session(h);
    C_Digest(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG, out: *mut CK_BYTE,
        out_len: *mut CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_single(real.fl.C_Digest, h, data, len);
    C_DigestUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_final(real.fl.C_DigestFinal, h);
    C_DigestKey(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) => Attr::Session(h),
        abort |real: &Real| finish_final(real.fl.C_DigestFinal, h);
    C_DigestFinal(h: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG)
        => Attr::Session(h), abort |real: &Real| finish_final(real.fl.C_DigestFinal, h);
    C_SignInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE)
        => Attr::Session(h);
    C_Sign(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG, out: *mut CK_BYTE,
        out_len: *mut CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_single(real.fl.C_Sign, h, data, len);
    C_SignUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_final(real.fl.C_SignFinal, h);
    C_SignFinal(h: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG)
        => Attr::Session(h), abort |real: &Real| finish_final(real.fl.C_SignFinal, h);
    C_SignRecoverInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE)
        => Attr::Session(h);
    C_SignRecover(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG, out: *mut CK_BYTE,
        out_len: *mut CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_single(real.fl.C_SignRecover, h, data, len);
    C_VerifyInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE)
        => Attr::Session(h);
    C_Verify(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG, sig: *mut CK_BYTE,
        sig_len: CK_ULONG) => Attr::Session(h),
        abort |real: &Real| { real_call!(real, C_Verify(h, data, len, sig, sig_len)); };
    C_VerifyUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_verify(real, h);
    C_VerifyFinal(h: CK_SESSION_HANDLE, sig: *mut CK_BYTE, sig_len: CK_ULONG)
        => Attr::Session(h), abort |real: &Real| finish_verify(real, h);
    C_VerifyRecoverInit(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE)
        => Attr::Session(h);
    C_VerifyRecover(h: CK_SESSION_HANDLE, sig: *mut CK_BYTE, sig_len: CK_ULONG,
        out: *mut CK_BYTE, out_len: *mut CK_ULONG) => Attr::Session(h),
        abort |real: &Real| finish_single(real.fl.C_VerifyRecover, h, sig, sig_len);
    C_DigestEncryptUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG,
        out: *mut CK_BYTE, out_len: *mut CK_ULONG) => Attr::Session(h);
    C_DecryptDigestUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG,
        out: *mut CK_BYTE, out_len: *mut CK_ULONG) => Attr::Session(h);
    C_SignEncryptUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG,
        out: *mut CK_BYTE, out_len: *mut CK_ULONG) => Attr::Session(h);
    C_DecryptVerifyUpdate(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG,
        out: *mut CK_BYTE, out_len: *mut CK_ULONG) => Attr::Session(h);
    C_GenerateKey(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, tmpl: *mut CK_ATTRIBUTE,
        n: CK_ULONG, key: *mut CK_OBJECT_HANDLE) => Attr::Session(h);
    C_GenerateKeyPair(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM,
        pub_tmpl: *mut CK_ATTRIBUTE, pub_n: CK_ULONG, priv_tmpl: *mut CK_ATTRIBUTE,
        priv_n: CK_ULONG, pub_key: *mut CK_OBJECT_HANDLE, priv_key: *mut CK_OBJECT_HANDLE)
        => Attr::Session(h);
    C_WrapKey(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG) => Attr::Session(h);
    C_UnwrapKey(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, unwrapping: CK_OBJECT_HANDLE,
        wrapped: *mut CK_BYTE, wrapped_len: CK_ULONG, tmpl: *mut CK_ATTRIBUTE, n: CK_ULONG,
        key: *mut CK_OBJECT_HANDLE) => Attr::Session(h);
    C_DeriveKey(h: CK_SESSION_HANDLE, mech: *mut CK_MECHANISM, base: CK_OBJECT_HANDLE,
        tmpl: *mut CK_ATTRIBUTE, n: CK_ULONG, key: *mut CK_OBJECT_HANDLE) => Attr::Session(h);
    C_SeedRandom(h: CK_SESSION_HANDLE, seed: *mut CK_BYTE, len: CK_ULONG) => Attr::Session(h);
    C_GenerateRandom(h: CK_SESSION_HANDLE, out: *mut CK_BYTE, len: CK_ULONG) => Attr::Session(h);
    C_GetFunctionStatus(h: CK_SESSION_HANDLE) => Attr::Session(h);
    C_CancelFunction(h: CK_SESSION_HANDLE) => Attr::Session(h);
    C_WaitForSlotEvent(flags: CK_FLAGS, slot: *mut CK_SLOT_ID, reserved: *mut std::ffi::c_void)
        => Attr::Global;
}

fn no_abort(_: &'static Real) {}

// ---------------------------------------------------------------------------------------------
// Initialization

/// The caller said `CKF_LIBRARY_CANT_CREATE_OS_THREADS`: no watcher thread then (removals are
/// still detected on the next call attributed to the token).
fn cant_create_threads(args: CK_VOID_PTR) -> bool {
    if args.is_null() {
        return false;
    }
    // SAFETY: a non-NULL `C_Initialize` argument points to a CK_C_INITIALIZE_ARGS (PKCS#11 §5.4),
    // and the real module accepted it.
    let args = unsafe { std::ptr::read_unaligned(args.cast::<CK_C_INITIALIZE_ARGS>()) };
    args.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS != 0
}

unsafe extern "C" fn C_Initialize(args: CK_VOID_PTR) -> CK_RV {
    guard(|| {
        let Some(real) = real() else {
            return CKR_GENERAL_ERROR;
        };
        let decision = {
            let mut st = state();
            if st.initialized {
                return CKR_CRYPTOKI_ALREADY_INITIALIZED;
            }
            st.global_faults("C_Initialize")
        };
        if !decision.sleep.is_zero() {
            std::thread::sleep(decision.sleep);
        }
        if let Outcome::Inject(rv) | Outcome::Return(rv) = decision.outcome {
            return rv;
        }
        let rv = real_call!(real, C_Initialize(args));
        if rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED {
            return rv;
        }
        let mut st = state();
        if st.initialized {
            return CKR_CRYPTOKI_ALREADY_INITIALIZED;
        }
        st.on_initialize();
        drop(st);
        if !cant_create_threads(args) {
            crate::start_watcher();
        }
        CKR_OK
    })
}

/// Closes the sessions opened through this module but does NOT call the real `C_Finalize`: the
/// real library is shared by everything in the process that uses it (other tests, other
/// `Pkcs11` contexts, a direct SoftHSM user), and finalizing it would pull it from under them.
/// From the caller's view this is a full finalize: its sessions are gone and every call but
/// `C_Initialize`/`C_GetFunctionList` returns `CKR_CRYPTOKI_NOT_INITIALIZED`.
unsafe extern "C" fn C_Finalize(reserved: CK_VOID_PTR) -> CK_RV {
    guard(|| {
        if !reserved.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        let Some(real) = real() else {
            return CKR_GENERAL_ERROR;
        };
        let decision = {
            let mut st = state();
            if !st.initialized {
                return CKR_CRYPTOKI_NOT_INITIALIZED;
            }
            st.global_faults("C_Finalize")
        };
        if !decision.sleep.is_zero() {
            std::thread::sleep(decision.sleep);
        }
        if let Outcome::Inject(rv) | Outcome::Return(rv) = decision.outcome {
            return rv;
        }
        let mut st = state();
        if !st.initialized {
            return CKR_CRYPTOKI_NOT_INITIALIZED;
        }
        for h in st.on_finalize() {
            real.close_session(h);
        }
        CKR_OK
    })
}

// ---------------------------------------------------------------------------------------------
// Slots and sessions

unsafe extern "C" fn C_GetSlotList(
    present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    dispatch(
        "C_GetSlotList",
        Attr::Global,
        |real, _| {
            if count.is_null() {
                return CKR_ARGUMENTS_BAD;
            }
            if present == CK_FALSE {
                return real_call!(real, C_GetSlotList(present, list, count));
            }
            let mut slots: Vec<CK_SLOT_ID> = Vec::new();
            for _ in 0..8 {
                let mut n: CK_ULONG = 0;
                let rv = real_call!(real, C_GetSlotList(present, null_mut(), &mut n));
                if rv != CKR_OK {
                    return rv;
                }
                slots = vec![0; usize::try_from(n).unwrap_or(0)];
                let rv = real_call!(real, C_GetSlotList(present, slots.as_mut_ptr(), &mut n));
                if rv == CKR_BUFFER_TOO_SMALL {
                    continue;
                }
                if rv != CKR_OK {
                    return rv;
                }
                slots.truncate(usize::try_from(n).unwrap_or(0));
                break;
            }
            {
                let mut st = state();
                slots.retain(|s| !st.slot_removed(*s, real));
            }
            let needed = CK_ULONG::try_from(slots.len()).unwrap_or(CK_ULONG::MAX);
            // SAFETY: `count` is non-NULL and, per the PKCS#11 contract, valid for read/write;
            // when `list` is non-NULL it has room for `*count` slot ids (checked before copying).
            unsafe {
                if list.is_null() {
                    *count = needed;
                    return CKR_OK;
                }
                if *count < needed {
                    *count = needed;
                    return CKR_BUFFER_TOO_SMALL;
                }
                std::ptr::copy_nonoverlapping(slots.as_ptr(), list, slots.len());
                *count = needed;
            }
            CKR_OK
        },
        no_abort,
    )
}

unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    dispatch(
        "C_GetSlotInfo",
        Attr::Slot(slot),
        |real, go| {
            let rv = real_call!(real, C_GetSlotInfo(slot, info));
            if rv == CKR_OK && go.removed && !info.is_null() {
                // SAFETY: non-NULL and just filled in by the real module.
                unsafe { (*info).flags &= !CKF_TOKEN_PRESENT };
            }
            rv
        },
        no_abort,
    )
}

unsafe extern "C" fn C_InitToken(
    slot: CK_SLOT_ID,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
    label: *mut CK_UTF8CHAR,
) -> CK_RV {
    dispatch(
        "C_InitToken",
        Attr::Slot(slot),
        |real, _| {
            let rv = real_call!(real, C_InitToken(slot, pin, pin_len, label));
            state().forget_slot(slot);
            rv
        },
        no_abort,
    )
}

unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    app: CK_VOID_PTR,
    notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    dispatch(
        "C_OpenSession",
        Attr::Slot(slot),
        |real, _| {
            let rv = real_call!(real, C_OpenSession(slot, flags, app, notify, session));
            if rv == CKR_OK && !session.is_null() {
                // SAFETY: non-NULL and just written by the real module.
                let h = unsafe { *session };
                state().on_open(h, slot);
            }
            rv
        },
        no_abort,
    )
}

unsafe extern "C" fn C_CloseSession(h: CK_SESSION_HANDLE) -> CK_RV {
    dispatch(
        "C_CloseSession",
        Attr::Session(h),
        |real, _| {
            let rv = real_call!(real, C_CloseSession(h));
            if matches!(rv, CKR_OK | CKR_SESSION_HANDLE_INVALID | CKR_SESSION_CLOSED) {
                state().on_close(h);
            }
            rv
        },
        no_abort,
    )
}

unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    dispatch(
        "C_CloseAllSessions",
        Attr::Slot(slot),
        |real, _| {
            let rv = real_call!(real, C_CloseAllSessions(slot));
            if rv == CKR_OK {
                state().on_close_all(slot);
            }
            rv
        },
        no_abort,
    )
}

// ---------------------------------------------------------------------------------------------
// Encryption, with the vendor GCM IV conventions

/// 12 random bytes: the OS source, else the real module's RNG on the session.
fn random_iv(real: &Real, h: CK_SESSION_HANDLE) -> Option<[u8; 12]> {
    use std::io::Read;
    let mut iv = [0u8; 12];
    let os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut iv));
    if os.is_ok() {
        return Some(iv);
    }
    (real_call!(real, C_GenerateRandom(h, iv.as_mut_ptr(), 12)) == CKR_OK).then_some(iv)
}

unsafe extern "C" fn C_EncryptInit(
    h: CK_SESSION_HANDLE,
    mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    dispatch(
        "C_EncryptInit",
        Attr::Session(h),
        |real, go| {
            state().gcm_pending.remove(&h);
            if go.gcm == GcmIv::Proxy || mech.is_null() {
                return real_call!(real, C_EncryptInit(h, mech, key));
            }
            // SAFETY: non-NULL; the caller passes a valid CK_MECHANISM.
            let m = unsafe { std::ptr::read(mech) };
            if m.mechanism != CKM_AES_GCM {
                return real_call!(real, C_EncryptInit(h, mech, key));
            }
            if m.pParameter.is_null()
                || usize::try_from(m.ulParameterLen).ok() != Some(size_of::<CK_GCM_PARAMS>())
            {
                return CKR_MECHANISM_PARAM_INVALID;
            }
            // SAFETY: non-NULL and `ulParameterLen` says it is a CK_GCM_PARAMS (read unaligned
            // to be independent of the caller's alignment).
            let mut params =
                unsafe { std::ptr::read_unaligned(m.pParameter.cast::<CK_GCM_PARAMS>()) };
            if params.pIv.is_null() || params.ulIvLen != 12 {
                return CKR_MECHANISM_PARAM_INVALID;
            }
            // SAFETY: the caller's IV buffer is non-NULL and `ulIvLen` (12) bytes long.
            let caller_iv = unsafe { std::slice::from_raw_parts_mut(params.pIv, 12) };
            if caller_iv.iter().any(|b| *b != 0) {
                return CKR_MECHANISM_PARAM_INVALID;
            }
            let Some(mut iv) = random_iv(real, h) else {
                return CKR_FUNCTION_FAILED;
            };
            params.pIv = iv.as_mut_ptr();
            let mut real_mech = CK_MECHANISM {
                mechanism: CKM_AES_GCM,
                pParameter: std::ptr::addr_of_mut!(params).cast(),
                ulParameterLen: m.ulParameterLen,
            };
            let rv = real_call!(real, C_EncryptInit(h, &mut real_mech, key));
            if rv != CKR_OK {
                return rv;
            }
            match go.gcm {
                GcmIv::HsmInParams => caller_iv.copy_from_slice(&iv),
                GcmIv::HsmAppended => {
                    state().gcm_pending.insert(h, iv);
                }
                GcmIv::Proxy => {}
            }
            CKR_OK
        },
        no_abort,
    )
}

unsafe extern "C" fn C_Encrypt(
    h: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    dispatch_output(
        "C_Encrypt",
        Attr::Session(h),
        out.is_null(),
        |real, _| {
            let pending = state().gcm_pending.get(&h).copied();
            let Some(iv) = pending else {
                return real_call!(real, C_Encrypt(h, data, len, out, out_len));
            };
            if out_len.is_null() {
                return CKR_ARGUMENTS_BAD;
            }
            if out.is_null() {
                let rv = real_call!(real, C_Encrypt(h, data, len, null_mut(), out_len));
                if rv == CKR_OK {
                    // SAFETY: non-NULL, just written by the real module.
                    unsafe { *out_len = (*out_len).saturating_add(12) };
                } else {
                    state().gcm_pending.remove(&h);
                }
                return rv;
            }
            // SAFETY: non-NULL; the caller's output capacity.
            let cap = unsafe { *out_len };
            let mut inner = cap.saturating_sub(12);
            let rv = real_call!(real, C_Encrypt(h, data, len, out, &mut inner));
            match rv {
                CKR_OK => {
                    state().gcm_pending.remove(&h);
                    let at = usize::try_from(inner).unwrap_or(usize::MAX);
                    // SAFETY: the real module wrote `inner` <= cap - 12 bytes, so the caller's
                    // buffer (cap bytes) has room for the 12-byte IV right after them.
                    unsafe {
                        std::ptr::copy_nonoverlapping(iv.as_ptr(), out.add(at), 12);
                        *out_len = inner.saturating_add(12);
                    }
                    CKR_OK
                }
                CKR_BUFFER_TOO_SMALL => {
                    // The operation stays active (PKCS#11 §5.2), and so does the pending IV.
                    // SAFETY: non-NULL out-pointer.
                    unsafe { *out_len = inner.saturating_add(12) };
                    rv
                }
                _ => {
                    state().gcm_pending.remove(&h);
                    rv
                }
            }
        },
        |real| {
            state().gcm_pending.remove(&h);
            finish_single(real.fl.C_Encrypt, h, data, len);
        },
    )
}

/// Multi-part encryption under `hsm-appended` GCM is not emulated: terminate the real
/// operation and report `CKR_FUNCTION_NOT_SUPPORTED`.
fn appended_multipart(real: &Real, h: CK_SESSION_HANDLE) -> Option<CK_RV> {
    state().gcm_pending.remove(&h)?;
    finish_final(real.fl.C_EncryptFinal, h);
    Some(CKR_FUNCTION_NOT_SUPPORTED)
}

unsafe extern "C" fn C_EncryptUpdate(
    h: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    dispatch(
        "C_EncryptUpdate",
        Attr::Session(h),
        |real, _| {
            appended_multipart(real, h)
                .unwrap_or_else(|| real_call!(real, C_EncryptUpdate(h, data, len, out, out_len)))
        },
        |real| {
            state().gcm_pending.remove(&h);
            finish_final(real.fl.C_EncryptFinal, h);
        },
    )
}

unsafe extern "C" fn C_EncryptFinal(
    h: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    dispatch(
        "C_EncryptFinal",
        Attr::Session(h),
        |real, _| {
            appended_multipart(real, h)
                .unwrap_or_else(|| real_call!(real, C_EncryptFinal(h, out, out_len)))
        },
        |real| {
            state().gcm_pending.remove(&h);
            finish_final(real.fl.C_EncryptFinal, h);
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The list

/// This module's function list (PKCS#11 v2.40), handed out by `C_GetFunctionList`.
pub(crate) static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(crate::C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};
