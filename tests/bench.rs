//! The benchmark as a library, against the real server in-process: every XKS scenario is driven
//! over TLS with signed requests, the Azure scenarios over mutual TLS on the mTLS listener, the raw
//! HSM lane runs in the same process, and the report says what it measured. Functional only: no
//! timing assertions (speed is the benchmark's output).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::proxy::{ACCESS_KEY_ID, CLIENT_SUBJECT, PREFIX, ProxyOptions, SECRET, TestProxy};
use common::softhsm::TestToken;
use ekm_proxy::bench::{self, Scenario, options::RawLane};
use ekm_proxy::dev::profile::{AZURE_AES_KEY, AZURE_PREFIX, AZURE_RSA_KEY, azure_dev_key_specs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_the_real_server() {
    let proxy = TestProxy::start().await;
    let addr = proxy.addr("tls");
    let url = format!("https://localhost:{}{PREFIX}", addr.port());
    let ca = proxy.pki.ca_pem.display().to_string();
    let admin = proxy.running().admin_addr().unwrap().to_string();
    let mut opts = bench::options::BenchOptions::from_cli([
        "--url",
        &url,
        "--ca",
        &ca,
        "--access-key-id",
        ACCESS_KEY_ID,
        "--secret",
        SECRET,
        "--scenario",
        "encrypt,decrypt,decrypt-bad-tag,metadata,health",
        "--concurrency",
        "4",
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
        "--admin",
        &admin,
    ])
    .unwrap();
    opts.raw = RawLane::Settings(Box::new(proxy.token.settings()));
    let reports = bench::run(opts).await.unwrap();
    assert_eq!(reports.len(), 5, "one report per scenario");
    for r in &reports {
        let name = format!("{:?}", r.scenario);
        assert!(r.error.is_none(), "{name}: {:?}", r.error);
        let lane = r
            .proxy
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no proxy lane"));
        assert!(lane.requests > 0, "{name}: no answers");
        assert_eq!(
            lane.error_total, 0,
            "{name}: unexpected answers {:?}",
            lane.errors
        );
        let crypto = matches!(name.as_str(), "Encrypt" | "Decrypt" | "DecryptBadTag");
        assert_eq!(
            r.raw.is_some(),
            crypto,
            "{name}: raw lane only for HSM operations"
        );
        if crypto {
            assert!(r.ratio_proxy_raw.is_some(), "{name}: ratio");
        }
        if name == "DecryptBadTag" {
            assert_eq!(
                r.server_session_reopens,
                Some(0),
                "bad tags must not cost sessions"
            );
        }
    }
    let json = reports[0].to_json();
    assert!(json.contains("\"rps\""), "{json}");
}

/// A proxy with the Azure front on its mTLS listener (`/azure`, any key, the test client's
/// subject), on a token that also holds the Azure dev keys; and the test client certificate as
/// files, for `--client-cert`/`--client-key`.
async fn azure_proxy() -> (TestProxy, tempfile::TempDir) {
    let token = TestToken::new();
    for spec in azure_dev_key_specs() {
        token.add_key(&spec);
    }
    let tables = format!(
        r#"
[azure]
ekm_vendor = "SoftHSM"
ekm_product = "SoftHSMv2"

[[azure.prefix]]
name = "bench-pool"
path_prefix = "{AZURE_PREFIX}"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["*"]
"#
    );
    let proxy = TestProxy::start_on(
        token,
        ProxyOptions {
            tables,
            ..ProxyOptions::default()
        },
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("client.pem"), &proxy.pki.client.cert_pem).unwrap();
    std::fs::write(
        files.path().join("client-key.pem"),
        proxy.pki.client.key_pem.as_bytes(),
    )
    .unwrap();
    (proxy, files)
}

/// Options for a short run against `proxy`: `--url` on its TLS listener, `--azure-url` as given,
/// the test CA and client certificate, and `extra`.
fn azure_options(
    proxy: &TestProxy,
    files: &tempfile::TempDir,
    azure_url: &str,
    extra: &[&str],
) -> bench::BenchOptions {
    let url = format!("https://localhost:{}{PREFIX}", proxy.addr("tls").port());
    let ca = proxy.pki.ca_pem.display().to_string();
    let cert = files.path().join("client.pem").display().to_string();
    let key = files.path().join("client-key.pem").display().to_string();
    let mut args = vec![
        "--url",
        &url,
        "--azure-url",
        azure_url,
        "--ca",
        &ca,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
        "--access-key-id",
        ACCESS_KEY_ID,
        "--secret",
        SECRET,
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
    ];
    args.extend_from_slice(extra);
    let mut opts = bench::BenchOptions::from_cli(args).unwrap();
    opts.raw = RawLane::Settings(Box::new(proxy.token.settings()));
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_scenarios_wrap_and_unwrap_over_mutual_tls() {
    let (proxy, files) = azure_proxy().await;
    let azure_url = format!(
        "https://localhost:{}{AZURE_PREFIX}",
        proxy.addr("mtls").port()
    );
    // The dev defaults (AES key-encryption key, A256KW), then RSA-OAEP with the RSA key: both
    // lanes must answer every request as expected.
    let runs: [(&[&str], &str); 2] = [
        (&["--concurrency", "1,4"], "A256KW"),
        (
            &[
                "--concurrency",
                "2",
                "--azure-key",
                AZURE_RSA_KEY,
                "--azure-alg",
                "RSA-OAEP",
            ],
            "RSA-OAEP",
        ),
    ];
    for (extra, alg) in runs {
        let mut args = vec!["--scenario", "azure-wrap,azure-unwrap"];
        args.extend_from_slice(extra);
        let opts = azure_options(&proxy, &files, &azure_url, &args);
        assert_eq!(
            opts.azure.key,
            if alg == "A256KW" {
                AZURE_AES_KEY
            } else {
                AZURE_RSA_KEY
            }
        );
        let concurrency = opts.concurrency.len();
        let reports = bench::run(opts).await.unwrap();
        assert_eq!(reports.len(), 2 * concurrency, "{alg}: one report per run");
        for r in &reports {
            let name = format!("{alg} {} c={}", r.scenario.as_str(), r.concurrency);
            assert!(r.scenario.is_azure(), "{name}");
            assert!(r.error.is_none(), "{name}: {:?}", r.error);
            assert_eq!(r.alg, Some(alg), "{name}");
            assert_eq!((r.plaintext_size, r.aad_size), (32, 0), "{name}");
            let lane = r
                .proxy
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no proxy lane"));
            assert!(lane.requests > 0, "{name}: no answers");
            assert_eq!(
                lane.error_total, 0,
                "{name}: unexpected answers {:?}; first: {:?}",
                lane.errors, lane.first_error
            );
            let raw = r
                .raw
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no raw lane"));
            assert!(raw.lane.requests > 0, "{name}: no raw answers");
            assert_eq!(
                raw.lane.error_total, 0,
                "{name}: raw errors {:?}",
                raw.lane.errors
            );
            assert!(r.ratio_proxy_raw.is_some(), "{name}: ratio");
        }
        let json: serde_json::Value = serde_json::from_str(&reports[0].to_json()).unwrap();
        assert_eq!(json["scenario"], "azure-wrap");
        assert_eq!(json["alg"], alg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_azure_listener_is_one_clear_line_and_the_run_goes_on() {
    let (proxy, files) = azure_proxy().await;
    // Nothing listens on port 1: the Azure row says where it tried and which option to change;
    // the XKS scenario is measured as usual.
    let opts = azure_options(
        &proxy,
        &files,
        "https://localhost:1/azure",
        &["--scenario", "health,azure-wrap", "--concurrency", "1"],
    );
    assert!(Scenario::ALL.contains(&Scenario::AzureWrap));
    let reports = bench::run(opts).await.unwrap();
    assert_eq!(reports.len(), 2);
    let (health, azure) = (&reports[0], &reports[1]);
    assert!(health.error.is_none(), "{:?}", health.error);
    assert!(health.proxy.as_ref().is_some_and(|p| p.requests > 0));
    let error = azure.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("https://localhost:1/azure (--azure-url)") && error.contains("connect"),
        "{error}"
    );
    assert!(azure.proxy.is_none());
}
