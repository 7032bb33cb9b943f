//! The benchmark as a library, against the real server in-process: every XKS scenario is driven
//! over TLS with signed requests, the raw HSM lane runs in the same process, and the report says
//! what it measured. Functional only: no timing assertions (speed is the benchmark's output).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::proxy::{ACCESS_KEY_ID, PREFIX, SECRET, TestProxy};
use ekm_proxy::bench::{self, options::RawLane};

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
