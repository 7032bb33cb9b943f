//! XKS v1 request bodies and response readers for the client, the benchmark and the tests.
//!
//! Bodies are built the way KMS sends them (`specs/xks-v1.md` §2): camelCase fields, standard
//! base64 with padding, a fresh `kmsRequestId` per call. Depends on serde_json, base64 and sha2
//! only; it knows nothing of the server's own types, so tests exercise the real wire format.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// The caller principal the helpers put in `requestMetadata.awsPrincipalArn`.
pub const PRINCIPAL_ARN: &str = "arn:aws:iam::123456789012:user/Alice";

/// A KMS key ARN for tests that do not care which.
pub const KMS_KEY_ARN: &str =
    "arn:aws:kms:us-east-1:123456789012:key/a1b2c3d4-5678-90ab-cdef-111122223333";

/// A fresh, UUID-shaped `kmsRequestId`: process id + a per-process counter. Unique enough to
/// correlate log lines; no randomness needed.
pub fn request_id() -> String {
    // A counter, not configuration: the only process-wide state in the client.
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        (n >> 52) & 0xfff,
        (n >> 40) & 0xfff,
        (n >> 48) & 0xf,
        n & 0xffff_ffff_ffff
    )
}

/// `POST …/health` body (`kmsOperation: KmsHealthCheck`).
pub fn health_body() -> Vec<u8> {
    json!({
        "requestMetadata": {
            "kmsRequestId": request_id(),
            "kmsOperation": "KmsHealthCheck",
        }
    })
    .to_string()
    .into_bytes()
}

/// `POST …/keys/<id>/metadata` body (`kmsOperation: CreateKey`).
pub fn metadata_body() -> Vec<u8> {
    json!({
        "requestMetadata": {
            "awsPrincipalArn": PRINCIPAL_ARN,
            "kmsOperation": "CreateKey",
            "kmsRequestId": request_id(),
        }
    })
    .to_string()
    .into_bytes()
}

/// `POST …/keys/<id>/encrypt` body; `cdiv` asks for a `ciphertextDataIntegrityValue`.
pub fn encrypt_body(key_arn: &str, plaintext: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Vec<u8> {
    let mut body = Map::new();
    body.insert(
        "requestMetadata".into(),
        crypto_metadata(key_arn, "Encrypt"),
    );
    body.insert("plaintext".into(), STANDARD.encode(plaintext).into());
    body.insert("encryptionAlgorithm".into(), "AES_GCM".into());
    if let Some(aad) = aad {
        body.insert(
            "additionalAuthenticatedData".into(),
            STANDARD.encode(aad).into(),
        );
    }
    if cdiv {
        body.insert(
            "ciphertextDataIntegrityValueAlgorithm".into(),
            "SHA_256".into(),
        );
    }
    Value::Object(body).to_string().into_bytes()
}

/// `POST …/keys/<id>/decrypt` body from the fields an encrypt returned.
pub fn decrypt_body(
    key_arn: &str,
    ciphertext: &[u8],
    iv: &[u8],
    tag: &[u8],
    aad: Option<&[u8]>,
    ciphertext_metadata: Option<&[u8]>,
) -> Vec<u8> {
    let mut body = Map::new();
    body.insert(
        "requestMetadata".into(),
        crypto_metadata(key_arn, "Decrypt"),
    );
    body.insert("ciphertext".into(), STANDARD.encode(ciphertext).into());
    body.insert("encryptionAlgorithm".into(), "AES_GCM".into());
    body.insert("initializationVector".into(), STANDARD.encode(iv).into());
    body.insert("authenticationTag".into(), STANDARD.encode(tag).into());
    if let Some(aad) = aad {
        body.insert(
            "additionalAuthenticatedData".into(),
            STANDARD.encode(aad).into(),
        );
    }
    if let Some(meta) = ciphertext_metadata {
        body.insert("ciphertextMetadata".into(), STANDARD.encode(meta).into());
    }
    Value::Object(body).to_string().into_bytes()
}

/// [`decrypt_body`] for the output of an earlier encrypt.
pub fn decrypt_body_for(key_arn: &str, out: &EncryptOutput, aad: Option<&[u8]>) -> Vec<u8> {
    decrypt_body(
        key_arn,
        &out.ciphertext,
        &out.iv,
        &out.tag,
        aad,
        out.ciphertext_metadata.as_deref(),
    )
}

fn crypto_metadata(key_arn: &str, operation: &str) -> Value {
    json!({
        "awsPrincipalArn": PRINCIPAL_ARN,
        "kmsKeyArn": key_arn,
        "kmsOperation": operation,
        "kmsRequestId": request_id(),
    })
}

/// Why a response body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON.
    #[error("response is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A required field is absent or not a string.
    #[error("response lacks string field {0}")]
    Missing(&'static str),
    /// A field is not standard base64.
    #[error("response field {0} is not base64")]
    Base64(&'static str),
}

/// A decoded encrypt response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptOutput {
    /// `ciphertext`.
    pub ciphertext: Vec<u8>,
    /// `initializationVector`.
    pub iv: Vec<u8>,
    /// `authenticationTag`.
    pub tag: Vec<u8>,
    /// `ciphertextMetadata`, if returned.
    pub ciphertext_metadata: Option<Vec<u8>>,
    /// `ciphertextDataIntegrityValue` (decoded SHA-256), if returned.
    pub cdiv: Option<Vec<u8>>,
}

impl EncryptOutput {
    /// The CDIV this output should carry for `aad` (`specs/xks-v1.md` §5.5).
    pub fn expected_cdiv(&self, aad: Option<&[u8]>) -> [u8; 32] {
        cdiv(
            aad.unwrap_or_default(),
            self.ciphertext_metadata.as_deref().unwrap_or_default(),
            &self.iv,
            &self.ciphertext,
            &self.tag,
        )
    }
}

/// Reads an encrypt response body.
pub fn parse_encrypt_response(body: &[u8]) -> Result<EncryptOutput, ParseError> {
    let v: Value = serde_json::from_slice(body)?;
    Ok(EncryptOutput {
        ciphertext: required_b64(&v, "ciphertext")?,
        iv: required_b64(&v, "initializationVector")?,
        tag: required_b64(&v, "authenticationTag")?,
        ciphertext_metadata: optional_b64(&v, "ciphertextMetadata")?,
        cdiv: optional_b64(&v, "ciphertextDataIntegrityValue")?,
    })
}

/// Reads a decrypt response body: the plaintext.
pub fn parse_decrypt_response(body: &[u8]) -> Result<Vec<u8>, ParseError> {
    let v: Value = serde_json::from_slice(body)?;
    required_b64(&v, "plaintext")
}

/// The `errorName` of an error body, if it is one.
pub fn error_name(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("errorName")?.as_str().map(str::to_owned)
}

/// `SHA-256(AAD ‖ ciphertextMetadata ‖ IV ‖ ciphertext ‖ tag)`, no length prefixes.
pub fn cdiv(aad: &[u8], metadata: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [aad, metadata, iv, ciphertext, tag] {
        h.update(part);
    }
    h.finalize().into()
}

fn optional_b64(v: &Value, field: &'static str) -> Result<Option<Vec<u8>>, ParseError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => STANDARD
            .decode(s)
            .map(Some)
            .map_err(|_| ParseError::Base64(field)),
        Some(_) => Err(ParseError::Missing(field)),
    }
}

fn required_b64(v: &Value, field: &'static str) -> Result<Vec<u8>, ParseError> {
    optional_b64(v, field)?.ok_or(ParseError::Missing(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_fresh() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn bodies_have_the_wire_shape() {
        let v: Value =
            serde_json::from_slice(&encrypt_body("arn:k", b"hi", Some(b"aad"), true)).unwrap();
        assert_eq!(v["plaintext"], "aGk=");
        assert_eq!(v["additionalAuthenticatedData"], "YWFk");
        assert_eq!(v["encryptionAlgorithm"], "AES_GCM");
        assert_eq!(v["ciphertextDataIntegrityValueAlgorithm"], "SHA_256");
        assert_eq!(v["requestMetadata"]["kmsKeyArn"], "arn:k");
        assert_eq!(v["requestMetadata"]["kmsOperation"], "Encrypt");
        let v: Value = serde_json::from_slice(&encrypt_body("arn:k", b"", None, false)).unwrap();
        assert!(v.get("additionalAuthenticatedData").is_none());
        assert!(v.get("ciphertextDataIntegrityValueAlgorithm").is_none());

        let v: Value = serde_json::from_slice(&health_body()).unwrap();
        assert_eq!(v["requestMetadata"]["kmsOperation"], "KmsHealthCheck");
        let v: Value = serde_json::from_slice(&metadata_body()).unwrap();
        assert_eq!(v["requestMetadata"]["kmsOperation"], "CreateKey");
        assert!(v["requestMetadata"]["awsPrincipalArn"].is_string());
    }

    #[test]
    fn encrypt_output_round_trips_into_decrypt() {
        let resp = br#"{"ciphertext":"ghxkK1txeDNn3q8Y","initializationVector":"HMrlRw85cAJUd5Ax","authenticationTag":"vBxN2ncH1oEkR8WVXpmyYQ==","ciphertextMetadata":"a2V5X3ZlcnNpb249MQ==","ciphertextDataIntegrityValue":"qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="}"#;
        let out = parse_encrypt_response(resp).unwrap();
        assert_eq!(
            out.ciphertext_metadata.as_deref(),
            Some(&b"key_version=1"[..])
        );
        // The spec's CDIV test vector (specs/xks-v1.md §5.5).
        let aad = b"project=nile,department=marketing";
        assert_eq!(out.cdiv.as_deref(), Some(&out.expected_cdiv(Some(aad))[..]));
        let v: Value = serde_json::from_slice(&decrypt_body_for("arn:k", &out, Some(aad))).unwrap();
        assert_eq!(v["initializationVector"], "HMrlRw85cAJUd5Ax");
        assert_eq!(v["ciphertextMetadata"], "a2V5X3ZlcnNpb249MQ==");
        assert_eq!(v["requestMetadata"]["kmsOperation"], "Decrypt");

        assert_eq!(
            parse_decrypt_response(br#"{"plaintext":"aGk="}"#).unwrap(),
            b"hi"
        );
        assert!(matches!(
            parse_decrypt_response(b"{}"),
            Err(ParseError::Missing("plaintext"))
        ));
        assert!(matches!(
            parse_decrypt_response(br#"{"plaintext":"*"}"#),
            Err(ParseError::Base64("plaintext"))
        ));
        assert_eq!(
            error_name(br#"{"errorName":"ValidationException"}"#).as_deref(),
            Some("ValidationException")
        );
        assert_eq!(error_name(b"pong"), None);
    }
}
