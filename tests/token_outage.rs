//! The operator's drill from the field, on a real SoftHSMv2 token (no fault module): under load,
//! the token's directory is moved away and back, as when a network HSM's client loses its store
//! or an appliance reboots. SoftHSM then answers `CKR_GENERAL_ERROR` until the module is
//! re-initialised, so this exercises the whole ladder up to `C_Finalize` + `C_Initialize`.
//!
//! Required, with `session_key_copies` off (the production default) and on: every request is
//! answered (a client deadline of 5 s catches hangs), none with "key not found"; steady 200s again
//! within 30 s of the token's return, without a restart; `/readyz` 200 at the end.
//!
//! Its own test binary with a single test: re-initialising SoftHSM ends every session of the
//! process, which would disturb unrelated tests sharing it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ekm_proxy::client::xks;
use tokio::sync::Mutex;

use common::cloud_ekm::GcpClient;
use common::jwks::{JwksServer, jwks_of, signer1};
use common::proxy::{GcpSection, TestProxy};
use common::softhsm::{TestToken, ensure_conf};

/// A client that waits longer than this for an answer counts the request as hung.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);
/// How long the token stays away.
const OUTAGE: Duration = Duration::from_secs(10);
/// Steady 200s must be back this soon after the token returns.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// The directory SoftHSM keeps `label`'s token in: `directories.tokendir` of `SOFTHSM2_CONF`,
/// then the subdirectory whose `token.object` carries the label.
fn token_dir(label: &str) -> PathBuf {
    let conf = ensure_conf();
    let text = std::fs::read_to_string(&conf).unwrap();
    let tokendir = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "directories.tokendir").then(|| PathBuf::from(v.trim()))
        })
        .unwrap_or_else(|| panic!("no directories.tokendir in {}", conf.display()));
    for entry in std::fs::read_dir(&tokendir).unwrap() {
        let dir = entry.unwrap().path();
        let object = dir.join("token.object");
        if let Ok(bytes) = std::fs::read(&object)
            && bytes.windows(label.len()).any(|w| w == label.as_bytes())
        {
            return dir;
        }
    }
    panic!("no token directory for {label} in {}", tokendir.display());
}

/// Answers seen, by front and status (or `hung` / `transport`).
type Tally = BTreeMap<String, u64>;

async fn drill(session_key_copies: bool) {
    let token = TestToken::new();
    let dir = token_dir(&token.label);
    let jwks = JwksServer::start(jwks_of(&[signer1()])).await;
    let mut options = GcpSection::with_server(&jwks).options();
    options.hsm_keys = format!(
        "session_key_copies = {session_key_copies}\nrecovery_backoff_initial_ms = 100\nrecovery_backoff_max_ms = 2000\n"
    );
    let proxy = TestProxy::start_on(token, options).await;
    let mut xks_client = proxy.tls_client().await;
    let gcp = Arc::new(Mutex::new(GcpClient::new(&proxy)));

    let tally = Arc::new(Mutex::new(Tally::new()));
    let stop = Arc::new(AtomicBool::new(false));
    // A load balancer's readiness probe, as in production: with session copies the key
    // operations themselves may not notice the loss, the health check does.
    let admin = proxy.running().admin_addr().unwrap();
    let probe = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = readyz(admin).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let load = {
        let (tally, stop) = (tally.clone(), stop.clone());
        let mut xks = proxy.tls_client().await;
        let gcp = gcp.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let body = xks::encrypt_body(xks::KMS_KEY_ARN, b"load", None, false);
                let key = match tokio::time::timeout(
                    ANSWER_LIMIT,
                    xks.post("keys/dev-aes-1/encrypt", body),
                )
                .await
                {
                    Ok(Ok(r)) => format!("xks {}", r.status),
                    Ok(Err(_)) => "xks transport".to_owned(),
                    Err(_) => "xks hung".to_owned(),
                };
                *tally.lock().await.entry(key).or_default() += 1;
                let mut g = gcp.lock().await;
                let key = match tokio::time::timeout(ANSWER_LIMIT, g.wrap(b"load")).await {
                    Ok(r) => format!("gcp {}", r.status),
                    Err(_) => "gcp hung".to_owned(),
                };
                *tally.lock().await.entry(key).or_default() += 1;
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let away = dir.with_extension("away");
    std::fs::rename(&dir, &away).unwrap();
    tokio::time::sleep(OUTAGE).await;
    std::fs::rename(&away, &dir).unwrap();
    let back = Instant::now();

    // Steady 200s: ten in a row on both fronts.
    let mut streak = 0;
    while streak < 10 {
        let body = xks::encrypt_body(xks::KMS_KEY_ARN, b"after", None, false);
        // This connection may have been idle long enough for the proxy to close it: reconnect.
        let x = match xks_client.post("keys/dev-aes-1/encrypt", body).await {
            Ok(r) => r.status,
            Err(_) => {
                xks_client = proxy.tls_client().await;
                0
            }
        };
        let g = gcp.lock().await.wrap(b"after").await.status;
        streak = if x == 200 && g == 200 { streak + 1 } else { 0 };
        assert!(
            back.elapsed() < RECOVERY_LIMIT,
            "copies={session_key_copies}: no steady 200s {RECOVERY_LIMIT:?} after the token came back \
             (XKS {x}, Cloud EKM {g}); answers so far: {:?}",
            tally.lock().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    probe.await.unwrap();

    let tally = tally.lock().await.clone();
    println!("copies={session_key_copies}: answers {tally:?}");
    for (what, n) in &tally {
        assert!(
            what.ends_with(" 200") || what.ends_with(" 500") || what.ends_with(" 503"),
            "copies={session_key_copies}: {n} × {what} (want only 200, or the retryable 500/503): {tally:?}"
        );
    }
    assert!(
        tally.get("xks 200").copied().unwrap_or(0) > 0
            && tally.get("gcp 200").copied().unwrap_or(0) > 0,
        "load ran: {tally:?}"
    );
    // Readiness follows (its report is cached for up to a second).
    loop {
        let (status, body) = proxy.admin_get("/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            back.elapsed() < RECOVERY_LIMIT,
            "copies={session_key_copies}: /readyz {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recoveries = proxy
        .metric("ekm_hsm_recoveries_total{level=\"module\"}")
        .await;
    println!("copies={session_key_copies}: module-level recoveries {recoveries}");
    assert!(
        proxy
            .metric("ekm_hsm_recoveries_total{level=\"module\"}")
            .await
            >= 1.0,
        "copies={session_key_copies}: recovered by re-initialising the module"
    );
    proxy.stop().await;
    drop(jwks);
    assert!(Path::new(&dir).is_dir());
}

/// `GET /readyz` on the admin listener over a plain TCP connection: the status code.
async fn readyz(admin: std::net::SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_token_store_moved_away_and_back_under_load_recovers_without_a_restart() {
    drill(false).await;
    drill(true).await;
}
