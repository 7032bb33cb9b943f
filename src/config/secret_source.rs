//! Where a secret comes from: inline in the file, an environment variable, or a file.
//!
//! Resolved once at load (and again on reload); the value is held as a zeroizing
//! [`SecretString`] and never appears in errors.

use std::path::Path;

use serde::Deserialize;

use crate::secret::SecretString;

/// A secret as written in the configuration.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum SecretSource {
    /// `secret = "value"` (convenient for dev; prefer env or file in production).
    Inline(String),
    /// `secret = { env = "NAME" }`
    Env {
        /// Variable name.
        env: String,
    },
    /// `secret = { file = "/run/secrets/x" }` (a trailing newline is stripped).
    File {
        /// Path, relative to the configuration file.
        file: String,
    },
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
            SecretSource::Env { env } => write!(f, "Env({env})"),
            SecretSource::File { file } => write!(f, "File({file})"),
        }
    }
}

impl SecretSource {
    /// Resolve the secret. Errors say where it was looked for, never what it is.
    pub fn resolve(&self, base: &Path) -> Result<SecretString, String> {
        match self {
            SecretSource::Inline(v) => Ok(SecretString::new(v.clone())),
            SecretSource::Env { env } => std::env::var(env)
                .map(SecretString::new)
                .map_err(|_| format!("environment variable {env} is not set (or not UTF-8)")),
            SecretSource::File { file } => {
                let path = base.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
                let text = zeroize::Zeroizing::new(text);
                Ok(SecretString::new(
                    text.trim_end_matches(['\r', '\n']).to_owned(),
                ))
            }
        }
    }
}
