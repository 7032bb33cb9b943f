//! The XKS request handler: routing within the front, SigV4, the key store's request-rate quota,
//! then the shared pipeline: the body parsed (`request`), the operation run (`ops`), one metric
//! and one log (or audit) line per request, with the request's facts learned stage by stage
//! rather than passed down to be filled.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::Method;
use tracing::Instrument;

use super::error::{XksError, XksErrorName as N};
use super::request::{Api, XksRequest};
use super::settings::{KeyStoreSettings, XksSettings};
use crate::audit::Audit;
use crate::auth::Principal;
use crate::auth::sigv4::{SigV4Verifier, SignedRequest};
use crate::core::quota::{Quotas, Throttled};
use crate::core::state::StoreId;
use crate::core::{Backend, KeyService};
use crate::front::pipeline::{self, Ending, Quota, RequestFacts};
use crate::front::{ConnInfo, Request, Response};
use crate::metrics::RequestMetrics;

/// The path segment every XKS API lives under, after the key store's prefix.
const API_ROOT: &str = "/kms/xks/v1";
/// Front name in metrics, logs and audit lines.
const FRONT: &str = "xks";

/// A key store ready to serve: its settings and its SigV4 verifier (with its signing-key cache).
pub(super) struct KeyStore {
    pub(super) settings: KeyStoreSettings,
    verifier: SigV4Verifier,
    /// `prefix + /kms/xks/v1`
    base: String,
}

/// Everything that can be replaced by a reload.
pub(super) struct State {
    stores: Vec<KeyStore>,
    pub(super) fleet_size: u32,
    pub(super) vendor: String,
}

/// The XKS front end.
pub struct XksFront<B: Backend> {
    pub(super) state: ArcSwap<State>,
    pub(super) service: Arc<KeyService<B>>,
    metrics: RequestMetrics,
    audit: Audit,
    /// One bucket per key store, by name. Outside `State`: a reload keeps the levels.
    quotas: Quotas,
    pub(super) model: String,
}

impl<B: Backend> XksFront<B> {
    /// Build the front from validated settings.
    pub fn new(
        settings: &XksSettings,
        service: Arc<KeyService<B>>,
        metrics: RequestMetrics,
    ) -> Self {
        declare_quotas(&metrics, settings);
        Self {
            state: ArcSwap::from_pointee(build_state(settings)),
            service,
            metrics,
            audit: Audit::to_log(),
            quotas: Quotas::new(),
            model: format!("ekm-proxy {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Send audit events to `audit` (default: the operational log).
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = audit;
        self
    }

    /// Replace key stores, credentials, policy, limits and quotas (SIGHUP). In-flight requests
    /// finish with the state they started with; a key store whose quota changed gets a full
    /// bucket at its new burst, the others keep their level.
    pub fn reload(&self, settings: &XksSettings) {
        declare_quotas(&self.metrics, settings);
        self.state.store(Arc::new(build_state(settings)));
    }

    /// Whether this front serves `path` (any path under `/kms/xks/v1`, known prefix or not, so
    /// that an unknown prefix gets the XKS InvalidUriPathException).
    pub fn claims(&self, path: &str) -> bool {
        path.contains(API_ROOT)
    }

    /// The answer when the body exceeds the server's limit: the spec's answer to input above the
    /// proxy's own limits.
    pub fn too_large(&self) -> Response {
        XksError::new(
            N::UnsupportedOperation,
            "request body exceeds this proxy's size limit",
        )
        .to_response()
    }

    /// The answer when the request deadline passes.
    pub fn timed_out(&self) -> Response {
        XksError::new(N::DependencyTimeout, "request deadline exceeded").to_response()
    }

    /// The answer for a path no front claims.
    pub fn unknown_path() -> Response {
        XksError::new(N::InvalidUriPath, "unknown URI path").to_response()
    }

    /// Handle one request.
    pub async fn handle(&self, req: Request, conn: &ConnInfo) -> Response {
        let span = pipeline::span(FRONT);
        self.handle_in(req, conn, span.clone())
            .instrument(span)
            .await
    }

    async fn handle_in(&self, req: Request, conn: &ConnInfo, span: tracing::Span) -> Response {
        let started = Instant::now();
        let state = self.state.load_full();
        let path = req.uri().path();
        let Some((store, api)) = route(&state, path) else {
            tracing::info!(path = %crate::audit::LogSafe(path), listener = %conn.listener, "unknown XKS path");
            self.metrics.observe(
                FRONT,
                "unknown",
                N::InvalidUriPath.as_str(),
                started.elapsed().as_secs_f64(),
            );
            return Self::unknown_path();
        };
        if req.method() != Method::POST {
            self.metrics.observe(
                FRONT,
                api.name(),
                "MethodNotAllowed",
                started.elapsed().as_secs_f64(),
            );
            return XksError::method_not_allowed();
        }
        let mut facts = RequestFacts {
            tenant: store.settings.name.clone(),
            op: api.name(),
            key: api.key().unwrap_or_default().to_owned(),
            ..RequestFacts::default()
        };
        // Each stage returns what it learned; the facts stay here, in the request's scope.
        let result = 'request: {
            let principal = match self.authenticate(store, &req) {
                Ok(principal) => principal,
                Err(e) => break 'request Err(e),
            };
            facts.principal = principal.name().to_owned();
            // After authentication, so a forged flood cannot drain the key store's bucket; before
            // the body is parsed or the HSM touched, so a throttled request costs next to nothing.
            if let Err(e) = self.admit(store) {
                // A refused key operation is audited like any other refusal (without the request
                // id: it lives in the body, which a throttled request never gets parsed).
                facts.audit = api.key().is_some();
                break 'request Err(e);
            }
            let parsed = match XksRequest::parse(api, req.body()) {
                Ok(parsed) => parsed,
                Err(e) => break 'request Err(e),
            };
            facts.request_id = parsed.request_id();
            facts.audit = parsed.is_key_operation();
            pipeline::record(&span, &facts);
            self.execute(store, &principal, api, &parsed).await
        };
        pipeline::record(&span, &facts);
        match result {
            Ok(response) => {
                let ending = Ending::ok();
                match pipeline::finish(&self.metrics, &self.audit, FRONT, &facts, ending, started) {
                    Ok(()) => response,
                    // Fail closed: no result leaves without its audit line.
                    Err(_) => XksError::new(N::Internal, "the audit trail cannot be written")
                        .to_response(),
                }
            }
            Err(e) => {
                let ending = Ending::failed(e.name.as_str(), e.rule.as_deref());
                // A refusal goes out whether or not its line could be written.
                let _ =
                    pipeline::finish(&self.metrics, &self.audit, FRONT, &facts, ending, started);
                e.to_response()
            }
        }
    }

    async fn execute(
        &self,
        store: &KeyStore,
        principal: &Principal,
        api: Api<'_>,
        req: &XksRequest<'_>,
    ) -> Result<Response, XksError> {
        let key = api.key().unwrap_or_default();
        // Disabled fleet-wide (`ekm-proxy keystore disable`): like `enabled = false`, every API.
        if let Some(why) = self
            .service
            .store_refusal(&StoreId::xks(&store.settings.name))
        {
            return Err(XksError::new(N::InvalidState, why));
        }
        match req {
            XksRequest::Health(_) => self.get_health_status(store).await,
            XksRequest::Metadata(md) => self.get_key_metadata(store, principal, key, md).await,
            XksRequest::Encrypt(body, md) => self.encrypt(store, principal, key, body, md).await,
            XksRequest::Decrypt(body, md) => self.decrypt(store, principal, key, body, md).await,
        }
    }

    /// The key store's quota: every authenticated request to the store, health checks included,
    /// takes one token from the store's bucket.
    fn admit(&self, store: &KeyStore) -> Result<(), XksError> {
        let Some(limit) = store.settings.quota else {
            return Ok(());
        };
        let name = store.settings.name.as_str();
        let quota = Quota {
            limit,
            identity: name,
            label: name,
        };
        pipeline::admit(&self.quotas, &self.metrics, FRONT, quota).map_err(|t| {
            let message = match t {
                Throttled::Exhausted => {
                    format!("request rate quota of key store '{name}' exceeded; retry with backoff")
                }
                Throttled::TooManyCallers => {
                    "too many callers are being rate-limited at once; retry with backoff".to_owned()
                }
            };
            XksError::new(N::Throttling, message)
        })
    }

    fn authenticate(&self, store: &KeyStore, req: &Request) -> Result<Principal, XksError> {
        let signed = SignedRequest {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            headers: req.headers(),
            authority: req.uri().authority().map(|a| a.as_str()),
            body: req.body(),
        };
        store
            .verifier
            .verify(&signed, SystemTime::now())
            .map_err(|e| {
                self.metrics.auth_failure(FRONT, e.reason());
                tracing::warn!(reason = e.reason(), "SigV4 authentication failed");
                XksError::new(
                    N::AuthenticationFailed,
                    format!("signature verification failed: {}", e.reason()),
                )
            })
    }
}

/// Give every configured quota its metric series before the first request.
fn declare_quotas(metrics: &RequestMetrics, settings: &XksSettings) {
    for store in settings.key_stores.iter().filter(|s| s.quota.is_some()) {
        metrics.quota_declared(FRONT, &store.name);
    }
}

fn build_state(settings: &XksSettings) -> State {
    let stores = settings
        .key_stores
        .iter()
        .map(|s| KeyStore {
            verifier: SigV4Verifier::new(
                "kms-xks-proxy",
                s.regions.clone(),
                std::time::Duration::from_secs(300),
                s.credentials.clone(),
            ),
            base: format!("{}{}", s.prefix, API_ROOT),
            settings: s.clone(),
        })
        .collect();
    State {
        stores,
        fleet_size: settings.fleet_size.max(1),
        vendor: settings.vendor.clone(),
    }
}

/// Find the key store and API for `path`. Key ids are `[A-Za-z0-9._-]{1,128}` (spec §1).
///
/// The store is the one with the longest base that `path` starts with (at a segment boundary):
/// with stores `""` and `"/kms/xks/v1/dev"`, the second one's paths also start with the first
/// one's base, and a first-match rule would hide the second store entirely.
fn route<'s, 'p>(state: &'s State, path: &'p str) -> Option<(&'s KeyStore, Api<'p>)> {
    let store = state
        .stores
        .iter()
        .filter(|s| {
            path.strip_prefix(s.base.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .max_by_key(|s| s.base.len())?;
    let rest = path.get(store.base.len()..)?;
    if rest == "/health" {
        return Some((store, Api::Health));
    }
    let rest = rest.strip_prefix("/keys/")?;
    let (key, action) = rest.split_once('/')?;
    if key.is_empty()
        || key.len() > 128
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return None;
    }
    match action {
        "metadata" => Some((store, Api::Metadata(key))),
        "encrypt" => Some((store, Api::Encrypt(key))),
        "decrypt" => Some((store, Api::Decrypt(key))),
        _ => None,
    }
}
