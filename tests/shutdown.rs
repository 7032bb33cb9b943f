//! Graceful shutdown: requests the server has started when shutdown begins still get their
//! answers; shutdown then completes (listeners closed, HSM workers stopped).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::proxy::{ProxyOptions, TestProxy};
use ekm_proxy::client::xks::{KMS_KEY_ARN, encrypt_body};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_answered_during_shutdown() {
    // One HSM worker and large plaintexts keep requests in flight long enough to catch them.
    let mut proxy = TestProxy::start_with(ProxyOptions {
        hsm_keys: "workers = 1".into(),
        ..ProxyOptions::default()
    })
    .await;
    let body = encrypt_body(KMS_KEY_ARN, &vec![7u8; 60_000], Some(b"aad"), false);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..48 {
        let mut client = proxy.tls_client().await;
        let body = body.clone();
        tasks.spawn(async move {
            let mut ok = 0u32;
            // Keep sending until the server stops answering on this connection.
            loop {
                match client.post("keys/dev-aes-1/encrypt", body.clone()).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => panic!(
                        "unexpected answer during shutdown: {} {:?}",
                        r.status,
                        r.error_name()
                    ),
                    Err(_) => return ok,
                }
            }
        });
    }
    let running = proxy.running.take().unwrap();
    let in_flight = running.metrics().requests.in_flight().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight.get() < 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let caught = in_flight.get();
    assert!(caught >= 1, "no request was in flight when shutdown began");
    tokio::time::timeout(Duration::from_secs(20), running.shutdown())
        .await
        .expect("shutdown finished");
    assert_eq!(
        in_flight.get(),
        0,
        "every started request finished before shutdown returned"
    );
    let mut ok = 0;
    while let Some(n) = tasks.join_next().await {
        ok += n.unwrap();
    }
    assert!(
        u64::from(ok) >= u64::try_from(caught).unwrap(),
        "{caught} requests were in flight at shutdown but only {ok} were answered"
    );
}
