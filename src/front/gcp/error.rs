//! The Cloud EKM error model: every failure of this front end becomes one [`GcpError`], answered
//! as a `google.rpc.Status` in proto3 JSON (`code`, `message`, `status`, `details`) with the HTTP
//! status of Google's gRPC↔HTTP mapping. [`from_crypto`] is the single mapping from
//! `core::CryptoError`.
//!
//! Messages are short and never contain key material, plaintext, tokens or secrets. Denials are
//! `PERMISSION_DENIED` only when the caller was refused by policy: Cloud EKM disables a key
//! version on a permission error, so data errors (tampered blobs) are `INVALID_ARGUMENT` and
//! operator switches (kill switch, disabled key) are `FAILED_PRECONDITION`.

use std::borrow::Cow;

use http::StatusCode;
use serde::Serialize;

use crate::auth::jwt::JwtError;
use crate::core::CryptoError;
use crate::front::{Response, json_response};

/// `ErrorInfo.domain` of our errors.
const DOMAIN: &str = "ekm-proxy";

/// The gRPC status codes this front answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 3 → 400
    InvalidArgument,
    /// 9 → 400
    FailedPrecondition,
    /// 16 → 401
    Unauthenticated,
    /// 7 → 403
    PermissionDenied,
    /// 5 → 404
    NotFound,
    /// 8 → 429
    ResourceExhausted,
    /// 13 → 500
    Internal,
    /// 12 → 501
    Unimplemented,
    /// 14 → 503
    Unavailable,
    /// 4 → 504
    DeadlineExceeded,
}

impl Code {
    /// The gRPC number.
    pub fn number(&self) -> i32 {
        match self {
            Code::InvalidArgument => 3,
            Code::DeadlineExceeded => 4,
            Code::NotFound => 5,
            Code::PermissionDenied => 7,
            Code::ResourceExhausted => 8,
            Code::FailedPrecondition => 9,
            Code::Unimplemented => 12,
            Code::Internal => 13,
            Code::Unavailable => 14,
            Code::Unauthenticated => 16,
        }
    }

    /// The gRPC name (`status` field, metric outcome label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::NotFound => "NOT_FOUND",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::Internal => "INTERNAL",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Unavailable => "UNAVAILABLE",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        }
    }

    /// The HTTP status Google's mapping assigns.
    pub fn http(&self) -> StatusCode {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// The condition an error names in `ErrorInfo.reason` (stable UPPER_SNAKE names; operators and
/// the conformance script match on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No such path under the prefix.
    UnknownPath,
    /// A verb other than `:wrap` / `:unwrap`.
    UnsupportedMethod,
    /// Not POST.
    MethodNotAllowed,
    /// The body exceeds the server's limit.
    RequestTooLarge,
    /// The request deadline passed.
    DeadlineExceeded,
    /// No external key at this key path.
    KeyNotFound,
    /// The key (or the proxy) is switched off, or the HSM refuses the key.
    KeyDisabled,
    /// The body is not the API's JSON.
    MalformedRequest,
    /// One field is wrong (the `BadRequest` detail names it).
    InvalidField,
    /// The blob names a key version this key path does not accept.
    UnknownKeyVersion,
    /// A key health check tried to unwrap a blob that is not a health-check blob.
    HealthCheckBlobRequired,
    /// Refused by a grant or the Key Access Justifications policy.
    AccessDenied,
    /// The token's issuer's signing keys cannot be fetched.
    JwksUnavailable,
    /// The bearer token was refused, and why.
    Token(JwtError),
    /// The key's HSM key was not found.
    HsmKeyNotFound,
    /// The key's attributes forbid the operation.
    InvalidKeyUsage,
    /// The blob did not authenticate.
    UnwrapFailed,
    /// An operation, algorithm or size the proxy or the HSM does not support.
    Unsupported,
    /// The caller's request-rate quota is exhausted.
    QuotaExceeded,
    /// The HSM's queue is full.
    HsmBusy,
    /// The HSM did not answer in time.
    HsmTimeout,
    /// The HSM is unavailable (recovering).
    HsmUnavailable,
    /// Anything else.
    Internal,
}

impl Reason {
    /// The `ErrorInfo.reason` text.
    pub fn as_str(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Reason::UnknownPath => "UNKNOWN_PATH",
            Reason::UnsupportedMethod => "UNSUPPORTED_METHOD",
            Reason::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Reason::RequestTooLarge => "REQUEST_TOO_LARGE",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::KeyNotFound => "KEY_NOT_FOUND",
            Reason::KeyDisabled => "KEY_DISABLED",
            Reason::MalformedRequest => "MALFORMED_REQUEST",
            Reason::InvalidField => "INVALID_FIELD",
            Reason::UnknownKeyVersion => "UNKNOWN_KEY_VERSION",
            Reason::HealthCheckBlobRequired => "HEALTH_CHECK_BLOB_REQUIRED",
            Reason::AccessDenied => "ACCESS_DENIED",
            Reason::JwksUnavailable => "JWKS_UNAVAILABLE",
            // The verifier's own reason names (`expired`, `wrong_audience`, ...), upper-cased.
            Reason::Token(e) => return Cow::Owned(e.reason().to_ascii_uppercase()),
            Reason::HsmKeyNotFound => "HSM_KEY_NOT_FOUND",
            Reason::InvalidKeyUsage => "INVALID_KEY_USAGE",
            Reason::UnwrapFailed => "UNWRAP_FAILED",
            Reason::Unsupported => "UNSUPPORTED",
            Reason::QuotaExceeded => "QUOTA_EXCEEDED",
            Reason::HsmBusy => "HSM_BUSY",
            Reason::HsmTimeout => "HSM_TIMEOUT",
            Reason::HsmUnavailable => "HSM_UNAVAILABLE",
            Reason::Internal => "INTERNAL",
        })
    }
}

/// One error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpError {
    /// The status code.
    pub code: Code,
    /// Human-readable, safe message.
    pub message: String,
    /// `ErrorInfo.reason`: the condition.
    pub reason: Reason,
    /// `ErrorInfo.metadata` (e.g. the denying rule).
    pub metadata: Vec<(&'static str, String)>,
    /// A `BadRequest` field violation: (field, description).
    pub field: Option<(&'static str, String)>,
    /// The rule that denied the request (a grant or KAJ policy rule, or `authentication` for a
    /// refused token), for the audit line.
    pub rule: Option<String>,
}

impl GcpError {
    /// An error with a code, a reason and a message.
    pub fn new(code: Code, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason,
            metadata: Vec::new(),
            field: None,
            rule: None,
        }
    }

    /// `INVALID_ARGUMENT` naming the offending field.
    pub fn invalid_field(field: &'static str, description: impl Into<String>) -> Self {
        let description = description.into();
        Self {
            code: Code::InvalidArgument,
            message: format!("{field}: {description}"),
            reason: Reason::InvalidField,
            metadata: Vec::new(),
            field: Some((field, description)),
            rule: None,
        }
    }

    /// Record the rule that denied the request (audit only; not sent unless also `with`).
    pub fn denied_by(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    /// Add an `ErrorInfo.metadata` entry.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.metadata.push((key, value.into()));
        self
    }

    /// The response, carrying `request_id` in `x-request-id` and in `ErrorInfo.metadata`.
    pub fn to_response(&self, request_id: &str) -> Response {
        let mut metadata: serde_json::Map<String, serde_json::Value> = self
            .metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone().into()))
            .collect();
        metadata.insert("requestId".into(), request_id.into());
        let reason = self.reason.as_str();
        let mut details = vec![Detail::ErrorInfo {
            reason: &reason,
            domain: DOMAIN,
            metadata,
        }];
        if let Some((field, description)) = &self.field {
            details.push(Detail::BadRequest {
                field_violations: vec![FieldViolation { field, description }],
            });
        }
        let body = Status {
            code: self.code.number(),
            message: &self.message,
            status: self.code.as_str(),
            details,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| {
            br#"{"code":13,"message":"internal error","status":"INTERNAL"}"#.to_vec()
        });
        let mut resp = json_response(self.code.http(), bytes);
        if let Ok(v) = http::HeaderValue::from_str(request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }
}

/// `google.rpc.Status` in proto3 JSON, plus the canonical `status` name Google's HTTP errors carry.
#[derive(Serialize)]
struct Status<'a> {
    code: i32,
    message: &'a str,
    status: &'a str,
    details: Vec<Detail<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "@type")]
enum Detail<'a> {
    #[serde(rename = "type.googleapis.com/google.rpc.ErrorInfo")]
    ErrorInfo {
        reason: &'a str,
        domain: &'a str,
        metadata: serde_json::Map<String, serde_json::Value>,
    },
    #[serde(rename = "type.googleapis.com/google.rpc.BadRequest")]
    BadRequest {
        #[serde(rename = "fieldViolations")]
        field_violations: Vec<FieldViolation<'a>>,
    },
}

#[derive(Serialize)]
struct FieldViolation<'a> {
    field: &'a str,
    description: &'a str,
}

/// The one mapping from core errors.
pub fn from_crypto(e: &CryptoError) -> GcpError {
    match e {
        CryptoError::KeyNotFound => GcpError::new(
            Code::NotFound,
            Reason::HsmKeyNotFound,
            "the key's HSM key was not found",
        ),
        CryptoError::KeyDisabled(why) => GcpError::new(
            Code::FailedPrecondition,
            Reason::KeyDisabled,
            format!("key is disabled: {why}"),
        ),
        CryptoError::InvalidKeyUsage(why) => GcpError::new(
            Code::FailedPrecondition,
            Reason::InvalidKeyUsage,
            format!("key cannot be used for this operation: {why}"),
        ),
        CryptoError::InvalidCiphertext => GcpError::new(
            Code::InvalidArgument,
            Reason::UnwrapFailed,
            "wrappedBlob could not be unwrapped: it was altered, or the key path or additionalAuthenticatedData differ from the wrap",
        ),
        CryptoError::Unsupported(what) => GcpError::new(
            Code::Unimplemented,
            Reason::Unsupported,
            format!("unsupported: {what}"),
        ),
        CryptoError::HsmBusy => GcpError::new(
            Code::ResourceExhausted,
            Reason::HsmBusy,
            "the HSM is at capacity; retry with backoff",
        ),
        CryptoError::HsmTimeout => GcpError::new(
            Code::DeadlineExceeded,
            Reason::HsmTimeout,
            "the HSM did not answer in time",
        ),
        CryptoError::HsmUnavailable(_) => GcpError::new(
            Code::Unavailable,
            Reason::HsmUnavailable,
            "the HSM is unavailable",
        ),
        _ => GcpError::new(Code::Internal, Reason::Internal, "internal error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(resp: Response) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn renders_google_rpc_status() {
        let e = GcpError::new(
            Code::PermissionDenied,
            Reason::AccessDenied,
            "denied by rule 'grants'",
        )
        .with("rule", "grants");
        let resp = e.to_response("req-1");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()["x-request-id"], "req-1");
        let v = body(resp).await;
        assert_eq!(v["code"], 7);
        assert_eq!(v["status"], "PERMISSION_DENIED");
        assert_eq!(
            v["details"][0]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        assert_eq!(v["details"][0]["reason"], "ACCESS_DENIED");
        assert_eq!(v["details"][0]["metadata"]["rule"], "grants");
        assert_eq!(v["details"][0]["metadata"]["requestId"], "req-1");

        let v =
            body(GcpError::invalid_field("wrappedBlob", "is not valid base64").to_response("r"))
                .await;
        assert_eq!(v["code"], 3);
        assert_eq!(
            v["details"][1]["fieldViolations"][0]["field"],
            "wrappedBlob"
        );
    }

    #[test]
    fn token_reasons_are_the_verifiers_upper_cased() {
        assert_eq!(Reason::Token(JwtError::Expired).as_str(), "EXPIRED");
        assert_eq!(
            Reason::Token(JwtError::WrongAudience).as_str(),
            "WRONG_AUDIENCE"
        );
        assert_eq!(Reason::UnwrapFailed.as_str(), "UNWRAP_FAILED");
    }

    #[test]
    fn crypto_errors_never_become_permission_denied() {
        for e in [
            CryptoError::KeyNotFound,
            CryptoError::KeyDisabled("x".into()),
            CryptoError::InvalidKeyUsage("x".into()),
            CryptoError::InvalidCiphertext,
            CryptoError::HsmBusy,
            CryptoError::HsmTimeout,
            CryptoError::HsmUnavailable("x".into()),
            CryptoError::Internal("x".into()),
        ] {
            assert_ne!(from_crypto(&e).code, Code::PermissionDenied, "{e:?}");
        }
        assert_eq!(
            from_crypto(&CryptoError::InvalidCiphertext).code.http(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            from_crypto(&CryptoError::HsmBusy).code.http(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
