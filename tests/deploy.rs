//! The monitoring assets in `deploy/monitoring/` (Prometheus rules, Grafana dashboard) may only
//! name metrics the proxy really exports: this starts the real proxy in-process, makes a few
//! requests, reads `/metrics` from the admin listener and checks every `ekm_*` name the files
//! reference against the `# TYPE` / `# HELP` lines there.
//!
//! The prometheus crate's `Registry::gather` prunes a labelled family (`IntCounterVec`,
//! `HistogramVec`, ...) that has no series yet, so e.g. `ekm_hsm_recoveries_total{level}` is
//! invisible until the first recovery. To make the check depend on *registration*, not on which
//! events happened to occur, the test first gives every labelled family of the running proxy's
//! own registry (the one `/metrics` renders) one series with the label value `deploy_test`,
//! through the public `Metrics` API. A family added to `src/metrics.rs` later must be touched in
//! [`touch_every_labelled_family`] before the rules may use it (the failure message says so).
//!
//! A second test shows the check can fail: a temporary copy of the files with a made-up metric
//! name added must be reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ekm_proxy::client::XksClient;
use ekm_proxy::client::xks;
use ekm_proxy::metrics::Metrics;
use ekm_proxy::secret::SecretString;

use common::proxy::TestProxy;

const LABEL: &str = "deploy_test";

/// `deploy/monitoring`, or `EKM_DEPLOY_MONITORING_DIR` (to try the check on other files).
fn monitoring_dir() -> PathBuf {
    std::env::var_os("EKM_DEPLOY_MONITORING_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring"),
        PathBuf::from,
    )
}

/// The `*.yaml`, `*.yml` and `*.json` files of `dir`, sorted.
fn monitoring_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    files
}

/// Every `ekm_[a-z0-9_]+` token in `text` that does not continue a longer identifier.
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("ekm_") {
        let start = i + off;
        let mut end = start + 4;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        let standalone = start == 0 || !(word(bytes[start - 1]) || bytes[start - 1] == b':');
        if standalone && end > start + 4 {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Family name → type, from the `# TYPE` and `# HELP` lines of a Prometheus text exposition.
fn exported_families(exposition: &str) -> BTreeMap<String, String> {
    let mut families = BTreeMap::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                families.insert(name.to_owned(), kind.to_owned());
            }
        } else if let Some(name) = line
            .strip_prefix("# HELP ")
            .and_then(|rest| rest.split_whitespace().next())
        {
            families.entry(name.to_owned()).or_insert_with(String::new);
        }
    }
    families
}

/// Whether `name` is a family of `families` or a histogram/summary series of one.
fn is_exported(name: &str, families: &BTreeMap<String, String>) -> bool {
    if families.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix).is_some_and(|base| {
            families.get(base).is_some_and(|kind| {
                kind == "histogram" || (kind == "summary" && *suffix != "_bucket")
            })
        })
    })
}

/// `(file, name)` for every referenced name that is not exported; panics if no file references
/// any metric at all (the check must not pass vacuously).
fn unknown_names(dir: &Path, families: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let files = monitoring_files(dir);
    assert!(
        files.len() >= 2,
        "expected the rule file and the dashboard in {}, found {files:?}",
        dir.display()
    );
    let mut unknown = Vec::new();
    let mut referenced = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let names = metric_names(&text);
        assert!(
            !names.is_empty(),
            "{} references no ekm_* metric",
            file.display()
        );
        referenced += names.len();
        for name in names {
            if !is_exported(&name, families) {
                let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
                unknown.push((file_name, name));
            }
        }
    }
    assert!(referenced > 0);
    unknown
}

/// One series in every labelled family, so `gather` renders all of them (see the module doc).
fn touch_every_labelled_family(m: &Metrics) {
    m.requests.observe(LABEL, LABEL, LABEL, 0.0);
    m.requests.auth_failure(LABEL, LABEL);
    m.requests.quota_admitted(LABEL, LABEL);
    m.requests.quota_throttled(LABEL, LABEL);
    m.requests.connection_closed(LABEL);
    m.hsm.op(LABEL).observe(0.0);
    m.hsm.op_error(LABEL, LABEL);
    m.hsm.recovered(LABEL);
    m.cache.hit(LABEL);
    m.cache.miss(LABEL);
    m.jwt.jwks_fetch(LABEL, LABEL);
    m.jwt.jwks_keys(LABEL, 0);
    m.jwt.jwks_refresh_rate_limited(LABEL);
    m.fleet.certificate_expiry(LABEL, 0);
}

/// Real traffic on the XKS front: a health check (HSM round trip) and a badly signed request.
async fn some_traffic(p: &TestProxy) {
    let mut c = p.tls_client().await;
    let r = c.post("health", xks::health_body()).await.expect("health");
    assert_eq!(r.status, 200, "health: {:?}", r.body);

    let mut cfg = p.client_config("tls");
    cfg.secret = SecretString::from("wrongSecretForTheDeployTest0123456789abcdefgh");
    let mut bad = XksClient::connect(Arc::new(cfg)).await.expect("connect");
    let r = bad.post("health", xks::health_body()).await.expect("bad");
    assert_eq!(r.status, 401, "badly signed health: {:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_assets_use_only_exported_metrics() {
    let p = TestProxy::start().await;
    some_traffic(&p).await;
    let (status, before) = p.admin_get("/metrics").await;
    assert_eq!(status, 200);
    // The real request path produced these on its own.
    for series in [
        "ekm_requests_total{front=\"xks\",op=\"health\",outcome=\"ok\"}",
        "ekm_request_duration_seconds_bucket{front=\"xks\",op=\"health\"",
        "ekm_auth_failures_total{front=\"xks\"",
        "ekm_hsm_sessions ",
        "ekm_hsm_token_down 0",
    ] {
        assert!(
            before.contains(series),
            "no {series} in /metrics:\n{before}"
        );
    }

    touch_every_labelled_family(p.running().metrics());
    let (status, text) = p.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let families = exported_families(&text);
    assert!(
        families.len() >= 20,
        "too few families in /metrics: {families:?}"
    );

    let unknown = unknown_names(&monitoring_dir(), &families);
    assert!(
        unknown.is_empty(),
        "deploy/monitoring references metrics /metrics does not export: {unknown:?}\n\
         exported: {:?}\n(a new labelled family in src/metrics.rs must also be touched in \
         touch_every_labelled_family)",
        families.keys().collect::<Vec<_>>()
    );
    p.stop().await;
}

#[test]
fn the_check_reports_an_unknown_metric() {
    let metrics = Metrics::standalone();
    touch_every_labelled_family(&metrics);
    let families = exported_families(&String::from_utf8(metrics.render()).unwrap());

    // The real files pass against the standalone registry too.
    assert_eq!(unknown_names(&monitoring_dir(), &families), Vec::new());

    // A copy with one made-up name added fails, naming the file and the metric.
    let tmp = tempfile::tempdir().unwrap();
    for file in monitoring_files(&monitoring_dir()) {
        std::fs::copy(&file, tmp.path().join(file.file_name().unwrap())).unwrap();
    }
    let rules = tmp.path().join("prometheus-rules.yaml");
    let mut text = std::fs::read_to_string(&rules).unwrap();
    text.push_str("# expr: rate(ekm_bogus_requests_total[5m])\n");
    std::fs::write(&rules, text).unwrap();
    assert_eq!(
        unknown_names(tmp.path(), &families),
        vec![(
            "prometheus-rules.yaml".to_owned(),
            "ekm_bogus_requests_total".to_owned()
        )]
    );

    // Histogram suffixes count only on histograms.
    assert!(is_exported(
        "ekm_request_duration_seconds_bucket",
        &families
    ));
    assert!(is_exported("ekm_request_duration_seconds_count", &families));
    assert!(!is_exported("ekm_requests_total_bucket", &families));
    assert!(!is_exported("ekm_requests", &families));
}
