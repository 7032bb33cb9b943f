//! Listeners, TLS, HTTP serving, routing and the admin listener.
//!
//! The server owns sockets and connections; it hands each fully-read request to the [`Router`],
//! which picks the front end. Depends on `front` (and, through it, nothing of `hsm`).

pub mod admin;
pub mod listener;
pub mod router;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

pub use listener::{Listener, Shutdown};
pub use router::Router;

/// Connection and request handling settings shared by every API listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Deadline for one request, from the first body byte to the response.
    pub request_timeout: Duration,
    /// How long a client may take to send its first request's headers after the TLS handshake.
    pub header_read_timeout: Duration,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Largest request body accepted; checked before buffering beyond it.
    pub max_body_bytes: usize,
    /// Most connections open at once across all API listeners.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Offer HTTP/2 (ALPN `h2`) besides HTTP/1.1.
    pub http2: bool,
    /// How long a connection may stay open with no request in flight once it has served one
    /// (HTTP/1.1 between requests, HTTP/2 with no open stream). Before the first request the
    /// limit is `header_read_timeout`.
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval, to find dead peers (`None`: no pings).
    pub http2_keepalive_interval: Option<Duration>,
    /// How long an HTTP/2 PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Most connections open at once from one source IP address (0: no limit), so one host
    /// cannot take every one of `max_connections`.
    pub max_connections_per_ip: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            max_body_bytes: 256 * 1024,
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(10),
            http2: true,
            idle_timeout: Duration::from_secs(60),
            http2_keepalive_interval: Some(Duration::from_secs(20)),
            http2_keepalive_timeout: Duration::from_secs(20),
            max_connections_per_ip: 1000,
        }
    }
}

/// One API listener.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Name for logs and metrics.
    pub name: String,
    /// Address to bind (port 0 picks a free port; tests use it).
    pub addr: SocketAddr,
    /// TLS, or `None` for plain HTTP (only when the config says `plain_http = true`).
    pub tls: Option<tls::TlsSettings>,
}

/// The admin listener (plain HTTP; bind it to loopback or a management network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Address to bind.
    pub addr: SocketAddr,
}
