#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! Fleet state in the HSM, end to end: two proxy replicas on one SoftHSM token (different ports),
//! and the operator commands run as the real binary (`ekm-proxy keys disable`, `keystore
//! disable`, `killswitch engage`, `state show`) in their own process, writing PKCS#11 data
//! objects the replicas read every `security.state_poll_secs`.
//!
//! Covers: a key disabled through the CLI is refused by both replicas (XKS InvalidStateException,
//! GetKeyMetadata `DISABLED`, Cloud EKM FAILED_PRECONDITION) and served again after `enable`; a
//! replica started while the key is disabled refuses it from its first request (restart keeps the
//! state); `keystore disable` refuses the whole XKS store (health included); the fleet kill switch
//! takes every replica out of `/readyz`; each change is an audit event naming who made it; and
//! the metrics report what the HSM holds. "Within the poll interval" is checked with a bounded
//! wait loop, never a timing assertion.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ekm_proxy::client::xks;
use ekm_proxy::client::{Response, XksClient};
use serde_json::Value;

use common::cloud_ekm::GcpClient;
use common::jwks::{JwksServer, jwks_of, signer1};
use common::proxy::{GcpSection, ProxyOptions, TestProxy};
use common::softhsm::TestToken;

const KEY: &str = "dev-aes-1";
const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/fleet-test";
/// Upper bound of every wait for replicas to obey (the poll interval here is 1 s).
const OBEY_LIMIT: Duration = Duration::from_secs(10);

fn options(gcp: &JwksServer, audit_file: Option<&Path>) -> ProxyOptions {
    let mut o = GcpSection::with_server(gcp).options();
    o.security_keys = "state_poll_secs = 1".into();
    if let Some(path) = audit_file {
        o.logging_keys = format!("audit_file = {:?}\n", path.display().to_string());
    }
    o
}

/// Run `ekm-proxy <args> --config <config>`; returns (exit code, stdout, stderr).
fn cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("SUDO_USER")
        .output()
        .expect("run ekm-proxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_ok(config: &Path, args: &[&str]) -> String {
    let (code, out, err) = cli(config, args);
    assert_eq!(code, 0, "ekm-proxy {args:?}: stdout {out} stderr {err}");
    out
}

async fn encrypt(c: &mut XksClient) -> Response {
    c.post(
        &format!("keys/{KEY}/encrypt"),
        xks::encrypt_body(ARN, b"fleet", None, false),
    )
    .await
    .expect("encrypt")
}

async fn metadata_status(c: &mut XksClient) -> Option<String> {
    let r = c
        .post(&format!("keys/{KEY}/metadata"), xks::metadata_body())
        .await
        .expect("metadata");
    assert_eq!(
        r.status,
        200,
        "metadata: {}",
        String::from_utf8_lossy(&r.body)
    );
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["keyStatus"].as_str().map(str::to_owned)
}

/// Wait until `$cond` (an expression that may `.await`) holds, up to [`OBEY_LIMIT`].
macro_rules! until {
    ($what:expr, $cond:expr) => {{
        let start = Instant::now();
        while !$cond {
            assert!(
                start.elapsed() < OBEY_LIMIT,
                "{}: not within {OBEY_LIMIT:?}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

async fn refuses(c: &mut XksClient) -> bool {
    let r = encrypt(c).await;
    r.status == 400 && r.error_name().as_deref() == Some("InvalidStateException")
}

async fn serves(c: &mut XksClient) -> bool {
    encrypt(c).await.status == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_disabled_through_the_cli_stops_every_replica_until_enabled() {
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    let token = TestToken::new();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_a = audit_dir.path().join("a.jsonl");
    let a = TestProxy::start_on(token.clone(), options(&jwks, Some(&audit_a))).await;
    let b = TestProxy::start_on(token.clone(), options(&jwks, None)).await;
    assert_ne!(a.addr("tls"), b.addr("tls"));
    let (mut ca, mut cb) = (a.tls_client().await, b.tls_client().await);
    let mut gcp_b = GcpClient::new(&b);
    assert!(serves(&mut ca).await && serves(&mut cb).await);
    assert_eq!(gcp_b.wrap(b"x").await.status, 200);
    assert_eq!(metadata_status(&mut cb).await.as_deref(), Some("ENABLED"));

    let out = cli_ok(
        &a.config_path,
        &[
            "keys",
            "disable",
            KEY,
            "--by",
            "alice@ops",
            "--reason",
            "incident 42",
        ],
    );
    assert!(out.contains("disabled fleet-wide by alice@ops"), "{out}");

    until!("replica A refuses the key", refuses(&mut ca).await);
    until!("replica B refuses the key", refuses(&mut cb).await);
    assert_eq!(metadata_status(&mut ca).await.as_deref(), Some("DISABLED"));
    assert_eq!(metadata_status(&mut cb).await.as_deref(), Some("DISABLED"));
    let r = encrypt(&mut cb).await;
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        body.contains("alice@ops") && body.contains("incident 42"),
        "{body}"
    );
    let r = gcp_b.wrap(b"x").await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("FAILED_PRECONDITION"));
    assert_eq!(a.metric("ekm_fleet_disabled{kind=\"key\"}").await, 1.0);
    assert!(
        a.metric("ekm_fleet_state_reads_total{outcome=\"ok\"}")
            .await
            >= 2.0
    );

    // `state show` names who, when and why.
    let shown = cli_ok(&a.config_path, &["state"]);
    assert!(
        shown.contains(&format!("key {KEY} disabled by alice@ops")),
        "{shown}"
    );
    assert!(shown.contains("incident 42"), "{shown}");

    // A replica started now refuses the key from its first request.
    let c = TestProxy::start_on(token.clone(), options(&jwks, None)).await;
    let mut cc = c.tls_client().await;
    assert!(
        refuses(&mut cc).await,
        "a new replica must start with the fleet state"
    );

    cli_ok(&b.config_path, &["keys", "enable", KEY, "--by", "bob@ops"]);
    until!("replica A serves again", serves(&mut ca).await);
    until!("replica B serves again", serves(&mut cb).await);
    until!("replica C serves again", serves(&mut cc).await);
    assert_eq!(metadata_status(&mut ca).await.as_deref(), Some("ENABLED"));
    assert_eq!(a.metric("ekm_fleet_disabled{kind=\"key\"}").await, 0.0);
    let (code, out, _) = cli(&a.config_path, &["keys", "enable", KEY]);
    assert_eq!(code, 0);
    assert!(out.contains("was not disabled"), "{out}");

    // Both changes are in replica A's audit chain, naming who made them.
    let audit = std::fs::read_to_string(&audit_a).unwrap();
    let states: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "state")
        .collect();
    assert_eq!(states.len(), 2, "{audit}");
    assert_eq!(states[0]["change"], "set");
    assert_eq!(states[0]["target"], format!("key:{KEY}"));
    assert_eq!(states[0]["by"], "alice@ops");
    assert_eq!(states[0]["reason"], "incident 42");
    assert_eq!(states[1]["change"], "cleared");
    assert_eq!(
        states[1]["by"], "bob@ops",
        "the release names who enabled the key"
    );
    c.stop().await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_store_switch_and_fleet_kill_switch_reach_every_replica() {
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    let token = TestToken::new();
    let a = TestProxy::start_on(token.clone(), options(&jwks, None)).await;
    let b = TestProxy::start_on(token.clone(), options(&jwks, None)).await;
    let (mut ca, mut cb) = (a.tls_client().await, b.tls_client().await);

    // An unknown key store is a usage error naming the known ones.
    let (code, _, err) = cli(&a.config_path, &["keystore", "disable", "nope"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("xks:dev") && err.contains("gcp"), "{err}");

    cli_ok(
        &a.config_path,
        &["keystore", "disable", "dev", "--by", "carol"],
    );
    for c in [&mut ca, &mut cb] {
        until!("the key store is refused", {
            let r = c.post("health", xks::health_body()).await.expect("health");
            r.status == 400 && r.error_name().as_deref() == Some("InvalidStateException")
        });
    }
    // Cloud EKM is another store: unaffected.
    assert_eq!(GcpClient::new(&b).wrap(b"x").await.status, 200);
    cli_ok(&a.config_path, &["keystore", "enable", "xks:dev"]);
    until!("A serves again", serves(&mut ca).await);
    until!("B serves again", serves(&mut cb).await);

    cli_ok(&b.config_path, &["keystore", "disable", "gcp"]);
    let mut gcp_a = GcpClient::new(&a);
    until!("Cloud EKM is refused", {
        let r = gcp_a.wrap(b"x").await;
        r.status == 400 && String::from_utf8_lossy(&r.body).contains("FAILED_PRECONDITION")
    });
    assert!(serves(&mut ca).await, "XKS is another store");
    cli_ok(&b.config_path, &["keystore", "enable", "gcp"]);

    let out = cli_ok(
        &a.config_path,
        &["killswitch", "engage", "--by", "dave", "--reason", "drill"],
    );
    assert!(out.contains("ENGAGED"), "{out}");
    for p in [&a, &b] {
        until!(
            "the replica leaves /readyz",
            p.admin_get("/readyz").await.0 == 503
        );
        assert_eq!(
            p.metric("ekm_kill_switch_engaged{source=\"fleet\"}").await,
            1.0
        );
    }
    let r = encrypt(&mut cb).await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("dave"));
    assert!(GcpClient::new(&a).wrap(b"x").await.status >= 400);
    cli_ok(&a.config_path, &["killswitch", "release"]);
    for p in [&a, &b] {
        until!(
            "the replica is ready again",
            p.admin_get("/readyz").await.0 == 200
        );
    }
    assert!(serves(&mut ca).await && serves(&mut cb).await);
    let shown = cli_ok(&a.config_path, &["state"]);
    assert!(shown.contains("nothing disabled"), "{shown}");
    b.stop().await;
    a.stop().await;
}
