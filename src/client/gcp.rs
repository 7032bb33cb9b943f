//! A Google Cloud EKM client: RS256 bearer tokens shaped like the ones Google signs for Cloud KMS,
//! wrap/unwrap request bodies, responses and `google.rpc.Status` error bodies, and a keep-alive
//! connection that sends them. Used by `ekm-proxy dev token`, the integration tests and the
//! benchmark.
//!
//! - [`TokenClaims`] / [`TokenSigner`]: mint a JWT (jsonwebtoken, header `alg` RS256 + `kid`).
//! - [`wrap_body`], [`unwrap_body`], [`AdditionalContext`]: proto3-JSON bodies as Cloud KMS sends
//!   them (lowerCamelCase names, standard base64 bytes).
//! - [`parse_wrap_response`], [`parse_unwrap_response`], [`RpcStatus`]: read the answers.
//! - [`GcpConnector`] / [`GcpClient`]: `POST <prefix>/<key path>:wrap|:unwrap` with
//!   `Authorization: Bearer`, the token fixed or made per request ([`TokenSource`]).
//!
//! Like the rest of `client`, it sees the proxy only through the wire: it must not depend on
//! `server`, `front`, `auth`, `authz`, `core` or `hsm`, so the tests exercise the real wire format
//! and an independent signer. Tokens are credentials: never logged or put in error texts here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use super::xks::ParseError;
use super::{ClientError, ClientTls, Connection, Connector, Response};

/// The `iss` Google puts in the tokens Cloud KMS sends (and the dev signer's default).
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";

/// The Key Access Justifications reasons this client knows, with their enum numbers
/// (`google.cloud.ekms.v0.AccessReasonContext.Reason`; `specs/gcp-ekm.md` §3).
pub const ACCESS_REASONS: &[(&str, i64)] = &[
    ("REASON_UNSPECIFIED", 0),
    ("CUSTOMER_INITIATED_SUPPORT", 1),
    ("GOOGLE_INITIATED_SERVICE", 2),
    ("THIRD_PARTY_DATA_REQUEST", 3),
    ("GOOGLE_INITIATED_REVIEW", 4),
    ("CUSTOMER_INITIATED_ACCESS", 5),
    ("GOOGLE_INITIATED_SYSTEM_OPERATION", 6),
    ("REASON_NOT_EXPECTED", 7),
    ("MODIFIED_CUSTOMER_INITIATED_ACCESS", 8),
    ("MODIFIED_GOOGLE_INITIATED_SYSTEM_OPERATION", 9),
    ("GOOGLE_RESPONSE_TO_PRODUCTION_ALERT", 10),
    ("CUSTOMER_AUTHORIZED_WORKFLOW_SERVICING", 11),
];

/// A Cloud KMS key version name for tests and the benchmark that do not care which.
pub const RESOURCE_NAME: &str = "projects/dev-project/locations/us-east1/keyRings/dev-ring/cryptoKeys/dev-key/cryptoKeyVersions/1";

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// The claims of a Google-style OIDC token. Optional claims are left out of the token when
/// `None`, so tests can make tokens that lack them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer.
    pub iss: String,
    /// Audience (Google sends one string: the EKM's audience).
    pub aud: String,
    /// The calling service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Whether Google verified `email`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_verified: Option<bool>,
    /// Subject (Google: the service account's numeric unique id).
    pub sub: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Not before (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Token id; set per request by [`TokenSource::minting`] so every token is distinct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Any other claims, as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TokenClaims {
    /// A token for `email` (verified) and `audience` from the Google issuer, issued now and valid
    /// for `lifetime`: what Cloud KMS presents, as the dev profile accepts it.
    pub fn dev(email: &str, audience: &str, lifetime: Duration) -> Self {
        Self::dev_at(email, audience, lifetime, SystemTime::now())
    }

    /// [`TokenClaims::dev`] issued at `now`.
    pub fn dev_at(email: &str, audience: &str, lifetime: Duration, now: SystemTime) -> Self {
        let iat = unix_seconds(now);
        Self {
            iss: GOOGLE_ISSUER.to_owned(),
            aud: audience.to_owned(),
            email: Some(email.to_owned()),
            email_verified: Some(true),
            sub: subject_for(email),
            iat,
            exp: iat.saturating_add(lifetime.as_secs()),
            nbf: None,
            jti: None,
            extra: Map::new(),
        }
    }

    /// Moves `iat`, `exp` (and `nbf` if set) so the token is issued at `now` with its lifetime
    /// unchanged.
    pub fn reissue_at(&mut self, now: SystemTime) {
        let new_iat = unix_seconds(now);
        let lifetime = self.exp.saturating_sub(self.iat);
        // nbf keeps its offset from iat, which may be either way.
        self.nbf = self.nbf.map(|nbf| {
            if nbf >= self.iat {
                new_iat.saturating_add(nbf - self.iat)
            } else {
                new_iat.saturating_sub(self.iat - nbf)
            }
        });
        self.iat = new_iat;
        self.exp = new_iat.saturating_add(lifetime);
    }
}

/// A stable, numeric-looking `sub` for an email, like the unique ids Google gives service
/// accounts (21 digits).
pub fn subject_for(email: &str) -> String {
    let digest = Sha256::digest(email.as_bytes());
    let mut n = [0u8; 8];
    n.copy_from_slice(&digest[..8]);
    format!("1{:020}", u64::from_be_bytes(n))
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a token could not be made. Never quotes key bytes or tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The signing key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The PEM is not an RSA private key (PKCS#8 or PKCS#1).
    #[error("{what} is not a PEM RSA private key")]
    BadKey {
        /// Which key.
        what: String,
    },
    /// Signing failed.
    #[error("signing the token failed: {0}")]
    Sign(String),
}

/// Signs tokens with one RSA private key, RS256, with a `kid` in the header.
///
/// [`TokenSigner::mint`] signs with ring (through rustls, already linked for TLS) rather than
/// jsonwebtoken's pure-Rust RSA: RSASSA-PKCS1-v1_5 is deterministic, so the token is the same,
/// byte for byte (a test checks it), at about a third of the CPU. That matters to the benchmark's
/// fresh-token scenarios, where the load generator mints one token per request on the machine the
/// server runs on. [`TokenSigner::mint_with_header`] goes through jsonwebtoken's `encode`, for
/// headers of any shape.
#[derive(Clone)]
pub struct TokenSigner {
    kid: String,
    key: EncodingKey,
    /// ring's RS256 signer; `None` if ring refuses the key (e.g. under 2048 bits).
    fast: Option<Arc<dyn rustls::sign::Signer>>,
}

impl fmt::Debug for TokenSigner {
    // The key is a secret: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TokenSigner {
    /// A signer from a PEM RSA private key (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`).
    pub fn from_pem(pem: &[u8], kid: impl Into<String>) -> Result<Self, TokenError> {
        let bad = || TokenError::BadKey {
            what: "the signing key".to_owned(),
        };
        let key = EncodingKey::from_rsa_pem(pem).map_err(|_| bad())?;
        let fast = PrivateKeyDer::from_pem_slice(pem)
            .ok()
            .and_then(|der| rustls::crypto::ring::sign::any_supported_type(&der).ok())
            .and_then(|k| k.choose_scheme(&[rustls::SignatureScheme::RSA_PKCS1_SHA256]))
            .map(Arc::from);
        Ok(Self {
            kid: kid.into(),
            key,
            fast,
        })
    }

    /// [`TokenSigner::from_pem`] from a file, e.g. `certs/dev/jwt-signer.pem`.
    pub fn from_pem_file(path: &Path, kid: impl Into<String>) -> Result<Self, TokenError> {
        let pem =
            zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| TokenError::Read {
                path: path.to_path_buf(),
                source,
            })?);
        Self::from_pem(&pem, kid).map_err(|_| TokenError::BadKey {
            what: path.display().to_string(),
        })
    }

    /// The `kid` put in every header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The same key under another `kid` (tests: a kid the JWKS does not list).
    pub fn with_kid(&self, kid: impl Into<String>) -> Self {
        Self {
            kid: kid.into(),
            ..self.clone()
        }
    }

    /// A compact JWS: header `{"typ":"JWT","alg":"RS256","kid":<kid>}`, the claims, the signature.
    pub fn mint(&self, claims: &TokenClaims) -> Result<String, TokenError> {
        let Some(fast) = &self.fast else {
            return self.mint_with_header(&self.header(), claims);
        };
        let sign_err = |e: &dyn fmt::Display| TokenError::Sign(e.to_string());
        // Exactly what jsonwebtoken's `encode` signs: base64url(header JSON) "." base64url(claims JSON).
        let header = serde_json::to_vec(&self.header()).map_err(|e| sign_err(&e))?;
        let payload = serde_json::to_vec(claims).map_err(|e| sign_err(&e))?;
        let mut token = String::with_capacity((header.len() + payload.len()) * 4 / 3 + 350);
        URL_SAFE_NO_PAD.encode_string(&header, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = fast.sign(token.as_bytes()).map_err(|e| sign_err(&e))?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        Ok(token)
    }

    /// The header [`TokenSigner::mint`] uses, to modify for negative tests.
    pub fn header(&self) -> Header {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        header
    }

    /// Signs `claims` (any serializable claims) under `header` with jsonwebtoken's `encode`;
    /// `header.alg` must be an RSA algorithm.
    pub fn mint_with_header<T: Serialize>(
        &self,
        header: &Header,
        claims: &T,
    ) -> Result<String, TokenError> {
        jsonwebtoken::encode(header, claims, &self.key).map_err(|e| TokenError::Sign(e.to_string()))
    }
}

/// Where a [`GcpClient`] gets the bearer token of each request. Cheap to clone.
#[derive(Clone, Default)]
pub enum TokenSource {
    /// No `Authorization` header.
    #[default]
    None,
    /// The same token every time (what a caller with a cached token sends).
    Fixed(Arc<str>),
    /// A token per request from this function (e.g. freshly minted).
    PerRequest(Arc<dyn Fn() -> Result<String, TokenError> + Send + Sync>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenSource::None => "TokenSource::None",
            TokenSource::Fixed(_) => "TokenSource::Fixed(<redacted>)",
            TokenSource::PerRequest(_) => "TokenSource::PerRequest",
        })
    }
}

impl TokenSource {
    /// Always `token`.
    pub fn fixed(token: impl Into<String>) -> Self {
        TokenSource::Fixed(Arc::from(token.into()))
    }

    /// A token per request from `f`.
    pub fn per_request(f: impl Fn() -> Result<String, TokenError> + Send + Sync + 'static) -> Self {
        TokenSource::PerRequest(Arc::new(f))
    }

    /// A fresh token per request: `claims` reissued now with a unique `jti`, signed by `signer`.
    /// No two requests carry the same token, so a verifier's token cache never hits.
    pub fn minting(signer: TokenSigner, claims: TokenClaims) -> Self {
        Self::per_request(move || {
            let mut c = claims.clone();
            c.reissue_at(SystemTime::now());
            c.jti = Some(unique_jti());
            signer.mint(&c)
        })
    }

    /// The token for the next request, if any.
    pub fn token(&self) -> Result<Option<String>, TokenError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Fixed(t) => Ok(Some(t.to_string())),
            TokenSource::PerRequest(f) => f().map(Some),
        }
    }
}

/// A token id unique in this process (and across processes by pid).
pub fn unique_jti() -> String {
    // A counter, not configuration.
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{:x}-{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// Wire bodies
// ---------------------------------------------------------------------------------------------

/// `accessReasonContext` of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessReason {
    /// `{"reason": "<NAME>"}`.
    Name(String),
    /// `{"reason": <number>}`.
    Number(i64),
    /// `{}`: the context without a reason.
    Empty,
}

/// `additionalContext` (RequestContext) of a wrap or unwrap request. `None` fields are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdditionalContext {
    /// `fullResourceName`, e.g. `//cloudkms.googleapis.com/projects/…/cryptoKeyVersions/1`.
    pub full_resource_name: Option<String>,
    /// `relativeResourceName`, e.g. `projects/…/cryptoKeyVersions/1`.
    pub relative_resource_name: Option<String>,
    /// `accessReasonContext`; `None` leaves it out (KAJ not enrolled).
    pub access_reason: Option<AccessReason>,
    /// `isKeyHealthCheck` (sent only when true).
    pub is_key_health_check: bool,
}

impl AdditionalContext {
    /// What Cloud KMS sends for a customer's own request: the [`RESOURCE_NAME`] key version and
    /// the reason `CUSTOMER_INITIATED_ACCESS`.
    pub fn customer_initiated() -> Self {
        Self::with_reason("CUSTOMER_INITIATED_ACCESS")
    }

    /// The [`RESOURCE_NAME`] key version with the reason `name`.
    pub fn with_reason(name: &str) -> Self {
        Self {
            full_resource_name: Some(format!("//cloudkms.googleapis.com/{RESOURCE_NAME}")),
            relative_resource_name: Some(RESOURCE_NAME.to_owned()),
            access_reason: Some(AccessReason::Name(name.to_owned())),
            is_key_health_check: false,
        }
    }

    /// A key health check (`isKeyHealthCheck: true`) with the reason
    /// `GOOGLE_INITIATED_SYSTEM_OPERATION`, as Cloud EKM's periodic probes are described.
    pub fn health_check() -> Self {
        Self {
            is_key_health_check: true,
            ..Self::with_reason("GOOGLE_INITIATED_SYSTEM_OPERATION")
        }
    }

    /// The JSON object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(n) = &self.full_resource_name {
            m.insert("fullResourceName".into(), n.clone().into());
        }
        if let Some(n) = &self.relative_resource_name {
            m.insert("relativeResourceName".into(), n.clone().into());
        }
        if let Some(reason) = &self.access_reason {
            let mut ctx = Map::new();
            match reason {
                AccessReason::Name(name) => {
                    ctx.insert("reason".into(), name.clone().into());
                }
                AccessReason::Number(n) => {
                    ctx.insert("reason".into(), (*n).into());
                }
                AccessReason::Empty => {}
            }
            m.insert("accessReasonContext".into(), Value::Object(ctx));
        }
        if self.is_key_health_check {
            m.insert("isKeyHealthCheck".into(), true.into());
        }
        Value::Object(m)
    }
}

/// The wrap or unwrap operation: the suffix of the key URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GcpOp {
    /// `:wrap`.
    Wrap,
    /// `:unwrap`.
    Unwrap,
}

impl GcpOp {
    /// `wrap` or `unwrap`.
    pub fn as_str(self) -> &'static str {
        match self {
            GcpOp::Wrap => "wrap",
            GcpOp::Unwrap => "unwrap",
        }
    }
}

/// The request path of `op` on `key_path` under `prefix`: `<prefix>/<key path>:<op>`.
pub fn key_url_path(prefix: &str, key_path: &str, op: GcpOp) -> String {
    format!(
        "{}/{}:{}",
        prefix.trim_end_matches('/'),
        key_path.trim_start_matches('/'),
        op.as_str()
    )
}

/// A WrapRequest body: `keyPath`, `plaintext`, and `additionalAuthenticatedData` and
/// `additionalContext` when given.
pub fn wrap_body(
    key_path: &str,
    plaintext: &[u8],
    aad: Option<&[u8]>,
    context: Option<&AdditionalContext>,
) -> Vec<u8> {
    body(key_path, "plaintext", plaintext, aad, context)
}

/// An UnwrapRequest body: `keyPath`, `wrappedBlob`, and `additionalAuthenticatedData` and
/// `additionalContext` when given.
pub fn unwrap_body(
    key_path: &str,
    wrapped_blob: &[u8],
    aad: Option<&[u8]>,
    context: Option<&AdditionalContext>,
) -> Vec<u8> {
    body(key_path, "wrappedBlob", wrapped_blob, aad, context)
}

fn body(
    key_path: &str,
    field: &str,
    bytes: &[u8],
    aad: Option<&[u8]>,
    context: Option<&AdditionalContext>,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("keyPath".into(), key_path.into());
    m.insert(field.into(), STANDARD.encode(bytes).into());
    if let Some(aad) = aad {
        m.insert(
            "additionalAuthenticatedData".into(),
            STANDARD.encode(aad).into(),
        );
    }
    if let Some(ctx) = context {
        m.insert("additionalContext".into(), ctx.to_json());
    }
    Value::Object(m).to_string().into_bytes()
}

/// Reads a WrapResponse body: the `wrappedBlob`.
pub fn parse_wrap_response(body: &[u8]) -> Result<Vec<u8>, ParseError> {
    required_b64(body, "wrappedBlob")
}

/// Reads an UnwrapResponse body: the `plaintext`.
pub fn parse_unwrap_response(body: &[u8]) -> Result<Vec<u8>, ParseError> {
    required_b64(body, "plaintext")
}

fn required_b64(body: &[u8], field: &'static str) -> Result<Vec<u8>, ParseError> {
    let v: Value = serde_json::from_slice(body)?;
    let s = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or(ParseError::Missing(field))?;
    STANDARD.decode(s).map_err(|_| ParseError::Base64(field))
}

/// A `google.rpc.Status` error body: `{"code", "message", "status", "details"}` (also accepted
/// wrapped in `{"error": …}`, as Google's own REST APIs send it).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RpcStatus {
    /// The gRPC code number (`16` for UNAUTHENTICATED).
    pub code: i32,
    /// The code's name (`UNAUTHENTICATED`).
    #[serde(default)]
    pub status: String,
    /// A short explanation.
    #[serde(default)]
    pub message: String,
    /// `google.rpc.ErrorInfo`, `google.rpc.BadRequest`, … each with its `@type`.
    #[serde(default)]
    pub details: Vec<Value>,
}

/// `@type` of `google.rpc.ErrorInfo`.
pub const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
/// `@type` of `google.rpc.BadRequest`.
pub const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";

impl RpcStatus {
    /// Parses an error body; `None` if it is not one.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let v = match v.get("error") {
            Some(inner @ Value::Object(_)) => inner.clone(),
            _ => v,
        };
        serde_json::from_value(v).ok()
    }

    /// The details of type `type_url`.
    pub fn details_of<'a>(&'a self, type_url: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.details
            .iter()
            .filter(move |d| d.get("@type").and_then(Value::as_str) == Some(type_url))
    }

    /// `ErrorInfo.reason`, e.g. `EXPIRED` or `NO_GRANT`.
    pub fn reason(&self) -> Option<&str> {
        self.details_of(ERROR_INFO_TYPE)
            .find_map(|d| d.get("reason").and_then(Value::as_str))
    }

    /// `ErrorInfo.metadata[key]`, e.g. `rule`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.details_of(ERROR_INFO_TYPE)
            .find_map(|d| d.get("metadata")?.get(key)?.as_str())
    }

    /// `BadRequest.fieldViolations` as (field, description) pairs.
    pub fn field_violations(&self) -> Vec<(String, String)> {
        self.details_of(BAD_REQUEST_TYPE)
            .filter_map(|d| d.get("fieldViolations")?.as_array())
            .flatten()
            .map(|fv| {
                let s = |k: &str| {
                    fv.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                (s("field"), s("description"))
            })
            .collect()
    }
}

impl Response {
    /// The `google.rpc.Status` of a Cloud EKM error body, if the body is one.
    pub fn rpc_status(&self) -> Option<RpcStatus> {
        RpcStatus::parse(&self.body)
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct GcpClientConfig {
    /// Server address.
    pub addr: std::net::SocketAddr,
    /// TLS settings; `None` means plain HTTP.
    pub tls: Option<ClientTls>,
    /// `Host` header value, e.g. `localhost:8443`.
    pub host: String,
    /// Key URI path prefix, e.g. `/gcp/v0/keys`.
    pub path_prefix: String,
}

/// Which `Authorization` header a request carries.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// `Bearer <token>` from the client's [`TokenSource`] (none if the source is `None`).
    #[default]
    FromSource,
    /// `Bearer <this token>`.
    Bearer(String),
    /// This exact header value (e.g. `Basic …` or `bearer` in odd case, for negative tests).
    Raw(String),
    /// No `Authorization` header.
    Without,
}

/// Why a wrap or unwrap did not give its result.
#[derive(Debug, thiserror::Error)]
pub enum GcpError {
    /// The request could not be made or answered.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server answered with an error status.
    #[error("HTTP {http_status} {}", rpc.as_ref().map_or("(not a google.rpc.Status body)", |s| s.status.as_str()))]
    Status {
        /// HTTP status code.
        http_status: u16,
        /// The error body, if it is a `google.rpc.Status`.
        rpc: Option<RpcStatus>,
        /// The whole response.
        response: Box<Response>,
    },
    /// A 200 whose body is not the expected response.
    #[error("bad response body: {0}")]
    Parse(#[from] ParseError),
}

impl GcpError {
    /// The HTTP status of an error answer.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            GcpError::Status { http_status, .. } => Some(*http_status),
            _ => None,
        }
    }

    /// The `google.rpc.Status` of an error answer.
    pub fn rpc_status(&self) -> Option<&RpcStatus> {
        match self {
            GcpError::Status { rpc, .. } => rpc.as_ref(),
            _ => None,
        }
    }

    /// The status name (`PERMISSION_DENIED`) of an error answer.
    pub fn status_name(&self) -> Option<&str> {
        self.rpc_status().map(|s| s.status.as_str())
    }
}

/// Opens connections for one [`GcpClientConfig`] and token source; builds the rustls config once.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct GcpConnector {
    cfg: Arc<GcpClientConfig>,
    connector: Connector,
    tokens: TokenSource,
}

impl GcpConnector {
    /// Parses the TLS material of `cfg` once.
    pub fn new(cfg: Arc<GcpClientConfig>, tokens: TokenSource) -> Result<Self, ClientError> {
        let connector = Connector::new(cfg.addr, cfg.tls.as_ref())?;
        Ok(Self {
            cfg,
            connector,
            tokens,
        })
    }

    /// The config this connector was built from.
    pub fn config(&self) -> &Arc<GcpClientConfig> {
        &self.cfg
    }

    /// Opens one keep-alive connection.
    pub async fn connect(&self) -> Result<GcpClient, ClientError> {
        Ok(GcpClient {
            cfg: Arc::clone(&self.cfg),
            tokens: self.tokens.clone(),
            conn: self.connector.connect().await?,
        })
    }
}

/// One keep-alive connection to a Cloud EKM endpoint.
#[derive(Debug)]
pub struct GcpClient {
    cfg: Arc<GcpClientConfig>,
    tokens: TokenSource,
    conn: Connection,
}

impl GcpClient {
    /// Connects once (see [`GcpConnector`] to open many).
    pub async fn connect(
        cfg: Arc<GcpClientConfig>,
        tokens: TokenSource,
    ) -> Result<Self, ClientError> {
        GcpConnector::new(cfg, tokens)?.connect().await
    }

    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Replaces the token source for later requests.
    pub fn set_tokens(&mut self, tokens: TokenSource) {
        self.tokens = tokens;
    }

    /// Wraps `plaintext` under `key_path`: the `wrappedBlob`, or why not.
    pub async fn wrap(
        &mut self,
        key_path: &str,
        plaintext: &[u8],
        aad: Option<&[u8]>,
        context: Option<&AdditionalContext>,
    ) -> Result<Vec<u8>, GcpError> {
        let body = wrap_body(key_path, plaintext, aad, context);
        let resp = self.post(key_path, GcpOp::Wrap, body).await?;
        Ok(parse_wrap_response(&ok_or_status(resp)?.body)?)
    }

    /// Unwraps `wrapped_blob` under `key_path`: the plaintext, or why not.
    pub async fn unwrap(
        &mut self,
        key_path: &str,
        wrapped_blob: &[u8],
        aad: Option<&[u8]>,
        context: Option<&AdditionalContext>,
    ) -> Result<Vec<u8>, GcpError> {
        let body = unwrap_body(key_path, wrapped_blob, aad, context);
        let resp = self.post(key_path, GcpOp::Unwrap, body).await?;
        Ok(parse_unwrap_response(&ok_or_status(resp)?.body)?)
    }

    /// `POST <prefix>/<key path>:<op>` with `body` and a token from the source.
    pub async fn post(
        &mut self,
        key_path: &str,
        op: GcpOp,
        body: impl Into<Bytes>,
    ) -> Result<Response, ClientError> {
        let path = key_url_path(&self.cfg.path_prefix, key_path, op);
        self.post_path(&path, body, &Auth::FromSource).await
    }

    /// `POST <path>` (the whole path, e.g. with a wrong prefix) with `body` and `auth`.
    pub async fn post_path(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
        auth: &Auth,
    ) -> Result<Response, ClientError> {
        let mut req = Request::new(Full::new(body.into()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = path
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Request(http::Error::from(e)))?;
        let headers = req.headers_mut();
        headers.insert(HOST, header_value(&self.cfg.host)?);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let value = match auth {
            Auth::FromSource => self
                .tokens
                .token()
                .map_err(|e| ClientError::Token(e.to_string()))?
                .map(|t| format!("Bearer {t}")),
            Auth::Bearer(t) => Some(format!("Bearer {t}")),
            Auth::Raw(v) => Some(v.clone()),
            Auth::Without => None,
        };
        if let Some(v) = value {
            // A token with bytes a header cannot carry is a client bug; the error names no token.
            let mut v = HeaderValue::from_str(&v)
                .map_err(|_| ClientError::Token("not a valid header value".into()))?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        self.conn.send_raw(req).await
    }

    /// Sends `req` exactly as given and reads the whole response.
    pub async fn send_raw(&mut self, req: Request<Full<Bytes>>) -> Result<Response, ClientError> {
        self.conn.send_raw(req).await
    }
}

fn ok_or_status(resp: Response) -> Result<Response, GcpError> {
    if resp.status == 200 {
        Ok(resp)
    } else {
        Err(GcpError::Status {
            http_status: resp.status,
            rpc: resp.rpc_status(),
            response: Box::new(resp),
        })
    }
}

fn header_value(s: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(s).map_err(|e| ClientError::Request(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    /// A 2048-bit RSA key made once for these tests (generation takes a moment).
    fn test_key() -> &'static (String, String) {
        static KEY: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        KEY.get_or_init(|| {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
            let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
            let public = key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap();
            (private, public)
        })
    }

    fn verify(token: &str, aud: &str) -> jsonwebtoken::TokenData<TokenClaims> {
        let (_, public) = test_key();
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&[aud]);
        v.set_issuer(&[GOOGLE_ISSUER]);
        jsonwebtoken::decode::<TokenClaims>(
            token,
            &DecodingKey::from_rsa_pem(public.as_bytes()).unwrap(),
            &v,
        )
        .unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_carry_the_claims() {
        let signer = TokenSigner::from_pem(test_key().0.as_bytes(), "kid-1").unwrap();
        let claims = TokenClaims::dev(
            "sa@example.iam.gserviceaccount.com",
            "https://ekm.test",
            Duration::from_secs(3600),
        );
        let token = signer.mint(&claims).unwrap();
        let data = verify(&token, "https://ekm.test");
        assert_eq!(data.header.kid.as_deref(), Some("kid-1"));
        assert_eq!(data.header.alg, Algorithm::RS256);
        assert_eq!(data.claims, claims);
        assert_eq!(data.claims.exp - data.claims.iat, 3600);
        assert_eq!(data.claims.sub.len(), 21);
        assert_eq!(
            data.claims.sub,
            subject_for("sa@example.iam.gserviceaccount.com")
        );
        // Optional claims left out are absent from the token, not null.
        let payload = token.split('.').nth(1).unwrap();
        let json = URL_SAFE_NO_PAD.decode(payload).unwrap();
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert!(v.get("nbf").is_none() && v.get("jti").is_none());
        assert_eq!(v["email_verified"], true);
        assert!(!format!("{signer:?}").contains("PRIVATE"));
        assert!(TokenSigner::from_pem(b"junk", "k").is_err());
        // The ring fast path signs exactly what jsonwebtoken's `encode` does (PKCS#1 v1.5 is
        // deterministic), so the tokens are identical.
        assert!(signer.fast.is_some());
        assert_eq!(
            token,
            signer.mint_with_header(&signer.header(), &claims).unwrap()
        );
        let other = signer.with_kid("kid-2");
        assert_eq!(
            verify(&other.mint(&claims).unwrap(), "https://ekm.test")
                .header
                .kid
                .as_deref(),
            Some("kid-2")
        );
    }

    #[test]
    fn minting_source_makes_distinct_tokens() {
        let signer = TokenSigner::from_pem(test_key().0.as_bytes(), "kid-1").unwrap();
        let claims = TokenClaims::dev("a@b", "aud", Duration::from_secs(60));
        let source = TokenSource::minting(signer, claims);
        let a = source.token().unwrap().unwrap();
        let b = source.token().unwrap().unwrap();
        assert_ne!(a, b);
        assert_ne!(verify(&a, "aud").claims.jti, verify(&b, "aud").claims.jti);
        let fixed = TokenSource::fixed("t");
        assert_eq!(fixed.token().unwrap().as_deref(), Some("t"));
        assert_eq!(fixed.token().unwrap().as_deref(), Some("t"));
        assert!(TokenSource::None.token().unwrap().is_none());
        assert_eq!(format!("{fixed:?}"), "TokenSource::Fixed(<redacted>)");
    }

    #[test]
    fn reissue_keeps_the_lifetime() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut c = TokenClaims::dev_at("a@b", "aud", Duration::from_secs(60), t0);
        c.nbf = Some(990);
        c.reissue_at(UNIX_EPOCH + Duration::from_secs(5_000));
        assert_eq!((c.iat, c.exp, c.nbf), (5_000, 5_060, Some(4_990)));
    }

    #[test]
    fn bodies_have_the_wire_shape() {
        let v: Value = serde_json::from_slice(&wrap_body(
            "dev-aes-1",
            b"hi",
            Some(b"aad"),
            Some(&AdditionalContext::customer_initiated()),
        ))
        .unwrap();
        assert_eq!(v["keyPath"], "dev-aes-1");
        assert_eq!(v["plaintext"], "aGk=");
        assert_eq!(v["additionalAuthenticatedData"], "YWFk");
        assert_eq!(
            v["additionalContext"]["accessReasonContext"]["reason"],
            "CUSTOMER_INITIATED_ACCESS"
        );
        assert_eq!(
            v["additionalContext"]["relativeResourceName"],
            RESOURCE_NAME
        );
        assert!(v["additionalContext"].get("isKeyHealthCheck").is_none());

        let v: Value = serde_json::from_slice(&unwrap_body("k", b"\x01\x02", None, None)).unwrap();
        assert_eq!(v["wrappedBlob"], "AQI=");
        assert!(v.get("additionalAuthenticatedData").is_none());
        assert!(v.get("additionalContext").is_none());

        let hc = AdditionalContext::health_check().to_json();
        assert_eq!(hc["isKeyHealthCheck"], true);
        let n = AdditionalContext {
            access_reason: Some(AccessReason::Number(5)),
            ..Default::default()
        };
        assert_eq!(
            n.to_json(),
            serde_json::json!({"accessReasonContext": {"reason": 5}})
        );
        let e = AdditionalContext {
            access_reason: Some(AccessReason::Empty),
            ..Default::default()
        };
        assert_eq!(e.to_json(), serde_json::json!({"accessReasonContext": {}}));

        assert_eq!(
            key_url_path("/gcp/v0/keys/", "dev-aes-1", GcpOp::Wrap),
            "/gcp/v0/keys/dev-aes-1:wrap"
        );
        assert_eq!(
            key_url_path("/gcp/v0/keys", "a/b", GcpOp::Unwrap),
            "/gcp/v0/keys/a/b:unwrap"
        );
    }

    #[test]
    fn responses_and_errors() {
        assert_eq!(
            parse_wrap_response(br#"{"wrappedBlob":"AQI="}"#).unwrap(),
            vec![1, 2]
        );
        assert_eq!(
            parse_unwrap_response(br#"{"plaintext":"aGk="}"#).unwrap(),
            b"hi"
        );
        assert!(matches!(
            parse_unwrap_response(b"{}"),
            Err(ParseError::Missing("plaintext"))
        ));
        let body = br#"{"code":7,"status":"PERMISSION_DENIED","message":"denied","details":[
            {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"KAJ_DENIED","domain":"ekm-proxy","metadata":{"rule":"gcp.access_reasons"}},
            {"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"keyPath","description":"mismatch"}]}]}"#;
        let s = RpcStatus::parse(body).unwrap();
        assert_eq!((s.code, s.status.as_str()), (7, "PERMISSION_DENIED"));
        assert_eq!(s.reason(), Some("KAJ_DENIED"));
        assert_eq!(s.metadata("rule"), Some("gcp.access_reasons"));
        assert_eq!(
            s.field_violations(),
            vec![("keyPath".to_owned(), "mismatch".to_owned())]
        );
        let wrapped =
            RpcStatus::parse(br#"{"error":{"code":16,"status":"UNAUTHENTICATED"}}"#).unwrap();
        assert_eq!(wrapped.code, 16);
        assert!(wrapped.details.is_empty() && wrapped.reason().is_none());
        assert!(RpcStatus::parse(b"not json").is_none());
        assert!(RpcStatus::parse(br#"{"wrappedBlob":"AQI="}"#).is_none());
    }

    /// A fake Cloud EKM on 127.0.0.1:0 (plain HTTP): accepts `Bearer good*` tokens, "wraps" by
    /// reversing the bytes, echoes the Authorization header it saw in `x-seen-auth`, and answers
    /// anything else with a `google.rpc.Status`.
    async fn fake_ekm() -> std::net::SocketAddr {
        use http_body_util::BodyExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let seen = parts
                                .headers
                                .get(AUTHORIZATION)
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                            let (status, reply) = if !seen.starts_with("Bearer good") {
                                (
                                    401,
                                    serde_json::json!({"code": 16, "status": "UNAUTHENTICATED", "message": "no",
                                        "details": [{"@type": ERROR_INFO_TYPE, "reason": "MISSING_TOKEN"}]}),
                                )
                            } else {
                                let (field, out) = if parts.uri.path().ends_with(":wrap") {
                                    ("plaintext", "wrappedBlob")
                                } else {
                                    ("wrappedBlob", "plaintext")
                                };
                                let mut bytes = STANDARD
                                    .decode(v[field].as_str().unwrap_or_default())
                                    .unwrap();
                                bytes.reverse();
                                let mut m = Map::new();
                                m.insert(out.into(), STANDARD.encode(bytes).into());
                                m.insert("path".into(), parts.uri.path().into());
                                (200, Value::Object(m))
                            };
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from(reply.to_string())));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            resp.headers_mut()
                                .insert("x-seen-auth", HeaderValue::from_str(&seen).unwrap());
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    fn client_config(addr: std::net::SocketAddr) -> Arc<GcpClientConfig> {
        Arc::new(GcpClientConfig {
            addr,
            tls: None,
            host: format!("localhost:{}", addr.port()),
            path_prefix: "/gcp/v0/keys".into(),
        })
    }

    #[tokio::test]
    async fn client_round_trip_with_fixed_and_per_request_tokens() {
        let addr = fake_ekm().await;
        let mut c = GcpClient::connect(client_config(addr), TokenSource::fixed("good-1"))
            .await
            .unwrap();
        let blob = c
            .wrap(
                "dev-aes-1",
                b"abc",
                Some(b"aad"),
                Some(&AdditionalContext::customer_initiated()),
            )
            .await
            .unwrap();
        assert_eq!(blob, b"cba");
        assert_eq!(
            c.unwrap("dev-aes-1", &blob, None, None).await.unwrap(),
            b"abc"
        );
        let r = c
            .post("a/b", GcpOp::Unwrap, unwrap_body("a/b", b"x", None, None))
            .await
            .unwrap();
        assert_eq!(r.json().unwrap()["path"], "/gcp/v0/keys/a/b:unwrap");
        assert_eq!(r.headers["x-seen-auth"], "Bearer good-1");

        // A token per request, from a closure.
        let n = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&n);
        c.set_tokens(TokenSource::per_request(move || {
            Ok(format!("good-{}", counter.fetch_add(1, Ordering::SeqCst)))
        }));
        for i in 0..3 {
            let r = c
                .post("k", GcpOp::Wrap, wrap_body("k", b"x", None, None))
                .await
                .unwrap();
            assert_eq!(r.headers["x-seen-auth"], format!("Bearer good-{i}"));
        }

        // Refusals come back as the server's google.rpc.Status.
        let body = wrap_body("k", b"x", None, None);
        let r = c
            .post_path("/gcp/v0/keys/k:wrap", body.clone(), &Auth::Without)
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.headers["x-seen-auth"], "");
        assert_eq!(r.rpc_status().unwrap().reason(), Some("MISSING_TOKEN"));
        let r = c
            .post_path(
                "/gcp/v0/keys/k:wrap",
                body,
                &Auth::Raw("Basic Zm9vOmJhcg==".into()),
            )
            .await
            .unwrap();
        assert_eq!(r.headers["x-seen-auth"], "Basic Zm9vOmJhcg==");
        c.set_tokens(TokenSource::fixed("bad"));
        let err = c.wrap("k", b"x", None, None).await.unwrap_err();
        assert_eq!(err.http_status(), Some(401));
        assert_eq!(err.status_name(), Some("UNAUTHENTICATED"));
        assert!(err.to_string().contains("UNAUTHENTICATED"), "{err}");
        let err = GcpClient::connect(
            client_config(addr),
            TokenSource::per_request(|| Err(TokenError::Sign("no key".into()))),
        )
        .await
        .unwrap()
        .wrap("k", b"x", None, None)
        .await
        .unwrap_err();
        assert!(
            matches!(err, GcpError::Client(ClientError::Token(_))),
            "{err}"
        );
        assert!(!c.is_closed());
    }

    #[test]
    fn every_reason_name_is_unique() {
        let mut names: Vec<&str> = ACCESS_REASONS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ACCESS_REASONS.len());
    }
}
