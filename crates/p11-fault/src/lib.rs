//! `p11-fault`: a **test-only** fault-injecting PKCS#11 module.
//!
//! The library (`libp11_fault.so`) exports only `C_GetFunctionList`. It loads the real module
//! (`P11_FAULT_TARGET`, default SoftHSMv2), and every entry of the PKCS#11 v2.40 function list it
//! hands out forwards to the real module after applying faults described by per-token JSON
//! control files (latency, injected errors, hangs, simulated token removal, vendor GCM IV
//! conventions). See `README.md` for the control-file format and the exact semantics.
//!
//! # Why the unsafe code lives here
//!
//! The proxy crate forbids `unsafe` (`unsafe_code = "forbid"` in the root manifest) and reaches
//! PKCS#11 only through the `cryptoki` crate. Implementing a PKCS#11 module is FFI by nature:
//! raw pointers in, raw pointers out, `dlopen` of another module. All of that is confined to this
//! separate workspace member, which is only ever loaded by tests; every `unsafe` block carries a
//! `// SAFETY:` comment (enforced by `clippy::undocumented_unsafe_blocks`).
//!
//! # What it must not depend on
//!
//! Nothing from the `ekm-proxy` crate (it is the thing under test, and this module must behave
//! like an independent vendor library), no async runtime, no logging framework (one-line
//! `eprintln!` diagnostics only), no global allocator or panic-strategy tricks. Dependencies are
//! limited to `cryptoki-sys` (C types), `libloading` (dlopen) and `serde`/`serde_json` (control
//! files). The production proxy must never depend on this crate.
//!
//! # Panics
//!
//! No entry point lets a panic cross the FFI boundary: every body runs under
//! [`std::panic::catch_unwind`], and a panic becomes `CKR_GENERAL_ERROR`.

mod config;
mod ffi;
mod state;

use std::ffi::{CStr, OsStr, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;

use cryptoki_sys::*;

use crate::state::State;

/// The real module: kept loaded for the life of the process.
pub(crate) struct Real {
    /// A copy of the real module's v2.40 function list.
    pub(crate) fl: CK_FUNCTION_LIST,
    _lib: libloading::Library,
}

/// Where SoftHSMv2 lives on common systems (used when `P11_FAULT_TARGET` is unset).
const DEFAULT_TARGETS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

fn target_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("P11_FAULT_TARGET").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    DEFAULT_TARGETS
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            format!(
                "P11_FAULT_TARGET is unset and none of {} exists",
                DEFAULT_TARGETS.join(", ")
            )
        })
}

type GetFunctionListFn = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;

impl Real {
    fn load() -> Result<Self, String> {
        let path = target_path()?;
        // SAFETY: loading a PKCS#11 module runs its initializers; that is what every PKCS#11
        // consumer does, and the module is the one the test configured.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        // SAFETY: `C_GetFunctionList` has this signature in every PKCS#11 version.
        let get: libloading::Symbol<'_, GetFunctionListFn> =
            unsafe { lib.get(b"C_GetFunctionList\0") }
                .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: `list` is a valid out-pointer; the symbol is the module's C_GetFunctionList.
        let rv = unsafe { get(&mut list) };
        if rv != CKR_OK || list.is_null() {
            return Err(format!(
                "{}: C_GetFunctionList returned {rv:#x}",
                path.display()
            ));
        }
        // SAFETY: on success the module returns a pointer to its (static) v2.x function list,
        // valid while the library is loaded; we only copy it (it starts with the 2.40 layout).
        let fl = unsafe { std::ptr::read(list) };
        Ok(Self { fl, _lib: lib })
    }

    /// Real `C_GetTokenInfo`.
    pub(crate) fn token_info(&self, slot: CK_SLOT_ID) -> Option<CK_TOKEN_INFO> {
        let f = self.fl.C_GetTokenInfo?;
        // SAFETY: CK_TOKEN_INFO is plain old data; all-zero is a valid value.
        let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable CK_TOKEN_INFO.
        let rv = unsafe { f(slot, &mut info) };
        (rv == CKR_OK).then_some(info)
    }

    /// Real `C_CloseAllSessions` (result ignored: best effort, used for simulated removal).
    pub(crate) fn close_all_sessions(&self, slot: CK_SLOT_ID) {
        if let Some(f) = self.fl.C_CloseAllSessions {
            // SAFETY: takes a plain slot id.
            unsafe { f(slot) };
        }
    }

    /// Real `C_CloseSession` (result ignored: used by `C_Finalize`).
    pub(crate) fn close_session(&self, h: CK_SESSION_HANDLE) {
        if let Some(f) = self.fl.C_CloseSession {
            // SAFETY: takes a plain session handle.
            unsafe { f(h) };
        }
    }
}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();

/// The real module, loading it on first use (one stderr line if that fails).
pub(crate) fn real() -> Option<&'static Real> {
    REAL.get_or_init(|| {
        let r = Real::load();
        if let Err(e) = &r {
            eprintln!("p11-fault: cannot load the real PKCS#11 module: {e}");
        }
        r
    })
    .as_ref()
    .ok()
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

/// The module state (a panic while holding the lock does not make it unusable).
pub(crate) fn state() -> MutexGuard<'static, State> {
    STATE
        .get_or_init(|| Mutex::new(State::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Run an entry point body; a panic becomes `CKR_GENERAL_ERROR`.
pub(crate) fn guard(f: impl FnOnce() -> CK_RV) -> CK_RV {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(CKR_GENERAL_ERROR)
}

/// Start (once) the thread that re-reads known tokens' control files every 20 ms, so a
/// removal is noticed even when the process makes no call while the token is "removed".
pub(crate) fn start_watcher() {
    static WATCHER: Once = Once::new();
    WATCHER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("p11-fault-watch".to_owned())
            .spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_millis(20));
                    let Some(real) = real() else { continue };
                    let _ = std::panic::catch_unwind(|| {
                        let mut st = state();
                        if st.initialized {
                            st.poll(real);
                        }
                    });
                }
            });
        if let Err(e) = spawned {
            eprintln!("p11-fault: cannot start the control-file watcher: {e}");
        }
    });
}

/// Keep this library mapped for the life of the process (`RTLD_NODELETE`): the watcher thread
/// runs code from it, and a consumer's `dlclose` (cryptoki drops its `Library`) must not unmap
/// it underneath that thread.
fn pin_self() {
    const RTLD_NOLOAD: c_int = 0x4;
    const RTLD_NODELETE: c_int = 0x1000;
    #[repr(C)]
    struct DlInfo {
        dli_fname: *const std::ffi::c_char,
        dli_fbase: *mut c_void,
        dli_sname: *const std::ffi::c_char,
        dli_saddr: *mut c_void,
    }
    // SAFETY: glibc's `dladdr` has exactly this signature.
    unsafe extern "C" {
        fn dladdr(addr: *const c_void, info: *mut DlInfo) -> c_int;
    }
    static PIN: Once = Once::new();
    PIN.call_once(|| {
        let mut info = DlInfo {
            dli_fname: std::ptr::null(),
            dli_fbase: std::ptr::null_mut(),
            dli_sname: std::ptr::null(),
            dli_saddr: std::ptr::null_mut(),
        };
        let addr = pin_self as fn() as *const c_void;
        // SAFETY: `addr` is an address inside this library; `info` is a valid out-struct.
        let found = unsafe { dladdr(addr, &mut info) };
        if found == 0 || info.dli_fname.is_null() {
            return;
        }
        // SAFETY: on success `dli_fname` is a NUL-terminated path owned by the loader.
        let path = unsafe { CStr::from_ptr(info.dli_fname) };
        let path = OsStr::from_bytes(path.to_bytes());
        // SAFETY: RTLD_NOLOAD only bumps the reference count of the already-loaded library (no
        // initializers run); RTLD_NODELETE makes it stay mapped. The handle is leaked on purpose.
        let pinned = unsafe {
            libloading::os::unix::Library::open(
                Some(path),
                libloading::os::unix::RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE,
            )
        };
        if let Ok(lib) = pinned {
            std::mem::forget(lib);
        }
    });
}

/// The only exported symbol. Loads the real module on first use and returns this module's
/// v2.40 function list.
///
/// # Safety
///
/// `pp_function_list` must be NULL or a valid pointer to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(pp_function_list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard(|| {
        if pp_function_list.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        pin_self();
        if real().is_none() {
            return CKR_GENERAL_ERROR;
        }
        // SAFETY: checked non-NULL; the caller guarantees it is writable. The list is a
        // `static` that callers only read (PKCS#11 hands out `CK_FUNCTION_LIST_PTR` by
        // convention, but the list is read-only).
        unsafe {
            *pp_function_list = std::ptr::addr_of!(ffi::FUNCTION_LIST).cast_mut();
        }
        CKR_OK
    })
}
