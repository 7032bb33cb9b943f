//! Front ends: one module per cloud protocol. Each parses its wire format into core requests,
//! authenticates and authorizes through `auth`/`authz`, calls `core::KeyService`, and maps
//! `core::CryptoError` to its wire errors exactly once (in its own `error.rs`).
//!
//! Fronts depend on `auth`, `authz`, `core`, `metrics`, `audit` and HTTP types; never on `hsm`.

pub mod azure;
pub mod gcp;
pub mod pipeline;
pub mod xks;

use bytes::Bytes;
use http_body_util::Full;

use crate::server::tls::PeerIdentity;

/// What the server knows about the connection a request arrived on.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// The listener's configured name.
    pub listener: std::sync::Arc<str>,

    /// The verified client certificate, on mTLS listeners.
    pub peer: Option<std::sync::Arc<PeerIdentity>>,
}

/// A fully read request (the body limit has already been enforced by the server).
pub type Request = http::Request<Bytes>;
/// A response ready to send.
pub type Response = http::Response<Full<Bytes>>;

/// Build a compact JSON response with the given status.
pub fn json_response(status: http::StatusCode, body: Vec<u8>) -> Response {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
