//! The Azure Managed HSM front end end to end: the real server in-process over real mutual TLS,
//! a real SoftHSMv2 token, and independent implementations checking the answers (the RFC 3394
//! §4.6 vector, the `aes-kw` crate for RFC 5649, the `rsa` crate encrypting to the `n`/`e` the
//! proxy reports). Then every refusal the API defines: api-version, key identifier, base64url,
//! request_context, algorithm, certificate (none, another prefix's CA, another subject, one the
//! listener refuses in the handshake), tampered values, disabled keys and rules.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ekm_proxy::client::{ClientTls, XksClient};
use ekm_proxy::dev::certs::{Authority, Validity};
use ekm_proxy::dev::profile::{AZURE_AES_KEY, AZURE_RSA_KEY, azure_dev_key_specs};
use ekm_proxy::hsm::{KeySpec, TokenSelector};
use serde_json::{Value, json};

use common::proxy::{CLIENT_SUBJECT, ProxyOptions, TestProxy};
use common::softhsm::TestToken;

const API: &str = "api-version=0.1-preview";
const RFC3394_KEK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const RFC3394_DATA: &str = "00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f";
const RFC3394_WRAPPED: &str =
    "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21";

/// A proxy with the Azure front: `/azure` (any key, the listener's CA, the test client's
/// subject), `/azure/strict` (a rule pinning the pool name), `/azure/other-ca` (a CA the client
/// does not chain to), `/azure/other-subject` (a subject the client does not carry) and
/// `/azure/off` (disabled). The token holds the dev keys, the Azure dev keys and the RFC KEK.
async fn proxy() -> (TestProxy, tempfile::TempDir) {
    let token = TestToken::new();
    for spec in azure_dev_key_specs() {
        token.add_key(&spec);
    }
    let kek = KeySpec::aes256("rfc-kek")
        .with_usage(["wrap", "unwrap"])
        .unwrap();
    ekm_proxy::hsm::import_aes_key(
        &token.module,
        &TokenSelector::Label(token.label.clone()),
        &token.pin(),
        &kek,
        &hex::decode(RFC3394_KEK).unwrap(),
    )
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("other-ca.pem");
    std::fs::write(
        &other_ca,
        Authority::new("another tenant's CA").unwrap().cert_pem(),
    )
    .unwrap();
    let tables = format!(
        r#"
[azure]
ekm_vendor = "SoftHSM"
ekm_product = "SoftHSMv2"

[[azure.prefix]]
name = "pool-a"
path_prefix = "/azure"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["*"]

[[azure.prefix]]
name = "strict"
path_prefix = "/azure/strict"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["{AZURE_RSA_KEY}"]
[[azure.prefix.rule]]
name = "only-pool-a"
attribute = "poolName"
allow = ["pool-a"]
operations = ["wrap", "unwrap"]

[[azure.prefix]]
name = "other-ca"
path_prefix = "/azure/other-ca"
ca_bundle = "{other_ca}"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["*"]

[[azure.prefix]]
name = "other-subject"
path_prefix = "/azure/other-subject"
allowed_subjects = ["mhsm-pool-b.example"]
keys = ["*"]

[[azure.prefix]]
name = "off"
path_prefix = "/azure/off"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["*"]
enabled = false
"#,
        other_ca = other_ca.display()
    );
    let proxy = TestProxy::start_on(
        token,
        ProxyOptions {
            tables,
            ..ProxyOptions::default()
        },
    )
    .await;
    (proxy, other)
}

/// A client on `listener` (`mtls` presents the test client certificate).
async fn client(p: &TestProxy, listener: &str) -> XksClient {
    XksClient::connect(Arc::new(p.client_config(listener)))
        .await
        .expect("connect")
}

fn context(pool: &str) -> Value {
    json!({"request_id": "req-1", "correlation_id": "corr-1", "pool_name": pool})
}

async fn post(c: &mut XksClient, path_and_query: &str, body: &Value) -> (u16, Value) {
    post_raw(c, path_and_query, serde_json::to_vec(body).unwrap()).await
}

async fn post_raw(c: &mut XksClient, path_and_query: &str, body: Vec<u8>) -> (u16, Value) {
    send(c, http::Method::POST, path_and_query, body).await
}

async fn send(
    c: &mut XksClient,
    method: http::Method,
    path_and_query: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = c.send_raw(req).await.expect("request");
    let v = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&resp.body)}));
    (resp.status, v)
}

async fn wrap(c: &mut XksClient, key: &str, alg: &str, data: &[u8]) -> (u16, Value) {
    let body =
        json!({"request_context": context("pool-a"), "alg": alg, "value": B64URL.encode(data)});
    post(c, &format!("/azure/{key}/wrapkey?{API}"), &body).await
}

async fn unwrap(c: &mut XksClient, key: &str, alg: &str, data: &[u8]) -> (u16, Value) {
    let body =
        json!({"request_context": context("pool-a"), "alg": alg, "value": B64URL.encode(data)});
    post(c, &format!("/azure/{key}/unwrapkey?{API}"), &body).await
}

fn value(v: &Value) -> Vec<u8> {
    B64URL
        .decode(
            v["value"]
                .as_str()
                .unwrap_or_else(|| panic!("no value: {v}")),
        )
        .unwrap()
}

fn assert_error(got: &(u16, Value), status: u16, code: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["code"], code, "{what}: {}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_metadata_report_what_the_hsm_holds() {
    let (p, _other) = proxy().await;
    let mut c = client(&p, "mtls").await;
    let (status, info) = post(
        &mut c,
        &format!("/azure/info?{API}"),
        &json!({"request_context": context("pool-a")}),
    )
    .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["api_version"], "0.1-preview");
    assert_eq!(info["ekm_vendor"], "SoftHSM");
    assert!(
        info["proxy_name"]
            .as_str()
            .unwrap()
            .starts_with("ekm-proxy ")
    );
    assert_eq!(
        info["supported_algorithms"],
        json!(["A256KW", "A256KWP", "RSA-OAEP"]),
        "found by trial on SoftHSM 2.6.1"
    );

    let (status, md) = post(
        &mut c,
        &format!("/azure/{AZURE_AES_KEY}/metadata?{API}"),
        &json!({"request_context": context("pool-a")}),
    )
    .await;
    assert_eq!(status, 200, "{md}");
    assert_eq!(
        md,
        json!({"key_type": "oct", "key_size": 256, "key_ops": ["wrapKey", "unwrapKey"]})
    );

    let (status, md) = post(
        &mut c,
        &format!("/azure/{AZURE_RSA_KEY}/metadata?{API}"),
        &json!({"request_context": context("pool-a")}),
    )
    .await;
    assert_eq!(status, 200, "{md}");
    assert_eq!(md["key_type"], "RSA");
    assert_eq!(md["key_size"], 3072);
    assert_eq!(md["key_ops"], json!(["wrapKey", "unwrapKey"]));
    assert_eq!(md["e"], "AQAB");
    let n = B64URL.decode(md["n"].as_str().unwrap()).unwrap();
    assert_eq!(n.len(), 384);
    assert!(n[0] & 0x80 != 0, "a 3072-bit modulus without leading zeros");

    // key_ops say what the key's attributes allow here: dev-aes-1 may encrypt and decrypt, but
    // this HSM wraps by C_WrapKey, which needs CKA_WRAP; and wrapping with it is refused alike.
    let (status, md) = post(
        &mut c,
        &format!("/azure/dev-aes-1/metadata?{API}"),
        &json!({"request_context": context("pool-a")}),
    )
    .await;
    assert_eq!(status, 200, "{md}");
    assert_eq!(md["key_ops"], json!([]), "{md}");
    let got = wrap(&mut c, "dev-aes-1", "A256KW", &[1u8; 32]).await;
    assert_error(&got, 403, "Forbidden", "dev-aes-1 has no CKA_WRAP");
    assert!(
        got.1["message"].as_str().unwrap().contains("CKA_WRAP"),
        "{}",
        got.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_key_wrap_gives_the_known_answers() {
    let (p, _other) = proxy().await;
    let mut c = client(&p, "mtls").await;
    // RFC 3394 §4.6 through the proxy, with the RFC's KEK imported into the HSM.
    let data = hex::decode(RFC3394_DATA).unwrap();
    let got = wrap(&mut c, "rfc-kek", "A256KW", &data).await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(hex::encode(value(&got.1)), RFC3394_WRAPPED);
    let got = unwrap(
        &mut c,
        "rfc-kek",
        "A256KW",
        &hex::decode(RFC3394_WRAPPED).unwrap(),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(value(&got.1), data);

    // RFC 5649 against the aes-kw crate: every length unwraps; aligned lengths wrap byte for byte;
    // SoftHSM's unaligned wraps are refused with the clear 400 (its mechanism pads first).
    let kek: [u8; 32] = hex::decode(RFC3394_KEK).unwrap().try_into().unwrap();
    let reference = aes_kw::KekAes256::from(kek);
    for len in [1usize, 7, 8, 20, 32, 64] {
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
        let theirs = reference.wrap_with_padding_vec(&data).unwrap();
        let got = unwrap(&mut c, "rfc-kek", "A256KWP", &theirs).await;
        assert_eq!(got.0, 200, "length {len}: {}", got.1);
        assert_eq!(value(&got.1), data, "length {len}");
        let got = wrap(&mut c, "rfc-kek", "A256KWP", &data).await;
        if len % 8 == 0 {
            assert_eq!(got.0, 200, "length {len}: {}", got.1);
            assert_eq!(value(&got.1), theirs, "length {len}");
        } else {
            assert_error(&got, 400, "InvalidRequest", &format!("length {len}"));
            assert!(
                got.1["message"]
                    .as_str()
                    .unwrap()
                    .contains("multiples of 8 bytes")
            );
        }
    }
    // The dev KEK round-trips a DEK with both algorithms.
    let dek = [0x42u8; 32];
    for alg in ["A256KW", "A256KWP"] {
        let wrapped = value(&wrap(&mut c, AZURE_AES_KEY, alg, &dek).await.1);
        assert_eq!(wrapped.len(), 40, "{alg}");
        assert_eq!(
            value(&unwrap(&mut c, AZURE_AES_KEY, alg, &wrapped).await.1),
            dek,
            "{alg}"
        );
        // A flipped bit fails the integrity check inside the HSM: 400, not 500.
        let mut bad = wrapped.clone();
        bad[5] ^= 1;
        assert_error(
            &unwrap(&mut c, AZURE_AES_KEY, alg, &bad).await,
            400,
            "InvalidRequest",
            alg,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_oaep_against_an_independent_implementation() {
    use rsa::traits::PublicKeyParts as _;

    let (p, _other) = proxy().await;
    let mut c = client(&p, "mtls").await;
    let (_, md) = post(
        &mut c,
        &format!("/azure/{AZURE_RSA_KEY}/metadata?{API}"),
        &json!({"request_context": context("pool-a")}),
    )
    .await;
    let n = rsa::BigUint::from_bytes_be(&B64URL.decode(md["n"].as_str().unwrap()).unwrap());
    let e = rsa::BigUint::from_bytes_be(&B64URL.decode(md["e"].as_str().unwrap()).unwrap());
    let public = rsa::RsaPublicKey::new(n, e).unwrap();
    assert_eq!(public.size(), 384);
    let dek = [0x17u8; 32];
    let mut rng = rsa::rand_core::OsRng;
    // Wrapped outside by the rsa crate (to n/e as reported), unwrapped inside the HSM.
    let sealed = public
        .encrypt(&mut rng, rsa::Oaep::new::<sha1::Sha1>(), &dek)
        .unwrap();
    let got = unwrap(&mut c, AZURE_RSA_KEY, "RSA-OAEP", &sealed).await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(value(&got.1), dek);
    // Wrapped inside, unwrapped inside.
    let wrapped = value(&wrap(&mut c, AZURE_RSA_KEY, "RSA-OAEP", &dek).await.1);
    assert_eq!(wrapped.len(), 384);
    assert_eq!(
        value(&unwrap(&mut c, AZURE_RSA_KEY, "RSA-OAEP", &wrapped).await.1),
        dek
    );
    // RSA-OAEP-256: SoftHSM 2.6.1 cannot; the clear 400 names the algorithm, both ways.
    let sealed256 = public
        .encrypt(&mut rng, rsa::Oaep::new::<sha2::Sha256>(), &dek)
        .unwrap();
    for got in [
        unwrap(&mut c, AZURE_RSA_KEY, "RSA-OAEP-256", &sealed256).await,
        wrap(&mut c, AZURE_RSA_KEY, "RSA-OAEP-256", &dek).await,
    ] {
        assert_error(&got, 400, "InvalidRequest", "RSA-OAEP-256");
        let message = got.1["message"].as_str().unwrap();
        assert!(message.contains("RSA-OAEP-256"), "{}", got.1);
        assert!(
            !message.contains("CKR_"),
            "PKCS#11 codes stay in the log: {message}"
        );
    }
    // A tampered block fails OAEP decoding inside the HSM.
    let mut bad = sealed.clone();
    bad[200] ^= 0x40;
    assert_error(
        &unwrap(&mut c, AZURE_RSA_KEY, "RSA-OAEP", &bad).await,
        400,
        "InvalidRequest",
        "tampered",
    );
    // The wrong algorithm for the key type is a 400 naming both.
    let got = wrap(&mut c, AZURE_RSA_KEY, "A256KW", &dek).await;
    assert_error(&got, 400, "InvalidRequest", "A256KW on RSA");
    assert!(got.1["message"].as_str().unwrap().contains("A256KW"));
    assert_error(
        &wrap(&mut c, AZURE_AES_KEY, "RSA-OAEP", &dek).await,
        400,
        "InvalidRequest",
        "RSA-OAEP on AES",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_apis_errors() {
    let (p, _other) = proxy().await;
    let mut c = client(&p, "mtls").await;
    let ctx = json!({"request_context": context("pool-a")});
    let good = json!({"request_context": context("pool-a"), "alg": "A256KW", "value": B64URL.encode([1u8; 32])});
    let wrap_path = format!("/azure/{AZURE_AES_KEY}/wrapkey");
    for (path, body, status, code, what) in [
        (
            wrap_path.clone(),
            good.clone(),
            400,
            "InvalidRequest",
            "no api-version",
        ),
        (
            format!("{wrap_path}?api-version=7.4"),
            good.clone(),
            400,
            "InvalidRequest",
            "other api-version",
        ),
        (
            format!("/azure/no-such-key/wrapkey?{API}"),
            good.clone(),
            404,
            "KeyNotFound",
            "unknown key",
        ),
        (
            format!("/azure/ekm-health-check/wrapkey?{API}"),
            good.clone(),
            404,
            "KeyNotFound",
            "the health key is never exposed",
        ),
        (
            format!("/azure/bad_key/wrapkey?{API}"),
            good.clone(),
            400,
            "InvalidRequest",
            "key id charset",
        ),
        (
            format!("/azure/{}/wrapkey?{API}", "k".repeat(65)),
            good.clone(),
            400,
            "InvalidRequest",
            "key id length",
        ),
        (
            format!("/azure/{AZURE_AES_KEY}/encrypt?{API}"),
            good.clone(),
            404,
            "NotFound",
            "unknown operation",
        ),
        (
            format!("{wrap_path}?{API}"),
            json!({"alg": "A256KW", "value": "AQAB"}),
            400,
            "InvalidRequest",
            "no request_context",
        ),
        (
            format!("{wrap_path}?{API}"),
            json!({"request_context": {"correlation_id": "c"}, "alg": "A256KW", "value": "AQAB"}),
            400,
            "InvalidRequest",
            "no pool_name",
        ),
        (
            format!("{wrap_path}?{API}"),
            json!({"request_context": context("pool-a"), "alg": "A128KW", "value": "AQAB"}),
            400,
            "InvalidRequest",
            "unknown alg",
        ),
        (
            format!("{wrap_path}?{API}"),
            json!({"request_context": context("pool-a"), "value": "AQAB"}),
            400,
            "InvalidRequest",
            "no alg",
        ),
        (
            format!("{wrap_path}?{API}"),
            json!({"request_context": context("pool-a"), "alg": "A256KW", "value": "AQAB=="}),
            400,
            "InvalidRequest",
            "padded base64url",
        ),
        (
            format!("{wrap_path}?{API}"),
            json!({"request_context": context("pool-a"), "alg": "A256KW", "value": "AQ+/"}),
            400,
            "InvalidRequest",
            "standard alphabet",
        ),
        (
            format!("{wrap_path}?{API}"),
            json!({"request_context": context("pool-a"), "alg": "A256KW", "value": B64URL.encode([1u8; 12])}),
            400,
            "InvalidRequest",
            "A256KW needs whole blocks",
        ),
        (
            format!("/azure/off/{AZURE_AES_KEY}/wrapkey?{API}"),
            good.clone(),
            403,
            "Forbidden",
            "disabled prefix",
        ),
        (
            format!("/azure/strict/{AZURE_RSA_KEY}/metadata?{API}"),
            json!({"request_context": context("pool-b")}),
            200,
            "",
            "the rule covers wrap and unwrap only",
        ),
    ] {
        let got = post(&mut c, &path, &body).await;
        if status == 200 {
            assert_eq!(got.0, 200, "{what}: {}", got.1);
        } else {
            assert_error(&got, status, code, what);
        }
    }
    let got = post_raw(&mut c, &format!("{wrap_path}?{API}"), b"{not json".to_vec()).await;
    assert_error(&got, 400, "InvalidRequest", "not JSON");
    let got = send(
        &mut c,
        http::Method::GET,
        &format!("/azure/info?{API}"),
        Vec::new(),
    )
    .await;
    assert_error(&got, 405, "MethodNotAllowed", "GET");
    // A rule denies by pool name and names itself.
    let denied = post(
        &mut c,
        &format!("/azure/strict/{AZURE_RSA_KEY}/wrapkey?{API}"),
        &json!({"request_context": context("pool-b"), "alg": "RSA-OAEP", "value": B64URL.encode([1u8; 32])}),
    )
    .await;
    assert_error(&denied, 403, "Forbidden", "pool rule");
    assert!(
        denied.1["message"]
            .as_str()
            .unwrap()
            .contains("only-pool-a")
    );
    let allowed = post(
        &mut c,
        &format!("/azure/strict/{AZURE_RSA_KEY}/wrapkey?{API}"),
        &json!({"request_context": context("pool-a"), "alg": "RSA-OAEP", "value": B64URL.encode([1u8; 32])}),
    )
    .await;
    assert_eq!(allowed.0, 200, "{}", allowed.1);
    // The connection still serves.
    assert_eq!(
        post(&mut c, &format!("/azure/info?{API}"), &ctx).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_prefixes_certificates_get_in() {
    let (p, _other) = proxy().await;
    let ctx = json!({"request_context": context("pool-a")});
    // No client certificate (the server-auth-only listener): 401.
    let mut plain = client(&p, "tls").await;
    assert_error(
        &post(&mut plain, &format!("/azure/info?{API}"), &ctx).await,
        401,
        "Unauthorized",
        "no certificate",
    );
    // The right certificate, but the prefix trusts another CA or another subject: 401.
    let mut c = client(&p, "mtls").await;
    assert_error(
        &post(&mut c, &format!("/azure/other-ca/info?{API}"), &ctx).await,
        401,
        "Unauthorized",
        "other CA",
    );
    assert_error(
        &post(&mut c, &format!("/azure/other-subject/info?{API}"), &ctx).await,
        401,
        "Unauthorized",
        "other subject",
    );
    assert_eq!(
        post(&mut c, &format!("/azure/info?{API}"), &ctx).await.0,
        200
    );
    assert!(
        p.metric("ekm_auth_failures_total{front=\"azure\",reason=\"untrusted_issuer\"}")
            .await
            >= 1.0
    );
    // A certificate from another CA, or from the right CA with another subject, never gets past
    // the handshake on the mTLS listener.
    let stranger = Authority::new("stranger CA").unwrap();
    let wrong_ca = stranger
        .issue_client(CLIENT_SUBJECT, Validity::Current)
        .unwrap();
    let wrong_subject = p
        .pki
        .ca
        .issue_client("someone-else", Validity::Current)
        .unwrap();
    let expired = p
        .pki
        .ca
        .issue_client(CLIENT_SUBJECT, Validity::Expired)
        .unwrap();
    for (cert, what) in [
        (&wrong_ca, "other CA"),
        (&wrong_subject, "other subject"),
        (&expired, "expired"),
    ] {
        let mut cfg = p.client_config("mtls");
        cfg.tls = Some(ClientTls {
            ca_pem: p.pki.ca.cert_pem().into_bytes(),
            client_cert_pem: Some(cert.cert_pem.clone().into_bytes()),
            client_key_pem: Some(cert.key_pem.as_bytes().to_vec()),
            server_name: "localhost".into(),
        });
        let refused = match XksClient::connect(Arc::new(cfg)).await {
            Err(_) => true,
            // TLS 1.3: the client may finish before it reads the alert; its first request fails.
            Ok(mut c) => {
                let req = http::Request::post(format!("/azure/info?{API}"))
                    .header(http::header::HOST, "localhost")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        ctx.to_string(),
                    )))
                    .unwrap();
                c.send_raw(req).await.is_err()
            }
        };
        assert!(refused, "{what}: the handshake must refuse it");
    }
}
