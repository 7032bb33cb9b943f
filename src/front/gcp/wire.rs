//! Cloud EKM wire types in proto3 JSON: `WrapRequest`/`UnwrapRequest` and their responses, as
//! copied from Google's public STET protos.
//!
//! Decoding follows the proto3 JSON mapping: lowerCamelCase names, with the original snake_case
//! names also accepted; unknown fields ignored; bytes in standard base64 (URL-safe accepted too,
//! padding optional). Only data shapes live here: no HTTP, no policy, no HSM.

use serde::{Deserialize, Serialize};

use crate::authz::access_reason::{AccessReason, MalformedReason};
use crate::front::pipeline::{self, Base64, FieldError};

/// `WrapRequest` (also `UnwrapRequest`: the two differ only in `plaintext` / `wrappedBlob`).
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct KeyOpRequest {
    /// The key path (optional here; the URL names the key).
    #[serde(rename = "keyPath", alias = "key_path")]
    pub key_path: Option<String>,
    /// Wrap: the bytes to wrap (base64).
    pub plaintext: Option<String>,
    /// Unwrap: the blob to unwrap (base64).
    #[serde(rename = "wrappedBlob", alias = "wrapped_blob")]
    pub wrapped_blob: Option<String>,
    /// Who is asking and why.
    #[serde(rename = "additionalContext", alias = "additional_context")]
    pub additional_context: Option<RequestContext>,
    /// Bound into the blob (base64).
    #[serde(
        rename = "additionalAuthenticatedData",
        alias = "additional_authenticated_data"
    )]
    pub additional_authenticated_data: Option<String>,
    /// Informational; not used for routing.
    #[serde(rename = "keyUriPrefix", alias = "key_uri_prefix")]
    pub key_uri_prefix: Option<String>,
}

/// `RequestContext`.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct RequestContext {
    /// e.g. `//cloudkms.googleapis.com/projects/…/cryptoKeyVersions/1`
    #[serde(rename = "fullResourceName", alias = "full_resource_name")]
    pub full_resource_name: Option<String>,
    /// e.g. `projects/…/locations/…/keyRings/…/cryptoKeys/…/cryptoKeyVersions/1`
    #[serde(rename = "relativeResourceName", alias = "relative_resource_name")]
    pub relative_resource_name: Option<String>,
    /// The Key Access Justification.
    #[serde(rename = "accessReasonContext", alias = "access_reason_context")]
    pub access_reason_context: Option<AccessReasonContext>,
    /// Set on Cloud EKM's periodic probes.
    #[serde(rename = "isKeyHealthCheck", alias = "is_key_health_check")]
    pub is_key_health_check: Option<bool>,
}

/// `AccessReasonContext`.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct AccessReasonContext {
    /// Enum name or number; proto3 JSON omits the zero value.
    pub reason: Option<ReasonValue>,
}

/// A proto3 JSON enum value: its name, or its number.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ReasonValue {
    /// `"CUSTOMER_INITIATED_ACCESS"`
    Name(String),
    /// `5`
    Code(i64),
}

impl RequestContext {
    /// The justification, with the three special cases told apart; a reason that is neither an
    /// enum name nor an enum number is malformed (the caller answers INVALID_ARGUMENT).
    pub fn access_reason(
        context: Option<&RequestContext>,
    ) -> Result<AccessReason, MalformedReason> {
        match context.and_then(|c| c.access_reason_context.as_ref()) {
            None => Ok(AccessReason::Absent),
            Some(AccessReasonContext { reason: None }) => Ok(AccessReason::Unspecified),
            Some(AccessReasonContext {
                reason: Some(ReasonValue::Name(name)),
            }) => AccessReason::from_json_string(name),
            Some(AccessReasonContext {
                reason: Some(ReasonValue::Code(code)),
            }) => AccessReason::from_json_number(*code),
        }
    }
}

/// `WrapResponse`.
#[derive(Debug, Serialize)]
pub struct WrapResponse {
    /// The blob (base64).
    #[serde(rename = "wrappedBlob")]
    pub wrapped_blob: String,
}

/// `UnwrapResponse` (`allowedCacheDuration` is left out: its semantics are not public).
#[derive(Debug, Serialize)]
pub struct UnwrapResponse<'a> {
    /// The unwrapped bytes (base64).
    pub plaintext: &'a str,
}

/// Encode bytes as standard base64 with padding (the proto3 JSON form).
pub fn b64_encode(bytes: &[u8]) -> String {
    pipeline::encode(bytes, Base64::Proto3)
}

/// Decode standard or URL-safe base64, padded or not (the pipeline's proto3 decoder, unbounded).
pub fn b64_decode(text: &str) -> Result<Vec<u8>, FieldError> {
    pipeline::decode_bounded(text, Base64::Proto3, usize::MAX / 2)
}

/// An upper bound of the decoded size of `len` base64 characters.
pub fn decoded_len_upper_bound(len: usize) -> usize {
    len.div_ceil(4).saturating_mul(3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::access_reason::KnownReason;

    #[test]
    fn accepts_camel_and_snake_case_and_ignores_unknown_fields() {
        let camel: KeyOpRequest = serde_json::from_str(
            r#"{"keyPath":"k","plaintext":"AQI=","additionalAuthenticatedData":"AA","additionalContext":{"relativeResourceName":"projects/p","accessReasonContext":{"reason":"CUSTOMER_INITIATED_ACCESS"},"isKeyHealthCheck":true},"somethingNew":{"x":1}}"#,
        )
        .unwrap();
        let snake: KeyOpRequest = serde_json::from_str(
            r#"{"key_path":"k","plaintext":"AQI=","additional_authenticated_data":"AA","additional_context":{"relative_resource_name":"projects/p","access_reason_context":{"reason":5},"is_key_health_check":true}}"#,
        )
        .unwrap();
        for r in [&camel, &snake] {
            assert_eq!(r.key_path.as_deref(), Some("k"));
            let ctx = r.additional_context.as_ref().unwrap();
            assert_eq!(ctx.relative_resource_name.as_deref(), Some("projects/p"));
            assert_eq!(ctx.is_key_health_check, Some(true));
            assert_eq!(
                RequestContext::access_reason(Some(ctx)),
                Ok(AccessReason::Known(KnownReason::from_code(5).unwrap()))
            );
        }
    }

    #[test]
    fn special_reason_cases() {
        let absent: KeyOpRequest = serde_json::from_str(r#"{"additionalContext":{}}"#).unwrap();
        assert_eq!(
            RequestContext::access_reason(absent.additional_context.as_ref()),
            Ok(AccessReason::Absent)
        );
        let empty: KeyOpRequest =
            serde_json::from_str(r#"{"additionalContext":{"accessReasonContext":{}}}"#).unwrap();
        assert_eq!(
            RequestContext::access_reason(empty.additional_context.as_ref()),
            Ok(AccessReason::Unspecified)
        );
        let unknown: KeyOpRequest = serde_json::from_str(
            r#"{"additionalContext":{"accessReasonContext":{"reason":"BRAND_NEW"}}}"#,
        )
        .unwrap();
        // An unrecognized name is malformed (proto3 JSON); only numbers can be "unknown".
        assert!(RequestContext::access_reason(unknown.additional_context.as_ref()).is_err());
        let number: KeyOpRequest = serde_json::from_str(
            r#"{"additionalContext":{"accessReasonContext":{"reason":"77"}}}"#,
        )
        .unwrap();
        assert_eq!(
            RequestContext::access_reason(number.additional_context.as_ref()),
            Ok(AccessReason::Unknown("77".into()))
        );
    }

    #[test]
    fn base64_forms() {
        assert_eq!(b64_decode("+/8=").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(b64_decode("+/8").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(b64_decode("-_8").unwrap(), vec![0xfb, 0xff]);
        assert!(b64_decode("not base64!").is_err());
        assert_eq!(b64_encode(&[0xfb, 0xff]), "+/8=");
    }
}
