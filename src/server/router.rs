//! The router: picks the front end for a request by its path, enforces the body limit and the
//! request deadline, and answers load-balancer pings.
//!
//! Holds each front end by its concrete type (no trait objects); adding a protocol adds a field.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::core::Backend;
use crate::front::azure::AzureFront;
use crate::front::gcp::GcpFront;
use crate::front::xks::XksFront;
use crate::front::{ConnInfo, Response};
use crate::metrics::RequestMetrics;

/// Routes requests to front ends.
pub struct Router<B: Backend> {
    /// The XKS front, when configured.
    pub xks: Option<Arc<XksFront<B>>>,
    /// The Cloud EKM front, when configured.
    pub gcp: Option<Arc<GcpFront<B>>>,
    /// The Azure Managed HSM front, when configured.
    pub azure: Option<Arc<AzureFront<B>>>,
    /// Request metrics (in-flight gauge).
    pub metrics: RequestMetrics,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Deadline for one request.
    pub request_timeout: Duration,
}

impl<B: Backend> Router<B> {
    /// Serve one request. Never fails: every problem becomes the front's own error answer.
    pub async fn serve(&self, req: http::Request<Incoming>, conn: &ConnInfo) -> Response {
        let gauge = self.metrics.in_flight();
        gauge.inc();
        let resp = self.serve_inner(req, conn).await;
        gauge.dec();
        resp
    }

    async fn serve_inner(&self, req: http::Request<Incoming>, conn: &ConnInfo) -> Response {
        let path = req.uri().path();
        if path == "/ping" && req.method() == http::Method::GET {
            return text(http::StatusCode::OK, "pong");
        }
        let front = if let Some(gcp) = self.gcp.as_ref().filter(|g| g.claims(path)) {
            Front::Gcp(gcp)
        } else if let Some(xks) = self.xks.as_ref().filter(|x| x.claims(path)) {
            Front::Xks(xks)
        } else if let Some(azure) = self.azure.as_ref().filter(|a| a.claims(path)) {
            Front::Azure(azure)
        } else {
            // Neither claims it: answer in XKS form, the protocol of the bare API root.
            return XksFront::<B>::unknown_path();
        };
        let work = async {
            let (parts, body) = req.into_parts();
            // Refuse a declared oversize body before reading any of it, and cap what is read
            // for bodies without (or lying about) Content-Length.
            let declared = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
                return front.too_large();
            }
            let body = match Limited::new(body, self.max_body_bytes).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => return front.too_large(),
                Err(e) => {
                    tracing::debug!(error = %e, "request body could not be read");
                    return text(
                        http::StatusCode::BAD_REQUEST,
                        "request body could not be read",
                    );
                }
            };
            let req = http::Request::from_parts(parts, body);
            front.handle(req, conn).await
        };
        match tokio::time::timeout(self.request_timeout, work).await {
            Ok(resp) => resp,
            Err(_) => {
                tracing::warn!(listener = %conn.listener, "request deadline exceeded");
                front.timed_out()
            }
        }
    }
}

/// The front end a request was routed to.
enum Front<'a, B: Backend> {
    Xks(&'a XksFront<B>),
    Gcp(&'a GcpFront<B>),
    Azure(&'a AzureFront<B>),
}

impl<B: Backend> Front<'_, B> {
    fn too_large(&self) -> Response {
        match self {
            Front::Xks(f) => f.too_large(),
            Front::Gcp(f) => f.too_large(),
            Front::Azure(f) => f.too_large(),
        }
    }

    fn timed_out(&self) -> Response {
        match self {
            Front::Xks(f) => f.timed_out(),
            Front::Gcp(f) => f.timed_out(),
            Front::Azure(f) => f.timed_out(),
        }
    }

    async fn handle(&self, req: crate::front::Request, conn: &ConnInfo) -> Response {
        match self {
            Front::Xks(f) => f.handle(req, conn).await,
            Front::Gcp(f) => f.handle(req, conn).await,
            Front::Azure(f) => f.handle(req, conn).await,
        }
    }
}

fn text(status: http::StatusCode, body: &'static str) -> Response {
    let mut resp = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    resp
}
