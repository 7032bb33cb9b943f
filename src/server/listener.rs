//! An API listener: accepts TCP connections, performs the TLS handshake (with the current
//! certificate configuration, which a reload may replace), and serves HTTP/1.1 keep-alive (and
//! HTTP/2 when negotiated) until shutdown, then drains.
//!
//! Connections are bounded by a semaphore shared by all listeners; shutdown stops accepting,
//! asks every connection to finish its in-flight requests, and waits up to the grace period.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::{Router, ServerSettings};
use crate::core::Backend;
use crate::front::ConnInfo;
use crate::metrics::RequestMetrics;

/// A shutdown signal: `trigger` once, every listener and connection observes it.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            tx: Arc::new(tx),
            rx,
        }
    }
}

impl Shutdown {
    /// Ask everything to stop.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Whether shutdown was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is asked for.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// A bound API listener, ready to run.
pub struct Listener<B: Backend> {
    name: Arc<str>,
    tcp: TcpListener,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    router: Arc<Router<B>>,
    settings: Arc<ServerSettings>,
    connections: Arc<Semaphore>,
    metrics: RequestMetrics,
}

impl<B: Backend> Listener<B> {
    /// Bind `addr`. `tls` is `None` for a plain-HTTP listener.
    pub async fn bind(
        name: &str,
        addr: SocketAddr,
        tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
        router: Arc<Router<B>>,
        settings: Arc<ServerSettings>,
        connections: Arc<Semaphore>,
        metrics: RequestMetrics,
    ) -> std::io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        Ok(Self {
            name: Arc::from(name),
            tcp,
            tls,
            router,
            settings,
            connections,
            metrics,
        })
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accept and serve until `shutdown`, then drain in-flight requests.
    pub async fn run(self, shutdown: Shutdown) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256);
        if !self.settings.http2 {
            builder = builder.http1_only();
        }
        let builder = Arc::new(builder);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.wait() => break,
                permit = self.connections.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.wait() => break,
                accepted = self.tcp.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: log, back off briefly, keep serving.
                        tracing::warn!(listener = %self.name, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let conn = Connection {
                name: self.name.clone(),
                tls: self.tls.as_ref().map(|t| t.load_full()),
                router: self.router.clone(),
                settings: self.settings.clone(),
                builder: builder.clone(),
                metrics: self.metrics.clone(),
            };
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                conn.serve(stream, peer, shutdown).await;
                drop(permit);
            });
            // Reap finished tasks so the set does not grow with the connection count served.
            while tasks.try_join_next().is_some() {}
        }
        let grace = self.settings.shutdown_grace;
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(listener = %self.name, remaining = tasks.len(), "shutdown grace elapsed; closing connections");
            tasks.abort_all();
        }
    }
}

struct Connection<B: Backend> {
    name: Arc<str>,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Arc<Router<B>>,
    settings: Arc<ServerSettings>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    metrics: RequestMetrics,
}

impl<B: Backend> Connection<B> {
    async fn serve(self, stream: TcpStream, peer: SocketAddr, shutdown: Shutdown) {
        // Latency matters more than packet count for small JSON answers.
        let _ = stream.set_nodelay(true);
        match self.tls.clone() {
            None => {
                let info = ConnInfo {
                    listener: self.name.clone(),
                    ..ConnInfo::default()
                };
                self.http(TokioIo::new(stream), info, shutdown).await;
            }
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let handshake = tokio::time::timeout(
                    self.settings.tls_handshake_timeout,
                    acceptor.accept(stream),
                )
                .await;
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        self.metrics.tls_handshake_failure();
                        if super::tls::missing_client_certificate(&e) {
                            // rustls refuses an empty certificate list before our verifier runs.
                            tracing::warn!(listener = %self.name, %peer, reason = "no_certificate", "client certificate rejected");
                        } else {
                            tracing::info!(listener = %self.name, %peer, error = %e, "TLS handshake failed");
                        }
                        return;
                    }
                    Err(_) => {
                        self.metrics.tls_handshake_failure();
                        tracing::info!(listener = %self.name, %peer, "TLS handshake timed out");
                        return;
                    }
                };
                let info = ConnInfo {
                    listener: self.name.clone(),
                    peer: super::tls::peer_identity(tls.get_ref().1).map(Arc::new),
                };
                self.http(TokioIo::new(tls), info, shutdown).await;
            }
        }
    }

    async fn http<I>(&self, io: TokioIo<I>, info: ConnInfo, shutdown: Shutdown)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let info = Arc::new(info);
        let service = service_fn(move |req| {
            let router = router.clone();
            let info = info.clone();
            async move { Ok::<_, std::convert::Infallible>(router.serve(req, &info).await) }
        });
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(listener = %self.name, error = %e, "connection ended with an error");
                }
            }
            _ = shutdown.wait() => {
                // Finish in-flight requests, refuse new ones on this connection, then close.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}
