//! Listeners, TLS, HTTP serving, routing and the admin listener.

pub mod tls;
