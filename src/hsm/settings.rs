//! Typed settings of the PKCS#11 backend: which module, which token, how many workers.
//!
//! Plain data built by `config` (or by tests and tools). Must not depend on `cryptoki`, on the
//! configuration file format, or on anything above `hsm`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::SecretString;

/// How to find the token. Never a slot number: slot numbers move when tokens are added or removed
/// (SoftHSM renumbers on every `C_InitToken`; network HSMs renumber on partition changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token whose label (`CK_TOKEN_INFO.label`, trailing blanks ignored) equals this.
    Label(String),
    /// The token whose serial number (`CK_TOKEN_INFO.serialNumber`) equals this.
    Serial(String),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(label) => write!(f, "label \"{label}\""),
            TokenSelector::Serial(serial) => write!(f, "serial \"{serial}\""),
        }
    }
}

/// Everything `Pkcs11Backend::start` needs. `Debug` never shows the PIN.
#[derive(Debug, Clone)]
pub struct HsmSettings {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Which token to use.
    pub token: TokenSelector,
    /// The user PIN (`CKU_USER`).
    pub user_pin: SecretString,
    /// Worker OS threads, each owning one logged-in session (SoftHSM: 1–2; network HSMs: more).
    pub workers: usize,
    /// Jobs that may wait for a worker; beyond this, requests fail fast with `HsmBusy`.
    pub queue_capacity: usize,
    /// Deadline of one job, queue wait included; beyond it the caller gets `HsmTimeout`.
    pub op_timeout: Duration,
    /// Accept keys that are extractable or not sensitive. Off by default: such keys can leave the
    /// HSM, which defeats the point of an external key manager.
    pub allow_exportable_keys: bool,
    /// Maximum number of keys kept in the label → handle cache.
    pub key_cache_capacity: u64,
    /// Work on per-session copies of the token keys (`C_CopyObject` with `CKA_TOKEN=false`).
    /// The copy stays inside the HSM with the original's attributes (still sensitive and
    /// non-extractable); it only spares HSMs whose token objects are slow to reach — SoftHSMv2's
    /// file store re-reads the key file on every operation, which halves its throughput. Off by
    /// default. With it on, a key deleted from the token keeps working until the key cache entry
    /// expires (5 minutes) or the session is reopened: use `disabled_keys` or the kill switch for
    /// an immediate stop.
    pub session_key_copies: bool,
}

impl HsmSettings {
    /// Default number of workers (right for SoftHSM; raise it for network HSMs).
    pub const DEFAULT_WORKERS: usize = 2;
    /// Default queue capacity.
    pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
    /// Default per-job deadline.
    pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(2);
    /// Longest accepted per-job deadline (a request waiting longer is better failed).
    pub const MAX_OP_TIMEOUT: Duration = Duration::from_secs(300);
    /// Default key cache capacity.
    pub const DEFAULT_KEY_CACHE_CAPACITY: u64 = 10_000;

    /// Settings with the defaults above and the custody check on.
    pub fn new(module: impl Into<PathBuf>, token: TokenSelector, user_pin: SecretString) -> Self {
        Self {
            module: module.into(),
            token,
            user_pin,
            workers: Self::DEFAULT_WORKERS,
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            op_timeout: Self::DEFAULT_OP_TIMEOUT,
            allow_exportable_keys: false,
            key_cache_capacity: Self::DEFAULT_KEY_CACHE_CAPACITY,
            session_key_copies: false,
        }
    }

    /// Every problem with these settings, for the operator (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.workers == 0 {
            out.push("workers must be at least 1".to_owned());
        }
        if self.workers > 1024 {
            out.push(format!(
                "workers must be at most 1024 (got {})",
                self.workers
            ));
        }
        if self.queue_capacity == 0 {
            out.push("queue_capacity must be at least 1".to_owned());
        }
        if self.op_timeout.is_zero() {
            out.push("op_timeout must be greater than zero".to_owned());
        }
        if self.op_timeout > Self::MAX_OP_TIMEOUT {
            out.push(format!(
                "op_timeout must be at most {} s",
                Self::MAX_OP_TIMEOUT.as_secs()
            ));
        }
        if self.key_cache_capacity == 0 {
            out.push("key_cache_capacity must be at least 1".to_owned());
        }
        if self.user_pin.is_empty() {
            out.push("user_pin is empty".to_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_pin_is_redacted() {
        let s = HsmSettings::new("/x.so", TokenSelector::Label("t".into()), "1234".into());
        assert!(s.problems().is_empty());
        assert!(!s.allow_exportable_keys);
        let shown = format!("{s:?}");
        assert!(!shown.contains("1234"), "{shown}");
    }

    #[test]
    fn reports_every_problem() {
        let mut s = HsmSettings::new("/x.so", TokenSelector::Serial("1".into()), "".into());
        s.workers = 0;
        s.queue_capacity = 0;
        s.op_timeout = Duration::ZERO;
        assert_eq!(s.problems().len(), 4);
    }
}
