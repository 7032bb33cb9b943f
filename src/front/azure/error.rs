//! The Azure EKM proxy error model: every failure of this front becomes one [`AzureError`]
//! (`{code, message}` with the spec's statuses 400/401/403/404/429/5xx), and [`from_crypto`] is
//! the single mapping from `core::CryptoError`. Messages are short, printable and never contain
//! key material, wrapped values or certificate contents beyond the subject name.

use http::StatusCode;

use super::wire::ErrorBody;
use crate::core::CryptoError;
use crate::front::{Response, json_response};

/// The error codes this front answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 400: malformed body, bad base64url, missing or wrong api-version, bad key identifier,
    /// an algorithm the key or the HSM cannot do, a wrapped value that does not unwrap.
    InvalidRequest,
    /// 401: no client certificate, or one this path does not accept.
    Unauthorized,
    /// 403: key disabled (operator, kill switch, custody check) or the operation not allowed.
    Forbidden,
    /// 404: no such key (or not exposed under this prefix).
    KeyNotFound,
    /// 404: no such path.
    NotFound,
    /// 405: not POST.
    MethodNotAllowed,
    /// 429: the caller's request-rate quota is exhausted, or the HSM's queue is full.
    TooManyRequests,
    /// 500
    InternalError,
    /// 503: the HSM is unavailable (recovering).
    ServiceUnavailable,
    /// 504: the HSM did not answer in time.
    GatewayTimeout,
}

impl Code {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "InvalidRequest",
            Code::Unauthorized => "Unauthorized",
            Code::Forbidden => "Forbidden",
            Code::KeyNotFound => "KeyNotFound",
            Code::NotFound => "NotFound",
            Code::MethodNotAllowed => "MethodNotAllowed",
            Code::TooManyRequests => "TooManyRequests",
            Code::InternalError => "InternalError",
            Code::ServiceUnavailable => "ServiceUnavailable",
            Code::GatewayTimeout => "GatewayTimeout",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidRequest => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::KeyNotFound | Code::NotFound => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            Code::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// One failure, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureError {
    /// The code (and status).
    pub code: Code,
    /// The message sent.
    pub message: String,
    /// The rule that denied the request, when a rule did (for the audit line).
    pub rule: Option<String>,
}

impl AzureError {
    /// A failure with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            rule: None,
        }
    }

    /// A denial by the named rule.
    pub fn denied(rule: &str, message: impl Into<String>) -> Self {
        Self {
            code: Code::Forbidden,
            message: message.into(),
            rule: Some(rule.to_owned()),
        }
    }

    /// The response.
    pub fn to_response(&self) -> Response {
        let body = ErrorBody {
            code: self.code.as_str(),
            message: &self.message,
        };
        // Serializing two strings cannot fail; an empty body would still carry the status.
        json_response(
            self.code.status(),
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }
}

/// The one mapping from core errors. Details of HSM and internal failures are logged by the
/// caller, never sent.
pub fn from_crypto(e: &CryptoError) -> AzureError {
    match e {
        CryptoError::KeyNotFound => AzureError::new(Code::KeyNotFound, "key not found"),
        CryptoError::KeyDisabled(_) => AzureError::new(Code::Forbidden, "key is disabled"),
        CryptoError::InvalidKeyUsage(why) => AzureError::new(Code::Forbidden, why.clone()),
        CryptoError::InvalidCiphertext => AzureError::new(
            Code::InvalidRequest,
            "the wrapped value is not valid for this key and algorithm",
        ),
        CryptoError::Unsupported(why) => AzureError::new(Code::InvalidRequest, why.clone()),
        CryptoError::HsmBusy => AzureError::new(Code::TooManyRequests, "the HSM is busy; retry"),
        CryptoError::HsmTimeout => {
            AzureError::new(Code::GatewayTimeout, "the HSM did not answer in time")
        }
        CryptoError::HsmUnavailable(_) => {
            AzureError::new(Code::ServiceUnavailable, "the HSM is unavailable; retry")
        }
        CryptoError::Internal(_) => AzureError::new(Code::InternalError, "internal error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_core_error_has_its_status() {
        for (e, status) in [
            (CryptoError::KeyNotFound, 404),
            (CryptoError::KeyDisabled("x".into()), 403),
            (CryptoError::InvalidKeyUsage("x".into()), 403),
            (CryptoError::InvalidCiphertext, 400),
            (CryptoError::Unsupported("x".into()), 400),
            (CryptoError::HsmBusy, 429),
            (CryptoError::HsmTimeout, 504),
            (CryptoError::HsmUnavailable("x".into()), 503),
            (CryptoError::Internal("secret detail".into()), 500),
        ] {
            let mapped = from_crypto(&e);
            assert_eq!(mapped.code.status().as_u16(), status, "{e:?}");
            assert!(!mapped.message.contains("secret detail"));
        }
    }
}
