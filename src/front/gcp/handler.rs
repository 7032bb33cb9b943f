//! The Cloud EKM request handler: routing within the front, Bearer-token authentication, the
//! service account's request-rate quota, key lookup, validation, per-key authorization with Key Access Justifications, the wrap or unwrap
//! in the HSM, the response, and one log line + audit line + metric per request.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use tracing::Instrument;

use super::blob;
use super::error::{Code, GcpError, Reason, from_crypto};
use super::ops::{Access, Body};
use super::settings::{GcpKeySettings, GcpSettings};
use super::wire::KeyOpRequest;
use crate::audit::Audit;
use crate::auth::Principal;
use crate::auth::jwt::{JwtError, JwtSetupError, JwtVerifier};
use crate::core::quota::{Quotas, Throttled};
use crate::core::state::StoreId;
use crate::core::{Backend, CryptoError, KeyService};
use crate::front::pipeline::{self, Base64, Ending, FieldError, JsonError, Quota, RequestFacts};
use crate::front::{ConnInfo, Request, Response, json_response};
use crate::metrics::{JwtMetrics, RequestMetrics};

/// Front name in metrics, logs and audit lines.
const FRONT: &str = "gcp";
/// The most a blob adds to its plaintext: header (3) + key version id (≤ 255) + IV + tag.
pub(super) const BLOB_OVERHEAD: usize = 3 + 255 + blob::IV_LEN + crate::core::GCM_TAG_LEN;

/// Everything that can be replaced by a reload.
pub(super) struct State {
    pub(super) settings: GcpSettings,
    /// Index into `settings.keys` by key path.
    keys: HashMap<String, usize>,
    verifier: JwtVerifier,
}

impl State {
    fn key(&self, path: &str) -> Option<&GcpKeySettings> {
        self.keys.get(path).and_then(|&i| self.settings.keys.get(i))
    }
}

/// The Cloud EKM front end.
pub struct GcpFront<B: Backend> {
    state: ArcSwap<State>,
    pub(super) service: Arc<KeyService<B>>,
    metrics: RequestMetrics,
    jwt_metrics: JwtMetrics,
    ids: RequestIds,
    audit: Audit,
    /// One bucket per service account. Outside `State`: a reload keeps the levels.
    quotas: Quotas,
}

/// The two operations of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verb {
    Wrap,
    Unwrap,
}

impl Verb {
    /// The operation's name in metrics, logs and audit lines (health checks apart).
    fn op_name(self, health_check: bool) -> &'static str {
        match (self, health_check) {
            (Verb::Wrap, false) => "wrap",
            (Verb::Wrap, true) => "wrap_health_check",
            (Verb::Unwrap, false) => "unwrap",
            (Verb::Unwrap, true) => "unwrap_health_check",
        }
    }
}

impl<B: Backend> GcpFront<B> {
    /// Build the front from validated settings.
    pub fn new(
        settings: &GcpSettings,
        service: Arc<KeyService<B>>,
        metrics: RequestMetrics,
        jwt_metrics: JwtMetrics,
    ) -> Result<Self, JwtSetupError> {
        let state = build_state(settings, &jwt_metrics)?;
        declare_quotas(&metrics, settings);
        Ok(Self {
            state: ArcSwap::from_pointee(state),
            service,
            metrics,
            jwt_metrics,
            ids: RequestIds::new(),
            audit: Audit::to_log(),
            quotas: Quotas::new(),
        })
    }

    /// Send audit events to `audit` (default: the operational log).
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = audit;
        self
    }

    /// Replace issuers, keys, grants, limits and quotas (SIGHUP). The verifier is rebuilt, so
    /// verified tokens from the old configuration are dropped with it; key sets are not: a
    /// `jwks_file` must parse now, and an unchanged JWKS URL keeps its last good set. A service
    /// account whose quota changed gets a full bucket at its new burst, the others keep their
    /// level. An error leaves the running state untouched.
    pub fn reload(&self, settings: &GcpSettings) -> Result<(), JwtSetupError> {
        let previous = self.state.load_full();
        let verifier =
            JwtVerifier::replacing(&settings.jwt, self.jwt_metrics.clone(), &previous.verifier)?;
        declare_quotas(&self.metrics, settings);
        self.state.store(Arc::new(state_with(settings, verifier)));
        Ok(())
    }

    /// Fetch every issuer's signing keys now (start-up and after reload), so the first request
    /// does not wait for the issuer. Failures are logged by the verifier.
    pub async fn prefetch(&self) {
        let state = self.state.load_full();
        state.verifier.prefetch().await;
    }

    /// Whether this front serves `path`.
    pub fn claims(&self, path: &str) -> bool {
        let state = self.state.load();
        path.strip_prefix(state.settings.prefix.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// The answer when the body exceeds the server's limit.
    pub fn too_large(&self) -> Response {
        GcpError::new(
            Code::InvalidArgument,
            Reason::RequestTooLarge,
            "request body exceeds this proxy's size limit",
        )
        .to_response(&self.ids.next())
    }

    /// The answer when the request deadline passes.
    pub fn timed_out(&self) -> Response {
        GcpError::new(
            Code::DeadlineExceeded,
            Reason::DeadlineExceeded,
            "request deadline exceeded",
        )
        .to_response(&self.ids.next())
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
        let request_id = self.ids.next();
        let state = self.state.load_full();
        let path = req.uri().path();
        let (key_path, verb) = match route(&state.settings.prefix, path) {
            Ok(found) => found,
            Err(e) => {
                tracing::info!(path = %crate::audit::LogSafe(path), listener = %conn.listener, request_id = %request_id, "unknown Cloud EKM path");
                self.metrics.observe(
                    FRONT,
                    "unknown",
                    e.code.as_str(),
                    started.elapsed().as_secs_f64(),
                );
                return e.to_response(&request_id);
            }
        };
        let mut facts = RequestFacts {
            op: verb.op_name(false),
            key: key_path.to_owned(),
            request_id: request_id.clone(),
            ..RequestFacts::default()
        };
        pipeline::record(&span, &facts);
        // Each stage returns what it learned; the facts stay here, in the request's scope.
        let result: Result<OkBody, GcpError> = 'request: {
            if req.method() != Method::POST {
                break 'request Err(GcpError::new(
                    Code::Unimplemented,
                    Reason::MethodNotAllowed,
                    "only POST is supported",
                ));
            }
            let principal = match self.authenticate(&state, &req, key_path).await {
                Ok(principal) => principal,
                Err(e) => {
                    // A refused token is a decision about a key: audit it like a denial.
                    facts.audit = true;
                    break 'request Err(e);
                }
            };
            facts.principal = principal.name().to_owned();
            if let Principal::Jwt { issuer, .. } = &principal {
                facts.tenant.clone_from(issuer);
            }
            pipeline::record(&span, &facts);
            // After authentication, so a forged flood cannot drain a service account's bucket;
            // before the key lookup and the body, so a throttled request costs next to nothing.
            if let Err(e) = self.admit(&state, &principal) {
                // A refused request for a key is audited like a refused token.
                facts.audit = true;
                break 'request Err(e);
            }
            let Some(key) = state.key(key_path) else {
                break 'request Err(GcpError::new(
                    Code::NotFound,
                    Reason::KeyNotFound,
                    "no external key at this key path",
                ));
            };
            facts.audit = true;
            if !key.enabled {
                break 'request Err(GcpError::new(
                    Code::FailedPrecondition,
                    Reason::KeyDisabled,
                    "key is disabled by the operator",
                ));
            }
            if let Some(why) = self.service.store_refusal(&StoreId::gcp()) {
                break 'request Err(GcpError::new(
                    Code::FailedPrecondition,
                    Reason::KeyDisabled,
                    why,
                ));
            }
            let body = match Body::parse(req.body(), key_path) {
                Ok(body) => body,
                Err(e) => break 'request Err(e),
            };
            facts.op = verb.op_name(body.health_check);
            facts.justification = Some(body.reason.to_string());
            facts.resource = body.resource().map(printable);
            let access = Access {
                principal: &principal,
                key,
                resource: body.resource(),
                reason: &body.reason,
                health_check: body.health_check,
            };
            let prepared = match self.prepare(&state, verb, &access, &body.request) {
                Ok(prepared) => prepared,
                Err(e) => break 'request Err(e),
            };
            facts.grant = Some(prepared.granted.grant.clone());
            self.execute(key, prepared).await
        };
        match result {
            Ok(body) => {
                let ending = Ending::ok();
                match pipeline::finish(&self.metrics, &self.audit, FRONT, &facts, ending, started) {
                    Ok(()) => body.into_response(&request_id),
                    // Fail closed: no result leaves without its audit line.
                    Err(_) => GcpError::new(
                        Code::Internal,
                        Reason::Internal,
                        "the audit trail cannot be written",
                    )
                    .to_response(&request_id),
                }
            }
            Err(e) => {
                let detail = e.reason.as_str();
                let ending = Ending {
                    detail: Some(&detail),
                    why: Some(&e.message),
                    ..Ending::failed(e.code.as_str(), e.rule.as_deref())
                };
                // A refusal goes out whether or not its line could be written.
                let _ =
                    pipeline::finish(&self.metrics, &self.audit, FRONT, &facts, ending, started);
                e.to_response(&request_id)
            }
        }
    }

    /// The service account's quota: every authenticated request of the account, key health
    /// checks included, takes one token from the account's bucket.
    fn admit(&self, state: &State, principal: &Principal) -> Result<(), GcpError> {
        let account = principal.name();
        let Some((limit, label)) = state.settings.quotas.for_service_account(account) else {
            return Ok(());
        };
        let quota = Quota {
            limit,
            identity: account,
            label,
        };
        pipeline::admit(&self.quotas, &self.metrics, FRONT, quota).map_err(|t| {
            let message = match t {
                Throttled::Exhausted => format!(
                    "request rate quota '{label}' exceeded for service account {account}; retry with backoff"
                ),
                Throttled::TooManyCallers => {
                    "too many callers are being rate-limited at once; retry with backoff".to_owned()
                }
            };
            GcpError::new(Code::ResourceExhausted, Reason::QuotaExceeded, message)
                .with("quota", label)
        })
    }

    async fn authenticate(
        &self,
        state: &State,
        req: &Request,
        key_path: &str,
    ) -> Result<Principal, GcpError> {
        let mut values = req.headers().get_all(http::header::AUTHORIZATION).iter();
        let header = values.next().map(|v| v.to_str().unwrap_or("\u{0}"));
        // Two headers are refused, never resolved by picking one: a proxy in front might have
        // checked the other (XKS refuses them the same way).
        let verified = if values.next().is_some() {
            Err(JwtError::DuplicateAuthorization)
        } else {
            state.verifier.verify(header, SystemTime::now()).await
        };
        verified.map_err(|e| {
            self.metrics.auth_failure(FRONT, e.reason());
            // The key path is named on the line itself: with no principal yet, it is what an
            // operator searches for.
            tracing::warn!(key = %key_path, reason = e.reason(), error = %e, "token refused");
            jwt_error(&e).denied_by("authentication")
        })
    }
}

/// A success body, turned into a response once the request id is known.
pub(super) struct OkBody(Vec<u8>);

impl OkBody {
    pub(super) fn json<T: serde::Serialize>(value: &T) -> Self {
        // Serializing our own response structs of strings cannot fail; an empty body would be
        // refused by any client rather than misread.
        Self(serde_json::to_vec(value).unwrap_or_default())
    }

    fn into_response(self, request_id: &str) -> Response {
        let mut resp = json_response(StatusCode::OK, self.0);
        if let Ok(v) = http::HeaderValue::from_str(request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }
}

/// Give every configured quota its metric series before the first request.
fn declare_quotas(metrics: &RequestMetrics, settings: &GcpSettings) {
    for label in settings.quotas.labels() {
        metrics.quota_declared(FRONT, label);
    }
}

fn build_state(settings: &GcpSettings, metrics: &JwtMetrics) -> Result<State, JwtSetupError> {
    let verifier = JwtVerifier::new(&settings.jwt, metrics.clone())?;
    Ok(state_with(settings, verifier))
}

fn state_with(settings: &GcpSettings, verifier: JwtVerifier) -> State {
    let keys = settings
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.path.clone(), i))
        .collect();
    State {
        settings: settings.clone(),
        keys,
        verifier,
    }
}

/// Split `<prefix>/<key path>:<verb>`.
fn route<'p>(prefix: &str, path: &'p str) -> Result<(&'p str, Verb), GcpError> {
    let unknown = || GcpError::new(Code::NotFound, Reason::UnknownPath, "unknown URI path");
    let rest = path
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(unknown)?;
    let (key_path, verb) = rest.rsplit_once(':').ok_or_else(unknown)?;
    if !super::settings::key_path_ok(key_path) {
        return Err(unknown());
    }
    match verb {
        "wrap" => Ok((key_path, Verb::Wrap)),
        "unwrap" => Ok((key_path, Verb::Unwrap)),
        _ => Err(GcpError::new(
            Code::Unimplemented,
            Reason::UnsupportedMethod,
            "only :wrap and :unwrap are supported",
        )),
    }
}

/// A `keyPath` in the body must name the key the URL names (it may be qualified by a prefix).
pub(super) fn check_key_path(body: Option<&str>, url: &str) -> Result<(), GcpError> {
    match body.filter(|p| !p.is_empty()) {
        None => Ok(()),
        Some(p) if p == url || p.ends_with(&format!("/{url}")) => Ok(()),
        Some(_) => Err(GcpError::invalid_field(
            "keyPath",
            "does not match the key path in the URI",
        )),
    }
}

pub(super) fn parse(body: &[u8]) -> Result<KeyOpRequest, GcpError> {
    pipeline::parse_json(body).map_err(|e| {
        let what = match e {
            JsonError::WrongShape => "a field has the wrong type",
            JsonError::NotJson => "request body is not valid JSON",
        };
        GcpError::new(Code::InvalidArgument, Reason::MalformedRequest, what)
    })
}

pub(super) fn decode_required(
    name: &'static str,
    value: Option<&str>,
    max: usize,
) -> Result<Vec<u8>, GcpError> {
    match value.filter(|v| !v.is_empty()) {
        None => Err(GcpError::invalid_field(name, "is required")),
        Some(v) => decode_bounded(name, v, max),
    }
}

pub(super) fn decode_optional(
    name: &'static str,
    value: Option<&str>,
    max: usize,
) -> Result<Option<Vec<u8>>, GcpError> {
    value.map(|v| decode_bounded(name, v, max)).transpose()
}

fn decode_bounded(name: &'static str, value: &str, max: usize) -> Result<Vec<u8>, GcpError> {
    // proto3 JSON `bytes`: standard or URL-safe base64, padded or not.
    pipeline::decode_bounded(value, Base64::Proto3, max).map_err(|e| match e {
        FieldError::Invalid => GcpError::invalid_field(name, "is not valid base64"),
        FieldError::TooLarge { max } => {
            GcpError::invalid_field(name, format!("exceeds this proxy's limit of {max} bytes"))
        }
    })
}

fn jwt_error(e: &JwtError) -> GcpError {
    if e.is_unavailable() {
        return GcpError::new(
            Code::Unavailable,
            Reason::JwksUnavailable,
            "the token issuer's signing keys cannot be fetched; retry later",
        );
    }
    GcpError::new(
        Code::Unauthenticated,
        Reason::Token(*e),
        format!("token refused: {e}"),
    )
}

pub(super) fn crypto_error(e: &CryptoError) -> GcpError {
    match e {
        CryptoError::Internal(_) => {
            tracing::error!(front = FRONT, error = %e, "key operation failed");
        }
        // An HSM outage is logged once, at its start and end, by the HSM layer; each request's
        // own line (and audit event) still records its outcome.
        _ => tracing::debug!(front = FRONT, error = %e, "key operation refused"),
    }
    from_crypto(e)
}

/// At most 256 printable ASCII characters of caller input, for audit lines.
fn printable(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(256)
        .collect()
}

/// Request ids: a per-process random prefix and a counter, unique without coordination.
struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        // RandomState is seeded from the OS; only uniqueness across restarts matters here.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Self {
            prefix: (h.finish() >> 32) as u32,
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("gcp-{:08x}-{n}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_key_paths_and_verbs() {
        let p = "/gcp/v0/keys";
        assert_eq!(
            route(p, "/gcp/v0/keys/dev-aes-1:wrap").unwrap(),
            ("dev-aes-1", Verb::Wrap)
        );
        assert_eq!(
            route(p, "/gcp/v0/keys/ring/a.b_c-1:unwrap").unwrap(),
            ("ring/a.b_c-1", Verb::Unwrap)
        );
        assert_eq!(
            route(p, "/gcp/v0/keys/k:confidential-wrap")
                .unwrap_err()
                .code,
            Code::Unimplemented
        );
        for bad in [
            "/gcp/v0/keys/:wrap",
            "/gcp/v0/keys/k",
            "/gcp/v0/keysk:wrap",
            "/gcp/v0/keys/../k:wrap",
            "/gcp/v0/keys/a//b:wrap",
            "/other/k:wrap",
        ] {
            assert_eq!(route(p, bad).unwrap_err().code, Code::NotFound, "{bad}");
        }
    }

    #[test]
    fn body_key_path_must_match() {
        assert!(check_key_path(None, "k").is_ok());
        assert!(check_key_path(Some(""), "k").is_ok());
        assert!(check_key_path(Some("k"), "k").is_ok());
        assert!(check_key_path(Some("gcp/v0/keys/k"), "k").is_ok());
        assert!(check_key_path(Some("other"), "k").is_err());
        assert!(check_key_path(Some("xk"), "k").is_err());
    }

    #[test]
    fn request_ids_are_unique() {
        let ids = RequestIds::new();
        assert_ne!(ids.next(), ids.next());
    }
}
