//! Real HSMs fail and differ: the proxy under injected faults, end to end.
//!
//! Every test puts the fault-injecting PKCS#11 module (`crates/p11-fault`, its own private copy)
//! between the real server (in-process, real TLS, real config parser) and a fresh SoftHSMv2 token,
//! and drives both front ends over the wire while the module removes the token, fails calls with
//! chosen `CKR_*` codes, hangs calls, adds latency, or emulates a vendor's GCM IV convention.
//!
//! What must hold: each fault class gets the protocol's own answer (retryable while the HSM is
//! away, never "key not found"); the proxy recovers by itself without a restart, with no session
//! leaked on the token; a hung call answers at the deadline and costs the pool no worker for good;
//! an error storm does not turn into a reopen storm; XKS and Cloud EKM round-trip in every IV mode.
//!
//! Nothing asserts on elapsed time: where recovery takes time the test polls with a generous bound.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ekm_proxy::client::xks::{self, EncryptOutput};
use ekm_proxy::client::{Response, XksClient};
use ekm_proxy::hsm::bootstrap::KeySpec;
use serde_json::{Value, json};

use common::cloud_ekm::GcpClient;
use common::fault::FaultyHsm;
use common::jwks::{JwksServer, jwks_of, signer1};
use common::proxy::{GcpSection, TestProxy};
use common::softhsm::TestToken;

const KEY: &str = "dev-aes-1";
/// Upper bound of every "wait until it shows" loop; recovery backoff in these tests is ≤ 500 ms.
const POLL_LIMIT: Duration = Duration::from_secs(30);

/// `[hsm]` lines common to the fault tests: production defaults for key handling (no session
/// copies), short recovery backoff so tests are quick.
const HSM_BASE: &str = "workers = 2
session_key_copies = false
op_timeout_ms = 2000
recovery_backoff_initial_ms = 50
recovery_backoff_max_ms = 500
negative_cache_ms = 200
";

/// A proxy on a fresh token behind its own fault module, with Cloud EKM on (key path `k1` on
/// `dev-aes-1`).
struct Env {
    hsm: FaultyHsm,
    proxy: TestProxy,
    _jwks: JwksServer,
    xks: XksClient,
    gcp: GcpClient,
}

impl Env {
    async fn start(hsm_extra: &str) -> Self {
        Self::start_with(hsm_extra, |_| {}).await
    }

    /// `hsm_extra` lines override [`HSM_BASE`]; `before` sets the module up before the proxy
    /// starts (an IV convention, say).
    async fn start_with(hsm_extra: &str, before: impl FnOnce(&mut FaultyHsm)) -> Self {
        Self::start_full(hsm_extra, "", before).await
    }

    /// [`Env::start_with`], plus `server_keys` lines in `[server]`.
    async fn start_full(
        hsm_extra: &str,
        server_keys: &str,
        before: impl FnOnce(&mut FaultyHsm),
    ) -> Self {
        let token = TestToken::new();
        let mut hsm = FaultyHsm::new(&token);
        before(&mut hsm);
        let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
        let mut options = GcpSection::with_server(&jwks).options();
        // Later lines win in our merge: drop base lines that `hsm_extra` sets.
        let overridden = |line: &str| {
            let key = line.split('=').next().unwrap_or("").trim();
            hsm_extra
                .lines()
                .any(|l| l.split('=').next().unwrap_or("").trim() == key)
        };
        let base: String = HSM_BASE
            .lines()
            .filter(|l| !overridden(l))
            .map(|l| format!("{l}\n"))
            .collect();
        options.hsm_keys = hsm.hsm_keys(&format!("{base}{hsm_extra}"));
        options.server_keys = server_keys.to_owned();
        let proxy = TestProxy::start_on(token, options).await;
        let xks = proxy.tls_client().await;
        let gcp = GcpClient::new(&proxy);
        Self {
            hsm,
            proxy,
            _jwks: jwks,
            xks,
            gcp,
        }
    }

    async fn encrypt(&mut self, plaintext: &[u8]) -> Response {
        let body = xks::encrypt_body(xks::KMS_KEY_ARN, plaintext, None, false);
        self.xks
            .post(&format!("keys/{KEY}/encrypt"), body)
            .await
            .expect("XKS encrypt: transport")
    }

    async fn encrypt_ok(&mut self, plaintext: &[u8]) -> EncryptOutput {
        let r = self.encrypt(plaintext).await;
        assert_eq!(r.status, 200, "encrypt: {}", body_text(&r));
        xks::parse_encrypt_response(&r.body).expect("encrypt response")
    }

    async fn decrypt_ok(&mut self, out: &EncryptOutput) -> Vec<u8> {
        let body = xks::decrypt_body_for(xks::KMS_KEY_ARN, out, None);
        let r = self
            .xks
            .post(&format!("keys/{KEY}/decrypt"), body)
            .await
            .expect("XKS decrypt: transport");
        assert_eq!(r.status, 200, "decrypt: {}", body_text(&r));
        xks::parse_decrypt_response(&r.body).expect("decrypt response")
    }

    async fn metadata(&mut self, key: &str) -> Response {
        self.xks
            .post(&format!("keys/{key}/metadata"), xks::metadata_body())
            .await
            .expect("XKS metadata: transport")
    }

    async fn wrap(&mut self, plaintext: &[u8]) -> Response {
        self.gcp.wrap(plaintext).await
    }

    async fn metric(&self, series: &str) -> f64 {
        self.proxy.metric(series).await
    }

    /// `/readyz`: (HTTP status, body).
    async fn readyz(&self) -> (u16, Value) {
        let (status, body) = self.proxy.admin_get("/readyz").await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// Wait until XKS encrypt and Cloud EKM wrap answer 200 again and `/readyz` says ready with
    /// every worker session up; then check that the token holds exactly the workers' sessions.
    async fn await_recovered(&mut self, workers: u64) {
        // No session leaked either: the sessions open on the token through the module end up
        // exactly the workers' (the supervisor's probe sessions are closed).
        let started = Instant::now();
        loop {
            let x = self.encrypt(b"probe").await.status;
            let g = self.wrap(b"probe").await.status;
            let (ready, body) = self.readyz().await;
            let gauge = self.metric("ekm_hsm_sessions").await;
            let (open, _) = self.hsm.sessions();
            if x == 200
                && g == 200
                && ready == 200
                && body["sessionsUp"] == json!(workers)
                && gauge == workers as f64
                && open == workers
            {
                break;
            }
            assert!(
                started.elapsed() < POLL_LIMIT,
                "not recovered: XKS {x}, Cloud EKM {g}, readyz {ready} {body}, sessions gauge \
                 {gauge}, sessions open on the token {open} (want {workers})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn body_text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn gcp_status(r: &Response) -> String {
    r.json()
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("<no google.rpc status in {}>", body_text(r)))
}

async fn poll_until<T, F, Fut>(what: &str, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let started = Instant::now();
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        assert!(
            started.elapsed() < POLL_LIMIT,
            "{what}: still {value:?} after {POLL_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// XKS answers of a lost HSM: InternalException 500 or DependencyTimeoutException 503, the two
/// the spec makes retryable. Never KeyNotFoundException.
#[track_caller]
fn assert_xks_retryable(r: &Response, ctx: &str) {
    let name = r.error_name().unwrap_or_default();
    assert!(
        (r.status == 500 && name == "InternalException")
            || (r.status == 503 && name == "DependencyTimeoutException"),
        "{ctx}: expected a retryable XKS error, got {} {}",
        r.status,
        body_text(r)
    );
}

/// Cloud EKM answer of a lost HSM: 503 UNAVAILABLE (or 504 DEADLINE_EXCEEDED), never NOT_FOUND.
#[track_caller]
fn assert_gcp_retryable(r: &Response, ctx: &str) {
    let status = gcp_status(r);
    assert!(
        (r.status == 503 && status == "UNAVAILABLE")
            || (r.status == 504 && status == "DEADLINE_EXCEEDED"),
        "{ctx}: expected a retryable Cloud EKM error, got {} {}",
        r.status,
        body_text(r)
    );
}

// ---------------------------------------------------------------------------------------------
// Vendor IV conventions
// ---------------------------------------------------------------------------------------------

/// XKS encrypt/decrypt and Cloud EKM wrap/unwrap round-trip with the proxy in `proxy_mode` and the
/// module emulating `hsm_mode`; every IV is 12 bytes, non-zero and fresh.
async fn round_trips_in_iv_mode(proxy_mode: &str, hsm_mode: &str) {
    let mut env = Env::start_with(&format!("gcm_iv = \"{proxy_mode}\"\n"), |hsm| {
        hsm.set(json!({ "gcm_iv": hsm_mode }))
    })
    .await;
    let a = env.encrypt_ok(b"iv convention A").await;
    let b = env.encrypt_ok(b"iv convention B").await;
    for out in [&a, &b] {
        assert_eq!(out.iv.len(), 12, "{proxy_mode}: 96-bit IV");
        assert!(
            out.iv.iter().any(|x| *x != 0),
            "{proxy_mode}: IV is not zero"
        );
        assert_eq!(out.tag.len(), 16);
    }
    assert_ne!(a.iv, b.iv, "{proxy_mode}: a fresh IV per encryption");
    assert_eq!(env.decrypt_ok(&a).await, b"iv convention A");
    assert_eq!(env.decrypt_ok(&b).await, b"iv convention B");

    let r = env.wrap(b"wrapped under an HSM IV").await;
    assert_eq!(r.status, 200, "{proxy_mode}: wrap: {}", body_text(&r));
    let blob = r.json().unwrap()["wrappedBlob"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = env.gcp.unwrap(&blob).await;
    assert_eq!(r.status, 200, "{proxy_mode}: unwrap: {}", body_text(&r));
    let pt = B64
        .decode(r.json().unwrap()["plaintext"].as_str().unwrap())
        .unwrap();
    assert_eq!(pt, b"wrapped under an HSM IV");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_with_the_proxys_own_iv() {
    round_trips_in_iv_mode("proxy-random", "proxy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_with_an_hsm_iv_in_the_parameters_cloudhsm_nshield() {
    round_trips_in_iv_mode("hsm-in-params", "hsm-in-params").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_with_an_hsm_iv_after_the_tag_luna() {
    round_trips_in_iv_mode("hsm-appended", "hsm-appended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_iv_convention_fails_loudly_and_never_seals_under_a_zero_iv() {
    // The proxy expects the HSM to write the IV, but this HSM does not: the zero IV that went in
    // comes back, and the proxy refuses to return anything sealed under it.
    let mut env = Env::start("gcm_iv = \"hsm-in-params\"\n").await;
    let r = env.encrypt(b"must not be sealed").await;
    assert_eq!(r.status, 500, "{}", body_text(&r));
    assert_eq!(r.error_name().as_deref(), Some("InternalException"));
    let r = env.wrap(b"must not be sealed").await;
    assert_eq!(r.status, 500, "{}", body_text(&r));
    assert_eq!(gcp_status(&r), "INTERNAL");

    // The proxy makes its own IV, but this HSM insists on a zero IV (CloudHSM): refused by the
    // HSM, and said so.
    let mut env = Env::start_with("gcm_iv = \"proxy-random\"\n", |hsm| {
        hsm.set(json!({ "gcm_iv": "hsm-in-params" }))
    })
    .await;
    let r = env.encrypt(b"refused").await;
    assert_ne!(r.status, 200, "{}", body_text(&r));
    assert_ne!(r.error_name().as_deref(), Some("KeyNotFoundException"));
}

// ---------------------------------------------------------------------------------------------
// Token loss and recovery
// ---------------------------------------------------------------------------------------------

/// The token goes away (as after an HSM reboot or a fail-over), then comes back: retryable errors
/// meanwhile on both fronts, health and readiness follow, and everything comes back by itself with
/// the keys reloaded and no session leaked.
async fn removal_then_recovery(after_restore: &str, level: &str) {
    // A 1 s recovery backoff: the restore below lands between two attempts (see there).
    let mut env =
        Env::start("recovery_backoff_initial_ms = 1000\nrecovery_backoff_max_ms = 2000\n").await;
    let before = env.encrypt_ok(b"sealed before the outage").await;
    let r = env.wrap(b"x").await;
    assert_eq!(r.status, 200, "{}", body_text(&r));

    env.hsm
        .set(json!({ "removed": true, "after_restore": after_restore }));
    for i in 0..20 {
        let r = env.encrypt(b"during the outage").await;
        assert_xks_retryable(&r, &format!("XKS encrypt #{i} during the outage"));
        let r = env.metadata(KEY).await;
        // Metadata is served from the key cache when it can be; when it cannot, the answer is
        // retryable too, never "not found".
        assert_ne!(
            r.status,
            404,
            "metadata during the outage: {}",
            body_text(&r)
        );
        let r = env.wrap(b"during the outage").await;
        assert_gcp_retryable(&r, &format!("Cloud EKM wrap #{i} during the outage"));
    }
    let (status, body) = poll_until(
        "readiness goes down",
        || env.readyz(),
        |(status, _)| *status == 503,
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "UNAVAILABLE", "{body}");
    let r = env
        .xks
        .post("health", xks::health_body())
        .await
        .expect("XKS health");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json().unwrap()["ekmFleetDetails"][0]["healthStatus"],
        "UNAVAILABLE"
    );
    assert_eq!(env.metric("ekm_hsm_token_down").await, 1.0);

    // Restore just after a failed recovery attempt, so the next attempt (a backoff later) meets
    // the restored token at its first rung and counts the level this restore needs. Restoring
    // at a random moment may land inside an attempt, between its failed slot probe and its
    // module re-initialisation, which then recovers at level "module" whatever the token needed.
    let failures = env.metric("ekm_hsm_recovery_failures_total").await;
    poll_until(
        "a recovery attempt fails during the outage",
        || env.metric("ekm_hsm_recovery_failures_total"),
        |f| *f > failures,
    )
    .await;
    env.hsm
        .set(json!({ "removed": false, "after_restore": after_restore }));
    env.await_recovered(2).await;
    assert_eq!(
        env.decrypt_ok(&before).await,
        b"sealed before the outage",
        "the key works again after the recovery"
    );
    let series = format!("ekm_hsm_recoveries_total{{level=\"{level}\"}}");
    if env.metric(&series).await < 1.0 {
        let (_, all) = env.proxy.admin_get("/metrics").await;
        let recoveries: Vec<&str> = all
            .lines()
            .filter(|l| l.starts_with("ekm_hsm_recover"))
            .collect();
        panic!("{series} not counted; {recoveries:#?}");
    }
    assert_eq!(env.metric("ekm_hsm_token_down").await, 0.0);
    assert!(env.metric("ekm_hsm_fail_fast_total").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_token_is_retryable_everywhere_and_recovers_without_a_restart() {
    removal_then_recovery("sessions_invalid", "slot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_needs_re_initialising_is_re_initialised() {
    removal_then_recovery("reinit_required", "module").await;
}

/// One injected fault: on which call, which code, and the answers expected on each front.
struct Case {
    function: &'static str,
    ckr: &'static str,
    xks: (u16, &'static str),
    gcp: (u16, &'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_class_gets_its_wire_answer_and_the_proxy_recovers() {
    let cases = [
        // The token or device is gone: retryable, and the supervisor recovers it.
        Case {
            function: "C_Encrypt",
            ckr: "CKR_DEVICE_ERROR",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        Case {
            function: "C_Encrypt",
            ckr: "CKR_DEVICE_REMOVED",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        Case {
            function: "C_Encrypt",
            ckr: "CKR_TOKEN_NOT_PRESENT",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        Case {
            function: "C_Encrypt",
            ckr: "CKR_CRYPTOKI_NOT_INITIALIZED",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        // A lost session that stays lost after a reopen, and a general error that survives one.
        Case {
            function: "C_Encrypt",
            ckr: "CKR_SESSION_HANDLE_INVALID",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        Case {
            function: "C_Encrypt",
            ckr: "CKR_GENERAL_ERROR",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        // The device is alive but out of resources: retryable, nothing to recover.
        Case {
            function: "C_Encrypt",
            ckr: "CKR_DEVICE_MEMORY",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        // The key's handle keeps being refused although the key is there: retryable.
        Case {
            function: "C_EncryptInit",
            ckr: "CKR_KEY_HANDLE_INVALID",
            xks: (500, "InternalException"),
            gcp: (503, "UNAVAILABLE"),
        },
        // The HSM's verdict on the request itself.
        Case {
            function: "C_EncryptInit",
            ckr: "CKR_KEY_FUNCTION_NOT_PERMITTED",
            xks: (400, "InvalidKeyUsageException"),
            gcp: (400, "FAILED_PRECONDITION"),
        },
        Case {
            function: "C_Encrypt",
            ckr: "CKR_DATA_LEN_RANGE",
            xks: (501, "UnsupportedOperationException"),
            gcp: (501, "UNIMPLEMENTED"),
        },
        // Something the proxy cannot explain: internal, not retried forever.
        Case {
            function: "C_Encrypt",
            ckr: "CKR_ARGUMENTS_BAD",
            xks: (500, "InternalException"),
            gcp: (500, "INTERNAL"),
        },
    ];
    let mut env = Env::start("").await;
    let sealed = env.encrypt_ok(b"survives every fault").await;
    for case in &cases {
        let ctx = format!("{} on {}", case.ckr, case.function);
        eprintln!("fault case: {ctx}");
        env.hsm.set(json!({
            "errors": [{ "functions": [case.function], "ckr": case.ckr }]
        }));
        let r = env.encrypt(b"under a fault").await;
        assert_eq!(
            (r.status, r.error_name().unwrap_or_default().as_str()),
            case.xks,
            "XKS, {ctx}: {}",
            body_text(&r)
        );
        let r = env.wrap(b"under a fault").await;
        assert_eq!(
            (r.status, gcp_status(&r).as_str()),
            case.gcp,
            "Cloud EKM, {ctx}: {}",
            body_text(&r)
        );
        env.hsm.clear();
        env.await_recovered(2).await;
        assert_eq!(
            env.decrypt_ok(&sealed).await,
            b"survives every fault",
            "{ctx}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_that_clears_on_retry_is_invisible_to_the_caller() {
    // One lost session, one stale handle, one leftover operation: the worker's own rungs
    // (reopen, re-lookup, terminate) absorb each, and the caller sees a normal answer.
    let mut env = Env::start("").await;
    for (function, ckr) in [
        ("C_Encrypt", "CKR_SESSION_HANDLE_INVALID"),
        ("C_EncryptInit", "CKR_KEY_HANDLE_INVALID"),
        ("C_EncryptInit", "CKR_OPERATION_ACTIVE"),
        ("C_Encrypt", "CKR_USER_NOT_LOGGED_IN"),
    ] {
        env.hsm.set(json!({
            "errors": [{ "functions": [function], "ckr": ckr, "count": 1 }]
        }));
        let out = env.encrypt_ok(b"retried").await;
        assert_eq!(
            env.decrypt_ok(&out).await,
            b"retried",
            "{ckr} on {function}"
        );
    }
    assert_eq!(env.metric("ekm_hsm_token_down").await, 0.0);
    assert_eq!(
        env.metric("ekm_hsm_recovery_failures_total").await,
        0.0,
        "no token recovery was needed"
    );
    env.hsm.clear();
    env.await_recovered(2).await;
}

// ---------------------------------------------------------------------------------------------
// Hung calls, error storms, slow HSMs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_answers_at_the_deadline_and_costs_no_worker_for_good() {
    // One worker, so serving again proves it was replaced: the hung call lasts far longer than
    // the test waits.
    let mut env = Env::start("workers = 1\nop_timeout_ms = 1000\nhung_call_ms = 1500\n").await;
    env.encrypt_ok(b"warm").await;
    env.hsm.set(json!({
        "hang": { "functions": ["C_Encrypt"], "ms": 120000, "count": 1 }
    }));
    let r = env.encrypt(b"hangs").await;
    assert_eq!(r.status, 503, "{}", body_text(&r));
    assert_eq!(
        r.error_name().as_deref(),
        Some("DependencyTimeoutException")
    );
    // Served again by a fresh worker while the old one is still stuck.
    let started = Instant::now();
    let out = loop {
        let r = env.encrypt(b"after the hang").await;
        if r.status == 200 {
            break xks::parse_encrypt_response(&r.body).unwrap();
        }
        assert!(
            started.elapsed() < POLL_LIMIT,
            "no replacement worker: {} {}",
            r.status,
            body_text(&r)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(env.decrypt_ok(&out).await, b"after the hang");
    assert_eq!(env.metric("ekm_hsm_workers_replaced_total").await, 1.0);
    assert_eq!(
        env.metric("ekm_hsm_sessions").await,
        1.0,
        "one live worker session"
    );
    let r = env.wrap(b"cloud ekm too").await;
    assert_eq!(r.status, 200, "{}", body_text(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_storm_does_not_become_a_reopen_storm() {
    let mut env =
        Env::start("recovery_backoff_initial_ms = 100\nrecovery_backoff_max_ms = 800\n").await;
    env.encrypt_ok(b"warm").await;
    let reopens0 = env.metric("ekm_hsm_session_reopens_total").await;
    let (_, opened0) = env.hsm.sessions();
    env.hsm.set(json!({
        "errors": [{ "functions": ["*"], "ckr": "CKR_DEVICE_ERROR" }]
    }));
    let started = Instant::now();
    let mut sent = 0u32;
    while started.elapsed() < Duration::from_secs(3) {
        let r = env.encrypt(b"storm").await;
        assert_xks_retryable(&r, "XKS encrypt during the storm");
        sent += 1;
    }
    env.hsm.clear();
    env.await_recovered(2).await;
    let attempts = env.metric("ekm_hsm_recovery_failures_total").await;
    let reopens = env.metric("ekm_hsm_session_reopens_total").await - reopens0;
    assert!(sent >= 100, "the storm was real: {sent} requests");
    // Backoff from 100 ms doubling to 800 ms: a handful of probes in 3 s, whatever the load.
    assert!(
        (1.0..=12.0).contains(&attempts),
        "{attempts} failed recovery attempts for {sent} failed requests"
    );
    assert!(
        reopens <= 8.0,
        "{reopens} session reopens for {sent} failed requests"
    );
    // Counted at the HSM: every C_OpenSession that reached the token, probes included.
    let (_, opened) = env.hsm.sessions();
    assert!(
        opened - opened0 <= 12,
        "{} sessions opened on the token for {sent} failed requests",
        opened - opened0
    );
    assert!(env.metric("ekm_hsm_fail_fast_total").await >= f64::from(sent) / 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_latency_is_survived() {
    let mut env = Env::start("").await;
    env.hsm
        .set(json!({ "latency_us": { "C_Encrypt": 2000, "C_Decrypt": 2000 } }));
    let out = env.encrypt_ok(b"slow but sure").await;
    assert_eq!(env.decrypt_ok(&out).await, b"slow but sure");
}

/// A connection with a request in flight is busy, not idle: a request slower than
/// `server.idle_timeout_secs` is answered, not cut off by the idle watchdog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_slower_than_the_idle_timeout_is_answered() {
    let mut env =
        Env::start_full("op_timeout_ms = 6000\n", "idle_timeout_secs = 1\n", |_| {}).await;
    env.hsm
        .set(json!({ "latency_us": { "C_Encrypt": 3_000_000 } }));
    let out = env.encrypt_ok(b"slower than the idle timeout").await;
    env.hsm.clear();
    assert_eq!(env.decrypt_ok(&out).await, b"slower than the idle timeout");
}

/// A request still waiting for the HSM when `server.request_timeout_ms` passes gets each
/// protocol's deadline answer then (XKS 503 DependencyTimeoutException, Cloud EKM 504
/// DEADLINE_EXCEEDED), naming the request deadline rather than the HSM's, and the proxy serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_deadline_is_answered_in_each_protocol() {
    let mut env = Env::start_full(
        "op_timeout_ms = 6000\n",
        "request_timeout_ms = 1000\n",
        |_| {},
    )
    .await;
    env.hsm
        .set(json!({ "latency_us": { "C_Encrypt": 2_000_000 } }));
    let r = env.encrypt(b"too late").await;
    assert_eq!(r.status, 503, "XKS: {}", body_text(&r));
    assert_eq!(
        r.error_name().as_deref(),
        Some("DependencyTimeoutException"),
        "XKS: {}",
        body_text(&r)
    );
    assert!(
        body_text(&r).contains("request deadline exceeded"),
        "XKS: {}",
        body_text(&r)
    );
    let r = env.wrap(b"too late").await;
    assert_eq!(r.status, 504, "Cloud EKM: {}", body_text(&r));
    assert_eq!(
        gcp_status(&r),
        "DEADLINE_EXCEEDED",
        "Cloud EKM: {}",
        body_text(&r)
    );
    assert!(
        body_text(&r).contains("request deadline exceeded"),
        "Cloud EKM: {}",
        body_text(&r)
    );
    env.hsm.clear();
    // The slow calls still hold the workers for up to 2 s: retry until one is free.
    let mut served = false;
    for _ in 0..20 {
        if env.encrypt(b"on time").await.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(served, "the proxy serves again once the HSM is fast");
}

/// Background work is not held to the request deadline: with every object search on the token
/// taking 300 ms and `op_timeout_ms = 100`, the replica still reads the fleet state (background
/// work waits at least 5 s) and serves its cached key. Held to 100 ms, the read never succeeded
/// and every key operation answered that the fleet state had not been read yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_state_is_read_from_a_slow_hsm_despite_a_tight_request_deadline() {
    let mut env = Env::start_with("op_timeout_ms = 100\n", |hsm| {
        hsm.set(json!({ "latency_us": { "C_FindObjectsInit": 300_000 } }))
    })
    .await;
    let r = env.metadata(KEY).await;
    assert_eq!(r.status, 200, "{}", body_text(&r));
    assert!(
        env.metric("ekm_fleet_state_reads_total{outcome=\"ok\"}")
            .await
            >= 1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Keys coming and going
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_labels_are_negative_cached_and_new_keys_are_found_without_a_restart() {
    let mut env = Env::start("negative_cache_ms = 500\n").await;
    // `other-*` is in the test key store's allow-list; no such key exists yet.
    for _ in 0..50 {
        let r = env.metadata("other-late").await;
        assert_eq!(r.status, 404, "{}", body_text(&r));
        assert_eq!(r.error_name().as_deref(), Some("KeyNotFoundException"));
    }
    let hits = env
        .metric("ekm_cache_hits_total{cache=\"hsm_key_unknown\"}")
        .await;
    let searches = env
        .metric("ekm_cache_misses_total{cache=\"hsm_key_unknown\"}")
        .await;
    assert!(hits >= 40.0, "answered from the negative cache: {hits}");
    assert!(
        searches <= 10.0,
        "{searches} token searches for 50 requests"
    );
    env.proxy.token.add_key(&KeySpec::aes256("other-late"));
    let started = Instant::now();
    while env.metadata("other-late").await.status != 200 {
        assert!(
            started.elapsed() < POLL_LIMIT,
            "a key created on the token is not found"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_from_the_token_stops_working_within_the_cache_time() {
    for copies in [false, true] {
        let mut env = Env::start(&format!(
            "session_key_copies = {copies}\nkey_cache_ttl_secs = 1\n"
        ))
        .await;
        let out = env.encrypt_ok(b"before the deletion").await;
        assert_eq!(env.decrypt_ok(&out).await, b"before the deletion");
        let token = &env.proxy.token;
        ekm_proxy::hsm::destroy_key(&token.module, &token.label, &token.pin(), KEY)
            .expect("destroy the key");
        // Without copies the next use fails; with copies it may keep working until the cache
        // entry (1 s here) expires. Either way: "not found" soon, never a retryable error.
        let started = Instant::now();
        loop {
            let r = env.encrypt(b"after the deletion").await;
            if r.status == 404 {
                assert_eq!(r.error_name().as_deref(), Some("KeyNotFoundException"));
                break;
            }
            assert_eq!(r.status, 200, "copies={copies}: {}", body_text(&r));
            assert!(
                copies,
                "without session copies the deleted key must stop working at once"
            );
            assert!(
                started.elapsed() < POLL_LIMIT,
                "copies={copies}: the deleted key still works"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = env.wrap(b"after the deletion").await;
        assert_eq!(
            (r.status, gcp_status(&r).as_str()),
            (404, "NOT_FOUND"),
            "{}",
            body_text(&r)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_refused_while_recovering_is_never_retried() {
    let mut env = Env::start("").await;
    env.encrypt_ok(b"warm").await;
    env.hsm.set(json!({ "removed": true }));
    let r = env.encrypt(b"during the outage").await;
    assert_xks_retryable(&r, "XKS encrypt during the outage");
    // The token comes back, but refuses the PIN (it was changed on the HSM meanwhile): retrying
    // would walk the token towards a PIN lockout.
    env.hsm.set(json!({
        "removed": false,
        "errors": [{ "functions": ["C_Login"], "ckr": "CKR_PIN_INCORRECT" }]
    }));
    let (_, body) = poll_until(
        "readiness names the refused PIN",
        || env.readyz(),
        |(status, body)| {
            *status == 503 && body["detail"].as_str().is_some_and(|d| d.contains("PIN"))
        },
    )
    .await;
    assert_eq!(body["status"], "UNAVAILABLE", "{body}");
    let logins = env.metric("ekm_hsm_logins_total").await;
    let failures = env.metric("ekm_hsm_recovery_failures_total").await;
    // Several backoff periods (at most 500 ms here) later: no further login, no further attempt.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        env.metric("ekm_hsm_logins_total").await,
        logins,
        "no login retried"
    );
    assert_eq!(
        env.metric("ekm_hsm_recovery_failures_total").await,
        failures,
        "no recovery attempted"
    );
    let r = env.encrypt(b"still refused").await;
    assert_xks_retryable(&r, "XKS encrypt with the PIN refused");
    let r = env.wrap(b"still refused").await;
    assert_gcp_retryable(&r, "Cloud EKM wrap with the PIN refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decrypt_on_a_lost_token_is_retryable_not_invalid_ciphertext() {
    // A token whose store vanished, or a client library that needs re-initialising, answers
    // every call with CKR_GENERAL_ERROR: the code SoftHSM also uses for a tag mismatch. A decrypt
    // must not tell the cloud its (good) ciphertext is invalid: that answer is permanent.
    let mut env = Env::start("").await;
    let sealed = env.encrypt_ok(b"a good ciphertext").await;
    let r = env.wrap(b"a good blob").await;
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let blob = r.json().unwrap()["wrappedBlob"]
        .as_str()
        .unwrap()
        .to_owned();
    // Every call but C_CloseSession, so the sessions that cannot be checked can still be closed
    // (none may stay open on the token).
    env.hsm.set(json!({
        "errors": [{
            "functions": ["C_DecryptInit", "C_Decrypt", "C_EncryptInit", "C_Encrypt",
                "C_GetSessionInfo", "C_GetTokenInfo", "C_OpenSession", "C_Login",
                "C_FindObjectsInit", "C_GenerateRandom"],
            "ckr": "CKR_GENERAL_ERROR"
        }]
    }));
    let body = xks::decrypt_body_for(xks::KMS_KEY_ARN, &sealed, None);
    let r = env
        .xks
        .post(&format!("keys/{KEY}/decrypt"), body)
        .await
        .expect("XKS decrypt");
    assert_xks_retryable(
        &r,
        "XKS decrypt on a token that answers only general errors",
    );
    let r = env.gcp.unwrap(&blob).await;
    assert_gcp_retryable(
        &r,
        "Cloud EKM unwrap on a token that answers only general errors",
    );
    env.hsm.clear();
    env.await_recovered(2).await;
    assert_eq!(env.decrypt_ok(&sealed).await, b"a good ciphertext");
    // And a real tag mismatch is still the caller's fault.
    let mut bad = sealed.clone();
    bad.tag[0] ^= 1;
    let body = xks::decrypt_body_for(xks::KMS_KEY_ARN, &bad, None);
    let r = env
        .xks
        .post(&format!("keys/{KEY}/decrypt"), body)
        .await
        .expect("XKS decrypt");
    assert_eq!(r.status, 400, "{}", body_text(&r));
    assert_eq!(
        r.error_name().as_deref(),
        Some("InvalidCiphertextException")
    );
}
