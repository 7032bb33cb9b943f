//! Client tests against a tiny local hyper server that authenticates with the real
//! [`SigV4Verifier`]: plain HTTP for signing and overrides, TLS (rcgen certificates, a client
//! certificate required) for the handshake and alert paths.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::*;
use crate::auth::Principal;
use crate::auth::sigv4::{
    DEFAULT_MAX_SKEW, RegionPolicy, SigV4Credential, SigV4Verifier, SignedRequest,
};

const AKID: &str = "AKIAXKSCLIENTTEST2345";
const SECRET: &str = "Y2xpZW50LXRlc3Qtc2VjcmV0LWNsaWVudC10ZXN0LXNlY3JldA==";
const AKID2: &str = "AKIAXKSROTATED234567A";
const SECRET2: &str = "cm90YXRlZC1zZWNyZXQtcm90YXRlZC1zZWNyZXQtcm90YXRlZA==";

/// A test server: counts connections, verifies SigV4, echoes what it saw.
struct TestServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn handle(
    verifier: Arc<SigV4Verifier>,
    req: Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = |status: StatusCode, json: serde_json::Value| {
        let mut r = http::Response::new(Full::new(Bytes::from(json.to_string())));
        *r.status_mut() = status;
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r
    };
    if parts.method != Method::POST {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({})));
    }
    let signed = SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        authority: parts.uri.authority().map(|a| a.as_str()),
        body: &body,
    };
    Ok(match verifier.verify(&signed, SystemTime::now()) {
        Ok(Principal::SigV4 {
            access_key_id,
            region,
        }) => reply(
            StatusCode::OK,
            serde_json::json!({
                "accessKeyId": access_key_id,
                "region": region,
                "path": parts.uri.path(),
                "bodyLen": body.len(),
                "contentLength": parts.headers.get("content-length").and_then(|v| v.to_str().ok()),
            }),
        ),
        // A SigV4 verifier only ever yields SigV4 principals.
        Ok(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({})),
        Err(e) => reply(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"errorName": "AuthenticationFailedException", "errorMessage": e.reason()}),
        ),
    })
}

fn test_verifier() -> Arc<SigV4Verifier> {
    Arc::new(SigV4Verifier::new(
        "kms-xks-proxy",
        RegionPolicy::OneOf(vec!["us-east-1".into()]),
        DEFAULT_MAX_SKEW,
        vec![
            SigV4Credential {
                access_key_id: AKID.into(),
                secret: SecretString::from(SECRET),
            },
            SigV4Credential {
                access_key_id: AKID2.into(),
                secret: SecretString::from(SECRET2),
            },
        ],
    ))
}

/// Serves on 127.0.0.1:0, over TLS when `tls` is given.
async fn start_server(tls: Option<Arc<rustls::ServerConfig>>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    let verifier = test_verifier();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let verifier = Arc::clone(&verifier);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(Arc::clone(&verifier), req));
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                    }
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                }
            });
        }
    });
    TestServer { addr, connections }
}

fn config(addr: SocketAddr, tls: Option<ClientTls>) -> Arc<XksClientConfig> {
    Arc::new(XksClientConfig {
        addr,
        tls,
        host: format!("localhost:{}", addr.port()),
        prefix: "/dev-keystore".into(),
        access_key_id: AKID.into(),
        secret: SecretString::from(SECRET),
        region: "us-east-1".into(),
        service: "kms-xks-proxy".into(),
    })
}

async fn plain_client() -> (TestServer, XksClient) {
    let server = start_server(None).await;
    let client = XksClient::connect(config(server.addr, None)).await.unwrap();
    (server, client)
}

#[tokio::test]
async fn signed_posts_verify_and_reuse_one_connection() {
    let (server, mut client) = plain_client().await;
    for _ in 0..5 {
        let r = client.post("health", xks::health_body()).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        let v = r.json().unwrap();
        assert_eq!(v["accessKeyId"], AKID);
        assert_eq!(v["region"], "us-east-1");
        assert_eq!(v["path"], "/dev-keystore/kms/xks/v1/health");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    let body = xks::encrypt_body(xks::KMS_KEY_ARN, &[7u8; 4300], Some(b"aad"), true);
    let len = body.len();
    let r = client.post("/keys/key-1/encrypt", body).await.unwrap();
    assert_eq!(r.status, 200);
    let v = r.json().unwrap();
    assert_eq!(v["path"], "/dev-keystore/kms/xks/v1/keys/key-1/encrypt");
    assert_eq!(v["bodyLen"], len);
    assert_eq!(v["contentLength"], len.to_string());
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn empty_prefix_and_rotated_credential() {
    let server = start_server(None).await;
    let mut cfg = (*config(server.addr, None)).clone();
    cfg.prefix = String::new();
    cfg.access_key_id = AKID2.into();
    cfg.secret = SecretString::from(SECRET2);
    let mut client = XksClient::connect(Arc::new(cfg)).await.unwrap();
    let r = client
        .post("keys/k/metadata", xks::metadata_body())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v = r.json().unwrap();
    assert_eq!(v["path"], "/kms/xks/v1/keys/k/metadata");
    assert_eq!(v["accessKeyId"], AKID2);
}

/// Posts with `opts` and returns the server's rejection reason (`None` on 200).
async fn reason(client: &mut XksClient, opts: SignOptions) -> Option<String> {
    let r = client
        .post_with("health", xks::health_body(), &opts)
        .await
        .unwrap();
    match r.status {
        200 => None,
        401 => {
            assert_eq!(
                r.error_name().as_deref(),
                Some("AuthenticationFailedException")
            );
            Some(
                r.json().unwrap()["errorMessage"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        }
        s => panic!("status {s}"),
    }
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.insert(*n, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[tokio::test]
async fn sign_options_reach_every_rejection() {
    let (_server, mut c) = plain_client().await;
    let now = SystemTime::now();
    let cases: Vec<(SignOptions, Option<&str>)> = vec![
        (SignOptions::default(), None),
        (
            SignOptions {
                signed_headers: Some(vec![
                    "content-type".into(),
                    "host".into(),
                    "x-amz-date".into(),
                ]),
                ..Default::default()
            },
            None,
        ),
        (
            SignOptions {
                time: Some(now - Duration::from_secs(600)),
                ..Default::default()
            },
            Some("clock_skew"),
        ),
        (
            SignOptions {
                time: Some(now + Duration::from_secs(600)),
                ..Default::default()
            },
            Some("clock_skew"),
        ),
        (
            SignOptions {
                region: Some("eu-west-1".into()),
                ..Default::default()
            },
            Some("region_not_allowed"),
        ),
        (
            SignOptions {
                service: Some("kms".into()),
                ..Default::default()
            },
            Some("wrong_service"),
        ),
        (
            SignOptions {
                access_key_id: Some("AKIANOTCONFIGURED234".into()),
                ..Default::default()
            },
            Some("unknown_access_key"),
        ),
        (
            SignOptions {
                secret: Some(SecretString::from("wrong-secret")),
                ..Default::default()
            },
            Some("signature_mismatch"),
        ),
        (
            SignOptions {
                signed_headers: Some(vec!["x-amz-date".into()]),
                ..Default::default()
            },
            Some("header_not_signed"),
        ),
        (
            SignOptions {
                signed_headers: Some(vec![
                    "host".into(),
                    "x-amz-content-sha256".into(),
                    "x-amz-date".into(),
                ]),
                extra_headers: headers(&[("x-amz-content-sha256", &"0".repeat(64))]),
                ..Default::default()
            },
            Some("content_hash_mismatch"),
        ),
        (
            SignOptions {
                after_sign_headers: headers(&[("host", "evil.example.com")]),
                ..Default::default()
            },
            Some("signature_mismatch"),
        ),
        (
            SignOptions {
                body_after_sign: Some(Bytes::from_static(b"{}")),
                ..Default::default()
            },
            Some("signature_mismatch"),
        ),
        (
            SignOptions {
                host: Some("other-host:443".into()),
                ..Default::default()
            },
            None,
        ),
        (
            SignOptions {
                unsigned: true,
                ..Default::default()
            },
            Some("missing_authorization"),
        ),
    ];
    for (i, (opts, want)) in cases.into_iter().enumerate() {
        assert_eq!(reason(&mut c, opts).await.as_deref(), want, "case {i}");
    }
    // The path override is signed as sent.
    let r = c
        .post_with(
            "ignored",
            xks::health_body(),
            &SignOptions {
                path: Some("/other/kms/xks/v1/health".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.json().unwrap()["path"], "/other/kms/xks/v1/health");
}

#[tokio::test]
async fn send_raw_sends_exactly_what_it_is_given() {
    let (_server, mut client) = plain_client().await;
    let req = Request::get("/dev-keystore/kms/xks/v1/health")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = client.send_raw(req).await.unwrap();
    assert_eq!(r.status, 405);
    let req = Request::post("/dev-keystore/kms/xks/v1/health")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let r = client.send_raw(req).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json().unwrap()["errorMessage"], "missing_authorization");
}

#[tokio::test]
async fn connect_failure_is_reported() {
    // Bind then drop to get a port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let e = XksClient::connect(config(addr, None)).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect(_)), "{e:?}");
}

// ---- TLS ---------------------------------------------------------------------------------

struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

fn ca() -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn leaf(ca: &(CertificateParams, KeyPair, String), name: &str, client: bool) -> (String, String) {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&ca.0, &ca.1);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let ca = ca();
    let (server_cert_pem, server_key_pem) = leaf(&ca, "localhost", false);
    let (client_cert_pem, client_key_pem) = leaf(&ca, "cks.kms.us-east-1.amazonaws.com", true);
    Pki {
        ca_pem: ca.2.clone(),
        server_cert_pem,
        server_key_pem,
        client_cert_pem,
        client_key_pem,
    }
}

fn server_tls(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let chain = CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn client_tls(pki: &Pki, with_cert: bool) -> ClientTls {
    ClientTls {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        client_cert_pem: with_cert.then(|| pki.client_cert_pem.clone().into_bytes()),
        client_key_pem: with_cert.then(|| pki.client_key_pem.clone().into_bytes()),
        server_name: "localhost".into(),
    }
}

#[tokio::test]
async fn mtls_round_trip_and_connector_reuse() {
    let pki = pki();
    let server = start_server(Some(server_tls(&pki, rustls::ALL_VERSIONS))).await;
    let connector = XksConnector::new(config(server.addr, Some(client_tls(&pki, true)))).unwrap();
    for _ in 0..3 {
        let mut client = connector.connect().await.unwrap();
        let r = client.post("health", xks::health_body()).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json().unwrap()["accessKeyId"], AKID);
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn missing_client_certificate_surfaces_the_servers_alert() {
    let pki = pki();
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let server = start_server(Some(server_tls(&pki, versions))).await;
        let cfg = config(server.addr, Some(client_tls(&pki, false)));
        // TLS 1.2 fails in the handshake; TLS 1.3 completes it on the client side and the alert
        // arrives with the first response.
        let err = match XksClient::connect(cfg).await {
            Err(e) => e,
            Ok(mut client) => client.post("health", xks::health_body()).await.unwrap_err(),
        };
        assert!(err.tls_alert().is_some(), "{versions:?}: {err:?}");
    }
}

#[tokio::test]
async fn untrusted_server_is_rejected_locally() {
    let pki = pki();
    let other = self::pki();
    let server = start_server(Some(server_tls(&pki, rustls::ALL_VERSIONS))).await;
    let mut tls = client_tls(&pki, true);
    tls.ca_pem = other.ca_pem.into_bytes();
    let err = XksClient::connect(config(server.addr, Some(tls)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Tls(rustls::Error::InvalidCertificate(_))),
        "{err:?}"
    );
    let mut tls = client_tls(&pki, true);
    tls.server_name = "not-localhost".into();
    let err = XksClient::connect(config(server.addr, Some(tls)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Tls(rustls::Error::InvalidCertificate(_))),
        "{err:?}"
    );
}

#[test]
fn bad_tls_material_is_a_config_error() {
    let pki = pki();
    let mut t = client_tls(&pki, true);
    t.ca_pem = b"not pem".to_vec();
    assert!(matches!(t.to_rustls(), Err(ClientError::Config(_))));
    let mut t = client_tls(&pki, true);
    t.client_key_pem = None;
    assert!(matches!(t.to_rustls(), Err(ClientError::Config(_))));
    let mut t = client_tls(&pki, true);
    t.client_key_pem = Some(b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n".to_vec());
    assert!(t.to_rustls().is_err());
    let t = client_tls(&pki, true);
    let cfg = t.to_rustls().unwrap();
    assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
    assert!(!format!("{t:?}").contains("PRIVATE KEY"));
}
