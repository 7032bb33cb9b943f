//! Typed Prometheus metric families, registered into a `Registry` the composition root passes in.
//!
//! A leaf module: no global registry, no dependency on other crate modules. Each layer receives
//! only the handle it needs (`HsmMetrics` for `hsm`, `RequestMetrics` for the fronts, ...).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: fine resolution below 1 ms (where the proxy lives), coarse above.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Every metric family of the proxy.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Request-level metrics (front ends).
    pub requests: RequestMetrics,
    /// HSM-layer metrics.
    pub hsm: HsmMetrics,
    /// Cache metrics, by cache name.
    pub cache: CacheMetrics,
    /// JWT verification and JWKS metrics.
    pub jwt: JwtMetrics,
    /// The audit chain.
    pub audit: AuditMetrics,
    /// Fleet state read from the HSM, and the listeners' certificates.
    pub fleet: FleetMetrics,
}

/// `ekm_audit_*`: lines written and dropped, checkpoints made in the HSM.
#[derive(Clone)]
pub struct AuditMetrics {
    lines: IntCounter,
    dropped: IntCounter,
    checkpoints: IntCounterVec,
    last_checkpoint: IntGauge,
}

/// `ekm_fleet_*`, `ekm_kill_switch_engaged`, `ekm_tls_certificate_expiry_timestamp_seconds`.
#[derive(Clone)]
pub struct FleetMetrics {
    reads: IntCounterVec,
    last_read: IntGauge,
    disabled: IntGaugeVec,
    kill_switch: IntGaugeVec,
    cert_expiry: IntGaugeVec,
}

/// `ekm_requests_total`, `ekm_request_duration_seconds`, `ekm_auth_failures_total`,
/// `ekm_quota_{admitted,throttled}_total`.
#[derive(Clone)]
pub struct RequestMetrics {
    total: IntCounterVec,
    duration: HistogramVec,
    auth_failures: IntCounterVec,
    quota_admitted: IntCounterVec,
    quota_throttled: IntCounterVec,
    tls_handshake_failures: IntCounter,
    connections_closed: IntCounterVec,
    in_flight: IntGauge,
}

/// `ekm_hsm_*`: operation latency, queue depth, sessions, session reopens and logins.
#[derive(Clone)]
pub struct HsmMetrics {
    op_duration: HistogramVec,
    op_errors: IntCounterVec,
    /// Jobs waiting in the HSM queue.
    pub queue_depth: IntGauge,
    /// Worker sessions currently open and logged in.
    pub sessions: IntGauge,
    /// Sessions opened after the first (recoveries).
    pub session_reopens: IntCounter,
    /// `C_Login` calls.
    pub logins: IntCounter,
    /// Jobs refused because the queue was full.
    pub queue_rejections: IntCounter,
    /// Successful recoveries by ladder rung (`session`, `slot`, `module`).
    recoveries: IntCounterVec,
    /// Failed token/module recovery attempts (each one is followed by a backoff).
    pub recovery_failures: IntCounter,
    /// 1 while the token is lost and the supervisor is recovering it, else 0.
    pub token_down: IntGauge,
    /// Workers given up on because one PKCS#11 call outlived `hsm.hung_call_ms`, and replaced.
    pub workers_replaced: IntCounter,
    /// Requests refused at once because the token is being recovered.
    pub fail_fast: IntCounter,
}

/// `ekm_cache_hits_total{cache}`, `ekm_cache_misses_total{cache}`.
#[derive(Clone)]
pub struct CacheMetrics {
    hits: IntCounterVec,
    misses: IntCounterVec,
}

/// `ekm_jwks_*` families, plus the cache counters for the `jwt` and `jwks` caches.
#[derive(Clone)]
pub struct JwtMetrics {
    fetches: IntCounterVec,
    keys: IntGaugeVec,
    refresh_rate_limited: IntCounterVec,
    cache: CacheMetrics,
}

impl Metrics {
    /// Create every family and register it into `registry`.
    pub fn new(registry: Registry) -> Result<Self, prometheus::Error> {
        let requests = RequestMetrics {
            total: IntCounterVec::new(
                Opts::new(
                    "ekm_requests_total",
                    "Requests answered, by front end, operation and outcome",
                ),
                &["front", "op", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "ekm_request_duration_seconds",
                    "Request latency inside the proxy",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["front", "op"],
            )?,
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "ekm_auth_failures_total",
                    "Authentication failures by front end and reason",
                ),
                &["front", "reason"],
            )?,
            quota_admitted: IntCounterVec::new(
                Opts::new(
                    "ekm_quota_admitted_total",
                    "Requests a request-rate quota admitted, by front end and quota (key store, \
                     service account or 'default', Azure prefix)",
                ),
                &["front", "quota"],
            )?,
            quota_throttled: IntCounterVec::new(
                Opts::new(
                    "ekm_quota_throttled_total",
                    "Requests refused with the protocol's throttling error because their \
                     request-rate quota was exhausted, by front end and quota",
                ),
                &["front", "quota"],
            )?,
            tls_handshake_failures: IntCounter::new(
                "ekm_tls_handshake_failures_total",
                "TLS handshakes that failed (including rejected client certificates)",
            )?,
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "ekm_connections_closed_total",
                    "Connections the proxy closed because a limit was reached, by limit \
                     (handshake_timeout, first_request_timeout, idle_timeout, \
                     keepalive_timeout, per_ip_limit)",
                ),
                &["reason"],
            )?,
            in_flight: IntGauge::new("ekm_requests_in_flight", "Requests being processed")?,
        };
        let hsm = HsmMetrics {
            op_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ekm_hsm_op_duration_seconds",
                    "Time spent in PKCS#11 calls per operation",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["op"],
            )?,
            op_errors: IntCounterVec::new(
                Opts::new(
                    "ekm_hsm_op_errors_total",
                    "HSM operations that failed, by operation and condition",
                ),
                &["op", "error"],
            )?,
            queue_depth: IntGauge::new("ekm_hsm_queue_depth", "Jobs waiting for an HSM worker")?,
            sessions: IntGauge::new("ekm_hsm_sessions", "HSM worker sessions open and logged in")?,
            session_reopens: IntCounter::new(
                "ekm_hsm_session_reopens_total",
                "HSM sessions reopened after a lost session or device error",
            )?,
            logins: IntCounter::new("ekm_hsm_logins_total", "C_Login calls made by HSM workers")?,
            queue_rejections: IntCounter::new(
                "ekm_hsm_queue_rejections_total",
                "Requests refused because the HSM queue was full",
            )?,
            recoveries: IntCounterVec::new(
                Opts::new(
                    "ekm_hsm_recoveries_total",
                    "Successful HSM recoveries by rung of the ladder (session, slot, module)",
                ),
                &["level"],
            )?,
            recovery_failures: IntCounter::new(
                "ekm_hsm_recovery_failures_total",
                "Token/module recovery attempts that failed (each followed by a backoff)",
            )?,
            token_down: IntGauge::new(
                "ekm_hsm_token_down",
                "1 while the HSM token is lost and being recovered",
            )?,
            workers_replaced: IntCounter::new(
                "ekm_hsm_workers_replaced_total",
                "HSM workers replaced because a PKCS#11 call hung past hsm.hung_call_ms",
            )?,
            fail_fast: IntCounter::new(
                "ekm_hsm_fail_fast_total",
                "Requests answered at once with a retryable error while the HSM was being recovered",
            )?,
        };
        let cache = CacheMetrics {
            hits: IntCounterVec::new(
                Opts::new("ekm_cache_hits_total", "Cache hits by cache"),
                &["cache"],
            )?,
            misses: IntCounterVec::new(
                Opts::new("ekm_cache_misses_total", "Cache misses by cache"),
                &["cache"],
            )?,
        };
        let jwt = JwtMetrics {
            fetches: IntCounterVec::new(
                Opts::new(
                    "ekm_jwks_fetches_total",
                    "JWKS fetches by issuer and outcome (ok, not_modified, error)",
                ),
                &["issuer", "outcome"],
            )?,
            keys: IntGaugeVec::new(
                Opts::new(
                    "ekm_jwks_keys",
                    "Usable signing keys in the issuer's current key set",
                ),
                &["issuer"],
            )?,
            refresh_rate_limited: IntCounterVec::new(
                Opts::new(
                    "ekm_jwks_refresh_rate_limited_total",
                    "Unknown-kid key-set refreshes skipped by the per-issuer rate limit",
                ),
                &["issuer"],
            )?,
            cache: cache.clone(),
        };
        let audit = AuditMetrics {
            lines: IntCounter::new(
                "ekm_audit_lines_total",
                "Lines written to the audit chain (decisions, state changes, checkpoints)",
            )?,
            dropped: IntCounter::new(
                "ekm_audit_dropped_total",
                "Audit lines that could not be written (with logging.audit_required the request \
                 failed instead of completing unrecorded)",
            )?,
            checkpoints: IntCounterVec::new(
                Opts::new(
                    "ekm_audit_checkpoints_total",
                    "Audit checkpoints by outcome (ok; error: the HSM could not MAC the chain head \
                     or the line could not be written)",
                ),
                &["outcome"],
            )?,
            last_checkpoint: IntGauge::new(
                "ekm_audit_last_checkpoint_timestamp_seconds",
                "Unix time of the last audit checkpoint written",
            )?,
        };
        let fleet = FleetMetrics {
            reads: IntCounterVec::new(
                Opts::new(
                    "ekm_fleet_state_reads_total",
                    "Reads of the fleet state (disabled keys and key stores, kill switch) from \
                     the HSM, by outcome",
                ),
                &["outcome"],
            )?,
            last_read: IntGauge::new(
                "ekm_fleet_state_last_read_timestamp_seconds",
                "Unix time of the last successful read of the fleet state from the HSM",
            )?,
            disabled: IntGaugeVec::new(
                Opts::new(
                    "ekm_fleet_disabled",
                    "Targets disabled fleet-wide in the HSM, by kind (key, keystore)",
                ),
                &["kind"],
            )?,
            kill_switch: IntGaugeVec::new(
                Opts::new(
                    "ekm_kill_switch_engaged",
                    "1 while the kill switch is engaged, by source (local file, fleet)",
                ),
                &["source"],
            )?,
            cert_expiry: IntGaugeVec::new(
                Opts::new(
                    "ekm_tls_certificate_expiry_timestamp_seconds",
                    "notAfter of each listener's server certificate, as Unix time",
                ),
                &["listener"],
            )?,
        };
        for outcome in ["ok", "error"] {
            audit.checkpoints.with_label_values(&[outcome]);
            fleet.reads.with_label_values(&[outcome]);
        }
        for kind in ["key", "keystore"] {
            fleet.disabled.with_label_values(&[kind]);
        }
        for source in ["local", "fleet"] {
            fleet.kill_switch.with_label_values(&[source]);
        }
        registry.register(Box::new(audit.lines.clone()))?;
        registry.register(Box::new(audit.dropped.clone()))?;
        registry.register(Box::new(audit.checkpoints.clone()))?;
        registry.register(Box::new(audit.last_checkpoint.clone()))?;
        registry.register(Box::new(fleet.reads.clone()))?;
        registry.register(Box::new(fleet.last_read.clone()))?;
        registry.register(Box::new(fleet.disabled.clone()))?;
        registry.register(Box::new(fleet.kill_switch.clone()))?;
        registry.register(Box::new(fleet.cert_expiry.clone()))?;
        registry.register(Box::new(requests.total.clone()))?;
        registry.register(Box::new(requests.duration.clone()))?;
        registry.register(Box::new(requests.auth_failures.clone()))?;
        registry.register(Box::new(requests.quota_admitted.clone()))?;
        registry.register(Box::new(requests.quota_throttled.clone()))?;
        registry.register(Box::new(requests.tls_handshake_failures.clone()))?;
        registry.register(Box::new(requests.connections_closed.clone()))?;
        registry.register(Box::new(requests.in_flight.clone()))?;
        registry.register(Box::new(hsm.op_duration.clone()))?;
        registry.register(Box::new(hsm.op_errors.clone()))?;
        registry.register(Box::new(hsm.queue_depth.clone()))?;
        registry.register(Box::new(hsm.sessions.clone()))?;
        registry.register(Box::new(hsm.session_reopens.clone()))?;
        registry.register(Box::new(hsm.logins.clone()))?;
        registry.register(Box::new(hsm.queue_rejections.clone()))?;
        registry.register(Box::new(hsm.recoveries.clone()))?;
        registry.register(Box::new(hsm.recovery_failures.clone()))?;
        registry.register(Box::new(hsm.token_down.clone()))?;
        registry.register(Box::new(hsm.workers_replaced.clone()))?;
        registry.register(Box::new(hsm.fail_fast.clone()))?;
        registry.register(Box::new(cache.hits.clone()))?;
        registry.register(Box::new(cache.misses.clone()))?;
        registry.register(Box::new(jwt.fetches.clone()))?;
        registry.register(Box::new(jwt.keys.clone()))?;
        registry.register(Box::new(jwt.refresh_rate_limited.clone()))?;
        Ok(Self {
            registry,
            requests,
            hsm,
            cache,
            jwt,
            audit,
            fleet,
        })
    }

    /// A fresh set on its own registry (tests, tools).
    pub fn standalone() -> Self {
        // Registering fresh families with distinct names into a new registry cannot fail.
        #[allow(clippy::expect_used)]
        Self::new(Registry::new()).expect("fresh registry") // invariant: see above
    }

    /// Prometheus text exposition of every registered family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec only fails on invalid metric data, which typed families cannot produce.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl AuditMetrics {
    /// Count one line written.
    pub fn line_written(&self) {
        self.lines.inc();
    }

    /// Count one line that could not be written.
    pub fn line_dropped(&self) {
        self.dropped.inc();
    }

    /// Count one checkpoint attempt.
    pub fn checkpoint(&self, ok: bool) {
        self.checkpoints
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        if ok {
            self.last_checkpoint.set(unix_now());
        }
    }
}

impl FleetMetrics {
    /// Count one read of the fleet state; on success record what it holds.
    pub fn read(&self, ok: bool, keys: usize, stores: usize) {
        self.reads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        if ok {
            self.last_read.set(unix_now());
            self.disabled
                .with_label_values(&["key"])
                .set(i64::try_from(keys).unwrap_or(i64::MAX));
            self.disabled
                .with_label_values(&["keystore"])
                .set(i64::try_from(stores).unwrap_or(i64::MAX));
        }
    }

    /// Whether the kill switch is engaged by `source` (`local` or `fleet`).
    pub fn kill_switch(&self, source: &str, engaged: bool) {
        self.kill_switch
            .with_label_values(&[source])
            .set(i64::from(engaged));
    }

    /// The server certificate of `listener` expires at `not_after` (Unix time).
    pub fn certificate_expiry(&self, listener: &str, not_after: i64) {
        self.cert_expiry
            .with_label_values(&[listener])
            .set(not_after);
    }
}

impl RequestMetrics {
    /// Count one answered request and observe its latency.
    pub fn observe(&self, front: &str, op: &str, outcome: &str, seconds: f64) {
        self.total.with_label_values(&[front, op, outcome]).inc();
        self.duration
            .with_label_values(&[front, op])
            .observe(seconds);
    }

    /// Count one authentication failure.
    pub fn auth_failure(&self, front: &str, reason: &str) {
        self.auth_failures.with_label_values(&[front, reason]).inc();
    }

    /// Give a configured quota its two series at 0, so `/metrics` lists it (and `rate()` sees its
    /// first increase) before any request used it. Called when a front is built or reloaded.
    pub fn quota_declared(&self, front: &str, quota: &str) {
        self.quota_admitted.with_label_values(&[front, quota]);
        self.quota_throttled.with_label_values(&[front, quota]);
    }

    /// Count one request admitted by `quota`.
    pub fn quota_admitted(&self, front: &str, quota: &str) {
        self.quota_admitted.with_label_values(&[front, quota]).inc();
    }

    /// Count one request refused by `quota`.
    pub fn quota_throttled(&self, front: &str, quota: &str) {
        self.quota_throttled
            .with_label_values(&[front, quota])
            .inc();
    }

    /// Count one failed TLS handshake.
    pub fn tls_handshake_failure(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Count a connection the proxy closed because the limit `reason` was reached.
    pub fn connection_closed(&self, reason: &str) {
        self.connections_closed.with_label_values(&[reason]).inc();
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &IntGauge {
        &self.in_flight
    }
}

impl HsmMetrics {
    /// The latency histogram for one operation (`encrypt`, `decrypt`, `find`, ...).
    pub fn op(&self, op: &str) -> Histogram {
        self.op_duration.with_label_values(&[op])
    }

    /// Count one successful recovery at `level` (`session`, `slot`, `module`).
    pub fn recovered(&self, level: &str) {
        self.recoveries.with_label_values(&[level]).inc();
    }

    /// Count one failed HSM operation by condition (`CryptoError::kind`).
    pub fn op_error(&self, op: &str, error: &str) {
        self.op_errors.with_label_values(&[op, error]).inc();
    }
}

impl CacheMetrics {
    /// Count a hit in `cache`.
    pub fn hit(&self, cache: &str) {
        self.hits.with_label_values(&[cache]).inc();
    }

    /// Count a miss in `cache`.
    pub fn miss(&self, cache: &str) {
        self.misses.with_label_values(&[cache]).inc();
    }
}

impl JwtMetrics {
    /// Count one key-set fetch for `issuer` (`ok`, `not_modified`, `error`).
    pub fn jwks_fetch(&self, issuer: &str, outcome: &str) {
        self.fetches.with_label_values(&[issuer, outcome]).inc();
    }

    /// Record how many usable keys `issuer`'s current set holds.
    pub fn jwks_keys(&self, issuer: &str, keys: usize) {
        self.keys
            .with_label_values(&[issuer])
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// Count one unknown-kid refresh skipped by the rate limit.
    pub fn jwks_refresh_rate_limited(&self, issuer: &str) {
        self.refresh_rate_limited.with_label_values(&[issuer]).inc();
    }

    /// The cache counters (`cache="jwt"` for verified tokens, `cache="jwks"` for key sets).
    pub fn cache(&self) -> &CacheMetrics {
        &self.cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families() {
        let m = Metrics::standalone();
        m.requests.observe("xks", "encrypt", "ok", 0.0002);
        m.requests.quota_declared("azure", "pool-a");
        m.requests.quota_throttled("xks", "tenant-1");
        m.hsm.logins.inc();
        m.cache.hit("key");
        m.jwt.jwks_fetch("google", "ok");
        m.jwt.jwks_keys("google", 2);
        m.jwt.jwks_refresh_rate_limited("google");
        m.jwt.cache().miss("jwks");
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("ekm_requests_total{front=\"xks\",op=\"encrypt\",outcome=\"ok\"} 1"));
        assert!(text.contains("ekm_hsm_logins_total 1"));
        assert!(text.contains("ekm_quota_admitted_total{front=\"azure\",quota=\"pool-a\"} 0"));
        assert!(text.contains("ekm_quota_throttled_total{front=\"azure\",quota=\"pool-a\"} 0"));
        assert!(text.contains("ekm_quota_throttled_total{front=\"xks\",quota=\"tenant-1\"} 1"));
        assert!(text.contains("ekm_cache_hits_total{cache=\"key\"} 1"));
        assert!(text.contains("ekm_jwks_fetches_total{issuer=\"google\",outcome=\"ok\"} 1"));
        assert!(text.contains("ekm_jwks_keys{issuer=\"google\"} 2"));
        assert!(text.contains("ekm_jwks_refresh_rate_limited_total{issuer=\"google\"} 1"));
        assert!(text.contains("ekm_cache_misses_total{cache=\"jwks\"} 1"));
    }
}
