//! The mTLS client-certificate verifier: rustls' `WebPkiClientVerifier` (chain to the CA bundle,
//! signatures, EKU clientAuth, validity at the current time; client auth mandatory) plus a check
//! of the leaf's subject CN / DNS SANs against the configured allowed subjects.
//!
//! Alerts. The XKS spec (and the AWS sample proxy) abort the handshake with a fatal
//! `handshake_failure` alert for any rejected client certificate. rustls chooses the alert from
//! the verifier's error (`CommonState::send_cert_verify_error_alert`): an
//! `Error::InvalidCertificate(_)` becomes a certificate-specific alert (`certificate_expired`,
//! `unknown_ca`, `bad_certificate`, ...), `Error::PeerMisbehaved(_)` becomes
//! `illegal_parameter`, and anything else becomes `handshake_failure`. So every rejection here,
//! including failed CertificateVerify signatures, is reported as `Error::General`.
//!
//! The one exception we cannot change: a client that sends an empty Certificate message. rustls
//! rejects that itself, before calling any verifier, with a fatal `certificate_required` (116)
//! alert on both TLS 1.3 and TLS 1.2 (rustls 0.23 `server/tls13.rs` and `server/tls12.rs`,
//! `ExpectCertificate`; as rustls 0.21 did in the AWS sample proxy). Declaring client auth
//! optional instead would let such a handshake *succeed*, and rustls has no API to send an alert
//! after the handshake, so a mandatory verifier with `certificate_required` is the strictest
//! option. The accept loop learns about it from the handshake error
//! ([`missing_client_certificate`]).
//!
//! Depends only on rustls and the sibling modules; no proxy policy beyond the subject list.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::TlsError;
use super::identity::{PeerIdentity, fingerprint, subject_for_log};
use super::load;

/// Called once per rejected client certificate, with the reason, e.g. to increment
/// `ekm_tls_handshake_failures_total{reason}`. Runs inside the handshake: keep it cheap.
pub type RejectHook = Arc<dyn Fn(RejectReason) + Send + Sync>;

/// Why a client certificate was rejected; a small fixed set, usable as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The client sent no certificate (reported by the accept loop, not by the verifier).
    NoCertificate,
    /// The certificate (or one in its chain) has expired.
    Expired,
    /// The certificate (or one in its chain) is not valid yet.
    NotYetValid,
    /// The chain does not lead to a configured CA (self-signed, another CA, missing
    /// intermediate).
    UnknownIssuer,
    /// A signature in the chain or the handshake's CertificateVerify is invalid or uses an
    /// unsupported algorithm.
    BadSignature,
    /// The certificate is not allowed for TLS client authentication (EKU, CA flag, ...).
    WrongUsage,
    /// The certificate cannot be parsed.
    BadEncoding,
    /// The chain is fine but neither the CN nor a DNS SAN is in `allowed_subjects`.
    SubjectNotAllowed,
    /// Any other verification failure.
    Other,
}

impl RejectReason {
    /// A stable snake_case label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::UnknownIssuer => "unknown_issuer",
            Self::BadSignature => "bad_signature",
            Self::WrongUsage => "wrong_usage",
            Self::BadEncoding => "bad_encoding",
            Self::SubjectNotAllowed => "subject_not_allowed",
            Self::Other => "other",
        }
    }

    /// Classifies a webpki verification error.
    fn of(err: &rustls::Error) -> Self {
        let rustls::Error::InvalidCertificate(cert_err) = err else {
            return Self::Other;
        };
        #[allow(deprecated)] // the context-less variants are still produced by some paths
        match cert_err {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Self::NotYetValid
            }
            CertificateError::UnknownIssuer => Self::UnknownIssuer,
            CertificateError::BadSignature
            | CertificateError::UnsupportedSignatureAlgorithm
            | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                Self::BadSignature
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                Self::WrongUsage
            }
            CertificateError::BadEncoding => Self::BadEncoding,
            _ => Self::Other,
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a failed server-side handshake (as returned by `tokio_rustls::TlsAcceptor::accept`)
/// failed because the client presented no certificate while mTLS is required. rustls handles
/// that case before our verifier runs, so the accept loop must count and log it itself
/// (`RejectReason::NoCertificate`).
pub fn missing_client_certificate(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::NoCertificatesPresented))
}

/// Builds the mandatory client-certificate verifier for `ClientAuth::Required`.
pub(super) fn verifier(
    ca_bundle: &Path,
    allowed_subjects: &[String],
    on_reject: Option<RejectHook>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    if allowed_subjects.iter().any(|s| s.trim().is_empty()) {
        return Err(TlsError::EmptyAllowedSubject);
    }
    let roots = load::ca_bundle(ca_bundle)?;
    // The builder's defaults are what we want: client auth mandatory, the provider's signature
    // algorithms, and the CA subjects sent as hints so clients with several certificates pick
    // the right one.
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| match e {
            rustls::server::VerifierBuilderError::NoRootAnchors => TlsError::CaBundleEmpty {
                path: ca_bundle.to_path_buf(),
            },
            other => TlsError::Rustls(rustls::Error::General(other.to_string())),
        })?;
    Ok(Arc::new(SubjectCheckingVerifier {
        inner,
        allowed_subjects: allowed_subjects.to_vec(),
        on_reject,
    }))
}

/// webpki verification, then the allowed-subjects check; every rejection is logged, counted and
/// turned into an error that makes rustls send `handshake_failure`.
struct SubjectCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed_subjects: Vec<String>,
    on_reject: Option<RejectHook>,
}

impl SubjectCheckingVerifier {
    /// Logs and counts a rejection and returns the error for rustls. The error text reaches only
    /// our own logs (the client sees just the alert).
    fn reject(
        &self,
        reason: RejectReason,
        detail: &str,
        leaf: &CertificateDer<'_>,
    ) -> rustls::Error {
        tracing::warn!(
            reason = reason.as_str(),
            subject = ?subject_for_log(leaf),
            sha256 = %fingerprint(leaf),
            detail,
            "client certificate rejected; aborting the TLS handshake (handshake_failure)"
        );
        if let Some(hook) = &self.on_reject {
            hook(reason);
        }
        rustls::Error::General(format!("client certificate rejected: {reason}"))
    }

    fn check_signature(
        &self,
        result: Result<HandshakeSignatureValid, rustls::Error>,
        cert: &CertificateDer<'_>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        result.map_err(|e| self.reject(RejectReason::BadSignature, &e.to_string(), cert))
    }
}

impl fmt::Debug for SubjectCheckingVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubjectCheckingVerifier")
            .field("inner", &self.inner)
            .field("allowed_subjects", &self.allowed_subjects)
            .field("on_reject", &self.on_reject.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

impl ClientCertVerifier for SubjectCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| self.reject(RejectReason::of(&e), &e.to_string(), end_entity))?;
        // Always parse, even with no subject list: then every mTLS connection has a
        // `PeerIdentity` for logs and authorization.
        let Some(identity) = PeerIdentity::from_der(end_entity) else {
            return Err(self.reject(
                RejectReason::BadEncoding,
                "the certificate passed webpki but x509-parser cannot read it",
                end_entity,
            ));
        };
        if !self.allowed_subjects.is_empty()
            && !self
                .allowed_subjects
                .iter()
                .any(|name| identity.matches(name))
        {
            return Err(self.reject(
                RejectReason::SubjectNotAllowed,
                "neither the subject CN nor any DNS SAN is in allowed_subjects",
                end_entity,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(self.inner.verify_tls12_signature(message, cert, dss), cert)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(self.inner.verify_tls13_signature(message, cert, dss), cert)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
