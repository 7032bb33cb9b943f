//! `ekm-proxy connect-info`: what each cloud's console asks for to connect to this proxy (AWS
//! `XksProxyUriEndpoint`/`XksProxyUriPath` and the importable proxy configuration file, the
//! Alibaba Cloud external proxy path and server certificate fingerprint, Google Cloud EKM key
//! URIs, Azure Managed HSM URIs, CA and client subjects), derived from a validated configuration
//! and the listeners' certificate files.
//!
//! It only reads: the validated [`Settings`], the raw TOML (for the Azure prefixes' allowed
//! subjects, which the validated `CertificateAuth` keeps private) and the certificate PEM files.
//! It depends on `config` and the `server::tls` certificate helpers only; it must never depend
//! on `hsm` (describing how to connect must work without the token, e.g. on an operator's
//! laptop) nor start a listener. The SigV4 secret appears only when the caller asks for it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::raw::RawConfig;
use crate::config::{EXIT_CONFIG, Settings};
use crate::server::ListenerSettings;
use crate::server::tls::{ClientAuth, PeerIdentity};

/// What the XKS proxy configuration file shows instead of the secret without `--with-secret`.
pub const SECRET_PLACEHOLDER: &str = "<run with --with-secret>";

/// The XKS API's fixed path after a key store's prefix.
const XKS_API_PATH: &str = "/kms/xks/v1";

/// Options of the command.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only the XKS key store, Cloud EKM key path or Azure prefix with this name.
    pub name: Option<String>,
    /// Put the SigV4 secret in the XKS proxy configuration file.
    pub with_secret: bool,
}

/// Why the information cannot be produced.
#[derive(Debug, thiserror::Error)]
pub enum ConnectInfoError {
    /// The configuration is unusable, or `--name` names nothing (exit 64).
    #[error("{0}")]
    Config(String),
    /// A listener's certificate file cannot be read or parsed (exit 1).
    #[error("{0}")]
    Certificate(String),
}

impl ConnectInfoError {
    /// The process exit code: 64 for configuration errors, 1 for certificate files.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => EXIT_CONFIG,
            Self::Certificate(_) => 1,
        }
    }
}

/// What the listener's server certificate chain file says.
struct ServerCert {
    /// DNS SANs, else the subject CN: the host names clients can use.
    hosts: Vec<String>,
    /// Lowercase hex SHA-256 of the leaf DER.
    fingerprint: String,
    /// The leaf's issuer DN.
    issuer: String,
    /// The leaf is self-signed (issuer DN = subject DN).
    self_signed: bool,
    /// 1-based position of the issuer's certificate in the chain file, if it is there.
    issuer_index: Option<usize>,
}

/// One TLS listener and its certificate.
struct Endpoint<'a> {
    listener: &'a ListenerSettings,
    cert: ServerCert,
    /// `Some((ca_bundle, allowed_subjects))` on an mTLS listener.
    client_ca: Option<(&'a Path, &'a [String])>,
}

impl Endpoint<'_> {
    /// `https://host[:port]` for each host name of the certificate.
    fn bases(&self) -> Vec<String> {
        let port = self.listener.addr.port();
        let hosts = if self.cert.hosts.is_empty() {
            // No name in the certificate: the bind address is the only hint (and no cloud will
            // accept an IP-only certificate for a hostname, which the operator should notice).
            vec![self.listener.addr.ip().to_string()]
        } else {
            self.cert.hosts.clone()
        };
        hosts
            .into_iter()
            .map(|h| {
                if port == 443 {
                    format!("https://{h}")
                } else {
                    format!("https://{h}:{port}")
                }
            })
            .collect()
    }

    fn kind(&self) -> &'static str {
        if self.client_ca.is_some() {
            "mTLS"
        } else {
            "TLS"
        }
    }
}

/// Produces the text for `settings` (loaded from `settings.source`).
pub fn render(settings: &Settings, options: &Options) -> Result<String, ConnectInfoError> {
    check_name(settings, options)?;
    let azure_raw = azure_raw_prefixes(settings)?;
    let endpoints = endpoints(settings)?;
    let wanted = |n: &str| options.name.as_deref().is_none_or(|w| w == n);
    let mut out = String::new();
    // `say!()` ends a line; `say!(fmt, ..)` writes one.
    macro_rules! say {
        () => {
            out.push('\n')
        };
        ($($arg:tt)*) => {{
            out.push_str(&format!($($arg)*));
            out.push('\n');
        }};
    }
    say!("# connect-info for {}", settings.source.display());
    say!(
        "# Host names come from each listener's server certificate (the bind address cannot say \
         how clients reach it): use the one that resolves to this proxy."
    );
    let plain: Vec<&str> = settings
        .listeners
        .iter()
        .filter(|l| l.tls.is_none())
        .map(|l| l.name.as_str())
        .collect();
    if !plain.is_empty() {
        say!(
            "# Not listed: plain-HTTP listener(s) {} (every cloud requires HTTPS).",
            plain.join(", ")
        );
    }
    if endpoints.is_empty() {
        say!("# No TLS listener: no cloud can connect.");
    }

    for ks in settings.xks.key_stores.iter().filter(|k| wanted(&k.name)) {
        let path = format!("{}{XKS_API_PATH}", ks.prefix);
        let disabled = if ks.enabled { "" } else { " (disabled)" };
        say!();
        say!(
            "== AWS KMS external key store: key store \"{}\"{disabled} ==",
            ks.name
        );
        say!("XksProxyUriEndpoint (one of):");
        for e in &endpoints {
            for base in e.bases() {
                say!(
                    "  {base}    (listener \"{}\", {})",
                    e.listener.name,
                    e.kind()
                );
            }
        }
        say!("XksProxyUriPath: {path}");
        if let Some(first) = ks.credentials.first() {
            let secret = if options.with_secret {
                first.secret.expose()
            } else {
                SECRET_PLACEHOLDER
            };
            let file = serde_json::json!({
                "XksProxyUriPath": path,
                "XksProxyAuthenticationCredential": {
                    "AccessKeyId": first.access_key_id,
                    "RawSecretAccessKey": secret,
                }
            });
            say!("XKS proxy configuration file (console: import proxy configuration file):");
            say!(
                "{}",
                serde_json::to_string_pretty(&file)
                    .unwrap_or_else(|e| format!("<cannot render JSON: {e}>"))
            );
            // During a rotation every credential is accepted; the console holds only one.
            for other in ks.credentials.iter().skip(1) {
                say!(
                    "Also accepted (rotation): AccessKeyId {}",
                    other.access_key_id
                );
            }
        }
        say!();
        say!(
            "== Alibaba Cloud KMS external key store (XKI): key store \"{}\"{disabled} ==",
            ks.name
        );
        say!("External proxy path: {path}");
        for c in &ks.credentials {
            say!("AccessKey ID: {}", c.access_key_id);
        }
        say!("Server certificate fingerprint (SHA-256):");
        for e in &endpoints {
            say!(
                "  {}    (listener \"{}\", {})",
                e.cert.fingerprint,
                e.listener.name,
                e.kind()
            );
        }
    }

    if let Some(gcp) = &settings.gcp {
        // Cloud EKM over the internet presents no client certificate, so only TLS listeners
        // without client authentication can serve it.
        let tls: Vec<&Endpoint<'_>> = endpoints.iter().filter(|e| e.client_ca.is_none()).collect();
        for key in gcp.keys.iter().filter(|k| wanted(&k.path)) {
            let disabled = if key.enabled { "" } else { " (disabled)" };
            say!();
            say!("== Google Cloud EKM: key \"{}\"{disabled} ==", key.path);
            say!("Key URI (one of):");
            for e in &tls {
                for base in e.bases() {
                    say!(
                        "  {base}{}/{}    (listener \"{}\")",
                        gcp.prefix,
                        key.path,
                        e.listener.name
                    );
                }
            }
            if tls.is_empty() {
                say!("  none: no TLS listener without client certificates");
            }
            say!("Service accounts granted:");
            for grant in &key.access.grants {
                let who: Vec<&str> = grant.principals.iter().map(|p| p.as_str()).collect();
                let ops: Vec<&str> = grant.operations.iter().map(|o| o.as_str()).collect();
                say!(
                    "  {} ({}; grant \"{}\")",
                    who.join(", "),
                    ops.join(", "),
                    grant.name
                );
            }
        }
    }

    if let Some(azure) = &settings.azure {
        // The Azure front authenticates by client certificate only: mTLS listeners.
        let mtls: Vec<&Endpoint<'_>> = endpoints.iter().filter(|e| e.client_ca.is_some()).collect();
        for p in azure.prefixes.iter().filter(|p| wanted(&p.name)) {
            let raw = azure_raw.iter().find(|r| r.name == p.name);
            let disabled = if p.enabled { "" } else { " (disabled)" };
            say!();
            say!("== Azure Managed HSM: prefix \"{}\"{disabled} ==", p.name);
            say!("URI (one of):");
            for e in &mtls {
                for base in e.bases() {
                    say!("  {base}{}    (listener \"{}\")", p.prefix, e.listener.name);
                }
            }
            if mtls.is_empty() {
                say!("  none: no mTLS listener");
            }
            for e in &mtls {
                let Some(tls) = &e.listener.tls else { continue };
                say!(
                    "Server certificate of listener \"{}\": chain {}",
                    e.listener.name,
                    tls.cert_chain.display()
                );
                say!("  issued by: {}", e.cert.issuer);
                match (e.cert.self_signed, e.cert.issuer_index) {
                    (true, _) => say!(
                        "  CA to upload: the certificate itself (self-signed, #1 in the chain file)"
                    ),
                    (false, Some(i)) => {
                        say!("  CA to upload: the issuer's certificate is #{i} in the chain file")
                    }
                    (false, None) => say!(
                        "  CA to upload: the issuer's certificate is not in the chain file; \
                         upload the CA named above"
                    ),
                }
                if let Some((ca, subjects)) = e.client_ca {
                    say!("  client certificates must chain to: {}", ca.display());
                    if !subjects.is_empty() {
                        say!(
                            "  and the listener admits only subjects: {}",
                            subjects.join(", ")
                        );
                    }
                }
            }
            if let Some(raw) = raw {
                if let Some(ca) = &raw.ca_bundle {
                    say!(
                        "Client certificates must also chain to (this prefix): {}",
                        resolve(settings, ca).display()
                    );
                }
                say!(
                    "Client certificate subjects allowed: {}",
                    raw.allowed_subjects.join(", ")
                );
            }
        }
    }
    Ok(out)
}

/// `--name` must name something, or the operator gets the list of names (exit 64).
fn check_name(settings: &Settings, options: &Options) -> Result<(), ConnectInfoError> {
    let Some(name) = &options.name else {
        return Ok(());
    };
    let mut names: Vec<String> = settings
        .xks
        .key_stores
        .iter()
        .map(|k| format!("{} (XKS key store)", k.name))
        .collect();
    names.extend(
        settings
            .gcp
            .iter()
            .flat_map(|g| g.keys.iter())
            .map(|k| format!("{} (Cloud EKM key)", k.path)),
    );
    names.extend(
        settings
            .azure
            .iter()
            .flat_map(|a| a.prefixes.iter())
            .map(|p| format!("{} (Azure prefix)", p.name)),
    );
    let found = settings.xks.key_stores.iter().any(|k| &k.name == name)
        || settings
            .gcp
            .iter()
            .flat_map(|g| g.keys.iter())
            .any(|k| &k.path == name)
        || settings
            .azure
            .iter()
            .flat_map(|a| a.prefixes.iter())
            .any(|p| &p.name == name);
    if found {
        Ok(())
    } else {
        Err(ConnectInfoError::Config(format!(
            "no XKS key store, Cloud EKM key or Azure prefix named \"{name}\"; names: {}",
            if names.is_empty() {
                "none configured".to_owned()
            } else {
                names.join(", ")
            }
        )))
    }
}

/// The `[[azure.prefix]]` tables as written: `PrefixSettings::auth` does not expose its allowed
/// subjects or CA path, so they are read again from the (already validated) file.
fn azure_raw_prefixes(
    settings: &Settings,
) -> Result<Vec<crate::config::raw::RawAzurePrefix>, ConnectInfoError> {
    if settings.azure.is_none() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&settings.source).map_err(|e| {
        ConnectInfoError::Config(format!("{}: cannot read: {e}", settings.source.display()))
    })?;
    let raw: RawConfig = toml::from_str(&text)
        .map_err(|e| ConnectInfoError::Config(format!("{}: {e}", settings.source.display())))?;
    Ok(raw.azure.map(|a| a.prefix).unwrap_or_default())
}

/// A path from the file, relative to the file's directory (as `config` resolves them).
fn resolve(settings: &Settings, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        path
    } else {
        settings
            .source
            .parent()
            .map(|d| d.join(&path))
            .unwrap_or(path)
    }
}

/// Every TLS listener with its certificate, in configuration order.
fn endpoints(settings: &Settings) -> Result<Vec<Endpoint<'_>>, ConnectInfoError> {
    let mut out = Vec::new();
    for l in &settings.listeners {
        let Some(tls) = &l.tls else { continue };
        let client_ca = match &tls.client_auth {
            ClientAuth::None => None,
            ClientAuth::Required {
                ca_bundle,
                allowed_subjects,
            } => Some((ca_bundle.as_path(), allowed_subjects.as_slice())),
        };
        out.push(Endpoint {
            listener: l,
            cert: server_cert(&tls.cert_chain)?,
            client_ca,
        });
    }
    Ok(out)
}

/// Reads a chain file (leaf first) and describes its leaf.
fn server_cert(path: &Path) -> Result<ServerCert, ConnectInfoError> {
    let fail = |what: String| {
        ConnectInfoError::Certificate(format!("certificate chain {}: {what}", path.display()))
    };
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| fail("not valid PEM".to_owned()))?;
    let leaf_der = chain
        .first()
        .ok_or_else(|| fail("no CERTIFICATE block".to_owned()))?;
    let identity =
        PeerIdentity::from_der(leaf_der).ok_or_else(|| fail("leaf does not parse".to_owned()))?;
    let leaf = parse(leaf_der).ok_or_else(|| fail("leaf does not parse".to_owned()))?;
    let issuer_raw = leaf.issuer().as_raw();
    let issuer_index = chain
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, der)| parse(der).is_some_and(|c| c.subject().as_raw() == issuer_raw))
        .map(|(i, _)| i + 1);
    // Keep certificate order but drop duplicates (a CN usually repeats the first SAN).
    let mut seen = BTreeSet::new();
    let hosts = if identity.dns_names.is_empty() {
        identity.subject_cn.iter().cloned().collect()
    } else {
        identity.dns_names.clone()
    };
    let hosts = hosts
        .into_iter()
        .filter(|h| seen.insert(h.clone()))
        .collect();
    Ok(ServerCert {
        hosts,
        fingerprint: identity.sha256_fingerprint.clone(),
        issuer: leaf.issuer().to_string(),
        self_signed: leaf.subject().as_raw() == issuer_raw,
        issuer_index,
    })
}

fn parse(der: &[u8]) -> Option<x509_parser::certificate::X509Certificate<'_>> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Some(cert),
        _ => None,
    }
}
