//! Runs the independent conformance clients against the real proxy, started in-process on a fresh
//! SoftHSM token. Fails, never skips, when curl/openssl/bash are missing.
//!
//! - XKS (`tests/conformance/xks-conformance.sh`: bash, curl `--aws-sigv4`, openssl) with the dev
//!   profile, on both its TLS listener and its mTLS listener (including the
//!   rejected-client-certificate cases).
//! - Google Cloud EKM (`tests/conformance/gcp-conformance.sh`: bash, curl, openssl signing its own
//!   RS256 tokens), once with the dev signer exactly as `ekm-proxy dev init` writes it (key and
//!   JWKS file) and the dev profile's issuer, audience and service account, and once with a test
//!   signer whose JWKS the proxy fetches over HTTPS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::jwks::{JwksServer, jwks_of, signer1};
use common::proxy::{
    ACCESS_KEY_ID, GCP_PREFIX, GcpJwks, GcpSection, PREFIX, ProxyOptions, SECRET, TestProxy,
    gcp_key,
};
use ekm_proxy::dev::profile;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/conformance/xks-conformance.sh"
);
const GCP_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/conformance/gcp-conformance.sh"
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
        "conformance client failed ({}; exit {:?}):\n{}",
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

/// The XKS conformance client against a proxy whose HSM generates the GCM IV itself, in each
/// vendor convention, through the fault-injecting module emulating it over SoftHSM (and, for
/// comparison, the proxy's own IV through the same module).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_client_passes_in_every_gcm_iv_mode() {
    require_tools();
    for (proxy_mode, hsm_mode) in [
        ("proxy-random", "proxy"),
        ("hsm-in-params", "hsm-in-params"),
        ("hsm-appended", "hsm-appended"),
    ] {
        let token = common::softhsm::TestToken::new();
        let mut hsm = common::fault::FaultyHsm::new(&token);
        hsm.set(serde_json::json!({ "gcm_iv": hsm_mode }));
        let options = ProxyOptions {
            hsm_keys: hsm.hsm_keys(&format!("gcm_iv = \"{proxy_mode}\"\n")),
            ..Default::default()
        };
        let proxy = TestProxy::start_on(token, options).await;
        let ca_pem = proxy.pki.ca_pem.clone();
        let port = proxy.addr("tls").port();
        let run = tokio::task::spawn_blocking(move || run_script(port, &ca_pem, None))
            .await
            .expect("conformance run panicked");
        println!(
            "--- gcm_iv = {proxy_mode} ({}) ---\n{}",
            run.what, run.output
        );
        assert_passed(&run, CORE_TESTS);
        proxy.stop().await;
        drop(hsm);
    }
}

// ---------------------------------------------------------------------------------------------
// Google Cloud EKM
// ---------------------------------------------------------------------------------------------

/// Who the Cloud EKM client signs as, and where it sends.
struct GcpClient {
    port: u16,
    ca_pem: PathBuf,
    signer: PathBuf,
    kid: String,
    audience: String,
    email: String,
    key: String,
}

/// Runs the Cloud EKM script against `https://localhost:<port><GCP_PREFIX>`.
fn run_gcp_script(c: &GcpClient) -> Run {
    let url = format!("https://localhost:{}{GCP_PREFIX}", c.port);
    let mut cmd = Command::new("bash");
    cmd.arg(GCP_SCRIPT)
        .env("GCP_URL", &url)
        .env("GCP_KEY", &c.key)
        .env("GCP_CA", &c.ca_pem)
        .env("GCP_SIGNER", &c.signer)
        .env("GCP_KID", &c.kid)
        .env("GCP_ISSUER", common::jwks::ISSUER)
        .env("GCP_AUDIENCE", &c.audience)
        .env("GCP_EMAIL", &c.email)
        .env("GCP_REASON", "CUSTOMER_INITIATED_ACCESS")
        .env("GCP_DENIED_REASON", "THIRD_PARTY_DATA_REQUEST")
        .env("GCP_HEALTH_CHECKS", "1")
        .env("GCP_CHECK_REASONS", "1")
        .env_remove("GCP_CURL_OPTS")
        .env("GCP_VERBOSE", "0");
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
    let what = format!(
        "GCP_URL={url} GCP_SIGNER={} GCP_KID={} bash {GCP_SCRIPT}",
        c.signer.display(),
        c.kid
    );
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    Run {
        what,
        code: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Every Cloud EKM case must run (and pass) with the settings above.
const GCP_TESTS: &[&str] = &[
    "round_trip",
    "round_trip_with_aad",
    "snake_case_request",
    "wrong_aad_refused",
    "tampered_blob_refused",
    "unknown_key_path",
    "get_is_refused",
    "token_missing",
    "token_forged_with_another_key",
    "token_signature_altered",
    "token_claims_altered_after_signing",
    "token_alg_none",
    "token_hs256_keyed_with_public_key",
    "token_expired",
    "token_not_yet_valid",
    "token_wrong_audience",
    "token_wrong_issuer",
    "token_unknown_kid",
    "token_missing_kid",
    "token_missing_email",
    "token_email_not_verified",
    "token_wrong_email",
    "disallowed_reason_refused",
    "health_check_round_trip",
    "health_check_cannot_unwrap_real_blob",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gcp_conformance_client_passes_with_the_dev_signer_and_an_https_jwks() {
    require_tools();

    // 1. The dev signer as `ekm-proxy dev init` writes it, its JWKS file, and the dev profile's
    //    issuer, audience, service account and key path.
    let signer_dir = tempfile::tempdir().expect("temp dir");
    let report = ekm_proxy::dev::jwt::ensure_dev_signer(signer_dir.path()).expect("dev signer");
    println!("{report}");
    let mut dev = GcpSection::new(GcpJwks::File(
        signer_dir.path().join(ekm_proxy::dev::jwt::JWKS_FILE),
    ));
    dev.issuers = vec![
        profile::GCP_ISSUER.to_owned(),
        "accounts.google.com".to_owned(),
    ];
    dev.audiences = vec![profile::GCP_AUDIENCE.to_owned()];
    dev.service_accounts = vec![profile::GCP_SERVICE_ACCOUNT.to_owned()];
    dev.keys = gcp_key(
        profile::GCP_KEY_PATH,
        profile::GCP_KEY_PATH,
        "",
        &[profile::GCP_SERVICE_ACCOUNT],
    );
    let dev_proxy = TestProxy::start_with(dev.options()).await;
    let dev_client = GcpClient {
        port: dev_proxy.addr("tls").port(),
        ca_pem: dev_proxy.pki.ca_pem.clone(),
        signer: signer_dir.path().join(ekm_proxy::dev::jwt::SIGNER_FILE),
        kid: ekm_proxy::dev::jwt::DEV_KID.to_owned(),
        audience: profile::GCP_AUDIENCE.to_owned(),
        email: profile::GCP_SERVICE_ACCOUNT.to_owned(),
        key: profile::GCP_KEY_PATH.to_owned(),
    };

    // 2. A test signer whose JWKS the proxy fetches over HTTPS (its own CA).
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    let mut https = GcpSection::with_server(&jwks);
    https.keys = gcp_key(
        "team-a/key-1",
        "dev-aes-1",
        "",
        &[common::jwks::SERVICE_ACCOUNT],
    );
    let https_proxy = TestProxy::start_with(https.options()).await;
    let https_client = GcpClient {
        port: https_proxy.addr("tls").port(),
        ca_pem: https_proxy.pki.ca_pem.clone(),
        signer: signer1().path.clone(),
        kid: signer1().kid.to_owned(),
        audience: common::jwks::AUDIENCE.to_owned(),
        email: common::jwks::SERVICE_ACCOUNT.to_owned(),
        key: "team-a/key-1".to_owned(),
    };

    let (dev_run, https_run) = tokio::time::timeout(Duration::from_secs(600), async {
        tokio::join!(
            tokio::task::spawn_blocking(move || run_gcp_script(&dev_client)),
            tokio::task::spawn_blocking(move || run_gcp_script(&https_client)),
        )
    })
    .await
    .expect("the Cloud EKM conformance client did not finish within 10 minutes");
    let (dev_run, https_run) = (
        dev_run.expect("dev-signer run panicked"),
        https_run.expect("HTTPS-JWKS run panicked"),
    );
    println!(
        "--- dev signer, JWKS file ({}) ---\n{}",
        dev_run.what, dev_run.output
    );
    println!(
        "--- test signer, JWKS over HTTPS ({}) ---\n{}",
        https_run.what, https_run.output
    );
    assert_passed(&dev_run, GCP_TESTS);
    assert_passed(&https_run, GCP_TESTS);
    assert!(
        jwks.requests() >= 1,
        "the proxy fetched the JWKS over HTTPS"
    );
    drop(signer_dir);
    dev_proxy.stop().await;
    https_proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Azure Managed HSM (EKM Proxy API 0.1-preview)
// ---------------------------------------------------------------------------------------------

const AZURE_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/conformance/azure-conformance.sh"
);
/// A wrap/unwrap key imported with a value the script knows (`AZURE_KEK_KEY`/`AZURE_KEK_HEX`):
/// the RFC 3394 §4.6 KEK, so the script checks the RFC's answer as well as openssl's.
const AZURE_KEK_LABEL: &str = "kat-kek-1";
const AZURE_KEK_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// Runs the Azure script against `https://localhost:<mtls_port><AZURE_PREFIX>` with the test
/// client certificate, and `https://localhost:<no_cert_port><AZURE_PREFIX>` (a listener that asks
/// for no certificate) as `AZURE_NO_CERT_URL`.
fn run_azure_script(mtls_port: u16, no_cert_port: u16, ca_pem: &Path, client: &ClientFiles) -> Run {
    let url = format!("https://localhost:{mtls_port}{}", profile::AZURE_PREFIX);
    let no_cert_url = format!("https://localhost:{no_cert_port}{}", profile::AZURE_PREFIX);
    let mut cmd = Command::new("bash");
    cmd.arg(AZURE_SCRIPT)
        .env("AZURE_URL", &url)
        .env("AZURE_CA", ca_pem)
        .env("AZURE_CERT", &client.cert)
        .env("AZURE_KEY", &client.key)
        .env("AZURE_AES_KEY", profile::AZURE_AES_KEY)
        .env("AZURE_RSA_KEY", profile::AZURE_RSA_KEY)
        .env("AZURE_POOL", "dev-pool")
        .env("AZURE_NO_CERT_URL", &no_cert_url)
        .env("AZURE_KEK_KEY", AZURE_KEK_LABEL)
        .env("AZURE_KEK_HEX", AZURE_KEK_HEX)
        .env_remove("AZURE_NO_WRAP_KEY")
        .env_remove("AZURE_ALGORITHMS")
        .env_remove("AZURE_CURL_OPTS")
        .env("AZURE_VERBOSE", "0");
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
    let what = format!("AZURE_URL={url} AZURE_NO_CERT_URL={no_cert_url} bash {AZURE_SCRIPT}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    Run {
        what,
        code: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Azure cases that must run (and pass) on SoftHSM 2.6.1, which has A256KW, A256KWP and
/// RSA-OAEP but not RSA-OAEP-256.
const AZURE_TESTS: &[&str] = &[
    "info_ok",
    "metadata_aes_key",
    "metadata_rsa_key",
    "metadata_unknown_key",
    "round_trip_a256kw",
    "a256kw_plaintext_lengths",
    "tampered_a256kw_refused",
    "round_trip_a256kwp",
    "a256kwp_unaligned_lengths",
    "tampered_a256kwp_refused",
    "kw_and_kwp_are_distinct",
    "a256kw_known_answer",
    "a256kwp_known_answer",
    "round_trip_rsa_oaep",
    "rsa_oaep_openssl_interop",
    "rsa_oaep_max_length",
    "tampered_rsa_oaep_refused",
    "unsupported_algorithms_refused",
    "missing_api_version",
    "other_api_version",
    "unknown_key",
    "invalid_key_id",
    "padded_base64url",
    "missing_request_context",
    "unknown_alg",
    "wrong_algorithm_for_key_type",
    "other_methods_are_405",
    "http1_and_http2",
    "oversized_body_answered",
    "mtls_client_cert_accepted",
    "mtls_no_client_cert_refused",
    "mtls_self_signed_client_cert_refused",
    "mtls_unknown_ca_client_cert_refused",
    "no_client_cert_unauthorized",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_conformance_client_passes_on_the_mtls_listener() {
    require_tools();
    // The dev profile's Azure keys and prefix, as `ekm-proxy dev init` writes them, plus a KEK
    // of known value for the known-answer tests.
    let token = common::softhsm::TestToken::new();
    for spec in profile::azure_dev_key_specs() {
        token.add_key(&spec);
    }
    let kek = ekm_proxy::hsm::KeySpec::aes256(AZURE_KEK_LABEL)
        .with_usage(["wrap", "unwrap"])
        .unwrap();
    ekm_proxy::hsm::import_aes_key(
        &token.module,
        &ekm_proxy::hsm::TokenSelector::Label(token.label.clone()),
        &token.pin(),
        &kek,
        &hex::decode(AZURE_KEK_HEX).unwrap(),
    )
    .unwrap();
    let tables = format!(
        r#"
[azure]
ekm_vendor = "SoftHSM"
ekm_product = "SoftHSMv2"

[[azure.prefix]]
name = "dev-pool"
path_prefix = "{prefix}"
allowed_subjects = ["{subject}"]
keys = ["*"]
"#,
        prefix = profile::AZURE_PREFIX,
        subject = common::proxy::CLIENT_SUBJECT,
    );
    let proxy = TestProxy::start_on(
        token,
        ProxyOptions {
            tables,
            ..ProxyOptions::default()
        },
    )
    .await;
    let client = write_client_files(&proxy);
    let ca_pem = proxy.pki.ca_pem.clone();
    let mtls_port = proxy.addr("mtls").port();
    let tls_port = proxy.addr("tls").port();
    let run = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::task::spawn_blocking(move || {
            let run = run_azure_script(mtls_port, tls_port, &ca_pem, &client);
            drop(client);
            run
        }),
    )
    .await
    .expect("the Azure conformance client did not finish within 10 minutes")
    .expect("Azure run panicked");
    println!(
        "--- Azure, mTLS listener ({}) ---\n{}",
        run.what, run.output
    );
    assert_passed(&run, AZURE_TESTS);
    assert!(
        run.output
            .lines()
            .any(|l| l == "algorithms: A256KW A256KWP RSA-OAEP (/info)"),
        "the script learned SoftHSM's algorithms from /info:\n{}",
        run.output
    );
    proxy.stop().await;
}
