//! JSON Web Key Sets: lenient parsing into verification keys, fetching from an HTTPS URL or a local
//! file, and the per-issuer cache (moka, single-flight, per-entry lifetime from the response's
//! cache headers) with the last good set kept for when the issuer cannot be reached.
//!
//! Only public keys pass through here. Symmetric (`oct`) keys are never loaded: a JWKS is public,
//! so a "secret" in it would let anyone mint tokens. Nothing here logs a token.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use http::header::{AGE, CACHE_CONTROL, DATE, ETAG, EXPIRES};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use super::{IssuerSettings, JwksSource, JwtError, JwtSetupError};
use crate::metrics::JwtMetrics;

/// Largest key set accepted (Google's is about 2 KiB).
pub(super) const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Shortest lifetime a response's cache headers can give a key set (protects the issuer and us).
pub(super) const MIN_TTL: Duration = Duration::from_secs(60);
/// Longest lifetime a response's cache headers can give a key set (bounds how long a removed key lives).
pub(super) const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Weakest RSA modulus accepted, in bytes (2048 bits).
const MIN_RSA_MODULUS_BYTES: usize = 256;
/// With no key set at all, how soon after a failed fetch the next request may try again.
const MAX_EMPTY_BACKOFF: Duration = Duration::from_secs(5);
/// The cache label for key sets in `ekm_cache_{hits,misses}_total`.
const CACHE_LABEL: &str = "jwks";

/// The kind of public key a JWK holds, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
    /// `kty: RSA` (RS256/384/512, PS256/384/512).
    Rsa,
    /// `kty: EC`, `crv: P-256` (ES256).
    EcP256,
    /// `kty: EC`, `crv: P-384` (ES384).
    EcP384,
    /// `kty: OKP`, `crv: Ed25519` (EdDSA).
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind may verify `alg`. HMAC never matches: no public key is a secret.
    pub(super) fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }
}

/// One usable verification key.
pub(super) struct VerifyKey {
    kid: String,
    kind: KeyKind,
    /// The JWK's own `alg`, when it names one: then only that algorithm may use the key.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl VerifyKey {
    /// The jsonwebtoken key.
    pub(super) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }

    fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }
}

/// What a key-set lookup found.
pub(super) enum Lookup<'a> {
    /// A key with that `kid` that may verify the algorithm.
    Found(&'a VerifyKey),
    /// No key with that `kid`.
    Absent,
    /// Keys with that `kid` exist, but none may verify this algorithm.
    Incompatible,
}

/// The usable keys of one key set.
pub(super) struct KeySet {
    keys: Vec<VerifyKey>,
}

impl KeySet {
    /// Parse a JWKS document. Keys that cannot verify signatures (`use` other than `sig`, symmetric
    /// or unknown key types, weak RSA, malformed members) are skipped with a debug line; a document
    /// that is not a JWKS, or holds no usable key, is an error (and the last good set stays).
    pub(super) fn parse(bytes: &[u8], issuer: &str) -> Result<Self, String> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("key set is not JSON: {e}"))?;
        let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
            return Err("key set has no \"keys\" array".to_owned());
        };
        let mut keys = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            match parse_key(entry) {
                Ok(key) => keys.push(key),
                Err(why) => tracing::debug!(issuer, index, why, "skipping JWKS entry"),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "key set holds no usable signing key ({} entries)",
                entries.len()
            ));
        }
        Ok(Self { keys })
    }

    /// Find the key `kid` for `alg`.
    pub(super) fn lookup(&self, kid: &str, alg: Algorithm) -> Lookup<'_> {
        let mut seen = false;
        for key in self.keys.iter().filter(|k| k.kid == kid) {
            if key.accepts(alg) {
                return Lookup::Found(key);
            }
            seen = true;
        }
        if seen {
            Lookup::Incompatible
        } else {
            Lookup::Absent
        }
    }

    /// Whether any key is named `kid`.
    pub(super) fn contains(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid == kid)
    }

    /// How many usable keys the set holds.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// One JWK → a verification key, or why it is skipped.
fn parse_key(entry: &Value) -> Result<VerifyKey, String> {
    let str_member = |name: &str| entry.get(name).and_then(Value::as_str);
    let kid = match str_member("kid") {
        Some(kid) if !kid.is_empty() => kid.to_owned(),
        // Tokens must name their key, so a key without a name can never be chosen.
        _ => return Err("no kid".to_owned()),
    };
    if let Some(usage) = entry.get("use")
        && usage.as_str() != Some("sig")
    {
        return Err(format!("kid {kid:?}: use is {usage}, not \"sig\""));
    }
    if let Some(ops) = entry.get("key_ops") {
        let verify = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verify {
            return Err(format!("kid {kid:?}: key_ops does not include \"verify\""));
        }
    }
    let alg = match entry.get("alg") {
        None => None,
        Some(alg) => {
            let name = alg.as_str().unwrap_or_default();
            match Algorithm::from_str(name) {
                Ok(alg) if !is_hmac(alg) => Some(alg),
                _ => {
                    return Err(format!(
                        "kid {kid:?}: alg {alg} is not a signature algorithm"
                    ));
                }
            }
        }
    };
    let member = |name: &str| {
        str_member(name).ok_or_else(|| format!("kid {kid:?}: missing or non-string {name:?}"))
    };
    let bad = |e: jsonwebtoken::errors::Error| format!("kid {kid:?}: unusable key: {e}");
    let (kind, key) = match str_member("kty") {
        Some("RSA") => {
            let n = member("n")?;
            let modulus = URL_SAFE_NO_PAD
                .decode(n.trim_end_matches('='))
                .map_err(|e| format!("kid {kid:?}: modulus is not base64url: {e}"))?;
            let significant = modulus.iter().skip_while(|&&b| b == 0).count();
            if significant < MIN_RSA_MODULUS_BYTES {
                return Err(format!(
                    "kid {kid:?}: RSA modulus of {} bits is below 2048",
                    significant * 8
                ));
            }
            (
                KeyKind::Rsa,
                DecodingKey::from_rsa_components(n, member("e")?).map_err(bad)?,
            )
        }
        Some("EC") => {
            let kind = match str_member("crv") {
                Some("P-256") => KeyKind::EcP256,
                Some("P-384") => KeyKind::EcP384,
                other => return Err(format!("kid {kid:?}: unsupported EC curve {other:?}")),
            };
            (
                kind,
                DecodingKey::from_ec_components(member("x")?, member("y")?).map_err(bad)?,
            )
        }
        Some("OKP") => {
            if str_member("crv") != Some("Ed25519") {
                return Err(format!("kid {kid:?}: unsupported OKP curve"));
            }
            (
                KeyKind::Ed25519,
                DecodingKey::from_ed_components(member("x")?).map_err(bad)?,
            )
        }
        Some(other) => return Err(format!("kid {kid:?}: unsupported kty {other:?}")),
        None => return Err(format!("kid {kid:?}: no kty")),
    };
    if let Some(alg) = alg
        && !kind.fits(alg)
    {
        return Err(format!(
            "kid {kid:?}: alg {alg:?} does not fit a {kind:?} key"
        ));
    }
    Ok(VerifyKey {
        kid,
        kind,
        alg,
        key,
    })
}

/// Whether `alg` is in the HMAC family (shared secrets: never acceptable for third-party tokens).
pub(super) fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

// ---------------------------------------------------------------------------------------------
// Cache headers

/// The lifetime a response's headers give it: `Cache-Control` (`no-store`/`no-cache` → 0,
/// `max-age` minus `Age`), else `Expires` minus `Date` (or `now`); `None` when neither is present.
/// The caller clamps the result to [`MIN_TTL`, `MAX_TTL`].
pub(super) fn header_ttl(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut max_age = None;
    let mut no_cache = false;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim();
            let (name, arg) = match directive.split_once('=') {
                Some((name, arg)) => (name.trim(), Some(arg.trim().trim_matches('"'))),
                None => (directive, None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                no_cache = true;
            } else if name.eq_ignore_ascii_case("max-age")
                && let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok())
            {
                max_age = Some(max_age.map_or(secs, |m: u64| m.min(secs)));
            }
        }
    }
    if no_cache {
        return Some(Duration::ZERO);
    }
    if let Some(max_age) = max_age {
        let age = headers
            .get(AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        return Some(Duration::from_secs(max_age.saturating_sub(age)));
    }
    let expires = headers.get(EXPIRES)?.to_str().ok()?;
    // An unparsable Expires (often "0" or "-1") means "already expired" (RFC 9111 §5.3).
    let Some(expires) = parse_http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
        .unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// Parse an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only format servers may send.
fn parse_http_date(value: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(value.trim(), format).ok()?;
    Some(SystemTime::from(at.assume_utc()))
}

/// The cache lifetime of a fetched set: the headers' lifetime clamped, else `default_ttl`.
pub(super) fn effective_ttl(header: Option<Duration>, default_ttl: Duration) -> Duration {
    match header {
        Some(ttl) => ttl.clamp(MIN_TTL, MAX_TTL),
        None => default_ttl,
    }
}

// ---------------------------------------------------------------------------------------------
// Fetching

/// Where the bytes come from, ready to fetch.
enum Source {
    Url {
        client: reqwest::Client,
        url: String,
    },
    File(PathBuf),
}

/// One successful fetch.
enum Fetched {
    /// A new document.
    Body {
        bytes: Vec<u8>,
        ttl: Duration,
        etag: Option<String>,
    },
    /// `304 Not Modified`: the last good set is still current.
    NotModified { ttl: Duration },
}

/// Build the HTTPS client for one issuer: rustls with ring, the `ca_file` roots or the platform
/// verifier, HTTPS only (redirects included), bounded time.
fn build_client(
    url: &str,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("jwks_url {url:?}: {e}"))?;
    if parsed.scheme() != "https" || parsed.host_str().is_none() {
        return Err(format!(
            "jwks_url {url:?} must be an https:// URL with a host"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let tls = match ca_file {
        Some(path) => {
            let roots = load_roots(path)?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| format!("system trust store: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::limited(3))
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("ekm-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client: {}", error_chain(&e)))
}

/// The PEM certificates of `path` as a root store (at least one).
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("jwks_ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "jwks_ca_file {}: no PEM certificate found",
            path.display()
        ));
    }
    Ok(roots)
}

/// An error and its sources on one line (reqwest's top-level message alone hides the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

impl Source {
    fn new(settings: &IssuerSettings) -> Result<Self, JwtSetupError> {
        match &settings.jwks {
            JwksSource::Url { url, ca_file } => {
                let client = build_client(url, ca_file.as_deref(), settings.fetch_timeout)
                    .map_err(|reason| JwtSetupError::Issuer {
                        issuer: settings.name.clone(),
                        reason,
                    })?;
                Ok(Source::Url {
                    client,
                    url: url.clone(),
                })
            }
            JwksSource::File(path) => Ok(Source::File(path.clone())),
        }
    }

    async fn fetch(&self, etag: Option<&str>, default_ttl: Duration) -> Result<Fetched, String> {
        match self {
            Source::Url { client, url } => fetch_url(client, url, etag, default_ttl).await,
            Source::File(path) => {
                let len = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .len();
                if len > MAX_JWKS_BYTES as u64 {
                    return Err(format!(
                        "{}: larger than {MAX_JWKS_BYTES} bytes",
                        path.display()
                    ));
                }
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(Fetched::Body {
                    bytes,
                    ttl: default_ttl,
                    etag: None,
                })
            }
        }
    }
}

async fn fetch_url(
    client: &reqwest::Client,
    url: &str,
    etag: Option<&str>,
    default_ttl: Duration,
) -> Result<Fetched, String> {
    let mut request = client
        .get(url)
        .header(http::header::ACCEPT, "application/json");
    if let Some(etag) = etag {
        request = request.header(http::header::IF_NONE_MATCH, etag);
    }
    let mut response = request.send().await.map_err(|e| error_chain(&e))?;
    let status = response.status();
    let ttl = effective_ttl(
        header_ttl(response.headers(), SystemTime::now()),
        default_ttl,
    );
    if status == http::StatusCode::NOT_MODIFIED && etag.is_some() {
        return Ok(Fetched::NotModified { ttl });
    }
    if status != http::StatusCode::OK {
        return Err(format!("HTTP status {status}"));
    }
    if response
        .content_length()
        .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
    {
        return Err(format!("response larger than {MAX_JWKS_BYTES} bytes"));
    }
    let new_etag = response
        .headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if bytes.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("response larger than {MAX_JWKS_BYTES} bytes"));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Fetched::Body {
        bytes,
        ttl,
        etag: new_etag,
    })
}

// ---------------------------------------------------------------------------------------------
// The per-issuer store

/// The cached value: the set and how long this copy lives.
#[derive(Clone)]
struct Cached {
    set: Arc<KeySet>,
    ttl: Duration,
}

/// Each cached copy lives as long as its fetch said.
struct CachedExpiry;

impl moka::Expiry<(), Cached> for CachedExpiry {
    fn expire_after_create(&self, _key: &(), value: &Cached, _now: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The last set that parsed, with its validator for conditional requests.
struct Good {
    set: Arc<KeySet>,
    etag: Option<String>,
}

/// One issuer's key set: cached, refreshed on expiry or (rate-limited) on an unknown `kid`, and
/// kept through fetch failures.
pub(super) struct IssuerKeys {
    issuer: String,
    source: Source,
    default_ttl: Duration,
    refresh_min_interval: Duration,
    cache: moka::future::Cache<(), Cached>,
    last_good: ArcSwapOption<Good>,
    last_forced_refresh: Mutex<Option<Instant>>,
    last_failure: Mutex<Option<Instant>>,
    metrics: JwtMetrics,
}

impl IssuerKeys {
    /// Prepare the store (and HTTP client); fetches nothing.
    pub(super) fn new(
        settings: &IssuerSettings,
        metrics: JwtMetrics,
    ) -> Result<Self, JwtSetupError> {
        Ok(Self {
            issuer: settings.name.clone(),
            source: Source::new(settings)?,
            default_ttl: settings.default_ttl,
            refresh_min_interval: settings.refresh_min_interval,
            cache: moka::future::Cache::builder()
                .max_capacity(1)
                .expire_after(CachedExpiry)
                .build(),
            last_good: ArcSwapOption::empty(),
            last_forced_refresh: Mutex::new(None),
            last_failure: Mutex::new(None),
            metrics,
        })
    }

    /// Start from `set` as the last good set (a reload carrying over, or a file read up front),
    /// so a failing fetch falls back to it instead of leaving the issuer without keys.
    pub(super) fn seed(&self, set: Arc<KeySet>) {
        self.metrics.jwks_keys(&self.issuer, set.len());
        self.last_good
            .store(Some(Arc::new(Good { set, etag: None })));
    }

    /// The last set that parsed, if any.
    pub(super) fn last_good(&self) -> Option<Arc<KeySet>> {
        self.last_good.load_full().map(|g| g.set.clone())
    }

    /// The current key set: cached, else fetched once however many callers wait (single flight),
    /// else the last good set; [`JwtError::JwksUnavailable`] only when there has never been one.
    pub(super) async fn current(&self) -> Result<Arc<KeySet>, JwtError> {
        let fetched = AtomicBool::new(false);
        let result = self
            .cache
            .try_get_with((), async {
                fetched.store(true, Ordering::Relaxed);
                self.load().await
            })
            .await;
        if fetched.load(Ordering::Relaxed) {
            self.metrics.cache().miss(CACHE_LABEL);
        } else {
            self.metrics.cache().hit(CACHE_LABEL);
        }
        result.map(|c| c.set).map_err(|_| JwtError::JwksUnavailable)
    }

    /// The set after a token named an unknown `kid`: refetched unless another refresh happened
    /// within `refresh_min_interval` (then the current set, counted as rate-limited), so a flood
    /// of made-up kids cannot hammer the issuer.
    pub(super) async fn refresh_for_unknown_kid(&self) -> Result<Arc<KeySet>, JwtError> {
        let allowed = {
            let mut last = lock(&self.last_forced_refresh);
            let now = Instant::now();
            let allowed = last.is_none_or(|at| now.duration_since(at) >= self.refresh_min_interval);
            if allowed {
                *last = Some(now);
            }
            allowed
        };
        if allowed {
            tracing::debug!(issuer = %self.issuer, "unknown kid: refreshing the key set");
            self.cache.invalidate(&()).await;
        } else {
            self.metrics.jwks_refresh_rate_limited(&self.issuer);
            tracing::debug!(issuer = %self.issuer, "unknown kid: key-set refresh rate-limited");
        }
        self.current().await
    }

    /// Fetch and parse; on failure fall back to the last good set for a short while.
    async fn load(&self) -> Result<Cached, ()> {
        let previous = self.last_good.load_full();
        if previous.is_none() && self.in_failure_backoff() {
            return Err(());
        }
        let etag = previous.as_ref().and_then(|g| g.etag.as_deref());
        let outcome = match self.source.fetch(etag, self.default_ttl).await {
            Ok(Fetched::Body { bytes, ttl, etag }) => match KeySet::parse(&bytes, &self.issuer) {
                Ok(set) => {
                    let set = Arc::new(set);
                    self.metrics.jwks_fetch(&self.issuer, "ok");
                    self.metrics.jwks_keys(&self.issuer, set.len());
                    tracing::debug!(issuer = %self.issuer, keys = set.len(), ttl_secs = ttl.as_secs(), "key set loaded");
                    self.last_good.store(Some(Arc::new(Good {
                        set: set.clone(),
                        etag,
                    })));
                    return Ok(Cached { set, ttl });
                }
                Err(e) => e,
            },
            Ok(Fetched::NotModified { ttl }) => match &previous {
                Some(good) => {
                    self.metrics.jwks_fetch(&self.issuer, "not_modified");
                    return Ok(Cached {
                        set: good.set.clone(),
                        ttl,
                    });
                }
                None => "304 Not Modified without a cached copy".to_owned(),
            },
            Err(e) => e,
        };
        self.metrics.jwks_fetch(&self.issuer, "error");
        match previous {
            Some(good) => {
                tracing::warn!(issuer = %self.issuer, error = %outcome,
                    "JWKS fetch failed; keeping the last good key set");
                Ok(Cached {
                    set: good.set.clone(),
                    // Retry soon, but not on every request while the issuer is down.
                    ttl: self.refresh_min_interval.max(Duration::from_secs(1)),
                })
            }
            None => {
                tracing::warn!(issuer = %self.issuer, error = %outcome,
                    "JWKS fetch failed and no key set is cached; tokens of this issuer cannot be verified");
                *lock(&self.last_failure) = Some(Instant::now());
                Err(())
            }
        }
    }

    /// With no set at all, whether the last failure was too recent to try again.
    fn in_failure_backoff(&self) -> bool {
        let backoff = self.refresh_min_interval.min(MAX_EMPTY_BACKOFF);
        lock(&self.last_failure).is_some_and(|at| at.elapsed() < backoff)
    }
}

/// Lock a mutex whose data (an `Option<Instant>`) cannot be left inconsistent by a panic.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
