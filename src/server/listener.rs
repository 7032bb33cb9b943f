//! An API listener: accepts TCP connections, performs the TLS handshake (with the current
//! certificate configuration, which a reload may replace), and serves HTTP/1.1 keep-alive (and
//! HTTP/2 when negotiated) until shutdown, then drains.
//!
//! Connections are bounded by a semaphore shared by all listeners, and per source IP address;
//! shutdown stops accepting, asks every connection to finish its in-flight requests, and waits up
//! to the grace period.
//!
//! A connection that does nothing does not keep its slot: the TLS handshake has
//! `tls_handshake_timeout`, the first request's headers must arrive within `header_read_timeout`
//! of the handshake, a connection with no request in flight is closed after `idle_timeout`, and
//! HTTP/2 PINGs find dead peers. Each of these closes is counted in
//! `ekm_connections_closed_total{reason}`.
//!
//! Closes are lingering: after a fatal TLS alert, or when the connection ends with input the
//! proxy did not read, the write side is shut down and input is read and discarded for a short
//! bounded time before the socket is closed. Closing a socket with unread input makes the kernel
//! send a RST, which can overtake the alert (or the last answer) so that the client sees
//! "connection reset" instead of the reason.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

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

/// How long a lingering close reads and discards input at most.
const LINGER_TIME: Duration = Duration::from_secs(1);
/// How much input a lingering close reads and discards at most.
const LINGER_BYTES: usize = 64 * 1024;
/// How long a connection closed by the proxy may take to say goodbye (GOAWAY, close_notify).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Open connections per source IP address, shared by every API listener.
pub struct PerIpLimit {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIpLimit {
    /// At most `limit` connections per address; 0 means no limit.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when that address is at its limit.
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.limit == 0 {
            return Some(IpSlot {
                limits: self.clone(),
                ip: None,
            });
        }
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d; count it as a.b.c.d.
        let ip = ip.to_canonical();
        let mut counts = self.lock();
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            limits: self.clone(),
            ip: Some(ip),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The map holds plain counts, consistent after every statement: a panic cannot corrupt it.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One connection's place in its address's count; released on drop.
struct IpSlot {
    limits: Arc<PerIpLimit>,
    ip: Option<IpAddr>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut counts = self.limits.lock();
            if let Some(count) = counts.get_mut(&ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&ip);
                }
            }
        }
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
    per_ip: Arc<PerIpLimit>,
    metrics: RequestMetrics,
}

impl<B: Backend> Listener<B> {
    /// Bind `addr`. `tls` is `None` for a plain-HTTP listener. `connections` and `per_ip` are
    /// shared by every API listener.
    #[allow(clippy::too_many_arguments)]
    pub async fn bind(
        name: &str,
        addr: SocketAddr,
        tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
        router: Arc<Router<B>>,
        settings: Arc<ServerSettings>,
        connections: Arc<Semaphore>,
        per_ip: Arc<PerIpLimit>,
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
            per_ip,
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
        // hyper's own header timer restarts whenever a connection waits for a request, so it
        // would also close idle keep-alive connections; the connection watchdog below applies
        // header_read_timeout to the first request and idle_timeout afterwards instead.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .keep_alive_interval(self.settings.http2_keepalive_interval)
            .keep_alive_timeout(self.settings.http2_keepalive_timeout);
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
            let Some(ip_slot) = self.per_ip.acquire(peer.ip()) else {
                self.metrics.connection_closed("per_ip_limit");
                tracing::info!(listener = %self.name, %peer, limit = self.per_ip.limit, "too many connections from this address; closed");
                // Dropped without lingering: nothing was said to this client, and a flood of
                // refused connections must not pin a file descriptor each for the linger time.
                drop(stream);
                drop(permit);
                continue;
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
                drop(ip_slot);
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
                self.http(TokioIo::new(Lingering(Some(stream))), info, shutdown)
                    .await;
            }
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let handshake = tokio::time::timeout(
                    self.settings.tls_handshake_timeout,
                    acceptor.accept(stream).into_fallible(),
                )
                .await;
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err((e, stream))) => {
                        self.metrics.tls_handshake_failure();
                        if super::tls::missing_client_certificate(&e) {
                            // rustls refuses an empty certificate list before our verifier runs.
                            tracing::warn!(listener = %self.name, %peer, reason = "no_certificate", "client certificate rejected");
                        } else {
                            tracing::info!(listener = %self.name, %peer, error = %e, "TLS handshake failed");
                        }
                        // The alert has been written; a TLS 1.3 client has probably sent its
                        // request already, which must be drained or the RST may beat the alert.
                        linger(stream).await;
                        return;
                    }
                    Err(_) => {
                        self.metrics.tls_handshake_failure();
                        self.metrics.connection_closed("handshake_timeout");
                        tracing::info!(listener = %self.name, %peer, "TLS handshake timed out");
                        return;
                    }
                };
                let info = ConnInfo {
                    listener: self.name.clone(),
                    peer: super::tls::peer_identity(tls.get_ref().1).map(Arc::new),
                };
                self.http(TokioIo::new(Lingering(Some(tls))), info, shutdown)
                    .await;
            }
        }
    }

    async fn http<I>(&self, io: TokioIo<I>, info: ConnInfo, shutdown: Shutdown)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let info = Arc::new(info);
        let (activity, watch) = watch::channel(Activity {
            in_flight: 0,
            served: false,
            idle_since: Instant::now(),
        });
        let activity = Arc::new(activity);
        let service = service_fn(move |req| {
            let router = router.clone();
            let info = info.clone();
            let busy = Busy::start(activity.clone());
            async move {
                let response = router.serve(req, &info).await;
                drop(busy);
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let idle = idle_watch(
            watch,
            self.settings.header_read_timeout,
            self.settings.idle_timeout,
        );
        tokio::pin!(idle);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    if is_keepalive_timeout(e.as_ref()) {
                        self.metrics.connection_closed("keepalive_timeout");
                    }
                    tracing::debug!(listener = %self.name, error = %e, "connection ended with an error");
                }
            }
            reason = &mut idle => {
                self.metrics.connection_closed(reason);
                tracing::debug!(listener = %self.name, reason, "closing a connection with no request in flight");
                // HTTP/1.1 closes at once; HTTP/2 sends GOAWAY. Bounded: the peer may be dead.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
            }
            _ = shutdown.wait() => {
                // Finish in-flight requests, refuse new ones on this connection, then close.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

/// What a connection is doing, for the idle watchdog.
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// Requests whose response has not been produced yet.
    in_flight: usize,
    /// Whether any request has arrived (before that, the first-request limit applies).
    served: bool,
    /// When `in_flight` last became 0 (or the connection was set up).
    idle_since: Instant,
}

/// Marks one request in flight for as long as it lives.
struct Busy(Arc<watch::Sender<Activity>>);

impl Busy {
    fn start(activity: Arc<watch::Sender<Activity>>) -> Self {
        activity.send_modify(|a| {
            a.in_flight += 1;
            a.served = true;
        });
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            if a.in_flight == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// Resolves, with the limit's metric reason, once the connection has had no request in flight
/// for `first_request` (before its first request) or `idle` (after it).
async fn idle_watch(
    mut activity: watch::Receiver<Activity>,
    first_request: Duration,
    idle: Duration,
) -> &'static str {
    loop {
        let now = *activity.borrow_and_update();
        if now.in_flight > 0 {
            if activity.changed().await.is_err() {
                // The connection's service is gone: the connection is ending by itself.
                std::future::pending::<()>().await;
            }
            continue;
        }
        let (limit, reason) = if now.served {
            (idle, "idle_timeout")
        } else {
            (first_request, "first_request_timeout")
        };
        tokio::select! {
            changed = activity.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ = tokio::time::sleep_until(now.idle_since + limit) => return reason,
        }
    }
}

/// Whether hyper ended an HTTP/2 connection because a keep-alive PING went unanswered. hyper
/// exposes no predicate for it (its `is_timeout` covers only the HTTP/1 header timer), so the
/// cause is recognised by its message.
fn is_keepalive_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.to_string() == "keep-alive timed out" {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Shut down the write side, then read and discard input for at most [`LINGER_TIME`] and
/// [`LINGER_BYTES`] (or until the peer closes) before closing, so unread input does not turn the
/// close into a RST that could destroy what was just sent.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// A connection's socket, or its TLS stream, as handed to hyper.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The TCP socket underneath.
    fn into_tcp(self) -> TcpStream;
}

impl Socket for TcpStream {
    fn into_tcp(self) -> TcpStream {
        self
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn into_tcp(self) -> TcpStream {
        // hyper has already sent close_notify (poll_shutdown) on a clean close.
        self.into_inner().0
    }
}

/// Hands hyper a socket and, when hyper drops it, closes it with [`linger`] on a task of its own,
/// so a request hyper refused without reading its body (e.g. an oversize one) still gets its
/// answer instead of a reset.
struct Lingering<S: Socket>(Option<S>);

impl<S: Socket> Drop for Lingering<S> {
    fn drop(&mut self) {
        if let (Some(socket), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(linger(socket.into_tcp()));
        }
    }
}

impl<S: Socket> AsyncRead for Lingering<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().0.as_mut() {
            Some(s) => Pin::new(s).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<S: Socket> AsyncWrite for Lingering<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().0.as_mut() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().0.as_mut() {
            Some(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().0.as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().0.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_an_unanswered_keep_alive_ping_counts_as_a_keepalive_timeout() {
        /// An error with a cause, as hyper wraps the h2 error.
        #[derive(Debug)]
        struct Wrapped(std::io::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connection error")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let other = |m: &str| std::io::Error::other(m.to_owned());
        assert!(is_keepalive_timeout(&other("keep-alive timed out")));
        assert!(is_keepalive_timeout(&Wrapped(other(
            "keep-alive timed out"
        ))));
        assert!(!is_keepalive_timeout(&other("connection reset by peer")));
        assert!(!is_keepalive_timeout(&Wrapped(other(
            "unexpected end of file"
        ))));
    }

    #[test]
    fn an_address_gets_its_slots_back_one_at_a_time() {
        let limits = PerIpLimit::new(2);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let a = limits.acquire(ip).unwrap();
        let b = limits.acquire(ip).unwrap();
        assert!(limits.acquire(ip).is_none());
        // The same client over a dual-stack socket is the same address.
        assert!(
            limits
                .acquire("::ffff:192.0.2.7".parse().unwrap())
                .is_none()
        );
        assert!(limits.acquire("192.0.2.8".parse().unwrap()).is_some());
        drop(a);
        let c = limits.acquire(ip).unwrap();
        assert!(
            limits.acquire(ip).is_none(),
            "closing one connection frees one slot, not the address's whole count"
        );
        drop((b, c));
        assert!(
            limits.lock().is_empty(),
            "an address with no connection left keeps no entry"
        );
        let unlimited = PerIpLimit::new(0);
        let held: Vec<_> = (0..5).map(|_| unlimited.acquire(ip).unwrap()).collect();
        assert_eq!(held.len(), 5);
        assert!(unlimited.lock().is_empty());
    }
}
