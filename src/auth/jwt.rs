//! Bearer-token (JWT) authentication against configured OIDC issuers: the verifier the Google Cloud
//! EKM front end uses to prove that a request comes from an allowed Cloud EKM service agent.
//!
//! A token is checked in this order, each step refusing with its own [`JwtError`] reason:
//! `Authorization: Bearer` present → compact JWS shape → header (`alg` parsed by jsonwebtoken,
//! which knows no `none`; `kid` required; no `crit`) → issuer chosen by the *unverified* `iss`
//! (only to pick whose keys to use) → `alg` in that issuer's list (never HMAC) → key by `kid` whose
//! type and own `alg` fit the token's `alg` (one rate-limited refresh on an unknown `kid`) →
//! signature → `iss`, `aud`, `exp`/`nbf`/`iat` with leeway against the caller's clock → `email`,
//! `email_verified`, service-account globs.
//!
//! Verified tokens are remembered by SHA-256 (never the token itself) until `exp`; a hit is still
//! refused once `exp` passes or once its `kid` leaves the issuer's key set, so removing a key from
//! the JWKS revokes cached tokens too.
//!
//! Depends on `auth::Principal`, `authz::Pattern` (a leaf glob type), `metrics` and the
//! jsonwebtoken/reqwest/moka crates; never on `front`, `core` or `hsm`. Log lines name the reason
//! and the issuer, never the token.

mod claims;
mod jwks;
pub mod ring_verify;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use sha2::{Digest, Sha256};

use crate::auth::Principal;
use crate::authz::Pattern;
use crate::metrics::JwtMetrics;
use claims::Claims;
use jwks::{IssuerKeys, Lookup, is_hmac};

/// Longest `Authorization` token accepted (Google ID tokens are about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The cache label for verified tokens in `ekm_cache_{hits,misses}_total`.
const TOKEN_CACHE_LABEL: &str = "jwt";

/// Every issuer the verifier trusts, and the verified-token cache size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// The trusted issuers; a token is matched to one by its `iss` claim.
    pub issuers: Vec<IssuerSettings>,
    /// How many verified tokens to remember (by SHA-256 of the token); 0 disables the cache.
    pub token_cache_capacity: u64,
}

/// One trusted token issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerSettings {
    /// The configuration name of the issuer (e.g. `google`); logged and used as a metric label.
    pub name: String,
    /// Accepted `iss` claim values.
    pub issuers: Vec<String>,
    /// Where the issuer's signing keys come from.
    pub jwks: JwksSource,
    /// Accepted `aud` values (a token must name at least one).
    pub audiences: Vec<String>,
    /// Accepted signature algorithms; never HMAC, never `none`.
    pub algorithms: Vec<Algorithm>,
    /// Clock-skew allowance for `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Allowed `email` claim globs (non-empty).
    pub service_accounts: Vec<Pattern>,
    /// Whether `email_verified` must be true.
    pub require_email_verified: bool,
    /// At most one unknown-`kid` refresh of the key set per this interval.
    pub refresh_min_interval: Duration,
    /// Key-set lifetime when the response carries no `Cache-Control: max-age` or `Expires`.
    pub default_ttl: Duration,
    /// Deadline for one key-set fetch.
    pub fetch_timeout: Duration,
}

/// Where an issuer's JSON Web Key Set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// An `https://` URL; `ca_file` (PEM) replaces the system roots when given.
    Url {
        /// The key-set URL (HTTPS only).
        url: String,
        /// Trust these roots instead of the system's.
        ca_file: Option<PathBuf>,
    },
    /// A local file, re-read whenever the cached copy expires.
    File(PathBuf),
}

/// Read and parse a JWKS file as the verifier would: the number of usable signing keys, or why
/// the file cannot serve (missing, too large, not a JWKS, no usable key). For `check-config`
/// and reloads, which must refuse such a file rather than discover it on the first request.
pub fn check_jwks_file(path: &Path) -> Result<usize, String> {
    let bytes = read_jwks_file(path).map_err(|JwtSetupError::Issuer { reason, .. }| reason)?;
    jwks::KeySet::parse(&bytes, "check-config").map(|set| set.len())
}

/// The bytes of a JWKS file, bounded like a fetched set.
fn read_jwks_file(path: &Path) -> Result<Vec<u8>, JwtSetupError> {
    let refuse = |reason: String| JwtSetupError::Issuer {
        issuer: path.display().to_string(),
        reason,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| refuse(format!("{}: {e}", path.display())))?
        .len();
    if len > jwks::MAX_JWKS_BYTES as u64 {
        return Err(refuse(format!(
            "{}: larger than {} bytes",
            path.display(),
            jwks::MAX_JWKS_BYTES
        )));
    }
    std::fs::read(path).map_err(|e| refuse(format!("{}: {e}", path.display())))
}

/// Parse a configured algorithm name; refuses `none` and the HMAC family.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match Algorithm::from_str(name) {
        Ok(alg) if is_hmac(alg) => Err(format!(
            "{name} is an HMAC (shared-secret) algorithm; only public-key signatures are accepted"
        )),
        Ok(alg) => Ok(alg),
        Err(_) if name.eq_ignore_ascii_case("none") => {
            Err("\"none\" (unsigned tokens) is never accepted".to_owned())
        }
        Err(_) => Err(format!(
            "unknown algorithm {name:?} (expected RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"
        )),
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// No `Authorization: Bearer` token.
    #[error("no bearer token")]
    MissingToken,
    /// More than one `Authorization` header (which one counts would be ambiguous).
    #[error("more than one Authorization header")]
    DuplicateAuthorization,
    /// Not a well-formed compact JWS / JWT.
    #[error("malformed token")]
    Malformed,
    /// The header's algorithm is not allowed for the issuer.
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    /// No `kid` in the header.
    #[error("token header has no key id")]
    MissingKid,
    /// The `kid` is not in the issuer's key set.
    #[error("token signed by an unknown key")]
    UnknownKid,
    /// The signature does not verify.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is in the future.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `aud` names none of the accepted audiences.
    #[error("token audience not accepted")]
    WrongAudience,
    /// `iss` is not a trusted issuer.
    #[error("token issuer not trusted")]
    WrongIssuer,
    /// No `email` claim.
    #[error("token has no email claim")]
    MissingEmail,
    /// `email_verified` is not true.
    #[error("token email is not verified")]
    EmailNotVerified,
    /// `email` matches no allowed service account.
    #[error("token email is not an allowed service account")]
    EmailNotAllowed,
    /// The issuer's key set could not be obtained and none is cached.
    #[error("signing keys unavailable")]
    JwksUnavailable,
}

impl JwtError {
    /// The snake_case reason, for metric labels and error details.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::MissingToken => "missing_token",
            JwtError::DuplicateAuthorization => "duplicate_authorization",
            JwtError::Malformed => "malformed",
            JwtError::AlgorithmNotAllowed => "algorithm_not_allowed",
            JwtError::MissingKid => "missing_kid",
            JwtError::UnknownKid => "unknown_kid",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::IssuedInFuture => "issued_in_future",
            JwtError::WrongAudience => "wrong_audience",
            JwtError::WrongIssuer => "wrong_issuer",
            JwtError::MissingEmail => "missing_email",
            JwtError::EmailNotVerified => "email_not_verified",
            JwtError::EmailNotAllowed => "email_not_allowed",
            JwtError::JwksUnavailable => "jwks_unavailable",
        }
    }

    /// Whether the failure is ours (no signing keys), not the caller's: answer 503, not 401.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, JwtError::JwksUnavailable)
    }
}

/// Why the verifier could not be built from its settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSetupError {
    /// An issuer's settings are unusable.
    #[error("issuer {issuer}: {reason}")]
    Issuer {
        /// The issuer's configuration name.
        issuer: String,
        /// What is wrong.
        reason: String,
    },
}

/// One configured issuer, ready to verify.
struct Issuer {
    settings: IssuerSettings,
    keys: IssuerKeys,
}

/// A verified token, remembered by its hash.
#[derive(Clone)]
struct CachedToken {
    principal: Principal,
    /// Index into `JwtVerifier::issuers`.
    issuer: usize,
    kid: Arc<str>,
    exp: u64,
    /// How long the entry may live (until `exp` as seen when it was inserted).
    ttl: Duration,
}

/// Token-cache entries expire at the token's `exp`.
struct TokenExpiry;

impl moka::Expiry<[u8; 32], CachedToken> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &CachedToken,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A refusal with the issuer it was judged against, for the log line.
struct Refusal {
    error: JwtError,
    issuer: Option<usize>,
}

impl From<JwtError> for Refusal {
    fn from(error: JwtError) -> Self {
        Self {
            error,
            issuer: None,
        }
    }
}

/// Verifies bearer tokens against the configured issuers.
pub struct JwtVerifier {
    issuers: Vec<Issuer>,
    tokens: Option<moka::sync::Cache<[u8; 32], CachedToken>>,
    metrics: JwtMetrics,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .issuers
            .iter()
            .map(|i| i.settings.name.as_str())
            .collect();
        f.debug_struct("JwtVerifier")
            .field("issuers", &names)
            .field("token_cache", &self.tokens.is_some())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Build the verifier (HTTP clients, caches); fetches nothing yet (see [`Self::prefetch`]).
    /// Refuses settings that would weaken verification even if the config layer let them through:
    /// HMAC algorithms, empty lists, an `iss` value claimed by two issuers, a non-`https://` URL,
    /// an unreadable `ca_file`. With no issuer at all, every token is refused (`wrong_issuer`).
    pub fn new(settings: &JwtSettings, metrics: JwtMetrics) -> Result<Self, JwtSetupError> {
        ring_verify::install();
        if !ring_verify::installed() {
            // Still correct, only slower: jsonwebtoken was used in this process before any
            // verifier was built, which fixed its provider (the binary installs ours first).
            tracing::warn!("JWT signatures are checked by the pure-Rust provider, not ring");
        }
        let mut issuers: Vec<Issuer> = Vec::with_capacity(settings.issuers.len());
        for issuer in &settings.issuers {
            let refuse = |reason: String| JwtSetupError::Issuer {
                issuer: issuer.name.clone(),
                reason,
            };
            if let Some(alg) = issuer.algorithms.iter().find(|a| is_hmac(**a)) {
                return Err(refuse(format!("{alg:?} (HMAC) is never accepted")));
            }
            for (what, empty) in [
                ("issuers", issuer.issuers.is_empty()),
                ("audiences", issuer.audiences.is_empty()),
                ("algorithms", issuer.algorithms.is_empty()),
                ("service_accounts", issuer.service_accounts.is_empty()),
            ] {
                if empty {
                    return Err(refuse(format!("{what} must not be empty")));
                }
            }
            for iss in &issuer.issuers {
                if let Some(other) = issuers.iter().find(|o| o.settings.issuers.contains(iss)) {
                    return Err(refuse(format!(
                        "iss {iss:?} is already accepted by issuer {:?}",
                        other.settings.name
                    )));
                }
            }
            issuers.push(Issuer {
                settings: issuer.clone(),
                keys: IssuerKeys::new(issuer, metrics.clone())?,
            });
        }
        let tokens = (settings.token_cache_capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(settings.token_cache_capacity)
                .expire_after(TokenExpiry)
                .build()
        });
        Ok(Self {
            issuers,
            tokens,
            metrics,
        })
    }

    /// Build the verifier that replaces `previous` on a reload. Unlike [`Self::new`], which
    /// tolerates an issuer whose keys cannot be had yet (they are fetched on demand), a reload
    /// must not take a working issuer down: a `jwks_file` is read and parsed now and must hold at
    /// least one usable key, and a URL issuer whose name and URL are unchanged starts from the
    /// previous verifier's last good set, so a reload never throws away keys that work.
    pub fn replacing(
        settings: &JwtSettings,
        metrics: JwtMetrics,
        previous: &JwtVerifier,
    ) -> Result<Self, JwtSetupError> {
        let verifier = Self::new(settings, metrics)?;
        for issuer in &verifier.issuers {
            match &issuer.settings.jwks {
                JwksSource::File(path) => {
                    let set = jwks::KeySet::parse(&read_jwks_file(path)?, &issuer.settings.name)
                        .map_err(|reason| JwtSetupError::Issuer {
                            issuer: issuer.settings.name.clone(),
                            reason: format!("{}: {reason}", path.display()),
                        })?;
                    issuer.keys.seed(Arc::new(set));
                }
                JwksSource::Url { .. } => {
                    let same = previous.issuers.iter().find(|p| {
                        p.settings.name == issuer.settings.name
                            && p.settings.jwks == issuer.settings.jwks
                    });
                    if let Some(set) = same.and_then(|p| p.keys.last_good()) {
                        issuer.keys.seed(set);
                    }
                }
            }
        }
        Ok(verifier)
    }

    /// Verify the raw `Authorization` header value at time `now`.
    pub async fn verify(
        &self,
        authorization: Option<&str>,
        now: SystemTime,
    ) -> Result<Principal, JwtError> {
        let token = bearer_token(authorization)?;
        let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(principal) = self.cached(&digest, now_secs).await {
            return Ok(principal);
        }
        match self.verify_uncached(token, now_secs).await {
            Ok(entry) => {
                let principal = entry.principal.clone();
                if let Some(tokens) = &self.tokens
                    && entry.ttl > Duration::ZERO
                {
                    tokens.insert(digest, entry);
                }
                Ok(principal)
            }
            Err(refusal) => {
                let issuer = refusal
                    .issuer
                    .and_then(|i| self.issuers.get(i))
                    .map_or("-", |i| i.settings.name.as_str());
                if refusal.error.is_unavailable() {
                    tracing::warn!(
                        reason = refusal.error.reason(),
                        issuer,
                        "bearer token not verified"
                    );
                } else {
                    // The front logs the refusal with its request context; this adds the issuer.
                    tracing::debug!(
                        reason = refusal.error.reason(),
                        issuer,
                        "bearer token refused"
                    );
                }
                Err(refusal.error)
            }
        }
    }

    /// Warm every issuer's key set once (start-up); failures are logged, never fatal.
    pub async fn prefetch(&self) {
        for issuer in &self.issuers {
            match issuer.keys.current().await {
                Ok(set) => {
                    tracing::info!(issuer = %issuer.settings.name, keys = set.len(), "JWKS loaded")
                }
                // The fetch path has already logged the cause.
                Err(_) => tracing::warn!(issuer = %issuer.settings.name,
                    "JWKS not available at start-up; will retry on demand"),
            }
        }
    }

    /// A remembered verification that still holds: before `exp`, and its key still published.
    async fn cached(&self, digest: &[u8; 32], now: u64) -> Option<Principal> {
        let tokens = self.tokens.as_ref()?;
        let Some(entry) = tokens.get(digest) else {
            self.metrics.cache().miss(TOKEN_CACHE_LABEL);
            return None;
        };
        let issuer = self.issuers.get(entry.issuer)?;
        let key_still_published = match issuer.keys.current().await {
            Ok(set) => set.contains(&entry.kid),
            Err(_) => false,
        };
        if now > entry.exp || !key_still_published {
            // Fall through to a full verification, which names the reason.
            tokens.invalidate(digest);
            self.metrics.cache().miss(TOKEN_CACHE_LABEL);
            return None;
        }
        self.metrics.cache().hit(TOKEN_CACHE_LABEL);
        Some(entry.principal)
    }

    async fn verify_uncached(&self, token: &str, now: u64) -> Result<CachedToken, Refusal> {
        let Unverified { alg, kid, iss } = read_unverified(token)?;
        let Some(index) = iss.as_deref().and_then(|iss| {
            self.issuers
                .iter()
                .position(|i| i.settings.issuers.iter().any(|a| a == iss))
        }) else {
            return Err(JwtError::WrongIssuer.into());
        };
        let refuse = |error: JwtError| Refusal {
            error,
            issuer: Some(index),
        };
        let issuer = &self.issuers[index];
        if is_hmac(alg) || !issuer.settings.algorithms.contains(&alg) {
            return Err(refuse(JwtError::AlgorithmNotAllowed));
        }
        let mut set = issuer.keys.current().await.map_err(refuse)?;
        if matches!(set.lookup(&kid, alg), Lookup::Absent) {
            set = issuer
                .keys
                .refresh_for_unknown_kid()
                .await
                .map_err(refuse)?;
        }
        let key = match set.lookup(&kid, alg) {
            Lookup::Found(key) => key,
            Lookup::Absent => return Err(refuse(JwtError::UnknownKid)),
            Lookup::Incompatible => return Err(refuse(JwtError::AlgorithmNotAllowed)),
        };
        let claims: Claims = jsonwebtoken::decode(token, key.decoding_key(), &signature_only(alg))
            .map_err(|e| refuse(map_decode_error(&e, &issuer.settings.name)))?
            .claims;
        let checked = claims::check(claims, &issuer.settings, now).map_err(refuse)?;
        let ttl = Duration::from_secs(checked.exp.saturating_sub(now));
        Ok(CachedToken {
            principal: Principal::Jwt {
                issuer: issuer.settings.name.clone(),
                subject: checked.subject,
                email: checked.email,
            },
            issuer: index,
            kid: kid.into(),
            exp: checked.exp,
            ttl,
        })
    }
}

/// What a compact token says before any signature is checked.
struct Unverified {
    alg: Algorithm,
    kid: String,
    /// The claimed `iss`, used only to choose which issuer's keys verify the signature.
    iss: Option<String>,
}

/// Split a compact token and read its header and claimed issuer: everything the verifier parses
/// of attacker-controlled bytes before it has a key to check them with.
fn read_unverified(token: &str) -> Result<Unverified, JwtError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = match jsonwebtoken::decode_header(token) {
        Ok(header) => header,
        Err(_) => return Err(classify_bad_header(header_b64)),
    };
    if header.crit.is_some() {
        // RFC 7515 §4.1.11: extensions we do not understand must not be ignored.
        return Err(JwtError::Malformed);
    }
    let kid = match header.kid {
        Some(kid) if !kid.is_empty() => kid,
        _ => return Err(JwtError::MissingKid),
    };
    let iss = claims::peek_issuer(payload_b64)?;
    Ok(Unverified {
        alg: header.alg,
        kid,
        iss,
    })
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer_token(authorization: Option<&str>) -> Result<&str, JwtError> {
    let value = authorization.ok_or(JwtError::MissingToken)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(JwtError::MissingToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(JwtError::MissingToken);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(JwtError::MissingToken);
    }
    if token.len() > MAX_TOKEN_BYTES || token.contains(char::is_whitespace) {
        return Err(JwtError::Malformed);
    }
    Ok(token)
}

/// Why jsonwebtoken refused a header: an `alg` it does not know (`none`, `HS1`, ...) is an
/// algorithm refusal; anything else is malformed.
fn classify_bad_header(header_b64: &str) -> JwtError {
    use base64::Engine;
    let alg = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|header| {
            header
                .get("alg")
                .and_then(|a| a.as_str().map(str::to_owned))
        });
    match alg {
        Some(alg) if Algorithm::from_str(&alg).is_err() => JwtError::AlgorithmNotAllowed,
        _ => JwtError::Malformed,
    }
}

/// jsonwebtoken checks only the signature (with exactly `alg`); every claim is checked by
/// [`claims::check`] against the caller's clock.
fn signature_only(alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    validation
}

fn map_decode_error(error: &jsonwebtoken::errors::Error, issuer: &str) -> JwtError {
    match error.kind() {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => JwtError::AlgorithmNotAllowed,
        ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::UnsupportedAlgorithm => {
            // A published key that cannot verify: the issuer's problem, worth an operator's look.
            tracing::warn!(issuer, error = %error, "JWKS key could not verify a signature");
            JwtError::BadSignature
        }
        _ => JwtError::Malformed,
    }
}

/// Fuzzing and corpus-replay entry points: the token and key-set parsers, reachable without a
/// network, a clock or a signing key. Not an API.
#[doc(hidden)]
pub mod fuzz_support {
    use std::time::Duration;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::{
        Algorithm, IssuerSettings, JwksSource, JwtError, bearer_token, claims, jwks,
        read_unverified,
    };
    use crate::authz::Pattern;

    /// What the verifier reads from an `Authorization` value before checking a signature, and
    /// the claim checks' verdict on its payload (as if the signature had verified).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct TokenView {
        /// `alg` of the header.
        pub alg: String,
        /// `kid` of the header.
        pub kid: String,
        /// The claimed `iss`.
        pub iss: Option<String>,
        /// The claim checks' verdict (reason on refusal, the email on success).
        pub claims: Result<String, &'static str>,
    }

    /// Read `authorization` the way the verifier does.
    pub fn token(authorization: &str) -> Result<TokenView, JwtError> {
        let token = bearer_token(Some(authorization))?;
        let unverified = read_unverified(token)?;
        let payload = token.split('.').nth(1).unwrap_or_default();
        let claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<claims::Claims>(&bytes).ok())
            .map_or(Err("malformed"), |c| {
                claims::check(c, &issuer(), 1_700_000_000)
                    .map(|checked| checked.email)
                    .map_err(|e| e.reason())
            });
        Ok(TokenView {
            alg: format!("{:?}", unverified.alg),
            kid: unverified.kid,
            iss: unverified.iss,
            claims,
        })
    }

    /// Parse a JWKS document; the number of usable keys, or why none.
    pub fn jwks(bytes: &[u8]) -> Result<usize, String> {
        jwks::KeySet::parse(bytes, "fuzz").map(|set| set.len())
    }

    /// Whether the set parsed from `bytes` names `kid` and can verify `alg` with it.
    pub fn jwks_has(bytes: &[u8], kid: &str, alg: Algorithm) -> bool {
        jwks::KeySet::parse(bytes, "fuzz")
            .is_ok_and(|set| matches!(set.lookup(kid, alg), jwks::Lookup::Found(_)))
    }

    fn issuer() -> IssuerSettings {
        IssuerSettings {
            name: "fuzz".into(),
            issuers: vec!["https://accounts.google.com".into()],
            jwks: JwksSource::File("/nonexistent".into()),
            audiences: vec!["https://ekm.example.com".into()],
            algorithms: vec![Algorithm::RS256],
            leeway: Duration::from_secs(30),
            service_accounts: vec![Pattern::new("*@example.iam.gserviceaccount.com")],
            require_email_verified: true,
            refresh_min_interval: Duration::from_secs(30),
            default_ttl: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}
