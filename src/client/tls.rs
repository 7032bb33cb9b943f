//! Client-side TLS: turns a [`ClientTls`] (PEM bytes) into a rustls `ClientConfig`.
//!
//! Built once per [`super::XksConnector`] so that every connection it opens shares one config,
//! and with it rustls's session cache (TLS resumption keeps the benchmark's handshakes cheap).
//! Depends on rustls and rustls-pki-types only.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::ClientError;

/// How the client authenticates the server, and optionally itself (mTLS).
#[derive(Clone)]
pub struct ClientTls {
    /// PEM bundle of the CA certificate(s) the server's chain must lead to.
    pub ca_pem: Vec<u8>,
    /// PEM client certificate chain (leaf first) for mTLS; needs `client_key_pem`.
    pub client_cert_pem: Option<Vec<u8>>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the client certificate.
    pub client_key_pem: Option<Vec<u8>>,
    /// Name the server certificate must be valid for (DNS name or IP address).
    pub server_name: String,
}

impl std::fmt::Debug for ClientTls {
    // The client key is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// A rustls client config: ring provider, TLS 1.2 and 1.3, ALPN `http/1.1`, the CA bundle as
    /// the only trust anchors, and the client certificate if one is configured.
    pub fn to_rustls(&self) -> Result<Arc<rustls::ClientConfig>, ClientError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| ClientError::Config(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Config("CA PEM holds no certificate".into()));
        }
        // An explicit provider: the process-wide default may be unset (or ambiguous) in tests.
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(ClientError::Tls)?
        .with_root_certificates(roots);
        let mut config = match (&self.client_cert_pem, &self.client_key_pem) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert_pem), Some(key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ClientError::Config(format!("client certificate PEM: {e}")))?;
                if chain.is_empty() {
                    return Err(ClientError::Config(
                        "client certificate PEM holds no certificate".into(),
                    ));
                }
                // The key's own error text is about PEM structure, never the key bytes.
                let key = PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| ClientError::Config(format!("client key PEM: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(ClientError::Tls)?
            }
            _ => {
                return Err(ClientError::Config(
                    "client certificate and key must be given together".into(),
                ));
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The server name to verify, parsed.
    pub(super) fn server_name(&self) -> Result<ServerName<'static>, ClientError> {
        ServerName::try_from(self.server_name.clone())
            .map_err(|e| ClientError::Config(format!("server name {:?}: {e}", self.server_name)))
    }
}
