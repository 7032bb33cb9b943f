//! Runs the independent XKS conformance client (`tests/conformance/xks-conformance.sh`: bash,
//! curl `--aws-sigv4`, openssl) against the real proxy, started in-process with the dev profile on
//! a fresh SoftHSM token, on both its TLS listener and its mTLS listener (including the
//! rejected-client-certificate cases). Fails, never skips, when curl/openssl/bash are missing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::proxy::{ACCESS_KEY_ID, PREFIX, ProxyOptions, SECRET, TestProxy};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/conformance/xks-conformance.sh"
);

/// Minimum curl version for `--aws-sigv4`.
const MIN_CURL: (u32, u32) = (7, 75);

/// Panics with an actionable message unless bash, openssl and a new-enough curl are on PATH.
fn require_tools() {
    let version = |tool: &str, arg: &str| -> String {
        match Command::new(tool).arg(arg).output() {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            Ok(out) => panic!(
                "`{tool} {arg}` failed ({}): the conformance test needs {tool}",
                out.status
            ),
            Err(e) => panic!(
                "{tool} not found ({e}): the XKS conformance test needs bash, curl >= 7.75 and openssl \
                 (Debian: apt-get install curl openssl)"
            ),
        }
    };
    version("bash", "--version");
    version("openssl", "version");
    let curl = version("curl", "--version");
    let v = curl
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        found >= MIN_CURL,
        "curl {v} is too old: the XKS conformance client needs curl >= {}.{} for --aws-sigv4",
        MIN_CURL.0,
        MIN_CURL.1
    );
}

/// Client certificate, its key and the issuing CA's key, written for the script.
struct ClientFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    ca_key: PathBuf,
}

fn write_client_files(proxy: &TestProxy) -> ClientFiles {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client-key.pem");
    let ca_key = dir.path().join("ca-key.pem");
    std::fs::write(&cert, &proxy.pki.client.cert_pem).unwrap();
    std::fs::write(&key, proxy.pki.client.key_pem.as_bytes()).unwrap();
    std::fs::write(&ca_key, proxy.pki.ca.key_pem().as_bytes()).unwrap();
    ClientFiles {
        _dir: dir,
        cert,
        key,
        ca_key,
    }
}

/// One run of the script: the command line used (for messages), exit status and output.
struct Run {
    what: String,
    code: Option<i32>,
    output: String,
}

/// Runs the script against `https://localhost:<port>` (the server certificate is for `localhost`).
/// `client`: the mTLS client certificate, key and CA key, if the listener requires one.
fn run_script(port: u16, ca_pem: &Path, client: Option<&ClientFiles>) -> Run {
    let url = format!("https://localhost:{port}{PREFIX}/kms/xks/v1");
    let mut cmd = Command::new("bash");
    cmd.arg(SCRIPT)
        .env("XKS_URL", &url)
        .env("XKS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        .env("XKS_SECRET", SECRET)
        .env("XKS_REGION", "us-east-1")
        .env("XKS_CA", ca_pem)
        .env_remove("XKS_CLIENT_CERT")
        .env_remove("XKS_CLIENT_KEY")
        .env_remove("XKS_CLIENT_CA_KEY")
        .env_remove("XKS_CLIENT_CA_CERT")
        .env_remove("XKS_CURL_OPTS")
        .env("XKS_VERBOSE", "0");
    // The proxy is on loopback: never go through an HTTP proxy from the environment.
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "*").env("no_proxy", "*");
    if let Some(c) = client {
        cmd.env("XKS_CLIENT_CERT", &c.cert)
            .env("XKS_CLIENT_KEY", &c.key)
            .env("XKS_CLIENT_CA_KEY", &c.ca_key)
            .env("XKS_CLIENT_CA_CERT", ca_pem);
    }
    let what = format!(
        "XKS_URL={url}{} bash {SCRIPT}",
        if client.is_some() { " (mTLS)" } else { "" }
    );
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Run {
        what,
        code: out.status.code(),
        output,
    }
}

/// The script must exit 0, end with `N passed, 0 failed`, and have run every test in `must_run`.
fn assert_passed(run: &Run, must_run: &[&str]) {
    let summary = run
        .output
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let passed = summary
        .strip_suffix(" passed, 0 failed")
        .and_then(|n| n.parse::<u32>().ok());
    assert!(
        run.code == Some(0) && passed.is_some_and(|n| n > 0),
        "XKS conformance client failed ({}; exit {:?}):\n{}",
        run.what,
        run.code,
        run.output
    );
    for name in must_run {
        assert!(
            run.output.lines().any(|l| l == format!("PASS  {name}")),
            "{}: test {name} did not run or pass:\n{}",
            run.what,
            run.output
        );
    }
}

/// Key-usage suites and auth cases that must run on every listener.
const CORE_TESTS: &[&str] = &[
    "health_ok",
    "health_empty_request_metadata",
    "metadata_no_usage_key",
    "encrypt_cdiv_sha256",
    "decrypt_tampered_tag",
    "encrypt_only_key_refuses_cdiv",
    "encrypt_only_key_refuses_decrypt",
    "decrypt_only_key_refuses_encrypt",
    "decrypt_only_key_garbage_is_invalid_ciphertext",
    "no_usage_key_refuses_encrypt",
    "no_usage_key_refuses_decrypt",
    "auth_wrong_secret",
    "auth_stale_date",
    "unknown_path_prefix",
    "get_on_encrypt_is_405",
];

/// Client-certificate cases that must run on the mTLS listener.
const MTLS_TESTS: &[&str] = &[
    "mtls_accepts_configured_client_cert",
    "mtls_rejects_no_client_cert",
    "mtls_rejects_self_signed_client_cert",
    "mtls_rejects_unknown_ca_client_cert",
    "mtls_accepts_trusted_ca_cert_made_here",
    "mtls_rejects_expired_client_cert",
    "mtls_rejects_not_yet_valid_client_cert",
    "mtls_rejects_other_subject_client_cert",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_client_passes_on_tls_and_mtls_listeners() {
    require_tools();
    let proxy = TestProxy::start_with(ProxyOptions::default()).await;
    let client = write_client_files(&proxy);
    let ca_pem = proxy.pki.ca_pem.clone();
    let tls_port = proxy.addr("tls").port();
    let mtls_port = proxy.addr("mtls").port();

    // The script blocks; run both listeners' suites on blocking threads while the proxy serves.
    let tls = {
        let ca_pem = ca_pem.clone();
        tokio::task::spawn_blocking(move || run_script(tls_port, &ca_pem, None))
    };
    let mtls = tokio::task::spawn_blocking(move || {
        let run = run_script(mtls_port, &ca_pem, Some(&client));
        drop(client);
        run
    });
    let (tls, mtls) =
        tokio::time::timeout(Duration::from_secs(600), async { tokio::join!(tls, mtls) })
            .await
            .expect("the conformance client did not finish within 10 minutes");
    let (tls, mtls) = (
        tls.expect("TLS run panicked"),
        mtls.expect("mTLS run panicked"),
    );

    println!("--- TLS listener ({}) ---\n{}", tls.what, tls.output);
    println!("--- mTLS listener ({}) ---\n{}", mtls.what, mtls.output);
    assert_passed(&tls, CORE_TESTS);
    let mtls_expected: Vec<&str> = CORE_TESTS.iter().chain(MTLS_TESTS).copied().collect();
    assert_passed(&mtls, &mtls_expected);
    proxy.stop().await;
}
