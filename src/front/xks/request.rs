//! The first stage of an XKS request after authentication: the JSON body parsed into the API's
//! request type with its `requestMetadata` checked, which is when the request's id is known and
//! whether it is a key operation (audited). The operations (`ops`) take it from here; the field
//! helpers they share live here too.

use super::error::{XksError, XksErrorName as N};
use super::wire::{self, RequestMetadata};
use crate::audit;
use crate::core::framing::{self, AadFraming};
use crate::front::pipeline::{self, Base64, FieldError, JsonError};

/// Which API a path names (with its key id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api<'p> {
    Health,
    Metadata(&'p str),
    Encrypt(&'p str),
    Decrypt(&'p str),
}

impl<'p> Api<'p> {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Api::Health => "health",
            Api::Metadata(_) => "metadata",
            Api::Encrypt(_) => "encrypt",
            Api::Decrypt(_) => "decrypt",
        }
    }

    pub(super) fn key(&self) -> Option<&'p str> {
        match self {
            Api::Health => None,
            Api::Metadata(k) | Api::Encrypt(k) | Api::Decrypt(k) => Some(k),
        }
    }
}

/// `requestMetadata` fields Encrypt and Decrypt require.
const KEY_OP_METADATA: &[&str] = &[
    "awsPrincipalArn",
    "kmsKeyArn",
    "kmsOperation",
    "kmsRequestId",
];
/// Longest `requestMetadata` string accepted (the longest ARN IAM allows).
const MAX_METADATA_FIELD: usize = 2048;

/// A parsed body whose `requestMetadata` has what its API requires.
pub(super) enum XksRequest<'a> {
    /// GetHealthStatus: exempt from secondary authorization, but `kmsRequestId` and
    /// `kmsOperation` are still required (clients in the field test it).
    Health(RequestMetadata<'a>),
    /// GetKeyMetadata.
    Metadata(RequestMetadata<'a>),
    /// Encrypt.
    Encrypt(wire::EncryptRequest<'a>, RequestMetadata<'a>),
    /// Decrypt.
    Decrypt(wire::DecryptRequest<'a>, RequestMetadata<'a>),
}

impl<'a> XksRequest<'a> {
    /// Parse `body` as `api`'s request and check its metadata.
    pub(super) fn parse(api: Api<'_>, body: &'a [u8]) -> Result<Self, XksError> {
        Ok(match api {
            Api::Health => {
                let parsed: wire::MetadataOnlyRequest<'_> = parse(body)?;
                let md =
                    required_metadata(parsed.request_metadata, &["kmsRequestId", "kmsOperation"])?;
                XksRequest::Health(md)
            }
            Api::Metadata(_) => {
                let parsed: wire::MetadataOnlyRequest<'_> = parse(body)?;
                let md = required_metadata(
                    parsed.request_metadata,
                    &["awsPrincipalArn", "kmsOperation", "kmsRequestId"],
                )?;
                XksRequest::Metadata(md)
            }
            Api::Encrypt(_) => {
                let mut parsed: wire::EncryptRequest<'_> = parse(body)?;
                let md = required_metadata(parsed.request_metadata.take(), KEY_OP_METADATA)?;
                XksRequest::Encrypt(parsed, md)
            }
            Api::Decrypt(_) => {
                let mut parsed: wire::DecryptRequest<'_> = parse(body)?;
                let md = required_metadata(parsed.request_metadata.take(), KEY_OP_METADATA)?;
                XksRequest::Decrypt(parsed, md)
            }
        })
    }

    /// The metadata.
    pub(super) fn metadata(&self) -> &RequestMetadata<'a> {
        match self {
            XksRequest::Health(md)
            | XksRequest::Metadata(md)
            | XksRequest::Encrypt(_, md)
            | XksRequest::Decrypt(_, md) => md,
        }
    }

    /// `kmsRequestId`, bounded for logs.
    pub(super) fn request_id(&self) -> String {
        audit::bounded(self.metadata().kms_request_id.as_deref().unwrap_or("-")).into_owned()
    }

    /// Whether this is a key operation (its log line is an audit event).
    pub(super) fn is_key_operation(&self) -> bool {
        !matches!(self, XksRequest::Health(_))
    }
}

fn parse<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    pipeline::parse_json(body).map_err(|e| {
        XksError::new(
            N::Validation,
            match e {
                JsonError::WrongShape => "a field has the wrong type",
                JsonError::NotJson => "request body is not valid JSON",
            },
        )
    })
}

fn required_metadata<'a>(
    md: Option<RequestMetadata<'a>>,
    required: &[&str],
) -> Result<RequestMetadata<'a>, XksError> {
    let md = md.ok_or_else(|| XksError::new(N::Validation, "requestMetadata is required"))?;
    let attributes = md.attributes();
    // ARNs are at most 2048 characters and request ids are UUIDs: anything far longer is not
    // from KMS, and is refused before it reaches a log line or a policy rule.
    if let Some((name, _)) = attributes
        .iter()
        .find(|(_, v)| v.is_some_and(|v| v.len() > MAX_METADATA_FIELD))
    {
        return Err(XksError::new(
            N::Validation,
            format!("requestMetadata.{name} is longer than {MAX_METADATA_FIELD} bytes"),
        ));
    }
    for name in required {
        let present = attributes.iter().any(|(n, v)| n == name && v.is_some());
        if !present {
            return Err(XksError::new(
                N::Validation,
                format!("requestMetadata.{name} is required"),
            ));
        }
    }
    Ok(md)
}

/// `encryptionAlgorithm` must be `AES_GCM`.
pub(super) fn require_algorithm(alg: Option<&str>) -> Result<(), XksError> {
    match alg {
        Some("AES_GCM") => Ok(()),
        Some(_) => Err(XksError::new(
            N::Validation,
            "encryptionAlgorithm must be AES_GCM",
        )),
        None => Err(XksError::new(
            N::Validation,
            "encryptionAlgorithm is required",
        )),
    }
}

/// Decode a required base64 field, refusing (before decoding) anything above `max` bytes.
pub(super) fn decode_field(
    name: &str,
    value: Option<&str>,
    max: usize,
) -> Result<Vec<u8>, XksError> {
    let value = value.ok_or_else(|| XksError::new(N::Validation, format!("{name} is required")))?;
    decode_bounded(name, value, max)
}

/// Decode an optional base64 field.
pub(super) fn decode_optional(
    name: &str,
    value: Option<&str>,
    max: usize,
) -> Result<Option<Vec<u8>>, XksError> {
    value.map(|v| decode_bounded(name, v, max)).transpose()
}

fn decode_bounded(name: &str, value: &str, max: usize) -> Result<Vec<u8>, XksError> {
    pipeline::decode_bounded(value, Base64::Standard, max).map_err(|e| {
        let error = match e {
            FieldError::Invalid => N::Validation,
            // The spec's answer to input above the proxy's own limits.
            FieldError::TooLarge { .. } => N::UnsupportedOperation,
        };
        XksError::new(error, e.message(name, Base64::Standard))
    })
}

/// The cipher's AAD for `framing`.
pub(super) fn frame(
    framing: AadFraming,
    aad: Option<&[u8]>,
    metadata: &[u8],
) -> Result<Vec<u8>, XksError> {
    framing::full_aad(framing, aad, metadata).map_err(|e| match e {
        framing::FramingError::AadTooLong => XksError::new(
            N::UnsupportedOperation,
            "additionalAuthenticatedData exceeds 65535 bytes",
        ),
        framing::FramingError::MetadataTooLong => {
            XksError::new(N::Validation, "ciphertextMetadata is too long")
        }
    })
}
