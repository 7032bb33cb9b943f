//! TLS for the proxy's listeners: turns [`TlsSettings`] (PEM files on disk) into a rustls
//! [`ServerConfig`], optionally with a client-certificate (mTLS) verifier, and reports what the
//! handshake learned about the client as a [`PeerIdentity`].
//!
//! What the cloud KMS clients need from us (XKS spec §7.2–7.3, checklist item 10):
//! - TLS 1.2 and 1.3 with rustls' safe default suites (they include every XKS-listed suite), ALPN
//!   `h2` + `http/1.1`, and cheap reconnects (session cache + tickets);
//! - optional mTLS that accepts only clients chaining to a configured CA and, if configured, with
//!   one of a list of subject names; every rejection of a presented certificate aborts the
//!   handshake with a fatal `handshake_failure` alert (see `tls/client_auth.rs` for the one
//!   case rustls does not let us change: no certificate at all → `certificate_required`).
//!
//! This module sits at the very edge of the request path: it must not depend on `front`, `core`,
//! `hsm` or `auth` (auth consumes a [`PeerIdentity`]; it does not shape the handshake). Errors
//! name the file and what is wrong with it and never contain key material.

mod client_auth;
mod identity;
mod load;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};

pub use client_auth::{RejectHook, RejectReason, missing_client_certificate};
pub use identity::{PeerIdentity, peer_identity};

/// The certificates of a PEM CA bundle as a trust store (at least one, each parseable), for
/// checks a front makes beyond the listener's (e.g. a per-prefix CA).
pub fn load_ca_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, TlsError> {
    load::ca_bundle(path)
}

/// `notAfter` of the leaf (first) certificate of a PEM chain file, as Unix time, for the expiry
/// metric; `None` when the file cannot be read or parsed (the listener's own load reports why).
pub fn leaf_not_after(cert_chain: &std::path::Path) -> Option<i64> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bytes = std::fs::read(cert_chain).ok()?;
    let leaf = CertificateDer::pem_slice_iter(&bytes).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// How many TLS 1.2 session-ID resumption entries the server remembers. Each entry is a few
/// hundred bytes; a few thousand covers many more concurrent KMS connections than we expect,
/// and the cache evicts the oldest entries when full (it is never a reason to fail).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Where the listener's certificate and key live, and whether clients must present certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file: the server certificate first, then any intermediates (the root may be included).
    pub cert_chain: PathBuf,
    /// PEM file with exactly one unencrypted private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// Client-certificate policy.
    pub client_auth: ClientAuth,
}

/// Client-certificate (mTLS) policy of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate is requested.
    None,
    /// Every client must present a certificate chaining to `ca_bundle` (and, if the list is
    /// non-empty, naming one of `allowed_subjects`), or the handshake is aborted.
    Required {
        /// PEM file with the trusted root (or intermediate) CA certificates; at least one.
        ca_bundle: PathBuf,
        /// Names matched exactly (ASCII case-insensitively, as hostnames are; no wildcards)
        /// against the leaf's subject CN and every DNS SAN. Empty = any certificate chaining to
        /// the CA bundle is accepted.
        allowed_subjects: Vec<String>,
    },
}

/// Why the TLS configuration could not be built. Written for the operator: each variant says
/// which file and what is wrong with it. Never contains key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A configured file could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    Read {
        /// Which file this is ("certificate chain", "private key", "CA bundle").
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("{what} file {} is not valid PEM: {detail}", path.display())]
    Pem {
        /// Which file this is.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// What is malformed (never the file's content).
        detail: &'static str,
    },
    /// A certificate file holds no `CERTIFICATE` block.
    #[error("{what} file {} contains no PEM CERTIFICATE block", path.display())]
    NoCertificate {
        /// Which file this is.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
    },
    /// A certificate in a file cannot be used (malformed DER, not a usable trust anchor, ...).
    #[error("certificate #{index} in {what} file {} is not usable: {detail}", path.display())]
    BadCertificate {
        /// Which file this is.
        what: &'static str,
        /// The configured path.
        path: PathBuf,
        /// 1-based position of the certificate in the file.
        index: usize,
        /// Why it is not usable.
        detail: String,
    },
    /// The key file holds no (unencrypted) private key.
    #[error(
        "private key file {} contains no private key (expected one unencrypted PEM block: \
         'PRIVATE KEY' (PKCS#8), 'RSA PRIVATE KEY' (PKCS#1) or 'EC PRIVATE KEY' (SEC1))",
        path.display()
    )]
    NoPrivateKey {
        /// The configured path.
        path: PathBuf,
    },
    /// The key file holds an encrypted PKCS#8 key, which would need a passphrase.
    #[error(
        "private key file {} holds an ENCRYPTED PRIVATE KEY; decrypt it first \
         (e.g. `openssl pkcs8 -in key.pem -out key-plain.pem`) and protect the file by permissions",
        path.display()
    )]
    EncryptedPrivateKey {
        /// The configured path.
        path: PathBuf,
    },
    /// The key file holds more than one private key, so which one is meant is ambiguous.
    #[error(
        "private key file {} contains {count} private keys; expected exactly one",
        path.display()
    )]
    MultiplePrivateKeys {
        /// The configured path.
        path: PathBuf,
        /// How many keys were found.
        count: usize,
    },
    /// The private key's type or parameters are not supported by the crypto provider.
    #[error("private key in {} is not usable: {detail}", path.display())]
    UnsupportedPrivateKey {
        /// The configured path.
        path: PathBuf,
        /// What the provider said (it never echoes key bytes).
        detail: String,
    },
    /// The private key is not the key of the first certificate in the chain file.
    #[error(
        "private key {} does not match the certificate {} (the first certificate in the chain \
         file must be the server's own, issued for this key)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The private key file.
        key: PathBuf,
        /// The certificate chain file.
        cert: PathBuf,
    },
    /// The CA bundle holds no certificates at all.
    #[error(
        "CA bundle {} contains no certificates; mTLS needs at least one trusted CA",
        path.display()
    )]
    CaBundleEmpty {
        /// The configured path.
        path: PathBuf,
    },
    /// An entry of `allowed_subjects` is empty, which would never match and is surely a mistake.
    #[error("client_auth.allowed_subjects contains an empty name")]
    EmptyAllowedSubject,
    /// rustls refused the assembled configuration (should not happen with valid files).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[source] rustls::Error),
}

/// Builds the server TLS configuration for a listener.
///
/// TLS 1.3 and 1.2 with the ring provider and all of rustls' default cipher suites (which include
/// the XKS-required `TLS_AES_256_GCM_SHA384`, `TLS_CHACHA20_POLY1305_SHA256` and
/// `TLS_ECDHE_{RSA,ECDSA}_WITH_AES_256_GCM_SHA384`), the server's suite order preferred, ALPN
/// `alpn` (pass `[b"h2", b"http/1.1"]`), a session cache and a ticketer. `on_reject` is called
/// once for each presented client certificate that is rejected (to count
/// `ekm_tls_handshake_failures_total`); a missing certificate is caught by rustls before our
/// verifier runs, so the accept loop reports that one (see [`missing_client_certificate`]).
///
/// Building a new config (e.g. on SIGHUP) also creates a new ticket key and session cache, so
/// sessions established under the old client-auth policy cannot be resumed under the new one.
pub fn server_config(
    settings: &TlsSettings,
    alpn: &[&[u8]],
    on_reject: Option<RejectHook>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified_key = load_certified_key(settings, &provider)?;
    identity::warn_if_expiring(&certified_key, &settings.cert_chain);

    let verifier: Arc<dyn ClientCertVerifier> = match &settings.client_auth {
        ClientAuth::None => WebPkiClientVerifier::no_client_auth(),
        ClientAuth::Required {
            ca_bundle,
            allowed_subjects,
        } => client_auth::verifier(ca_bundle, allowed_subjects, on_reject, &provider)?,
    };

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified_key)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // rustls lists AES-256-GCM first; preferring our order means a client that offers any
    // XKS-listed suite gets one even if it prefers AES-128 itself.
    config.ignore_client_order = true;
    // Resumption keeps reconnects inside KMS's 250 ms budget: a session cache for TLS 1.2
    // session IDs and stateless tickets for both versions (ticket keys rotate every few hours).
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Rustls)?;
    // 0-RTT stays off (max_early_data_size = 0 by default): early data is replayable, and every
    // proxy request is a key operation.
    Ok(Arc::new(config))
}

/// Loads the chain and key and checks that they belong together, so a wrong pairing is reported
/// at startup with both file names rather than as failing handshakes later.
fn load_certified_key(
    settings: &TlsSettings,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load::certificates("certificate chain", &settings.cert_chain)?;
    let key = load::private_key(&settings.private_key)?;
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
        TlsError::UnsupportedPrivateKey {
            path: settings.private_key.clone(),
            detail: e.to_string(),
        }
    })?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    match certified_key.keys_match() {
        Ok(()) => Ok(certified_key),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                key: settings.private_key.clone(),
                cert: settings.cert_chain.clone(),
            })
        }
        // The provider cannot derive the public key for some key types; rustls itself accepts
        // such pairs, and the handshake would expose a mismatch, so we do the same.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified_key)
        }
        Err(e) => Err(TlsError::BadCertificate {
            what: "certificate chain",
            path: settings.cert_chain.clone(),
            index: 1,
            detail: e.to_string(),
        }),
    }
}
