//! The Azure request handler. Everything a request's log and audit line needs (prefix, key,
//! certificate subject, request context) is learned before the operation runs, so each operation
//! is a plain function returning `Result<Response, AzureError>`.
//!
//! Order per request: route (prefix, operation, key id rules) → POST only → `api-version` →
//! client certificate (the prefix's CA and subjects) → the subject's request-rate quota → body
//! and `request_context` → key exposure → per-prefix switch → rules → `core::KeyService` →
//! base64url answer.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::Method;
use rustls::pki_types::UnixTime;
use tracing::Instrument;
use zeroize::Zeroizing;

use super::error::{AzureError, Code, from_crypto};
use super::settings::{AzureSettings, PrefixSettings, valid_key_id};
use super::wire::{self, API_VERSION, MAX_CONTEXT_FIELD, RequestContext};
use crate::audit::Audit;
use crate::auth::Principal;
use crate::auth::client_cert::PresentedCertificate;
use crate::authz::{Permit, decide};
use crate::core::quota::{Quotas, Throttled, scoped_identity};
use crate::core::state::StoreId;
use crate::core::{
    Backend, HealthStatus, KeyService, KeyStatus, KeyType, Operation, WrapAlgorithm,
};
use crate::front::pipeline::{self, Base64, Ending, JsonError, Quota, RequestFacts};
use crate::front::xks::NotServed;
use crate::front::{ConnInfo, Request, Response, json_response};
use crate::metrics::RequestMetrics;

/// Front name in metrics, logs and audit lines.
const FRONT: &str = "azure";
/// Largest value accepted for wrapping or unwrapping (decoded): an RSA-4096 private key in DER
/// wrapped with A256KWP is under 2.5 KiB; Azure wraps AES keys of 32 bytes.
const MAX_VALUE: usize = 16 * 1024;

/// Everything a reload replaces.
struct State {
    settings: AzureSettings,
}

/// The Azure Managed HSM front end.
pub struct AzureFront<B: Backend> {
    state: ArcSwap<State>,
    service: Arc<KeyService<B>>,
    metrics: RequestMetrics,
    /// One bucket per (prefix, certificate subject). Outside `State`: a reload keeps the levels.
    quotas: Quotas,
    proxy_name: String,
    audit: Audit,
}

/// The operation a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op<'p> {
    Info,
    Metadata(&'p str),
    WrapKey(&'p str),
    UnwrapKey(&'p str),
}

impl<'p> Op<'p> {
    fn name(self) -> &'static str {
        match self {
            Op::Info => "info",
            Op::Metadata(_) => "metadata",
            Op::WrapKey(_) => "wrapkey",
            Op::UnwrapKey(_) => "unwrapkey",
        }
    }

    fn key(self) -> Option<&'p str> {
        match self {
            Op::Info => None,
            Op::Metadata(k) | Op::WrapKey(k) | Op::UnwrapKey(k) => Some(k),
        }
    }

    fn operation(self) -> Option<Operation> {
        match self {
            Op::Info => None,
            Op::Metadata(_) => Some(Operation::KeyMetadata),
            Op::WrapKey(_) => Some(Operation::Wrap),
            Op::UnwrapKey(_) => Some(Operation::Unwrap),
        }
    }
}

/// A routed request: its prefix and operation.
struct Routed<'s, 'p> {
    prefix: &'s PrefixSettings,
    op: Op<'p>,
}

impl<B: Backend> AzureFront<B> {
    /// Build the front from validated settings.
    pub fn new(
        settings: &AzureSettings,
        service: Arc<KeyService<B>>,
        metrics: RequestMetrics,
    ) -> Self {
        declare_quotas(&metrics, settings);
        Self {
            state: ArcSwap::from_pointee(State {
                settings: settings.clone(),
            }),
            service,
            metrics,
            quotas: Quotas::new(),
            proxy_name: format!("ekm-proxy {}", env!("CARGO_PKG_VERSION")),
            audit: Audit::to_log(),
        }
    }

    /// Send audit events to `audit` (default: the operational log).
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = audit;
        self
    }

    /// Replace prefixes, certificate policies, keys, rules and quotas (SIGHUP). In-flight
    /// requests finish with the state they started with; a subject whose prefix's quota changed
    /// gets a full bucket at the new burst, the others keep their level.
    pub fn reload(&self, settings: &AzureSettings) {
        declare_quotas(&self.metrics, settings);
        self.state.store(Arc::new(State {
            settings: settings.clone(),
        }));
    }

    /// Whether this front serves `path`: under one of its prefixes.
    pub fn claims(&self, path: &str) -> bool {
        self.state
            .load()
            .settings
            .prefixes
            .iter()
            .any(|p| under(path, &p.prefix).is_some())
    }

    /// The answer when the body exceeds the server's limit.
    pub fn too_large(&self) -> Response {
        AzureError::new(
            Code::InvalidRequest,
            "request body exceeds this proxy's size limit",
        )
        .to_response()
    }

    /// The answer when the request deadline passes.
    pub fn timed_out(&self) -> Response {
        AzureError::new(Code::GatewayTimeout, "request deadline exceeded").to_response()
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
        let mut facts = RequestFacts::default();
        let result = match route(&state.settings, req.uri().path()) {
            Err(e) => Err(e),
            Ok(routed) => {
                facts.tenant = routed.prefix.name.clone();
                facts.op = routed.op.name();
                facts.key = routed.op.key().unwrap_or_default().to_owned();
                match self.prepare(&routed, &req, conn, &mut facts) {
                    Ok((principal, context)) => {
                        pipeline::record(&span, &facts);
                        self.run(&routed, &principal, &context, req.body()).await
                    }
                    Err(e) => {
                        pipeline::record(&span, &facts);
                        Err(e)
                    }
                }
            }
        };
        match result {
            Ok(response) => {
                let ending = Ending::ok();
                match pipeline::finish(&self.metrics, &self.audit, FRONT, &facts, ending, started) {
                    Ok(()) => response,
                    // Fail closed: no result leaves without its audit line.
                    Err(_) => {
                        AzureError::new(Code::InternalError, "the audit trail cannot be written")
                            .to_response()
                    }
                }
            }
            Err(e) => {
                let ending = Ending::failed(e.code.as_str(), e.rule.as_deref());
                // A refusal goes out whether or not its line could be written.
                let _ =
                    pipeline::finish(&self.metrics, &self.audit, FRONT, &facts, ending, started);
                e.to_response()
            }
        }
    }

    /// Everything before the operation: method, api-version, key id, certificate, body context.
    /// Fills `facts` as it learns them (they are the request's, whatever the outcome).
    fn prepare(
        &self,
        routed: &Routed<'_, '_>,
        req: &Request,
        conn: &ConnInfo,
        facts: &mut RequestFacts,
    ) -> Result<(Principal, Context), AzureError> {
        if req.method() != Method::POST {
            return Err(AzureError::new(
                Code::MethodNotAllowed,
                "only POST is allowed",
            ));
        }
        check_api_version(req.uri().query())?;
        if let Some(key) = routed.op.key()
            && !valid_key_id(key)
        {
            return Err(AzureError::new(
                Code::InvalidRequest,
                "the key identifier must be 1 to 64 characters of A-Z, a-z, 0-9 and -",
            ));
        }
        let presented = conn.peer.as_deref().map(|peer| PresentedCertificate {
            chain: &peer.chain,
            subject_cn: peer.subject_cn.as_deref(),
            dns_names: &peer.dns_names,
            fingerprint: &peer.sha256_fingerprint,
        });
        let principal = routed
            .prefix
            .auth
            .authenticate(presented, UnixTime::now())
            .map_err(|e| {
                self.metrics.auth_failure(FRONT, e.reason());
                tracing::warn!(prefix = %routed.prefix.name, listener = %conn.listener, reason = e.reason(), "client certificate refused");
                AzureError::new(Code::Unauthorized, e.to_string())
            })?;
        facts.principal = principal.name().to_owned();
        // After the certificate, so an unauthenticated flood cannot drain a caller's bucket;
        // before the body is parsed or the HSM touched, so a throttled request costs next to
        // nothing.
        if let Err(e) = self.admit(routed.prefix, &principal) {
            // A refused key operation is audited like any other refusal (without the request id:
            // it lives in the body, which a throttled request never gets parsed).
            facts.audit = routed.op.key().is_some();
            return Err(e);
        }
        let body: wire::ContextOnlyRequest<'_> =
            pipeline::parse_json(req.body()).map_err(json_error)?;
        let context = Context::from_wire(body.request_context)?;
        facts.request_id = context.request_id.clone();
        facts.correlation_id = Some(context.correlation_id.clone());
        facts.pool = Some(context.pool_name.clone());
        facts.audit = routed.op.key().is_some();
        Ok((principal, context))
    }

    /// The prefix's quota: every authenticated request of one certificate subject under the
    /// prefix, `/info` probes included, takes one token from that subject's bucket.
    fn admit(&self, prefix: &PrefixSettings, principal: &Principal) -> Result<(), AzureError> {
        let Some(limit) = prefix.quota else {
            return Ok(());
        };
        // Subjects match case-insensitively, so one caller is one bucket however its
        // certificate spells its name.
        let identity = scoped_identity(&prefix.name, &principal.name().to_ascii_lowercase());
        let quota = Quota {
            limit,
            identity: &identity,
            // The prefix, not the subject: one series per configured prefix, whatever names the
            // certificates carry (the audit line names the subject).
            label: &prefix.name,
        };
        pipeline::admit(&self.quotas, &self.metrics, FRONT, quota).map_err(|t| {
            let message = match t {
                Throttled::Exhausted => format!(
                    "request rate quota of prefix '{}' exceeded for this client certificate; retry with backoff",
                    prefix.name
                ),
                Throttled::TooManyCallers => {
                    "too many callers are being rate-limited at once; retry with backoff".to_owned()
                }
            };
            AzureError::new(Code::TooManyRequests, message)
        })
    }

    async fn run(
        &self,
        routed: &Routed<'_, '_>,
        principal: &Principal,
        context: &Context,
        body: &[u8],
    ) -> Result<Response, AzureError> {
        let prefix = routed.prefix;
        let (Some(key), Some(op)) = (routed.op.key(), routed.op.operation()) else {
            return self.info().await;
        };
        let permit = authorize(prefix, principal, context, key, op)?;
        if let Some(why) = self.service.store_refusal(&StoreId::azure(&prefix.name)) {
            return Err(AzureError::new(Code::Forbidden, why));
        }
        match routed.op {
            Op::Metadata(_) => self.metadata(&permit).await,
            Op::WrapKey(_) => self.wrap(&permit, body).await,
            Op::UnwrapKey(_) => self.unwrap(&permit, body).await,
            Op::Info => self.info().await,
        }
    }

    /// `/info`: identity and the algorithms the HSM supports; 503 while the HSM is unavailable
    /// (MHSM uses it as its health probe).
    async fn info(&self) -> Result<Response, AzureError> {
        let report = self.service.health_report().await;
        if report.status == HealthStatus::Unavailable {
            tracing::warn!(detail = %report.detail, "info answered 503: the HSM is unavailable");
            return Err(AzureError::new(
                Code::ServiceUnavailable,
                "the HSM is unavailable",
            ));
        }
        let state = self.state.load();
        let settings = &state.settings;
        Ok(json(&wire::InfoResponse {
            api_version: API_VERSION,
            proxy_vendor: &settings.vendor,
            proxy_name: &self.proxy_name,
            ekm_vendor: &settings.ekm_vendor,
            ekm_product: &settings.ekm_product,
            supported_algorithms: self.service.wrap_support().names(),
        }))
    }

    async fn metadata(&self, permit: &Permit) -> Result<Response, AzureError> {
        let (info, status) = self
            .service
            .key_metadata(permit)
            .await
            .map_err(|e| crypto_error(&e))?;
        if let KeyStatus::Disabled(why) = status {
            tracing::warn!(reason = %why, "metadata of a disabled key refused");
            return Err(AzureError::new(Code::Forbidden, "key is disabled"));
        }
        // The operations this key can do here: by the algorithms of its type the HSM supports,
        // and the attributes the HSM checks for them.
        let support = self.service.wrap_support();
        let (mut can_wrap, mut can_unwrap) = (false, false);
        for alg in WrapAlgorithm::ALL {
            if alg.check_key(&info).is_ok() && support.supports(alg) {
                let (w, u) = self.service.wrap_usage(&info, alg);
                can_wrap |= w;
                can_unwrap |= u;
            }
        }
        let key_ops: Vec<&'static str> = [(can_wrap, "wrapKey"), (can_unwrap, "unwrapKey")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        let resp = match (&info.key_type, info.bits) {
            (KeyType::Aes, 256) => wire::MetadataResponse {
                key_type: "oct",
                key_size: 256,
                key_ops,
                n: None,
                e: None,
            },
            (KeyType::Rsa, bits @ (2048 | 3072 | 4096)) => {
                let public = info.rsa_public.as_ref().ok_or_else(|| {
                    AzureError::new(
                        Code::InternalError,
                        "the HSM did not report the RSA public key",
                    )
                })?;
                wire::MetadataResponse {
                    key_type: "RSA",
                    key_size: bits,
                    key_ops,
                    n: Some(pipeline::encode(&public.modulus, Base64::UrlNoPad)),
                    e: Some(pipeline::encode(&public.exponent, Base64::UrlNoPad)),
                }
            }
            _ => {
                return Err(AzureError::new(
                    Code::InvalidRequest,
                    format!(
                        "key is {}; the EKM proxy API serves AES-256 and RSA 2048/3072/4096 keys",
                        info.key_spec()
                    ),
                ));
            }
        };
        Ok(json(&resp))
    }

    async fn wrap(&self, permit: &Permit, body: &[u8]) -> Result<Response, AzureError> {
        let (alg, value) = parse_wrap(body)?;
        let wrapped = self
            .service
            .wrap_key(permit, alg, Zeroizing::new(value))
            .await
            .map_err(|e| crypto_error(&e))?;
        let encoded = pipeline::encode(&wrapped, Base64::UrlNoPad);
        Ok(json(&wire::ValueResponse { value: &encoded }))
    }

    async fn unwrap(&self, permit: &Permit, body: &[u8]) -> Result<Response, AzureError> {
        let (alg, value) = parse_wrap(body)?;
        let plaintext = self
            .service
            .unwrap_key(permit, alg, value)
            .await
            .map_err(|e| crypto_error(&e))?;
        let encoded = Zeroizing::new(pipeline::encode(&plaintext, Base64::UrlNoPad));
        let resp = json(&wire::ValueResponse { value: &encoded });
        Ok(resp)
    }
}

/// Give every configured quota its metric series before the first request.
fn declare_quotas(metrics: &RequestMetrics, settings: &AzureSettings) {
    for prefix in settings.prefixes.iter().filter(|p| p.quota.is_some()) {
        metrics.quota_declared(FRONT, &prefix.name);
    }
}

/// The request context every body carries, checked.
struct Context {
    /// `request_id`, or the correlation id when absent.
    request_id: String,
    correlation_id: String,
    pool_name: String,
}

impl Context {
    fn from_wire(context: Option<RequestContext<'_>>) -> Result<Self, AzureError> {
        let context = context
            .ok_or_else(|| AzureError::new(Code::InvalidRequest, "request_context is required"))?;
        let field = |name: &str, value: Option<&str>| -> Result<Option<String>, AzureError> {
            match value {
                None => Ok(None),
                Some(v)
                    if !v.is_empty()
                        && v.len() <= MAX_CONTEXT_FIELD
                        && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ') =>
                {
                    Ok(Some(v.to_owned()))
                }
                Some(_) => Err(AzureError::new(
                    Code::InvalidRequest,
                    format!(
                        "request_context.{name} must be 1 to {MAX_CONTEXT_FIELD} printable ASCII characters"
                    ),
                )),
            }
        };
        let required = |name: &str, value: Option<&str>| {
            field(name, value)?.ok_or_else(|| {
                AzureError::new(
                    Code::InvalidRequest,
                    format!("request_context.{name} is required"),
                )
            })
        };
        let correlation_id = required("correlation_id", context.correlation_id.as_deref())?;
        let pool_name = required("pool_name", context.pool_name.as_deref())?;
        let request_id = field("request_id", context.request_id.as_deref())?
            .unwrap_or_else(|| correlation_id.clone());
        Ok(Self {
            request_id,
            correlation_id,
            pool_name,
        })
    }
}

/// `alg` and the decoded `value` of a wrap or unwrap body.
fn parse_wrap(body: &[u8]) -> Result<(WrapAlgorithm, Vec<u8>), AzureError> {
    let parsed: wire::WrapRequest<'_> = pipeline::parse_json(body).map_err(json_error)?;
    let alg = parsed
        .alg
        .as_deref()
        .ok_or_else(|| AzureError::new(Code::InvalidRequest, "alg is required"))?;
    let alg = WrapAlgorithm::from_name(alg).ok_or_else(|| {
        let names: Vec<&str> = WrapAlgorithm::ALL.iter().map(|a| a.name()).collect();
        AzureError::new(
            Code::InvalidRequest,
            format!("alg must be one of {}", names.join(", ")),
        )
    })?;
    let value = parsed
        .value
        .as_deref()
        .ok_or_else(|| AzureError::new(Code::InvalidRequest, "value is required"))?;
    let value = pipeline::decode_bounded(value, Base64::UrlNoPad, MAX_VALUE)
        .map_err(|e| AzureError::new(Code::InvalidRequest, e.message("value", Base64::UrlNoPad)))?;
    Ok((alg, value))
}

/// The prefix's key list, its switch, then its rules (`authz::decide`, the code `policy explain`
/// runs too).
fn authorize(
    prefix: &PrefixSettings,
    principal: &Principal,
    context: &Context,
    key: &str,
    op: Operation,
) -> Result<Permit, AzureError> {
    prefix.serves(key).map_err(|refusal| match refusal {
        NotServed::NotExposed => AzureError::new(Code::KeyNotFound, "key not found"),
        NotServed::Disabled => AzureError::new(
            Code::Forbidden,
            "this path prefix is disabled by the operator",
        ),
    })?;
    let request = decide::AzureRequest {
        principal,
        key,
        op,
        pool_name: &context.pool_name,
    };
    decide::azure(&prefix.policy, &request)
        .outcome
        .map_err(|denial| AzureError::denied(&denial.rule, denial.to_string()))
}

/// The api-version query parameter must be present and exactly the one version we speak.
fn check_api_version(query: Option<&str>) -> Result<(), AzureError> {
    let mut versions = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("api-version="));
    match (versions.next(), versions.next()) {
        (Some(API_VERSION), None) => Ok(()),
        (None, _) => Err(AzureError::new(
            Code::InvalidRequest,
            format!("the api-version query parameter is required ({API_VERSION})"),
        )),
        _ => Err(AzureError::new(
            Code::InvalidRequest,
            format!("unsupported api-version; this proxy speaks {API_VERSION}"),
        )),
    }
}

/// The rest of `path` after `prefix/`, if `path` is under `prefix`.
fn under<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    path.strip_prefix(prefix)?.strip_prefix('/')
}

/// Prefix and operation of `path`; the longest matching prefix wins (prefixes may nest).
fn route<'s, 'p>(settings: &'s AzureSettings, path: &'p str) -> Result<Routed<'s, 'p>, AzureError> {
    let not_found = || AzureError::new(Code::NotFound, "unknown URI path");
    let (prefix, rest) = settings
        .prefixes
        .iter()
        .filter_map(|p| under(path, &p.prefix).map(|rest| (p, rest)))
        .max_by_key(|(p, _)| p.prefix.len())
        .ok_or_else(not_found)?;
    let op = match rest.split_once('/') {
        None if rest == "info" => Op::Info,
        Some((key, "metadata")) => Op::Metadata(key),
        Some((key, "wrapkey")) => Op::WrapKey(key),
        Some((key, "unwrapkey")) => Op::UnwrapKey(key),
        _ => return Err(not_found()),
    };
    Ok(Routed { prefix, op })
}

fn json_error(e: JsonError) -> AzureError {
    AzureError::new(
        Code::InvalidRequest,
        match e {
            JsonError::WrongShape => "a field is missing or has the wrong type",
            JsonError::NotJson => "request body is not valid JSON",
        },
    )
}

fn crypto_error(e: &crate::core::CryptoError) -> AzureError {
    let mapped = from_crypto(e);
    if mapped.code.status().is_server_error() {
        // The detail (a CKR name, an internal message) is for the operator, never the caller.
        tracing::debug!(error = %e, "key operation failed");
    }
    mapped
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(http::StatusCode::OK, body),
        Err(e) => {
            tracing::error!(error = %e, "response serialization failed");
            AzureError::new(Code::InternalError, "internal error").to_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_must_be_exactly_ours() {
        assert!(check_api_version(Some("api-version=0.1-preview")).is_ok());
        assert!(check_api_version(Some("x=1&api-version=0.1-preview")).is_ok());
        for bad in [
            None,
            Some(""),
            Some("api-version=7.4"),
            Some("api-version=0.1-preview&api-version=0.1-preview"),
            Some("api-version=0.1-PREVIEW"),
            Some("apiversion=0.1-preview"),
        ] {
            assert!(check_api_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_under_prefixes() {
        assert_eq!(under("/azure/info", "/azure"), Some("info"));
        assert_eq!(under("/azurex/info", "/azure"), None);
        assert_eq!(under("/azure", "/azure"), None);
    }
}
