//! Configuration: one TOML file parsed into raw serde structs ([`raw`]), then validated into
//! [`Settings`] ([`validate`]), reporting every problem at once with its key path.
//!
//! Produces the typed settings each module consumes (`hsm::HsmSettings`, `server::*Settings`,
//! `front::xks::XksSettings`, ...); nothing else in the crate reads the file or the environment
//! for configuration.

pub mod azure;
pub mod gcp;
pub mod raw;
pub mod secret_source;
pub mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::core::KeyServiceSettings;
use crate::front::azure::AzureSettings;
use crate::front::gcp::GcpSettings;
use crate::front::xks::XksSettings;
use crate::hsm::HsmSettings;
use crate::server::{AdminSettings, ListenerSettings, ServerSettings};

/// Exit code for configuration errors (`EX_CONFIG` is 78; the brief asks for 64, `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where it was read from (reloads read it again).
    pub source: PathBuf,
    /// Connection and request handling.
    pub server: ServerSettings,
    /// API listeners.
    pub listeners: Vec<ListenerSettings>,
    /// Admin listener.
    pub admin: Option<AdminSettings>,
    /// The HSM.
    pub hsm: HsmSettings,
    /// Health checks, kill switch, disabled keys.
    pub core: CoreSettings,
    /// The XKS front end.
    pub xks: XksSettings,
    /// The Google Cloud EKM front end, when configured.
    pub gcp: Option<GcpSettings>,
    /// `[azure]`, when present.
    pub azure: Option<AzureSettings>,
    /// Logs and audit.
    pub logging: LoggingSettings,
}

/// Settings of the core services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreSettings {
    /// Run-time key settings (disabled keys).
    pub keys: KeyServiceSettings,
    /// The dedicated health-check key.
    pub health_key: String,
    /// How often the background deep check runs.
    pub health_interval: Duration,
    /// Oldest health report served from cache.
    pub health_max_age: Duration,
    /// When this file exists every key operation is refused.
    pub kill_switch_file: Option<PathBuf>,
    /// How often the fleet state (disabled keys and key stores, kill switch) is read from the HSM.
    pub state_poll: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingSettings {
    /// Format of the operational log (stderr).
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `info,ekm_audit=off`.
    pub level: String,
    /// Write audit events as a tamper-evident chain to this file instead of the operational log.
    pub audit_file: Option<PathBuf>,
    /// Key operations fail (closed) when their audit line cannot be written.
    pub audit_required: bool,
    /// Label of the HSM key (`CKM_SHA256_HMAC`) that MACs the chain's checkpoints.
    pub audit_hmac_key: String,
    /// Interval between checkpoints (at most one second).
    pub audit_checkpoint: Duration,
    /// Rotate the audit file once it is this large (0: never).
    pub audit_max_bytes: u64,
}

/// One configuration problem, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `xks.key_store[0].credential[1].access_key_id`
    pub path: String,
    /// What is wrong (never a secret value).
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: {} problem(s):",
            self.file.display(),
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Read, parse and validate `path`.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let fail = |path_in_file: &str, message: String| ConfigError {
        file: path.to_owned(),
        problems: vec![Problem {
            path: path_in_file.to_owned(),
            message,
        }],
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| fail("(file)", format!("cannot read: {e}")))?;
    let base = path.parent().map(Path::to_owned).unwrap_or_default();
    from_str(&text, path, &base)
}

/// Read, parse and validate `path` for commands that use neither the HSM nor the SigV4 secrets
/// (`policy explain`): the HSM PIN and SigV4 secrets taken from an environment variable or a file
/// need not be resolvable, because such commands often run where only the server can read them.
/// Everything else is validated as [`load`] does, so a file this accepts is one the server
/// accepts once its secrets resolve. Inline secrets stay as written (and are checked).
pub fn load_without_secrets(path: &Path) -> Result<Settings, ConfigError> {
    use secret_source::SecretSource;
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        problems: vec![Problem {
            path: "(file)".into(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    let base = path.parent().map(Path::to_owned).unwrap_or_default();
    let mut raw = parse(&text, path)?;
    let external =
        |s: &SecretSource| matches!(s, SecretSource::Env { .. } | SecretSource::File { .. });
    if let Some(hsm) = raw.hsm.as_mut()
        && hsm.user_pin.as_ref().is_some_and(external)
    {
        hsm.user_pin = Some(SecretSource::Inline(UNUSED_SECRET.into()));
    }
    for credential in raw
        .xks
        .key_store
        .iter_mut()
        .flat_map(|ks| ks.credential.iter_mut())
        .filter(|c| external(&c.secret))
    {
        credential.secret = SecretSource::Inline(UNUSED_SECRET.into());
    }
    validate::validate(raw, path, &base)
}

/// Stands in for secrets a command never uses; shaped like a valid SigV4 secret (43 characters of
/// the base64 alphabet) so validation treats it as any other.
const UNUSED_SECRET: &str = "unusedByThisCommandNeverSentNorVerified0000";

/// Parse and validate configuration text; relative paths are resolved against `base`.
pub fn from_str(text: &str, source: &Path, base: &Path) -> Result<Settings, ConfigError> {
    validate::validate(parse(text, source)?, source, base)
}

fn parse(text: &str, source: &Path) -> Result<raw::RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError {
        file: source.to_owned(),
        problems: vec![Problem {
            path: "(syntax)".into(),
            message: e.to_string().replace('\n', " ").trim().to_owned(),
        }],
    })
}
