//! `ekm-proxy dev init`: idempotently create the dev SoftHSM token and keys (through the same
//! `hsm::bootstrap` code the tests use), the dev PKI and the dev JWT signer (+ JWKS) under
//! `certs/dev/`, and `hsm-config/dev.toml`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::hsm::bootstrap::{self, KeyKind, KeySpec};
use crate::secret::SecretString;

/// Token label of the dev profile.
pub const TOKEN_LABEL: &str = "ekm-dev";
/// Dev user PIN (public; dev only).
pub const USER_PIN: &str = "1234";
/// Dev SO PIN (public; dev only).
pub const SO_PIN: &str = "12345678";
/// Dev SigV4 access key id.
pub const ACCESS_KEY_ID: &str = "DEVXKSACCESSKEYIDABCD";
/// Dev SigV4 secret (public; dev only).
pub const SECRET: &str = "devXksSecretAccessKeyNotForProductionUse0123456789";
/// Dev key store path prefix.
pub const PREFIX: &str = "/dev-keystore";
/// Subject of the dev client certificate.
pub const CLIENT_SUBJECT: &str = "ekm-dev-client";
/// The dedicated health-check key.
pub const HEALTH_KEY: &str = "ekm-health-check";
/// The audit chain's checkpoint key (`CKM_SHA256_HMAC`).
pub const AUDIT_HMAC_KEY: &str = "ekm-audit-hmac";

/// Google Cloud EKM key URI path prefix: key URI `https://localhost:8443/gcp/v0/keys/<key path>`.
pub const GCP_PREFIX: &str = "/gcp/v0/keys";
/// The dev Cloud EKM key path (served by the HSM key of the same label).
pub const GCP_KEY_PATH: &str = "dev-aes-1";
/// The `iss` of dev tokens (Google's).
pub const GCP_ISSUER: &str = crate::client::gcp::GOOGLE_ISSUER;
/// Config name of the dev issuer.
pub const GCP_ISSUER_NAME: &str = "google";
/// The audience dev tokens must carry (the dev listener's URL).
pub const GCP_AUDIENCE: &str = "https://localhost:8443";
/// The service account the dev profile lets wrap and unwrap (the shape of Cloud KMS's per-project
/// service agent).
pub const GCP_SERVICE_ACCOUNT: &str = "service-123456789012@gcp-sa-ekms.iam.gserviceaccount.com";
/// Name of the dev key's grant.
pub const GCP_GRANT: &str = "cloud-kms-dev";
/// The dev JWT signer's key id.
pub const JWT_KID: &str = super::jwt::DEV_KID;
/// The dev JWT signing key, relative to the repository root.
pub const JWT_SIGNER_PATH: &str = "certs/dev/jwt-signer.pem";
/// KAJ reasons the dev profile refuses: everything else it knows is allowed.
pub const GCP_DENIED_REASONS: &[&str] = &["REASON_UNSPECIFIED", "THIRD_PARTY_DATA_REQUEST"];

/// The dev keys: label, encrypt, decrypt.
pub const DEV_KEYS: &[(&str, bool, bool)] = &[
    ("dev-aes-1", true, true),
    ("dev-aes-encrypt-only", true, false),
    ("dev-aes-decrypt-only", false, true),
    ("dev-aes-no-usage", false, false),
    (HEALTH_KEY, true, true),
];

/// Key specs of the dev keys (sensitive, non-extractable AES-256).
pub fn dev_key_specs() -> Vec<KeySpec> {
    DEV_KEYS
        .iter()
        .map(|(label, encrypt, decrypt)| KeySpec {
            label: (*label).to_owned(),
            kind: KeyKind::Aes256,
            encrypt: *encrypt,
            decrypt: *decrypt,
            wrap: false,
            unwrap: false,
            extractable: false,
            sensitive: true,
        })
        .collect()
}

/// The Azure Managed HSM path prefix of the dev profile (served on the mTLS listener).
pub const AZURE_PREFIX: &str = "/azure";
/// The dev AES key-encryption key for Azure (`A256KW`, `A256KWP`): wrap and unwrap only.
pub const AZURE_AES_KEY: &str = "dev-aes-kek-1";
/// The dev RSA key for Azure (`RSA-OAEP`, and `RSA-OAEP-256` where the HSM has it).
pub const AZURE_RSA_KEY: &str = "dev-rsa-1";

/// Key specs of the keys the dev profile adds for Azure: an AES-256 key-encryption key and an
/// RSA-3072 pair. Not part of [`dev_key_specs`] (the tests' standard token), which they would
/// slow down (RSA generation) for nothing.
pub fn azure_dev_key_specs() -> Vec<KeySpec> {
    let mut kek = KeySpec::new(AZURE_AES_KEY, KeyKind::Aes256);
    (kek.encrypt, kek.decrypt, kek.wrap, kek.unwrap) = (false, false, true, true);
    vec![kek, KeySpec::new(AZURE_RSA_KEY, KeyKind::Rsa3072)]
}

/// Where SoftHSMv2's module usually lives on Debian/Ubuntu and source builds.
pub const SOFTHSM_MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The installed SoftHSMv2 module, if any.
pub fn find_softhsm() -> Option<PathBuf> {
    SOFTHSM_MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// What `init` did.
#[derive(Debug)]
pub struct DevReport {
    lines: Vec<String>,
}

impl fmt::Display for DevReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// No PKCS#11 module.
    #[error("SoftHSMv2 is not installed (looked in {0}); run: apt-get install -y softhsm2")]
    NoModule(String),
    /// Token or key creation failed.
    #[error("{0}")]
    Hsm(#[from] crate::hsm::HsmError),
    /// Certificate generation failed.
    #[error("{0}")]
    Certs(#[from] super::certs::CertError),
    /// The dev JWT signer could not be created.
    #[error("{0}")]
    Signer(#[from] super::jwt::SignerError),
    /// Writing the config failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
}

/// Create everything the dev profile needs under `root`.
pub fn init(root: &Path, module: Option<PathBuf>) -> Result<DevReport, DevError> {
    let module = match module.or_else(find_softhsm) {
        Some(m) => m,
        None => return Err(DevError::NoModule(SOFTHSM_MODULE_PATHS.join(", "))),
    };
    let mut lines = Vec::new();
    let certs_dir = root.join("certs/dev");
    let pki = super::certs::ensure_dev_pki(&certs_dir, &["localhost", "127.0.0.1"])?;
    lines.push(format!("certificates: {pki}"));
    let signer = super::jwt::ensure_dev_signer(&certs_dir)?;
    lines.push(format!("JWT signer: {signer}"));
    let so = SecretString::from(SO_PIN);
    let user = SecretString::from(USER_PIN);
    let token = bootstrap::ensure_token(&module, TOKEN_LABEL, &so, &user)?;
    lines.push(token.to_string());
    let audit_key = KeySpec::new(AUDIT_HMAC_KEY, KeyKind::HmacSha256);
    for spec in dev_key_specs()
        .into_iter()
        .chain(azure_dev_key_specs())
        .chain([audit_key])
    {
        let key = bootstrap::ensure_key(&module, TOKEN_LABEL, &user, &spec)?;
        lines.push(key.to_string());
    }
    let config_path = root.join("hsm-config/dev.toml");
    let text = dev_config(&module);
    std::fs::write(&config_path, text).map_err(|source| DevError::Write {
        path: config_path.clone(),
        source,
    })?;
    lines.push(format!("config: {}", config_path.display()));
    lines.push(format!(
        "Cloud EKM: https://localhost:8443{GCP_PREFIX}/{GCP_KEY_PATH}:wrap; token: ekm-proxy dev token"
    ));
    lines.push(format!(
        "Azure: https://localhost:9443{AZURE_PREFIX}/{AZURE_RSA_KEY}/wrapkey?api-version=0.1-preview with certs/dev/client.pem"
    ));
    Ok(DevReport { lines })
}

/// The dev configuration (paths relative to `hsm-config/`).
pub fn dev_config(module: &Path) -> String {
    let keys = DEV_KEYS
        .iter()
        .filter(|(l, _, _)| *l != HEALTH_KEY)
        .map(|(l, _, _)| format!("\"{l}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let reasons = crate::client::gcp::ACCESS_REASONS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !GCP_DENIED_REASONS.contains(name))
        .map(|name| format!("  \"{name}\",\n"))
        .collect::<String>();
    format!(
        r#"# Generated by `ekm-proxy dev init`. DEV ONLY: the PIN, SigV4 secret and certificates below
# are published in the README; never use them for real keys.

# `ekm-proxy bench --idle-connections N` holds N keep-alive connections from this one address for
# the whole run; production limits (config.example.toml) would cap and close them.
[server]
max_connections_per_ip = 0
idle_timeout_secs = 3600

[[listener]]
name = "tls"
address = "127.0.0.1:8443"
[listener.tls]
certificate = "../certs/dev/server.pem"
private_key = "../certs/dev/server-key.pem"

[[listener]]
name = "mtls"
address = "127.0.0.1:9443"
[listener.tls]
certificate = "../certs/dev/server.pem"
private_key = "../certs/dev/server-key.pem"
[listener.tls.client_auth]
ca_bundle = "../certs/dev/ca.pem"
allowed_subjects = ["{CLIENT_SUBJECT}"]

[admin]
address = "127.0.0.1:9090"

[hsm]
module = "{module}"
token_label = "{TOKEN_LABEL}"
user_pin = "{USER_PIN}"
workers = 2
# SoftHSMv2's file store re-reads a token key on every operation; per-session copies (still inside
# the HSM, still sensitive and non-extractable) double its throughput.
session_key_copies = true

[health]
key = "{HEALTH_KEY}"

[security]
# Create this file to refuse every key operation at once; delete it to resume. Fleet-wide, and
# recorded with who did it: `ekm-proxy killswitch engage --config hsm-config/dev.toml`.
kill_switch_file = "KILL-SWITCH"

# The tamper-evident audit trail: hash-chained lines, checkpoints MACed in the HSM with
# {AUDIT_HMAC_KEY}. Check it with `ekm-proxy audit verify --config hsm-config/dev.toml`.
[logging]
audit_file = "dev-audit.jsonl"
audit_hmac_key = "{AUDIT_HMAC_KEY}"
audit_required = true

[[xks.key_store]]
name = "dev"
path_prefix = "{PREFIX}"
regions = ["us-east-1"]
keys = [{keys}]
[[xks.key_store.credential]]
access_key_id = "{ACCESS_KEY_ID}"
secret = "{SECRET}"

# Google Cloud EKM: POST https://localhost:8443{GCP_PREFIX}/<key path>:wrap | :unwrap with
# `Authorization: Bearer <JWT>`; `ekm-proxy dev token` mints a dev token.
[gcp]
path_prefix = "{GCP_PREFIX}"

[[gcp.issuer]]
name = "{GCP_ISSUER_NAME}"
issuers = ["{GCP_ISSUER}", "accounts.google.com"]
# DEV ONLY: the public half of certs/dev/jwt-signer.pem (kid {JWT_KID}), so dev tokens verify
# without Google. Production trusts Google's keys instead:
#   jwks_url = "https://www.googleapis.com/oauth2/v3/certs"
jwks_file = "../certs/dev/jwks.json"
audiences = ["{GCP_AUDIENCE}"]
service_accounts = ["{GCP_SERVICE_ACCOUNT}"]

# Key Access Justifications: every reason this build knows except THIRD_PARTY_DATA_REQUEST.
[gcp.access_reasons]
allow = [
{reasons}]
# DEV ONLY: a request without accessReasonContext (KAJ not enrolled) is allowed, so a bare curl
# works. In production decide this deliberately: with KAJ enrolled, Google always sends a reason,
# and `false` refuses any caller that leaves it out.
allow_absent = true
allow_unspecified = false
allow_unknown = false
allow_health_checks = true

[[gcp.key]]
path = "{GCP_KEY_PATH}"
[[gcp.key.grant]]
name = "{GCP_GRANT}"
service_accounts = ["{GCP_SERVICE_ACCOUNT}"]

# Azure Managed HSM external keys (EKM Proxy API 0.1-preview), mutual TLS only: on the mtls
# listener, POST https://localhost:9443{AZURE_PREFIX}/info | /<key>/metadata | /<key>/wrapkey |
# /<key>/unwrapkey ?api-version=0.1-preview with certs/dev/client.pem. Every key of the token but
# the health-check key; {AZURE_AES_KEY} (A256KW/A256KWP) and {AZURE_RSA_KEY} (RSA-OAEP) are made for it.
[azure]
ekm_vendor = "SoftHSM"
ekm_product = "SoftHSMv2"

[[azure.prefix]]
name = "dev-pool"
path_prefix = "{AZURE_PREFIX}"
ca_bundle = "../certs/dev/ca.pem"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["*"]
"#,
        module = module.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_config_has_the_gcp_section() {
        let text = dev_config(Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        let v: toml::Value = toml::from_str(&text).unwrap();
        let gcp = &v["gcp"];
        assert_eq!(gcp["path_prefix"].as_str(), Some(GCP_PREFIX));
        let issuer = &gcp["issuer"][0];
        assert_eq!(issuer["name"].as_str(), Some(GCP_ISSUER_NAME));
        assert_eq!(issuer["issuers"][0].as_str(), Some(GCP_ISSUER));
        assert_eq!(issuer["jwks_file"].as_str(), Some("../certs/dev/jwks.json"));
        assert_eq!(issuer["audiences"][0].as_str(), Some(GCP_AUDIENCE));
        assert_eq!(
            issuer["service_accounts"][0].as_str(),
            Some(GCP_SERVICE_ACCOUNT)
        );
        let reasons = &gcp["access_reasons"];
        let allow: Vec<&str> = reasons["allow"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r.as_str())
            .collect();
        assert_eq!(allow.len(), crate::client::gcp::ACCESS_REASONS.len() - 2);
        assert!(allow.contains(&"CUSTOMER_INITIATED_ACCESS"));
        assert!(!allow.contains(&"THIRD_PARTY_DATA_REQUEST"));
        assert!(!allow.contains(&"REASON_UNSPECIFIED"));
        assert_eq!(reasons["allow_absent"].as_bool(), Some(true));
        assert_eq!(reasons["allow_unspecified"].as_bool(), Some(false));
        assert_eq!(reasons["allow_unknown"].as_bool(), Some(false));
        assert_eq!(reasons["allow_health_checks"].as_bool(), Some(true));
        let key = &gcp["key"][0];
        assert_eq!(key["path"].as_str(), Some(GCP_KEY_PATH));
        assert_eq!(key["grant"][0]["name"].as_str(), Some(GCP_GRANT));
        assert_eq!(
            key["grant"][0]["service_accounts"][0].as_str(),
            Some(GCP_SERVICE_ACCOUNT)
        );
    }

    /// The generated file goes through the real config parser, with the files it names.
    #[test]
    fn dev_config_loads() {
        let root = tempfile::tempdir().unwrap();
        let certs_dir = root.path().join("certs/dev");
        super::super::certs::ensure_dev_pki(&certs_dir, &["localhost", "127.0.0.1"]).unwrap();
        super::super::jwt::ensure_dev_signer(&certs_dir).unwrap();
        std::fs::create_dir_all(root.path().join("hsm-config")).unwrap();
        let path = root.path().join("hsm-config/dev.toml");
        // Any existing file stands in for the module: loading the config does not open it.
        let module = root.path().join("libsofthsm2.so");
        std::fs::write(&module, b"").unwrap();
        std::fs::write(&path, dev_config(&module)).unwrap();
        let settings = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(settings.gcp.is_some());
        let azure = settings.azure.expect("the dev profile serves Azure");
        assert_eq!(azure.prefixes[0].prefix, AZURE_PREFIX);
        assert!(azure.prefixes[0].keys.allows(AZURE_RSA_KEY));
        assert!(!azure.prefixes[0].keys.allows(HEALTH_KEY));
    }
}
