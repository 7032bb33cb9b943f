//! `ekm-proxy policy explain` agrees with the server. For every rule scenario (XKS rules on
//! `kmsKeyArn`, `awsPrincipalArn` and an operation-scoped rule; Cloud EKM grants, the resource
//! pin and Key Access Justifications; Azure subject and pool rules; the key stores', keys' and
//! prefixes' own switches and key lists) the same request goes to the real server (in-process,
//! real TLS, a SoftHSMv2 token) and, as a sample request file, to the built `ekm-proxy` binary
//! with the server's own configuration file. Both must agree on allow or deny and on what
//! decided: the rule the server's audit line names on a denial, the grant it names on a Cloud EKM
//! allow.
//!
//! This binary installs its own global tracing subscriber (JSON lines into a buffer) to read the
//! server's audit lines; lines are matched by request id and polled for up to a generous bound.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use ekm_proxy::client::xks::{self, EncryptOutput};
use ekm_proxy::client::{Response, XksClient, XksClientConfig};
use ekm_proxy::dev::profile::{AZURE_RSA_KEY, azure_dev_key_specs};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::Full;
use serde_json::{Value, json};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

use common::jwks::{OTHER_SERVICE_ACCOUNT, SERVICE_ACCOUNT, jwks_of, signer1};
use common::proxy::{
    ACCESS_KEY_ID, CLIENT_SUBJECT, GCP_PREFIX, GcpJwks, GcpSection, ProxyOptions, SECRET, TestProxy,
};
use common::softhsm::TestToken;

// ---------------------------------------------------------------------------------------------
// The server's audit lines
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One formatted event per write: lines from parallel tests never interleave.
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

const POLL_LIMIT: Duration = Duration::from_secs(20);

/// The audit line of request `id`.
async fn audit_line(id: &str) -> Value {
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        let text = String::from_utf8_lossy(&capture().0.lock().unwrap()).into_owned();
        let found = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| serde_json::from_str::<Value>(l.trim_end()).ok())
            .find(|l| {
                l["target"].as_str() == Some(ekm_proxy::audit::TARGET)
                    && l["fields"]["request_id"].as_str() == Some(id)
            });
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no audit line for request {id} within {POLL_LIMIT:?}; captured:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the server did with one request.
#[derive(Debug)]
struct Served {
    status: u16,
    /// The audit line's `decision`: allow, deny or error.
    decision: String,
    rule: Option<String>,
    grant: Option<String>,
}

async fn served(status: u16, request_id: &str) -> Served {
    let line = audit_line(request_id).await;
    let text = |name: &str| {
        line["fields"][name]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Served {
        status,
        decision: text("decision").unwrap_or_default(),
        rule: text("rule"),
        grant: text("grant"),
    }
}

// ---------------------------------------------------------------------------------------------
// `ekm-proxy policy explain`
// ---------------------------------------------------------------------------------------------

/// What the binary said: its exit code and its `--json` output (or stderr when it failed).
#[derive(Debug)]
struct Explained {
    code: i32,
    json: Value,
    stderr: String,
}

fn run_explain(config: &Path, request: &str, extra: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("request.json");
    std::fs::write(&file, request).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .args(["policy", "explain", "--config"])
        .arg(config)
        .arg("--request")
        .arg(&file)
        .args(extra)
        .env_remove("EKM_PROXY_CONFIG")
        .output()
        .expect("run ekm-proxy");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn explain(config: &Path, sample: &Value) -> Explained {
    let (code, stdout, stderr) = run_explain(config, &sample.to_string(), &["--json"]);
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("explain {sample}: output is not JSON ({e}): {stdout}{stderr}"));
    Explained { code, json, stderr }
}

/// The server and the explanation agree: allow or deny, and what decided. `refused_status` is
/// the status the server answers when a setting (switch, key list) refuses before any rule.
#[track_caller]
fn assert_agree(what: &str, server: &Served, explained: &Explained, refused_status: u16) {
    let e = &explained.json;
    let context = || {
        format!(
            "{what}: server {server:?}, explain {e:#}{}",
            explained.stderr
        )
    };
    let kind = e["decidedBy"]["kind"].as_str().unwrap_or_default();
    let name = e["decidedBy"]["name"].as_str().map(str::to_owned);
    match e["decision"].as_str() {
        Some("allow") => {
            assert_eq!(explained.code, 0, "{}", context());
            assert_eq!(server.status, 200, "{}", context());
            assert_eq!(server.decision, "allow", "{}", context());
            assert_eq!(server.rule, None, "{}", context());
            if kind == "grant" {
                assert_eq!(server.grant, name, "{}", context());
            } else {
                assert!(kind == "rules" || kind == "none", "{}", context());
            }
        }
        Some("deny") => {
            assert_eq!(explained.code, 1, "{}", context());
            assert_ne!(server.status, 200, "{}", context());
            assert_ne!(server.decision, "allow", "{}", context());
            if kind == "setting" {
                assert_eq!(server.status, refused_status, "{}", context());
                assert_eq!(server.rule, None, "{}", context());
            } else {
                assert_eq!(kind, "rule", "{}", context());
                assert_eq!(server.status, 403, "{}", context());
                assert_eq!(server.decision, "deny", "{}", context());
                assert_eq!(server.rule, name, "{}", context());
            }
        }
        other => panic!("decision {other:?}: {}", context()),
    }
}

/// What explain decided, for scenario expectations: (`allow`|`deny`, kind, name).
fn verdict(e: &Explained) -> (String, String, Option<String>) {
    (
        e.json["decision"].as_str().unwrap_or_default().to_owned(),
        e.json["decidedBy"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        e.json["decidedBy"]["name"].as_str().map(str::to_owned),
    )
}

fn want(decision: &str, kind: &str, name: Option<&str>) -> (String, String, Option<String>) {
    (decision.into(), kind.into(), name.map(str::to_owned))
}

// ---------------------------------------------------------------------------------------------
// XKS
// ---------------------------------------------------------------------------------------------

const OUR_ACCOUNT: &str = "arn:aws:iam::111122223333:role/KmsCaller";
const OTHER_ACCOUNT: &str = "arn:aws:iam::999999999999:role/KmsCaller";
const PINNED_KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/pinned";
const OTHER_KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/other";

const XKS_RULES: &str = r#"
[[xks.key_store.rule]]
name = "caller-account"
attribute = "awsPrincipalArn"
allow = ["arn:aws:iam::111122223333:*"]

[[xks.key_store.rule]]
name = "pin-kms-key"
keys = ["dev-aes-1"]
operations = ["encrypt", "decrypt"]
attribute = "kmsKeyArn"
allow = ["arn:aws:kms:us-east-1:111122223333:key/pinned"]

[[xks.key_store.rule]]
name = "decrypt-via-ebs"
keys = ["dev-aes-1"]
operations = ["decrypt"]
attribute = "kmsViaService"
allow = ["ebs"]
"#;

/// One XKS scenario: key, operation (`metadata`, `encrypt`, `decrypt`) and `requestMetadata`.
struct XksCase {
    what: &'static str,
    key: &'static str,
    op: &'static str,
    metadata: Value,
    expect: (String, String, Option<String>),
}

fn md(n: usize, principal: &str, key_arn: Option<&str>, op: &str, via: Option<&str>) -> Value {
    let mut m = json!({
        "awsPrincipalArn": principal,
        "kmsOperation": op,
        "kmsRequestId": format!("policy-explain-xks-{n}"),
    });
    if let Some(arn) = key_arn {
        m["kmsKeyArn"] = json!(arn);
    }
    if let Some(via) = via {
        m["kmsViaService"] = json!(via);
    }
    m
}

fn with_metadata(body: Vec<u8>, metadata: &Value) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    v["requestMetadata"] = metadata.clone();
    serde_json::to_vec(&v).unwrap()
}

async fn xks_send(
    c: &mut XksClient,
    key: &str,
    op: &str,
    metadata: &Value,
    sealed: &EncryptOutput,
) -> Response {
    let body = match op {
        "metadata" => with_metadata(xks::metadata_body(), metadata),
        "encrypt" => with_metadata(
            xks::encrypt_body(PINNED_KEY_ARN, b"explained", None, false),
            metadata,
        ),
        "decrypt" => with_metadata(
            xks::decrypt_body_for(PINNED_KEY_ARN, sealed, None),
            metadata,
        ),
        _ => unreachable!("{op}"),
    };
    c.post(&format!("keys/{key}/{op}"), body)
        .await
        .unwrap_or_else(|e| panic!("{op} {key}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xks_rules_agree_with_the_server() {
    capture();
    let proxy = TestProxy::start_with(ProxyOptions {
        tables: format!(
            r#"{XKS_RULES}
[[xks.key_store]]
name = "off"
path_prefix = "/off"
regions = ["us-east-1"]
keys = ["*"]
enabled = false
[[xks.key_store.credential]]
access_key_id = "{ACCESS_KEY_ID}"
secret = "{SECRET}"
"#
        ),
        ..Default::default()
    })
    .await;
    let mut c = proxy.tls_client().await;
    // A real ciphertext of dev-aes-1 (an allowed encrypt), so allowed decrypts succeed.
    let sealing = md(0, OUR_ACCOUNT, Some(PINNED_KEY_ARN), "Encrypt", None);
    let r = xks_send(&mut c, "dev-aes-1", "encrypt", &sealing, &dummy_sealed()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let sealed = xks::parse_encrypt_response(&r.body).unwrap();

    let cases = [
        XksCase {
            what: "metadata from our account: the kmsKeyArn pin does not cover metadata",
            key: "dev-aes-1",
            op: "metadata",
            metadata: md(1, OUR_ACCOUNT, None, "CreateKey", None),
            expect: want("allow", "rules", None),
        },
        XksCase {
            what: "metadata from another account",
            key: "dev-aes-1",
            op: "metadata",
            metadata: md(2, OTHER_ACCOUNT, None, "CreateKey", None),
            expect: want("deny", "rule", Some("caller-account")),
        },
        XksCase {
            what: "encrypt under the pinned KMS key",
            key: "dev-aes-1",
            op: "encrypt",
            metadata: md(3, OUR_ACCOUNT, Some(PINNED_KEY_ARN), "Encrypt", None),
            expect: want("allow", "rules", None),
        },
        XksCase {
            what: "encrypt under another KMS key",
            key: "dev-aes-1",
            op: "encrypt",
            metadata: md(4, OUR_ACCOUNT, Some(OTHER_KEY_ARN), "Encrypt", None),
            expect: want("deny", "rule", Some("pin-kms-key")),
        },
        XksCase {
            what: "encrypt from another account under the pinned key",
            key: "dev-aes-1",
            op: "encrypt",
            metadata: md(5, OTHER_ACCOUNT, Some(PINNED_KEY_ARN), "Encrypt", None),
            expect: want("deny", "rule", Some("caller-account")),
        },
        XksCase {
            what: "another key is not pinned",
            key: "dev-aes-encrypt-only",
            op: "encrypt",
            metadata: md(6, OUR_ACCOUNT, Some(OTHER_KEY_ARN), "Encrypt", None),
            expect: want("allow", "rules", None),
        },
        XksCase {
            what: "decrypt not via EBS (operation-scoped rule)",
            key: "dev-aes-1",
            op: "decrypt",
            metadata: md(7, OUR_ACCOUNT, Some(PINNED_KEY_ARN), "Decrypt", None),
            expect: want("deny", "rule", Some("decrypt-via-ebs")),
        },
        XksCase {
            what: "decrypt via RDS",
            key: "dev-aes-1",
            op: "decrypt",
            metadata: md(8, OUR_ACCOUNT, Some(PINNED_KEY_ARN), "Decrypt", Some("rds")),
            expect: want("deny", "rule", Some("decrypt-via-ebs")),
        },
        XksCase {
            what: "decrypt via EBS under the pinned key",
            key: "dev-aes-1",
            op: "decrypt",
            metadata: md(9, OUR_ACCOUNT, Some(PINNED_KEY_ARN), "Decrypt", Some("ebs")),
            expect: want("allow", "rules", None),
        },
        XksCase {
            what: "a key the store does not expose",
            key: "not-listed",
            op: "encrypt",
            metadata: md(10, OUR_ACCOUNT, Some(PINNED_KEY_ARN), "Encrypt", None),
            expect: want("deny", "setting", Some("keys")),
        },
    ];
    for case in &cases {
        let r = xks_send(&mut c, case.key, case.op, &case.metadata, &sealed).await;
        let id = case.metadata["kmsRequestId"].as_str().unwrap();
        let server = served(r.status, id).await;
        let sample = json!({
            "front": "xks",
            "keyStore": "dev",
            "key": case.key,
            "operation": case.op,
            "principal": ACCESS_KEY_ID,
            "metadata": case.metadata,
        });
        let explained = explain(&proxy.config_path, &sample);
        assert_eq!(verdict(&explained), case.expect, "{}", case.what);
        assert_agree(case.what, &server, &explained, 404);
    }

    // A disabled key store: InvalidStateException before any rule, on both sides.
    let mut off = XksClient::connect(Arc::new(XksClientConfig {
        prefix: "/off".into(),
        ..proxy.client_config("tls")
    }))
    .await
    .unwrap();
    let metadata = md(11, OUR_ACCOUNT, Some(PINNED_KEY_ARN), "Encrypt", None);
    let r = xks_send(&mut off, "dev-aes-1", "encrypt", &metadata, &sealed).await;
    let server = served(r.status, "policy-explain-xks-11").await;
    let sample = json!({"front": "xks", "keyStore": "/off", "key": "dev-aes-1",
        "operation": "Encrypt", "metadata": metadata});
    let explained = explain(&proxy.config_path, &sample);
    assert_eq!(
        verdict(&explained),
        want("deny", "setting", Some("enabled"))
    );
    assert_agree("disabled key store", &server, &explained, 400);
}

fn dummy_sealed() -> EncryptOutput {
    EncryptOutput {
        ciphertext: vec![0; 16],
        iv: vec![0; 12],
        tag: vec![0; 16],
        ciphertext_metadata: None,
        cdiv: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud EKM
// ---------------------------------------------------------------------------------------------

const RESOURCE: &str = "projects/p/locations/l/keyRings/r/cryptoKeys/k";

fn gcp_keys() -> String {
    format!(
        r#"
[[gcp.key]]
path = "k1"
hsm_key = "dev-aes-1"
[[gcp.key.grant]]
name = "cloud-kms-prod"
service_accounts = ["{SERVICE_ACCOUNT}"]
operations = ["wrap", "unwrap"]
[[gcp.key.grant]]
name = "other-project-wrap-only"
service_accounts = ["{OTHER_SERVICE_ACCOUNT}"]
operations = ["wrap"]

[[gcp.key]]
path = "pinned"
hsm_key = "dev-aes-1"
resource_names = ["projects/p/locations/*/keyRings/r/cryptoKeys/*"]
access_reasons = {{ allow = ["CUSTOMER_INITIATED_ACCESS"], allow_health_checks = true }}
[[gcp.key.grant]]
name = "pinned-grant"
service_accounts = ["{SERVICE_ACCOUNT}"]

[[gcp.key]]
path = "off"
hsm_key = "dev-aes-1"
enabled = false
[[gcp.key.grant]]
name = "off-grant"
service_accounts = ["{SERVICE_ACCOUNT}"]
"#
    )
}

struct GcpEnv {
    proxy: TestProxy,
    cfg: Arc<XksClientConfig>,
    client: Option<XksClient>,
    _dir: tempfile::TempDir,
}

impl GcpEnv {
    async fn post(&mut self, key: &str, op: &str, email: &str, body: &Value) -> Response {
        if self.client.as_ref().is_none_or(XksClient::is_closed) {
            self.client = Some(XksClient::connect(self.cfg.clone()).await.expect("connect"));
        }
        let token = signer1().token().email(email).sign();
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

/// `additionalContext`, with the reason when given.
fn gcp_context(reason: Option<&str>, resource: &str) -> Value {
    let mut c = json!({ "relativeResourceName": resource });
    if let Some(reason) = reason {
        c["accessReasonContext"] = json!({ "reason": reason });
    }
    c
}

fn request_id(r: &Response) -> String {
    r.headers
        .get("x-request-id")
        .expect("x-request-id")
        .to_str()
        .unwrap()
        .to_owned()
}

struct GcpCase {
    what: &'static str,
    key: &'static str,
    op: &'static str,
    email: &'static str,
    reason: Option<&'static str>,
    resource: &'static str,
    expect: (String, String, Option<String>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_ekm_grants_and_justifications_agree_with_the_server() {
    capture();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, serde_json::to_vec(&jwks_of(&[signer1()])).unwrap()).unwrap();
    let mut section = GcpSection::new(GcpJwks::File(file));
    section.keys = gcp_keys();
    let proxy = TestProxy::start_with(section.options()).await;
    let cfg = Arc::new(common::cloud_ekm::bearer_client_config(&proxy));
    let mut env = GcpEnv {
        proxy,
        cfg,
        client: None,
        _dir: dir,
    };
    // A real blob of k1, so allowed unwraps succeed.
    let body = json!({ "plaintext": B64.encode(b"explained"),
        "additionalContext": gcp_context(Some("CUSTOMER_INITIATED_ACCESS"), RESOURCE) });
    let r = env.post("k1", "wrap", SERVICE_ACCOUNT, &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let blob = serde_json::from_slice::<Value>(&r.body).unwrap()["wrappedBlob"].clone();

    let case = |what, key, op, email, reason, resource, expect| GcpCase {
        what,
        key,
        op,
        email,
        reason,
        resource,
        expect,
    };
    let cases = [
        case(
            "the prod grant wraps",
            "k1",
            "wrap",
            SERVICE_ACCOUNT,
            Some("CUSTOMER_INITIATED_ACCESS"),
            RESOURCE,
            want("allow", "grant", Some("cloud-kms-prod")),
        ),
        case(
            "the prod grant unwraps for Google's system operation",
            "k1",
            "unwrap",
            SERVICE_ACCOUNT,
            Some("GOOGLE_INITIATED_SYSTEM_OPERATION"),
            RESOURCE,
            want("allow", "grant", Some("cloud-kms-prod")),
        ),
        case(
            "the other project may wrap",
            "k1",
            "wrap",
            OTHER_SERVICE_ACCOUNT,
            Some("CUSTOMER_INITIATED_ACCESS"),
            RESOURCE,
            want("allow", "grant", Some("other-project-wrap-only")),
        ),
        case(
            "the other project may not unwrap",
            "k1",
            "unwrap",
            OTHER_SERVICE_ACCOUNT,
            Some("CUSTOMER_INITIATED_ACCESS"),
            RESOURCE,
            want("deny", "rule", Some("grants")),
        ),
        case(
            "a third-party data request is not an allowed justification",
            "k1",
            "wrap",
            SERVICE_ACCOUNT,
            Some("THIRD_PARTY_DATA_REQUEST"),
            RESOURCE,
            want("deny", "rule", Some("access_reasons")),
        ),
        case(
            "no justification at all",
            "k1",
            "wrap",
            SERVICE_ACCOUNT,
            None,
            RESOURCE,
            want("deny", "rule", Some("access_reasons")),
        ),
        case(
            "the pinned key from another key ring",
            "pinned",
            "wrap",
            SERVICE_ACCOUNT,
            Some("CUSTOMER_INITIATED_ACCESS"),
            "projects/p/locations/l/keyRings/other/cryptoKeys/k",
            want("deny", "rule", Some("resource_names")),
        ),
        case(
            "the pinned key's own justification policy refuses Google's system operation",
            "pinned",
            "wrap",
            SERVICE_ACCOUNT,
            Some("GOOGLE_INITIATED_SYSTEM_OPERATION"),
            RESOURCE,
            want("deny", "rule", Some("access_reasons")),
        ),
        case(
            "the pinned key, in its resource, for the customer",
            "pinned",
            "wrap",
            SERVICE_ACCOUNT,
            Some("CUSTOMER_INITIATED_ACCESS"),
            RESOURCE,
            want("allow", "grant", Some("pinned-grant")),
        ),
        case(
            "a disabled key",
            "off",
            "wrap",
            SERVICE_ACCOUNT,
            Some("CUSTOMER_INITIATED_ACCESS"),
            RESOURCE,
            want("deny", "setting", Some("enabled")),
        ),
    ];
    for case in &cases {
        let mut body = json!({ "additionalContext": gcp_context(case.reason, case.resource) });
        if case.op == "wrap" {
            body["plaintext"] = json!(B64.encode(b"explained"));
        } else {
            body["wrappedBlob"] = blob.clone();
        }
        let r = env.post(case.key, case.op, case.email, &body).await;
        let server = served(r.status, &request_id(&r)).await;
        let mut sample = json!({
            "front": "gcp",
            "key": case.key,
            "operation": case.op,
            "principal": case.email,
            "resource": case.resource,
        });
        if let Some(reason) = case.reason {
            sample["reason"] = json!(reason);
        }
        let explained = explain(&env.proxy.config_path, &sample);
        assert_eq!(verdict(&explained), case.expect, "{}", case.what);
        assert_agree(case.what, &server, &explained, 400);
    }
}

// ---------------------------------------------------------------------------------------------
// Azure
// ---------------------------------------------------------------------------------------------

fn azure_tables() -> String {
    format!(
        r#"
[azure]

[[azure.prefix]]
name = "pool-a"
path_prefix = "/azure"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["*"]
[[azure.prefix.rule]]
name = "our-client"
attribute = "clientCertificateSubject"
allow = ["{CLIENT_SUBJECT}"]
[[azure.prefix.rule]]
name = "only-pool-a"
attribute = "poolName"
allow = ["pool-a"]
operations = ["wrap", "unwrap"]

[[azure.prefix]]
name = "strict"
path_prefix = "/azure/strict"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["{AZURE_RSA_KEY}"]
[[azure.prefix.rule]]
name = "pool-b-client-only"
attribute = "clientCertificateSubject"
allow = ["mhsm-pool-b.example"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_rules_agree_with_the_server() {
    capture();
    let token = TestToken::new();
    for spec in azure_dev_key_specs() {
        token.add_key(&spec);
    }
    let proxy = TestProxy::start_on(
        token,
        ProxyOptions {
            tables: azure_tables(),
            ..Default::default()
        },
    )
    .await;
    let mut c = XksClient::connect(Arc::new(proxy.client_config("mtls")))
        .await
        .unwrap();
    let cases = [
        (
            "pool-a wraps",
            "/azure",
            "pool-a",
            AZURE_RSA_KEY,
            "wrapkey",
            "pool-a",
            want("allow", "rules", None),
        ),
        (
            "pool-b may not wrap",
            "/azure",
            "pool-a",
            AZURE_RSA_KEY,
            "wrapkey",
            "pool-b",
            want("deny", "rule", Some("only-pool-a")),
        ),
        (
            "the pool rule does not cover metadata",
            "/azure",
            "pool-a",
            AZURE_RSA_KEY,
            "metadata",
            "pool-b",
            want("allow", "rules", None),
        ),
        (
            "the strict prefix wants another client",
            "/azure/strict",
            "strict",
            AZURE_RSA_KEY,
            "wrapkey",
            "pool-a",
            want("deny", "rule", Some("pool-b-client-only")),
        ),
        (
            "the strict prefix does not expose the AES key",
            "/azure/strict",
            "strict",
            "dev-aes-kek-1",
            "wrapkey",
            "pool-a",
            want("deny", "setting", Some("keys")),
        ),
    ];
    for (n, (what, path, prefix, key, op, pool, expect)) in cases.into_iter().enumerate() {
        let request_id = format!("policy-explain-azure-{n}");
        let context =
            json!({"request_id": request_id, "correlation_id": "corr", "pool_name": pool});
        let body = if op == "metadata" {
            json!({ "request_context": context })
        } else {
            json!({ "request_context": context, "alg": "RSA-OAEP", "value": B64URL.encode([7u8; 32]) })
        };
        let req = http::Request::post(format!("{path}/{key}/{op}?api-version=0.1-preview"))
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
            .unwrap();
        let r = c.send_raw(req).await.expect("azure request");
        let server = served(r.status, &request_id).await;
        let sample = json!({
            "front": "azure",
            "prefix": prefix,
            "key": key,
            "operation": op,
            "subject": CLIENT_SUBJECT,
            "poolName": pool,
        });
        let explained = explain(&proxy.config_path, &sample);
        assert_eq!(verdict(&explained), expect, "{what}");
        assert_agree(what, &server, &explained, 404);
    }
}

// ---------------------------------------------------------------------------------------------
// The command itself
// ---------------------------------------------------------------------------------------------

/// A valid configuration without a running server: the dev profile's shape on a test token.
async fn config_only() -> (TestProxy, String) {
    let proxy = TestProxy::start_with(ProxyOptions {
        tables: XKS_RULES.into(),
        ..Default::default()
    })
    .await;
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    (proxy, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_names_every_rule_and_the_exit_codes_follow_the_decision() {
    let (proxy, _) = config_only().await;
    let sample = json!({"front": "xks", "keyStore": "dev", "key": "dev-aes-1",
        "operation": "Encrypt", "metadata": {"awsPrincipalArn": OUR_ACCOUNT,
        "kmsKeyArn": OTHER_KEY_ARN, "kmsOperation": "Encrypt"}});
    let (code, out, err) = run_explain(&proxy.config_path, &sample.to_string(), &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("decision:   DENY\n"), "{out}");
    assert!(out.contains("decided by: rule 'pin-kms-key'\n"), "{out}");
    assert!(
        out.contains("reason:     kmsKeyArn is not an allowed value\n"),
        "{out}"
    );
    for line in [
        "caller-account",
        "allowed",
        "awsPrincipalArn matches 'arn:aws:iam::111122223333:*'",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
    assert!(
        out.lines()
            .any(|l| l.contains("decrypt-via-ebs") && l.contains("not reached")),
        "{out}"
    );
    let allowed = json!({"front": "xks", "keyStore": "dev", "key": "dev-aes-1",
        "operation": "metadata", "metadata": {"awsPrincipalArn": OUR_ACCOUNT}});
    let (code, out, _) = run_explain(&proxy.config_path, &allowed.to_string(), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("decision:   ALLOW\n"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("pin-kms-key") && l.contains("skipped")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_64_with_a_clear_message() {
    let (proxy, _) = config_only().await;
    for (request, says) in [
        (
            r#"{"front":"xks","keyStore":"dev","key":"k","operation":"Encrypt","principle":"x"}"#,
            "unknown field `principle`",
        ),
        (
            r#"{"front":"xks","keyStore":"dev","operation":"Encrypt"}"#,
            "missing field `key`",
        ),
        (
            r#"{"front":"xks","keyStore":"nope","key":"k","operation":"Encrypt"}"#,
            "no XKS key store is named or prefixed 'nope' (key stores: dev)",
        ),
        (
            r#"{"front":"xks","keyStore":"dev","key":"k","operation":"Sign"}"#,
            "operation 'Sign' is not one of",
        ),
        (
            r#"{"front":"gcp","key":"k","operation":"wrap","principal":"sa"}"#,
            "no [gcp] section",
        ),
        ("not json", "request: "),
    ] {
        let (code, out, err) = run_explain(&proxy.config_path, request, &[]);
        assert_eq!(code, 64, "{request}: {out}{err}");
        assert!(out.is_empty(), "{request}: {out}");
        assert!(err.contains(says), "{request}: {err}");
    }
    // A configuration error is reported as check-config reports it.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nno_such_key = 1\n").unwrap();
    let (code, _, err) = run_explain(&bad, r#"{"front":"xks"}"#, &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no_such_key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hsm_pin_and_sigv4_secrets_need_not_be_resolvable() {
    let (proxy, text) = config_only().await;
    // Both kinds of secret from where only the server could read them.
    let text: String = text
        .lines()
        .map(|l| {
            let line = if l.starts_with("user_pin = ") {
                "user_pin = { env = \"EKM_POLICY_EXPLAIN_TEST_PIN_NEVER_SET\" }"
            } else if l.starts_with("secret = ") {
                "secret = { file = \"no-such-secret-file\" }"
            } else {
                l
            };
            format!("{line}\n")
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ekm-proxy.toml");
    std::fs::write(&config, text).unwrap();
    // The server could not start from this file...
    let problems = ekm_proxy::config::load(&config).unwrap_err().to_string();
    assert!(problems.contains("hsm.user_pin"), "{problems}");
    assert!(problems.contains("credential[0].secret"), "{problems}");
    // ...but the policy in it can be explained.
    let sample = json!({"front": "xks", "keyStore": "dev", "key": "dev-aes-1",
        "operation": "Encrypt", "metadata": {"awsPrincipalArn": OTHER_ACCOUNT,
        "kmsKeyArn": PINNED_KEY_ARN, "kmsOperation": "Encrypt"}});
    let explained = explain(&config, &sample);
    assert_eq!(
        verdict(&explained),
        want("deny", "rule", Some("caller-account"))
    );
    drop(proxy);
}
