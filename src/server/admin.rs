//! The admin listener (plain HTTP): `GET /metrics` (Prometheus text), `/healthz` (the process is
//! serving), `/readyz` (the HSM can serve and the kill switch is off; 503 otherwise, with the
//! reason) and `/ping` for load balancers.
//!
//! Bind it to loopback or a management network: it is unauthenticated and read-only.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::Shutdown;
use crate::core::{Backend, HealthStatus, KeyService};
use crate::metrics::Metrics;

/// The bound admin listener.
pub struct Admin<B: Backend> {
    tcp: TcpListener,
    service: Arc<KeyService<B>>,
    metrics: Metrics,
}

impl<B: Backend> Admin<B> {
    /// Bind `addr`.
    pub async fn bind(
        addr: SocketAddr,
        service: Arc<KeyService<B>>,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        Ok(Self {
            tcp: TcpListener::bind(addr).await?,
            service,
            metrics,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serve until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        let this = Arc::new(self);
        loop {
            let stream = tokio::select! {
                _ = shutdown.wait() => return,
                accepted = this.tcp.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let this2 = this.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let this = this2.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            this.answer(req.method(), req.uri().path()).await,
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn answer(&self, method: &http::Method, path: &str) -> http::Response<Full<Bytes>> {
        if method != http::Method::GET {
            return reply(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"GET only\n"),
            );
        }
        match path {
            "/metrics" => reply(
                http::StatusCode::OK,
                "text/plain; version=0.0.4",
                Bytes::from(self.metrics.render()),
            ),
            "/healthz" | "/ping" => reply(
                http::StatusCode::OK,
                "text/plain",
                Bytes::from_static(b"ok\n"),
            ),
            "/readyz" => {
                let report = self.service.health_report().await;
                let kill = self.service.kill_switch().engaged();
                let ready = !kill && report.status != HealthStatus::Unavailable;
                let body = serde_json::json!({
                    "ready": ready,
                    "status": report.status.as_str(),
                    "killSwitch": kill,
                    "token": report.hsm.token_label,
                    "sessionsUp": report.hsm.sessions_up,
                    "sessionsTotal": report.hsm.sessions_total,
                    "tokenSessions": report.hsm.token_sessions,
                    "detail": report.detail,
                });
                let status = if ready {
                    http::StatusCode::OK
                } else {
                    http::StatusCode::SERVICE_UNAVAILABLE
                };
                reply(status, "application/json", Bytes::from(body.to_string()))
            }
            _ => reply(
                http::StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"not found\n"),
            ),
        }
    }
}

fn reply(
    status: http::StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> http::Response<Full<Bytes>> {
    let mut resp = http::Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}
