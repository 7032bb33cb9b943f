//! The Cloud EKM request handler: routing within the front, Bearer-token authentication, key
//! lookup, validation, per-key authorization with Key Access Justifications, the wrap or unwrap
//! in the HSM, the response, and one log line + audit line + metric per request.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use zeroize::Zeroizing;

use super::blob::{self, FLAG_HEALTH_CHECK};
use super::error::{Code, GcpError, from_crypto};
use super::settings::{GcpKeySettings, GcpSettings};
use super::wire::{self, KeyOpRequest, RequestContext};
use crate::audit::{self, AuditEvent};
use crate::auth::Principal;
use crate::auth::jwt::{JwtError, JwtSetupError, JwtVerifier};
use crate::authz::access_reason::AccessReason;
use crate::authz::grants::{AccessRequest, Granted};
use crate::core::{Backend, CryptoError, KeyService, Operation};
use crate::front::{ConnInfo, Request, Response, json_response};
use crate::metrics::{JwtMetrics, RequestMetrics};

/// Front name in metrics, logs and audit lines.
const FRONT: &str = "gcp";
/// The most a blob adds to its plaintext: header (3) + key version id (≤ 255) + IV + tag.
const BLOB_OVERHEAD: usize = 3 + 255 + blob::IV_LEN + crate::core::GCM_TAG_LEN;

/// Everything that can be replaced by a reload.
struct State {
    settings: GcpSettings,
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
    service: Arc<KeyService<B>>,
    metrics: RequestMetrics,
    jwt_metrics: JwtMetrics,
    ids: RequestIds,
}

/// The two operations of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Wrap,
    Unwrap,
}

/// What one request produced, for the log line, the audit line and the metrics.
#[derive(Default)]
struct Outcome {
    request_id: String,
    principal: String,
    issuer: String,
    key: String,
    rule: Option<String>,
    grant: Option<String>,
    justification: Option<String>,
    resource: Option<String>,
    health_check: bool,
    audit: bool,
}

impl<B: Backend> GcpFront<B> {
    /// Build the front from validated settings.
    pub fn new(
        settings: &GcpSettings,
        service: Arc<KeyService<B>>,
        metrics: RequestMetrics,
        jwt_metrics: JwtMetrics,
    ) -> Result<Self, JwtSetupError> {
        Ok(Self {
            state: ArcSwap::from_pointee(build_state(settings, &jwt_metrics)?),
            service,
            metrics,
            jwt_metrics,
            ids: RequestIds::new(),
        })
    }

    /// Replace issuers, keys, grants and limits (SIGHUP). The verifier is rebuilt, so verified
    /// tokens from the old configuration are dropped with it; key sets are not: a `jwks_file`
    /// must parse now, and an unchanged JWKS URL keeps its last good set. An error leaves the
    /// running state untouched.
    pub fn reload(&self, settings: &GcpSettings) -> Result<(), JwtSetupError> {
        let previous = self.state.load_full();
        let verifier =
            JwtVerifier::replacing(&settings.jwt, self.jwt_metrics.clone(), &previous.verifier)?;
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
            "REQUEST_TOO_LARGE",
            "request body exceeds this proxy's size limit",
        )
        .to_response(&self.ids.next())
    }

    /// The answer when the request deadline passes.
    pub fn timed_out(&self) -> Response {
        GcpError::new(
            Code::DeadlineExceeded,
            "DEADLINE_EXCEEDED",
            "request deadline exceeded",
        )
        .to_response(&self.ids.next())
    }

    /// Handle one request.
    pub async fn handle(&self, req: Request, conn: &ConnInfo) -> Response {
        let started = Instant::now();
        let request_id = self.ids.next();
        let state = self.state.load_full();
        let path = req.uri().path();
        let (key_path, verb) = match route(&state.settings.prefix, path) {
            Ok(found) => found,
            Err(e) => {
                tracing::info!(front = FRONT, path = %crate::audit::LogSafe(path), listener = %conn.listener, request_id = %request_id, "unknown Cloud EKM path");
                self.metrics.observe(
                    FRONT,
                    "unknown",
                    e.code.as_str(),
                    started.elapsed().as_secs_f64(),
                );
                return e.to_response(&request_id);
            }
        };
        let mut outcome = Outcome {
            request_id: request_id.clone(),
            key: key_path.to_owned(),
            ..Outcome::default()
        };
        let result = if req.method() == Method::POST {
            self.dispatch(&state, key_path, verb, &req, &mut outcome)
                .await
        } else {
            Err(GcpError::new(
                Code::Unimplemented,
                "METHOD_NOT_ALLOWED",
                "only POST is supported",
            ))
        };
        let elapsed = started.elapsed();
        let op = match (verb, outcome.health_check) {
            (Verb::Wrap, false) => "wrap",
            (Verb::Wrap, true) => "wrap_health_check",
            (Verb::Unwrap, false) => "unwrap",
            (Verb::Unwrap, true) => "unwrap_health_check",
        };
        let (response, outcome_name, why, detail) = match result {
            Ok(body) => (body.into_response(&request_id), "ok", None, None),
            Err(e) => (
                e.to_response(&request_id),
                e.code.as_str(),
                Some(e.message),
                Some(e.reason),
            ),
        };
        self.metrics
            .observe(FRONT, op, outcome_name, elapsed.as_secs_f64());
        let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let reason = why.as_deref();
        if outcome.audit {
            audit::record(&AuditEvent {
                front: FRONT,
                tenant: &outcome.issuer,
                op,
                key: &outcome.key,
                principal: &outcome.principal,
                request_id: &request_id,
                decision: match (outcome_name, &outcome.rule) {
                    (_, Some(_)) => "deny",
                    ("ok", None) => "allow",
                    _ => "error",
                },
                // The specific condition (EXPIRED, ACCESS_DENIED, UNWRAP_FAILED…), not just the code.
                outcome: detail.as_deref().unwrap_or(outcome_name),
                rule: outcome.rule.as_deref(),
                grant: outcome.grant.as_deref(),
                justification: outcome.justification.as_deref(),
                resource: outcome.resource.as_deref(),
                correlation_id: None,
                pool: None,
                latency_us,
            });
            if let Some(why) = reason.filter(|_| outcome.rule.is_none()) {
                tracing::info!(front = FRONT, request_id = %request_id, key = %outcome.key, why = %audit::bounded(why), "request refused");
            }
        } else {
            tracing::info!(
                front = FRONT,
                op,
                key = %outcome.key,
                request_id = %request_id,
                principal = %audit::bounded(&outcome.principal),
                outcome = outcome_name,
                why = %audit::bounded(reason.unwrap_or("")),
                latency_us,
                "request"
            );
        }
        response
    }

    async fn dispatch(
        &self,
        state: &State,
        key_path: &str,
        verb: Verb,
        req: &Request,
        outcome: &mut Outcome,
    ) -> Result<OkBody, GcpError> {
        let principal = self.authenticate(state, req, outcome).await?;
        outcome.principal = principal.name().to_owned();
        if let Principal::Jwt { issuer, .. } = &principal {
            outcome.issuer.clone_from(issuer);
        }
        let key = state.key(key_path).ok_or_else(|| {
            GcpError::new(
                Code::NotFound,
                "KEY_NOT_FOUND",
                "no external key at this key path",
            )
        })?;
        outcome.audit = true;
        if !key.enabled {
            return Err(GcpError::new(
                Code::FailedPrecondition,
                "KEY_DISABLED",
                "key is disabled by the operator",
            ));
        }
        let parsed: KeyOpRequest = parse(req.body())?;
        check_key_path(parsed.key_path.as_deref(), key_path)?;
        let context = parsed.additional_context.as_ref();
        let reason = RequestContext::access_reason(context).map_err(|e| {
            GcpError::invalid_field(
                "additionalContext.accessReasonContext.reason",
                e.to_string(),
            )
        })?;
        let health_check = context.and_then(|c| c.is_key_health_check) == Some(true);
        let resource = context
            .and_then(|c| c.relative_resource_name.as_deref())
            .filter(|r| !r.is_empty());
        outcome.health_check = health_check;
        outcome.justification = Some(reason.to_string());
        outcome.resource = resource.map(printable);
        let limits = state.settings.limits;
        let aad = decode_optional(
            "additionalAuthenticatedData",
            parsed.additional_authenticated_data.as_deref(),
            limits.max_aad,
        )?
        .unwrap_or_default();
        let request = Access {
            principal: &principal,
            key,
            resource,
            reason: &reason,
            health_check,
        };
        match verb {
            Verb::Wrap => {
                let plaintext = Zeroizing::new(decode_required(
                    "plaintext",
                    parsed.plaintext.as_deref(),
                    limits.max_plaintext,
                )?);
                let granted = self.authorize(&request, Operation::Wrap, &key.hsm_key, outcome)?;
                let flags = if health_check { FLAG_HEALTH_CHECK } else { 0 };
                let full_aad = blob::aad(&key.path, flags, &key.hsm_key, &aad);
                let sealed = self
                    .service
                    .encrypt(&granted.permit, plaintext, full_aad, false)
                    .await
                    .map_err(|e| crypto_error(&e))?;
                let blob = blob::encode(
                    flags,
                    &key.hsm_key,
                    &sealed.iv,
                    &sealed.ciphertext,
                    &sealed.tag,
                );
                Ok(OkBody::json(&wire::WrapResponse {
                    wrapped_blob: wire::b64_encode(&blob),
                }))
            }
            Verb::Unwrap => {
                let raw = decode_required(
                    "wrappedBlob",
                    parsed.wrapped_blob.as_deref(),
                    limits.max_plaintext.saturating_add(BLOB_OVERHEAD),
                )?;
                let parsed_blob = blob::parse(&raw)
                    .map_err(|e| GcpError::invalid_field("wrappedBlob", e.to_string()))?;
                if !key.accepts_version(parsed_blob.key_version) {
                    return Err(GcpError::new(
                        Code::InvalidArgument,
                        "UNKNOWN_KEY_VERSION",
                        "wrappedBlob was made by a key version this key path does not accept",
                    ));
                }
                if health_check && !parsed_blob.is_health_check() {
                    // Health checks may skip justification policy, so they must never be able
                    // to open real data.
                    return Err(GcpError::new(
                        Code::InvalidArgument,
                        "HEALTH_CHECK_BLOB_REQUIRED",
                        "a key health check can only unwrap a blob made by a key health check",
                    ));
                }
                let granted = self.authorize(
                    &request,
                    Operation::Unwrap,
                    parsed_blob.key_version,
                    outcome,
                )?;
                let full_aad =
                    blob::aad(&key.path, parsed_blob.flags, parsed_blob.key_version, &aad);
                let plaintext = self
                    .service
                    .decrypt(
                        &granted.permit,
                        parsed_blob.iv.to_vec(),
                        parsed_blob.ciphertext.to_vec(),
                        parsed_blob.tag,
                        full_aad,
                    )
                    .await
                    .map_err(|e| crypto_error(&e))?;
                let encoded = Zeroizing::new(wire::b64_encode(&plaintext));
                Ok(OkBody::json(&wire::UnwrapResponse {
                    plaintext: &encoded,
                }))
            }
        }
    }

    async fn authenticate(
        &self,
        state: &State,
        req: &Request,
        outcome: &mut Outcome,
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
                tracing::warn!(front = FRONT, key = %outcome.key, request_id = %outcome.request_id, reason = e.reason(), error = %e, "token refused");
                // A refused token is a decision about a key: audit it like a denial.
                outcome.audit = true;
                outcome.rule = Some("authentication".into());
                jwt_error(&e)
            })
    }

    fn authorize(
        &self,
        req: &Access<'_>,
        op: Operation,
        hsm_key: &str,
        outcome: &mut Outcome,
    ) -> Result<Granted, GcpError> {
        let granted = req
            .key
            .access
            .authorize(&AccessRequest {
                principal: req.principal,
                key: &req.key.path,
                hsm_key,
                op,
                resource_name: req.resource,
                reason: req.reason,
                health_check: req.health_check,
            })
            .map_err(|denial| {
                tracing::warn!(front = FRONT, key = %req.key.path, request_id = %outcome.request_id, principal = %audit::bounded(req.principal.name()), rule = %denial.rule, reason = %audit::bounded(&denial.reason), "request denied by policy");
                outcome.rule = Some(denial.rule.clone());
                GcpError::new(Code::PermissionDenied, "ACCESS_DENIED", denial.to_string())
                    .with("rule", denial.rule)
            })?;
        outcome.grant = Some(granted.grant.clone());
        Ok(granted)
    }
}

/// The request facts authorization needs.
struct Access<'a> {
    principal: &'a Principal,
    key: &'a GcpKeySettings,
    resource: Option<&'a str>,
    reason: &'a AccessReason,
    health_check: bool,
}

/// A success body, turned into a response once the request id is known.
struct OkBody(Vec<u8>);

impl OkBody {
    fn json<T: serde::Serialize>(value: &T) -> Self {
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
    let unknown = || GcpError::new(Code::NotFound, "UNKNOWN_PATH", "unknown URI path");
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
            "UNSUPPORTED_METHOD",
            "only :wrap and :unwrap are supported",
        )),
    }
}

/// A `keyPath` in the body must name the key the URL names (it may be qualified by a prefix).
fn check_key_path(body: Option<&str>, url: &str) -> Result<(), GcpError> {
    match body.filter(|p| !p.is_empty()) {
        None => Ok(()),
        Some(p) if p == url || p.ends_with(&format!("/{url}")) => Ok(()),
        Some(_) => Err(GcpError::invalid_field(
            "keyPath",
            "does not match the key path in the URI",
        )),
    }
}

fn parse(body: &[u8]) -> Result<KeyOpRequest, GcpError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "a field has the wrong type",
            _ => "request body is not valid JSON",
        };
        GcpError::new(Code::InvalidArgument, "MALFORMED_REQUEST", what)
    })
}

fn decode_required(
    name: &'static str,
    value: Option<&str>,
    max: usize,
) -> Result<Vec<u8>, GcpError> {
    match value.filter(|v| !v.is_empty()) {
        None => Err(GcpError::invalid_field(name, "is required")),
        Some(v) => decode_bounded(name, v, max),
    }
}

fn decode_optional(
    name: &'static str,
    value: Option<&str>,
    max: usize,
) -> Result<Option<Vec<u8>>, GcpError> {
    value.map(|v| decode_bounded(name, v, max)).transpose()
}

fn decode_bounded(name: &'static str, value: &str, max: usize) -> Result<Vec<u8>, GcpError> {
    // Refuse what is certainly too large before decoding (padding makes the bound 2 bytes high).
    if wire::decoded_len_upper_bound(value.len()) > max.saturating_add(2) {
        return Err(GcpError::invalid_field(
            name,
            format!("exceeds this proxy's limit of {max} bytes"),
        ));
    }
    let bytes = wire::b64_decode(value)
        .map_err(|_| GcpError::invalid_field(name, "is not valid base64"))?;
    if bytes.len() > max {
        return Err(GcpError::invalid_field(
            name,
            format!("exceeds this proxy's limit of {max} bytes"),
        ));
    }
    Ok(bytes)
}

fn jwt_error(e: &JwtError) -> GcpError {
    if e.is_unavailable() {
        return GcpError::new(
            Code::Unavailable,
            "JWKS_UNAVAILABLE",
            "the token issuer's signing keys cannot be fetched; retry later",
        );
    }
    GcpError::new(
        Code::Unauthenticated,
        e.reason().to_ascii_uppercase(),
        format!("token refused: {e}"),
    )
}

fn crypto_error(e: &CryptoError) -> GcpError {
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
