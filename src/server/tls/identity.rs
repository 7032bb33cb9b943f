//! What a verified client certificate says about its holder ([`PeerIdentity`]), for logs, audit
//! and authorization, plus the subject matching used by the mTLS verifier.
//!
//! Parsing uses x509-parser on certificates that webpki has already verified (or, when
//! logging a rejection, on untrusted ones: nothing parsed here is trusted beyond display). No
//! dependency on the rest of the proxy.

use std::path::Path;

use rustls::ServerConnection;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// Names and fingerprint of the client's leaf certificate, as learned in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The first common name of the subject, if it has one and it is a string.
    pub subject_cn: Option<String>,
    /// Every DNS name in the subject alternative names, in certificate order.
    pub dns_names: Vec<String>,
    /// Lowercase hex SHA-256 of the leaf certificate's DER (what `openssl x509 -fingerprint
    /// -sha256` prints, without colons).
    pub sha256_fingerprint: String,
    /// The chain as presented (leaf first), already verified by the listener; kept so a front
    /// can check it against a narrower CA bundle of its own (e.g. per Azure path prefix).
    pub chain: Vec<CertificateDer<'static>>,
}

impl PeerIdentity {
    /// Extracts the identity from a DER certificate; `None` if it cannot be parsed (or has
    /// trailing bytes, which no honest encoder produces).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let cert = parse(der)?;
        let subject_cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        // A malformed SAN extension yields no DNS names, so such a certificate can only match
        // an allowed subject through its CN.
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(Self {
            subject_cn,
            dns_names,
            sha256_fingerprint: fingerprint(der),
            chain: vec![CertificateDer::from(der.to_vec())],
        })
    }

    /// Whether `name` equals the subject CN or one of the DNS SANs. The comparison is exact
    /// except for ASCII case, because these are hostnames (`cks.kms.<region>.amazonaws.com`);
    /// no wildcard or suffix matching, so a `*.example.com` SAN matches only the literal
    /// `*.example.com`.
    pub fn matches(&self, name: &str) -> bool {
        self.subject_cn
            .iter()
            .chain(self.dns_names.iter())
            .any(|candidate| candidate.eq_ignore_ascii_case(name))
    }
}

/// The identity of the client certificate of an established connection; `None` without mTLS
/// (or before the handshake completes). On a resumed session this is the certificate presented
/// in the original full handshake.
pub fn peer_identity(conn: &ServerConnection) -> Option<PeerIdentity> {
    let chain = conn.peer_certificates()?;
    let mut identity = PeerIdentity::from_der(chain.first()?)?;
    identity.chain = chain.iter().map(|c| c.clone().into_owned()).collect();
    Some(identity)
}

/// Lowercase hex SHA-256 of a DER certificate.
pub(super) fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The subject DN of a (possibly untrusted) certificate for a log line: the peer chooses it, so
/// it is length-capped; control characters are escaped by logging it with `?`.
pub(super) fn subject_for_log(der: &[u8]) -> String {
    const MAX_CHARS: usize = 256;
    match parse(der) {
        Some(cert) => {
            let subject = cert.subject().to_string();
            if subject.chars().count() > MAX_CHARS {
                let mut short: String = subject.chars().take(MAX_CHARS).collect();
                short.push('…');
                short
            } else {
                subject
            }
        }
        None => "<unparsable certificate>".to_owned(),
    }
}

/// Warns at startup when the server certificate has expired or expires within 30 days: KMS
/// refuses an expired proxy certificate (and publishes `XksProxyCertificateDaysToExpire`), so
/// the operator should hear about it before the clients do. Not an error, so that a renewal can
/// be deployed by a reload.
pub(super) fn warn_if_expiring(certified_key: &CertifiedKey, path: &Path) {
    const WARN_DAYS: i64 = 30;
    let Some(cert) = certified_key.cert.first().and_then(|der| parse(der)) else {
        return;
    };
    let not_after = cert.validity().not_after.timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let days_left = (not_after - now).div_euclid(86_400);
    if not_after <= now {
        tracing::warn!(
            path = %path.display(),
            not_after = %cert.validity().not_after,
            "server TLS certificate has expired; clients will refuse it"
        );
    } else if days_left < WARN_DAYS {
        tracing::warn!(
            path = %path.display(),
            days_left,
            not_after = %cert.validity().not_after,
            "server TLS certificate expires soon"
        );
    }
}

fn parse(der: &[u8]) -> Option<X509Certificate<'_>> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Some(cert),
        _ => None,
    }
}
