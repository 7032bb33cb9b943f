#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The Cloud EKM audit trail and the no-secrets rule, observed where operators see them: in the
//! log output. This binary installs its own global tracing subscriber (JSON lines into a shared
//! buffer, DEBUG for the proxy's own targets including `ekm_audit`, INFO for everything else), so
//! nothing here touches the subscriber of any other test binary.
//!
//! Covers: one audit line per key decision with who (principal), what (op, key), why (grant,
//! justification, rule), on what (resource) and the request id the caller got in `x-request-id`;
//! refused tokens audited as `authentication` denials with the ErrorInfo reason (plus the warn
//! line naming the refusal reason); a Key Access Justifications denial; a tampered blob audited
//! as an error; and that no captured line — audit or operational, any level — contains a bearer
//! token (whole or its signature or payload), a plaintext (as text or base64), an unwrapped
//! plaintext, or an HSM PIN.
//!
//! Tests run in parallel and share the buffer: lines are matched by request id (or, for the
//! token-refusal warn line, which carries no request id, by a key path only that test uses).
//! Nothing asserts on elapsed time; lines are polled for up to a generous bound.

mod common;

use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use ekm_proxy::client::{Response, XksClient, XksClientConfig};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::Full;
use serde_json::{Value, json};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

use common::jwks::{SERVICE_ACCOUNT, jwks_of, now_secs, signer1};
use common::proxy::{GCP_PREFIX, GcpJwks, GcpSection, TestProxy};
use common::softhsm::{SO_PIN, USER_PIN};

// ---------------------------------------------------------------------------------------------
// Log capture
// ---------------------------------------------------------------------------------------------

/// Every line the subscriber wrote, shared by all tests of this binary.
#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The fmt layer formats a whole event first and writes it at once: one lock per line,
        // so lines from parallel requests never interleave.
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

/// Install the subscriber (first call in this process) and return the buffer.
fn capture() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(|| {
        let sink = Sink(Arc::new(Mutex::new(Vec::new())));
        // DEBUG for the proxy (debug lines must not leak either) and the audit target; INFO for
        // dependencies, so their chatter does not drown the buffer.
        let filter = Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("ekm_proxy", LevelFilter::DEBUG)
            .with_target(ekm_proxy::audit::TARGET, LevelFilter::DEBUG);
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

/// Everything captured so far.
fn captured_text() -> String {
    String::from_utf8_lossy(&capture().0.lock().unwrap()).into_owned()
}

/// The complete lines captured so far, parsed. Every line must be JSON (the layer is `.json()`).
fn captured_lines() -> Vec<Value> {
    let text = captured_text();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            serde_json::from_str(l.trim_end())
                .unwrap_or_else(|e| panic!("captured line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Upper bound for waiting on a line (logging may be asynchronous).
const POLL_LIMIT: Duration = Duration::from_secs(20);

/// The captured lines matching `pred`, waiting until there is at least one. On timeout, fails
/// with the whole capture.
async fn await_lines(what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let found: Vec<Value> = captured_lines().into_iter().filter(|l| pred(l)).collect();
        if !found.is_empty() {
            return found;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: no such log line within {POLL_LIMIT:?}; captured:\n{}",
                captured_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A string field of an event (`fields.<name>`).
fn field<'v>(line: &'v Value, name: &str) -> Option<&'v str> {
    line["fields"][name].as_str()
}

/// Whether an event's `request_id` field names `id`.
///
/// The id must appear exactly as the `x-request-id` header carries it, so an operator can grep
/// for it across the audit trail and the operational log.
fn names_request(line: &Value, id: &str) -> bool {
    field(line, "request_id").is_some_and(|v| v == id)
}

/// The single audit line of request `id` (the design: one audit line per request).
async fn audit_line(id: &str) -> Value {
    let pred =
        |l: &Value| l["target"].as_str() == Some(ekm_proxy::audit::TARGET) && names_request(l, id);
    let lines = await_lines(&format!("audit line of request {id}"), pred).await;
    assert_eq!(
        lines.len(),
        1,
        "request {id}: exactly one audit line expected, got {lines:#?}"
    );
    let line = lines.into_iter().next().unwrap();
    assert_eq!(line["level"].as_str(), Some("INFO"), "audit level: {line}");
    assert_eq!(
        field(&line, "message"),
        Some("audit"),
        "audit message: {line}"
    );
    assert_eq!(field(&line, "front"), Some("gcp"), "front: {line}");
    assert!(
        line["fields"]["latency_us"].is_u64(),
        "latency_us is a number: {line}"
    );
    line
}

/// Expected values of an audit line; `None` = the field is absent or empty.
struct Expect<'a> {
    op: &'a str,
    key: &'a str,
    principal: Option<&'a str>,
    decision: &'a str,
    outcome: &'a str,
    rule: Option<&'a str>,
    grant: Option<&'a str>,
    justification: Option<&'a str>,
    resource: Option<&'a str>,
}

#[track_caller]
fn assert_audit(line: &Value, e: &Expect<'_>) {
    let exact = |name: &str, want: &str| {
        assert_eq!(field(line, name), Some(want), "audit field {name}: {line}");
    };
    // Absent and "" both mean "none" (`rule` is recorded as "" when there is none).
    let optional = |name: &str, want: Option<&str>| {
        let got = field(line, name).filter(|v| !v.is_empty());
        assert_eq!(got, want, "audit field {name}: {line}");
    };
    exact("op", e.op);
    exact("key", e.key);
    optional("principal", e.principal);
    exact("decision", e.decision);
    exact("outcome", e.outcome);
    optional("rule", e.rule);
    optional("grant", e.grant);
    optional("justification", e.justification);
    optional("resource", e.resource);
}

/// Secrets no captured line may contain, with a name for the failure message.
#[derive(Default)]
struct Secrets(Vec<(String, String)>);

impl Secrets {
    fn add(&mut self, what: impl Into<String>, value: impl Into<String>) {
        let value = value.into();
        // Short values would match by accident (e.g. inside a latency); every secret used here
        // is long and distinctive.
        assert!(
            value.len() >= 12,
            "secret {value:?} too short to search for"
        );
        self.0.push((what.into(), value));
    }

    /// A bearer token: whole, and its payload and signature parts.
    fn token(&mut self, what: &str, jwt: &str) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{what}: not a JWS compact token");
        self.add(format!("{what} (whole token)"), jwt);
        self.add(format!("{what} (payload)"), parts[1]);
        self.add(format!("{what} (signature)"), parts[2]);
    }

    /// A plaintext: as text and as standard base64.
    fn plaintext(&mut self, what: &str, bytes: &[u8]) {
        self.add(
            format!("{what} (text)"),
            String::from_utf8(bytes.to_vec()).expect("test plaintexts are text"),
        );
        self.add(format!("{what} (base64)"), B64.encode(bytes));
    }

    fn pins(&mut self) {
        self.add("HSM user PIN", USER_PIN);
        self.add("HSM SO PIN", SO_PIN);
    }

    /// Which secrets occur in `text`.
    fn found_in(&self, text: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, v)| text.contains(v.as_str()))
            .map(|(what, _)| what.as_str())
            .collect()
    }

    /// Fails, naming the secrets and the offending lines, if any captured line contains one.
    fn assert_not_logged(&self) {
        let text = captured_text();
        assert!(
            !text.is_empty(),
            "nothing captured: the leak check would be vacuous"
        );
        let leaks = self.found_in(&text);
        if !leaks.is_empty() {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !self.found_in(l).is_empty())
                .collect();
            panic!(
                "secrets in the log: {leaks:?}; lines:\n{}",
                lines.join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy and client
// ---------------------------------------------------------------------------------------------

/// Key path whose grant is named [`GRANT`].
const KEY: &str = "audit-k";
/// The grant on [`KEY`] (a distinctive name, so the audit line can only have it from there).
const GRANT: &str = "cloud-kms-audit-grant";
/// `relativeResourceName` of the Cloud KMS key version in the requests.
const RESOURCE: &str = "projects/audit-project/locations/us-east1/keyRings/ring-a/cryptoKeys/key-a/cryptoKeyVersions/3";
/// Issuer config name (the audit `tenant`).
const ISSUER_NAME: &str = "test";

/// A plaintext unique to one test (so a leak names the test that made it).
fn plaintext(test: &str) -> Vec<u8> {
    format!("AUDIT-PLAINTEXT-{test}-{}-do-not-log", std::process::id()).into_bytes()
}

struct Env {
    proxy: TestProxy,
    client: Option<XksClient>,
    cfg: Arc<XksClientConfig>,
    _jwks_dir: tempfile::TempDir,
}

impl Env {
    /// A proxy whose issuer reads signer 1's JWKS from a file, with [`KEY`] (grant [`GRANT`]
    /// for [`SERVICE_ACCOUNT`]) and `extra_keys` (paths on the same HSM key, same grant), under
    /// the default KAJ policy.
    async fn start(extra_keys: &[&str]) -> Self {
        capture();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, serde_json::to_vec(&jwks_of(&[signer1()])).unwrap()).unwrap();
        let mut section = GcpSection::new(GcpJwks::File(file));
        section.keys = std::iter::once(KEY)
            .chain(extra_keys.iter().copied())
            .map(|path| {
                format!(
                    r#"
[[gcp.key]]
path = "{path}"
hsm_key = "dev-aes-1"
[[gcp.key.grant]]
name = "{GRANT}"
service_accounts = ["{SERVICE_ACCOUNT}"]
operations = ["wrap", "unwrap"]
"#
                )
            })
            .collect();
        let proxy = TestProxy::start_with(section.options()).await;
        let cfg = Arc::new(common::cloud_ekm::bearer_client_config(&proxy));
        Self {
            proxy,
            client: None,
            cfg,
            _jwks_dir: dir,
        }
    }

    /// `POST <prefix>/<key>:<op>` with `Authorization: Bearer <token>`.
    async fn post(&mut self, key: &str, op: &str, token: &str, body: &Value) -> Response {
        if self.client.as_ref().is_none_or(XksClient::is_closed) {
            self.client = Some(XksClient::connect(self.cfg.clone()).await.expect("connect"));
        }
        let req = http::Request::post(format!("{GCP_PREFIX}/{key}:{op}"))
            .header(HOST, &self.cfg.host)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
            .unwrap();
        let result = self.client.as_mut().unwrap().send_raw(req).await;
        if result.is_err() {
            self.client = None;
        }
        result.unwrap_or_else(|e| panic!("POST {key}:{op}: {e}"))
    }
}

/// The response's `x-request-id`.
#[track_caller]
fn request_id(r: &Response) -> String {
    let id = r
        .headers
        .get("x-request-id")
        .expect("x-request-id header")
        .to_str()
        .expect("x-request-id is ASCII")
        .to_owned();
    assert!(!id.is_empty(), "empty x-request-id");
    id
}

/// Status, and the ErrorInfo reason of an error body.
#[track_caller]
fn assert_error(r: &Response, status: u16, reason: &str) {
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, status, "body {text}");
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {text}"));
    let got = v["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
        .and_then(|d| d["reason"].as_str());
    assert_eq!(got, Some(reason), "ErrorInfo reason: {text}");
}

/// `additionalContext` of a Cloud KMS request with a KAJ reason.
fn context(reason: &str) -> Value {
    json!({
        "fullResourceName": format!("//cloudkms.googleapis.com/{RESOURCE}"),
        "relativeResourceName": RESOURCE,
        "accessReasonContext": { "reason": reason },
    })
}

fn wrap_body(plaintext: &[u8], reason: &str) -> Value {
    json!({ "plaintext": B64.encode(plaintext), "additionalContext": context(reason) })
}

fn unwrap_body(blob: &[u8], reason: &str) -> Value {
    json!({ "wrappedBlob": B64.encode(blob), "additionalContext": context(reason) })
}

/// Wrap that must succeed: (blob, request id).
async fn wrap_ok(env: &mut Env, token: &str, plaintext: &[u8]) -> (Vec<u8>, String) {
    let r = env
        .post(
            KEY,
            "wrap",
            token,
            &wrap_body(plaintext, "CUSTOMER_INITIATED_ACCESS"),
        )
        .await;
    assert_eq!(r.status, 200, "wrap: {}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let blob = B64
        .decode(v["wrappedBlob"].as_str().expect("wrappedBlob"))
        .unwrap();
    (blob, request_id(&r))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The leak check itself: a secret written through the same subscriber is found and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_check_finds_a_secret_written_to_the_log() {
    capture();
    let planted = format!("PLANTED-CANARY-{}-not-a-real-secret", std::process::id());
    let mut secrets = Secrets::default();
    secrets.add("canary", planted.clone());
    assert!(secrets.found_in(&captured_text()).is_empty());
    tracing::debug!(target: "ekm_proxy::canary", value = %planted, "canary");
    await_lines("canary line", |l| {
        field(l, "value") == Some(planted.as_str())
    })
    .await;
    let caught = std::panic::catch_unwind(|| secrets.assert_not_logged());
    assert!(caught.is_err(), "the leak check missed a logged secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_wrap_and_unwrap_are_audited_with_who_what_why() {
    let mut env = Env::start(&[]).await;
    let mut secrets = Secrets::default();
    secrets.pins();
    let pt = plaintext("allowed");
    secrets.plaintext("plaintext", &pt);

    let wrap_token = signer1().token().sign();
    secrets.token("wrap token", &wrap_token);
    let (blob, wrap_id) = wrap_ok(&mut env, &wrap_token, &pt).await;

    let unwrap_token = signer1().token().sign();
    secrets.token("unwrap token", &unwrap_token);
    let r = env
        .post(
            KEY,
            "unwrap",
            &unwrap_token,
            &unwrap_body(&blob, "GOOGLE_INITIATED_SYSTEM_OPERATION"),
        )
        .await;
    assert_eq!(
        r.status,
        200,
        "unwrap: {}",
        String::from_utf8_lossy(&r.body)
    );
    let unwrap_id = request_id(&r);
    assert_ne!(wrap_id, unwrap_id, "each request has its own id");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let returned_b64 = v["plaintext"].as_str().expect("plaintext").to_owned();
    let returned = B64.decode(&returned_b64).unwrap();
    assert_eq!(returned, pt, "round trip");
    secrets.add("unwrapped plaintext (response base64)", returned_b64);
    secrets.add(
        "unwrapped plaintext (text)",
        String::from_utf8(returned).unwrap(),
    );

    let wrap = audit_line(&wrap_id).await;
    assert_audit(
        &wrap,
        &Expect {
            op: "wrap",
            key: KEY,
            principal: Some(SERVICE_ACCOUNT),
            decision: "allow",
            outcome: "ok",
            rule: None,
            grant: Some(GRANT),
            justification: Some("CUSTOMER_INITIATED_ACCESS"),
            resource: Some(RESOURCE),
        },
    );
    assert_eq!(field(&wrap, "tenant"), Some(ISSUER_NAME), "tenant: {wrap}");

    let unwrap = audit_line(&unwrap_id).await;
    assert_audit(
        &unwrap,
        &Expect {
            op: "unwrap",
            key: KEY,
            principal: Some(SERVICE_ACCOUNT),
            decision: "allow",
            outcome: "ok",
            rule: None,
            grant: Some(GRANT),
            justification: Some("GOOGLE_INITIATED_SYSTEM_OPERATION"),
            resource: Some(RESOURCE),
        },
    );

    secrets.assert_not_logged();
    env.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_are_audited_as_authentication_denials() {
    // Key paths only this test uses: the warn line of a refused token names the key path but
    // not the request id, so the path is what ties it to this test.
    const EXPIRED_KEY: &str = "audit-expired-probe";
    const AUDIENCE_KEY: &str = "audit-audience-probe";
    let mut env = Env::start(&[EXPIRED_KEY, AUDIENCE_KEY]).await;
    let mut secrets = Secrets::default();
    secrets.pins();
    let pt = plaintext("refused");
    secrets.plaintext("plaintext", &pt);
    let body = wrap_body(&pt, "CUSTOMER_INITIATED_ACCESS");
    let now = now_secs();

    let cases = [
        (
            "expired token",
            EXPIRED_KEY,
            signer1()
                .token()
                .claim("iat", now - 7200)
                .claim("exp", now - 3600)
                .sign(),
            "EXPIRED",
            "expired",
        ),
        (
            "wrong audience",
            AUDIENCE_KEY,
            signer1()
                .token()
                .claim("aud", "https://other.example")
                .sign(),
            "WRONG_AUDIENCE",
            "wrong_audience",
        ),
    ];
    for (what, key, token, outcome, reason) in &cases {
        secrets.token(what, token);
        let r = env.post(key, "wrap", token, &body).await;
        assert_error(&r, 401, outcome);
        let id = request_id(&r);

        let line = audit_line(&id).await;
        assert_audit(
            &line,
            &Expect {
                op: "wrap",
                key,
                // Nobody was authenticated: the claims of a refused token name no one.
                principal: None,
                decision: "deny",
                outcome,
                rule: Some("authentication"),
                grant: None,
                justification: None,
                resource: None,
            },
        );

        let warn = await_lines(&format!("{what}: 'token refused' line"), |l| {
            field(l, "message") == Some("token refused") && field(l, "key") == Some(*key)
        })
        .await;
        assert_eq!(warn.len(), 1, "{what}: one refusal line: {warn:#?}");
        assert_eq!(
            warn[0]["level"].as_str(),
            Some("WARN"),
            "{what}: {}",
            warn[0]
        );
        assert_eq!(
            field(&warn[0], "reason"),
            Some(*reason),
            "{what}: the log names the reason: {}",
            warn[0]
        );
    }

    secrets.assert_not_logged();
    env.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kaj_denials_are_audited_with_rule_and_justification() {
    let mut env = Env::start(&[]).await;
    let mut secrets = Secrets::default();
    secrets.pins();
    let pt = plaintext("kaj");
    secrets.plaintext("plaintext", &pt);

    let token = signer1().token().sign();
    secrets.token("token", &token);
    let (blob, _) = wrap_ok(&mut env, &token, &pt).await;

    for (op, body) in [
        ("wrap", wrap_body(&pt, "THIRD_PARTY_DATA_REQUEST")),
        ("unwrap", unwrap_body(&blob, "THIRD_PARTY_DATA_REQUEST")),
    ] {
        let r = env.post(KEY, op, &token, &body).await;
        assert_error(&r, 403, "ACCESS_DENIED");
        let line = audit_line(&request_id(&r)).await;
        assert_audit(
            &line,
            &Expect {
                op,
                key: KEY,
                principal: Some(SERVICE_ACCOUNT),
                decision: "deny",
                outcome: "ACCESS_DENIED",
                rule: Some("access_reasons"),
                grant: None,
                justification: Some("THIRD_PARTY_DATA_REQUEST"),
                resource: Some(RESOURCE),
            },
        );
    }

    secrets.assert_not_logged();
    env.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_blob_is_audited_as_an_error() {
    let mut env = Env::start(&[]).await;
    let mut secrets = Secrets::default();
    secrets.pins();
    let pt = plaintext("tampered");
    secrets.plaintext("plaintext", &pt);

    let token = signer1().token().sign();
    secrets.token("token", &token);
    let (mut blob, _) = wrap_ok(&mut env, &token, &pt).await;
    // First ciphertext byte: after format, flags, id length, id and the 12-byte IV.
    let at = 3 + usize::from(blob[2]) + 12;
    assert!(at < blob.len() - 16, "blob has ciphertext: {blob:?}");
    blob[at] ^= 0x01;

    let r = env
        .post(
            KEY,
            "unwrap",
            &token,
            &unwrap_body(&blob, "CUSTOMER_INITIATED_ACCESS"),
        )
        .await;
    assert_error(&r, 400, "UNWRAP_FAILED");
    let id = request_id(&r);
    let line = audit_line(&id).await;
    assert_audit(
        &line,
        &Expect {
            op: "unwrap",
            key: KEY,
            principal: Some(SERVICE_ACCOUNT),
            decision: "error",
            outcome: "UNWRAP_FAILED",
            rule: None,
            // Authorization passed (the HSM refused): the line says which grant let it through.
            grant: Some(GRANT),
            justification: Some("CUSTOMER_INITIATED_ACCESS"),
            resource: Some(RESOURCE),
        },
    );
    // The operational line of a refused request carries the same id, so the two can be joined.
    let refused = await_lines(&format!("'request refused' line of {id}"), |l| {
        field(l, "message") == Some("request refused") && field(l, "request_id") == Some(&id)
    })
    .await;
    assert_eq!(refused.len(), 1, "one 'request refused' line: {refused:#?}");

    secrets.assert_not_logged();
    env.proxy.stop().await;
}

/// Caller strings are bounded in every log line: an XKS `kmsRequestId` of a few KB is logged cut
/// to [`ekm_proxy::audit::MAX_LOGGED_BYTES`] with the truncation marker (not a multi-KB line), and
/// an absurd one (200 KB) is refused as a ValidationException and never written at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_caller_strings_are_cut_in_logs_and_absurd_ones_refused() {
    let env = Env::start(&[]).await;
    let mut xks = env.proxy.tls_client().await;
    let encrypt = |id: &str| {
        json!({
            "requestMetadata": {
                "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
                "kmsKeyArn": ekm_proxy::client::xks::KMS_KEY_ARN,
                "kmsOperation": "Encrypt",
                "kmsRequestId": id,
            },
            "plaintext": "AAECAw==",
            "encryptionAlgorithm": "AES_GCM",
        })
        .to_string()
    };
    // Long but within the protocol bound: served, logged cut on a char boundary and marked.
    let unique = format!("long-id-{}-", std::process::id());
    let long_id = format!("{unique}{}", "é".repeat(1000));
    let r = xks
        .post("keys/dev-aes-1/encrypt", encrypt(&long_id))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let lines = await_lines("audit line of the long request id", |l| {
        l["target"].as_str() == Some(ekm_proxy::audit::TARGET)
            && field(l, "request_id").is_some_and(|v| v.contains(&unique))
    })
    .await;
    for line in &lines {
        let text = line.to_string();
        assert!(text.len() < 2048, "a {}-byte audit line", text.len());
        let logged = field(line, "request_id").unwrap();
        assert!(
            logged.contains(ekm_proxy::audit::TRUNCATED_MARKER),
            "no truncation marker: {logged}"
        );
    }
    // Absurd: refused before it reaches any line.
    let absurd_marker = format!("absurd-id-{}-", std::process::id());
    let absurd = format!("{absurd_marker}{}", "x".repeat(200 * 1024));
    let r = xks
        .post("keys/dev-aes-1/encrypt", encrypt(&absurd))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        ekm_proxy::client::xks::error_name(&r.body).as_deref(),
        Some("ValidationException")
    );
    // Give the logger a moment, then no captured line may be anywhere near that size.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for line in captured_text().lines() {
        assert!(line.len() < 64 * 1024, "a {}-byte log line", line.len());
        assert!(!line.contains(&"x".repeat(300)), "the absurd id was logged");
    }
}
