//! The composition root: builds every part from [`Settings`], starts the listeners and background
//! tasks, reloads on request, and owns shutdown. Nothing else wires modules together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::audit::Audit;
use crate::audit::sink::{ChainSettings, ChainSink};
use crate::background::{self, Checkpointer};
use crate::config::Settings;
use crate::core::state::FleetState;
use crate::core::{HealthMonitor, KeyService, KillSwitch};
use crate::front::azure::AzureFront;
use crate::front::gcp::GcpFront;
use crate::front::xks::XksFront;
use crate::hsm::Pkcs11Backend;
use crate::metrics::Metrics;
use crate::server::admin::Admin;
use crate::server::listener::PerIpLimit;
use crate::server::tls;
use crate::server::{Listener, Router, Shutdown};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HSM could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] crate::hsm::HsmError),
    /// A listener's TLS configuration is unusable.
    #[error("listener '{listener}': {source}")]
    Tls {
        /// Which listener.
        listener: String,
        /// What is wrong.
        source: tls::TlsError,
    },
    /// A socket could not be bound.
    #[error("cannot bind {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Cloud EKM token verifier cannot be built (e.g. an unreadable JWKS CA file).
    #[error("gcp: {0}")]
    Jwt(#[from] crate::auth::jwt::JwtSetupError),
    /// Metric registration failed (a bug).
    #[error("metrics: {0}")]
    Metrics(String),
    /// A start-up task failed.
    #[error("start-up task failed: {0}")]
    Task(String),
    /// The audit file cannot be opened, or required auditing cannot be provided.
    #[error("audit: {0}")]
    Audit(String),
}

/// A running proxy.
pub struct Running {
    addrs: HashMap<String, SocketAddr>,
    admin_addr: Option<SocketAddr>,
    shutdown: Shutdown,
    tasks: JoinSet<()>,
    service: Arc<KeyService<Pkcs11Backend>>,
    xks: Arc<XksFront<Pkcs11Backend>>,
    gcp: Option<Arc<GcpFront<Pkcs11Backend>>>,
    azure: Option<Arc<AzureFront<Pkcs11Backend>>>,
    tls: HashMap<String, Arc<ArcSwap<rustls::ServerConfig>>>,
    metrics: Metrics,
    alpn: Vec<Vec<u8>>,
    audit: Audit,
    /// Stops the checkpoint task (after the listeners drained) and waits for its last checkpoint.
    checkpoints: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

/// Build and start everything described by `settings`.
pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let metrics = Metrics::new(prometheus::Registry::new())
        .map_err(|e| StartError::Metrics(e.to_string()))?;
    // Module load, C_Initialize, C_Login and the key-cache warm-up are blocking FFI work.
    let hsm_settings = settings.hsm.clone();
    let (hsm_metrics, cache_metrics) = (metrics.hsm.clone(), metrics.cache.clone());
    let backend = tokio::task::spawn_blocking(move || {
        Pkcs11Backend::start(hsm_settings, hsm_metrics, cache_metrics)
    })
    .await
    .map_err(|e| StartError::Task(e.to_string()))??;
    let backend = Arc::new(backend);

    let kill = Arc::new(KillSwitch::default());
    let health = HealthMonitor::new(
        backend.clone(),
        settings.core.health_key.clone(),
        settings.core.health_max_age,
    );
    // Key operations wait for the first read of the fleet state (FleetState::default is "not
    // loaded"); it is made here, before the listeners open, and retried by the poller.
    let service = Arc::new(KeyService::new(
        backend.clone(),
        settings.core.keys.clone(),
        kill.clone(),
        health,
        FleetState::default(),
    ));
    let instance = instance_name();
    let (audit, checkpointer) = open_audit(&settings, &backend, &metrics, &instance).await?;
    background::refresh_fleet_state(&service, &audit, &metrics.fleet).await;
    let xks = Arc::new(
        XksFront::new(&settings.xks, service.clone(), metrics.requests.clone())
            .with_audit(audit.clone()),
    );
    let gcp = match &settings.gcp {
        None => None,
        Some(g) => Some(Arc::new(
            GcpFront::new(
                g,
                service.clone(),
                metrics.requests.clone(),
                metrics.jwt.clone(),
            )?
            .with_audit(audit.clone()),
        )),
    };
    let azure = settings.azure.as_ref().map(|a| {
        Arc::new(
            AzureFront::new(a, service.clone(), metrics.requests.clone()).with_audit(audit.clone()),
        )
    });
    record_certificate_expiry(&settings, &metrics);
    let router = Arc::new(Router {
        xks: (!settings.xks.key_stores.is_empty()).then(|| xks.clone()),
        gcp: gcp.clone(),
        azure: azure.clone(),
        metrics: metrics.requests.clone(),
        max_body_bytes: settings.server.max_body_bytes,
        request_timeout: settings.server.request_timeout,
    });

    let shutdown = Shutdown::default();
    let mut tasks = JoinSet::new();
    let server_settings = Arc::new(settings.server.clone());
    let connections = Arc::new(Semaphore::new(settings.server.max_connections));
    let per_ip = PerIpLimit::new(settings.server.max_connections_per_ip);
    let alpn: Vec<Vec<u8>> = if settings.server.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let mut addrs = HashMap::new();
    let mut tls_configs = HashMap::new();
    for l in &settings.listeners {
        let tls_config = match &l.tls {
            None => None,
            Some(t) => {
                let cfg = build_tls(t, &alpn).map_err(|source| StartError::Tls {
                    listener: l.name.clone(),
                    source,
                })?;
                let cfg = Arc::new(ArcSwap::new(cfg));
                tls_configs.insert(l.name.clone(), cfg.clone());
                Some(cfg)
            }
        };
        let listener = Listener::bind(
            &l.name,
            l.addr,
            tls_config,
            router.clone(),
            server_settings.clone(),
            connections.clone(),
            per_ip.clone(),
            metrics.requests.clone(),
        )
        .await
        .map_err(|source| StartError::Bind {
            what: l.name.clone(),
            addr: l.addr,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            what: l.name.clone(),
            addr: l.addr,
            source,
        })?;
        tracing::info!(listener = %l.name, %addr, tls = l.tls.is_some(), "listening");
        addrs.insert(l.name.clone(), addr);
        tasks.spawn(listener.run(shutdown.clone()));
    }
    let admin_addr = match &settings.admin {
        None => None,
        Some(a) => {
            let admin = Admin::bind(a.addr, service.clone(), metrics.clone())
                .await
                .map_err(|source| StartError::Bind {
                    what: "admin".into(),
                    addr: a.addr,
                    source,
                })?;
            let addr = admin.local_addr().map_err(|source| StartError::Bind {
                what: "admin".into(),
                addr: a.addr,
                source,
            })?;
            tracing::info!(%addr, "admin listening");
            tasks.spawn(admin.run(shutdown.clone()));
            Some(addr)
        }
    };

    // Background: signing-key warm-up, deep health refresh, kill-switch file watch.
    if let Some(gcp) = gcp.clone() {
        tasks.spawn(async move { gcp.prefetch().await });
    }
    {
        let service = service.clone();
        let interval = settings.core.health_interval;
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let report = service.health().refresh().await;
                tracing::debug!(status = report.status.as_str(), "health refreshed");
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }
    {
        let stop = shutdown.clone();
        tasks.spawn(background::poll_fleet_state(
            service.clone(),
            audit.clone(),
            metrics.fleet.clone(),
            settings.core.state_poll,
            async move { stop.wait().await },
        ));
    }
    let checkpoints = checkpointer.map(|c| {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let interval = settings.logging.audit_checkpoint;
        let handle = tokio::spawn(c.run(interval, async move {
            let _ = stop_rx.await;
        }));
        (stop_tx, handle)
    });
    if let Some(path) = settings.core.kill_switch_file.clone() {
        let kill = kill.clone();
        let fleet_metrics = metrics.fleet.clone();
        let shutdown = shutdown.clone();
        // Checked at start so requests never race the first poll.
        kill.set(path.exists());
        tasks.spawn(async move {
            let mut was = kill.engaged();
            if was {
                tracing::warn!(file = %path.display(), "kill switch ENGAGED: every key operation is refused");
            }
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let now = tokio::fs::try_exists(&path).await.unwrap_or(true);
                kill.set(now);
                fleet_metrics.kill_switch("local", now);
                if now != was {
                    if now {
                        tracing::warn!(file = %path.display(), "kill switch ENGAGED: every key operation is refused");
                    } else {
                        tracing::warn!(file = %path.display(), "kill switch released");
                    }
                    was = now;
                }
            }
        });
    }

    Ok(Running {
        addrs,
        admin_addr,
        shutdown,
        tasks,
        service,
        xks,
        gcp,
        azure,
        tls: tls_configs,
        metrics,
        alpn,
        audit,
        checkpoints,
    })
}

/// This replica's name in audit lines: host name and process id.
fn instance_name() -> String {
    format!("{}/{}", crate::host::name(), std::process::id())
}

/// The audit handle: the chained file with its checkpoint task when `logging.audit_file` is set,
/// the operational log otherwise. With `audit_required` the HMAC key must work now: a replica
/// that cannot protect its audit trail must not serve.
async fn open_audit(
    settings: &Settings,
    backend: &Arc<Pkcs11Backend>,
    metrics: &Metrics,
    instance: &str,
) -> Result<(Audit, Option<Checkpointer<Pkcs11Backend>>), StartError> {
    let logging = &settings.logging;
    let Some(path) = logging.audit_file.clone() else {
        return Ok((Audit::to_log(), None));
    };
    let chain = ChainSettings {
        path: path.clone(),
        max_bytes: logging.audit_max_bytes,
    };
    let sink = ChainSink::open(chain, instance, metrics.audit.clone())
        .map_err(|e| StartError::Audit(format!("cannot open {}: {e}", path.display())))?;
    let checkpointer = Checkpointer {
        backend: backend.clone(),
        sink: Arc::new(sink),
        key: logging.audit_hmac_key.clone(),
        metrics: metrics.audit.clone(),
        instance: instance.to_owned(),
    };
    // The start line is the first to cover; this also proves the key works.
    if let Err(e) = checkpointer.checkpoint().await {
        if logging.audit_required {
            return Err(StartError::Audit(format!(
                "{e} (logging.audit_required is set; create the key with `ekm-proxy keys create --type hmac-sha256 --label {}`)",
                logging.audit_hmac_key
            )));
        }
        tracing::error!(error = %e, "audit checkpoints are failing: the audit file is chained but not protected by the HSM");
    }
    let audit = Audit::to_chain(checkpointer.sink.clone(), logging.audit_required);
    Ok((audit, Some(checkpointer)))
}

/// The expiry metric of every listener's server certificate.
fn record_certificate_expiry(settings: &Settings, metrics: &Metrics) {
    for l in &settings.listeners {
        if let Some(not_after) = l
            .tls
            .as_ref()
            .and_then(|t| tls::leaf_not_after(&t.cert_chain))
        {
            metrics.fleet.certificate_expiry(&l.name, not_after);
        }
    }
}

fn build_tls(
    t: &tls::TlsSettings,
    alpn: &[Vec<u8>],
) -> Result<Arc<rustls::ServerConfig>, tls::TlsError> {
    let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
    // Rejected client certificates are logged by the verifier and counted by the listener as
    // failed handshakes, so no extra hook is needed here.
    tls::server_config(t, &alpn, None)
}

impl Running {
    /// The bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.get(name).copied()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The key service (tests and the benchmark's raw lane use its backend).
    pub fn service(&self) -> &Arc<KeyService<Pkcs11Backend>> {
        &self.service
    }

    /// The metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Apply a new configuration without dropping connections: SigV4 credentials, key stores,
    /// Cloud EKM issuers, keys and grants, policy, limits, request-rate quotas, disabled keys and
    /// TLS certificates.
    /// Listener addresses, HSM settings and adding or removing a front need a restart; a change
    /// there is logged and ignored.
    pub fn reload(&self, new: &Settings) -> Result<(), StartError> {
        let mut fresh = Vec::new();
        for l in &new.listeners {
            if let (Some(t), Some(slot)) = (&l.tls, self.tls.get(&l.name)) {
                let cfg = build_tls(t, &self.alpn).map_err(|source| StartError::Tls {
                    listener: l.name.clone(),
                    source,
                })?;
                fresh.push((slot.clone(), cfg));
            }
            if !self.addrs.contains_key(&l.name) {
                tracing::warn!(listener = %l.name, "new listener ignored until restart");
            }
        }
        // Only swap once everything was built, so a bad file changes nothing.
        match (&self.gcp, &new.gcp) {
            (Some(front), Some(settings)) => front.reload(settings)?,
            (None, Some(_)) | (Some(_), None) => {
                tracing::warn!(
                    "adding or removing the [gcp] section needs a restart; its change is ignored"
                );
            }
            (None, None) => {}
        }
        for (slot, cfg) in fresh {
            slot.store(cfg);
        }
        self.xks.reload(&new.xks);
        match (&self.azure, &new.azure) {
            (Some(front), Some(settings)) => front.reload(settings),
            (None, Some(_)) | (Some(_), None) => tracing::warn!(
                "adding or removing the [azure] section needs a restart; its change is ignored"
            ),
            (None, None) => {}
        }
        if let Some(front) = self.gcp.clone() {
            tokio::spawn(async move { front.prefetch().await });
        }
        self.service.reload(new.core.keys.clone());
        record_certificate_expiry(new, &self.metrics);
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Stop accepting, drain in-flight requests (up to the grace period), stop the HSM workers.
    pub async fn shutdown(mut self) {
        self.shutdown.trigger();
        while self.tasks.join_next().await.is_some() {}
        // After the drain: the last checkpoint covers the last request's line.
        if let Some((stop, handle)) = self.checkpoints.take() {
            let _ = stop.send(());
            let _ = handle.await;
        }
        self.service.backend().shutdown();
    }

    /// The audit handle (tests read the chain's file through it).
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// Read the fleet state from the HSM now instead of at the next poll (tests, drills).
    pub async fn refresh_fleet_state(&self) -> bool {
        background::refresh_fleet_state(&self.service, &self.audit, &self.metrics.fleet).await
    }

    /// A handle that triggers shutdown (for signal handlers).
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }
}

/// Run until SIGTERM or ctrl-c; reload on SIGHUP. Returns the process exit code.
pub async fn serve(settings: Settings) -> i32 {
    let source = settings.source.clone();
    let running = match start(settings).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            return 1;
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP handler unavailable; reload disabled");
            None
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => break,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending::<()>().await } } => {
                match crate::config::load(&source) {
                    Ok(new) => if let Err(e) = running.reload(&new) {
                        tracing::error!(error = %e, "reload refused; the running configuration is unchanged");
                    },
                    Err(e) => tracing::error!(problems = %e, "reload refused; the running configuration is unchanged"),
                }
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
    0
}
