//! SoftHSMv2 tokens for integration tests, made by `hsm::bootstrap` (the code users run).
//!
//! SoftHSM reads its configuration from `SOFTHSM2_CONF` at `C_Initialize`. The test command sets
//! it (`hsm-config/test.sh` points it at a temp dir); tests never set environment variables. If
//! the file it names does not exist yet, it is created here with a `tokens` directory beside it,
//! so `SOFTHSM2_CONF=$(mktemp -d)/softhsm2.conf cargo test` just works. Every [`TestToken`] gets
//! a unique label, so tests run in parallel without sharing state.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ekm_proxy::hsm::bootstrap::{self, KeyReport, KeySpec};
use ekm_proxy::hsm::{HsmSettings, ModuleGuard, TokenSelector};
use ekm_proxy::secret::SecretString;

/// SO PIN of every test token.
pub const SO_PIN: &str = "so-secret-1234";
/// User PIN of every test token.
pub const USER_PIN: &str = "user-secret-1234";

/// Where SoftHSMv2's module lives on common systems (after `SOFTHSM2_MODULE`): the same list
/// `ekm-proxy dev init` searches.
pub use ekm_proxy::dev::profile::SOFTHSM_MODULE_PATHS as MODULE_CANDIDATES;

/// A fresh token on SoftHSM with the dev keys, and what a test needs to use it.
#[derive(Debug, Clone)]
pub struct TestToken {
    /// PKCS#11 module path.
    pub module: PathBuf,
    /// Token label (`t-<pid>-<n>`).
    pub label: String,
    /// Token serial number.
    pub serial: String,
    /// SO PIN (plain, for config files written by tests).
    pub so_pin: String,
    /// User PIN (plain, for config files written by tests).
    pub user_pin: String,
    /// Keeps the module initialized while the token is in use, so bootstrap calls do not
    /// re-initialize it each time.
    _module: ModuleGuard,
}

impl TestToken {
    /// A new token with the standard dev keys.
    pub fn new() -> Self {
        let token = Self::empty();
        for spec in dev_key_specs() {
            token.add_key(&spec);
        }
        token
    }

    /// A new token without keys.
    pub fn empty() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        ensure_conf();
        let module = module_path();
        let guard = ModuleGuard::acquire(&module).unwrap_or_else(|e| panic!("SoftHSM module: {e}"));
        let label = format!(
            "t-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let report = bootstrap::ensure_token(&module, &label, &SO_PIN.into(), &USER_PIN.into())
            .unwrap_or_else(|e| panic!("creating token {label}: {e}"));
        assert!(report.created, "token {label} already existed");
        Self {
            module,
            label,
            serial: report.serial,
            so_pin: SO_PIN.to_owned(),
            user_pin: USER_PIN.to_owned(),
            _module: guard,
        }
    }

    /// The user PIN as the crate's secret type.
    pub fn pin(&self) -> SecretString {
        SecretString::from(self.user_pin.as_str())
    }

    /// `ensure_key` on this token.
    pub fn add_key(&self, spec: &KeySpec) -> KeyReport {
        bootstrap::ensure_key(&self.module, &self.label, &self.pin(), spec)
            .unwrap_or_else(|e| panic!("key {} on {}: {e}", spec.label, self.label))
    }

    /// Backend settings for this token (selected by label): 2 workers, a roomy queue, 5 s deadline.
    pub fn settings(&self) -> HsmSettings {
        let mut s = HsmSettings::new(
            &self.module,
            TokenSelector::Label(self.label.clone()),
            self.pin(),
        );
        s.workers = 2;
        s.queue_capacity = 256;
        s.op_timeout = Duration::from_secs(5);
        s
    }
}

/// Key specs of the dev keys: the same set `ekm-proxy dev init` creates (sensitive,
/// non-extractable AES-256).
pub use ekm_proxy::dev::profile::dev_key_specs;

/// The SoftHSM module: `SOFTHSM2_MODULE` if set, else the first of [`MODULE_CANDIDATES`] that
/// exists. Panics with install instructions when SoftHSM is missing.
pub fn module_path() -> PathBuf {
    if let Some(path) = std::env::var_os("SOFTHSM2_MODULE") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "SOFTHSM2_MODULE={} does not exist",
            path.display()
        );
        return path;
    }
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "SoftHSMv2 is not installed (looked for {}): apt-get install softhsm2, \
             or set SOFTHSM2_MODULE to libsofthsm2.so",
                MODULE_CANDIDATES.join(", ")
            )
        })
}

/// The SoftHSM configuration file named by `SOFTHSM2_CONF`, created (with its tokens directory)
/// if it does not exist yet.
pub fn ensure_conf() -> PathBuf {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        let conf = std::env::var_os("SOFTHSM2_CONF").map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "SOFTHSM2_CONF is not set: run the suite with hsm-config/test.sh, which creates a SoftHSM \
                 config in a temp dir (or: export SOFTHSM2_CONF=$(mktemp -d)/softhsm2.conf)"
            )
        });
        if !conf.exists() {
            write_conf(&conf);
        }
        conf
    })
    .clone()
}

fn write_conf(conf: &Path) {
    let dir = conf
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)
        .unwrap_or_else(|e| panic!("creating {}: {e}", tokens.display()));
    let text = format!(
        "# Written by the ekm-proxy test suite.\n\
         directories.tokendir = {}\n\
         objectstore.backend = file\n\
         log.level = ERROR\n\
         slots.removable = false\n",
        tokens.display()
    );
    // Write then rename: another test binary may be reading it.
    let tmp = dir.join(format!(".softhsm2.conf.{}", std::process::id()));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, conf).unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
}
