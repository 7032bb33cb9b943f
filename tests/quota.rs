//! Per-caller request-rate quotas end to end, on each of the three fronts: the real server
//! in-process over real TLS against a SoftHSMv2 token, with a tiny quota (0.001 requests per
//! second, burst 2: no token comes back within any test's lifetime).
//!
//! For each front: unauthenticated requests first (they must not spend the caller's bucket), then
//! two key operations pass and the third answers the protocol's own throttling error with its
//! exact body; another key store / service account / certificate identity keeps its own bucket;
//! the metrics count admitted and throttled requests per quota (present at 0 before any
//! request); the throttled request is audited; a reload with the same settings keeps the bucket
//! empty, and a reload raising the quota lets requests through at once.
//!
//! No assertion depends on elapsed time: refill is unit-tested with an injected clock in
//! `src/core/quota.rs`. Log lines are polled for with a generous bound, as in `tests/gcp_audit.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use ekm_proxy::client::xks;
use ekm_proxy::client::{ClientTls, Response, XksClient, XksClientConfig};
use ekm_proxy::dev::certs::Validity;
use ekm_proxy::dev::profile::{AZURE_AES_KEY, azure_dev_key_specs};
use ekm_proxy::secret::SecretString;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::Full;
use serde_json::{Value, json};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

use common::jwks::{OTHER_SERVICE_ACCOUNT, SERVICE_ACCOUNT, attacker, jwks_of, signer1};
use common::proxy::{
    CLIENT_SUBJECT, GCP_PREFIX, GcpJwks, GcpSection, Pki, ProxyOptions, TestProxy, gcp_key,
};
use common::softhsm::TestToken;

/// The quota every test starts from: two requests, then (practically) never another.
const TINY: &str = "quota = { rate = 0.001, burst = 2 }";
/// The quota a reload raises it to.
const RAISED: &str = "quota = { rate = 1000, burst = 100 }";

// ---------------------------------------------------------------------------------------------
// Shared helpers: metrics and the audit capture
// ---------------------------------------------------------------------------------------------

/// `ekm_quota_<which>_total{front,quota}` as `/metrics` shows it; `None` when the series is
/// absent.
async fn quota_metric(p: &TestProxy, which: &str, front: &str, quota: &str) -> Option<f64> {
    let series = format!("ekm_quota_{which}_total{{front=\"{front}\",quota=\"{quota}\"}} ");
    let (status, text) = p.admin_get("/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().unwrap())
}

/// Admitted and throttled counts of one quota (both series must exist).
async fn counts(p: &TestProxy, front: &str, quota: &str) -> (f64, f64) {
    let get = |which| async move {
        quota_metric(p, which, front, quota)
            .await
            .unwrap_or_else(|| panic!("no ekm_quota_{which}_total for {front}/{quota}"))
    };
    (get("admitted").await, get("throttled").await)
}

/// Every line the subscriber wrote, shared by all tests of this binary.
#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Sink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Install the JSON subscriber for the audit target (first call in this process).
fn capture() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(|| {
        let sink = Sink(Arc::new(Mutex::new(Vec::new())));
        let filter = Targets::new()
            .with_default(LevelFilter::WARN)
            .with_target(ekm_proxy::audit::TARGET, LevelFilter::INFO);
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(sink.clone())
                    .with_filter(filter),
            )
            .try_init()
            .expect("this test binary owns the global subscriber");
        sink
    })
}

/// The audit line of a throttled request of `front` to `tenant`, waiting for it to be written.
async fn throttled_audit_line(front: &str, tenant: &str, outcome: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&capture().0.lock().unwrap()).into_owned();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| {
                l["target"] == ekm_proxy::audit::TARGET
                    && l["fields"]["front"] == front
                    && l["fields"]["tenant"] == tenant
                    && l["fields"]["outcome"] == outcome
            });
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no audit line for a throttled {front} request to {tenant}; captured:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// AWS XKS: one bucket per key store
// ---------------------------------------------------------------------------------------------

/// The default key store `dev` (prefix `/dev-keystore`) and a key store `other` (prefix
/// `/other`), each with `quota`.
fn xks_options(quota: &str) -> ProxyOptions {
    ProxyOptions {
        key_store_keys: quota.to_owned(),
        tables: format!(
            r#"
[[xks.key_store]]
name = "other"
path_prefix = "/other"
regions = ["us-east-1"]
keys = ["dev-aes-1"]
{quota}
[[xks.key_store.credential]]
access_key_id = "{id}"
secret = "{secret}"
"#,
            id = common::proxy::ACCESS_KEY_ID,
            secret = common::proxy::SECRET,
        ),
        ..ProxyOptions::default()
    }
}

async fn xks_encrypt(c: &mut XksClient) -> Response {
    c.post(
        "keys/dev-aes-1/encrypt",
        xks::encrypt_body(xks::KMS_KEY_ARN, b"quota test", None, false),
    )
    .await
    .expect("encrypt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_key_store_quota_throttles_with_throttling_exception() {
    capture();
    let mut p = TestProxy::start_with(xks_options(TINY)).await;
    // Declared before any request, at 0.
    assert_eq!(counts(&p, "xks", "dev").await, (0.0, 0.0));
    assert_eq!(counts(&p, "xks", "other").await, (0.0, 0.0));

    // A forged flood is refused by SigV4 and spends nothing.
    let mut forged_cfg = p.client_config("tls");
    forged_cfg.secret = SecretString::from("wrongSecretForTheQuotaTest0123456789abcdefghij");
    let mut forged = XksClient::connect(Arc::new(forged_cfg)).await.unwrap();
    for _ in 0..5 {
        let r = xks_encrypt(&mut forged).await;
        assert_eq!(r.status, 401, "{:?}", r.body);
    }

    let mut dev = p.tls_client().await;
    for i in 0..2 {
        let r = xks_encrypt(&mut dev).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
    }
    let r = xks_encrypt(&mut dev).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers[CONTENT_TYPE], "application/json");
    assert_eq!(
        &r.body[..],
        br#"{"errorName":"ThrottlingException","errorMessage":"request rate quota of key store 'dev' exceeded; retry with backoff"}"#
    );
    // The health check is a request of the key store too.
    let r = dev.post("health", xks::health_body()).await.unwrap();
    assert_eq!(r.error_name().as_deref(), Some("ThrottlingException"));

    // Another key store has its own bucket.
    let mut other_cfg = p.client_config("tls");
    other_cfg.prefix = "/other".into();
    let mut other = XksClient::connect(Arc::new(other_cfg)).await.unwrap();
    let r = xks_encrypt(&mut other).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    assert_eq!(counts(&p, "xks", "dev").await, (2.0, 2.0));
    assert_eq!(counts(&p, "xks", "other").await, (1.0, 0.0));
    assert_eq!(
        p.metric(
            "ekm_requests_total{front=\"xks\",op=\"encrypt\",outcome=\"ThrottlingException\"}"
        )
        .await,
        1.0
    );
    let audit = throttled_audit_line("xks", "dev", "ThrottlingException").await;
    assert_eq!(audit["fields"]["op"], "encrypt");
    assert_eq!(audit["fields"]["key"], "dev-aes-1");
    assert_eq!(audit["fields"]["decision"], "error");
    assert_eq!(audit["fields"]["principal"], common::proxy::ACCESS_KEY_ID);

    // A reload that leaves the quota as it was keeps the bucket empty...
    p.reload_with(xks_options(TINY));
    assert_eq!(xks_encrypt(&mut dev).await.status, 429);
    // ...and one raising it lets requests through at once.
    p.reload_with(xks_options(RAISED));
    for i in 0..3 {
        let r = xks_encrypt(&mut dev).await;
        assert_eq!(r.status, 200, "after the raise, request {i}: {:?}", r.body);
    }
    // Removing the quota makes the store unlimited again; its series stay.
    p.reload_with(xks_options(""));
    for _ in 0..3 {
        assert_eq!(xks_encrypt(&mut dev).await.status, 200);
    }
    assert_eq!(counts(&p, "xks", "dev").await, (5.0, 3.0));
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Google Cloud EKM: one bucket per service account
// ---------------------------------------------------------------------------------------------

/// Key `k1` for our service account and `theirs` for the other one; the default quota `default`
/// (a `quota = …` line or nothing) and an override of burst 3 for the other service account.
fn gcp_section(jwks: &std::path::Path, default: &str) -> GcpSection {
    let mut section = GcpSection::new(GcpJwks::File(jwks.to_owned()));
    section.section_keys = default.to_owned();
    section.keys = [
        gcp_key("k1", "dev-aes-1", "", &[SERVICE_ACCOUNT]),
        gcp_key("theirs", "dev-aes-1", "", &[OTHER_SERVICE_ACCOUNT]),
        format!(
            r#"
[[gcp.quota_override]]
service_account = "{OTHER_SERVICE_ACCOUNT}"
rate = 0.001
burst = 3
"#
        ),
    ]
    .concat();
    section
}

/// `POST <prefix>/<key>:wrap` with `authorization`.
async fn gcp_wrap(c: &mut XksClient, key: &str, authorization: &str) -> Response {
    let body = json!({
        "plaintext": B64.encode(b"quota test"),
        "additionalContext": {
            "relativeResourceName": "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
            "accessReasonContext": { "reason": "CUSTOMER_INITIATED_ACCESS" },
        },
    });
    let req = http::Request::post(format!("{GCP_PREFIX}/{key}:wrap"))
        .header(HOST, "localhost")
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, authorization)
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap();
    c.send_raw(req).await.expect("wrap")
}

/// The exact RESOURCE_EXHAUSTED body for quota `label`, with the request id the answer carries.
fn resource_exhausted(r: &Response, label: &str, account: &str) {
    assert_eq!(r.status, 429, "{:?}", r.body);
    let id = r.headers["x-request-id"].to_str().unwrap();
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        body,
        json!({
            "code": 8,
            "message": format!("request rate quota '{label}' exceeded for service account {account}; retry with backoff"),
            "status": "RESOURCE_EXHAUSTED",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "QUOTA_EXCEEDED",
                "domain": "ekm-proxy",
                "metadata": { "quota": label, "requestId": id },
            }],
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_service_account_quota_throttles_with_resource_exhausted() {
    capture();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::to_vec(&jwks_of(&[signer1()])).unwrap()).unwrap();
    let mut p = TestProxy::start_with(gcp_section(&jwks, TINY).options()).await;
    assert_eq!(counts(&p, "gcp", "default").await, (0.0, 0.0));
    assert_eq!(counts(&p, "gcp", OTHER_SERVICE_ACCOUNT).await, (0.0, 0.0));
    let mut c = XksClient::connect(Arc::new(common::cloud_ekm::bearer_client_config(&p)))
        .await
        .unwrap();
    let ours = format!("Bearer {}", signer1().token().sign());
    let theirs = format!(
        "Bearer {}",
        signer1().token().email(OTHER_SERVICE_ACCOUNT).sign()
    );

    // Forged tokens naming our service account are refused and spend nothing.
    let forged = format!("Bearer {}", attacker().token().sign());
    for _ in 0..5 {
        assert_eq!(gcp_wrap(&mut c, "k1", &forged).await.status, 401);
    }
    for i in 0..2 {
        let r = gcp_wrap(&mut c, "k1", &ours).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
    }
    let throttled = gcp_wrap(&mut c, "k1", &ours).await;
    resource_exhausted(&throttled, "default", SERVICE_ACCOUNT);

    // The other service account has its own bucket, sized by its override.
    for i in 0..3 {
        let r = gcp_wrap(&mut c, "theirs", &theirs).await;
        assert_eq!(r.status, 200, "theirs, request {i}: {:?}", r.body);
    }
    resource_exhausted(
        &gcp_wrap(&mut c, "theirs", &theirs).await,
        OTHER_SERVICE_ACCOUNT,
        OTHER_SERVICE_ACCOUNT,
    );

    assert_eq!(counts(&p, "gcp", "default").await, (2.0, 1.0));
    assert_eq!(counts(&p, "gcp", OTHER_SERVICE_ACCOUNT).await, (3.0, 1.0));
    assert_eq!(
        p.metric("ekm_requests_total{front=\"gcp\",op=\"wrap\",outcome=\"RESOURCE_EXHAUSTED\"}")
            .await,
        2.0
    );
    let id = throttled.headers["x-request-id"].to_str().unwrap();
    let audit = throttled_audit_line("gcp", "test", "QUOTA_EXCEEDED").await;
    assert_eq!(audit["fields"]["principal"], SERVICE_ACCOUNT);
    assert_eq!(audit["fields"]["key"], "k1");
    assert_eq!(audit["fields"]["request_id"], id);

    // Same settings: still empty. Raised default: our account passes at once; the other
    // account's override did not change, so its bucket stays empty.
    p.reload_with(gcp_section(&jwks, TINY).options());
    assert_eq!(gcp_wrap(&mut c, "k1", &ours).await.status, 429);
    p.reload_with(gcp_section(&jwks, RAISED).options());
    for i in 0..3 {
        let r = gcp_wrap(&mut c, "k1", &ours).await;
        assert_eq!(r.status, 200, "after the raise, request {i}: {:?}", r.body);
    }
    assert_eq!(gcp_wrap(&mut c, "theirs", &theirs).await.status, 429);
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Azure Managed HSM: one bucket per client certificate subject under a prefix
// ---------------------------------------------------------------------------------------------

/// The prefix `quota-pool` at `/azure` accepting the test client and `mhsm-b.example`, with
/// `quota`; and a listener `mtls-any` whose handshake accepts any certificate of the test CA (the
/// standard `mtls` listener only lets the test client's subject in).
fn azure_options(pki: &Pki, quota: &str) -> ProxyOptions {
    ProxyOptions {
        tables: format!(
            r#"
[[listener]]
name = "mtls-any"
address = "127.0.0.1:0"
[listener.tls]
certificate = "{cert}"
private_key = "{key}"
[listener.tls.client_auth]
ca_bundle = "{ca}"

[azure]
[[azure.prefix]]
name = "quota-pool"
path_prefix = "/azure"
allowed_subjects = ["{CLIENT_SUBJECT}", "mhsm-b.example"]
keys = ["*"]
{quota}
"#,
            cert = pki.server_pem.display(),
            key = pki.server_key.display(),
            ca = pki.ca_pem.display(),
        ),
        ..ProxyOptions::default()
    }
}

async fn azure_wrap(c: &mut XksClient) -> (u16, Value) {
    let body = json!({
        "request_context": {"request_id": "req-q", "correlation_id": "corr-q", "pool_name": "pool-a"},
        "alg": "A256KW",
        "value": B64URL.encode([7u8; 32]),
    });
    let req = http::Request::post(format!(
        "/azure/{AZURE_AES_KEY}/wrapkey?api-version=0.1-preview"
    ))
    .header(HOST, "localhost")
    .header(CONTENT_TYPE, "application/json")
    .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
    .unwrap();
    let r = c.send_raw(req).await.expect("wrapkey");
    let v = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&r.body)}));
    (r.status, v)
}

/// A client on the listener `mtls-any` presenting a certificate for `subject` (none: `None`).
async fn azure_client(p: &TestProxy, subject: Option<&str>) -> XksClient {
    let cert = subject.map(|s| p.pki.ca.issue_client(s, Validity::Current).unwrap());
    let addr = p.addr("mtls-any");
    let cfg = XksClientConfig {
        tls: Some(ClientTls {
            ca_pem: p.pki.ca.cert_pem().into_bytes(),
            client_cert_pem: cert.as_ref().map(|c| c.cert_pem.clone().into_bytes()),
            client_key_pem: cert.as_ref().map(|c| c.key_pem.as_bytes().to_vec()),
            server_name: "localhost".into(),
        }),
        addr,
        host: format!("localhost:{}", addr.port()),
        ..p.client_config("tls")
    };
    XksClient::connect(Arc::new(cfg)).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_identity_quota_throttles_with_too_many_requests() {
    capture();
    let token = TestToken::new();
    for spec in azure_dev_key_specs() {
        token.add_key(&spec);
    }
    let pki = Pki::new();
    let options = azure_options(&pki, TINY);
    let mut p = TestProxy::start_on_pki(token, pki, options).await;
    assert_eq!(counts(&p, "azure", "quota-pool").await, (0.0, 0.0));

    // A certificate of the CA whose subject the prefix does not accept: refused, spends nothing.
    let mut stranger = azure_client(&p, Some("someone-else.example")).await;
    for _ in 0..5 {
        assert_eq!(azure_wrap(&mut stranger).await.0, 401);
    }
    let mut a = azure_client(&p, Some(CLIENT_SUBJECT)).await;
    for i in 0..2 {
        let (status, v) = azure_wrap(&mut a).await;
        assert_eq!(status, 200, "request {i}: {v}");
    }
    let (status, v) = azure_wrap(&mut a).await;
    assert_eq!(status, 429);
    assert_eq!(
        v,
        json!({
            "code": "TooManyRequests",
            "message": "request rate quota of prefix 'quota-pool' exceeded for this client certificate; retry with backoff",
        })
    );
    // `/info` is a request of the same caller.
    let req = http::Request::post("/azure/info?api-version=0.1-preview")
        .header(HOST, "localhost")
        .body(Full::new(Bytes::from(
            json!({"request_context": {"correlation_id": "c", "pool_name": "pool-a"}}).to_string(),
        )))
        .unwrap();
    assert_eq!(a.send_raw(req).await.unwrap().status, 429);

    // Another identity under the same prefix has its own bucket.
    let mut b = azure_client(&p, Some("mhsm-b.example")).await;
    let (status, v) = azure_wrap(&mut b).await;
    assert_eq!(status, 200, "{v}");

    // One series per prefix, whatever the subjects.
    assert_eq!(counts(&p, "azure", "quota-pool").await, (3.0, 2.0));
    assert_eq!(
        p.metric("ekm_requests_total{front=\"azure\",op=\"wrapkey\",outcome=\"TooManyRequests\"}")
            .await,
        1.0
    );
    let audit = throttled_audit_line("azure", "quota-pool", "TooManyRequests").await;
    assert_eq!(audit["fields"]["principal"], CLIENT_SUBJECT);
    assert_eq!(audit["fields"]["key"], AZURE_AES_KEY);
    assert_eq!(audit["fields"]["op"], "wrapkey");

    let (same, raised) = (azure_options(&p.pki, TINY), azure_options(&p.pki, RAISED));
    p.reload_with(same);
    assert_eq!(azure_wrap(&mut a).await.0, 429);
    p.reload_with(raised);
    for i in 0..3 {
        let (status, v) = azure_wrap(&mut a).await;
        assert_eq!(status, 200, "after the raise, request {i}: {v}");
    }
    p.stop().await;
}
