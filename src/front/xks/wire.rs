//! XKS v1 wire types: request bodies as received (borrowed where possible) and response bodies.
//!
//! Parsing is permissive about unknown fields and strict about nothing else: presence of
//! required fields and base64 are checked by the handler, so it can name the exact field in its
//! ValidationException. Values such as ARNs or request ids are never format-checked (spec §4).
//! Request types also serialize (to their own field names) so fuzzing can check that a body that
//! parses re-serializes to a fixed point.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::authz::decide::XksMetadata;
use crate::front::pipeline::{self, Base64, FieldError};

/// A JSON string field, borrowed from the body unless it contained escapes.
pub type Field<'a> = Option<Cow<'a, str>>;

/// `requestMetadata`: every field optional at parse time; the handler enforces what each API requires.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata<'a> {
    /// Caller of the KMS API.
    #[serde(borrow, default)]
    pub aws_principal_arn: Field<'a>,
    /// Source VPC (VPC endpoint calls only).
    #[serde(borrow, default)]
    pub aws_source_vpc: Field<'a>,
    /// Source VPC endpoint.
    #[serde(borrow, default)]
    pub aws_source_vpce: Field<'a>,
    /// KMS key ARN.
    #[serde(borrow, default)]
    pub kms_key_arn: Field<'a>,
    /// KMS operation name.
    #[serde(borrow, default)]
    pub kms_operation: Field<'a>,
    /// KMS request id (log it; opaque).
    #[serde(borrow, default)]
    pub kms_request_id: Field<'a>,
    /// AWS service acting for the caller.
    #[serde(borrow, default)]
    pub kms_via_service: Field<'a>,
}

impl<'a> RequestMetadata<'a> {
    /// The metadata as authorization sees it.
    pub fn authz(&self) -> XksMetadata<'_> {
        XksMetadata {
            aws_principal_arn: self.aws_principal_arn.as_deref(),
            aws_source_vpc: self.aws_source_vpc.as_deref(),
            aws_source_vpce: self.aws_source_vpce.as_deref(),
            kms_key_arn: self.kms_key_arn.as_deref(),
            kms_operation: self.kms_operation.as_deref(),
            kms_request_id: self.kms_request_id.as_deref(),
            kms_via_service: self.kms_via_service.as_deref(),
        }
    }

    /// The attributes authorization rules may name, in their XKS spelling.
    pub fn attributes(&self) -> [(&'static str, Option<&str>); 7] {
        self.authz().attributes()
    }
}

/// GetHealthStatus and GetKeyMetadata bodies (only `requestMetadata`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOnlyRequest<'a> {
    /// Required.
    #[serde(borrow, default)]
    pub request_metadata: Option<RequestMetadata<'a>>,
}

/// Encrypt body.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest<'a> {
    /// Required.
    #[serde(borrow, default)]
    pub request_metadata: Option<RequestMetadata<'a>>,
    /// Required, base64. Never logged.
    #[serde(borrow, default)]
    pub plaintext: Field<'a>,
    /// Required, `AES_GCM`.
    #[serde(borrow, default)]
    pub encryption_algorithm: Field<'a>,
    /// Optional, base64.
    #[serde(borrow, default)]
    pub additional_authenticated_data: Field<'a>,
    /// Optional, `SHA_256`.
    #[serde(borrow, default)]
    pub ciphertext_data_integrity_value_algorithm: Field<'a>,
}

/// Decrypt body.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest<'a> {
    /// Required.
    #[serde(borrow, default)]
    pub request_metadata: Option<RequestMetadata<'a>>,
    /// Required, base64.
    #[serde(borrow, default)]
    pub ciphertext: Field<'a>,
    /// Optional, base64, ≤ 20 bytes.
    #[serde(borrow, default)]
    pub ciphertext_metadata: Field<'a>,
    /// Required, `AES_GCM`.
    #[serde(borrow, default)]
    pub encryption_algorithm: Field<'a>,
    /// Optional, base64.
    #[serde(borrow, default)]
    pub additional_authenticated_data: Field<'a>,
    /// Required, base64, 12 or 16 bytes.
    #[serde(borrow, default)]
    pub initialization_vector: Field<'a>,
    /// Required, base64, 16 bytes.
    #[serde(borrow, default)]
    pub authentication_tag: Field<'a>,
}

/// GetHealthStatus response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse<'a> {
    /// Proxy instances behind the endpoint.
    pub xks_proxy_fleet_size: u32,
    /// Proxy vendor.
    pub xks_proxy_vendor: &'a str,
    /// Proxy product and version.
    pub xks_proxy_model: &'a str,
    /// HSM vendor.
    pub ekm_vendor: &'a str,
    /// One entry per HSM.
    pub ekm_fleet_details: Vec<EkmFleetDetail<'a>>,
}

/// One HSM in the health response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EkmFleetDetail<'a> {
    /// Unique id of the HSM instance.
    pub id: &'a str,
    /// Product, versions.
    pub model: &'a str,
    /// `ACTIVE`, `DEGRADED` or `UNAVAILABLE`.
    pub health_status: &'a str,
}

/// GetKeyMetadata response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyMetadataResponse<'a> {
    /// e.g. `AES_256`.
    pub key_spec: &'a str,
    /// e.g. `["ENCRYPT","DECRYPT"]`.
    pub key_usage: Vec<&'static str>,
    /// `ENABLED` or `DISABLED`.
    pub key_status: &'static str,
}

/// Encrypt response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    /// base64
    pub ciphertext: String,
    /// base64 (≤ 20 bytes decoded); omitted when empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_metadata: Option<String>,
    /// base64, 12 bytes.
    pub initialization_vector: String,
    /// base64, 16 bytes.
    pub authentication_tag: String,
    /// base64 SHA-256, when requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value: Option<String>,
}

/// Decrypt response.
#[derive(Serialize)]
pub struct DecryptResponse<'a> {
    /// base64 of the plaintext. Never logged (no `Debug`).
    pub plaintext: &'a str,
}

/// Strict base64 (RFC 4648 §4, standard alphabet, canonical padding): the pipeline's decoder,
/// unbounded.
pub fn b64_decode(s: &str) -> Result<Vec<u8>, FieldError> {
    pipeline::decode_bounded(s, Base64::Standard, usize::MAX / 2)
}

/// Standard base64 with padding.
pub fn b64_encode(bytes: &[u8]) -> String {
    pipeline::encode(bytes, Base64::Standard)
}

/// The decoded length of a base64 string of `encoded_len` characters, rounded up: a cheap
/// pre-check so oversize inputs are refused before decoding.
pub fn decoded_len_upper_bound(encoded_len: usize) -> usize {
    encoded_len.div_ceil(4) * 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant_parse() {
        let body = br#"{"requestMetadata":{"kmsRequestId":"r-1","kmsOperation":"Encrypt","newField":{"x":1}},"plaintext":"AA==","encryptionAlgorithm":"AES_GCM","extra":[1,2]}"#;
        let req: EncryptRequest<'_> = serde_json::from_slice(body).unwrap();
        let md = req.request_metadata.unwrap();
        assert_eq!(md.kms_request_id.as_deref(), Some("r-1"));
        assert!(md.aws_principal_arn.is_none());
        assert_eq!(req.plaintext.as_deref(), Some("AA=="));
    }

    #[test]
    fn escaped_base64_is_accepted() {
        let body = br#"{"plaintext":"a\/b+"}"#;
        let req: EncryptRequest<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(req.plaintext.as_deref(), Some("a/b+"));
    }

    #[test]
    fn strict_base64() {
        assert_eq!(b64_decode("AAEC").unwrap(), vec![0, 1, 2]);
        assert!(b64_decode("AAE").is_err(), "padding required");
        assert!(b64_decode("AA-_").is_err(), "url-safe alphabet refused");
        assert!(
            b64_decode("AB==").is_err(),
            "non-canonical trailing bits refused"
        );
        assert!(decoded_len_upper_bound(8) >= 6);
    }
}
