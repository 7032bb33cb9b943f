//! The fault-injecting PKCS#11 module (`crates/p11-fault`) for integration tests.
//!
//! `hsm-config/test.sh` builds the module and exports `P11_FAULT_LIB` (its path) and
//! `P11_FAULT_DIR` (where control files live); tests never set environment variables. Each
//! [`FaultyHsm`] copies the library into its own temp dir, so every test gets its own instance of
//! the module (its own `C_Initialize`/`C_Finalize` state: a test that makes the proxy
//! re-initialise the module disturbs no other test), and controls the faults of its own token
//! through `<P11_FAULT_DIR>/<token label>.json` (see crates/p11-fault/README.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::softhsm::TestToken;

/// The built module: `P11_FAULT_LIB`, else `target/debug/libp11_fault.so` beside the crate.
pub fn library() -> PathBuf {
    let path = std::env::var_os("P11_FAULT_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/debug/libp11_fault.so")
        });
    assert!(
        path.is_file(),
        "the fault-injecting PKCS#11 module is not built ({}): run the suite with hsm-config/test.sh, \
         which runs `cargo build -p p11-fault` and exports P11_FAULT_LIB and P11_FAULT_DIR",
        path.display()
    );
    path
}

/// The control directory: `P11_FAULT_DIR` (must be set: the module reads it too).
pub fn control_dir() -> PathBuf {
    let dir = std::env::var_os("P11_FAULT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "P11_FAULT_DIR is not set: run the suite with hsm-config/test.sh (it exports the \
             control directory the fault-injecting PKCS#11 module reads)"
            )
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A private copy of the fault module in front of one SoftHSM token, and its control file.
pub struct FaultyHsm {
    /// The copy of the module the proxy loads (`hsm.module`).
    pub module: PathBuf,
    /// The token behind it.
    pub label: String,
    control: PathBuf,
    _dir: tempfile::TempDir,
    /// The last control document written.
    state: Value,
}

impl FaultyHsm {
    /// A fresh module copy in front of `token`, with no faults.
    pub fn new(token: &TestToken) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = tempfile::tempdir().unwrap();
        // A distinct file (not a link): the dynamic loader keys instances by file identity.
        let module = dir.path().join(format!(
            "libp11_fault_{}.so",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::copy(library(), &module).unwrap();
        let control = control_dir().join(format!("{}.json", token.label));
        let hsm = Self {
            module,
            label: token.label.clone(),
            control,
            _dir: dir,
            state: json!({}),
        };
        hsm.write();
        hsm
    }

    /// The `[hsm]` lines that put the proxy on this module (plus `extra`).
    pub fn hsm_keys(&self, extra: &str) -> String {
        format!("module = \"{}\"\n{extra}", self.module.display())
    }

    /// Replace the whole control document.
    pub fn set(&mut self, doc: Value) {
        self.state = doc;
        self.write();
    }

    /// Change one field of the control document (others stay).
    pub fn set_field(&mut self, key: &str, value: Value) {
        self.state[key] = value;
        self.write();
    }

    /// No faults (the IV convention stays as set).
    pub fn clear(&mut self) {
        let gcm = self.state.get("gcm_iv").cloned();
        self.state = json!({});
        if let Some(gcm) = gcm {
            self.state["gcm_iv"] = gcm;
        }
        self.write();
    }

    /// `(open_sessions, opened_total)` from the module's stats file: sessions it opened on this
    /// token that are open now, and all it ever opened there.
    pub fn sessions(&self) -> (u64, u64) {
        let path = self.control.with_extension("stats.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return (0, 0);
        };
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()));
        (
            v["open_sessions"].as_u64().unwrap(),
            v["opened_total"].as_u64().unwrap(),
        )
    }

    fn write(&self) {
        // Write then rename: the module may read the file at any moment.
        let tmp = self
            .control
            .with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(&self.state).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }
}

impl Drop for FaultyHsm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.control);
        let _ = std::fs::remove_file(self.control.with_extension("stats.json"));
    }
}
