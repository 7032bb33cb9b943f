//! Authentication: proves who is calling and yields a [`Principal`].
//!
//! Depends on `secret` and `metrics` (and the leaf glob type `authz::Pattern`, for the JWT
//! service-account allow-list); knows nothing of key operations, policy or the HSM.

pub mod client_cert;
pub mod jwt;
pub mod sigv4;

/// Who the caller proved to be. Made only by this module's verifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A SigV4 signature made with a configured credential.
    SigV4 {
        /// The access key id that signed the request.
        access_key_id: String,
        /// The region in the credential scope.
        region: String,
    },
    /// A bearer token (JWT) verified against a configured issuer.
    Jwt {
        /// The configuration name of the issuer that signed it (e.g. `google`).
        issuer: String,
        /// The token's `sub` claim.
        subject: String,
        /// The token's verified `email` claim (the service account).
        email: String,
    },
    /// A client certificate accepted by an mTLS listener and a front's subject list.
    Certificate {
        /// The allowed subject name (CN or DNS SAN) the certificate carries.
        subject: String,
        /// Lowercase hex SHA-256 of the certificate.
        fingerprint: String,
    },
}

impl Principal {
    /// A short, loggable name of the principal (never a secret).
    pub fn name(&self) -> &str {
        match self {
            Principal::SigV4 { access_key_id, .. } => access_key_id,
            Principal::Jwt { email, .. } => email,
            Principal::Certificate { subject, .. } => subject,
        }
    }
}
