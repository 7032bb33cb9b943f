#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! Connection limits, observed from outside over real TCP and TLS against the in-process proxy:
//! connections that never send a ClientHello, that finish the handshake and say nothing, or that
//! sit idle after a request (HTTP/1.1 and HTTP/2) are closed by the proxy, each counted in
//! `ekm_connections_closed_total{reason}`; a request in progress meanwhile is served; one source
//! address cannot hold more than `max_connections_per_ip` connections.
//!
//! Timeouts are shortened through the config. Nothing asserts on elapsed time except upper
//! bounds ("closed within N seconds"), which are far above the configured limits.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ekm_proxy::client::ClientTls;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::proxy::{ProxyOptions, TestProxy};

/// Every silent connection must be gone within this bound (the 25 s).
const CLOSE_BOUND: Duration = Duration::from_secs(25);

/// Short limits: handshake 1.5 s, first request 1.5 s, idle 2 s; no per-address cap.
fn short_limits(extra: &str) -> ProxyOptions {
    ProxyOptions {
        server_keys: format!(
            "tls_handshake_timeout_ms = 1500\nheader_read_timeout_ms = 1500\nidle_timeout_secs = 2\n{extra}"
        ),
        ..Default::default()
    }
}

fn client_tls(
    proxy: &TestProxy,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::TlsConnector,
    rustls::pki_types::ServerName<'static>,
) {
    let tls = ClientTls {
        ca_pem: proxy.pki.ca.cert_pem().into_bytes(),
        client_cert_pem: None,
        client_key_pem: None,
        server_name: "localhost".into(),
    };
    let mut config = (*tls.to_rustls().unwrap()).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (
        tokio_rustls::TlsConnector::from(Arc::new(config)),
        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
    )
}

/// Resolves once the peer has closed `stream` (EOF or an error), reading and discarding.
async fn closed_by_peer<S: tokio::io::AsyncRead + Unpin>(mut stream: S) {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn closed_metric(proxy: &TestProxy, reason: &str) -> f64 {
    proxy
        .metric(&format!(
            "ekm_connections_closed_total{{reason=\"{reason}\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_while_a_real_request_is_served() {
    let proxy = TestProxy::start_with(short_limits("max_connections_per_ip = 0")).await;
    let addr = proxy.addr("tls");
    let (connector, name) = client_tls(&proxy, &[b"http/1.1"]);
    let mut waits = tokio::task::JoinSet::new();
    // 20 TCP connections that never send a ClientHello.
    for _ in 0..20 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        waits.spawn(async move { closed_by_peer(tcp).await });
    }
    // 20 connections that complete the TLS handshake and then send nothing.
    for _ in 0..20 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector.connect(name.clone(), tcp).await.unwrap();
        waits.spawn(async move { closed_by_peer(tls).await });
    }
    // Meanwhile a real client is served.
    let mut client = proxy.tls_client().await;
    let health = client
        .post("health", ekm_proxy::client::xks::health_body())
        .await
        .expect("health while silent connections wait");
    assert_eq!(
        health.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&health.body)
    );

    let all_closed = tokio::time::timeout(CLOSE_BOUND, async {
        while let Some(r) = waits.join_next().await {
            r.unwrap();
        }
    })
    .await;
    assert!(
        all_closed.is_ok(),
        "{} of 40 silent connections still open after {CLOSE_BOUND:?}",
        waits.len()
    );
    assert!(closed_metric(&proxy, "handshake_timeout").await >= 20.0);
    assert!(closed_metric(&proxy, "first_request_timeout").await >= 20.0);
}

/// One `GET /ping` over HTTP/1.1 on a raw TLS stream; returns the stream for further use.
async fn h1_ping(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    stream
        .write_all(b"GET /ping HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"pong") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_are_not() {
    let proxy = TestProxy::start_with(short_limits("")).await;
    let addr = proxy.addr("tls");
    let (connector, name) = client_tls(&proxy, &[b"http/1.1"]);

    // A connection that keeps asking (every 0.5 s, over longer than idle_timeout) stays open.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut busy = connector.connect(name.clone(), tcp).await.unwrap();
    for i in 0..8 {
        let answer = h1_ping(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Once it stops, it is closed.
    let before = closed_metric(&proxy, "idle_timeout").await;
    tokio::time::timeout(CLOSE_BOUND, closed_by_peer(busy))
        .await
        .expect("an idle HTTP/1.1 keep-alive connection was not closed");
    assert!(closed_metric(&proxy, "idle_timeout").await >= before + 1.0);

    // HTTP/2 with no open stream is closed too.
    let (connector, name) = client_tls(&proxy, &[b"h2"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost:{}/ping", addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"pong");
    let ended = tokio::time::timeout(CLOSE_BOUND, driver).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let proxy = TestProxy::start_with(ProxyOptions {
        server_keys: "max_connections_per_ip = 3\n".into(),
        ..Default::default()
    })
    .await;
    let addr = proxy.addr("tls");
    let (connector, name) = client_tls(&proxy, &[b"http/1.1"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(name.clone(), tcp).await.unwrap();
        assert!(h1_ping(&mut tls).await.starts_with("HTTP/1.1 200"));
        held.push(tls);
    }
    // The fourth from the same address is closed without a handshake.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = connector.connect(name.clone(), tcp).await;
    assert!(
        refused.is_err(),
        "a fourth connection from one address was accepted"
    );
    assert!(closed_metric(&proxy, "per_ip_limit").await >= 1.0);
    // Closing one frees its place.
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        if let Ok(tls) = connector.connect(name.clone(), tcp).await {
            again = Some(tls);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = again.expect("a place freed by a closed connection was never reused");
    assert!(h1_ping(&mut again).await.starts_with("HTTP/1.1 200"));
}

/// A stream whose reads stop (pending forever) once `frozen` is set: a peer that is gone
/// without closing its TCP connection, so it never answers the server's PINGs.
struct Freezable<S> {
    inner: S,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Freezable<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Freezable<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_pings_close_a_dead_peer() {
    // Idle timeout far away, so only the PING can close the connection.
    let proxy = TestProxy::start_with(ProxyOptions {
        server_keys: "idle_timeout_secs = 600\nhttp2_keepalive_interval_secs = 1\nhttp2_keepalive_timeout_secs = 1\n".into(),
        ..Default::default()
    })
    .await;
    let addr = proxy.addr("tls");
    let (connector, name) = client_tls(&proxy, &[b"h2"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = Freezable {
        inner: tls,
        frozen: frozen.clone(),
    };
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost:{}/ping", addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let before = closed_metric(&proxy, "keepalive_timeout").await;
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + CLOSE_BOUND;
    while closed_metric(&proxy, "keepalive_timeout").await < before + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a peer that stopped answering PINGs was not closed within {CLOSE_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
