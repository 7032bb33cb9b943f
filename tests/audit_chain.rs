#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The tamper-evident audit trail, end to end: a real proxy on a SoftHSM token writes the chain
//! (`logging.audit_file`) with checkpoints MACed in the HSM by `ekm-audit-hmac`, and the real
//! binary checks it (`ekm-proxy audit verify`).
//!
//! Covers: the chain of a served run verifies with the HSM; a copy with one line deleted,
//! edited, reordered, or with a forged line appended is caught at its position; a chain
//! recomputed without the HSM key passes the hash check alone but fails the MAC check; a restart
//! continues the chain and rotation splits it across files that verify together (and not out of
//! order); `audit_required` fails key operations closed when the line cannot be written, while
//! without it the drop is counted; and a replica that must audit refuses to start without its
//! HMAC key.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ekm_proxy::client::XksClient;
use ekm_proxy::client::xks;
use ekm_proxy::hsm::{KeyKind, KeySpec};
use serde_json::Value;

use common::proxy::{ProxyOptions, TestProxy};
use common::softhsm::TestToken;

const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/audit-test";
const HMAC_KEY: &str = "ekm-audit-hmac";

fn token_with_hmac_key() -> TestToken {
    let token = TestToken::new();
    token.add_key(&KeySpec::new(HMAC_KEY, KeyKind::HmacSha256));
    token
}

fn options(audit: &Path, extra: &str) -> ProxyOptions {
    ProxyOptions {
        logging_keys: format!(
            "audit_file = {:?}\naudit_checkpoint_ms = 200\n{extra}",
            audit.display().to_string()
        ),
        ..Default::default()
    }
}

async fn encrypt(c: &mut XksClient) -> ekm_proxy::client::Response {
    c.post(
        "keys/dev-aes-1/encrypt",
        xks::encrypt_body(ARN, b"audited", None, false),
    )
    .await
    .unwrap()
}

async fn traffic(c: &mut XksClient) {
    for _ in 0..3 {
        assert_eq!(encrypt(c).await.status, 200);
    }
    let r = c
        .post("keys/no-such-key/metadata", xks::metadata_body())
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = c
        .post("keys/dev-aes-1/metadata", xks::metadata_body())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// `ekm-proxy audit verify <files> [--config]`: (exit code, stdout + stderr).
fn verify(files: &[&Path], config: Option<&Path>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ekm-proxy"));
    cmd.args(["audit", "verify"]).args(files);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().expect("run ekm-proxy");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_copy(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Recompute every hash and checkpoint head after editing line `edit` (0-based), as someone
/// who can write the file but not use the HSM key would: the MACs cannot be recomputed.
fn recompute_without_key(lines: &[String], edit: usize) -> Vec<String> {
    use ekm_proxy::audit::chain;
    let mut out: Vec<String> = Vec::new();
    let mut prev = chain::GENESIS;
    for (i, l) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        let mut body = v.as_object().unwrap().clone();
        let seq = body.remove("seq").unwrap().as_u64().unwrap();
        body.remove("prev");
        if i == edit {
            body.insert("principal".into(), "someone-else".into());
        }
        if body["type"] == "checkpoint" {
            let covers = body["covers"].as_u64().unwrap();
            let first = serde_json::from_str::<Value>(&out[0]).unwrap()["seq"]
                .as_u64()
                .unwrap();
            let head = chain::line_hash(out[(covers - first) as usize].as_bytes());
            body.insert("head".into(), hex::encode(head).into());
        }
        if i == 0 {
            prev = chain::parse_hash(v["prev"].as_str().unwrap()).unwrap();
        }
        let line = chain::compose(seq, &prev, &Value::Object(body).to_string());
        prev = chain::line_hash(line.as_bytes());
        out.push(line);
    }
    out
}

/// Shut the proxy down (final checkpoint) but keep its files: the config, certificates and
/// token stay for `audit verify --config`.
async fn shut_down(proxy: &mut TestProxy) {
    proxy.running.take().expect("running").shutdown().await;
}

async fn wait_for_checkpoints(proxy: &TestProxy, at_least: f64) {
    let start = Instant::now();
    while proxy
        .metric("ekm_audit_checkpoints_total{outcome=\"ok\"}")
        .await
        < at_least
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no checkpoints");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_verifies_and_every_tampering_is_found_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut proxy = TestProxy::start_on(
        token_with_hmac_key(),
        options(&audit, "audit_required = true"),
    )
    .await;
    let mut c = proxy.tls_client().await;
    traffic(&mut c).await;
    wait_for_checkpoints(&proxy, 2.0).await;
    assert!(proxy.metric("ekm_audit_lines_total").await >= 7.0);
    assert_eq!(proxy.metric("ekm_audit_dropped_total").await, 0.0);
    let config = proxy.config_path.clone();
    drop(c);
    shut_down(&mut proxy).await;

    // The served chain: decisions (allowed and failed), checkpoints with MACs from the HSM.
    let original = lines(&audit);
    let parsed: Vec<Value> = original
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed[0]["type"], "start");
    assert_eq!(parsed.iter().filter(|v| v["type"] == "decision").count(), 5);
    // Each decision names the key store and the kmsRequestId the client sent (the test client
    // makes a distinct one per call, starting with its process id).
    let decisions: Vec<&Value> = parsed.iter().filter(|v| v["type"] == "decision").collect();
    let ids: std::collections::HashSet<&str> = decisions
        .iter()
        .map(|v| v["request_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids.len(), decisions.len(), "{decisions:#?}");
    for d in &decisions {
        assert_eq!(d["tenant"], "dev", "{d}");
        let id = d["request_id"].as_str().unwrap_or("");
        assert!(
            id.len() == 36 && id.starts_with(&format!("{:08x}-", std::process::id())),
            "{d}"
        );
    }
    assert!(
        parsed
            .iter()
            .any(|v| v["decision"] == "error" && v["key"] == "no-such-key")
    );
    assert_eq!(
        parsed.last().unwrap()["type"],
        "checkpoint",
        "shutdown ends covered"
    );
    let (code, out) = verify(&[&audit], Some(&config));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK"), "{out}");
    assert!(!out.contains(" 0 MAC(s) verified"), "{out}");
    // With no files named, the configured audit file (and its rotations) is checked.
    let (code, out) = verify(&[], Some(&config));
    assert_eq!(code, 0, "{out}");

    let tamper = tempfile::tempdir().unwrap();
    let t = tamper.path();
    let mut removed = original.clone();
    removed.remove(2);
    let (code, out) = verify(&[&write_copy(t, "removed.jsonl", &removed)], Some(&config));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("removed.jsonl:3:") && out.contains("removed"),
        "{out}"
    );

    // The first decision line (after the start line and its checkpoint), 0-based.
    let decision = parsed.iter().position(|v| v["type"] == "decision").unwrap();
    let mut edited = original.clone();
    edited[decision] = edited[decision].replacen("\"op\":\"", "\"op\":\"x", 1);
    assert_ne!(edited[decision], original[decision]);
    let (code, out) = verify(&[&write_copy(t, "edited.jsonl", &edited)], Some(&config));
    assert_eq!(code, 1, "{out}");
    // The link of the line after the edited one breaks (1-based: decision + 2).
    assert!(
        out.contains(&format!("edited.jsonl:{}:", decision + 2)) && out.contains("altered"),
        "{out}"
    );

    let mut reordered = original.clone();
    reordered.swap(2, 3);
    let (code, out) = verify(
        &[&write_copy(t, "reordered.jsonl", &reordered)],
        Some(&config),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reordered.jsonl:3:"), "{out}");

    let mut appended = original.clone();
    let last = appended.last().unwrap().clone();
    let seq = serde_json::from_str::<Value>(&last).unwrap()["seq"]
        .as_u64()
        .unwrap();
    appended.push(ekm_proxy::audit::chain::compose(
        seq + 1,
        &ekm_proxy::audit::chain::line_hash(last.as_bytes()),
        r#"{"ts":"2026-12-01T00:00:00Z","type":"decision","front":"xks","key":"dev-aes-1","decision":"allow"}"#,
    ));
    let (code, out) = verify(
        &[&write_copy(t, "appended.jsonl", &appended)],
        Some(&config),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("appended.jsonl:{}:", appended.len())) && out.contains("not covered"),
        "{out}"
    );

    // Rewritten from line 2 on by someone without the HSM key: the hashes agree, the MACs not.
    let forged = write_copy(
        t,
        "forged.jsonl",
        &recompute_without_key(&original, decision),
    );
    let (code, out) = verify(&[&forged], None);
    assert_eq!(code, 0, "the hash chain alone cannot tell: {out}");
    assert!(out.contains("MACs were not checked"), "{out}");
    let (code, out) = verify(&[&forged], Some(&config));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MAC does not verify"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_continues_the_chain_and_rotated_files_verify_together() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let token = token_with_hmac_key();
    let mut first = TestProxy::start_on(token.clone(), options(&audit, "")).await;
    traffic(&mut first.tls_client().await).await;
    let config = first.config_path.clone();
    shut_down(&mut first).await;
    // Rotate at every checkpoint tick: the second run splits the chain across files.
    let mut second = TestProxy::start_on(token, options(&audit, "audit_max_bytes = 1")).await;
    let mut c = second.tls_client().await;
    traffic(&mut c).await;
    wait_for_checkpoints(&second, 3.0).await;
    traffic(&mut c).await;
    let config2 = second.config_path.clone();
    drop(c);
    shut_down(&mut second).await;

    let files = ekm_proxy::audit::verify::chain_files(&audit).unwrap();
    assert!(files.len() >= 2, "rotation made no files: {files:?}");
    let all: Vec<Value> = files
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert!(
        all.iter()
            .any(|v| v["type"] == "start" && v["chain"] == "continued")
    );
    assert!(all.iter().any(|v| v["type"] == "rotate"));
    for (i, v) in all.iter().enumerate() {
        assert_eq!(
            v["seq"].as_u64(),
            Some(i as u64),
            "one numbering across files"
        );
    }
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (code, out) = verify(&refs, Some(&config));
    assert_eq!(code, 0, "{out}");
    let (code, out) = verify(&[], Some(&config2));
    assert_eq!(code, 0, "{out}");
    // Out of order, the files do not chain.
    let mut backwards = refs.clone();
    backwards.reverse();
    let (code, out) = verify(&backwards, Some(&config));
    assert_eq!(code, 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_audit_fails_closed_and_optional_audit_counts_drops() {
    // /dev/full opens but every write fails (ENOSPC): a full disk.
    let full = Path::new("/dev/full");
    let proxy = TestProxy::start_on(
        token_with_hmac_key(),
        options(full, "audit_required = true"),
    )
    .await;
    let mut c = proxy.tls_client().await;
    let r = encrypt(&mut c).await;
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_name().as_deref(), Some("InternalException"));
    assert!(!String::from_utf8_lossy(&r.body).contains("ciphertext"));
    // Not a key operation: not audited, still served.
    let r = c.post("health", xks::health_body()).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        proxy
            .metric("ekm_requests_total{front=\"xks\",op=\"encrypt\",outcome=\"AuditUnrecorded\"}")
            .await
            >= 1.0
    );
    drop(c);
    proxy.stop().await;

    let proxy = TestProxy::start_on(token_with_hmac_key(), options(full, "")).await;
    let mut c = proxy.tls_client().await;
    let r = encrypt(&mut c).await;
    assert_eq!(r.status, 200);
    assert!(proxy.metric("ekm_audit_dropped_total").await >= 1.0);
    drop(c);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_must_audit_does_not_start_without_its_hmac_key() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    // A token without the HMAC key; optional audit starts (checkpoints fail and are counted).
    let proxy = TestProxy::start_on(TestToken::new(), options(&audit, "")).await;
    assert!(
        proxy
            .metric("ekm_audit_checkpoints_total{outcome=\"error\"}")
            .await
            >= 1.0
    );
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    // Its own audit file: the running proxy holds the lock on the first one.
    let required = text
        .replace(
            "audit_checkpoint_ms = 200",
            "audit_checkpoint_ms = 200\naudit_required = true",
        )
        .replace("audit.jsonl", "audit-required.jsonl");
    assert_ne!(text, required);
    let path = proxy.dir.path().join("required.toml");
    std::fs::write(&path, required).unwrap();
    let settings = ekm_proxy::config::load(&path).unwrap();
    match ekm_proxy::app::start(settings).await {
        Ok(_) => panic!("started without the audit HMAC key"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("hmac-sha256") && msg.contains(HMAC_KEY),
                "{msg}"
            );
        }
    }
    proxy.stop().await;
}
