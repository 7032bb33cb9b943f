//! The XKS error model (spec §3): every failure of this front end becomes one [`XksError`], and
//! [`from_crypto`] is the single mapping from `core::CryptoError`.
//!
//! Bodies are compact JSON `{"errorName":…,"errorMessage":…}`; messages are short printable
//! ASCII and never contain key material, plaintext or secrets.

use http::StatusCode;
use serde::Serialize;

use crate::core::CryptoError;
use crate::front::{Response, json_response};

/// The spec's error names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XksErrorName {
    /// 400
    Validation,
    /// 400
    InvalidState,
    /// 400
    InvalidCiphertext,
    /// 400
    InvalidKeyUsage,
    /// 401
    AuthenticationFailed,
    /// 403
    AccessDenied,
    /// 404
    KeyNotFound,
    /// 404
    InvalidUriPath,
    /// 429
    Throttling,
    /// 501
    UnsupportedOperation,
    /// 503
    DependencyTimeout,
    /// 500
    Internal,
}

impl XksErrorName {
    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            XksErrorName::Validation => "ValidationException",
            XksErrorName::InvalidState => "InvalidStateException",
            XksErrorName::InvalidCiphertext => "InvalidCiphertextException",
            XksErrorName::InvalidKeyUsage => "InvalidKeyUsageException",
            XksErrorName::AuthenticationFailed => "AuthenticationFailedException",
            XksErrorName::AccessDenied => "AccessDeniedException",
            XksErrorName::KeyNotFound => "KeyNotFoundException",
            XksErrorName::InvalidUriPath => "InvalidUriPathException",
            XksErrorName::Throttling => "ThrottlingException",
            XksErrorName::UnsupportedOperation => "UnsupportedOperationException",
            XksErrorName::DependencyTimeout => "DependencyTimeoutException",
            XksErrorName::Internal => "InternalException",
        }
    }

    /// The HTTP status the spec assigns.
    pub fn status(&self) -> StatusCode {
        match self {
            XksErrorName::Validation
            | XksErrorName::InvalidState
            | XksErrorName::InvalidCiphertext
            | XksErrorName::InvalidKeyUsage => StatusCode::BAD_REQUEST,
            XksErrorName::AuthenticationFailed => StatusCode::UNAUTHORIZED,
            XksErrorName::AccessDenied => StatusCode::FORBIDDEN,
            XksErrorName::KeyNotFound | XksErrorName::InvalidUriPath => StatusCode::NOT_FOUND,
            XksErrorName::Throttling => StatusCode::TOO_MANY_REQUESTS,
            XksErrorName::UnsupportedOperation => StatusCode::NOT_IMPLEMENTED,
            XksErrorName::DependencyTimeout => StatusCode::SERVICE_UNAVAILABLE,
            XksErrorName::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksError {
    /// Which error.
    pub name: XksErrorName,
    /// Short printable-ASCII explanation (KMS logs it to the customer's CloudWatch).
    pub message: String,
    /// The policy rule that denied the request, when one did (for the audit line; not sent).
    pub rule: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    error_name: &'a str,
    error_message: &'a str,
}

/// The spec limits `errorMessage` to < 512 printable ASCII characters.
const MAX_MESSAGE: usize = 511;

impl XksError {
    /// An error with a message.
    pub fn new(name: XksErrorName, message: impl Into<String>) -> Self {
        Self {
            name,
            message: message.into(),
            rule: None,
        }
    }

    /// AccessDeniedException from the policy rule `rule`.
    pub fn denied(rule: &str, message: impl Into<String>) -> Self {
        Self {
            name: XksErrorName::AccessDenied,
            message: message.into(),
            rule: Some(rule.to_owned()),
        }
    }

    /// The wire response.
    pub fn to_response(&self) -> Response {
        let message: String = self
            .message
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
            .take(MAX_MESSAGE)
            .collect();
        let body = ErrorBody {
            error_name: self.name.as_str(),
            error_message: &message,
        };
        // Serializing two strings cannot fail; fall back to a fixed body rather than panic.
        let bytes = serde_json::to_vec(&body)
            .unwrap_or_else(|_| br#"{"errorName":"InternalException"}"#.to_vec());
        json_response(self.name.status(), bytes)
    }

    /// The 405 answer for a non-POST request on an API path (the spec defines no errorName for
    /// it; ValidationException is the closest and keeps the body parseable).
    pub fn method_not_allowed() -> Response {
        let mut resp = XksError::new(
            XksErrorName::Validation,
            "method not allowed: XKS APIs accept POST only",
        )
        .to_response();
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        resp.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
        resp
    }
}

/// The one mapping from core conditions to XKS errors. Internal details are logged by the caller,
/// not sent: `Internal` and `HsmUnavailable` get generic messages.
pub fn from_crypto(e: &CryptoError) -> XksError {
    use XksErrorName as N;
    match e {
        CryptoError::KeyNotFound => XksError::new(N::KeyNotFound, "external key not found"),
        CryptoError::KeyDisabled(why) => XksError::new(N::InvalidState, why.clone()),
        CryptoError::InvalidKeyUsage(why) => XksError::new(N::InvalidKeyUsage, why.clone()),
        CryptoError::InvalidCiphertext => XksError::new(
            N::InvalidCiphertext,
            "ciphertext, IV, tag, AAD or ciphertext metadata failed authentication",
        ),
        CryptoError::Unsupported(why) => XksError::new(N::UnsupportedOperation, why.clone()),
        CryptoError::HsmBusy => XksError::new(N::Throttling, "the HSM is at capacity; retry"),
        CryptoError::HsmTimeout => {
            XksError::new(N::DependencyTimeout, "the HSM did not answer in time")
        }
        CryptoError::HsmUnavailable(_) => XksError::new(N::Internal, "the HSM is unavailable"),
        _ => XksError::new(N::Internal, "internal error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Body bytes of an error, for tests and tools.
    fn body_of(resp: &Response) -> Option<bytes::Bytes> {
        use hyper::body::Body as _;
        use std::pin::pin;
        use std::task::{Context, Poll, Waker};
        // `Full` is ready immediately; poll once without a runtime.
        let mut body = pin!(resp.body().clone());
        let mut cx = Context::from_waker(Waker::noop());
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            _ => None,
        }
    }

    #[test]
    fn statuses_match_the_spec_table() {
        use XksErrorName as N;
        let table = [
            (N::Validation, 400),
            (N::InvalidState, 400),
            (N::InvalidCiphertext, 400),
            (N::InvalidKeyUsage, 400),
            (N::AuthenticationFailed, 401),
            (N::AccessDenied, 403),
            (N::KeyNotFound, 404),
            (N::InvalidUriPath, 404),
            (N::Throttling, 429),
            (N::UnsupportedOperation, 501),
            (N::DependencyTimeout, 503),
            (N::Internal, 500),
        ];
        for (name, status) in table {
            assert_eq!(name.status().as_u16(), status, "{}", name.as_str());
        }
    }

    #[test]
    fn body_is_compact_and_printable() {
        let resp = XksError::new(XksErrorName::Validation, "bad\nfield \u{e9}").to_response();
        let body = body_of(&resp).unwrap();
        assert_eq!(
            &body[..],
            br#"{"errorName":"ValidationException","errorMessage":"bad?field ?"}"#
        );
        assert_eq!(resp.headers()["content-type"], "application/json");
    }

    #[test]
    fn crypto_mapping() {
        assert_eq!(
            from_crypto(&CryptoError::HsmBusy).name,
            XksErrorName::Throttling
        );
        assert_eq!(
            from_crypto(&CryptoError::HsmTimeout).name,
            XksErrorName::DependencyTimeout
        );
        assert_eq!(
            from_crypto(&CryptoError::InvalidCiphertext).name,
            XksErrorName::InvalidCiphertext
        );
        let internal = from_crypto(&CryptoError::Internal(
            "CKR_DEVICE_MEMORY secret detail".into(),
        ));
        assert_eq!(internal.name, XksErrorName::Internal);
        assert!(
            !internal.message.contains("CKR"),
            "raw detail is never sent"
        );
    }
}
