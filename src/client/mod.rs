//! Clients of the proxy's wire protocols, used by the integration tests and the benchmark: one
//! keep-alive HTTP/1.1 connection (over TLS or plain TCP) that sends requests the way the cloud
//! does.
//!
//! - [`Connector`] / [`Connection`]: protocol-neutral. The connector holds what all connections
//!   share (address, the rustls config and its session cache); a connection sends one request at a
//!   time, exactly as given.
//! - [`XksConnector`] / [`XksClient`]: SigV4-signed XKS requests, as KMS sends them; [`xks`]
//!   builds their bodies and reads their responses.
//! - [`gcp`]: Google Cloud EKM wrap/unwrap with `Authorization: Bearer` JWTs, and the RS256 token
//!   minting the dev profile, the tests and the benchmark sign with.
//!
//! Depends on `auth::sigv4` (the signer), `secret`, jsonwebtoken, hyper, rustls and tokio. It must
//! not depend on `server`, `front`, `core` or `hsm`: it sees the proxy only through the wire, like
//! the clouds do.

pub mod gcp;
mod tls;
pub mod xks;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::auth::sigv4::{self, SigV4Error, SigV4Signer};
use crate::secret::SecretString;

pub use tls::ClientTls;

/// Where and how to connect, and the credential to sign with.
#[derive(Clone, Debug)]
pub struct XksClientConfig {
    /// Server address.
    pub addr: SocketAddr,
    /// TLS settings; `None` means plain HTTP.
    pub tls: Option<ClientTls>,
    /// `Host` header value, e.g. `localhost:8443`.
    pub host: String,
    /// Path prefix of the logical key store, e.g. `/dev-keystore` (may be empty).
    pub prefix: String,
    /// SigV4 access key id.
    pub access_key_id: String,
    /// SigV4 secret.
    pub secret: SecretString,
    /// Region in the credential scope, e.g. `us-east-1`.
    pub region: String,
    /// Service in the credential scope: `kms-xks-proxy`.
    pub service: String,
}

/// A response, body fully read.
#[derive(Clone, Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The `errorName` of an XKS error body, if the body is one.
    pub fn error_name(&self) -> Option<String> {
        xks::error_name(&self.body)
    }
}

/// Overrides for negative tests; `Default` changes nothing.
#[derive(Clone, Debug, Default)]
pub struct SignOptions {
    /// Signing time instead of `SystemTime::now()`.
    pub time: Option<SystemTime>,
    /// Region in the credential scope.
    pub region: Option<String>,
    /// Service in the credential scope.
    pub service: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret to sign with.
    pub secret: Option<SecretString>,
    /// Headers to sign instead of `host;x-amz-date` (lowercase names).
    pub signed_headers: Option<Vec<String>>,
    /// `Host` header value instead of the configured one.
    pub host: Option<String>,
    /// Full request path instead of `<prefix>/kms/xks/v1/<suffix>`.
    pub path: Option<String>,
    /// Headers added before signing (so they can be signed), e.g. `x-amz-content-sha256`.
    pub extra_headers: HeaderMap,
    /// Headers set (replacing) after signing, to tamper with a signed request.
    pub after_sign_headers: HeaderMap,
    /// Body sent instead of the signed one, to tamper with a signed request.
    pub body_after_sign: Option<Bytes>,
    /// Send without `x-amz-date` and `authorization`.
    pub unsigned: bool,
}

/// Why a request failed (a non-2xx status is not an error: it is a [`Response`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad client configuration (PEM, server name, cert without key …).
    #[error("client configuration: {0}")]
    Config(String),
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// TLS failed: locally, or the server sent a fatal alert
    /// (`AlertReceived(HandshakeFailure)` when it rejects the client certificate; with TLS 1.3 that
    /// shows on the first request rather than during the handshake).
    #[error("TLS: {0}")]
    Tls(#[source] rustls::Error),
    /// The TLS handshake failed without a TLS-level reason (e.g. the server closed the socket).
    #[error("TLS handshake I/O: {0}")]
    HandshakeIo(#[source] std::io::Error),
    /// HTTP-level failure: protocol error, connection closed, I/O error after the handshake.
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(#[from] SigV4Error),
    /// A bearer token could not be minted (Google Cloud EKM client).
    #[error("token: {0}")]
    Token(String),
    /// The request could not be built (e.g. an invalid path).
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

impl ClientError {
    /// The alert the server sent, if the failure is a received TLS alert.
    pub fn tls_alert(&self) -> Option<rustls::AlertDescription> {
        match self {
            ClientError::Tls(rustls::Error::AlertReceived(alert)) => Some(*alert),
            _ => None,
        }
    }
}

/// Opens keep-alive HTTP/1.1 connections to one server, over TLS or plain TCP. Builds the rustls
/// config once, so all its connections share it (and its TLS session cache). Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    addr: SocketAddr,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// Parses the TLS material once; `tls: None` means plain HTTP.
    pub fn new(addr: SocketAddr, tls: Option<&ClientTls>) -> Result<Self, ClientError> {
        let tls = match tls {
            None => None,
            Some(t) => Some((
                tokio_rustls::TlsConnector::from(t.to_rustls()?),
                t.server_name()?,
            )),
        };
        Ok(Self { addr, tls })
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Opens one connection: TCP (`TCP_NODELAY`), TLS handshake if configured, HTTP/1.1.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(ClientError::Connect)?;
        // Requests are small and latency-bound; Nagle would add delay to every one.
        tcp.set_nodelay(true).map_err(ClientError::Connect)?;
        let (sender, conn_error) = match &self.tls {
            None => spawn_connection(TokioIo::new(tcp)).await?,
            Some((connector, name)) => {
                let stream =
                    connector.connect(name.clone(), tcp).await.map_err(
                        |e| match rustls_error_of_io(&e) {
                            Some(tls) => ClientError::Tls(tls),
                            None => ClientError::HandshakeIo(e),
                        },
                    )?;
                spawn_connection(TokioIo::new(stream)).await?
            }
        };
        Ok(Connection {
            addr: self.addr,
            sender,
            conn_error: Some(conn_error),
        })
    }
}

/// HTTP/1.1 handshake over `io`, with the connection driven by a spawned task. The task reports
/// its error (if any) on the returned channel: a TLS alert read while the connection was idle is
/// only visible there.
async fn spawn_connection<T>(
    io: T,
) -> Result<
    (
        http1::SendRequest<Full<Bytes>>,
        oneshot::Receiver<hyper::Error>,
    ),
    ClientError,
>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(io).await.map_err(ClientError::Http)?;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            let _ = tx.send(e);
        }
    });
    Ok((sender, rx))
}

/// One keep-alive HTTP/1.1 connection; sends one request at a time, exactly as given.
pub struct Connection {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
    conn_error: Option<oneshot::Receiver<hyper::Error>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("closed", &self.sender.is_closed())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends `req` exactly as given (no `Host`, no credentials added) and reads the whole response.
    pub async fn send_raw(&mut self, req: Request<Full<Bytes>>) -> Result<Response, ClientError> {
        if let Err(e) = self.sender.ready().await {
            return Err(self.http_error(e).await);
        }
        let resp = match self.sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => return Err(self.http_error(e).await),
        };
        let (parts, body) = resp.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Err(self.http_error(e).await),
        };
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// Classifies a hyper error, preferring a TLS cause (from the error itself, or from the
    /// connection task when the failure happened while no request was waiting).
    async fn http_error(&mut self, e: hyper::Error) -> ClientError {
        if let Some(tls) = rustls_error_in_chain(&e) {
            return ClientError::Tls(tls);
        }
        // The task ends right after the failure; a short wait is enough and bounds the delay
        // when the connection is in fact still alive.
        if !e.is_user()
            && let Some(rx) = self.conn_error.take()
            && let Ok(Ok(conn_error)) = tokio::time::timeout(Duration::from_millis(200), rx).await
        {
            return match rustls_error_in_chain(&conn_error) {
                Some(tls) => ClientError::Tls(tls),
                None => ClientError::Http(conn_error),
            };
        }
        ClientError::Http(e)
    }
}

/// Opens connections for one [`XksClientConfig`]; builds the rustls config once, so all its
/// connections share it (and its TLS session cache). Cheap to clone.
#[derive(Clone)]
pub struct XksConnector {
    cfg: Arc<XksClientConfig>,
    signer: Arc<SigV4Signer>,
    connector: Connector,
}

impl std::fmt::Debug for XksConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksConnector")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl XksConnector {
    /// Parses the TLS material of `cfg` once.
    pub fn new(cfg: Arc<XksClientConfig>) -> Result<Self, ClientError> {
        let connector = Connector::new(cfg.addr, cfg.tls.as_ref())?;
        let signer = Arc::new(SigV4Signer::new(
            &cfg.access_key_id,
            cfg.secret.clone(),
            &cfg.region,
            &cfg.service,
        ));
        Ok(Self {
            cfg,
            signer,
            connector,
        })
    }

    /// The config this connector was built from.
    pub fn config(&self) -> &Arc<XksClientConfig> {
        &self.cfg
    }

    /// Opens one connection: TCP (`TCP_NODELAY`), TLS handshake if configured, HTTP/1.1.
    pub async fn connect(&self) -> Result<XksClient, ClientError> {
        Ok(XksClient {
            cfg: Arc::clone(&self.cfg),
            signer: Arc::clone(&self.signer),
            conn: self.connector.connect().await?,
        })
    }
}

/// One keep-alive connection to an XKS proxy.
pub struct XksClient {
    cfg: Arc<XksClientConfig>,
    /// Signs with the configured credential, keeping the derived key (shared per connector).
    signer: Arc<SigV4Signer>,
    conn: Connection,
}

impl std::fmt::Debug for XksClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksClient")
            .field("addr", &self.cfg.addr)
            .field("closed", &self.conn.is_closed())
            .finish_non_exhaustive()
    }
}

impl XksClient {
    /// Connects once. Builds the TLS config for this one connection; to open many, use
    /// [`XksConnector`], which builds it once and enables TLS session resumption.
    pub async fn connect(cfg: Arc<XksClientConfig>) -> Result<Self, ClientError> {
        XksConnector::new(cfg)?.connect().await
    }

    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// `POST <prefix>/kms/xks/v1/<suffix>`, signed now with `host;x-amz-date`.
    pub async fn post(
        &mut self,
        suffix: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response, ClientError> {
        self.post_with(suffix, body, &SignOptions::default()).await
    }

    /// Like [`XksClient::post`], with the overrides in `opts`.
    pub async fn post_with(
        &mut self,
        suffix: &str,
        body: impl Into<Bytes>,
        opts: &SignOptions,
    ) -> Result<Response, ClientError> {
        let body: Bytes = body.into();
        let cfg = &self.cfg;
        let path = match &opts.path {
            Some(p) => p.clone(),
            None => format!(
                "{}/kms/xks/v1/{}",
                cfg.prefix.trim_end_matches('/'),
                suffix.trim_start_matches('/')
            ),
        };

        let mut headers = HeaderMap::with_capacity(8);
        let host = opts.host.as_deref().unwrap_or(&cfg.host);
        headers.insert(HOST, header_value(host)?);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &opts.extra_headers {
            headers.append(name, value.clone());
        }
        if !opts.unsigned {
            let default_signed = ["host", "x-amz-date"];
            let custom: Option<Vec<&str>> = opts
                .signed_headers
                .as_ref()
                .map(|v| v.iter().map(String::as_str).collect());
            let signed = custom.as_deref().unwrap_or(&default_signed);
            let time = opts.time.unwrap_or_else(SystemTime::now);
            let overrides_credential = opts.access_key_id.is_some()
                || opts.secret.is_some()
                || opts.region.is_some()
                || opts.service.is_some();
            if overrides_credential {
                sigv4::sign(
                    "POST",
                    &path,
                    "",
                    &mut headers,
                    &body,
                    signed,
                    opts.access_key_id.as_deref().unwrap_or(&cfg.access_key_id),
                    opts.secret.as_ref().unwrap_or(&cfg.secret),
                    opts.region.as_deref().unwrap_or(&cfg.region),
                    opts.service.as_deref().unwrap_or(&cfg.service),
                    time,
                )?;
            } else {
                self.signer
                    .sign("POST", &path, "", &mut headers, &body, signed, time)?;
            }
        }
        for (name, value) in &opts.after_sign_headers {
            headers.insert(name, value.clone());
        }
        let body = opts.body_after_sign.clone().unwrap_or(body);

        let mut req = Request::post(path).body(Full::new(body))?;
        *req.headers_mut() = headers;
        self.send_raw(req).await
    }

    /// Sends `req` exactly as given (no `Host`, no signature added) and reads the whole response.
    pub async fn send_raw(&mut self, req: Request<Full<Bytes>>) -> Result<Response, ClientError> {
        self.conn.send_raw(req).await
    }
}

fn header_value(s: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(s).map_err(|e| ClientError::Request(e.into()))
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn rustls_error_of_io(e: &std::io::Error) -> Option<rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>().cloned()
}

/// Walks an error's source chain for a rustls error. `io::Error::source` skips the wrapped error
/// itself, so I/O errors are unwrapped by hand.
fn rustls_error_in_chain(e: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.clone());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(tls) = rustls_error_of_io(io)
        {
            return Some(tls);
        }
        next = err.source();
    }
    None
}
