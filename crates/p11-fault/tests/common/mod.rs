//! Helpers for the `p11-fault` integration tests: locate the built module, give each test its
//! own SoftHSM token (unique label), write control files.
//!
//! The environment is read, never written (clippy.toml bans `set_var`): `SOFTHSM2_CONF` must be
//! set by the test command; if the file it names does not exist yet it is created here with a
//! `tokens` directory beside it. `P11_FAULT_DIR` is the control directory (default as in the
//! module: `${TMPDIR:-/tmp}/p11-fault`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

/// SO PIN of every test token.
pub const SO_PIN: &str = "so-1234";
/// User PIN of every test token.
pub const USER_PIN: &str = "user-1234";
/// Label of the AES key [`aes_key`] makes.
pub const KEY_LABEL: &str = "k1";

/// The built `libp11_fault.so`: `P11_FAULT_LIB` if set, else `<target-dir>/<profile>/deps/` (the
/// test executable's own directory, wherever `CARGO_TARGET_DIR` puts it), else
/// `<target-dir>/<profile>/`.
pub fn fault_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("P11_FAULT_LIB") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable directory");
    // Cargo builds the cdylib into `deps/` before this package's integration tests (and
    // hard-links it one level up when it compiles it).
    let candidates = [
        Some(deps.join("libp11_fault.so")),
        deps.parent().map(|p| p.join("libp11_fault.so")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "libp11_fault.so not found next to {} — build it first: cargo build -p p11-fault",
                deps.display()
            )
        })
}

/// Check `SOFTHSM2_CONF` (required) and create the configuration it names if missing.
pub fn ensure_softhsm_conf() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let conf = std::env::var_os("SOFTHSM2_CONF")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                    "SOFTHSM2_CONF is not set. Run: SOFTHSM2_CONF=$(mktemp -d)/softhsm2.conf \
                 P11_FAULT_DIR=$(mktemp -d) cargo test -p p11-fault"
                )
            });
        if !conf.exists() {
            let dir = conf
                .parent()
                .expect("SOFTHSM2_CONF has a directory")
                .to_path_buf();
            let tokens = dir.join("tokens");
            std::fs::create_dir_all(&tokens).unwrap();
            std::fs::write(
                &conf,
                format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
                     slots.removable = false\n",
                    tokens.display()
                ),
            )
            .unwrap();
        }
    });
}

/// The control directory (created if missing).
pub fn fault_dir() -> PathBuf {
    let dir = std::env::var_os("P11_FAULT_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("TMPDIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join("p11-fault")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new, initialized context on the fault module.
pub fn new_context() -> Pkcs11 {
    ensure_softhsm_conf();
    let p = Pkcs11::new(fault_lib()).expect("loading libp11_fault.so");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize through p11-fault");
    p
}

/// The process-wide context (the module is initialized once per process; tests in one binary
/// share it).
pub fn pkcs11() -> &'static Pkcs11 {
    static CTX: OnceLock<Pkcs11> = OnceLock::new();
    CTX.get_or_init(new_context)
}

/// Make a fresh token with a unique label (`pf-<pid>-<n>`), SO and user PINs set. Returns its
/// slot (SoftHSM renumbers a slot once its token is initialized) and label.
pub fn new_token(p: &Pkcs11) -> (Slot, String) {
    // Serialized: two tests must not pick the same free slot.
    static LOCK: Mutex<()> = Mutex::new(());
    static N: AtomicUsize = AtomicUsize::new(0);
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let label = format!(
        "pf-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    // Start from "no faults" (files of an earlier run with the same pid are possible).
    let _ = std::fs::remove_file(fault_dir().join(format!("{label}.json")));
    let free = p
        .get_all_slots()
        .unwrap()
        .into_iter()
        .find(|s| p.get_token_info(*s).is_ok_and(|t| !t.token_initialized()))
        .expect("SoftHSM has a free slot");
    p.init_token(free, &AuthPin::from(SO_PIN), &label).unwrap();
    let slot = p
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| p.get_token_info(*s).is_ok_and(|t| t.label() == label))
        .expect("the new token's slot");
    let s = p.open_rw_session(slot).unwrap();
    s.login(UserType::So, Some(&AuthPin::from(SO_PIN))).unwrap();
    s.init_pin(&AuthPin::from(USER_PIN)).unwrap();
    s.logout().unwrap();
    (slot, label)
}

/// A logged-in R/W user session.
pub fn user_session(p: &Pkcs11, slot: Slot) -> Session {
    let s = p.open_rw_session(slot).unwrap();
    match s.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    s
}

/// Generate a token AES-256 key labelled [`KEY_LABEL`].
pub fn aes_key(s: &Session) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(KEY_LABEL.as_bytes().to_vec()),
        ],
    )
    .unwrap()
}

/// Find the key [`aes_key`] made.
pub fn find_key(s: &Session) -> ObjectHandle {
    let found = s
        .find_objects(&[Attribute::Label(KEY_LABEL.as_bytes().to_vec())])
        .unwrap();
    *found.first().expect("the test key")
}

/// Write a token's control file atomically (temp file + rename: never half-read, and a new
/// inode, so the change is always noticed).
pub fn set_faults(label: &str, json: &str) {
    let dir = fault_dir();
    let tmp = dir.join(format!(".{label}.json.tmp"));
    std::fs::write(&tmp, json).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{label}.json"))).unwrap();
}

/// Remove a token's control file (no faults).
pub fn clear_faults(label: &str) {
    let _ = std::fs::remove_file(fault_dir().join(format!("{label}.json")));
}

/// The PKCS#11 error of a result.
pub fn rv_of<T: std::fmt::Debug>(r: cryptoki::error::Result<T>) -> RvError {
    match r {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}
