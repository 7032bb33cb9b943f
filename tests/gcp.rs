//! Google Cloud EKM wrap/unwrap end to end: the real server in-process (real TLS, real config
//! parser) against a fresh SoftHSMv2 token per proxy, its issuer's JWKS served over real HTTPS by
//! [`JwksServer`], and every token signed here with jsonwebtoken from PEM fixtures (or forged by
//! hand), independently of the proxy's own JWT code.
//!
//! Covers: round trips (with and without AAD, both JSON casings, unknown fields, `keyPath`), the
//! wrapped-blob layout (DESIGN/issue 4: format ‖ flags ‖ id ‖ IV ‖ ciphertext ‖ tag), every token
//! failure with its HTTP status, google.rpc status and ErrorInfo reason, JWKS rotation, outage and
//! refresh rate limiting, tampered blobs, AAD and key-path binding, per-key grants, KAJ policy
//! (including its three special cases), resource-name pins, health checks, the kill switch,
//! malformed input, metrics and request ids.
//!
//! Nothing asserts on elapsed time. Where an effect needs time to show (a JWKS refresh after its
//! rate-limit interval, a cache entry expiring, the kill-switch watcher), the test polls for it
//! with a generous upper bound.

// Helpers outside `#[test]` functions assert too: failing loudly is their job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use ekm_proxy::client::{ClientTls, Response, XksClient, XksClientConfig};
use ekm_proxy::secret::SecretString;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::Full;
use serde_json::{Value, json};

use common::jwks::{
    AUDIENCE, ISSUER, JwksServer, Mode, OTHER_SERVICE_ACCOUNT, SERVICE_ACCOUNT, attacker, jwks_of,
    now_secs, signer1, signer2, tamper_signature,
};
use common::proxy::{GCP_PREFIX, GcpJwks, GcpSection, TestProxy, gcp_key};
use common::softhsm::TestToken;

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

/// The default test key path (HSM key `dev-aes-1`).
const KEY: &str = "k1";
/// The HSM key behind it: its label is the blob's key version id.
const HSM_KEY: &str = "dev-aes-1";
/// Plaintext of requests expected to fail: no error body may echo it.
const MARKER: &[u8] = b"TOP-SECRET-PLAINTEXT-MARKER-0123456789";
/// `relativeResourceName` of the Cloud KMS key version in the requests.
const RESOURCE: &str =
    "projects/test-project/locations/us-east1/keyRings/ring-1/cryptoKeys/key-1/cryptoKeyVersions/1";
/// Upper bound for every "wait until the effect shows" loop.
const POLL_LIMIT: Duration = Duration::from_secs(30);
/// Wrapped-blob layout (DESIGN: format ‖ flags ‖ u8 len ‖ key version id ‖ IV ‖ ct ‖ tag).
const BLOB_FORMAT: u8 = 0x01;
const FLAG_HEALTH_CHECK: u8 = 0x01;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// One HTTP/1.1 connection to the proxy's TLS listener, reopened when the server closed it.
struct Gcp {
    cfg: Arc<XksClientConfig>,
    client: Option<XksClient>,
}

impl Gcp {
    async fn new(proxy: &TestProxy) -> Self {
        Self {
            cfg: Arc::new(common::cloud_ekm::bearer_client_config(proxy)),
            client: None,
        }
    }

    /// `method path` with `Authorization` (if any) and `body`.
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Response {
        self.try_send(method, path, authorization, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Like [`Gcp::send`], but a transport failure is returned (and the connection dropped).
    async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Result<Response, ekm_proxy::client::ClientError> {
        if self.client.as_ref().is_none_or(XksClient::is_closed) {
            self.client = Some(XksClient::connect(self.cfg.clone()).await?);
        }
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.cfg.host)
            .header(CONTENT_TYPE, "application/json");
        if let Some(a) = authorization {
            req = req.header(AUTHORIZATION, a);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        let client = self.client.as_mut().unwrap();
        let result = client.send_raw(req).await;
        if result.is_err() {
            self.client = None;
        }
        result
    }

    /// Send a request built by the caller (e.g. with repeated headers).
    async fn send_request(&mut self, req: http::Request<Full<Bytes>>) -> Response {
        if self.client.as_ref().is_none_or(XksClient::is_closed) {
            self.client = Some(XksClient::connect(self.cfg.clone()).await.expect("connect"));
        }
        let client = self.client.as_mut().unwrap();
        client.send_raw(req).await.expect("request")
    }

    /// Drops the connection: the next request opens a new one.
    fn reconnect(&mut self) {
        self.client = None;
    }

    /// `POST <prefix>/<key>:<op>` with a bearer token.
    async fn op(&mut self, key: &str, op: &str, token: &str, body: &Value) -> Response {
        self.send(
            "POST",
            &key_url(key, op),
            Some(&format!("Bearer {token}")),
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }

    async fn wrap(&mut self, key: &str, token: &str, body: &Value) -> Response {
        self.op(key, "wrap", token, body).await
    }

    async fn unwrap(&mut self, key: &str, token: &str, body: &Value) -> Response {
        self.op(key, "unwrap", token, body).await
    }

    /// Wrap that must succeed; returns the blob.
    async fn wrap_ok(&mut self, key: &str, token: &str, body: &Value) -> Vec<u8> {
        let r = self.wrap(key, token, body).await;
        let v = assert_ok(&r, &format!("wrap under {key}"));
        let blob = v["wrappedBlob"]
            .as_str()
            .unwrap_or_else(|| panic!("wrap under {key}: no wrappedBlob in {v}"));
        B64.decode(blob).expect("wrappedBlob is standard base64")
    }

    /// Unwrap that must succeed; returns the plaintext.
    async fn unwrap_ok(&mut self, key: &str, token: &str, body: &Value) -> Vec<u8> {
        let r = self.unwrap(key, token, body).await;
        let v = assert_ok(&r, &format!("unwrap under {key}"));
        let pt = v["plaintext"]
            .as_str()
            .unwrap_or_else(|| panic!("unwrap under {key}: no plaintext in {v}"));
        B64.decode(pt).expect("plaintext is standard base64")
    }
}

fn key_url(key: &str, op: &str) -> String {
    format!("{GCP_PREFIX}/{key}:{op}")
}

/// `additionalContext` with a KAJ reason (a name or a number).
fn reason_ctx(reason: impl Into<Value>) -> Value {
    json!({
        "fullResourceName": format!("//cloudkms.googleapis.com/{RESOURCE}"),
        "relativeResourceName": RESOURCE,
        "accessReasonContext": { "reason": reason.into() },
    })
}

/// The context of an ordinary Cloud KMS request made by the customer.
fn customer() -> Value {
    reason_ctx("CUSTOMER_INITIATED_ACCESS")
}

/// The context of a Cloud EKM health probe: flagged, no reason.
fn health_ctx() -> Value {
    json!({ "relativeResourceName": RESOURCE, "isKeyHealthCheck": true })
}

/// A camelCase WrapRequest.
fn wrap_body(plaintext: &[u8], aad: Option<&[u8]>, ctx: Option<Value>) -> Value {
    let mut b = json!({ "plaintext": B64.encode(plaintext) });
    if let Some(aad) = aad {
        b["additionalAuthenticatedData"] = json!(B64.encode(aad));
    }
    if let Some(ctx) = ctx {
        b["additionalContext"] = ctx;
    }
    b
}

/// A camelCase UnwrapRequest.
fn unwrap_body(blob: &[u8], aad: Option<&[u8]>, ctx: Option<Value>) -> Value {
    let mut b = json!({ "wrappedBlob": B64.encode(blob) });
    if let Some(aad) = aad {
        b["additionalAuthenticatedData"] = json!(B64.encode(aad));
    }
    if let Some(ctx) = ctx {
        b["additionalContext"] = ctx;
    }
    b
}

/// A good token from the current signer.
fn good_token() -> String {
    signer1().token().sign()
}

/// The gRPC code of a google.rpc status name.
fn grpc_code(status: &str) -> i64 {
    match status {
        "INVALID_ARGUMENT" => 3,
        "DEADLINE_EXCEEDED" => 4,
        "NOT_FOUND" => 5,
        "PERMISSION_DENIED" => 7,
        "RESOURCE_EXHAUSTED" => 8,
        "FAILED_PRECONDITION" => 9,
        "UNIMPLEMENTED" => 12,
        "INTERNAL" => 13,
        "UNAVAILABLE" => 14,
        "UNAUTHENTICATED" => 16,
        other => panic!("no gRPC code for {other}"),
    }
}

#[track_caller]
fn assert_request_id(r: &Response, ctx: &str) -> String {
    let id = r
        .headers
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{ctx}: no x-request-id header"))
        .to_str()
        .expect("x-request-id is ASCII")
        .to_owned();
    assert!(!id.is_empty(), "{ctx}: empty x-request-id");
    id
}

#[track_caller]
fn json_body(r: &Response, ctx: &str) -> Value {
    let ct = r
        .headers
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "{ctx}: content type {ct:?}, body {}",
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{ctx}: body is not JSON ({e}): {:?}", r.body))
}

/// The fields named by the BadRequest detail of an error body.
fn bad_request_fields(v: &Value) -> Vec<String> {
    v["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["@type"].as_str() == Some("type.googleapis.com/google.rpc.BadRequest"))
        .flat_map(|d| d["fieldViolations"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f["field"].as_str().map(str::to_owned))
        .collect()
}

#[track_caller]
fn assert_ok(r: &Response, ctx: &str) -> Value {
    assert_eq!(r.status, 200, "{ctx}: {}", String::from_utf8_lossy(&r.body));
    assert_request_id(r, ctx);
    json_body(r, ctx)
}

/// The ErrorInfo detail of a google.rpc.Status body.
fn error_info(v: &Value) -> Option<&Value> {
    v["details"]
        .as_array()?
        .iter()
        .find(|d| d["@type"].as_str() == Some("type.googleapis.com/google.rpc.ErrorInfo"))
}

/// Exact HTTP status, google.rpc status name and code, ErrorInfo reason (if `reason` is given),
/// a short printable message, an x-request-id, and no plaintext echoed. Returns the body.
#[track_caller]
fn assert_rpc(r: &Response, http: u16, status: &str, reason: Option<&str>, ctx: &str) -> Value {
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, http, "{ctx}: body {text}");
    assert_request_id(r, ctx);
    let v = json_body(r, ctx);
    assert_eq!(v["status"].as_str(), Some(status), "{ctx}: body {text}");
    assert_eq!(
        v["code"].as_i64(),
        Some(grpc_code(status)),
        "{ctx}: body {text}"
    );
    let msg = v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{ctx}: no message in {text}"));
    assert!(
        !msg.is_empty() && msg.len() < 1024,
        "{ctx}: message {msg:?}"
    );
    assert!(
        msg.chars().all(|c| !c.is_control()),
        "{ctx}: message has control characters: {msg:?}"
    );
    if let Some(reason) = reason {
        let info = error_info(&v).unwrap_or_else(|| panic!("{ctx}: no ErrorInfo in {text}"));
        assert_eq!(info["reason"].as_str(), Some(reason), "{ctx}: body {text}");
        assert_eq!(
            info["domain"].as_str(),
            Some("ekm-proxy"),
            "{ctx}: body {text}"
        );
    }
    let marker_b64 = B64.encode(MARKER);
    for secret in ["TOP-SECRET", marker_b64.as_str()] {
        assert!(!text.contains(secret), "{ctx}: error body leaks {secret:?}");
    }
    v
}

/// 401 UNAUTHENTICATED with `reason`; the body never contains the token (or its signature).
#[track_caller]
fn assert_unauthenticated(r: &Response, reason: &str, token: &str, ctx: &str) {
    assert_rpc(r, 401, "UNAUTHENTICATED", Some(reason), ctx);
    let text = String::from_utf8_lossy(&r.body);
    for part in token.split('.').filter(|p| p.len() > 16) {
        assert!(!text.contains(part), "{ctx}: error body echoes the token");
    }
}

/// 403 PERMISSION_DENIED (ErrorInfo `ACCESS_DENIED`) whose metadata names `rule`, with the rule
/// in the message too. Returns the body.
#[track_caller]
fn assert_denied(r: &Response, rule: &str, ctx: &str) -> Value {
    let v = assert_rpc(r, 403, "PERMISSION_DENIED", Some("ACCESS_DENIED"), ctx);
    let info = error_info(&v).unwrap_or_else(|| panic!("{ctx}: no ErrorInfo in {v}"));
    assert_eq!(
        info["metadata"]["rule"].as_str(),
        Some(rule),
        "{ctx}: the denial names rule {rule}: {v}"
    );
    assert!(
        v["message"].as_str().unwrap_or_default().contains(rule),
        "{ctx}: the message names the rule: {v}"
    );
    v
}

/// Sum of every series of metric `name` whose labels include all of `labels`.
async fn metric_sum(proxy: &TestProxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, text) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200, "GET /metrics");
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series_labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((l, v)) = rest.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // another metric whose name starts with `name`
        };
        let has = |k: &str, v: &str| series_labels.contains(&format!("{k}=\"{v}\""));
        if labels.iter().all(|(k, v)| has(k, v)) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the metric sum reaches `at_least` (metrics may be bumped after the answer).
async fn await_metric(proxy: &TestProxy, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let what = format!("{name}{labels:?} >= {at_least}");
    poll_until(
        &what,
        || metric_sum(proxy, name, labels),
        |v| *v >= at_least,
    )
    .await;
}

/// A proxy, its JWKS server and a client.
struct Env {
    jwks: JwksServer,
    proxy: TestProxy,
    gcp: Gcp,
}

/// JWKS server listing signer 1, and a proxy with the default GCP section changed by `edit`.
async fn env_with(edit: impl FnOnce(&mut GcpSection)) -> Env {
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    env_on(jwks, edit).await
}

async fn env() -> Env {
    env_with(|_| {}).await
}

/// A proxy (fresh token) whose issuer is served by `jwks`.
async fn env_on(jwks: JwksServer, edit: impl FnOnce(&mut GcpSection)) -> Env {
    let mut section = GcpSection::with_server(&jwks);
    edit(&mut section);
    let proxy = TestProxy::start_with(section.options()).await;
    let gcp = Gcp::new(&proxy).await;
    Env { jwks, proxy, gcp }
}

/// The parts of a wrapped blob per the documented layout.
struct Blob {
    format: u8,
    flags: u8,
    key_id: String,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
}

#[track_caller]
fn parse_blob(b: &[u8]) -> Blob {
    assert!(b.len() >= 3 + IV_LEN + TAG_LEN, "blob too short: {b:?}");
    let id_len = b[2] as usize;
    let id_end = 3 + id_len;
    assert!(
        b.len() >= id_end + IV_LEN + TAG_LEN,
        "blob too short for its id"
    );
    Blob {
        format: b[0],
        flags: b[1],
        key_id: String::from_utf8(b[3..id_end].to_vec()).expect("key id is UTF-8"),
        iv: b[id_end..id_end + IV_LEN].to_vec(),
        ciphertext: b[id_end + IV_LEN..b.len() - TAG_LEN].to_vec(),
    }
}

// ---------------------------------------------------------------------------------------------
// The test JWKS server itself
// ---------------------------------------------------------------------------------------------

/// GET on the JWKS server through real TLS (trusting its CA), like the proxy does.
async fn jwks_get(server: &JwksServer) -> Result<Response, ekm_proxy::client::ClientError> {
    let rest = server.url.strip_prefix("https://").unwrap();
    let (hostport, path) = rest.split_once('/').unwrap();
    let addr: std::net::SocketAddr = hostport.parse().unwrap();
    let cfg = XksClientConfig {
        addr,
        tls: Some(ClientTls {
            ca_pem: std::fs::read(&server.ca_pem).unwrap(),
            client_cert_pem: None,
            client_key_pem: None,
            server_name: "127.0.0.1".into(),
        }),
        host: hostport.into(),
        prefix: String::new(),
        access_key_id: String::new(),
        secret: SecretString::from(""),
        region: String::new(),
        service: String::new(),
    };
    let mut c = XksClient::connect(Arc::new(cfg)).await?;
    let req = http::Request::get(format!("/{path}"))
        .header(HOST, hostport)
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.send_raw(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_jwks_server_serves_swaps_counts_and_fails() {
    let server = JwksServer::start(jwks_of(&[signer1()])).await;
    let r = jwks_get(&server).await.expect("GET");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("cache-control").unwrap(),
        "public, max-age=300"
    );
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["keys"][0]["kid"], signer1().kid);
    assert_eq!(v["keys"][0]["n"], B64URL.encode(&signer1().n));
    // The JWK really is signer 1's public key: a token it signs verifies under it.
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(v["keys"][0].clone()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[AUDIENCE]);
    validation.set_issuer(&[ISSUER]);
    jsonwebtoken::decode::<Value>(&good_token(), &key, &validation).expect("verifies");
    assert!(
        jsonwebtoken::decode::<Value>(&attacker().token().sign(), &key, &validation).is_err(),
        "the attacker key is not signer 1"
    );

    server.set_jwks(jwks_of(&[signer1(), signer2()]));
    server.set_max_age(Some(7));
    let r = jwks_get(&server).await.expect("GET");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["keys"][1]["kid"], signer2().kid);
    assert_eq!(r.headers.get("cache-control").unwrap(), "public, max-age=7");
    server.set_max_age(None);
    let r = jwks_get(&server).await.expect("GET");
    assert!(r.headers.get("cache-control").is_none());

    server.set_mode(Mode::Error500);
    assert_eq!(jwks_get(&server).await.expect("GET").status, 500);
    assert_eq!(server.requests(), 4);
    server.set_mode(Mode::Refuse);
    let before = server.connections();
    assert!(jwks_get(&server).await.is_err(), "refused connection");
    assert_eq!(server.connections(), before + 1);
    assert_eq!(server.requests(), 4, "a refused connection is no request");
    server.set_mode(Mode::Up);
    assert_eq!(jwks_get(&server).await.expect("GET").status, 200);
}

#[test]
fn forged_tokens_have_the_shape_they_claim() {
    let none = signer1().token().sign_none();
    let header: Value =
        serde_json::from_slice(&B64URL.decode(none.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "none");
    assert!(none.ends_with('.'), "empty signature");
    let hs = signer1().token().sign_hs256(&signer1().n);
    let header = jsonwebtoken::decode_header(&hs).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
    assert_eq!(header.kid.as_deref(), Some(signer1().kid));
    // The public PEM built from n and e is the key jsonwebtoken verifies signer 1 with.
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(signer1().public_pem().as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[AUDIENCE]);
    jsonwebtoken::decode::<Value>(&good_token(), &key, &validation).expect("verifies");
    let tampered = tamper_signature(&good_token());
    assert!(jsonwebtoken::decode::<Value>(&tampered, &key, &validation).is_err());
}

// ---------------------------------------------------------------------------------------------
// Round trips and the blob
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_then_unwrap_round_trips_with_and_without_aad() {
    let mut e = env().await;
    let token = good_token();
    let dek = b"a 32-byte Cloud KMS ciphertext..";

    // Without AAD.
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(dek, None, Some(customer())))
        .await;
    let parsed = parse_blob(&blob);
    assert_eq!(parsed.format, BLOB_FORMAT);
    assert_eq!(parsed.flags, 0, "not a health-check blob");
    assert_eq!(
        parsed.key_id, HSM_KEY,
        "the key version id is the HSM key label"
    );
    assert_eq!(
        parsed.ciphertext.len(),
        dek.len(),
        "GCM: ciphertext as long as plaintext"
    );
    assert_ne!(
        parsed.ciphertext,
        dek.to_vec(),
        "the blob does not hold the plaintext"
    );
    assert!(!blob.windows(8).any(|w| dek.windows(8).any(|d| d == w)));
    let pt = e
        .gcp
        .unwrap_ok(KEY, &token, &unwrap_body(&blob, None, Some(customer())))
        .await;
    assert_eq!(pt, dek);

    // Wrapping again gives another blob (fresh IV), which opens to the same plaintext.
    let blob2 = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(dek, None, Some(customer())))
        .await;
    assert_ne!(parse_blob(&blob2).iv, parsed.iv, "fresh IV per wrap");
    assert_ne!(blob2, blob);
    assert_eq!(
        e.gcp
            .unwrap_ok(KEY, &token, &unwrap_body(&blob2, None, Some(customer())))
            .await,
        dek
    );

    // With AAD.
    let aad = b"projects/test-project/crypto-key-version-1";
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(dek, Some(aad), Some(customer())))
        .await;
    let pt = e
        .gcp
        .unwrap_ok(
            KEY,
            &token,
            &unwrap_body(&blob, Some(aad), Some(customer())),
        )
        .await;
    assert_eq!(pt, dek);

    // Binary plaintext with every byte value, and a large one (within the default limit).
    let all: Vec<u8> = (0..=255u8).cycle().take(60_000).collect();
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(&all, Some(b"x"), Some(customer())))
        .await;
    assert_eq!(
        e.gcp
            .unwrap_ok(
                KEY,
                &token,
                &unwrap_body(&blob, Some(b"x"), Some(customer()))
            )
            .await,
        all
    );
    // The request counter saw them.
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[("front", "gcp"), ("op", "wrap"), ("outcome", "ok")],
        4.0,
    )
    .await;
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[("front", "gcp"), ("op", "unwrap"), ("outcome", "ok")],
        4.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snake_case_camel_case_and_unknown_fields() {
    let mut e = env().await;
    let token = good_token();
    let pt = b"snake and camel";
    let aad = b"aad bytes";

    // snake_case wrap, with unknown fields everywhere and URL-safe base64 on input.
    let snake = json!({
        "key_path": KEY,
        "plaintext": B64URL.encode(pt),
        "additional_authenticated_data": B64.encode(aad),
        "key_uri_prefix": "https://ekm.test.example/gcp/v0/keys/",
        "additional_context": {
            "relative_resource_name": RESOURCE,
            "full_resource_name": format!("//cloudkms.googleapis.com/{RESOURCE}"),
            "access_reason_context": { "reason": "CUSTOMER_INITIATED_ACCESS", "future_field": 1 },
            "is_key_health_check": false,
            "some_new_field": {"nested": [1, 2, 3]},
        },
        "an_unknown_field": "ignored",
    });
    let blob = e.gcp.wrap_ok(KEY, &token, &snake).await;

    // camelCase unwrap of it.
    let camel = json!({
        "keyPath": KEY,
        "wrappedBlob": B64.encode(&blob),
        "additionalAuthenticatedData": B64.encode(aad),
        "keyUriPrefix": "https://ekm.test.example/gcp/v0/keys/",
        "additionalContext": {
            "relativeResourceName": RESOURCE,
            "accessReasonContext": { "reason": "CUSTOMER_INITIATED_ACCESS" },
            "isKeyHealthCheck": false,
        },
        "anotherUnknownField": true,
    });
    assert_eq!(e.gcp.unwrap_ok(KEY, &token, &camel).await, pt);

    // And the other way round: camelCase wrap, snake_case unwrap.
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(pt, Some(aad), Some(customer())))
        .await;
    let snake = json!({
        "wrapped_blob": B64URL.encode(&blob),
        "additional_authenticated_data": B64URL.encode(aad),
        "additional_context": {
            "relative_resource_name": RESOURCE,
            "access_reason_context": { "reason": "CUSTOMER_INITIATED_ACCESS" },
        },
    });
    assert_eq!(e.gcp.unwrap_ok(KEY, &token, &snake).await, pt);

    // The snake_case AAD really is read: unwrapping without it fails.
    let no_aad = json!({
        "wrapped_blob": B64.encode(&blob),
        "additional_context": { "access_reason_context": { "reason": "CUSTOMER_INITIATED_ACCESS" } },
    });
    let r = e.gcp.unwrap(KEY, &token, &no_aad).await;
    assert_rpc(
        &r,
        400,
        "INVALID_ARGUMENT",
        Some("UNWRAP_FAILED"),
        "snake_case unwrap without its AAD",
    );
    // And the snake_case reason is read: a refused reason spelled snake_case is refused.
    let refused = json!({
        "plaintext": B64.encode(MARKER),
        "additional_context": { "access_reason_context": { "reason": "THIRD_PARTY_DATA_REQUEST" } },
    });
    assert_denied(
        &e.gcp.wrap(KEY, &token, &refused).await,
        "access_reasons",
        "snake_case THIRD_PARTY_DATA_REQUEST",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_path_in_the_body_must_match_the_url() {
    let mut e = env().await;
    let token = good_token();
    let with_key_path = |kp: &str| {
        let mut b = wrap_body(b"key path", None, Some(customer()));
        b["keyPath"] = json!(kp);
        b
    };
    for ok in [
        KEY.to_owned(),
        String::new(),
        format!("https://localhost{GCP_PREFIX}/{KEY}"),
        format!("{GCP_PREFIX}/{KEY}"),
    ] {
        let blob = e.gcp.wrap_ok(KEY, &token, &with_key_path(&ok)).await;
        let mut u = unwrap_body(&blob, None, Some(customer()));
        u["keyPath"] = json!(ok);
        assert_eq!(
            e.gcp.unwrap_ok(KEY, &token, &u).await,
            b"key path",
            "keyPath {ok:?}"
        );
    }
    for bad in [
        "other",
        "xk1",
        "k1/extra",
        "K1",
        "https://localhost/gcp/v0/keys/other",
    ] {
        let r = e.gcp.wrap(KEY, &token, &with_key_path(bad)).await;
        let v = assert_rpc(
            &r,
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_FIELD"),
            &format!("keyPath {bad:?}"),
        );
        assert_eq!(bad_request_fields(&v), ["keyPath"], "keyPath {bad:?}: {v}");
    }
    // On unwrap too.
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(b"key path", None, Some(customer())))
        .await;
    let mut u = unwrap_body(&blob, None, Some(customer()));
    u["keyPath"] = json!("other");
    let r = e.gcp.unwrap(KEY, &token, &u).await;
    assert_rpc(
        &r,
        400,
        "INVALID_ARGUMENT",
        Some("INVALID_FIELD"),
        "unwrap with keyPath other",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_from_a_file_works_too() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, serde_json::to_vec(&jwks_of(&[signer1()])).unwrap()).unwrap();
    let section = GcpSection::new(GcpJwks::File(file));
    let proxy = TestProxy::start_with(section.options()).await;
    let mut gcp = Gcp::new(&proxy).await;
    let token = good_token();
    let blob = gcp
        .wrap_ok(
            KEY,
            &token,
            &wrap_body(b"from a file", None, Some(customer())),
        )
        .await;
    assert_eq!(
        gcp.unwrap_ok(KEY, &token, &unwrap_body(&blob, None, Some(customer())))
            .await,
        b"from a file"
    );
    let forged = attacker().token().sign();
    assert_unauthenticated(
        &gcp.wrap(KEY, &forged, &wrap_body(MARKER, None, Some(customer())))
            .await,
        "BAD_SIGNATURE",
        &forged,
        "attacker-signed token, JWKS file",
    );
}

// ---------------------------------------------------------------------------------------------
// Token failures
// ---------------------------------------------------------------------------------------------

/// One way a token can be wrong, the reason the proxy must give, and whether it counts as an
/// auth failure under that reason.
struct Bad {
    what: &'static str,
    authorization: Option<String>,
    reason: &'static str,
}

fn bearer(token: String) -> Option<String> {
    Some(format!("Bearer {token}"))
}

fn bad_tokens() -> Vec<Bad> {
    let s1 = signer1();
    let now = now_secs();
    vec![
        Bad {
            what: "no Authorization header",
            authorization: None,
            reason: "MISSING_TOKEN",
        },
        Bad {
            what: "a bearer that is not a JWT",
            authorization: Some("Bearer not-a-jwt".into()),
            reason: "MALFORMED",
        },
        Bad {
            what: "signature changed",
            authorization: bearer(tamper_signature(&s1.token().sign())),
            reason: "BAD_SIGNATURE",
        },
        Bad {
            what: "signed by another key under the right kid",
            authorization: bearer(attacker().token().sign()),
            reason: "BAD_SIGNATURE",
        },
        Bad {
            what: "claims changed after signing",
            authorization: bearer({
                let good = s1.token().sign();
                let other = s1.token().email("attacker@evil.example").sign();
                let (h, rest) = good.split_once('.').unwrap();
                let sig = rest.rsplit_once('.').unwrap().1;
                let claims = other.split('.').nth(1).unwrap();
                format!("{h}.{claims}.{sig}")
            }),
            reason: "BAD_SIGNATURE",
        },
        Bad {
            what: "alg none",
            authorization: bearer(s1.token().sign_none()),
            reason: "ALGORITHM_NOT_ALLOWED",
        },
        Bad {
            what: "HS256 keyed with the RSA modulus",
            authorization: bearer(s1.token().sign_hs256(&s1.n)),
            reason: "ALGORITHM_NOT_ALLOWED",
        },
        Bad {
            what: "HS256 keyed with the public key PEM",
            authorization: bearer(s1.token().sign_hs256(s1.public_pem().as_bytes())),
            reason: "ALGORITHM_NOT_ALLOWED",
        },
        Bad {
            what: "HS256 keyed with the JWK JSON",
            authorization: bearer(
                s1.token()
                    .sign_hs256(&serde_json::to_vec(&s1.jwk()).unwrap()),
            ),
            reason: "ALGORITHM_NOT_ALLOWED",
        },
        Bad {
            what: "RS512 by the right key (not in the allowed algorithms)",
            authorization: bearer({
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS512);
                h.kid = Some(s1.kid.into());
                jsonwebtoken::encode(&h, &s1.token().claims(), &s1.encoding).unwrap()
            }),
            reason: "ALGORITHM_NOT_ALLOWED",
        },
        Bad {
            what: "expired an hour ago",
            authorization: bearer(
                s1.token()
                    .claim("iat", now - 7200)
                    .claim("exp", now - 3600)
                    .sign(),
            ),
            reason: "EXPIRED",
        },
        Bad {
            what: "not valid for another hour (nbf)",
            authorization: bearer(s1.token().claim("nbf", now + 3600).sign()),
            reason: "NOT_YET_VALID",
        },
        Bad {
            what: "issued an hour in the future (iat)",
            authorization: bearer(
                s1.token()
                    .claim("iat", now + 3600)
                    .claim("exp", now + 7200)
                    .sign(),
            ),
            reason: "ISSUED_IN_FUTURE",
        },
        Bad {
            what: "wrong audience",
            authorization: bearer(s1.token().claim("aud", "https://other.example").sign()),
            reason: "WRONG_AUDIENCE",
        },
        Bad {
            what: "audience list without ours",
            authorization: bearer(
                s1.token()
                    .claim("aud", json!(["https://a.example", "https://b.example"]))
                    .sign(),
            ),
            reason: "WRONG_AUDIENCE",
        },
        Bad {
            what: "wrong issuer",
            authorization: bearer(s1.token().claim("iss", "https://evil.example").sign()),
            reason: "WRONG_ISSUER",
        },
        Bad {
            what: "unknown kid",
            authorization: bearer(s1.token().kid(Some("no-such-kid")).sign()),
            reason: "UNKNOWN_KID",
        },
        Bad {
            what: "no kid",
            authorization: bearer(s1.token().kid(None).sign()),
            reason: "MISSING_KID",
        },
        Bad {
            what: "no email",
            authorization: bearer(s1.token().without("email").sign()),
            reason: "MISSING_EMAIL",
        },
        Bad {
            what: "email_verified false",
            authorization: bearer(s1.token().claim("email_verified", false).sign()),
            reason: "EMAIL_NOT_VERIFIED",
        },
        Bad {
            what: "an email no service-account glob allows",
            authorization: bearer(s1.token().email("someone@evil.example").sign()),
            reason: "EMAIL_NOT_ALLOWED",
        },
        Bad {
            what: "a look-alike service agent domain",
            authorization: bearer(
                s1.token()
                    .email("service-123456789012@gcp-sa-ekms.iam.gserviceaccount.com.evil.example")
                    .sign(),
            ),
            reason: "EMAIL_NOT_ALLOWED",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_failure_is_401_with_its_reason() {
    let mut e = env().await;
    // The proxy works before, so every refusal below is the token's fault.
    let token = good_token();
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(b"before", None, Some(customer())))
        .await;

    for bad in bad_tokens() {
        let reason_label = bad.reason.to_ascii_lowercase();
        let labels = [("front", "gcp"), ("reason", reason_label.as_str())];
        let before = metric_sum(&e.proxy, "ekm_auth_failures_total", &labels).await;
        for (op, body) in [
            ("wrap", wrap_body(MARKER, None, Some(customer()))),
            ("unwrap", unwrap_body(&blob, None, Some(customer()))),
        ] {
            let r = e
                .gcp
                .send(
                    "POST",
                    &key_url(KEY, op),
                    bad.authorization.as_deref(),
                    serde_json::to_vec(&body).unwrap(),
                )
                .await;
            let token = bad
                .authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or_default();
            assert_unauthenticated(&r, bad.reason, token, &format!("{op}: {}", bad.what));
        }
        await_metric(&e.proxy, "ekm_auth_failures_total", &labels, before + 2.0).await;
    }
    // Unauthenticated requests are counted as such.
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[
            ("front", "gcp"),
            ("op", "wrap"),
            ("outcome", "UNAUTHENTICATED"),
        ],
        bad_tokens().len() as f64,
    )
    .await;
    // And the proxy still serves good tokens.
    assert_eq!(
        e.gcp
            .unwrap_ok(
                KEY,
                &good_token(),
                &unwrap_body(&blob, None, Some(customer()))
            )
            .await,
        b"before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_401_whatever_they_hold() {
    let mut e = env().await;
    let good = format!("Bearer {}", good_token());
    let forged = format!("Bearer {}", attacker().token().sign());
    let body = serde_json::to_vec(&wrap_body(MARKER, None, Some(customer()))).unwrap();
    let labels = [("front", "gcp"), ("reason", "duplicate_authorization")];
    let before = metric_sum(&e.proxy, "ekm_auth_failures_total", &labels).await;
    // Taking the first header (the old behaviour) lets "good, forged" through.
    for (what, first, second) in [
        ("good then forged", &good, &forged),
        ("forged then good", &forged, &good),
        ("good twice", &good, &good),
    ] {
        let req = http::Request::post(key_url(KEY, "wrap"))
            .header(HOST, &e.gcp.cfg.host)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, first.as_str())
            .header(AUTHORIZATION, second.as_str())
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let r = e.gcp.send_request(req).await;
        assert_unauthenticated(&r, "DUPLICATE_AUTHORIZATION", first, what);
    }
    await_metric(&e.proxy, "ekm_auth_failures_total", &labels, before + 3.0).await;
    // One good header still works.
    assert_ok(
        &e.gcp
            .wrap(
                KEY,
                &good_token(),
                &wrap_body(b"one header", None, Some(customer())),
            )
            .await,
        "a single Authorization header",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_jwks_file_is_refused_and_the_old_set_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, serde_json::to_vec(&jwks_of(&[signer1()])).unwrap()).unwrap();
    let section = GcpSection::new(GcpJwks::File(file.clone()));
    let mut proxy = TestProxy::start_with(section.options()).await;
    let mut gcp = Gcp::new(&proxy).await;
    let body = wrap_body(b"before reload", None, Some(customer()));
    assert_ok(&gcp.wrap(KEY, &good_token(), &body).await, "before reload");

    let broken: [(&str, &[u8]); 3] = [
        ("garbage", b"garbage {"),
        (
            "no usable key",
            br#"{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}"#,
        ),
        ("missing", b""),
    ];
    for (what, bytes) in broken {
        if what == "missing" {
            std::fs::remove_file(&file).unwrap();
        } else {
            std::fs::write(&file, bytes).unwrap();
        }
        // check-config and reload both validate the file: the config no longer loads.
        let loaded = ekm_proxy::config::load(&proxy.config_path);
        let err = loaded.expect_err(what);
        assert!(
            err.problems.iter().any(|p| p.path.ends_with(".jwks_file")),
            "{what}: {err}"
        );
        // Even handed a config that skipped validation, the running proxy refuses the reload
        // as a whole (the settings object is the old one with the file now broken).
        let settings = running_settings(&proxy, &file, bytes, what);
        assert!(
            proxy.running().reload(&settings).is_err(),
            "{what}: a reload leaving the issuer without keys was accepted"
        );
        // The old configuration keeps serving, with fresh (never cached) tokens.
        assert_ok(
            &gcp.wrap(KEY, &good_token(), &body).await,
            &format!("after refused reload ({what})"),
        );
    }
    // A good file reloads again (and a second signer becomes usable).
    std::fs::write(
        &file,
        serde_json::to_vec(&jwks_of(&[signer1(), signer2()])).unwrap(),
    )
    .unwrap();
    proxy.reload_with(section.options());
    assert_ok(
        &gcp.wrap(KEY, &signer2().token().sign(), &body).await,
        "signer 2 after a good reload",
    );
}

/// The proxy's own config with the JWKS file temporarily valid, so it parses; the file is then
/// put back to `broken` (or removed), which only the reload itself can notice.
fn running_settings(
    proxy: &TestProxy,
    file: &std::path::Path,
    broken: &[u8],
    what: &str,
) -> ekm_proxy::config::Settings {
    std::fs::write(file, serde_json::to_vec(&jwks_of(&[signer1()])).unwrap()).unwrap();
    let settings = ekm_proxy::config::load(&proxy.config_path).expect("config with a good file");
    if what == "missing" {
        std::fs::remove_file(file).unwrap();
    } else {
        std::fs::write(file, broken).unwrap();
    }
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_within_the_leeway_audience_lists_and_any_scheme_case_are_accepted() {
    let mut e = env().await;
    let now = now_secs();
    let body = wrap_body(b"leeway", None, Some(customer()));
    // Expired 5 s ago, nbf and iat 5 s ahead: inside the default 30 s leeway.
    for (what, token) in [
        (
            "expired 5 s ago",
            signer1()
                .token()
                .claim("iat", now - 600)
                .claim("exp", now - 5)
                .sign(),
        ),
        ("nbf in 5 s", signer1().token().claim("nbf", now + 5).sign()),
        ("iat in 5 s", signer1().token().claim("iat", now + 5).sign()),
        (
            "aud list with ours",
            signer1()
                .token()
                .claim("aud", json!(["https://other.example", AUDIENCE]))
                .sign(),
        ),
    ] {
        let r = e.gcp.wrap(KEY, &token, &body).await;
        assert_ok(&r, what);
    }
    // The auth scheme is case-insensitive (RFC 9110 §11.1).
    let r = e
        .gcp
        .send(
            "POST",
            &key_url(KEY, "wrap"),
            Some(&format!("bearer {}", good_token())),
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
    assert_ok(&r, "lowercase bearer");
    // Far outside the leeway (an hour) the same shapes are refused: the cases above pass
    // because of the leeway, not because the claims are ignored.
    let token = signer1()
        .token()
        .claim("iat", now - 7200)
        .claim("exp", now - 3600)
        .sign();
    assert_unauthenticated(
        &e.gcp.wrap(KEY, &token, &body).await,
        "EXPIRED",
        &token,
        "expired",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_token_is_reused_but_a_tampered_copy_is_not() {
    // The verified-token cache is keyed by the whole token: the same claims with a changed
    // signature must not ride on the cached verification.
    let mut e = env().await;
    let token = good_token();
    let body = wrap_body(b"cache", None, Some(customer()));
    let hits = [("cache", "jwt")];
    assert_ok(&e.gcp.wrap(KEY, &token, &body).await, "first use");
    let hits0 = metric_sum(&e.proxy, "ekm_cache_hits_total", &hits).await;
    assert_ok(&e.gcp.wrap(KEY, &token, &body).await, "second use (cached)");
    await_metric(&e.proxy, "ekm_cache_hits_total", &hits, hits0 + 1.0).await;
    let tampered = tamper_signature(&token);
    assert_unauthenticated(
        &e.gcp.wrap(KEY, &tampered, &body).await,
        "BAD_SIGNATURE",
        &tampered,
        "tampered copy of a cached token",
    );
    // The same claims under another audience are not the cached token either.
    let other_aud = signer1()
        .token()
        .claim("aud", "https://other.example")
        .sign();
    assert_unauthenticated(
        &e.gcp.wrap(KEY, &other_aud, &body).await,
        "WRONG_AUDIENCE",
        &other_aud,
        "other audience",
    );
    assert_ok(&e.gcp.wrap(KEY, &token, &body).await, "third use");
}

// ---------------------------------------------------------------------------------------------
// JWKS: rotation, outage, rate limit
// ---------------------------------------------------------------------------------------------

/// Issuer settings for tests that need the unknown-kid refresh to come around quickly.
const FAST_REFRESH: &str = "jwks_refresh_min_interval_secs = 1\n";
/// Issuer settings for tests that need the key set to expire quickly: the server sends no cache
/// headers, so this default lifetime applies (a max-age would be clamped to at least a minute).
const SHORT_TTL: &str = "jwks_refresh_min_interval_secs = 1\njwks_default_ttl_secs = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_new_kid_is_accepted_after_a_refresh() {
    let mut e = env_with(|s| s.issuer_keys = FAST_REFRESH.into()).await;
    let body = wrap_body(b"rotation", None, Some(customer()));
    assert_ok(&e.gcp.wrap(KEY, &good_token(), &body).await, "signer 1");
    let new = signer2().token().sign();
    // Not published yet: unknown.
    assert_unauthenticated(
        &e.gcp.wrap(KEY, &new, &body).await,
        "UNKNOWN_KID",
        &new,
        "signer 2 before it is published",
    );

    e.jwks.set_jwks(jwks_of(&[signer1(), signer2()]));
    let fetched = e.jwks.requests();
    let gcp = tokio::sync::Mutex::new(e.gcp);
    poll_until(
        "signer 2 accepted after the JWKS lists it",
        || async {
            gcp.lock()
                .await
                .wrap(KEY, &signer2().token().sign(), &body)
                .await
        },
        |r| r.status == 200,
    )
    .await;
    let mut g = gcp.into_inner();
    assert!(
        e.jwks.requests() > fetched,
        "the proxy fetched the JWKS again"
    );
    // Both keys work now.
    assert_ok(
        &g.wrap(KEY, &good_token(), &body).await,
        "signer 1 still listed",
    );
    assert_ok(
        &g.wrap(KEY, &signer2().token().sign(), &body).await,
        "signer 2",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_removed_kid_is_refused_even_for_a_cached_token() {
    let mut e = env_with(|s| s.issuer_keys = FAST_REFRESH.into()).await;
    let body = wrap_body(b"rotation", None, Some(customer()));
    let old = good_token();
    assert_ok(&e.gcp.wrap(KEY, &old, &body).await, "signer 1");
    assert_ok(
        &e.gcp.wrap(KEY, &old, &body).await,
        "signer 1 again (now cached)",
    );

    // The issuer rotates: signer 1 is gone, signer 2 takes over.
    e.jwks.set_jwks(jwks_of(&[signer2()]));
    let gcp = tokio::sync::Mutex::new(e.gcp);
    poll_until(
        "signer 2 accepted (the proxy holds the new set)",
        || async {
            gcp.lock()
                .await
                .wrap(KEY, &signer2().token().sign(), &body)
                .await
        },
        |r| r.status == 200,
    )
    .await;
    let mut g = gcp.into_inner();
    // The token verified (and cached) under the removed key is refused now.
    assert_unauthenticated(
        &g.wrap(KEY, &old, &body).await,
        "UNKNOWN_KID",
        &old,
        "cached token whose key was removed",
    );
    let fresh_old = good_token();
    assert_unauthenticated(
        &g.wrap(KEY, &fresh_old, &body).await,
        "UNKNOWN_KID",
        &fresh_old,
        "new token from the removed key",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_expiry_drops_a_removed_key_without_any_unknown_kid() {
    // No unknown kid involved: the cached set expires (no cache headers, so the issuer's
    // jwks_default_ttl_secs = 1 applies; max-age would be clamped to at least a minute) and the
    // refetch drops signer 1, which revokes even the cached token.
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    jwks.set_max_age(None);
    let mut e = env_on(jwks, |s| s.issuer_keys = SHORT_TTL.into()).await;
    let body = wrap_body(b"expiry", None, Some(customer()));
    let old = good_token();
    assert_ok(&e.gcp.wrap(KEY, &old, &body).await, "signer 1");
    assert_ok(&e.gcp.wrap(KEY, &old, &body).await, "signer 1 (cached)");
    e.jwks.set_jwks(jwks_of(&[signer2()]));
    let gcp = tokio::sync::Mutex::new(e.gcp);
    let r = poll_until(
        "the cached token refused once the JWKS expired",
        || async { gcp.lock().await.wrap(KEY, &old, &body).await },
        |r| r.status != 200,
    )
    .await;
    assert_unauthenticated(&r, "UNKNOWN_KID", &old, "after expiry");
    let mut g = gcp.into_inner();
    assert_ok(
        &g.wrap(KEY, &signer2().token().sign(), &body).await,
        "signer 2",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_with_a_last_good_set_keeps_verifying() {
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    // A one-second lifetime: the proxy soon refetches, and must keep the set when that fails.
    jwks.set_max_age(None);
    let mut e = env_on(jwks, |s| s.issuer_keys = SHORT_TTL.into()).await;
    let body = wrap_body(b"outage", None, Some(customer()));
    assert_ok(&e.gcp.wrap(KEY, &good_token(), &body).await, "JWKS up");
    let fetch_errors = [("issuer", "test"), ("outcome", "error")];
    let fetches_ok = metric_sum(
        &e.proxy,
        "ekm_jwks_fetches_total",
        &[("issuer", "test"), ("outcome", "ok")],
    )
    .await;
    assert!(
        fetches_ok >= 1.0,
        "ekm_jwks_fetches_total counts the first fetch"
    );

    for mode in [Mode::Error500, Mode::Refuse, Mode::Garbage] {
        e.jwks.set_mode(mode);
        let errors0 = metric_sum(&e.proxy, "ekm_jwks_fetches_total", &fetch_errors).await;
        let (requests0, connections0) = (e.jwks.requests(), e.jwks.connections());
        // Fresh tokens (never cached) until the proxy has tried the endpoint again; every one
        // of them must be accepted on the last good set.
        let deadline = Instant::now() + POLL_LIMIT;
        loop {
            let r = e.gcp.wrap(KEY, &good_token(), &body).await;
            assert_ok(&r, &format!("JWKS {mode:?}, last good set"));
            if e.jwks.connections() > connections0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "JWKS {mode:?}: the proxy never tried to refetch the expired set"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if mode != Mode::Refuse {
            assert!(
                e.jwks.requests() > requests0,
                "{mode:?}: an HTTP request was made"
            );
        }
        await_metric(
            &e.proxy,
            "ekm_jwks_fetches_total",
            &fetch_errors,
            errors0 + 1.0,
        )
        .await;
        for _ in 0..3 {
            assert_ok(
                &e.gcp.wrap(KEY, &good_token(), &body).await,
                &format!("JWKS {mode:?}, after the failed refetch"),
            );
        }
    }
    // Back up: a key published now is picked up.
    e.jwks.set_mode(Mode::Up);
    e.jwks.set_jwks(jwks_of(&[signer1(), signer2()]));
    let gcp = tokio::sync::Mutex::new(e.gcp);
    poll_until(
        "signer 2 accepted after the JWKS endpoint recovered",
        || async {
            gcp.lock()
                .await
                .wrap(KEY, &signer2().token().sign(), &body)
                .await
        },
        |r| r.status == 200,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_without_any_good_set_is_503_unavailable() {
    for mode in [Mode::Error500, Mode::Refuse, Mode::Garbage] {
        let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
        jwks.set_mode(mode);
        let mut e = env_on(jwks, |s| s.issuer_keys = FAST_REFRESH.into()).await;
        let body = wrap_body(MARKER, None, Some(customer()));
        let token = good_token();
        let r = e.gcp.wrap(KEY, &token, &body).await;
        assert_rpc(
            &r,
            503,
            "UNAVAILABLE",
            Some("JWKS_UNAVAILABLE"),
            &format!("JWKS {mode:?} from the start"),
        );
        await_metric(
            &e.proxy,
            "ekm_auth_failures_total",
            &[("front", "gcp"), ("reason", "jwks_unavailable")],
            1.0,
        )
        .await;
        // Once the endpoint answers, the same token goes through.
        e.jwks.set_mode(Mode::Up);
        let gcp = tokio::sync::Mutex::new(e.gcp);
        let body = wrap_body(b"recovered", None, Some(customer()));
        poll_until(
            "accepted once the JWKS endpoint is up",
            || async { gcp.lock().await.wrap(KEY, &token, &body).await },
            |r| r.status == 200,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_fetches_the_jwks_at_most_once() {
    let mut e =
        env_with(|s| s.issuer_keys = "jwks_refresh_min_interval_secs = 3600\n".into()).await;
    let body = wrap_body(MARKER, None, Some(customer()));
    assert_ok(
        &e.gcp
            .wrap(
                KEY,
                &good_token(),
                &wrap_body(b"ok", None, Some(customer())),
            )
            .await,
        "good token first (the set is loaded)",
    );
    let requests0 = e.jwks.requests();
    let connections0 = e.jwks.connections();
    let fetches0 = metric_sum(&e.proxy, "ekm_jwks_fetches_total", &[("issuer", "test")]).await;
    assert!(fetches0 >= 1.0, "the first fetch is counted");
    let limited = [("issuer", "test")];
    let limited0 = metric_sum(&e.proxy, "ekm_jwks_refresh_rate_limited_total", &limited).await;

    const FLOOD: usize = 40;
    for i in 0..FLOOD {
        let token = signer1().token().kid(Some(&format!("flood-{i}"))).sign();
        assert_unauthenticated(
            &e.gcp.wrap(KEY, &token, &body).await,
            "UNKNOWN_KID",
            &token,
            &format!("unknown kid #{i}"),
        );
    }
    let requests = e.jwks.requests() - requests0;
    let connections = e.jwks.connections() - connections0;
    assert!(
        requests <= 1 && connections <= 1,
        "{FLOOD} unknown kids made {requests} JWKS requests ({connections} connections); at most 1 allowed"
    );
    let fetches =
        metric_sum(&e.proxy, "ekm_jwks_fetches_total", &[("issuer", "test")]).await - fetches0;
    assert!(fetches <= 1.0, "ekm_jwks_fetches_total moved by {fetches}");
    await_metric(
        &e.proxy,
        "ekm_jwks_refresh_rate_limited_total",
        &limited,
        limited0 + (FLOOD - 1) as f64,
    )
    .await;
    await_metric(
        &e.proxy,
        "ekm_auth_failures_total",
        &[("front", "gcp"), ("reason", "unknown_kid")],
        FLOOD as f64,
    )
    .await;
    // Known kids are unaffected by the throttle.
    assert_ok(
        &e.gcp
            .wrap(
                KEY,
                &good_token(),
                &wrap_body(b"ok", None, Some(customer())),
            )
            .await,
        "good token after the flood",
    );
}

// ---------------------------------------------------------------------------------------------
// Blob integrity and binding
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_blobs_are_invalid_argument_and_the_proxy_keeps_serving() {
    let mut e = env().await;
    let token = good_token();
    let aad = b"tamper aad";
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(MARKER, Some(aad), Some(customer())))
        .await;
    let id_end = 3 + blob[2] as usize;
    let iv = id_end;
    let ct = id_end + IV_LEN;
    let tag = blob.len() - TAG_LEN;
    let flip = |i: usize, bit: u8| {
        let mut b = blob.clone();
        b[i] ^= bit;
        b
    };
    // Each case and the ErrorInfo reason it must get: INVALID_FIELD when the bytes are not a
    // blob at all, UNKNOWN_KEY_VERSION when the recorded key is not one of this key path's,
    // UNWRAP_FAILED when the HSM's GCM check catches it (everything bound by the AAD).
    const FIELD: &str = "INVALID_FIELD";
    const VERSION: &str = "UNKNOWN_KEY_VERSION";
    const GCM: &str = "UNWRAP_FAILED";
    let mut other_key = blob.clone();
    other_key[3..id_end].copy_from_slice(b"dev-aes-2");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("format version 0x01 -> 0x03", flip(0, 0x02), FIELD),
        ("format version 0x01 -> 0x00", flip(0, 0x01), FIELD),
        ("health-check flag set", flip(1, FLAG_HEALTH_CHECK), GCM),
        ("unknown flag bit", flip(1, 0x80), FIELD),
        ("key id length - 1", flip(2, 0x01), VERSION),
        ("key id first byte", flip(3, 0x01), VERSION),
        ("key id last byte", flip(id_end - 1, 0x20), VERSION),
        ("key id of another key", other_key, VERSION),
        ("IV first byte", flip(iv, 0x01), GCM),
        ("IV last byte", flip(iv + IV_LEN - 1, 0x80), GCM),
        ("ciphertext first byte", flip(ct, 0x01), GCM),
        ("ciphertext last byte", flip(tag - 1, 0x40), GCM),
        ("tag first byte", flip(tag, 0x01), GCM),
        ("tag last byte", flip(blob.len() - 1, 0x80), GCM),
        (
            "truncated by one byte",
            blob[..blob.len() - 1].to_vec(),
            GCM,
        ),
        ("one byte appended", [blob.as_slice(), &[0]].concat(), GCM),
        ("header and IV only", blob[..ct].to_vec(), FIELD),
        ("one byte", vec![BLOB_FORMAT], FIELD),
        ("empty", Vec::new(), FIELD),
        (
            "random bytes",
            (0..blob.len()).map(|i| (i * 37 % 251) as u8).collect(),
            FIELD,
        ),
    ];
    let n = cases.len();
    let bad0 = metric_sum(
        &e.proxy,
        "ekm_requests_total",
        &[
            ("front", "gcp"),
            ("op", "unwrap"),
            ("outcome", "INVALID_ARGUMENT"),
        ],
    )
    .await;
    for (what, bad, reason) in cases {
        let r = e
            .gcp
            .unwrap(KEY, &token, &unwrap_body(&bad, Some(aad), Some(customer())))
            .await;
        let v = assert_rpc(
            &r,
            400,
            "INVALID_ARGUMENT",
            Some(reason),
            &format!("blob with {what}"),
        );
        if reason == FIELD {
            assert_eq!(bad_request_fields(&v), ["wrappedBlob"], "{what}: {v}");
        }
    }
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[
            ("front", "gcp"),
            ("op", "unwrap"),
            ("outcome", "INVALID_ARGUMENT"),
        ],
        bad0 + n as f64,
    )
    .await;
    // Still serving, and the genuine blob still opens.
    assert_eq!(
        e.gcp
            .unwrap_ok(
                KEY,
                &token,
                &unwrap_body(&blob, Some(aad), Some(customer()))
            )
            .await,
        MARKER
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_aad_is_invalid_argument() {
    let mut e = env().await;
    let token = good_token();
    let with = e
        .gcp
        .wrap_ok(
            KEY,
            &token,
            &wrap_body(MARKER, Some(b"aad-1"), Some(customer())),
        )
        .await;
    let without = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(MARKER, None, Some(customer())))
        .await;
    for (what, blob, aad) in [
        ("other AAD", &with, Some(&b"aad-2"[..])),
        ("AAD with a byte more", &with, Some(&b"aad-1\0"[..])),
        ("AAD with a byte less", &with, Some(&b"aad-"[..])),
        ("no AAD for a blob made with one", &with, None),
        ("AAD for a blob made without", &without, Some(&b"aad-1"[..])),
    ] {
        let r = e
            .gcp
            .unwrap(KEY, &token, &unwrap_body(blob, aad, Some(customer())))
            .await;
        assert_rpc(&r, 400, "INVALID_ARGUMENT", Some("UNWRAP_FAILED"), what);
    }
    // An empty AAD string is the same as none (proto3: empty bytes = absent).
    let mut b = unwrap_body(&without, None, Some(customer()));
    b["additionalAuthenticatedData"] = json!("");
    assert_eq!(e.gcp.unwrap_ok(KEY, &token, &b).await, MARKER);
    assert_eq!(
        e.gcp
            .unwrap_ok(
                KEY,
                &token,
                &unwrap_body(&with, Some(b"aad-1"), Some(customer()))
            )
            .await,
        MARKER
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_only_opens_under_the_key_path_it_was_wrapped_under() {
    // Three key paths on the same HSM key: only the AAD binding to the key path tells them
    // apart. "k1" and "k2" have the same length, so a binding to the length alone is not enough.
    let paths = ["k1", "k2", "team-b/k1"];
    let mut e = env_with(|s| {
        s.keys = paths
            .iter()
            .map(|p| gcp_key(p, HSM_KEY, "", &[SERVICE_ACCOUNT]))
            .collect();
    })
    .await;
    let token = good_token();
    let mut blobs = Vec::new();
    for path in paths {
        let blob = e
            .gcp
            .wrap_ok(
                path,
                &token,
                &wrap_body(path.as_bytes(), None, Some(customer())),
            )
            .await;
        assert_eq!(parse_blob(&blob).key_id, HSM_KEY, "same HSM key");
        blobs.push(blob);
    }
    for (i, blob) in blobs.iter().enumerate() {
        for (j, path) in paths.iter().enumerate() {
            let r = e
                .gcp
                .unwrap(path, &token, &unwrap_body(blob, None, Some(customer())))
                .await;
            if i == j {
                let v = assert_ok(&r, &format!("{path} blob under {path}"));
                assert_eq!(v["plaintext"], B64.encode(path), "{path}");
            } else {
                assert_rpc(
                    &r,
                    400,
                    "INVALID_ARGUMENT",
                    Some("UNWRAP_FAILED"),
                    &format!("{} blob under {path}", paths[i]),
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_paths_are_404() {
    let mut e = env().await;
    let token = good_token();
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(MARKER, None, Some(customer())))
        .await;
    for path in ["nope", "k1/sub", "k", "k1x", "team/k1"] {
        let r = e
            .gcp
            .wrap(path, &token, &wrap_body(MARKER, None, Some(customer())))
            .await;
        assert_rpc(
            &r,
            404,
            "NOT_FOUND",
            Some("KEY_NOT_FOUND"),
            &format!("wrap under {path}"),
        );
        let r = e
            .gcp
            .unwrap(path, &token, &unwrap_body(&blob, None, Some(customer())))
            .await;
        assert_rpc(
            &r,
            404,
            "NOT_FOUND",
            Some("KEY_NOT_FOUND"),
            &format!("unwrap under {path}"),
        );
    }
    // The key path is looked up only after the token: a bad token learns nothing about keys.
    let forged = attacker().token().sign();
    assert_unauthenticated(
        &e.gcp
            .wrap("nope", &forged, &wrap_body(MARKER, None, Some(customer())))
            .await,
        "BAD_SIGNATURE",
        &forged,
        "forged token on an unknown key path",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_hsm_keys_still_unwrap_after_rotation() {
    let token = TestToken::new();
    token.add_key(&ekm_proxy::hsm::bootstrap::KeySpec {
        label: "gcp-aes-2".into(),
        ..ekm_proxy::dev::profile::dev_key_specs()
            .into_iter()
            .find(|k| k.label == HSM_KEY)
            .unwrap()
    });
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    let bearer = good_token();

    // Before rotation: k1 on dev-aes-1.
    let section = GcpSection::with_server(&jwks);
    let proxy = TestProxy::start_on(token.clone(), section.options()).await;
    let mut gcp = Gcp::new(&proxy).await;
    let old = gcp
        .wrap_ok(KEY, &bearer, &wrap_body(b"old", None, Some(customer())))
        .await;
    assert_eq!(parse_blob(&old).key_id, HSM_KEY);
    proxy.stop().await;

    // Rotated: new blobs under gcp-aes-2, old ones still open.
    let mut section = GcpSection::with_server(&jwks);
    section.keys = gcp_key(
        KEY,
        "gcp-aes-2",
        &format!("previous_hsm_keys = [\"{HSM_KEY}\"]"),
        &[SERVICE_ACCOUNT],
    );
    let proxy = TestProxy::start_on(token.clone(), section.options()).await;
    let mut gcp = Gcp::new(&proxy).await;
    let new = gcp
        .wrap_ok(KEY, &bearer, &wrap_body(b"new", None, Some(customer())))
        .await;
    assert_eq!(parse_blob(&new).key_id, "gcp-aes-2");
    assert_eq!(
        gcp.unwrap_ok(KEY, &bearer, &unwrap_body(&old, None, Some(customer())))
            .await,
        b"old"
    );
    assert_eq!(
        gcp.unwrap_ok(KEY, &bearer, &unwrap_body(&new, None, Some(customer())))
            .await,
        b"new"
    );
    proxy.stop().await;

    // Old key retired: its blobs are refused (the id is not a version of this key path).
    let mut section = GcpSection::with_server(&jwks);
    section.keys = gcp_key(KEY, "gcp-aes-2", "", &[SERVICE_ACCOUNT]);
    let proxy = TestProxy::start_on(token, section.options()).await;
    let mut gcp = Gcp::new(&proxy).await;
    let r = gcp
        .unwrap(KEY, &bearer, &unwrap_body(&old, None, Some(customer())))
        .await;
    assert_rpc(
        &r,
        400,
        "INVALID_ARGUMENT",
        Some("UNKNOWN_KEY_VERSION"),
        "blob of a retired HSM key",
    );
    assert_eq!(
        gcp.unwrap_ok(KEY, &bearer, &unwrap_body(&new, None, Some(customer())))
            .await,
        b"new"
    );
}

// ---------------------------------------------------------------------------------------------
// Authorization: grants, KAJ, resource names
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_for_another_service_account_is_403() {
    let mut e = env_with(|s| {
        s.keys = [
            gcp_key("k1", HSM_KEY, "", &[SERVICE_ACCOUNT]),
            gcp_key("theirs", HSM_KEY, "", &[OTHER_SERVICE_ACCOUNT]),
            format!(
                r#"
[[gcp.key]]
path = "wrap-only"
hsm_key = "{HSM_KEY}"
[[gcp.key.grant]]
name = "wrapper"
service_accounts = ["{SERVICE_ACCOUNT}"]
operations = ["wrap"]
"#
            ),
        ]
        .concat();
    })
    .await;
    let ours = good_token();
    let theirs = signer1().token().email(OTHER_SERVICE_ACCOUNT).sign();
    let body = wrap_body(MARKER, None, Some(customer()));
    let denied0 = metric_sum(
        &e.proxy,
        "ekm_requests_total",
        &[("front", "gcp"), ("outcome", "PERMISSION_DENIED")],
    )
    .await;

    // Each service agent on its own key.
    let blob = e.gcp.wrap_ok("k1", &ours, &body).await;
    let their_blob = e.gcp.wrap_ok("theirs", &theirs, &body).await;
    // And never on the other's.
    let v = assert_denied(
        &e.gcp.wrap("k1", &theirs, &body).await,
        "grants",
        "other SA wraps k1",
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains(OTHER_SERVICE_ACCOUNT),
        "the denial names who was refused: {v}"
    );
    assert_denied(
        &e.gcp
            .unwrap("k1", &theirs, &unwrap_body(&blob, None, Some(customer())))
            .await,
        "grants",
        "other SA unwraps k1",
    );
    assert_denied(
        &e.gcp.wrap("theirs", &ours, &body).await,
        "grants",
        "our SA wraps theirs",
    );
    assert_denied(
        &e.gcp
            .unwrap(
                "theirs",
                &ours,
                &unwrap_body(&their_blob, None, Some(customer())),
            )
            .await,
        "grants",
        "our SA unwraps theirs",
    );

    // Operations are granted one by one.
    let blob = e.gcp.wrap_ok("wrap-only", &ours, &body).await;
    assert_denied(
        &e.gcp
            .unwrap(
                "wrap-only",
                &ours,
                &unwrap_body(&blob, None, Some(customer())),
            )
            .await,
        "grants",
        "unwrap on a wrap-only grant",
    );
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[("front", "gcp"), ("outcome", "PERMISSION_DENIED")],
        denied0 + 5.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disallowed_kaj_reason_is_403_naming_the_rule() {
    let mut e = env().await;
    let token = good_token();
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(b"kaj", None, Some(customer())))
        .await;
    for (reason, name) in [
        (
            json!("THIRD_PARTY_DATA_REQUEST"),
            "THIRD_PARTY_DATA_REQUEST",
        ),
        (json!("GOOGLE_INITIATED_REVIEW"), "GOOGLE_INITIATED_REVIEW"),
        (
            json!("CUSTOMER_INITIATED_SUPPORT"),
            "CUSTOMER_INITIATED_SUPPORT",
        ),
        (json!("REASON_NOT_EXPECTED"), "REASON_NOT_EXPECTED"),
        (
            json!("GOOGLE_RESPONSE_TO_PRODUCTION_ALERT"),
            "GOOGLE_RESPONSE_TO_PRODUCTION_ALERT",
        ),
        (json!(3), "THIRD_PARTY_DATA_REQUEST"),
        (json!(7), "REASON_NOT_EXPECTED"),
        (json!(11), "CUSTOMER_AUTHORIZED_WORKFLOW_SERVICING"),
    ] {
        let ctx = Some(reason_ctx(reason.clone()));
        let v = assert_denied(
            &e.gcp
                .wrap(KEY, &token, &wrap_body(MARKER, None, ctx.clone()))
                .await,
            "access_reasons",
            &format!("wrap with {reason}"),
        );
        assert!(
            v["message"].as_str().unwrap_or_default().contains(name),
            "the denial names the reason {name}: {v}"
        );
        assert_denied(
            &e.gcp
                .unwrap(KEY, &token, &unwrap_body(&blob, None, ctx))
                .await,
            "access_reasons",
            &format!("unwrap with {reason}"),
        );
    }
    // The allowed reasons, by name and by number.
    for reason in [
        json!("CUSTOMER_INITIATED_ACCESS"),
        json!("GOOGLE_INITIATED_SYSTEM_OPERATION"),
        json!(5),
        json!(6),
    ] {
        let ctx = Some(reason_ctx(reason.clone()));
        assert_eq!(
            e.gcp
                .unwrap_ok(KEY, &token, &unwrap_body(&blob, None, ctx.clone()))
                .await,
            b"kaj",
            "unwrap with {reason}"
        );
        e.gcp
            .wrap_ok(KEY, &token, &wrap_body(b"kaj", None, ctx))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_special_kaj_cases_follow_their_switches() {
    // One key per switch (per-key policy override), plus the default policy (all off) on k1.
    let policy = |absent: bool, unspecified: bool, unknown: bool| {
        format!(
            "access_reasons = {{ allow = [\"CUSTOMER_INITIATED_ACCESS\"], allow_absent = {absent}, \
             allow_unspecified = {unspecified}, allow_unknown = {unknown}, allow_health_checks = true }}"
        )
    };
    let mut e = env_with(|s| {
        s.keys = [
            gcp_key("k1", HSM_KEY, "", &[SERVICE_ACCOUNT]),
            gcp_key(
                "absent-ok",
                HSM_KEY,
                &policy(true, false, false),
                &[SERVICE_ACCOUNT],
            ),
            gcp_key(
                "unspecified-ok",
                HSM_KEY,
                &policy(false, true, false),
                &[SERVICE_ACCOUNT],
            ),
            gcp_key(
                "unknown-ok",
                HSM_KEY,
                &policy(false, false, true),
                &[SERVICE_ACCOUNT],
            ),
        ]
        .concat();
    })
    .await;
    let token = good_token();
    // Which special case each context is.
    let cases: Vec<(&str, &str, Option<Value>)> = vec![
        ("absent", "no additionalContext", None),
        (
            "absent",
            "context without accessReasonContext",
            Some(json!({ "relativeResourceName": RESOURCE })),
        ),
        (
            "unspecified",
            "REASON_UNSPECIFIED",
            Some(reason_ctx("REASON_UNSPECIFIED")),
        ),
        ("unspecified", "reason 0", Some(reason_ctx(0))),
        (
            "unspecified",
            "accessReasonContext without reason",
            Some(json!({ "relativeResourceName": RESOURCE, "accessReasonContext": {} })),
        ),
        (
            "unspecified",
            "reason \"0\" as a string",
            Some(reason_ctx("0")),
        ),
        ("unknown", "unknown number", Some(reason_ctx(4242))),
        (
            "unknown",
            "unknown number as a string",
            Some(reason_ctx("4242")),
        ),
        ("unknown", "negative number", Some(reason_ctx(-1))),
        // A denied reason in its numeric-string form is that reason (denied everywhere).
        (
            "denied",
            "\"3\" (THIRD_PARTY_DATA_REQUEST)",
            Some(reason_ctx("3")),
        ),
        // proto3 JSON: anything but the exact name or the number is malformed, never "unknown",
        // so allow_unknown cannot be reached by respelling a denied reason.
        (
            "malformed",
            "unknown name",
            Some(reason_ctx("A_REASON_FROM_THE_FUTURE")),
        ),
        (
            "malformed",
            "lower case",
            Some(reason_ctx("third_party_data_request")),
        ),
        (
            "malformed",
            "spaces",
            Some(reason_ctx(" THIRD_PARTY_DATA_REQUEST ")),
        ),
        ("malformed", "padded number", Some(reason_ctx(" 3"))),
        ("malformed", "empty string", Some(reason_ctx(""))),
    ];
    for (key, allowed_case) in [
        ("k1", ""),
        ("absent-ok", "absent"),
        ("unspecified-ok", "unspecified"),
        ("unknown-ok", "unknown"),
    ] {
        for (case, what, ctx) in &cases {
            let r = e
                .gcp
                .wrap(key, &token, &wrap_body(b"special", None, ctx.clone()))
                .await;
            if case == &"malformed" {
                assert_rpc(
                    &r,
                    400,
                    "INVALID_ARGUMENT",
                    Some("INVALID_FIELD"),
                    &format!("{key}: {what}"),
                );
            } else if case == &allowed_case {
                assert_ok(&r, &format!("{key}: {what}"));
            } else {
                assert_denied(&r, "access_reasons", &format!("{key}: {what}"));
            }
        }
        // A refused ordinary reason is refused on every key, allowed special cases or not.
        let r = e
            .gcp
            .wrap(
                key,
                &token,
                &wrap_body(MARKER, None, Some(reason_ctx("THIRD_PARTY_DATA_REQUEST"))),
            )
            .await;
        assert_denied(
            &r,
            "access_reasons",
            &format!("{key}: THIRD_PARTY_DATA_REQUEST"),
        );
        assert_ok(
            &e.gcp
                .wrap(key, &token, &wrap_body(b"ok", None, Some(customer())))
                .await,
            &format!("{key}: CUSTOMER_INITIATED_ACCESS"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_names_pin_a_key_to_cloud_kms_keys() {
    let pinned = format!(
        "resource_names = [\"{RESOURCE}\", \"projects/other-project/locations/*/keyRings/ring-9/cryptoKeys/key-9/cryptoKeyVersions/*\"]"
    );
    let mut e = env_with(|s| {
        s.keys = [
            gcp_key("k1", HSM_KEY, "", &[SERVICE_ACCOUNT]),
            gcp_key("pinned", HSM_KEY, &pinned, &[SERVICE_ACCOUNT]),
        ]
        .concat();
    })
    .await;
    let token = good_token();
    let ctx_for = |name: &str| {
        let mut c = customer();
        c["relativeResourceName"] = json!(name);
        c["fullResourceName"] = json!(format!("//cloudkms.googleapis.com/{name}"));
        c
    };
    let blob = e
        .gcp
        .wrap_ok("pinned", &token, &wrap_body(b"pin", None, Some(customer())))
        .await;
    let glob_match = "projects/other-project/locations/europe-west1/keyRings/ring-9/cryptoKeys/key-9/cryptoKeyVersions/3";
    e.gcp
        .wrap_ok(
            "pinned",
            &token,
            &wrap_body(b"pin", None, Some(ctx_for(glob_match))),
        )
        .await;
    assert_eq!(
        e.gcp
            .unwrap_ok(
                "pinned",
                &token,
                &unwrap_body(&blob, None, Some(ctx_for(glob_match)))
            )
            .await,
        b"pin"
    );
    for other in [
        "projects/evil-project/locations/us-east1/keyRings/ring-1/cryptoKeys/key-1/cryptoKeyVersions/1",
        "projects/test-project/locations/us-east1/keyRings/ring-1/cryptoKeys/key-2/cryptoKeyVersions/1",
        "projects/other-project/locations/europe-west1/keyRings/ring-8/cryptoKeys/key-9/cryptoKeyVersions/3",
    ] {
        let v = assert_denied(
            &e.gcp
                .wrap(
                    "pinned",
                    &token,
                    &wrap_body(MARKER, None, Some(ctx_for(other))),
                )
                .await,
            "resource_names",
            &format!("wrap for {other}"),
        );
        assert!(
            v["message"].as_str().unwrap_or_default().contains(other),
            "the denial names the resource: {v}"
        );
        assert_denied(
            &e.gcp
                .unwrap(
                    "pinned",
                    &token,
                    &unwrap_body(&blob, None, Some(ctx_for(other))),
                )
                .await,
            "resource_names",
            &format!("unwrap for {other}"),
        );
    }
    // No resource name at all: nothing to match the pin.
    let mut c = customer();
    c.as_object_mut().unwrap().remove("relativeResourceName");
    c.as_object_mut().unwrap().remove("fullResourceName");
    assert_denied(
        &e.gcp
            .wrap("pinned", &token, &wrap_body(MARKER, None, Some(c.clone())))
            .await,
        "resource_names",
        "wrap without a resource name",
    );
    // The unpinned key takes any.
    e.gcp
        .wrap_ok("k1", &token, &wrap_body(b"x", None, Some(c)))
        .await;
    e.gcp
        .wrap_ok(
            "k1",
            &token,
            &wrap_body(b"x", None, Some(ctx_for("projects/evil-project/x"))),
        )
        .await;
}

// ---------------------------------------------------------------------------------------------
// Health checks
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_skip_the_reason_but_cannot_open_real_blobs() {
    let mut e = env().await;
    let token = good_token();
    let probe = b"health probe";

    // A health check without any reason is allowed, and marks its blob.
    let hblob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(probe, None, Some(health_ctx())))
        .await;
    let parsed = parse_blob(&hblob);
    assert_eq!(
        parsed.flags & FLAG_HEALTH_CHECK,
        FLAG_HEALTH_CHECK,
        "health-check flag set"
    );
    assert_eq!(parsed.key_id, HSM_KEY);
    assert_eq!(
        e.gcp
            .unwrap_ok(KEY, &token, &unwrap_body(&hblob, None, Some(health_ctx())))
            .await,
        probe
    );
    // A health check with a refused reason is still a health check (the flag decides).
    let mut with_reason = health_ctx();
    with_reason["accessReasonContext"] = json!({ "reason": "THIRD_PARTY_DATA_REQUEST" });
    let hblob2 = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(probe, None, Some(with_reason)))
        .await;
    assert_eq!(
        parse_blob(&hblob2).flags & FLAG_HEALTH_CHECK,
        FLAG_HEALTH_CHECK
    );
    // But grants still apply to health checks.
    let other = signer1().token().email(OTHER_SERVICE_ACCOUNT).sign();
    assert_denied(
        &e.gcp
            .wrap(KEY, &other, &wrap_body(probe, None, Some(health_ctx())))
            .await,
        "grants",
        "health check by a service account without a grant",
    );

    // A real blob cannot be opened by a health-check unwrap, whatever the reason.
    let real = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(MARKER, None, Some(customer())))
        .await;
    assert_eq!(parse_blob(&real).flags & FLAG_HEALTH_CHECK, 0);
    let r = e
        .gcp
        .unwrap(KEY, &token, &unwrap_body(&real, None, Some(health_ctx())))
        .await;
    assert_rpc(
        &r,
        400,
        "INVALID_ARGUMENT",
        Some("HEALTH_CHECK_BLOB_REQUIRED"),
        "health-check unwrap of a real blob",
    );
    let mut h = health_ctx();
    h["accessReasonContext"] = json!({ "reason": "CUSTOMER_INITIATED_ACCESS" });
    let r = e
        .gcp
        .unwrap(KEY, &token, &unwrap_body(&real, None, Some(h)))
        .await;
    assert_rpc(
        &r,
        400,
        "INVALID_ARGUMENT",
        Some("HEALTH_CHECK_BLOB_REQUIRED"),
        "health-check unwrap with a reason",
    );
    // Nor by setting the flag byte in the real blob: the flags are bound by the AAD.
    let mut forged = real.clone();
    forged[1] |= FLAG_HEALTH_CHECK;
    let r = e
        .gcp
        .unwrap(KEY, &token, &unwrap_body(&forged, None, Some(health_ctx())))
        .await;
    assert_rpc(
        &r,
        400,
        "INVALID_ARGUMENT",
        Some("UNWRAP_FAILED"),
        "real blob with the flag byte forged",
    );
    // The real blob is fine for a real unwrap.
    assert_eq!(
        e.gcp
            .unwrap_ok(KEY, &token, &unwrap_body(&real, None, Some(customer())))
            .await,
        MARKER
    );

    // Metrics tell health checks apart.
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[
            ("front", "gcp"),
            ("op", "wrap_health_check"),
            ("outcome", "ok"),
        ],
        2.0,
    )
    .await;
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[
            ("front", "gcp"),
            ("op", "unwrap_health_check"),
            ("outcome", "ok"),
        ],
        1.0,
    )
    .await;
    await_metric(
        &e.proxy,
        "ekm_requests_total",
        &[
            ("front", "gcp"),
            ("op", "unwrap_health_check"),
            ("outcome", "INVALID_ARGUMENT"),
        ],
        3.0,
    )
    .await;
    assert_eq!(
        metric_sum(
            &e.proxy,
            "ekm_requests_total",
            &[("front", "gcp"), ("op", "wrap"), ("outcome", "ok")],
        )
        .await,
        1.0,
        "only the one real wrap counts as op=wrap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_need_a_reason_when_not_allowed() {
    let mut e = env_with(|s| {
        s.access_reasons = s
            .access_reasons
            .replace("allow_health_checks = true", "allow_health_checks = false");
        assert!(s.access_reasons.contains("allow_health_checks = false"));
    })
    .await;
    let token = good_token();
    assert_denied(
        &e.gcp
            .wrap(KEY, &token, &wrap_body(b"probe", None, Some(health_ctx())))
            .await,
        "access_reasons",
        "health check without a reason",
    );
    let mut refused = health_ctx();
    refused["accessReasonContext"] = json!({ "reason": "THIRD_PARTY_DATA_REQUEST" });
    assert_denied(
        &e.gcp
            .wrap(KEY, &token, &wrap_body(b"probe", None, Some(refused)))
            .await,
        "access_reasons",
        "health check with a refused reason",
    );
    // With an allowed reason it goes through (and is still a health-check blob).
    let mut h = health_ctx();
    h["accessReasonContext"] = json!({ "reason": "GOOGLE_INITIATED_SYSTEM_OPERATION" });
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(b"probe", None, Some(h.clone())))
        .await;
    assert_eq!(
        parse_blob(&blob).flags & FLAG_HEALTH_CHECK,
        FLAG_HEALTH_CHECK
    );
    assert_eq!(
        e.gcp
            .unwrap_ok(KEY, &token, &unwrap_body(&blob, None, Some(h)))
            .await,
        b"probe"
    );
}

// ---------------------------------------------------------------------------------------------
// Key state, kill switch
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_and_disabled_keys_are_failed_precondition() {
    let mut e = env_with(|s| {
        s.keys = [
            gcp_key("k1", HSM_KEY, "", &[SERVICE_ACCOUNT]),
            gcp_key("off", HSM_KEY, "enabled = false", &[SERVICE_ACCOUNT]),
        ]
        .concat();
    })
    .await;
    let token = good_token();
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(b"before", None, Some(customer())))
        .await;
    const DISABLED: Option<&str> = Some("KEY_DISABLED");

    // A disabled key refuses both operations.
    let r = e
        .gcp
        .wrap("off", &token, &wrap_body(MARKER, None, Some(customer())))
        .await;
    assert_rpc(
        &r,
        400,
        "FAILED_PRECONDITION",
        DISABLED,
        "wrap on a disabled key",
    );
    let r = e
        .gcp
        .unwrap("off", &token, &unwrap_body(&blob, None, Some(customer())))
        .await;
    assert_rpc(
        &r,
        400,
        "FAILED_PRECONDITION",
        DISABLED,
        "unwrap on a disabled key",
    );

    let kill = e.proxy.dir.path().join("KILL");
    std::fs::write(&kill, b"engaged by test\n").unwrap();
    let gcp = tokio::sync::Mutex::new(e.gcp);
    let body = wrap_body(MARKER, None, Some(customer()));
    let r = poll_until(
        "kill switch engaged",
        || async { gcp.lock().await.wrap(KEY, &token, &body).await },
        |r| r.status != 200,
    )
    .await;
    let mut g = gcp.into_inner();
    assert_rpc(
        &r,
        400,
        "FAILED_PRECONDITION",
        DISABLED,
        "wrap under the kill switch",
    );
    let r = g
        .unwrap(KEY, &token, &unwrap_body(&blob, None, Some(customer())))
        .await;
    assert_rpc(
        &r,
        400,
        "FAILED_PRECONDITION",
        DISABLED,
        "unwrap under the kill switch",
    );
    let r = g
        .wrap(KEY, &token, &wrap_body(b"probe", None, Some(health_ctx())))
        .await;
    assert_rpc(
        &r,
        400,
        "FAILED_PRECONDITION",
        DISABLED,
        "health check under the kill switch",
    );
    // Authentication still comes first.
    let bad = tamper_signature(&token);
    assert_unauthenticated(
        &g.wrap(KEY, &bad, &body).await,
        "BAD_SIGNATURE",
        &bad,
        "bad token under the kill switch",
    );

    std::fs::remove_file(&kill).unwrap();
    let gcp = tokio::sync::Mutex::new(g);
    let after = wrap_body(b"after", None, Some(customer()));
    poll_until(
        "kill switch released",
        || async { gcp.lock().await.wrap(KEY, &token, &after).await },
        |r| r.status == 200,
    )
    .await;
    let mut g = gcp.into_inner();
    assert_eq!(
        g.unwrap_ok(KEY, &token, &unwrap_body(&blob, None, Some(customer())))
            .await,
        b"before"
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed requests, methods, limits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_400_and_never_take_the_proxy_down() {
    let mut e = env_with(|s| {
        s.section_keys = "max_plaintext_bytes = 1024\nmax_aad_bytes = 512\n".into();
    })
    .await;
    let token = good_token();
    let auth = format!("Bearer {token}");
    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(b"fine", None, Some(customer())))
        .await;
    let ctx = customer();
    // Bodies that are not a request at all: MALFORMED_REQUEST.
    let raw: Vec<(&str, &str, Vec<u8>)> = vec![
        ("wrap", "empty body", Vec::new()),
        ("wrap", "not JSON", b"plaintext=abc".to_vec()),
        ("wrap", "truncated JSON", b"{\"plaintext\": \"YWJj".to_vec()),
        ("wrap", "a JSON array", b"[1,2,3]".to_vec()),
        ("wrap", "a JSON string", b"\"abc\"".to_vec()),
        (
            "wrap",
            "invalid UTF-8",
            b"{\"plaintext\": \"\xff\xfe\"}".to_vec(),
        ),
        ("unwrap", "not JSON", b"}{".to_vec()),
        ("wrap", "deeply nested", vec![b'['; 100_000]),
    ];
    for (op, what, body) in raw {
        let r = e
            .gcp
            .send("POST", &key_url(KEY, op), Some(&auth), body)
            .await;
        assert_rpc(
            &r,
            400,
            "INVALID_ARGUMENT",
            Some("MALFORMED_REQUEST"),
            &format!("{op}: {what}"),
        );
    }
    // Fields of the wrong JSON type: MALFORMED_REQUEST too.
    let typed: Vec<(&str, &str, Value)> = vec![
        (
            "wrap",
            "plaintext a number",
            json!({"plaintext": 12, "additionalContext": ctx}),
        ),
        (
            "wrap",
            "context not an object",
            json!({"plaintext": "YWJj", "additionalContext": "customer"}),
        ),
        (
            "wrap",
            "reason an object",
            json!({"plaintext": "YWJj", "additionalContext": {"accessReasonContext": {"reason": {"x": 1}}}}),
        ),
        (
            "wrap",
            "health flag a string",
            json!({"plaintext": "YWJj", "additionalContext": {"isKeyHealthCheck": "yes"}}),
        ),
        (
            "unwrap",
            "blob a list",
            json!({"wrappedBlob": [1, 2], "additionalContext": ctx}),
        ),
    ];
    for (op, what, body) in typed {
        let r = e.gcp.op(KEY, op, &token, &body).await;
        assert_rpc(
            &r,
            400,
            "INVALID_ARGUMENT",
            Some("MALFORMED_REQUEST"),
            &format!("{op}: {what}"),
        );
    }
    // Bad values: INVALID_FIELD with a BadRequest naming the field.
    let fields: Vec<(&str, &str, Value, &str)> = vec![
        (
            "wrap",
            "plaintext not base64",
            json!({"plaintext": "not base64!!", "additionalContext": ctx}),
            "plaintext",
        ),
        (
            "wrap",
            "plaintext missing",
            json!({"additionalContext": ctx}),
            "plaintext",
        ),
        (
            "wrap",
            "AAD not base64",
            json!({"plaintext": "YWJj", "additionalAuthenticatedData": "%%%", "additionalContext": ctx}),
            "additionalAuthenticatedData",
        ),
        (
            "wrap",
            "plaintext over max_plaintext_bytes",
            wrap_body(&[7u8; 1025], None, Some(ctx.clone())),
            "plaintext",
        ),
        (
            "wrap",
            "AAD over max_aad_bytes",
            wrap_body(b"abc", Some(&[7u8; 513]), Some(ctx.clone())),
            "additionalAuthenticatedData",
        ),
        (
            "unwrap",
            "blob not base64",
            json!({"wrappedBlob": "@@@@", "additionalContext": ctx}),
            "wrappedBlob",
        ),
        (
            "unwrap",
            "blob missing",
            json!({"additionalContext": ctx}),
            "wrappedBlob",
        ),
        (
            "unwrap",
            "blob over the limit",
            unwrap_body(&[1u8; 4096], None, Some(ctx.clone())),
            "wrappedBlob",
        ),
        (
            "unwrap",
            "AAD over max_aad_bytes",
            unwrap_body(&blob, Some(&[7u8; 513]), Some(ctx.clone())),
            "additionalAuthenticatedData",
        ),
    ];
    for (op, what, body, field) in fields {
        let r = e.gcp.op(KEY, op, &token, &body).await;
        let v = assert_rpc(
            &r,
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_FIELD"),
            &format!("{op}: {what}"),
        );
        assert_eq!(bad_request_fields(&v), [field], "{op}: {what}: {v}");
    }
    // Exactly at the limits is fine.
    let at = e
        .gcp
        .wrap_ok(
            KEY,
            &token,
            &wrap_body(&[7u8; 1024], Some(&[8u8; 512]), Some(ctx.clone())),
        )
        .await;
    assert_eq!(
        e.gcp
            .unwrap_ok(
                KEY,
                &token,
                &unwrap_body(&at, Some(&[8u8; 512]), Some(ctx.clone()))
            )
            .await,
        vec![7u8; 1024]
    );

    // The blob limit is max_plaintext_bytes plus the largest blob overhead: header (3), a key
    // version of up to 255 bytes, IV (12) and tag (16). At 1024 + 286 bytes a blob is parsed
    // (this one names a key version that does not exist); one byte more is refused by size.
    for (len, reason) in [
        (1024 + 286, "UNKNOWN_KEY_VERSION"),
        (1024 + 287, "INVALID_FIELD"),
    ] {
        let r = e
            .gcp
            .op(
                KEY,
                "unwrap",
                &token,
                &unwrap_body(&vec![1u8; len], None, Some(ctx.clone())),
            )
            .await;
        let v = assert_rpc(
            &r,
            400,
            "INVALID_ARGUMENT",
            Some(reason),
            &format!("{len}-byte blob"),
        );
        assert_eq!(
            v.to_string()
                .contains("exceeds this proxy's limit of 1310 bytes"),
            reason == "INVALID_FIELD",
            "{len}-byte blob: {v}"
        );
    }

    // A body beyond the server's limit (256 KiB by default) is refused before it is parsed.
    // A fresh connection: the server may close one whose body it did not read.
    e.gcp.reconnect();
    let huge = vec![b'a'; 300 * 1024];
    // The proxy answers from the Content-Length alone and closes after reading at most 64 KiB
    // more (its lingering close); a client still writing the rest of 300 KiB may then see its
    // write fail before it reads the answer. Either way the body is refused unparsed, and the
    // proxy keeps serving (checked below).
    match e
        .gcp
        .try_send("POST", &key_url(KEY, "wrap"), Some(&auth), huge)
        .await
    {
        Ok(r) => {
            assert_rpc(
                &r,
                400,
                "INVALID_ARGUMENT",
                Some("REQUEST_TOO_LARGE"),
                "300 KiB body",
            );
        }
        Err(err) => assert!(
            format!("{err:?}").contains("BrokenPipe")
                || format!("{err:?}").contains("ConnectionReset"),
            "the oversize body: {err:?}"
        ),
    }
    e.gcp.reconnect();

    // Still serving.
    assert_eq!(
        e.gcp
            .unwrap_ok(KEY, &token, &unwrap_body(&blob, None, Some(customer())))
            .await,
        b"fine"
    );
    assert_eq!(e.proxy.admin_get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_and_operations_are_refused() {
    let mut e = env().await;
    let token = good_token();
    let auth = format!("Bearer {token}");
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        for op in ["wrap", "unwrap"] {
            let r = e
                .gcp
                .send(method, &key_url(KEY, op), Some(&auth), Bytes::new())
                .await;
            assert_rpc(
                &r,
                501,
                "UNIMPLEMENTED",
                Some("METHOD_NOT_ALLOWED"),
                &format!("{method} on :{op}"),
            );
        }
    }
    let body = serde_json::to_vec(&wrap_body(MARKER, None, Some(customer()))).unwrap();
    for (path, http, status, reason) in [
        (
            format!("{GCP_PREFIX}/{KEY}:encrypt"),
            501,
            "UNIMPLEMENTED",
            "UNSUPPORTED_METHOD",
        ),
        (
            format!("{GCP_PREFIX}/{KEY}:confidential-wrap"),
            501,
            "UNIMPLEMENTED",
            "UNSUPPORTED_METHOD",
        ),
        (
            format!("{GCP_PREFIX}/{KEY}"),
            404,
            "NOT_FOUND",
            "UNKNOWN_PATH",
        ),
        (
            format!("{GCP_PREFIX}/:wrap"),
            404,
            "NOT_FOUND",
            "UNKNOWN_PATH",
        ),
        (
            format!("{GCP_PREFIX}/../{KEY}:wrap"),
            404,
            "NOT_FOUND",
            "UNKNOWN_PATH",
        ),
        (
            format!("{GCP_PREFIX}/a//b:wrap"),
            404,
            "NOT_FOUND",
            "UNKNOWN_PATH",
        ),
    ] {
        let r = e.gcp.send("POST", &path, Some(&auth), body.clone()).await;
        assert_rpc(&r, http, status, Some(reason), &format!("POST {path}"));
    }
    // Outside the prefix: not the Cloud EKM front's at all.
    let r = e
        .gcp
        .send("POST", "/gcp/v1/keys/k1:wrap", Some(&auth), body)
        .await;
    assert_eq!(r.status, 404, "POST outside the prefix: {:?}", r.body);
    // Still serving.
    e.gcp
        .wrap_ok(KEY, &token, &wrap_body(b"ok", None, Some(customer())))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_has_its_own_request_id() {
    let mut e = env().await;
    let token = good_token();
    let body = wrap_body(b"ids", None, Some(customer()));
    let mut ids = std::collections::HashSet::new();
    for _ in 0..3 {
        let r = e.gcp.wrap(KEY, &token, &body).await;
        ids.insert(assert_request_id(&r, "ok"));
    }
    let r = e.gcp.send("POST", &key_url(KEY, "wrap"), None, "{}").await;
    ids.insert(assert_request_id(&r, "401"));
    let r = e.gcp.wrap("nope", &token, &body).await;
    ids.insert(assert_request_id(&r, "404"));
    assert_eq!(ids.len(), 5, "request ids are unique: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_requests_and_failures() {
    let mut e = env().await;
    let token = good_token();
    let m = |op: &'static str, outcome: &'static str| {
        [("front", "gcp"), ("op", op), ("outcome", outcome)]
    };
    let wrap_ok = m("wrap", "ok");
    let unwrap_ok = m("unwrap", "ok");
    let unwrap_bad = m("unwrap", "INVALID_ARGUMENT");
    let wrap_denied = m("wrap", "PERMISSION_DENIED");
    let expired = [("front", "gcp"), ("reason", "expired")];
    let name = "ekm_requests_total";
    let w0 = metric_sum(&e.proxy, name, &wrap_ok).await;
    let u0 = metric_sum(&e.proxy, name, &unwrap_ok).await;
    let b0 = metric_sum(&e.proxy, name, &unwrap_bad).await;
    let d0 = metric_sum(&e.proxy, name, &wrap_denied).await;
    let x0 = metric_sum(&e.proxy, "ekm_auth_failures_total", &expired).await;

    let blob = e
        .gcp
        .wrap_ok(KEY, &token, &wrap_body(b"m", None, Some(customer())))
        .await;
    e.gcp
        .wrap_ok(KEY, &token, &wrap_body(b"m", None, Some(customer())))
        .await;
    e.gcp
        .unwrap_ok(KEY, &token, &unwrap_body(&blob, None, Some(customer())))
        .await;
    let mut bad = blob.clone();
    *bad.last_mut().unwrap() ^= 1;
    e.gcp
        .unwrap(KEY, &token, &unwrap_body(&bad, None, Some(customer())))
        .await;
    e.gcp
        .wrap(
            KEY,
            &token,
            &wrap_body(MARKER, None, Some(reason_ctx("THIRD_PARTY_DATA_REQUEST"))),
        )
        .await;
    let now = now_secs();
    let old = signer1()
        .token()
        .claim("iat", now - 7200)
        .claim("exp", now - 3600)
        .sign();
    e.gcp
        .wrap(KEY, &old, &wrap_body(MARKER, None, Some(customer())))
        .await;

    await_metric(&e.proxy, name, &wrap_ok, w0 + 2.0).await;
    await_metric(&e.proxy, name, &unwrap_ok, u0 + 1.0).await;
    await_metric(&e.proxy, name, &unwrap_bad, b0 + 1.0).await;
    await_metric(&e.proxy, name, &wrap_denied, d0 + 1.0).await;
    await_metric(&e.proxy, "ekm_auth_failures_total", &expired, x0 + 1.0).await;
    // Exactly: nothing else was counted under these series.
    assert_eq!(metric_sum(&e.proxy, name, &wrap_ok).await, w0 + 2.0);
    assert_eq!(metric_sum(&e.proxy, name, &unwrap_bad).await, b0 + 1.0);
    // The XKS front is not credited with GCP traffic.
    assert_eq!(metric_sum(&e.proxy, name, &[("front", "xks")]).await, 0.0);
}
