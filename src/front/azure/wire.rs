//! The EKM Proxy API 0.1-preview request and response bodies (JSON, snake_case).
//!
//! Request types borrow from the body where they can; unknown fields are ignored (Azure may add
//! some), required ones are checked by serde and by the handler. Binary fields are base64url
//! without padding (RFC 7515) and are decoded by the handler, which can name the field.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// The only API version this front speaks.
pub const API_VERSION: &str = "0.1-preview";

/// Longest `request_context` string accepted (ids are GUIDs, pool names are short).
pub const MAX_CONTEXT_FIELD: usize = 256;

/// `request_context`, carried by every body.
#[derive(Debug, Deserialize)]
pub struct RequestContext<'a> {
    /// Optional.
    #[serde(borrow, default)]
    pub request_id: Option<Cow<'a, str>>,
    /// Required.
    #[serde(borrow)]
    pub correlation_id: Option<Cow<'a, str>>,
    /// Required.
    #[serde(borrow)]
    pub pool_name: Option<Cow<'a, str>>,
}

/// `/info` and `/{key}/metadata`.
#[derive(Debug, Deserialize)]
pub struct ContextOnlyRequest<'a> {
    /// Required.
    #[serde(borrow)]
    pub request_context: Option<RequestContext<'a>>,
}

/// `/{key}/wrapkey` and `/{key}/unwrapkey`.
#[derive(Debug, Deserialize)]
pub struct WrapRequest<'a> {
    /// Required.
    #[serde(borrow)]
    pub request_context: Option<RequestContext<'a>>,
    /// Required: `A256KW`, `A256KWP`, `RSA-OAEP` or `RSA-OAEP-256`.
    #[serde(borrow)]
    pub alg: Option<Cow<'a, str>>,
    /// Required, base64url. The key material to wrap, or the wrapped value. Never logged.
    #[serde(borrow)]
    pub value: Option<Cow<'a, str>>,
}

/// `/info` answer.
#[derive(Debug, Serialize)]
pub struct InfoResponse<'a> {
    /// Always [`API_VERSION`].
    pub api_version: &'static str,
    /// Who makes the proxy.
    pub proxy_vendor: &'a str,
    /// The proxy's name and version.
    pub proxy_name: &'a str,
    /// Who makes the HSM behind it.
    pub ekm_vendor: &'a str,
    /// The HSM product.
    pub ekm_product: &'a str,
    /// The wrapping algorithms the HSM supports, found by trial at start (an addition to the
    /// API's fields, for operators).
    pub supported_algorithms: Vec<&'static str>,
}

/// `/{key}/metadata` answer.
#[derive(Debug, Serialize)]
pub struct MetadataResponse {
    /// `oct` or `RSA`.
    pub key_type: &'static str,
    /// Bits.
    pub key_size: u32,
    /// `wrapKey` and/or `unwrapKey`: what the key's attributes allow on this HSM.
    pub key_ops: Vec<&'static str>,
    /// RSA modulus, base64url.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA public exponent, base64url.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

/// `/{key}/wrapkey` and `/{key}/unwrapkey` answer.
#[derive(Serialize)]
pub struct ValueResponse<'a> {
    /// base64url of the result. Never logged.
    pub value: &'a str,
}

/// Every error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// A stable code.
    pub code: &'a str,
    /// A short, safe message.
    pub message: &'a str,
}
