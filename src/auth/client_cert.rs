//! Client-certificate authentication for fronts whose only credential is the mTLS certificate
//! (Azure Managed HSM's EKM proxy API): the listener's handshake has already verified the chain
//! against the listener's CA bundle; this check narrows it to one tenant's CA bundle (optional)
//! and its allowed subject names, and yields the [`Principal`].
//!
//! Works on the presented chain and names as plain data (the server hands them over); depends on
//! rustls' WebPKI verifier for the chain check and on nothing else of the proxy.

use std::fmt;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::Principal;

/// What the client presented, as the listener verified it.
#[derive(Debug, Clone, Copy)]
pub struct PresentedCertificate<'a> {
    /// Leaf first.
    pub chain: &'a [CertificateDer<'static>],
    /// The leaf's subject CN.
    pub subject_cn: Option<&'a str>,
    /// The leaf's DNS SANs.
    pub dns_names: &'a [String],
    /// Lowercase hex SHA-256 of the leaf.
    pub fingerprint: &'a str,
}

/// Why a certificate was not accepted (a fixed set: metric label and error message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertAuthError {
    /// The connection carries no client certificate (not an mTLS listener).
    Missing,
    /// The chain does not lead to this tenant's CA bundle.
    UntrustedIssuer,
    /// Neither the CN nor a DNS SAN is an allowed subject.
    SubjectNotAllowed,
}

impl CertAuthError {
    /// A stable snake_case label.
    pub fn reason(self) -> &'static str {
        match self {
            CertAuthError::Missing => "no_client_certificate",
            CertAuthError::UntrustedIssuer => "untrusted_issuer",
            CertAuthError::SubjectNotAllowed => "subject_not_allowed",
        }
    }
}

impl fmt::Display for CertAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertAuthError::Missing => "no client certificate was presented",
            CertAuthError::UntrustedIssuer => {
                "the client certificate is not issued by a CA trusted for this path"
            }
            CertAuthError::SubjectNotAllowed => {
                "the client certificate's subject is not allowed for this path"
            }
        })
    }
}

/// One tenant's certificate policy: an optional CA bundle narrower than the listener's, and the
/// subject names (CN or DNS SAN, exact, ASCII case-insensitive) allowed.
#[derive(Clone)]
pub struct CertificateAuth {
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    allowed_subjects: Vec<String>,
}

impl fmt::Debug for CertificateAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuth")
            .field("own_ca_bundle", &self.verifier.is_some())
            .field("allowed_subjects", &self.allowed_subjects)
            .finish()
    }
}

impl CertificateAuth {
    /// A policy trusting `roots` (if given; else the listener's CA alone decides) for the
    /// `allowed_subjects` (at least one, none blank).
    pub fn new(
        roots: Option<RootCertStore>,
        allowed_subjects: Vec<String>,
    ) -> Result<Self, String> {
        if allowed_subjects.is_empty() {
            return Err("allowed_subjects must name at least one certificate subject".into());
        }
        if allowed_subjects.iter().any(|s| s.trim().is_empty()) {
            return Err("allowed_subjects must not contain a blank name".into());
        }
        let verifier = match roots {
            None => None,
            Some(roots) => Some(
                WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(rustls::crypto::ring::default_provider()),
                )
                .build()
                .map_err(|e| format!("CA bundle: {e}"))?,
            ),
        };
        Ok(Self {
            verifier,
            allowed_subjects,
        })
    }

    /// Check the presented certificate at time `now`; the principal is named by the subject that
    /// matched.
    pub fn authenticate(
        &self,
        cert: Option<PresentedCertificate<'_>>,
        now: UnixTime,
    ) -> Result<Principal, CertAuthError> {
        let cert = cert.ok_or(CertAuthError::Missing)?;
        let (leaf, intermediates) = cert.chain.split_first().ok_or(CertAuthError::Missing)?;
        if let Some(verifier) = &self.verifier {
            verifier
                .verify_client_cert(leaf, intermediates, now)
                .map_err(|_| CertAuthError::UntrustedIssuer)?;
        }
        let matched = cert
            .subject_cn
            .into_iter()
            .chain(cert.dns_names.iter().map(String::as_str))
            .find(|name| {
                self.allowed_subjects
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(name))
            })
            .ok_or(CertAuthError::SubjectNotAllowed)?;
        Ok(Principal::Certificate {
            subject: matched.to_owned(),
            fingerprint: cert.fingerprint.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presented<'a>(
        chain: &'a [CertificateDer<'static>],
        cn: Option<&'a str>,
        sans: &'a [String],
    ) -> PresentedCertificate<'a> {
        PresentedCertificate {
            chain,
            subject_cn: cn,
            dns_names: sans,
            fingerprint: "ab12",
        }
    }

    #[test]
    fn subjects_match_cn_or_san_exactly() {
        let auth = CertificateAuth::new(None, vec!["pool-a.example".into()]).unwrap();
        let chain = [CertificateDer::from(vec![0x30, 0x00])];
        let now = UnixTime::now();
        let ok = auth
            .authenticate(Some(presented(&chain, Some("POOL-A.example"), &[])), now)
            .unwrap();
        assert_eq!(ok.name(), "POOL-A.example");
        let sans = ["other".to_owned(), "pool-a.example".to_owned()];
        assert!(
            auth.authenticate(Some(presented(&chain, Some("x"), &sans)), now)
                .is_ok()
        );
        assert_eq!(
            auth.authenticate(
                Some(presented(&chain, Some("pool-a.example.evil"), &[])),
                now
            ),
            Err(CertAuthError::SubjectNotAllowed)
        );
        assert_eq!(auth.authenticate(None, now), Err(CertAuthError::Missing));
        assert_eq!(
            auth.authenticate(Some(presented(&[], Some("pool-a.example"), &[])), now),
            Err(CertAuthError::Missing)
        );
    }

    #[test]
    fn a_policy_needs_subjects() {
        assert!(CertificateAuth::new(None, vec![]).is_err());
        assert!(CertificateAuth::new(None, vec![" ".into()]).is_err());
    }
}
