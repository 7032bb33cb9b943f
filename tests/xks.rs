//! XKS v1 end to end: the real server in-process (real TLS and mTLS listeners, real config
//! parser) against a fresh SoftHSMv2 token per test, driven through the wire like KMS drives it.
//!
//! Covers every API (specs/xks-v1.md §2), every error row of the error model (§3) with its exact
//! HTTP status and `errorName`, both AAD framings checked independently of the proxy's own framing
//! code (§5.3, by decrypting and encrypting with the HSM backend directly and the full AAD built
//! here), CDIV (§5.5), SigV4 (§7.1, including an interop run with curl's independent signer),
//! mTLS rejections (§7.3), custody checks, reload, the kill switch, throttling, metrics and HSM
//! session recovery.
//!
//! Nothing here asserts on elapsed time: where an effect is asynchronous (the kill-switch file
//! watcher, a metric bumped after the client saw the answer, sessions reconnecting) the test polls
//! for it with a generous upper bound.

// Helpers outside `#[test]` functions assert too: failing loudly is their job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use ekm_proxy::auth::sigv4;
use ekm_proxy::client::xks::{self, EncryptOutput};
use ekm_proxy::client::{ClientError, Response, SignOptions, XksClient, XksConnector};
use ekm_proxy::core::{AeadDecrypt, AeadEncrypt, Backend as _, CryptoError};
use ekm_proxy::dev::certs::{Authority, Validity, self_signed_client};
use ekm_proxy::hsm::bootstrap::{KeySpec, generate_key};
use ekm_proxy::secret::SecretString;
use http::HeaderValue;
use http::header::{CONTENT_TYPE, HOST};
use http_body_util::Full;
use rustls::AlertDescription;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use common::proxy::{
    ACCESS_KEY_ID, ACCESS_KEY_ID_2, CLIENT_SUBJECT, PREFIX, ProxyOptions, SECRET, SECRET_2,
    TestProxy,
};
use common::softhsm::TestToken;

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

const ARN: &str = xks::KMS_KEY_ARN;
const KEY: &str = "dev-aes-1";
const ENC_ONLY: &str = "dev-aes-encrypt-only";
const DEC_ONLY: &str = "dev-aes-decrypt-only";
const NO_USAGE: &str = "dev-aes-no-usage";
/// Plaintext of requests expected to fail: no error body may echo it.
const MARKER: &[u8] = b"TOP-SECRET-PLAINTEXT-MARKER-0123456789";
/// The spec's AAD example (§5.3).
const SPEC_AAD: &[u8] = b"project=nile,department=marketing";
/// The `ciphertextMetadata` the spec framing writes: its format-version byte.
const SPEC_METADATA: &[u8] = &[0x01];
/// Upper bound for every "wait until the effect shows" loop.
const POLL_LIMIT: Duration = Duration::from_secs(10);

/// Another `[[xks.key_store]]` (appended after the default one), exposing dev-aes-1 and
/// dev-aes-decrypt-only, with the first credential only; `extra` adds keys such as
/// `aad_framing = "aws-sample"`.
fn extra_store(name: &str, prefix: &str, extra: &str) -> String {
    format!(
        r#"
[[xks.key_store]]
name = "{name}"
path_prefix = "{prefix}"
regions = ["us-east-1"]
keys = ["{KEY}", "{DEC_ONLY}"]
{extra}
[[xks.key_store.credential]]
access_key_id = "{ACCESS_KEY_ID}"
secret = "{SECRET}"
"#
    )
}

fn op(key: &str, op: &str) -> String {
    format!("keys/{key}/{op}")
}

fn second_credential() -> SignOptions {
    SignOptions {
        access_key_id: Some(ACCESS_KEY_ID_2.into()),
        secret: Some(SecretString::from(SECRET_2)),
        ..Default::default()
    }
}

async fn post(c: &mut XksClient, suffix: &str, body: impl Into<Bytes>) -> Response {
    c.post(suffix, body)
        .await
        .unwrap_or_else(|e| panic!("POST {suffix}: {e}"))
}

async fn post_with(
    c: &mut XksClient,
    suffix: &str,
    body: impl Into<Bytes>,
    opts: &SignOptions,
) -> Response {
    c.post_with(suffix, body, opts)
        .await
        .unwrap_or_else(|e| panic!("POST {suffix}: {e}"))
}

async fn health(c: &mut XksClient) -> Response {
    post(c, "health", xks::health_body()).await
}

async fn metadata(c: &mut XksClient, key: &str) -> Response {
    post(c, &op(key, "metadata"), xks::metadata_body()).await
}

async fn encrypt(
    c: &mut XksClient,
    key: &str,
    plaintext: &[u8],
    aad: Option<&[u8]>,
    cdiv: bool,
) -> Response {
    post(
        c,
        &op(key, "encrypt"),
        xks::encrypt_body(ARN, plaintext, aad, cdiv),
    )
    .await
}

async fn decrypt(
    c: &mut XksClient,
    key: &str,
    out: &EncryptOutput,
    aad: Option<&[u8]>,
) -> Response {
    post(c, &op(key, "decrypt"), xks::decrypt_body_for(ARN, out, aad)).await
}

async fn encrypt_ok(
    c: &mut XksClient,
    key: &str,
    plaintext: &[u8],
    aad: Option<&[u8]>,
) -> EncryptOutput {
    let r = encrypt(c, key, plaintext, aad, false).await;
    assert_ok(&r, &format!("encrypt with {key}"));
    let out = xks::parse_encrypt_response(&r.body).expect("encrypt response");
    assert_eq!(
        out.ciphertext.len(),
        plaintext.len(),
        "ciphertext length == plaintext length"
    );
    assert_eq!(out.iv.len(), 12, "96-bit IV");
    assert_eq!(out.tag.len(), 16, "128-bit tag");
    out
}

async fn decrypt_ok(
    c: &mut XksClient,
    key: &str,
    out: &EncryptOutput,
    aad: Option<&[u8]>,
) -> Vec<u8> {
    let r = decrypt(c, key, out, aad).await;
    assert_ok(&r, &format!("decrypt with {key}"));
    xks::parse_decrypt_response(&r.body).expect("decrypt response")
}

/// One change to a JSON request body.
type Mutation = Box<dyn Fn(&mut Value)>;

/// A PEM certificate and its PEM private key.
type PemPair = (String, String);

/// A JSON body with one change applied.
fn mutate(body: Vec<u8>, f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&body).expect("body is JSON");
    f(&mut v);
    serde_json::to_vec(&v).expect("serialize")
}

/// The response is JSON with `Content-Type: application/json`, on one line, without any
/// whitespace between tokens.
#[track_caller]
fn assert_compact_json(r: &Response, ctx: &str) -> Value {
    assert_eq!(
        r.headers
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("?")),
        Some("application/json"),
        "{ctx}: content type"
    );
    let (mut in_string, mut escaped) = (false, false);
    for &b in r.body.iter() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else {
            assert!(
                !b.is_ascii_whitespace(),
                "{ctx}: JSON is not compact: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{ctx}: body is not JSON ({e}): {:?}", r.body))
}

#[track_caller]
fn assert_ok(r: &Response, ctx: &str) -> Value {
    assert_eq!(r.status, 200, "{ctx}: {}", String::from_utf8_lossy(&r.body));
    assert_compact_json(r, ctx)
}

/// Exact status and `errorName`, and a well-formed error body: compact JSON object, `errorName`
/// a string, `errorMessage` (if any) < 512 printable ASCII characters, and no secret or
/// plaintext echoed.
#[track_caller]
fn assert_error(r: &Response, status: u16, name: &str, ctx: &str) {
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(
        (r.status, r.error_name().as_deref()),
        (status, Some(name)),
        "{ctx}: body {text}"
    );
    let v = assert_compact_json(r, ctx);
    let obj = v.as_object().expect("error body is an object");
    assert!(obj["errorName"].is_string(), "{ctx}");
    if let Some(msg) = obj.get("errorMessage") {
        let msg = msg.as_str().expect("errorMessage is a string");
        assert!(msg.len() < 512, "{ctx}: errorMessage too long");
        assert!(
            msg.bytes().all(|b| (0x20..=0x7e).contains(&b)),
            "{ctx}: errorMessage not printable ASCII: {msg:?}"
        );
    }
    let marker_b64 = B64.encode(MARKER);
    for secret in [SECRET, SECRET_2, "TOP-SECRET", marker_b64.as_str()] {
        assert!(!text.contains(secret), "{ctx}: error body leaks {secret:?}");
    }
}

/// The `errorMessage` of an error body (empty when absent).
fn error_message(r: &Response) -> String {
    r.json()
        .ok()
        .and_then(|v| v.get("errorMessage")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Poll `probe` until `done` holds for its result, at most [`POLL_LIMIT`].
async fn poll_until<T, F, Fut>(what: &str, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not observed within {POLL_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client of the key store under `prefix` on the TLS listener.
async fn client_for_prefix(proxy: &TestProxy, prefix: &str) -> XksClient {
    let mut cfg = proxy.client_config("tls");
    cfg.prefix = prefix.into();
    XksClient::connect(Arc::new(cfg)).await.expect("connect")
}

/// The spec's full AAD (§5.3), built here independently of `core::framing`.
fn spec_full_aad(aad: Option<&[u8]>, metadata: &[u8]) -> Vec<u8> {
    let aad = aad.unwrap_or_default();
    let mut out = (aad.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(aad);
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// The AWS sample proxy's full AAD: SHA-256 of the AAD in place of the AAD whenever the field
/// is present (even empty), behind the original length.
fn aws_sample_full_aad(aad: Option<&[u8]>, metadata: &[u8]) -> Vec<u8> {
    let mut out = (aad.map_or(0, <[u8]>::len) as u16).to_be_bytes().to_vec();
    if let Some(aad) = aad {
        out.extend_from_slice(&Sha256::digest(aad));
    }
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

fn sha256_concat(parts: &[&[u8]]) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().to_vec()
}

/// Decrypt directly with the HSM backend, giving the cipher exactly `full_aad`.
async fn backend_decrypt(
    proxy: &TestProxy,
    key: &str,
    out: &EncryptOutput,
    full_aad: Vec<u8>,
) -> Result<Vec<u8>, CryptoError> {
    let tag: [u8; 16] = out.tag.clone().try_into().expect("16-byte tag");
    proxy
        .running()
        .service()
        .backend()
        .aead_decrypt(AeadDecrypt {
            key: key.into(),
            iv: out.iv.clone(),
            ciphertext: out.ciphertext.clone(),
            tag,
            aad: full_aad,
        })
        .await
        .map(|p| p.to_vec())
}

/// Encrypt directly with the HSM backend under `full_aad`, as another implementation with the
/// same key would have.
async fn backend_encrypt(
    proxy: &TestProxy,
    key: &str,
    plaintext: &[u8],
    full_aad: Vec<u8>,
    metadata: Option<&[u8]>,
) -> EncryptOutput {
    let sealed = proxy
        .running()
        .service()
        .backend()
        .aead_encrypt(AeadEncrypt {
            key: key.into(),
            plaintext: zeroize::Zeroizing::new(plaintext.to_vec()),
            aad: full_aad,
        })
        .await
        .expect("backend encrypt");
    EncryptOutput {
        ciphertext: sealed.ciphertext.clone(),
        iv: sealed.iv.clone(),
        tag: sealed.tag.to_vec(),
        ciphertext_metadata: metadata.map(<[u8]>::to_vec),
        cdiv: None,
    }
}

/// `Token info` of the token labelled `label`, as `softhsm2-util --show-slots` (a separate
/// process, so an independent view) prints it.
fn token_info(label: &str) -> HashMap<String, String> {
    let out = std::process::Command::new("softhsm2-util")
        .arg("--show-slots")
        .output()
        .expect("softhsm2-util runs");
    assert!(out.status.success(), "softhsm2-util --show-slots failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut blocks: Vec<HashMap<String, String>> = Vec::new();
    let mut in_token = false;
    for line in text.lines() {
        if line.starts_with("Slot ") {
            blocks.push(HashMap::new());
            in_token = false;
        } else if line.trim() == "Token info:" {
            in_token = true;
        } else if line.trim() == "Slot info:" {
            in_token = false;
        } else if in_token
            && let (Some(block), Some((k, v))) = (blocks.last_mut(), line.split_once(':'))
        {
            block.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    blocks
        .into_iter()
        .find(|b| b.get("Label").map(String::as_str) == Some(label))
        .unwrap_or_else(|| panic!("softhsm2-util shows no token {label}:\n{text}"))
}

/// Sign a request for `signed_path` and send it to `sent_path` (a tampered path).
async fn send_signed_elsewhere(
    c: &mut XksClient,
    host: &str,
    signed_path: &str,
    sent_path: &str,
    body: Vec<u8>,
) -> Response {
    let mut headers = http::HeaderMap::new();
    headers.insert(HOST, HeaderValue::from_str(host).unwrap());
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    sigv4::sign(
        "POST",
        signed_path,
        "",
        &mut headers,
        &body,
        &["host", "x-amz-date"],
        ACCESS_KEY_ID,
        &SecretString::from(SECRET),
        "us-east-1",
        "kms-xks-proxy",
        SystemTime::now(),
    )
    .expect("sign");
    let mut req = http::Request::post(sent_path)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    *req.headers_mut() = headers;
    c.send_raw(req).await.expect("send")
}

/// A request with any method, unsigned, to a full path.
async fn send_method(c: &mut XksClient, host: &str, method: http::Method, path: &str) -> Response {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.send_raw(req).await.expect("send")
}

fn host_of(proxy: &TestProxy, listener: &str) -> String {
    proxy.client_config(listener).host
}

fn base(prefix: &str) -> String {
    format!("{prefix}/kms/xks/v1")
}

// ---------------------------------------------------------------------------------------------
// The four APIs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_real_token() {
    let proxy = TestProxy::start_with(ProxyOptions {
        tables: "[xks]\nfleet_size = 3\nvendor = \"Acme Key Services\"\n".into(),
        ..Default::default()
    })
    .await;
    let mut c = proxy.tls_client().await;
    let r = health(&mut c).await;
    let v = assert_ok(&r, "health");
    let token = token_info(&proxy.token.label);

    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for field in [
        "xksProxyFleetSize",
        "xksProxyVendor",
        "xksProxyModel",
        "ekmVendor",
        "ekmFleetDetails",
    ] {
        assert!(keys.contains(&field), "health lacks {field}: {v}");
    }
    assert_eq!(v["xksProxyFleetSize"], 3);
    assert_eq!(v["xksProxyVendor"], "Acme Key Services");
    let model = v["xksProxyModel"].as_str().unwrap();
    assert!(
        model.starts_with("ekm-proxy") && model.contains(env!("CARGO_PKG_VERSION")),
        "{model}"
    );
    assert_eq!(
        v["ekmVendor"].as_str(),
        Some(token["Manufacturer ID"].as_str())
    );
    let fleet = v["ekmFleetDetails"].as_array().unwrap();
    assert_eq!(fleet.len(), 1, "{v}");
    assert_eq!(
        fleet[0]["id"].as_str(),
        Some(token["Serial number"].as_str())
    );
    assert_eq!(fleet[0]["healthStatus"], "ACTIVE");
    let ekm_model = fleet[0]["model"].as_str().unwrap();
    assert!(ekm_model.contains(&token["Model"]), "{ekm_model}");
    assert!(ekm_model.contains(&proxy.token.label), "{ekm_model}");
    let versions = format!(
        "hw {} fw {}",
        token["Hardware version"], token["Firmware version"]
    );
    assert!(ekm_model.contains(&versions), "{ekm_model} vs {versions}");

    // Every kmsOperation KMS sends, and ones it may add later, are accepted (§2.1).
    for operation in [
        "CreateCustomKeyStore",
        "ConnectCustomKeyStore",
        "UpdateCustomKeyStore",
        "KmsHealthCheck",
        "SomeFutureOperation",
    ] {
        let body = json!({"requestMetadata": {"kmsRequestId": "r", "kmsOperation": operation}});
        let r = post(&mut c, "health", body.to_string()).await;
        assert_ok(&r, operation);
    }
    // The second credential works on health too.
    let r = post_with(&mut c, "health", xks::health_body(), &second_credential()).await;
    assert_ok(&r, "health with the second credential");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_reports_the_true_usage_of_each_key() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    for (key, usage) in [
        (KEY, vec!["DECRYPT", "ENCRYPT"]),
        (ENC_ONLY, vec!["ENCRYPT"]),
        (DEC_ONLY, vec!["DECRYPT"]),
        (NO_USAGE, vec![]),
    ] {
        let r = metadata(&mut c, key).await;
        let v = assert_ok(&r, key);
        assert_eq!(v["keySpec"], "AES_256", "{key}");
        assert_eq!(v["keyStatus"], "ENABLED", "{key}");
        let mut got: Vec<&str> = v["keyUsage"]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: keyUsage is not an array: {v}"))
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, usage, "{key}");
    }
    // Older clients (DescribeKey with kmsKeyArn), service principals, unknown fields, values in
    // odd formats: all accepted, none format-checked (§4).
    let body = json!({"requestMetadata": {
        "awsPrincipalArn": "AWS Internal",
        "kmsOperation": "DescribeKey",
        "kmsRequestId": "not-a-uuid",
        "kmsKeyArn": "arn:aws:kms:us-east-2:123456789012:/key/broken",
        "kmsViaService": "ebs",
        "someFutureField": {"nested": [1, 2]},
    }, "anotherTopLevelField": true});
    let r = post(&mut c, &op(KEY, "metadata"), body.to_string()).await;
    assert_eq!(assert_ok(&r, "tolerant metadata")["keySpec"], "AES_256");
    let r = post_with(
        &mut c,
        &op(KEY, "metadata"),
        xks::metadata_body(),
        &second_credential(),
    )
    .await;
    assert_ok(&r, "metadata with the second credential");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_decrypt_round_trips() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let big_plaintext: Vec<u8> = (0..4300u32).map(|i| (i * 7 % 251) as u8).collect();
    let big_aad: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 256) as u8).collect();
    let cases = vec![
        ("no AAD", b"hello, world".to_vec(), None),
        (
            "with AAD",
            b"hello, world".to_vec(),
            Some(SPEC_AAD.to_vec()),
        ),
        ("empty AAD", b"hello, world".to_vec(), Some(Vec::new())),
        ("empty plaintext", Vec::new(), None),
        ("one byte", vec![0], Some(vec![0])),
        ("spec minimums", big_plaintext, Some(big_aad)),
    ];
    for (name, plaintext, aad) in &cases {
        let r = encrypt(&mut c, KEY, plaintext, aad.as_deref(), false).await;
        let v = assert_ok(&r, name);
        let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "authenticationTag",
                "ciphertext",
                "ciphertextMetadata",
                "initializationVector"
            ],
            "{name}: no CDIV unless asked"
        );
        let out = xks::parse_encrypt_response(&r.body).unwrap();
        assert_eq!(out.ciphertext.len(), plaintext.len(), "{name}");
        assert_eq!(out.iv.len(), 12, "{name}");
        assert_eq!(out.tag.len(), 16, "{name}");
        let meta = out.ciphertext_metadata.clone().expect("ciphertextMetadata");
        assert!(!meta.is_empty() && meta.len() <= 20, "{name}");
        assert_eq!(meta, SPEC_METADATA, "{name}: versioned metadata");
        if !plaintext.is_empty() {
            assert_ne!(
                &out.ciphertext, plaintext,
                "{name}: ciphertext is not the plaintext"
            );
        }
        let back = decrypt_ok(&mut c, KEY, &out, aad.as_deref()).await;
        assert_eq!(&back, plaintext, "{name}");
    }
    // A fresh IV per encryption.
    let a = encrypt_ok(&mut c, KEY, b"same", None).await;
    let b = encrypt_ok(&mut c, KEY, b"same", None).await;
    assert_ne!(a.iv, b.iv);
    assert_ne!((a.ciphertext, a.tag), (b.ciphertext, b.tag));
    // The second credential encrypts and decrypts too.
    let opts = second_credential();
    let r = post_with(
        &mut c,
        &op(KEY, "encrypt"),
        xks::encrypt_body(ARN, b"rotated", None, false),
        &opts,
    )
    .await;
    assert_ok(&r, "encrypt with the second credential");
    let out = xks::parse_encrypt_response(&r.body).unwrap();
    let r = post_with(
        &mut c,
        &op(KEY, "decrypt"),
        xks::decrypt_body_for(ARN, &out, None),
        &opts,
    )
    .await;
    assert_ok(&r, "decrypt with the second credential");
    assert_eq!(xks::parse_decrypt_response(&r.body).unwrap(), b"rotated");
    // Tolerant parsing on the crypto APIs too.
    let body = mutate(xks::encrypt_body(ARN, b"x", None, false), |v| {
        v["futureField"] = json!([1, 2, 3]);
        v["requestMetadata"]["kmsOperation"] = json!("GenerateDataKeyWithoutPlaintext");
        v["requestMetadata"]["awsSourceVpc"] = json!("vpc-123");
        v["requestMetadata"]["awsSourceVpce"] = json!("vpce-123");
        v["requestMetadata"]["kmsRecipientAttestationPCR0"] = json!("00");
    });
    assert_ok(
        &post(&mut c, &op(KEY, "encrypt"), body).await,
        "tolerant encrypt",
    );
}

// ---------------------------------------------------------------------------------------------
// AAD framing and CDIV
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_framing_matches_the_spec_formula() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    for aad in [None, Some(&b""[..]), Some(SPEC_AAD), Some(&[0u8; 300][..])] {
        let out = encrypt_ok(&mut c, KEY, b"framed plaintext", aad).await;
        let meta = out.ciphertext_metadata.clone().unwrap();
        // The HSM accepts exactly the spec's full AAD for what the proxy produced ...
        let plain = backend_decrypt(&proxy, KEY, &out, spec_full_aad(aad, &meta))
            .await
            .unwrap_or_else(|e| panic!("spec framing of {aad:?} does not decrypt: {e}"));
        assert_eq!(plain, b"framed plaintext");
        // ... and not the sample proxy's (which differs whenever the AAD field is present).
        if aad.is_some() {
            let wrong = backend_decrypt(&proxy, KEY, &out, aws_sample_full_aad(aad, &meta)).await;
            assert!(
                matches!(wrong, Err(CryptoError::InvalidCiphertext)),
                "{wrong:?}"
            );
        }
    }
    // A ciphertext made by another spec-literal implementation with the same key decrypts.
    let foreign = backend_encrypt(
        &proxy,
        KEY,
        b"from elsewhere",
        spec_full_aad(Some(SPEC_AAD), SPEC_METADATA),
        Some(SPEC_METADATA),
    )
    .await;
    assert_eq!(
        decrypt_ok(&mut c, KEY, &foreign, Some(SPEC_AAD)).await,
        b"from elsewhere"
    );
    // Spec framing: absent and empty AAD are the same thing.
    let absent = encrypt_ok(&mut c, KEY, b"a", None).await;
    assert_eq!(decrypt_ok(&mut c, KEY, &absent, Some(b"")).await, b"a");
    let empty = encrypt_ok(&mut c, KEY, b"e", Some(b"")).await;
    assert_eq!(decrypt_ok(&mut c, KEY, &empty, None).await, b"e");
    // Lengths are bound: bytes moved between AAD and metadata do not authenticate.
    let out = encrypt_ok(&mut c, KEY, b"m", Some(b"ab")).await;
    let mut moved = out.clone();
    moved.ciphertext_metadata = None;
    let r = decrypt(&mut c, KEY, &moved, Some(b"ab\x01")).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "metadata moved into AAD",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_sample_framing_round_trips_and_is_not_interchangeable() {
    let proxy = TestProxy::start_with(ProxyOptions {
        tables: format!(
            "{}{}",
            extra_store("sample", "/sample", "aad_framing = \"aws-sample\""),
            extra_store(
                "sample-md",
                "/sample-md",
                "aad_framing = \"aws-sample\"\nciphertext_metadata = \"a2V5X3ZlcnNpb249MQ==\""
            )
        ),
        ..Default::default()
    })
    .await;
    let mut spec = proxy.tls_client().await;
    let mut sample = client_for_prefix(&proxy, "/sample").await;
    let mut sample_md = client_for_prefix(&proxy, "/sample-md").await;

    for aad in [None, Some(&b""[..]), Some(SPEC_AAD)] {
        let out = encrypt_ok(&mut sample, KEY, b"sample plaintext", aad).await;
        assert_eq!(
            out.ciphertext_metadata, None,
            "sample framing: no metadata by default"
        );
        assert_eq!(
            decrypt_ok(&mut sample, KEY, &out, aad).await,
            b"sample plaintext"
        );
        // Independently: the HSM accepts the sample proxy's full AAD for it.
        let plain = backend_decrypt(&proxy, KEY, &out, aws_sample_full_aad(aad, b""))
            .await
            .unwrap_or_else(|e| panic!("sample framing of {aad:?}: {e}"));
        assert_eq!(plain, b"sample plaintext");
    }
    // The configured static metadata is returned and bound.
    let out = encrypt_ok(&mut sample_md, KEY, b"md", Some(SPEC_AAD)).await;
    assert_eq!(
        out.ciphertext_metadata.as_deref(),
        Some(&b"key_version=1"[..])
    );
    let plain = backend_decrypt(
        &proxy,
        KEY,
        &out,
        aws_sample_full_aad(Some(SPEC_AAD), b"key_version=1"),
    )
    .await
    .expect("sample framing with metadata");
    assert_eq!(plain, b"md");
    assert_eq!(
        decrypt_ok(&mut sample_md, KEY, &out, Some(SPEC_AAD)).await,
        b"md"
    );

    // A ciphertext the AWS sample proxy made (same key) decrypts without re-encryption.
    let legacy = backend_encrypt(
        &proxy,
        KEY,
        b"legacy",
        aws_sample_full_aad(Some(SPEC_AAD), b""),
        None,
    )
    .await;
    assert_eq!(
        decrypt_ok(&mut sample, KEY, &legacy, Some(SPEC_AAD)).await,
        b"legacy"
    );
    let r = decrypt(&mut spec, KEY, &legacy, Some(SPEC_AAD)).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "sample ciphertext under spec framing",
    );

    // Spec-framed ciphertexts do not decrypt under the sample framing.
    let spec_out = encrypt_ok(&mut spec, KEY, b"spec", Some(SPEC_AAD)).await;
    let r = decrypt(&mut sample, KEY, &spec_out, Some(SPEC_AAD)).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "spec ciphertext under sample framing",
    );

    // Sample framing: absent and empty AAD differ.
    let absent = encrypt_ok(&mut sample, KEY, b"a", None).await;
    let r = decrypt(&mut sample, KEY, &absent, Some(b"")).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "sample: absent then empty AAD",
    );
    let empty = encrypt_ok(&mut sample, KEY, b"e", Some(b"")).await;
    let r = decrypt(&mut sample, KEY, &empty, None).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "sample: empty then absent AAD",
    );
    // ... whereas the spec store treats them alike.
    let absent = encrypt_ok(&mut spec, KEY, b"a", None).await;
    assert_eq!(decrypt_ok(&mut spec, KEY, &absent, Some(b"")).await, b"a");

    // Key stores are isolated: the second credential belongs to the default store only.
    let r = post_with(
        &mut sample,
        "health",
        xks::health_body(),
        &second_credential(),
    )
    .await;
    assert_error(
        &r,
        401,
        "AuthenticationFailedException",
        "other store's credential",
    );
    // The sample store enforces its own key list.
    let r = encrypt(&mut sample, ENC_ONLY, b"x", None, false).await;
    assert_error(
        &r,
        404,
        "KeyNotFoundException",
        "key outside the sample store",
    );
}

fn spec_vectors() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/xks/spec-vectors.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture JSON")
}

fn fixture_hex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

#[test]
fn spec_test_vectors() {
    let v = spec_vectors();
    // §5.3: the full-AAD example, for this file's own framing helper and for core::framing.
    let f = &v["full_aad"];
    let aad = f["aad"].as_str().unwrap().as_bytes();
    let meta = f["ciphertext_metadata"].as_str().unwrap().as_bytes();
    let expected = fixture_hex(&f["full_aad_hex"]);
    assert_eq!(expected.len() as u64, f["full_aad_len"].as_u64().unwrap());
    assert_eq!(spec_full_aad(Some(aad), meta), expected);
    let framing = ekm_proxy::core::framing::AadFraming::SpecLiteral;
    assert_eq!(
        ekm_proxy::core::framing::full_aad(framing, Some(aad), meta).unwrap(),
        expected
    );
    assert_eq!(
        spec_full_aad(None, b""),
        fixture_hex(&f["empty_full_aad_hex"])
    );
    // §5.5: the CDIV test vector.
    let c = &v["cdiv"];
    let (aad, meta) = (
        c["aad"].as_str().unwrap().as_bytes(),
        c["ciphertext_metadata"].as_str().unwrap().as_bytes(),
    );
    let (iv, ct, tag) = (
        fixture_hex(&c["iv_hex"]),
        fixture_hex(&c["ciphertext_hex"]),
        fixture_hex(&c["tag_hex"]),
    );
    let expected = c["cdiv_base64"].as_str().unwrap();
    let ours = sha256_concat(&[aad, meta, &iv, &ct, &tag]);
    assert!(hex::encode(&ours).starts_with(c["sha256_hex_prefix"].as_str().unwrap()));
    assert!(hex::encode(&ours).ends_with(c["sha256_hex_suffix"].as_str().unwrap()));
    assert_eq!(B64.encode(&ours), expected, "the test's own computation");
    let proxy_value = ekm_proxy::core::framing::cdiv_sha256(aad, meta, &iv, &ct, &tag);
    assert_eq!(
        B64.encode(proxy_value),
        expected,
        "core::framing::cdiv_sha256"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdiv_is_correct_and_needs_a_decrypt_capable_key() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    for aad in [None, Some(SPEC_AAD), Some(&b""[..])] {
        let r = encrypt(&mut c, KEY, b"integrity", aad, true).await;
        assert_ok(&r, "encrypt with CDIV");
        let out = xks::parse_encrypt_response(&r.body).unwrap();
        let meta = out.ciphertext_metadata.clone().unwrap_or_default();
        let expected = sha256_concat(&[
            aad.unwrap_or_default(),
            &meta,
            &out.iv,
            &out.ciphertext,
            &out.tag,
        ]);
        assert_eq!(
            out.cdiv.as_deref(),
            Some(&expected[..]),
            "CDIV for AAD {aad:?}"
        );
        assert_eq!(decrypt_ok(&mut c, KEY, &out, aad).await, b"integrity");
    }
    // Appendix C: the verification decrypt needs CKA_DECRYPT.
    let r = encrypt(&mut c, ENC_ONLY, MARKER, None, true).await;
    assert_error(
        &r,
        400,
        "InvalidKeyUsageException",
        "encrypt-only key + CDIV",
    );
    let out = encrypt_ok(&mut c, ENC_ONLY, b"no cdiv", None).await;
    assert_eq!(out.cdiv, None);
}

// ---------------------------------------------------------------------------------------------
// Error rows
// ---------------------------------------------------------------------------------------------

/// Bad base64 in a field: not base64, URL-safe alphabet, missing padding, non-canonical trailing
/// bits, embedded newline.
const BAD_BASE64: [&str; 5] = ["not base64!", "-_-_", "YWI", "YR==", "YWJj\nZGVm"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let valid_decrypt = xks::decrypt_body(ARN, b"abcd", &[1; 12], &[2; 16], None, Some(&[1]));
    let apis: [(&str, String, Vec<u8>, &[&str]); 4] = [
        (
            "health",
            "health".into(),
            xks::health_body(),
            &["kmsRequestId", "kmsOperation"],
        ),
        (
            "metadata",
            op(KEY, "metadata"),
            xks::metadata_body(),
            &["awsPrincipalArn", "kmsOperation", "kmsRequestId"],
        ),
        (
            "encrypt",
            op(KEY, "encrypt"),
            xks::encrypt_body(ARN, MARKER, Some(b"aad"), false),
            &[
                "awsPrincipalArn",
                "kmsKeyArn",
                "kmsOperation",
                "kmsRequestId",
            ],
        ),
        (
            "decrypt",
            op(KEY, "decrypt"),
            valid_decrypt.clone(),
            &[
                "awsPrincipalArn",
                "kmsKeyArn",
                "kmsOperation",
                "kmsRequestId",
            ],
        ),
    ];
    let mut cases: Vec<(String, String, Vec<u8>)> = Vec::new();
    for (api, suffix, valid, required) in &apis {
        for (what, body) in [
            ("malformed JSON", br#"{"requestMetadata": {"#.to_vec()),
            ("not JSON", b"requestMetadata=1".to_vec()),
            ("empty body", Vec::new()),
            ("JSON array", b"[]".to_vec()),
            ("JSON string", br#""x""#.to_vec()),
            ("{}", b"{}".to_vec()),
            (
                "empty requestMetadata",
                br#"{"requestMetadata": {}}"#.to_vec(),
            ),
            (
                "null requestMetadata",
                br#"{"requestMetadata": null}"#.to_vec(),
            ),
            (
                "string requestMetadata",
                br#"{"requestMetadata": "x"}"#.to_vec(),
            ),
            ("trailing data", [valid.as_slice(), b" x"].concat()),
            (
                "duplicate requestMetadata",
                [&valid[..valid.len() - 1], b",\"requestMetadata\":{}}"].concat(),
            ),
            (
                "not UTF-8",
                b"{\"requestMetadata\":{\"kmsRequestId\":\"\xff\"}}".to_vec(),
            ),
        ] {
            cases.push((format!("{api}: {what}"), suffix.clone(), body));
        }
        for field in *required {
            cases.push((
                format!("{api}: missing requestMetadata.{field}"),
                suffix.clone(),
                mutate(valid.clone(), |v| {
                    v["requestMetadata"].as_object_mut().unwrap().remove(*field);
                }),
            ));
            cases.push((
                format!("{api}: null requestMetadata.{field}"),
                suffix.clone(),
                mutate(valid.clone(), |v| {
                    v["requestMetadata"][*field] = Value::Null
                }),
            ));
            cases.push((
                format!("{api}: numeric requestMetadata.{field}"),
                suffix.clone(),
                mutate(valid.clone(), |v| v["requestMetadata"][*field] = json!(5)),
            ));
        }
    }
    let enc = op(KEY, "encrypt");
    let valid_encrypt = xks::encrypt_body(ARN, MARKER, Some(b"aad"), false);
    let encrypt_mutations: Vec<(String, Mutation)> = vec![
        (
            "missing plaintext".into(),
            Box::new(|v: &mut Value| {
                v.as_object_mut().unwrap().remove("plaintext");
            }),
        ),
        (
            "numeric plaintext".into(),
            Box::new(|v: &mut Value| v["plaintext"] = json!(12)),
        ),
        (
            "missing encryptionAlgorithm".into(),
            Box::new(|v: &mut Value| {
                v.as_object_mut().unwrap().remove("encryptionAlgorithm");
            }),
        ),
        (
            "encryptionAlgorithm AES_CBC".into(),
            Box::new(|v: &mut Value| v["encryptionAlgorithm"] = json!("AES_CBC")),
        ),
        (
            "encryptionAlgorithm aes_gcm".into(),
            Box::new(|v: &mut Value| v["encryptionAlgorithm"] = json!("aes_gcm")),
        ),
        (
            "CDIV algorithm SHA_512".into(),
            Box::new(|v: &mut Value| v["ciphertextDataIntegrityValueAlgorithm"] = json!("SHA_512")),
        ),
        (
            "CDIV algorithm sha256".into(),
            Box::new(|v: &mut Value| v["ciphertextDataIntegrityValueAlgorithm"] = json!("sha256")),
        ),
    ];
    for (what, f) in &encrypt_mutations {
        cases.push((
            format!("encrypt: {what}"),
            enc.clone(),
            mutate(valid_encrypt.clone(), |v| f(v)),
        ));
    }
    for field in ["plaintext", "additionalAuthenticatedData"] {
        for bad in BAD_BASE64 {
            cases.push((
                format!("encrypt: {field} = {bad:?}"),
                enc.clone(),
                mutate(valid_encrypt.clone(), |v| v[field] = json!(bad)),
            ));
        }
    }
    let dec = op(KEY, "decrypt");
    for field in [
        "ciphertext",
        "initializationVector",
        "authenticationTag",
        "encryptionAlgorithm",
    ] {
        cases.push((
            format!("decrypt: missing {field}"),
            dec.clone(),
            mutate(valid_decrypt.clone(), |v| {
                v.as_object_mut().unwrap().remove(field);
            }),
        ));
    }
    cases.push((
        "decrypt: encryptionAlgorithm RSAES_OAEP_SHA_256".into(),
        dec.clone(),
        mutate(valid_decrypt.clone(), |v| {
            v["encryptionAlgorithm"] = json!("RSAES_OAEP_SHA_256")
        }),
    ));
    for field in [
        "ciphertext",
        "initializationVector",
        "authenticationTag",
        "additionalAuthenticatedData",
        "ciphertextMetadata",
    ] {
        for bad in BAD_BASE64 {
            cases.push((
                format!("decrypt: {field} = {bad:?}"),
                dec.clone(),
                mutate(valid_decrypt.clone(), |v| v[field] = json!(bad)),
            ));
        }
    }
    for len in [21usize, 64, 255] {
        cases.push((
            format!("decrypt: ciphertextMetadata of {len} bytes"),
            dec.clone(),
            mutate(valid_decrypt.clone(), |v| {
                v["ciphertextMetadata"] = json!(B64.encode(vec![1u8; len]))
            }),
        ));
    }
    for (what, suffix, body) in &cases {
        let r = post(&mut c, suffix, body.clone()).await;
        assert_error(&r, 400, "ValidationException", what);
    }
    assert!(cases.len() > 100, "{} cases", cases.len());
    // Robustness: a deeply nested unknown field is skipped, not a crash.
    let body = xks::health_body();
    let deep = [
        &body[..body.len() - 1],
        b",\"x\":",
        "[".repeat(5000).as_bytes(),
        "]".repeat(5000).as_bytes(),
        b"}",
    ]
    .concat();
    assert_ok(
        &post(&mut c, "health", deep).await,
        "deeply nested unknown field",
    );
    // Positive controls: the unmodified bodies pass validation.
    assert_ok(
        &post(&mut c, "health", apis[0].2.clone()).await,
        "valid health",
    );
    assert_ok(
        &post(&mut c, &apis[1].1, apis[1].2.clone()).await,
        "valid metadata",
    );
    assert_ok(&post(&mut c, &enc, valid_encrypt).await, "valid encrypt");
    let r = post(&mut c, &dec, valid_decrypt).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "valid but forged decrypt",
    );
    // Metadata of exactly 20 bytes is allowed by validation (then fails authentication).
    let body = xks::decrypt_body(ARN, b"abcd", &[1; 12], &[2; 16], None, Some(&[7; 20]));
    let r = post(&mut c, &dec, body).await;
    assert_error(&r, 400, "InvalidCiphertextException", "20-byte metadata");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let now = SystemTime::now();
    let minutes = |m: u64| Duration::from_secs(60 * m);
    let failures =
        |reason: &str| format!("ekm_auth_failures_total{{front=\"xks\",reason=\"{reason}\"}}");
    let body = xks::encrypt_body(ARN, MARKER, None, false);
    let suffix = op(KEY, "encrypt");

    let mut bad_hash_headers = http::HeaderMap::new();
    bad_hash_headers.insert(
        "x-amz-content-sha256",
        HeaderValue::from_static(
            "0000000000000000000000000000000000000000000000000000000000000000",
        ),
    );
    let mut tampered_date = http::HeaderMap::new();
    tampered_date.insert("x-amz-date", HeaderValue::from_static("20240101T000000Z"));
    let mut tampered_host = http::HeaderMap::new();
    tampered_host.insert(HOST, HeaderValue::from_static("evil.example.com"));
    let mut bad_authorization = http::HeaderMap::new();
    bad_authorization.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("AWS4-HMAC-SHA256 garbage"),
    );
    let mut other_algorithm = http::HeaderMap::new();
    other_algorithm.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("AWS4-HMAC-SHA512 Credential=DEVXKSACCESSKEYIDABCD/20240101/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=00"),
    );

    let cases: Vec<(&str, SignOptions, &str)> = vec![
        (
            "no Authorization header",
            SignOptions {
                unsigned: true,
                ..Default::default()
            },
            "missing_authorization",
        ),
        (
            "wrong secret",
            SignOptions {
                secret: Some(SecretString::from(SECRET_2)),
                ..Default::default()
            },
            "signature_mismatch",
        ),
        (
            "X-Amz-Date 6 min in the past",
            SignOptions {
                time: Some(now - minutes(6)),
                ..Default::default()
            },
            "clock_skew",
        ),
        (
            "X-Amz-Date 6 min in the future",
            SignOptions {
                time: Some(now + minutes(6)),
                ..Default::default()
            },
            "clock_skew",
        ),
        (
            "X-Amz-Date a day old",
            SignOptions {
                time: Some(now - minutes(24 * 60)),
                ..Default::default()
            },
            "clock_skew",
        ),
        (
            "other region",
            SignOptions {
                region: Some("us-west-2".into()),
                ..Default::default()
            },
            "region_not_allowed",
        ),
        (
            "other service",
            SignOptions {
                service: Some("kms".into()),
                ..Default::default()
            },
            "wrong_service",
        ),
        (
            "unknown access key id",
            SignOptions {
                access_key_id: Some("UNKNOWNXKSACCESSKEY234".into()),
                ..Default::default()
            },
            "unknown_access_key",
        ),
        (
            "first id with the second secret",
            SignOptions {
                secret: Some(SecretString::from(SECRET_2)),
                access_key_id: Some(ACCESS_KEY_ID.into()),
                ..Default::default()
            },
            "signature_mismatch",
        ),
        (
            "tampered body",
            SignOptions {
                body_after_sign: Some(Bytes::from(xks::encrypt_body(ARN, b"other", None, false))),
                ..Default::default()
            },
            "signature_mismatch",
        ),
        (
            "tampered X-Amz-Date",
            SignOptions {
                after_sign_headers: tampered_date,
                ..Default::default()
            },
            "scope_date_mismatch",
        ),
        (
            "tampered Host",
            SignOptions {
                after_sign_headers: tampered_host,
                ..Default::default()
            },
            "signature_mismatch",
        ),
        (
            "host not signed",
            SignOptions {
                signed_headers: Some(vec!["x-amz-date".into()]),
                ..Default::default()
            },
            "header_not_signed",
        ),
        (
            "wrong signed content hash",
            SignOptions {
                extra_headers: bad_hash_headers,
                signed_headers: Some(vec![
                    "host".into(),
                    "x-amz-date".into(),
                    "x-amz-content-sha256".into(),
                ]),
                ..Default::default()
            },
            "content_hash_mismatch",
        ),
        (
            "malformed Authorization",
            SignOptions {
                after_sign_headers: bad_authorization,
                ..Default::default()
            },
            "malformed_authorization",
        ),
        (
            "other algorithm",
            SignOptions {
                after_sign_headers: other_algorithm,
                ..Default::default()
            },
            "unsupported_algorithm",
        ),
    ];
    for (what, opts, reason) in &cases {
        let before = proxy.metric(&failures(reason)).await;
        let r = post_with(&mut c, &suffix, body.clone(), opts).await;
        assert_error(&r, 401, "AuthenticationFailedException", what);
        let after = proxy.metric(&failures(reason)).await;
        assert_eq!(
            after,
            before + 1.0,
            "{what}: ekm_auth_failures_total{{reason={reason}}}"
        );
    }
    // Every API requires a signature, health included.
    let unsigned = SignOptions {
        unsigned: true,
        ..Default::default()
    };
    for (suffix, body) in [
        ("health".to_string(), xks::health_body()),
        (op(KEY, "metadata"), xks::metadata_body()),
        (
            op(KEY, "encrypt"),
            xks::encrypt_body(ARN, MARKER, None, false),
        ),
        (
            op(KEY, "decrypt"),
            xks::decrypt_body(ARN, b"x", &[0; 12], &[0; 16], None, None),
        ),
    ] {
        let r = post_with(&mut c, &suffix, body.clone(), &unsigned).await;
        assert_error(
            &r,
            401,
            "AuthenticationFailedException",
            &format!("unsigned {suffix}"),
        );
        let r = post_with(&mut c, &suffix, body, &cases[2].1).await;
        assert_error(
            &r,
            401,
            "AuthenticationFailedException",
            &format!("expired {suffix}"),
        );
    }

    // Tampered path and query: signed for one URI, sent to another.
    let host = host_of(&proxy, "tls");
    let signed = format!("{}/keys/{KEY}/encrypt", base(PREFIX));
    let r = send_signed_elsewhere(&mut c, &host, &signed, &signed, body.clone()).await;
    assert_ok(&r, "manually signed control request");
    let elsewhere = format!("{}/keys/{DEC_ONLY}/encrypt", base(PREFIX));
    let r = send_signed_elsewhere(&mut c, &host, &signed, &elsewhere, body.clone()).await;
    assert_error(&r, 401, "AuthenticationFailedException", "tampered path");
    let with_query = format!("{signed}?keyId={DEC_ONLY}");
    let r = send_signed_elsewhere(&mut c, &host, &signed, &with_query, body.clone()).await;
    assert_error(
        &r,
        401,
        "AuthenticationFailedException",
        "added query string",
    );

    // Inside the allowed skew, curl-style signed headers, a correct signed content hash: fine.
    let mut good_hash = http::HeaderMap::new();
    good_hash.insert(
        "x-amz-content-sha256",
        HeaderValue::from_str(&hex::encode(Sha256::digest(&body))).unwrap(),
    );
    for (what, opts) in [
        (
            "4 min in the past",
            SignOptions {
                time: Some(now - minutes(4)),
                ..Default::default()
            },
        ),
        (
            "4 min in the future",
            SignOptions {
                time: Some(now + minutes(4)),
                ..Default::default()
            },
        ),
        (
            "curl's signed headers",
            SignOptions {
                signed_headers: Some(vec![
                    "content-type".into(),
                    "host".into(),
                    "x-amz-date".into(),
                ]),
                ..Default::default()
            },
        ),
        (
            "signed content hash",
            SignOptions {
                extra_headers: good_hash,
                signed_headers: Some(vec![
                    "host".into(),
                    "x-amz-date".into(),
                    "x-amz-content-sha256".into(),
                ]),
                ..Default::default()
            },
        ),
    ] {
        assert_ok(&post_with(&mut c, &suffix, body.clone(), &opts).await, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_interoperates_over_tls_mtls_and_http2() {
    let proxy = TestProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let write_pair = |name: &str, cert: &ekm_proxy::dev::certs::IssuedCert| {
        write_cert_pair(dir.path(), name, cert)
    };
    let good = write_pair("client", &proxy.pki.client);
    let expired = write_pair(
        "expired",
        &proxy
            .pki
            .ca
            .issue_client(CLIENT_SUBJECT, Validity::Expired)
            .unwrap(),
    );
    let curl = |listener: &str,
                suffix: &str,
                body: Vec<u8>,
                secret: &str,
                cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
                extra: &[&str]| {
        let port = proxy.addr(listener).port();
        let call = Curl {
            port,
            ca: proxy.pki.ca_pem.clone(),
            client_cert: cert.cloned(),
            user: format!("{ACCESS_KEY_ID}:{secret}"),
            url: format!("https://localhost:{port}{}/{suffix}", base(PREFIX)),
            body,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        async move {
            tokio::task::spawn_blocking(move || call.run())
                .await
                .unwrap()
        }
    };

    // Full round trips signed by curl's SigV4, over HTTP/1.1 and HTTP/2 (where the signed `host`
    // comes from `:authority`), on the TLS and the mTLS listener.
    for (listener, cert) in [("tls", None), ("mtls", Some(&good))] {
        for http in ["--http1.1", "--http2"] {
            let ctx = format!("curl {http} on {listener}");
            let r = curl(
                listener,
                "health",
                xks::health_body(),
                SECRET,
                cert,
                &[http],
            )
            .await;
            assert_eq!(r.status, Some(200), "{ctx}: health {r:?}");
            assert_eq!(
                r.http_version,
                if http == "--http2" { "2" } else { "1.1" },
                "{ctx}"
            );
            let body = xks::encrypt_body(ARN, b"curl plaintext", Some(SPEC_AAD), true);
            let r = curl(listener, &op(KEY, "encrypt"), body, SECRET, cert, &[http]).await;
            assert_eq!(r.status, Some(200), "{ctx}: encrypt {r:?}");
            let out = xks::parse_encrypt_response(r.body.as_bytes()).unwrap();
            let expected = sha256_concat(&[
                SPEC_AAD,
                out.ciphertext_metadata.as_deref().unwrap_or_default(),
                &out.iv,
                &out.ciphertext,
                &out.tag,
            ]);
            assert_eq!(out.cdiv.as_deref(), Some(&expected[..]), "{ctx}: CDIV");
            let body = xks::decrypt_body_for(ARN, &out, Some(SPEC_AAD));
            let r = curl(listener, &op(KEY, "decrypt"), body, SECRET, cert, &[http]).await;
            assert_eq!(r.status, Some(200), "{ctx}: decrypt {r:?}");
            assert_eq!(
                xks::parse_decrypt_response(r.body.as_bytes()).unwrap(),
                b"curl plaintext"
            );
            let r = curl(
                listener,
                "health",
                xks::health_body(),
                SECRET_2,
                cert,
                &[http],
            )
            .await;
            assert_eq!(r.status, Some(401), "{ctx}: wrong secret {r:?}");
            assert_eq!(
                xks::error_name(r.body.as_bytes()).as_deref(),
                Some("AuthenticationFailedException")
            );
        }
    }

    // §7.2: each XKS-listed cipher suite the server certificate allows (it is ECDSA) is
    // negotiable, and a client offering everything gets an AES-256-GCM suite.
    for (what, args, suite) in [
        ("TLS 1.3 default", vec!["-v"], "TLS_AES_256_GCM_SHA384"),
        (
            "TLS 1.3 AES-256",
            vec![
                "-v",
                "--tlsv1.3",
                "--tls13-ciphers",
                "TLS_AES_256_GCM_SHA384",
            ],
            "TLS_AES_256_GCM_SHA384",
        ),
        (
            "TLS 1.3 ChaCha20",
            vec![
                "-v",
                "--tlsv1.3",
                "--tls13-ciphers",
                "TLS_CHACHA20_POLY1305_SHA256",
            ],
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            "TLS 1.2 default",
            vec!["-v", "--tls-max", "1.2"],
            "ECDHE-ECDSA-AES256-GCM-SHA384",
        ),
        (
            "TLS 1.2 ECDHE-ECDSA-AES256-GCM",
            vec![
                "-v",
                "--tls-max",
                "1.2",
                "--ciphers",
                "ECDHE-ECDSA-AES256-GCM-SHA384",
            ],
            "ECDHE-ECDSA-AES256-GCM-SHA384",
        ),
    ] {
        let r = curl("tls", "health", xks::health_body(), SECRET, None, &args).await;
        assert_eq!(r.status, Some(200), "{what}: {r:?}");
        assert!(
            r.stderr.contains(suite),
            "{what}: expected {suite}:\n{}",
            r.stderr
        );
    }
    // TLS 1.2 mTLS rejections also end in a handshake_failure alert.
    for (what, cert) in [("expired", Some(&expired)), ("good", Some(&good))] {
        let r = curl(
            "mtls",
            "health",
            xks::health_body(),
            SECRET,
            cert,
            &["--tls-max", "1.2"],
        )
        .await;
        if what == "good" {
            assert_eq!(r.status, Some(200), "TLS 1.2 mTLS, good cert: {r:?}");
        } else {
            assert_eq!(r.status, None, "TLS 1.2 mTLS, {what}: {r:?}");
            assert!(
                r.stderr.contains("handshake failure"),
                "TLS 1.2 mTLS, {what}: {}",
                r.stderr
            );
        }
    }
}

/// Write `cert` and its key as `<name>.pem` and `<name>-key.pem` in `dir` (for curl).
fn write_cert_pair(
    dir: &std::path::Path,
    name: &str,
    cert: &ekm_proxy::dev::certs::IssuedCert,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, &cert.cert_pem).unwrap();
    std::fs::write(&k, cert.key_pem.as_bytes()).unwrap();
    (c, k)
}

/// One curl call signed by curl's own SigV4 implementation (`--aws-sigv4`, which signs
/// `content-type;host;x-amz-date`): an independent check of the proxy's verifier and TLS setup.
struct Curl {
    port: u16,
    ca: std::path::PathBuf,
    client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    user: String,
    url: String,
    body: Vec<u8>,
    extra: Vec<String>,
}

/// What curl reported: HTTP status (None when no response arrived), body, HTTP version, stderr.
#[derive(Debug)]
struct CurlResult {
    /// curl's exit code.
    exit: Option<i32>,
    status: Option<u16>,
    http_version: String,
    body: String,
    stderr: String,
}

impl Curl {
    fn run(self) -> CurlResult {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code} %{http_version}"])
            .arg("--resolve")
            .arg(format!("localhost:{}:127.0.0.1", self.port))
            .arg("--cacert")
            .arg(&self.ca)
            .args(["--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy", "--user"])
            .arg(&self.user)
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(String::from_utf8(self.body).unwrap())
            .args(&self.extra)
            .arg(&self.url);
        if let Some((cert, key)) = &self.client_cert {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = cmd.output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, trailer) = text.rsplit_once('\n').unwrap_or(("", &text));
        let (code, version) = trailer.split_once(' ').unwrap_or((trailer, ""));
        CurlResult {
            exit: out.status.code(),
            status: code.trim().parse().ok().filter(|c| *c != 0),
            http_version: version.trim().to_owned(),
            body: body.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_credential_is_removed_by_reload_on_a_live_connection() {
    let mut proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let second = second_credential();
    let r = post_with(
        &mut c,
        &op(KEY, "encrypt"),
        xks::encrypt_body(ARN, b"x", None, false),
        &second,
    )
    .await;
    assert_ok(&r, "second credential before reload");

    // Rotation: drop the second credential from the file and reload in place.
    let block = format!(
        "[[xks.key_store.credential]]\naccess_key_id = \"{ACCESS_KEY_ID_2}\"\nsecret = \"{SECRET_2}\"\n"
    );
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(text.contains(&block), "config layout changed:\n{text}");
    std::fs::write(&proxy.config_path, text.replace(&block, "")).unwrap();
    let settings = ekm_proxy::config::load(&proxy.config_path).expect("reloaded config");
    proxy.running().reload(&settings).expect("reload");

    // Same keep-alive connection: the second credential now fails, the first still works.
    for (suffix, body) in [
        ("health".to_string(), xks::health_body()),
        (op(KEY, "metadata"), xks::metadata_body()),
        (
            op(KEY, "encrypt"),
            xks::encrypt_body(ARN, MARKER, None, false),
        ),
    ] {
        let r = post_with(&mut c, &suffix, body.clone(), &second).await;
        assert_error(
            &r,
            401,
            "AuthenticationFailedException",
            &format!("removed credential, {suffix}"),
        );
        assert_ok(
            &post(&mut c, &suffix, body).await,
            &format!("first credential, {suffix}"),
        );
    }
    assert!(!c.is_closed(), "the connection survived the reload");

    // Reload back (the helper rewrites the full config): the second credential works again.
    let options = proxy.options.clone();
    proxy.reload_with(options);
    let r = post_with(&mut c, "health", xks::health_body(), &second).await;
    assert_ok(&r, "second credential restored");
    assert!(!c.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_authorization_denies_and_health_is_exempt() {
    let proxy = TestProxy::start_with(ProxyOptions {
        tables: r#"
[[xks.key_store.rule]]
name = "caller-account"
attribute = "awsPrincipalArn"
allow = ["arn:aws:iam::111122223333:*"]

[[xks.key_store.rule]]
name = "decrypt-via-ebs"
keys = ["dev-aes-1"]
operations = ["decrypt"]
attribute = "kmsViaService"
allow = ["ebs"]
"#
        .into(),
        ..Default::default()
    })
    .await;
    let mut c = proxy.tls_client().await;
    let allowed = "arn:aws:iam::111122223333:role/KmsCaller";
    let as_principal = |body: Vec<u8>, principal: &str| {
        mutate(body, |v| {
            v["requestMetadata"]["awsPrincipalArn"] = json!(principal)
        })
    };

    // Health carries no principal and is exempt from secondary authorization.
    assert_ok(&health(&mut c).await, "health under a policy");
    // The default principal (account 123456789012) is denied everywhere else.
    let r = metadata(&mut c, KEY).await;
    assert_error(&r, 403, "AccessDeniedException", "metadata, other account");
    let r = encrypt(&mut c, KEY, MARKER, None, false).await;
    assert_error(&r, 403, "AccessDeniedException", "encrypt, other account");
    let long_arn = format!("arn:aws:iam::999999999999:role/{}", "a".repeat(2000));
    for (what, principal) in [
        ("account id prefix", "arn:aws:iam::1111222233334:role/x"),
        ("no resource part", "arn:aws:iam::111122223333"),
        ("very long ARN", long_arn.as_str()),
        (
            "non-ASCII ARN",
            "arn:aws:iam::999999999999:role/\u{e9}l\u{e8}ve\u{7}\n",
        ),
    ] {
        let r = post(
            &mut c,
            &op(KEY, "encrypt"),
            as_principal(xks::encrypt_body(ARN, MARKER, None, false), principal),
        )
        .await;
        assert_error(&r, 403, "AccessDeniedException", what);
    }
    // The allowed account passes.
    let r = post(
        &mut c,
        &op(KEY, "metadata"),
        as_principal(xks::metadata_body(), allowed),
    )
    .await;
    assert_ok(&r, "metadata, allowed account");
    let r = post(
        &mut c,
        &op(KEY, "encrypt"),
        as_principal(xks::encrypt_body(ARN, b"allowed", None, false), allowed),
    )
    .await;
    assert_ok(&r, "encrypt, allowed account");
    let out = xks::parse_encrypt_response(&r.body).unwrap();
    // The key- and operation-scoped rule: decrypt with dev-aes-1 needs kmsViaService = ebs.
    let decrypt_body = as_principal(xks::decrypt_body_for(ARN, &out, None), allowed);
    let r = post(&mut c, &op(KEY, "decrypt"), decrypt_body.clone()).await;
    assert_error(
        &r,
        403,
        "AccessDeniedException",
        "decrypt without kmsViaService",
    );
    let via_ebs = mutate(decrypt_body.clone(), |v| {
        v["requestMetadata"]["kmsViaService"] = json!("ebs")
    });
    let r = post(&mut c, &op(KEY, "decrypt"), via_ebs).await;
    assert_ok(&r, "decrypt via ebs");
    assert_eq!(xks::parse_decrypt_response(&r.body).unwrap(), b"allowed");
    let via_rds = mutate(decrypt_body.clone(), |v| {
        v["requestMetadata"]["kmsViaService"] = json!("rds")
    });
    let r = post(&mut c, &op(KEY, "decrypt"), via_rds).await;
    assert_error(&r, 403, "AccessDeniedException", "decrypt via rds");
    // The scoped rule does not apply to other keys: authorization passes, the ciphertext fails.
    let r = post(&mut c, &op(DEC_ONLY, "decrypt"), decrypt_body).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "decrypt rule scoped to dev-aes-1",
    );
    let denied =
        "ekm_requests_total{front=\"xks\",op=\"encrypt\",outcome=\"AccessDeniedException\"}";
    assert_eq!(proxy.metric(denied).await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_paths_and_methods() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let host = host_of(&proxy, "tls");
    let b = base(PREFIX);

    // KeyNotFoundException: not on the token (but allowed by the key list), outside the key
    // list, and the health-check key (on the token, never exposed).
    for key in [
        "other-missing",
        "not-listed",
        "ekm-health-check",
        "dev-aes-10",
    ] {
        let r = metadata(&mut c, key).await;
        assert_error(&r, 404, "KeyNotFoundException", &format!("metadata {key}"));
        let r = encrypt(&mut c, key, MARKER, None, false).await;
        assert_error(&r, 404, "KeyNotFoundException", &format!("encrypt {key}"));
        let body = xks::decrypt_body(ARN, b"abcd", &[1; 12], &[2; 16], None, Some(SPEC_METADATA));
        let r = post(&mut c, &op(key, "decrypt"), body).await;
        assert_error(&r, 404, "KeyNotFoundException", &format!("decrypt {key}"));
    }

    // InvalidUriPathException, signed or not.
    let long_key = "k".repeat(129);
    let paths = [
        "/other/kms/xks/v1/health".to_string(),
        "/kms/xks/v1/health".to_string(),
        "/dev-keystorex/kms/xks/v1/health".to_string(),
        "/x/dev-keystore/kms/xks/v1/health".to_string(),
        "/DEV-KEYSTORE/kms/xks/v1/health".to_string(),
        format!("{PREFIX}/KMS/XKS/V1/health"),
        format!("{PREFIX}/kms/xks/v2/health"),
        format!("{b}/health/"),
        format!("{b}/healthz"),
        format!("{b}/keys/{KEY}/sign"),
        format!("{b}/keys/{KEY}/encrypt/extra"),
        format!("{b}/keys/{KEY}"),
        format!("{b}/keys//encrypt"),
        format!("{b}/keys/dev~aes/encrypt"),
        format!("{b}/keys/dev%2Daes-1/encrypt"),
        format!("{b}/keys/dev:aes/metadata"),
        format!("{b}/keys/{long_key}/metadata"),
        format!("{b}/key/{KEY}/encrypt"),
        "/".to_string(),
        "/metrics".to_string(),
    ];
    for path in &paths {
        let opts = SignOptions {
            path: Some(path.clone()),
            ..Default::default()
        };
        let r = post_with(
            &mut c,
            "ignored",
            xks::encrypt_body(ARN, MARKER, None, false),
            &opts,
        )
        .await;
        assert_error(&r, 404, "InvalidUriPathException", path);
        let unsigned = SignOptions {
            path: Some(path.clone()),
            unsigned: true,
            ..Default::default()
        };
        let r = post_with(&mut c, "ignored", xks::health_body(), &unsigned).await;
        assert_error(
            &r,
            404,
            "InvalidUriPathException",
            &format!("unsigned {path}"),
        );
    }
    // A key id of exactly 128 allowed characters is routed (then not found).
    let r = metadata(&mut c, &format!("a.b_c-{}", "k".repeat(122))).await;
    assert_error(&r, 404, "KeyNotFoundException", "128-char key id");

    // Any method but POST on an API URI: 405 (before authentication).
    for suffix in [
        "health".to_string(),
        op(KEY, "metadata"),
        op(KEY, "encrypt"),
        op(KEY, "decrypt"),
    ] {
        let path = format!("{b}/{suffix}");
        for method in [
            http::Method::GET,
            http::Method::HEAD,
            http::Method::PUT,
            http::Method::PATCH,
            http::Method::DELETE,
            http::Method::OPTIONS,
        ] {
            let r = send_method(&mut c, &host, method.clone(), &path).await;
            assert_eq!(r.status, 405, "{method} {path}");
            assert_eq!(
                r.headers.get(http::header::ALLOW).map(|v| v.as_bytes()),
                Some(&b"POST"[..]),
                "{method} {path}"
            );
            if method != http::Method::HEAD {
                assert!(r.error_name().is_some(), "{method} {path}: JSON error body");
            }
        }
    }
    // A GET on an unknown path stays a 404.
    let r = send_method(&mut c, &host, http::Method::GET, "/other/kms/xks/v1/health").await;
    assert_error(&r, 404, "InvalidUriPathException", "GET unknown prefix");
    assert!(!c.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_usage_is_enforced_from_key_attributes() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let out = encrypt_ok(&mut c, KEY, b"for decrypt tests", None).await;
    let r = encrypt(&mut c, DEC_ONLY, MARKER, None, false).await;
    assert_error(
        &r,
        400,
        "InvalidKeyUsageException",
        "encrypt with decrypt-only",
    );
    let r = decrypt(&mut c, ENC_ONLY, &out, None).await;
    assert_error(
        &r,
        400,
        "InvalidKeyUsageException",
        "decrypt with encrypt-only",
    );
    let r = encrypt(&mut c, NO_USAGE, MARKER, None, false).await;
    assert_error(&r, 400, "InvalidKeyUsageException", "encrypt with no-usage");
    let r = encrypt(&mut c, NO_USAGE, MARKER, None, true).await;
    assert_error(
        &r,
        400,
        "InvalidKeyUsageException",
        "encrypt+CDIV with no-usage",
    );
    let r = decrypt(&mut c, NO_USAGE, &out, None).await;
    assert_error(&r, 400, "InvalidKeyUsageException", "decrypt with no-usage");
    let r = encrypt(&mut c, DEC_ONLY, MARKER, None, true).await;
    assert_error(
        &r,
        400,
        "InvalidKeyUsageException",
        "encrypt+CDIV with decrypt-only",
    );
    // Each key does what its attributes allow.
    encrypt_ok(&mut c, ENC_ONLY, b"ok", None).await;
    let r = decrypt(&mut c, DEC_ONLY, &out, None).await;
    assert_error(
        &r,
        400,
        "InvalidCiphertextException",
        "decrypt-only key, foreign ciphertext",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertexts_are_invalid() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let out = encrypt_ok(&mut c, KEY, b"authentic plaintext", Some(SPEC_AAD)).await;
    assert_eq!(
        decrypt_ok(&mut c, KEY, &out, Some(SPEC_AAD)).await,
        b"authentic plaintext"
    );

    let mut cases: Vec<(&str, EncryptOutput, Option<&[u8]>)> = Vec::new();
    let with = |f: &dyn Fn(&mut EncryptOutput)| {
        let mut o = out.clone();
        f(&mut o);
        o
    };
    cases.push((
        "ciphertext bit flip",
        with(&|o| o.ciphertext[0] ^= 1),
        Some(SPEC_AAD),
    ));
    cases.push((
        "ciphertext truncated",
        with(&|o| {
            o.ciphertext.pop();
        }),
        Some(SPEC_AAD),
    ));
    cases.push((
        "ciphertext extended",
        with(&|o| o.ciphertext.push(0)),
        Some(SPEC_AAD),
    ));
    cases.push(("IV bit flip", with(&|o| o.iv[11] ^= 0x80), Some(SPEC_AAD)));
    cases.push(("IV of 8 bytes", with(&|o| o.iv.truncate(8)), Some(SPEC_AAD)));
    cases.push((
        "IV of 16 bytes",
        with(&|o| o.iv.extend_from_slice(&[0; 4])),
        Some(SPEC_AAD),
    ));
    cases.push(("IV empty", with(&|o| o.iv.clear()), Some(SPEC_AAD)));
    cases.push(("tag bit flip", with(&|o| o.tag[0] ^= 1), Some(SPEC_AAD)));
    cases.push((
        "tag of 12 bytes",
        with(&|o| o.tag.truncate(12)),
        Some(SPEC_AAD),
    ));
    cases.push(("tag of 17 bytes", with(&|o| o.tag.push(0)), Some(SPEC_AAD)));
    cases.push((
        "IV of 100 bytes",
        with(&|o| o.iv = vec![7; 100]),
        Some(SPEC_AAD),
    ));
    cases.push((
        "tag of 100 bytes",
        with(&|o| o.tag = vec![7; 100]),
        Some(SPEC_AAD),
    ));
    cases.push((
        "AAD changed",
        out.clone(),
        Some(b"project=nile,department=sales"),
    ));
    cases.push(("AAD missing", out.clone(), None));
    cases.push(("AAD empty", out.clone(), Some(b"")));
    cases.push((
        "metadata changed",
        with(&|o| o.ciphertext_metadata = Some(vec![0x02])),
        Some(SPEC_AAD),
    ));
    cases.push((
        "metadata missing",
        with(&|o| o.ciphertext_metadata = None),
        Some(SPEC_AAD),
    ));
    cases.push((
        "metadata of 20 bytes",
        with(&|o| o.ciphertext_metadata = Some(vec![1; 20])),
        Some(SPEC_AAD),
    ));
    for (what, bad, aad) in &cases {
        let r = decrypt(&mut c, KEY, bad, *aad).await;
        assert_error(&r, 400, "InvalidCiphertextException", what);
    }
    // Decrypting with another key.
    let r = decrypt(&mut c, DEC_ONLY, &out, Some(SPEC_AAD)).await;
    assert_error(&r, 400, "InvalidCiphertextException", "another key");
    // Still fine afterwards.
    assert_eq!(
        decrypt_ok(&mut c, KEY, &out, Some(SPEC_AAD)).await,
        b"authentic plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_above_the_limits_are_unsupported() {
    let proxy = TestProxy::start_with(ProxyOptions {
        key_store_keys: "max_plaintext_bytes = 5000\nmax_aad_bytes = 9000".into(),
        tables: extra_store("big", "/big", ""),
        ..Default::default()
    })
    .await;
    let mut c = proxy.tls_client().await;
    let unsupported =
        |r: &Response, what: &str| assert_error(r, 501, "UnsupportedOperationException", what);

    // The configured limits, at and above.
    let out = encrypt_ok(&mut c, KEY, &[7; 5000], None).await;
    assert_eq!(decrypt_ok(&mut c, KEY, &out, None).await, vec![7; 5000]);
    unsupported(
        &encrypt(&mut c, KEY, &[7; 5001], None, false).await,
        "plaintext 5001",
    );
    unsupported(
        &encrypt(&mut c, KEY, &[7; 5001], None, true).await,
        "plaintext 5001 + CDIV",
    );
    let out = encrypt_ok(&mut c, KEY, b"x", Some(&[9; 9000])).await;
    assert_eq!(decrypt_ok(&mut c, KEY, &out, Some(&[9; 9000])).await, b"x");
    unsupported(
        &encrypt(&mut c, KEY, b"x", Some(&[9; 9001]), false).await,
        "AAD 9001 (encrypt)",
    );
    let body = xks::decrypt_body(
        ARN,
        &[1; 5001],
        &[1; 12],
        &[2; 16],
        None,
        Some(SPEC_METADATA),
    );
    unsupported(
        &post(&mut c, &op(KEY, "decrypt"), body).await,
        "ciphertext 5001",
    );
    let body = xks::decrypt_body(
        ARN,
        &[1; 16],
        &[1; 12],
        &[2; 16],
        Some(&[9; 9001]),
        Some(SPEC_METADATA),
    );
    unsupported(
        &post(&mut c, &op(KEY, "decrypt"), body).await,
        "AAD 9001 (decrypt)",
    );
    // The spec minimums fit.
    let aad = vec![3u8; 8192];
    let out = encrypt_ok(&mut c, KEY, &[5; 4300], Some(&aad)).await;
    assert_eq!(
        decrypt_ok(&mut c, KEY, &out, Some(&aad)).await,
        vec![5; 4300]
    );

    // A requestMetadata field may be as long as the longest ARN (2048 bytes), not longer.
    for len in [2048, 2049] {
        let body = json!({"requestMetadata": {
            "awsPrincipalArn": xks::PRINCIPAL_ARN,
            "kmsOperation": "CreateKey",
            "kmsRequestId": "r".repeat(len),
        }});
        let r = post(&mut c, &op(KEY, "metadata"), body.to_string()).await;
        if len == 2048 {
            assert_eq!(
                r.status,
                200,
                "kmsRequestId of {len}: {}",
                String::from_utf8_lossy(&r.body)
            );
        } else {
            assert_error(&r, 400, "ValidationException", "kmsRequestId of 2049");
            assert!(
                String::from_utf8_lossy(&r.body)
                    .contains("requestMetadata.kmsRequestId is longer than 2048 bytes"),
                "{}",
                String::from_utf8_lossy(&r.body)
            );
        }
    }

    // Default limits (another key store): 64 KiB plaintext, and AAD up to the 2-byte prefix.
    let mut big = client_for_prefix(&proxy, "/big").await;
    let out = encrypt_ok(&mut big, KEY, &[1; 65536], Some(&[2; 65535])).await;
    assert_eq!(
        decrypt_ok(&mut big, KEY, &out, Some(&[2; 65535])).await,
        vec![1; 65536]
    );
    unsupported(
        &encrypt(&mut big, KEY, &[1; 65537], None, false).await,
        "plaintext 65537",
    );
    unsupported(
        &encrypt(&mut big, KEY, b"x", Some(&[2; 65536]), false).await,
        "AAD 65536",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_above_the_server_limit_is_unsupported() {
    let proxy = TestProxy::start_with(ProxyOptions {
        server_keys: "max_body_bytes = 24000".into(),
        ..Default::default()
    })
    .await;
    let mut c = proxy.tls_client().await;
    // The spec minimums fit in the smallest body limit the config accepts.
    let aad = vec![3u8; 8192];
    let out = encrypt_ok(&mut c, KEY, &[5; 4300], Some(&aad)).await;
    assert_eq!(
        decrypt_ok(&mut c, KEY, &out, Some(&aad)).await,
        vec![5; 4300]
    );
    let padding = "p".repeat(24000);
    for (suffix, body) in [
        ("health".to_string(), xks::health_body()),
        (op(KEY, "metadata"), xks::metadata_body()),
        (
            op(KEY, "encrypt"),
            xks::encrypt_body(ARN, MARKER, None, false),
        ),
    ] {
        let body = mutate(body, |v| v["padding"] = json!(padding));
        // A fresh connection each time: the server may close one whose body it did not read.
        let mut fresh = proxy.tls_client().await;
        let r = post(&mut fresh, &suffix, body).await;
        assert_error(
            &r,
            501,
            "UnsupportedOperationException",
            &format!("oversize body on {suffix}"),
        );
    }
    // Unsigned oversize bodies are refused the same way, before authentication.
    let unsigned = SignOptions {
        unsigned: true,
        ..Default::default()
    };
    let body = mutate(xks::health_body(), |v| v["padding"] = json!(padding));
    let mut fresh = proxy.tls_client().await;
    let r = post_with(&mut fresh, "health", body, &unsigned).await;
    assert_error(
        &r,
        501,
        "UnsupportedOperationException",
        "unsigned oversize body",
    );
    // Without a Content-Length (chunked), the limit is enforced while reading.
    let mut chunked = http::HeaderMap::new();
    chunked.insert(
        http::header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    let chunked = SignOptions {
        after_sign_headers: chunked,
        ..Default::default()
    };
    let r = post_with(&mut c, "health", xks::health_body(), &chunked).await;
    assert_ok(&r, "small chunked body");
    let body = mutate(xks::health_body(), |v| v["padding"] = json!(padding));
    let mut fresh = proxy.tls_client().await;
    let r = post_with(&mut fresh, "health", body, &chunked).await;
    assert_error(
        &r,
        501,
        "UnsupportedOperationException",
        "oversize chunked body",
    );
    assert_ok(&health(&mut c).await, "health after oversize bodies");
}

// ---------------------------------------------------------------------------------------------
// InvalidStateException: disabled key store, kill switch, disabled keys, custody
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_key_store_answers_invalid_state() {
    let proxy = TestProxy::start_with(ProxyOptions {
        key_store_keys: "enabled = false".into(),
        tables: extra_store("live", "/live", ""),
        ..Default::default()
    })
    .await;
    let mut c = proxy.tls_client().await;
    let r = health(&mut c).await;
    assert_error(&r, 400, "InvalidStateException", "health");
    let r = metadata(&mut c, KEY).await;
    assert_error(&r, 400, "InvalidStateException", "metadata");
    let r = encrypt(&mut c, KEY, MARKER, None, false).await;
    assert_error(&r, 400, "InvalidStateException", "encrypt");
    let body = xks::decrypt_body(ARN, b"abcd", &[1; 12], &[2; 16], None, Some(SPEC_METADATA));
    let r = post(&mut c, &op(KEY, "decrypt"), body).await;
    assert_error(&r, 400, "InvalidStateException", "decrypt");
    // Authentication still comes first.
    let unsigned = SignOptions {
        unsigned: true,
        ..Default::default()
    };
    let r = post_with(&mut c, "health", xks::health_body(), &unsigned).await;
    assert_error(
        &r,
        401,
        "AuthenticationFailedException",
        "unsigned, disabled store",
    );
    // Other key stores are unaffected.
    let mut live = client_for_prefix(&proxy, "/live").await;
    assert_ok(&health(&mut live).await, "health, live store");
    encrypt_ok(&mut live, KEY, b"live", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_refuses_key_operations_until_released() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let out = encrypt_ok(&mut c, KEY, b"before", None).await;
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    let kill = proxy.dir.path().join("KILL");
    std::fs::write(&kill, b"engaged by test\n").unwrap();

    let c = tokio::sync::Mutex::new(c);
    let r = poll_until(
        "kill switch engaged",
        || async { encrypt(&mut *c.lock().await, KEY, MARKER, None, false).await },
        |r| r.status != 200,
    )
    .await;
    let mut c = c.into_inner();
    assert_error(
        &r,
        400,
        "InvalidStateException",
        "encrypt under the kill switch",
    );
    let r = decrypt(&mut c, KEY, &out, None).await;
    assert_error(
        &r,
        400,
        "InvalidStateException",
        "decrypt under the kill switch",
    );
    let r = metadata(&mut c, KEY).await;
    assert_eq!(
        assert_ok(&r, "metadata under the kill switch")["keyStatus"],
        "DISABLED"
    );
    let (status, body) = proxy.admin_get("/readyz").await;
    assert_eq!(status, 503, "readyz under the kill switch: {body}");

    std::fs::remove_file(&kill).unwrap();
    let c = tokio::sync::Mutex::new(c);
    poll_until(
        "kill switch released",
        || async { encrypt(&mut *c.lock().await, KEY, b"after", None, false).await },
        |r| r.status == 200,
    )
    .await;
    let mut c = c.into_inner();
    assert_eq!(decrypt_ok(&mut c, KEY, &out, None).await, b"before");
    assert_eq!(
        assert_ok(&metadata(&mut c, KEY).await, "metadata")["keyStatus"],
        "ENABLED"
    );
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_disabled_keys_report_disabled_and_refuse() {
    let mut proxy = TestProxy::start_with(ProxyOptions {
        security_keys: "disabled_keys = [\"dev-aes-1\"]".into(),
        ..Default::default()
    })
    .await;
    let mut c = proxy.tls_client().await;
    let r = metadata(&mut c, KEY).await;
    let v = assert_ok(&r, "metadata of a disabled key");
    assert_eq!(v["keyStatus"], "DISABLED");
    assert_eq!(v["keySpec"], "AES_256");
    let r = encrypt(&mut c, KEY, MARKER, None, false).await;
    assert_error(
        &r,
        400,
        "InvalidStateException",
        "encrypt with a disabled key",
    );
    let body = xks::decrypt_body(ARN, b"abcd", &[1; 12], &[2; 16], None, Some(SPEC_METADATA));
    let r = post(&mut c, &op(KEY, "decrypt"), body).await;
    assert_error(
        &r,
        400,
        "InvalidStateException",
        "decrypt with a disabled key",
    );
    // Other keys are unaffected.
    assert_eq!(
        assert_ok(&metadata(&mut c, ENC_ONLY).await, "other key")["keyStatus"],
        "ENABLED"
    );
    encrypt_ok(&mut c, ENC_ONLY, b"fine", None).await;
    // Re-enabled by a reload, on the same connection.
    proxy.reload_with(ProxyOptions::default());
    assert_eq!(
        assert_ok(&metadata(&mut c, KEY).await, "re-enabled")["keyStatus"],
        "ENABLED"
    );
    let out = encrypt_ok(&mut c, KEY, b"enabled again", None).await;
    assert_eq!(decrypt_ok(&mut c, KEY, &out, None).await, b"enabled again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_check_refuses_exportable_and_ambiguous_keys() {
    let token = TestToken::new();
    let extractable = KeySpec {
        extractable: true,
        ..KeySpec::aes256("extractable-aes")
    };
    assert!(token.add_key(&extractable).info.extractable);
    let readable = KeySpec {
        sensitive: false,
        ..KeySpec::aes256("extractable-readable")
    };
    assert!(!token.add_key(&readable).info.sensitive);
    // Two keys with one label (the bootstrap's non-idempotent generator exists for this test).
    for _ in 0..2 {
        generate_key(
            &token.module,
            &token.label,
            &token.pin(),
            &KeySpec::aes256("dup-aes"),
        )
        .expect("duplicate key");
    }
    let proxy = TestProxy::start_on(token, ProxyOptions::default()).await;
    let mut c = proxy.tls_client().await;

    for (key, why) in [
        ("extractable-aes", "extractable"),
        ("extractable-readable", "sensitive"),
    ] {
        let r = metadata(&mut c, key).await;
        let v = assert_ok(&r, key);
        assert_eq!(v["keyStatus"], "DISABLED", "{key}");
        assert_eq!(v["keySpec"], "AES_256", "{key}");
        let r = encrypt(&mut c, key, MARKER, None, false).await;
        assert_error(
            &r,
            400,
            "InvalidStateException",
            &format!("encrypt with {key}"),
        );
        assert!(
            error_message(&r).contains(why),
            "{key}: {}",
            error_message(&r)
        );
        let body = xks::decrypt_body(ARN, b"abcd", &[1; 12], &[2; 16], None, Some(SPEC_METADATA));
        let r = post(&mut c, &op(key, "decrypt"), body).await;
        assert_error(
            &r,
            400,
            "InvalidStateException",
            &format!("decrypt with {key}"),
        );
    }

    // Two keys with one label: the proxy refuses to guess (documented in hsm/keys.rs:
    // `find_unique` reports KeyDisabled → InvalidStateException) for every API.
    let r = metadata(&mut c, "dup-aes").await;
    assert_error(
        &r,
        400,
        "InvalidStateException",
        "metadata of an ambiguous label",
    );
    let r = encrypt(&mut c, "dup-aes", MARKER, None, false).await;
    assert_error(
        &r,
        400,
        "InvalidStateException",
        "encrypt with an ambiguous label",
    );
    assert!(
        error_message(&r).contains("ambiguous"),
        "{}",
        error_message(&r)
    );
    // Good keys are unaffected.
    encrypt_ok(&mut c, KEY, b"fine", None).await;
}

// ---------------------------------------------------------------------------------------------
// Throttling, observability, HSM sessions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn full_hsm_queue_answers_throttling() {
    let proxy = TestProxy::start_with(ProxyOptions {
        hsm_keys: "workers = 1\nqueue_capacity = 1".into(),
        ..Default::default()
    })
    .await;
    let connector = XksConnector::new(Arc::new(proxy.client_config("tls"))).unwrap();
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(connector.connect().await.expect("connect"));
    }
    let rejections = "ekm_hsm_queue_rejections_total";
    let before = proxy.metric(rejections).await;
    let plaintext = Arc::new(vec![0x5au8; 4300]);
    let (mut ok, mut throttled) = (0usize, 0usize);
    // Bursts of 64 concurrent encrypts on separate connections until one is throttled (with
    // one worker and one queue slot the first burst normally is), at most 20 bursts.
    for _ in 0..20 {
        let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
        let mut tasks = tokio::task::JoinSet::new();
        for mut client in clients.drain(..) {
            let (barrier, plaintext) = (barrier.clone(), plaintext.clone());
            tasks.spawn(async move {
                let body = xks::encrypt_body(ARN, &plaintext, None, false);
                barrier.wait().await;
                let r = client
                    .post(&op(KEY, "encrypt"), body)
                    .await
                    .expect("request");
                (client, r)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (client, r) = joined.unwrap();
            match r.status {
                200 => {
                    xks::parse_encrypt_response(&r.body).expect("encrypt response");
                    ok += 1;
                }
                429 => {
                    assert_error(&r, 429, "ThrottlingException", "queue full");
                    throttled += 1;
                }
                other => panic!(
                    "only 200 or 429 expected, got {other}: {}",
                    String::from_utf8_lossy(&r.body)
                ),
            }
            clients.push(client);
        }
        if throttled > 0 {
            break;
        }
    }
    assert!(throttled > 0, "no ThrottlingException in {ok} encrypts");
    assert!(ok > 0, "some encrypts succeed");
    let after = proxy.metric(rejections).await;
    assert_eq!(
        after - before,
        throttled as f64,
        "{rejections} counts every 429"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_admin_endpoints() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let ok_series = "ekm_requests_total{front=\"xks\",op=\"encrypt\",outcome=\"ok\"}";
    let bad_ct =
        "ekm_requests_total{front=\"xks\",op=\"decrypt\",outcome=\"InvalidCiphertextException\"}";
    let auth = "ekm_auth_failures_total{front=\"xks\",reason=\"signature_mismatch\"}";
    let hits = "ekm_cache_hits_total{cache=\"hsm_key\"}";
    let misses = "ekm_cache_misses_total{cache=\"hsm_key\"}";
    let (ok0, bad0, auth0, hits0, misses0) = (
        proxy.metric(ok_series).await,
        proxy.metric(bad_ct).await,
        proxy.metric(auth).await,
        proxy.metric(hits).await,
        proxy.metric(misses).await,
    );
    let mut out = encrypt_ok(&mut c, KEY, b"one", None).await;
    encrypt_ok(&mut c, KEY, b"two", None).await;
    encrypt_ok(&mut c, KEY, b"three", None).await;
    out.tag[0] ^= 1;
    let r = decrypt(&mut c, KEY, &out, None).await;
    assert_error(&r, 400, "InvalidCiphertextException", "bad tag");
    let wrong = SignOptions {
        secret: Some(SecretString::from(SECRET_2)),
        ..Default::default()
    };
    let r = post_with(&mut c, "health", xks::health_body(), &wrong).await;
    assert_error(&r, 401, "AuthenticationFailedException", "wrong secret");

    // Counters are bumped before the response is written, so no polling is needed.
    assert_eq!(proxy.metric(ok_series).await, ok0 + 3.0);
    assert_eq!(proxy.metric(bad_ct).await, bad0 + 1.0);
    assert_eq!(proxy.metric(auth).await, auth0 + 1.0);
    // Keys were warmed at start: the dev key is served from the cache.
    assert!(proxy.metric(hits).await > hits0);
    assert_eq!(
        proxy.metric(misses).await,
        misses0,
        "warmed cache: no misses for dev-aes-1"
    );
    assert!(
        proxy
            .metric("ekm_request_duration_seconds_count{front=\"xks\",op=\"encrypt\"}")
            .await
            >= 3.0
    );
    assert!(
        proxy
            .metric("ekm_hsm_op_duration_seconds_count{op=\"encrypt\"}")
            .await
            >= 3.0
    );
    assert_eq!(proxy.metric("ekm_hsm_sessions").await, 2.0);

    let (status, text) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE ekm_requests_total counter"), "{text}");
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    let (status, body) = proxy.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["status"], "ACTIVE");
    assert_eq!(proxy.admin_get("/ping").await.0, 200);
    assert_eq!(proxy.admin_get("/no-such-page").await.0, 404);

    // Load-balancer ping on the TLS listener itself, unauthenticated.
    let host = host_of(&proxy, "tls");
    let r = send_method(&mut c, &host, http::Method::GET, "/ping").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"pong");
    assert!(!c.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tag_stream_costs_no_session() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let out = encrypt_ok(&mut c, KEY, b"stream", Some(SPEC_AAD)).await;
    let reopens = "ekm_hsm_session_reopens_total";
    let logins = "ekm_hsm_logins_total";
    let (reopens0, logins0) = (proxy.metric(reopens).await, proxy.metric(logins).await);
    assert!(logins0 >= 1.0, "the workers logged in at start");
    let mut bad = out.clone();
    for i in 0..100usize {
        bad.tag = out.tag.clone();
        bad.tag[i % 16] ^= 1 << (i % 8);
        let r = decrypt(&mut c, KEY, &bad, Some(SPEC_AAD)).await;
        assert_error(
            &r,
            400,
            "InvalidCiphertextException",
            &format!("bad tag #{i}"),
        );
    }
    assert_eq!(proxy.metric(reopens).await, reopens0, "no session reopened");
    assert_eq!(proxy.metric(logins).await, logins0, "no new login");
    assert_eq!(proxy.metric("ekm_hsm_sessions").await, 2.0);
    assert_eq!(
        decrypt_ok(&mut c, KEY, &out, Some(SPEC_AAD)).await,
        b"stream"
    );
    let r = health(&mut c).await;
    assert_eq!(
        assert_ok(&r, "health")["ekmFleetDetails"][0]["healthStatus"],
        "ACTIVE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_sessions_recover_without_restart() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let out = encrypt_ok(&mut c, KEY, b"survives", None).await;
    let reopens = "ekm_hsm_session_reopens_total";
    let logins = "ekm_hsm_logins_total";
    let backend = proxy.running().service().backend().clone();

    // Lost sessions: every worker's session is closed for real.
    let reopens0 = proxy.metric(reopens).await;
    let closed = backend.close_all_sessions().await.expect("drill");
    assert_eq!(closed, 2, "both workers closed their sessions");
    poll_until(
        "workers reconnected",
        || proxy.metric("ekm_hsm_sessions"),
        |n| *n == 2.0,
    )
    .await;
    assert!(
        proxy.metric(reopens).await >= reopens0 + 2.0,
        "reopens counted"
    );
    let again = encrypt_ok(&mut c, KEY, b"after reopen", None).await;
    assert_eq!(decrypt_ok(&mut c, KEY, &again, None).await, b"after reopen");
    assert_eq!(decrypt_ok(&mut c, KEY, &out, None).await, b"survives");

    // Lost login (the token forgot us): the next request logs in again transparently.
    let logins0 = proxy.metric(logins).await;
    backend.logout_all_sessions().await.expect("logout drill");
    let r = encrypt(&mut c, KEY, b"after logout", None, false).await;
    assert_ok(&r, "first encrypt after a lost login");
    assert!(proxy.metric(logins).await > logins0, "logged in again");
    assert_eq!(decrypt_ok(&mut c, KEY, &out, None).await, b"survives");
    let r = metadata(&mut c, DEC_ONLY).await;
    assert_ok(&r, "metadata after a lost login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_get_their_own_answers() {
    let proxy = TestProxy::start().await;
    let connector = XksConnector::new(Arc::new(proxy.client_config("tls"))).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16u32 {
        let mut c = connector.connect().await.expect("connect");
        tasks.spawn(async move {
            for i in 0..8u32 {
                let plaintext = format!("task {t} message {i}").repeat(1 + (t + i) as usize % 5);
                let aad = format!("aad {t}/{i}");
                let out = encrypt_ok(&mut c, KEY, plaintext.as_bytes(), Some(aad.as_bytes())).await;
                let back = decrypt_ok(&mut c, KEY, &out, Some(aad.as_bytes())).await;
                assert_eq!(back, plaintext.as_bytes(), "task {t} message {i}");
                let r = decrypt(&mut c, KEY, &out, Some(b"someone else's AAD")).await;
                assert_error(&r, 400, "InvalidCiphertextException", "crossed AAD");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    let reopens = proxy.metric("ekm_hsm_session_reopens_total").await;
    assert_eq!(reopens, 0.0, "128 bad tags cost no session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_outage_is_reported_and_answered_as_retryable() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.tls_client().await;
    let out = encrypt_ok(&mut c, KEY, b"before the outage", None).await;
    let backend = proxy.running().service().backend().clone();
    tokio::task::spawn_blocking(move || backend.shutdown())
        .await
        .unwrap();

    // Crypto: InternalException (500, retryable), with a generic message.
    let r = encrypt(&mut c, KEY, MARKER, None, false).await;
    assert_error(&r, 500, "InternalException", "encrypt with the HSM down");
    assert!(!error_message(&r).contains("CKR_"), "{}", error_message(&r));
    let r = decrypt(&mut c, KEY, &out, None).await;
    assert_error(&r, 500, "InternalException", "decrypt with the HSM down");
    // Health tells the truth once its cache (max_age_secs = 1) expires.
    let c = tokio::sync::Mutex::new(c);
    let r = poll_until(
        "health reports UNAVAILABLE",
        || async { health(&mut *c.lock().await).await },
        |r| {
            r.status != 200
                || r.json()
                    .is_ok_and(|v| v["ekmFleetDetails"][0]["healthStatus"] != "ACTIVE")
        },
    )
    .await;
    let v = assert_ok(&r, "health with the HSM down");
    assert_eq!(
        v["ekmFleetDetails"][0]["healthStatus"], "UNAVAILABLE",
        "{v}"
    );
    let (status, body) = proxy.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn hsm_deadline_answers_dependency_timeout() {
    let proxy = TestProxy::start_with(ProxyOptions {
        hsm_keys: "workers = 1\nqueue_capacity = 4096\nop_timeout_ms = 1".into(),
        ..Default::default()
    })
    .await;
    let connector = XksConnector::new(Arc::new(proxy.client_config("tls"))).unwrap();
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(connector.connect().await.expect("connect"));
    }
    let plaintext = Arc::new(vec![0x5au8; 4300]);
    let mut timed_out = 0usize;
    for _ in 0..20 {
        let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
        let mut tasks = tokio::task::JoinSet::new();
        for mut client in clients.drain(..) {
            let (barrier, plaintext) = (barrier.clone(), plaintext.clone());
            tasks.spawn(async move {
                let body = xks::encrypt_body(ARN, &plaintext, None, false);
                barrier.wait().await;
                let r = client
                    .post(&op(KEY, "encrypt"), body)
                    .await
                    .expect("request");
                (client, r)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (client, r) = joined.unwrap();
            match r.status {
                200 => {
                    xks::parse_encrypt_response(&r.body).expect("encrypt response");
                }
                503 => {
                    assert_error(&r, 503, "DependencyTimeoutException", "HSM deadline");
                    timed_out += 1;
                }
                other => panic!(
                    "only 200 or 503 expected, got {other}: {}",
                    String::from_utf8_lossy(&r.body)
                ),
            }
            clients.push(client);
        }
        if timed_out > 0 {
            break;
        }
    }
    assert!(
        timed_out > 0,
        "no DependencyTimeoutException with a 1 ms HSM deadline"
    );
}

// ---------------------------------------------------------------------------------------------
// mTLS
// ---------------------------------------------------------------------------------------------

/// Connect to the mTLS listener presenting `cert` (PEM cert, PEM key) or none, and send one
/// request; returns the error the client saw (with TLS 1.3 the server's alert arrives after the
/// client considers the handshake done, i.e. on the first request).
async fn rejected_mtls_client(proxy: &TestProxy, cert: Option<PemPair>) -> ClientError {
    let mut cfg = proxy.client_config("mtls");
    let tls = cfg.tls.as_mut().unwrap();
    (tls.client_cert_pem, tls.client_key_pem) = match cert {
        Some((c, k)) => (Some(c.into_bytes()), Some(k.into_bytes())),
        None => (None, None),
    };
    match XksClient::connect(Arc::new(cfg)).await {
        Err(e) => e,
        Ok(mut c) => match c.post("health", xks::health_body()).await {
            Ok(r) => panic!("mTLS listener served a rejected client: {}", r.status),
            Err(e) => e,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_listener_serves_good_clients_and_aborts_others() {
    let proxy = TestProxy::start().await;
    let mut c = proxy.client("mtls").await;
    assert_ok(&health(&mut c).await, "health over mTLS");
    assert_eq!(
        assert_ok(&metadata(&mut c, KEY).await, "metadata over mTLS")["keySpec"],
        "AES_256"
    );
    let out = encrypt_ok(&mut c, KEY, b"mutual", Some(SPEC_AAD)).await;
    assert_eq!(
        decrypt_ok(&mut c, KEY, &out, Some(SPEC_AAD)).await,
        b"mutual"
    );
    let r = encrypt(&mut c, ENC_ONLY, MARKER, None, true).await;
    assert_error(
        &r,
        400,
        "InvalidKeyUsageException",
        "CDIV on encrypt-only over mTLS",
    );
    let r = post_with(
        &mut c,
        "health",
        xks::health_body(),
        &SignOptions {
            unsigned: true,
            ..Default::default()
        },
    )
    .await;
    assert_error(
        &r,
        401,
        "AuthenticationFailedException",
        "mTLS does not replace SigV4",
    );
    // Ciphertexts move freely between listeners (same key store).
    let mut plain_tls = proxy.tls_client().await;
    assert_eq!(
        decrypt_ok(&mut plain_tls, KEY, &out, Some(SPEC_AAD)).await,
        b"mutual"
    );

    let failures = "ekm_tls_handshake_failures_total";
    let other_ca = Authority::new("another CA").unwrap();
    let pair =
        |c: ekm_proxy::dev::certs::IssuedCert| Some((c.cert_pem.clone(), (*c.key_pem).clone()));
    let cases: Vec<(&str, Option<PemPair>, AlertDescription)> = vec![
        // rustls itself rejects an empty Certificate message with certificate_required before any
        // verifier runs (documented in src/server/tls/client_auth.rs).
        (
            "no certificate",
            None,
            AlertDescription::CertificateRequired,
        ),
        (
            "expired",
            pair(
                proxy
                    .pki
                    .ca
                    .issue_client(CLIENT_SUBJECT, Validity::Expired)
                    .unwrap(),
            ),
            AlertDescription::HandshakeFailure,
        ),
        (
            "not yet valid",
            pair(
                proxy
                    .pki
                    .ca
                    .issue_client(CLIENT_SUBJECT, Validity::NotYetValid)
                    .unwrap(),
            ),
            AlertDescription::HandshakeFailure,
        ),
        (
            "self-signed",
            pair(self_signed_client(CLIENT_SUBJECT).unwrap()),
            AlertDescription::HandshakeFailure,
        ),
        (
            "another CA",
            pair(
                other_ca
                    .issue_client(CLIENT_SUBJECT, Validity::Current)
                    .unwrap(),
            ),
            AlertDescription::HandshakeFailure,
        ),
        (
            "wrong subject",
            pair(
                proxy
                    .pki
                    .ca
                    .issue_client("someone-else", Validity::Current)
                    .unwrap(),
            ),
            AlertDescription::HandshakeFailure,
        ),
        (
            "server certificate as client",
            pair(proxy.pki.ca.issue_server(&[CLIENT_SUBJECT]).unwrap()),
            AlertDescription::HandshakeFailure,
        ),
    ];
    for (what, cert, alert) in cases {
        let before = proxy.metric(failures).await;
        let err = rejected_mtls_client(&proxy, cert).await;
        assert_eq!(err.tls_alert(), Some(alert), "{what}: {err}");
        poll_until(
            &format!("{failures} after {what}"),
            || proxy.metric(failures),
            |n| *n >= before + 1.0,
        )
        .await;
    }
    // The good client is still served, on its existing connection and on a new one.
    assert_ok(&health(&mut c).await, "existing mTLS connection");
    let mut fresh = proxy.client("mtls").await;
    assert_ok(&health(&mut fresh).await, "new mTLS connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_prefixes_route_to_the_longest_match() {
    // Store "" serves /kms/xks/v1/...; store "/kms/xks/v1/dev" serves
    // /kms/xks/v1/dev/kms/xks/v1/..., which also starts with the first store's base. Each
    // exposes a different key, so a request that lands in the wrong store gets KeyNotFound.
    let store = |name: &str, prefix: &str, key: &str| {
        format!(
            "\n[[xks.key_store]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nregions = [\"us-east-1\"]\nkeys = [\"{key}\"]\n[[xks.key_store.credential]]\naccess_key_id = \"{ACCESS_KEY_ID}\"\nsecret = \"{SECRET}\"\n"
        )
    };
    let proxy = TestProxy::start_with(ProxyOptions {
        tables: format!(
            "{}{}",
            store("root", "", KEY),
            store("nested", "/kms/xks/v1/dev", DEC_ONLY)
        ),
        ..Default::default()
    })
    .await;
    let mut root = client_for_prefix(&proxy, "").await;
    let mut nested = client_for_prefix(&proxy, "/kms/xks/v1/dev").await;
    assert_ok(&health(&mut root).await, "root store health");
    assert_ok(&health(&mut nested).await, "nested store health");
    assert_ok(&metadata(&mut root, KEY).await, "root store key");
    assert_ok(&metadata(&mut nested, DEC_ONLY).await, "nested store key");
    assert_error(
        &metadata(&mut nested, KEY).await,
        404,
        "KeyNotFoundException",
        "root's key through the nested store",
    );
    assert_error(
        &metadata(&mut root, DEC_ONLY).await,
        404,
        "KeyNotFoundException",
        "nested store's key through the root store",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_never_exposes_the_health_check_key() {
    let proxy = TestProxy::start_with(ProxyOptions {
        tables: "\n[[xks.key_store]]\nname = \"all\"\npath_prefix = \"/all\"\nregions = [\"us-east-1\"]\nkeys = [\"*\"]\n"
            .to_owned()
            + &format!(
                "[[xks.key_store.credential]]\naccess_key_id = \"{ACCESS_KEY_ID}\"\nsecret = \"{SECRET}\"\n"
            ),
        ..Default::default()
    })
    .await;
    let mut all = client_for_prefix(&proxy, "/all").await;
    assert_ok(
        &metadata(&mut all, KEY).await,
        "an ordinary key through '*'",
    );
    assert_error(
        &metadata(&mut all, "ekm-health-check").await,
        404,
        "KeyNotFoundException",
        "the health-check key through '*'",
    );
    let r = post(
        &mut all,
        &op("ekm-health-check", "encrypt"),
        xks::encrypt_body(ARN, b"customer data", None, false),
    )
    .await;
    assert_error(
        &r,
        404,
        "KeyNotFoundException",
        "encrypt under the health key",
    );
    // Health itself still works (it uses the key internally).
    assert_ok(&health(&mut all).await, "health");
}

/// TLS 1.3: curl sends its request right after its Finished; the proxy rejects the certificate
/// with handshake_failure. Closing at once with that request unread makes the kernel answer with
/// a RST that can overtake the alert ("Connection reset" / "Broken pipe"); the lingering close
/// drains it so the client reads the alert. Twenty in a row, for two kinds of rejected
/// certificate, each posting a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_client_certificates_get_the_alert_not_a_reset() {
    let proxy = TestProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let write_pair = |name: &str, cert: &ekm_proxy::dev::certs::IssuedCert| {
        write_cert_pair(dir.path(), name, cert)
    };
    let expired = write_pair(
        "expired",
        &proxy
            .pki
            .ca
            .issue_client(CLIENT_SUBJECT, Validity::Expired)
            .unwrap(),
    );
    let self_signed = write_pair("self-signed", &self_signed_client(CLIENT_SUBJECT).unwrap());
    let port = proxy.addr("mtls").port();
    // A body curl is still sending when the proxy rejects the certificate.
    // Without the lingering close this size makes curl fail with "Send failure: Broken pipe"
    // (exit 55) within a few attempts; it stays under the 64 KiB the proxy drains.
    let body = xks::encrypt_body(ARN, &[b'p'; 24_000], Some(SPEC_AAD), false);
    for (what, pair) in [("expired", &expired), ("self-signed", &self_signed)] {
        for i in 0..20 {
            let call = Curl {
                port,
                ca: proxy.pki.ca_pem.clone(),
                client_cert: Some(pair.clone()),
                user: format!("{ACCESS_KEY_ID}:{SECRET}"),
                url: format!(
                    "https://localhost:{port}{}/{}",
                    base(PREFIX),
                    op(KEY, "encrypt")
                ),
                body: body.clone(),
                extra: vec!["--tlsv1.3".into(), "--http1.1".into()],
            };
            let r = tokio::task::spawn_blocking(move || call.run())
                .await
                .unwrap();
            assert_eq!(r.status, None, "{what} #{i}: got an HTTP answer {r:?}");
            assert!(
                r.stderr.contains("alert handshake failure"),
                "{what} #{i}: curl exit {:?} without the alert: {}",
                r.exit,
                r.stderr
            );
            assert_eq!(r.exit, Some(56), "{what} #{i}: {}", r.stderr);
        }
    }
}
