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

/// Who makes the AES-GCM IV on encryption, and where the HSM puts it. Decryption is the same in
/// every mode (the caller's IV is passed in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GcmIvMode {
    /// The proxy draws 12 bytes from the HSM's RNG (`C_GenerateRandom`) and passes them in
    /// (SoftHSMv2, and HSMs outside FIPS mode).
    #[default]
    ProxyRandom,
    /// The proxy passes a zero IV; the HSM generates one and writes it into the GCM parameter
    /// buffer (AWS CloudHSM, Entrust nShield).
    HsmInParams,
    /// The proxy passes a zero IV; the HSM generates one and returns it after the tag:
    /// `ciphertext ‖ tag ‖ IV` (Thales Luna in FIPS mode).
    HsmAppended,
}

impl GcmIvMode {
    /// Every mode with its configuration name.
    pub const ALL: [(GcmIvMode, &'static str); 3] = [
        (GcmIvMode::ProxyRandom, "proxy-random"),
        (GcmIvMode::HsmInParams, "hsm-in-params"),
        (GcmIvMode::HsmAppended, "hsm-appended"),
    ];

    /// The configuration name (`hsm.gcm_iv`).
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("proxy-random", |(_, name)| name)
    }

    /// The mode a configuration name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(m, _)| *m)
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
    /// Who generates the AES-GCM IV (see [`GcmIvMode`]).
    pub gcm_iv: GcmIvMode,
    /// How long a resolved key (label → handle and attributes) is trusted before it is looked up
    /// again. Bounds how long a key deleted from the token keeps working with
    /// `session_key_copies`, and how long `key_info` may report stale attributes.
    pub key_cache_ttl: Duration,
    /// How long a label the token does not hold is remembered as unknown, so a flood of made-up
    /// key ids costs one `C_FindObjects` per label per period. A key added to the token is found
    /// at most this long after its creation.
    pub negative_cache_ttl: Duration,
    /// Token- and module-level recovery: first wait after a failed attempt (doubles, with jitter,
    /// up to `recovery_backoff_max`).
    pub recovery_backoff_initial: Duration,
    /// Longest wait between two recovery attempts.
    pub recovery_backoff_max: Duration,
    /// A worker stuck in one PKCS#11 call this long is given up on and replaced by a fresh one
    /// (the stuck thread exits when the call returns). Zero disables replacement.
    pub hung_call_limit: Duration,
    /// Largest input the HSM takes in one AES-GCM call (plaintext, or ciphertext ‖ tag), when it
    /// has a limit (AWS CloudHSM: 16 KiB). Larger inputs are refused as unsupported before they
    /// reach the HSM; `config` also checks the front ends' size limits against it.
    pub max_data_bytes: Option<usize>,
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
    /// Default key cache entry lifetime.
    pub const DEFAULT_KEY_CACHE_TTL: Duration = Duration::from_secs(300);
    /// Default lifetime of an "unknown label" entry.
    pub const DEFAULT_NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(5);
    /// Default first recovery backoff.
    pub const DEFAULT_RECOVERY_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
    /// Default longest recovery backoff.
    pub const DEFAULT_RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(10);
    /// Default hung-call limit.
    pub const DEFAULT_HUNG_CALL_LIMIT: Duration = Duration::from_secs(10);

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
            gcm_iv: GcmIvMode::ProxyRandom,
            key_cache_ttl: Self::DEFAULT_KEY_CACHE_TTL,
            negative_cache_ttl: Self::DEFAULT_NEGATIVE_CACHE_TTL,
            recovery_backoff_initial: Self::DEFAULT_RECOVERY_BACKOFF_INITIAL,
            recovery_backoff_max: Self::DEFAULT_RECOVERY_BACKOFF_MAX,
            hung_call_limit: Self::DEFAULT_HUNG_CALL_LIMIT,
            max_data_bytes: None,
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
        if self.key_cache_ttl.is_zero() {
            out.push("key_cache_ttl must be greater than zero".to_owned());
        }
        if self.recovery_backoff_initial.is_zero()
            || self.recovery_backoff_max < self.recovery_backoff_initial
        {
            out.push("recovery backoff: initial must be > 0 and at most the maximum".to_owned());
        }
        if !self.hung_call_limit.is_zero() && self.hung_call_limit < self.op_timeout {
            out.push(format!(
                "hung_call_limit ({} ms) must be 0 (off) or at least op_timeout ({} ms)",
                self.hung_call_limit.as_millis(),
                self.op_timeout.as_millis()
            ));
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
