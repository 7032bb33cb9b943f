//! The XKS request handler: routing within the front, SigV4, validation, authorization, limits,
//! the core call, the response, and one log line + audit line + metric per request.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use zeroize::Zeroizing;

use super::error::{XksError, XksErrorName as N, from_crypto};
use super::settings::{KeyStoreSettings, MAX_METADATA, XksSettings};
use super::wire::{self, RequestMetadata};
use crate::audit::{self, AuditEvent};
use crate::auth::Principal;
use crate::auth::sigv4::{SigV4Verifier, SignedRequest};
use crate::authz::{Facts, Permit};
use crate::core::framing::{self, AadFraming};
use crate::core::{Backend, CryptoError, GCM_TAG_LEN, KeyService, KeyStatus, Operation};
use crate::front::{ConnInfo, Request, Response, json_response};
use crate::metrics::RequestMetrics;

/// The path segment every XKS API lives under, after the key store's prefix.
const API_ROOT: &str = "/kms/xks/v1";
/// `requestMetadata` fields Encrypt and Decrypt require.
const KEY_OP_METADATA: &[&str] = &[
    "awsPrincipalArn",
    "kmsKeyArn",
    "kmsOperation",
    "kmsRequestId",
];
/// Longest `requestMetadata` string accepted (the longest ARN IAM allows).
const MAX_METADATA_FIELD: usize = 2048;
/// Decode bound for fields whose wrong sizes have their own error (IV, tag, metadata).
const ANY_SIZE: usize = usize::MAX / 2;
/// Front name in metrics, logs and audit lines.
const FRONT: &str = "xks";

/// A key store ready to serve: its settings and its SigV4 verifier (with its signing-key cache).
struct KeyStore {
    settings: KeyStoreSettings,
    verifier: SigV4Verifier,
    /// `prefix + /kms/xks/v1`
    base: String,
}

/// Everything that can be replaced by a reload.
struct State {
    stores: Vec<KeyStore>,
    fleet_size: u32,
    vendor: String,
}

/// The XKS front end.
pub struct XksFront<B: Backend> {
    state: ArcSwap<State>,
    service: Arc<KeyService<B>>,
    metrics: RequestMetrics,
    model: String,
}

/// Which API a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api<'p> {
    Health,
    Metadata(&'p str),
    Encrypt(&'p str),
    Decrypt(&'p str),
}

impl Api<'_> {
    fn name(&self) -> &'static str {
        match self {
            Api::Health => "health",
            Api::Metadata(_) => "metadata",
            Api::Encrypt(_) => "encrypt",
            Api::Decrypt(_) => "decrypt",
        }
    }
}

/// What one request produced, for the log line, the audit line and the metrics.
struct Outcome<'r> {
    request_id: String,
    key: &'r str,
    principal: String,
    rule: Option<String>,
    audit: bool,
}

impl<B: Backend> XksFront<B> {
    /// Build the front from validated settings.
    pub fn new(
        settings: &XksSettings,
        service: Arc<KeyService<B>>,
        metrics: RequestMetrics,
    ) -> Self {
        Self {
            state: ArcSwap::from_pointee(build_state(settings)),
            service,
            metrics,
            model: format!("ekm-proxy {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Replace key stores, credentials, policy and limits (SIGHUP). In-flight requests finish
    /// with the state they started with.
    pub fn reload(&self, settings: &XksSettings) {
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
        let started = Instant::now();
        let state = self.state.load_full();
        let path = req.uri().path();
        let Some((store, api)) = route(&state, path) else {
            tracing::info!(front = FRONT, path = %crate::audit::LogSafe(path), listener = %conn.listener, "unknown XKS path");
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
        let mut outcome = Outcome {
            request_id: String::new(),
            key: "",
            principal: String::new(),
            rule: None,
            audit: false,
        };
        let result = self.dispatch(store, api, &req, &mut outcome).await;
        let elapsed = started.elapsed();
        let (response, outcome_name) = match result {
            Ok(resp) => (resp, "ok"),
            Err(e) => (e.to_response(), e.name.as_str()),
        };
        self.metrics
            .observe(FRONT, api.name(), outcome_name, elapsed.as_secs_f64());
        let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if outcome.audit {
            // A key operation's log line is its audit event: it carries every request field
            // (request id, key store, key, principal, outcome, latency), so one line serves both.
            audit::record(&AuditEvent {
                front: FRONT,
                tenant: &store.settings.name,
                op: api.name(),
                key: outcome.key,
                principal: &outcome.principal,
                request_id: &outcome.request_id,
                decision: match (outcome_name, &outcome.rule) {
                    (_, Some(_)) => "deny",
                    ("ok", None) => "allow",
                    _ => "error",
                },
                outcome: outcome_name,
                rule: outcome.rule.as_deref(),
                grant: None,
                justification: None,
                resource: None,
                correlation_id: None,
                pool: None,
                latency_us,
            });
        } else {
            tracing::info!(
                front = FRONT,
                key_store = %store.settings.name,
                op = api.name(),
                kms_request_id = %audit::LogSafe(&outcome.request_id),
                principal = %outcome.principal,
                outcome = outcome_name,
                latency_us,
                "request"
            );
        }
        response
    }

    async fn dispatch<'r>(
        &self,
        store: &KeyStore,
        api: Api<'r>,
        req: &'r Request,
        outcome: &mut Outcome<'r>,
    ) -> Result<Response, XksError> {
        let principal = self.authenticate(store, req)?;
        outcome.principal = principal.name().to_owned();
        let body = req.body();
        match api {
            Api::Health => self.get_health_status(store, body, outcome).await,
            Api::Metadata(key) => {
                self.get_key_metadata(store, &principal, key, body, outcome)
                    .await
            }
            Api::Encrypt(key) => self.encrypt(store, &principal, key, body, outcome).await,
            Api::Decrypt(key) => self.decrypt(store, &principal, key, body, outcome).await,
        }
    }

    /// GetHealthStatus: exempt from secondary authorization, but `kmsRequestId` and
    /// `kmsOperation` are still required (clients in the field test it).
    async fn get_health_status(
        &self,
        store: &KeyStore,
        body: &[u8],
        outcome: &mut Outcome<'_>,
    ) -> Result<Response, XksError> {
        let parsed: wire::MetadataOnlyRequest<'_> = parse(body)?;
        let md = required_metadata(parsed.request_metadata, &["kmsRequestId", "kmsOperation"])?;
        outcome.request_id = request_id(&md);
        self.health(store).await
    }

    /// GetKeyMetadata: the real key spec and usage read from the HSM.
    async fn get_key_metadata<'r>(
        &self,
        store: &KeyStore,
        principal: &Principal,
        key: &'r str,
        body: &'r [u8],
        outcome: &mut Outcome<'r>,
    ) -> Result<Response, XksError> {
        outcome.key = key;
        let parsed: wire::MetadataOnlyRequest<'_> = parse(body)?;
        let md = required_metadata(
            parsed.request_metadata,
            &["awsPrincipalArn", "kmsOperation", "kmsRequestId"],
        )?;
        outcome.request_id = request_id(&md);
        outcome.audit = true;
        let permit = self.authorize(store, principal, key, Operation::KeyMetadata, &md, outcome)?;
        let (info, status) = self
            .service
            .key_metadata(&permit)
            .await
            .map_err(|e| crypto_error(&e))?;
        let spec = info.key_spec();
        let (status, reason) = match &status {
            KeyStatus::Enabled => ("ENABLED", None),
            KeyStatus::Disabled(why) => ("DISABLED", Some(why.as_str())),
        };
        if let Some(why) = reason {
            tracing::warn!(front = FRONT, key, reason = why, "key reported DISABLED");
        }
        let resp = wire::KeyMetadataResponse {
            key_spec: &spec,
            key_usage: info.usage.names(),
            key_status: status,
        };
        Ok(json(&resp))
    }

    /// Encrypt, with the CDIV and its verification decrypt when asked for.
    async fn encrypt<'r>(
        &self,
        store: &KeyStore,
        principal: &Principal,
        key: &'r str,
        body: &'r [u8],
        outcome: &mut Outcome<'r>,
    ) -> Result<Response, XksError> {
        outcome.key = key;
        let parsed: wire::EncryptRequest<'_> = parse(body)?;
        let md = required_metadata(parsed.request_metadata, KEY_OP_METADATA)?;
        outcome.request_id = request_id(&md);
        outcome.audit = true;
        require_algorithm(parsed.encryption_algorithm.as_deref())?;
        let cdiv = match parsed.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some("SHA_256") => true,
            Some(_) => {
                return Err(XksError::new(
                    N::Validation,
                    "ciphertextDataIntegrityValueAlgorithm must be SHA_256",
                ));
            }
        };
        let limits = store.settings.limits;
        let plaintext = Zeroizing::new(decode_field(
            "plaintext",
            parsed.plaintext.as_deref(),
            limits.max_plaintext,
        )?);
        let aad = decode_optional(
            "additionalAuthenticatedData",
            parsed.additional_authenticated_data.as_deref(),
            limits.max_aad,
        )?;
        let permit = self.authorize(store, principal, key, Operation::Encrypt, &md, outcome)?;
        let metadata = &store.settings.ciphertext_metadata;
        let full_aad = frame(store.settings.framing, aad.as_deref(), metadata)?;
        let verify_aad = if cdiv { Some(full_aad.clone()) } else { None };
        let sealed = self
            .service
            .encrypt(&permit, plaintext, full_aad, cdiv)
            .await
            .map_err(|e| crypto_error(&e))?;
        let cdiv_value = match verify_aad {
            Some(verify_aad) => {
                // Appendix C: compute the integrity value first, then prove the output decrypts.
                let value = framing::cdiv_sha256(
                    aad.as_deref().unwrap_or_default(),
                    metadata,
                    &sealed.iv,
                    &sealed.ciphertext,
                    &sealed.tag,
                );
                self.service
                    .verify_sealed(&permit, &sealed, verify_aad)
                    .await
                    .map_err(|e| crypto_error(&e))?;
                Some(wire::b64_encode(&value))
            }
            None => None,
        };
        let resp = wire::EncryptResponse {
            ciphertext: wire::b64_encode(&sealed.ciphertext),
            ciphertext_metadata: (!metadata.is_empty()).then(|| wire::b64_encode(metadata)),
            initialization_vector: wire::b64_encode(&sealed.iv),
            authentication_tag: wire::b64_encode(&sealed.tag),
            ciphertext_data_integrity_value: cdiv_value,
        };
        Ok(json(&resp))
    }

    /// Decrypt.
    async fn decrypt<'r>(
        &self,
        store: &KeyStore,
        principal: &Principal,
        key: &'r str,
        body: &'r [u8],
        outcome: &mut Outcome<'r>,
    ) -> Result<Response, XksError> {
        outcome.key = key;
        let parsed: wire::DecryptRequest<'_> = parse(body)?;
        let md = required_metadata(parsed.request_metadata, KEY_OP_METADATA)?;
        outcome.request_id = request_id(&md);
        outcome.audit = true;
        require_algorithm(parsed.encryption_algorithm.as_deref())?;
        let limits = store.settings.limits;
        let ciphertext = decode_field(
            "ciphertext",
            parsed.ciphertext.as_deref(),
            limits.max_plaintext,
        )?;
        // Fixed-size fields: a wrong size, however large, gets the field's own error below;
        // the server's body limit bounds what is decoded.
        let iv = decode_field(
            "initializationVector",
            parsed.initialization_vector.as_deref(),
            ANY_SIZE,
        )?;
        let tag = decode_field(
            "authenticationTag",
            parsed.authentication_tag.as_deref(),
            ANY_SIZE,
        )?;
        let aad = decode_optional(
            "additionalAuthenticatedData",
            parsed.additional_authenticated_data.as_deref(),
            limits.max_aad,
        )?;
        let metadata = decode_optional(
            "ciphertextMetadata",
            parsed.ciphertext_metadata.as_deref(),
            ANY_SIZE,
        )?
        .unwrap_or_default();
        if metadata.len() > MAX_METADATA {
            return Err(XksError::new(
                N::Validation,
                "ciphertextMetadata exceeds 20 bytes",
            ));
        }
        let permit = self.authorize(store, principal, key, Operation::Decrypt, &md, outcome)?;
        // Wrong IV or tag sizes cannot authenticate: the spec's InvalidCiphertextException
        // covers "IV or tag invalid", and it is what the HSM itself would conclude.
        if iv.len() != 12 && iv.len() != 16 {
            return Err(XksError::new(
                N::InvalidCiphertext,
                "initializationVector must be 12 or 16 bytes",
            ));
        }
        let tag: [u8; GCM_TAG_LEN] = tag.try_into().map_err(|_| {
            XksError::new(N::InvalidCiphertext, "authenticationTag must be 16 bytes")
        })?;
        let full_aad = frame(store.settings.framing, aad.as_deref(), &metadata)?;
        let plaintext = self
            .service
            .decrypt(&permit, iv, ciphertext, tag, full_aad)
            .await
            .map_err(|e| crypto_error(&e))?;
        let encoded = Zeroizing::new(wire::b64_encode(&plaintext));
        Ok(json(&wire::DecryptResponse {
            plaintext: &encoded,
        }))
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
        store.verifier.verify(&signed, SystemTime::now()).map_err(|e| {
            self.metrics.auth_failure(FRONT, e.reason());
            tracing::warn!(front = FRONT, key_store = %store.settings.name, reason = e.reason(), "SigV4 authentication failed");
            XksError::new(N::AuthenticationFailed, format!("signature verification failed: {}", e.reason()))
        })
    }

    fn authorize(
        &self,
        store: &KeyStore,
        principal: &Principal,
        key: &str,
        op: Operation,
        md: &RequestMetadata<'_>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Permit, XksError> {
        if !store.settings.enabled {
            return Err(XksError::new(
                N::InvalidState,
                "key store is disabled by the operator",
            ));
        }
        if !store.settings.keys.allows(key) {
            return Err(XksError::new(N::KeyNotFound, "external key not found"));
        }
        let attributes = md.attributes();
        store
            .settings
            .policy
            .authorize(&Facts { principal, key, op, attributes: &attributes })
            .map_err(|denial| {
                tracing::warn!(front = FRONT, key, rule = %denial.rule, reason = %audit::bounded(&denial.reason), "request denied by policy");
                outcome.rule = Some(denial.rule.clone());
                XksError::new(N::AccessDenied, denial.to_string())
            })
    }

    async fn health(&self, store: &KeyStore) -> Result<Response, XksError> {
        if !store.settings.enabled {
            return Err(XksError::new(
                N::InvalidState,
                "key store is disabled by the operator",
            ));
        }
        let state = self.state.load();
        let report = self.service.health_report().await;
        let id = if report.hsm.serial.is_empty() {
            &report.hsm.token_label
        } else {
            &report.hsm.serial
        };
        let model = format!(
            "{} {} ({})",
            report.hsm.model, report.hsm.versions, report.hsm.token_label
        );
        let vendor = if report.hsm.manufacturer.is_empty() {
            "unknown"
        } else {
            &report.hsm.manufacturer
        };
        let resp = wire::HealthResponse {
            xks_proxy_fleet_size: state.fleet_size,
            xks_proxy_vendor: &state.vendor,
            xks_proxy_model: &self.model,
            ekm_vendor: vendor,
            ekm_fleet_details: vec![wire::EkmFleetDetail {
                id,
                model: &model,
                health_status: report.status.as_str(),
            }],
        };
        Ok(json(&resp))
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

fn parse<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "a field has the wrong type",
            _ => "request body is not valid JSON",
        };
        XksError::new(N::Validation, what)
    })
}

fn required_metadata<'a>(
    md: Option<RequestMetadata<'a>>,
    required: &[&str],
) -> Result<RequestMetadata<'a>, XksError> {
    let md = md.ok_or_else(|| XksError::new(N::Validation, "requestMetadata is required"))?;
    let attributes = md.attributes();
    // ARNs are at most 2048 characters and request ids are UUIDs: anything far longer is not
    // from KMS, and is refused before it reaches a log line or a policy rule.
    if let Some((name, _)) = attributes
        .iter()
        .find(|(_, v)| v.is_some_and(|v| v.len() > MAX_METADATA_FIELD))
    {
        return Err(XksError::new(
            N::Validation,
            format!("requestMetadata.{name} is longer than {MAX_METADATA_FIELD} bytes"),
        ));
    }
    for name in required {
        let present = attributes.iter().any(|(n, v)| n == name && v.is_some());
        if !present {
            return Err(XksError::new(
                N::Validation,
                format!("requestMetadata.{name} is required"),
            ));
        }
    }
    Ok(md)
}

fn require_algorithm(alg: Option<&str>) -> Result<(), XksError> {
    match alg {
        Some("AES_GCM") => Ok(()),
        Some(_) => Err(XksError::new(
            N::Validation,
            "encryptionAlgorithm must be AES_GCM",
        )),
        None => Err(XksError::new(
            N::Validation,
            "encryptionAlgorithm is required",
        )),
    }
}

/// Decode a required base64 field, refusing (before decoding) anything above `max` bytes.
fn decode_field(name: &str, value: Option<&str>, max: usize) -> Result<Vec<u8>, XksError> {
    let value = value.ok_or_else(|| XksError::new(N::Validation, format!("{name} is required")))?;
    decode_bounded(name, value, max)
}

fn decode_optional(
    name: &str,
    value: Option<&str>,
    max: usize,
) -> Result<Option<Vec<u8>>, XksError> {
    value.map(|v| decode_bounded(name, v, max)).transpose()
}

fn decode_bounded(name: &str, value: &str, max: usize) -> Result<Vec<u8>, XksError> {
    // Padding can make the bound 2 bytes high, so only refuse what is certainly too large.
    if wire::decoded_len_upper_bound(value.len()) > max + 2 {
        return Err(XksError::new(
            N::UnsupportedOperation,
            format!("{name} exceeds this proxy's limit of {max} bytes"),
        ));
    }
    let bytes = wire::b64_decode(value)
        .map_err(|_| XksError::new(N::Validation, format!("{name} is not valid base64")))?;
    if bytes.len() > max {
        return Err(XksError::new(
            N::UnsupportedOperation,
            format!("{name} exceeds this proxy's limit of {max} bytes"),
        ));
    }
    Ok(bytes)
}

fn frame(framing: AadFraming, aad: Option<&[u8]>, metadata: &[u8]) -> Result<Vec<u8>, XksError> {
    framing::full_aad(framing, aad, metadata).map_err(|e| match e {
        framing::FramingError::AadTooLong => XksError::new(
            N::UnsupportedOperation,
            "additionalAuthenticatedData exceeds 65535 bytes",
        ),
        framing::FramingError::MetadataTooLong => {
            XksError::new(N::Validation, "ciphertextMetadata is too long")
        }
    })
}

fn crypto_error(e: &CryptoError) -> XksError {
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

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(_) => XksError::new(N::Internal, "internal error").to_response(),
    }
}

fn request_id(md: &RequestMetadata<'_>) -> String {
    audit::bounded(md.kms_request_id.as_deref().unwrap_or("-")).into_owned()
}
