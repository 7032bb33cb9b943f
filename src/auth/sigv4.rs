//! AWS Signature Version 4 (`AWS4-HMAC-SHA256`): the verifier the XKS front end uses to
//! authenticate KMS, and the signer the XKS client, benchmark and tests use.
//!
//! Verification is driven by the request's own `SignedHeaders` (KMS signs `host;x-amz-date`, curl
//! `content-type;host;x-amz-date`), with `host` and `x-amz-date` required among them; see
//! `specs/xks-v1.md` §7.1. Per request the verifier computes the body hash, the canonical-request
//! hash and one HMAC: the derived signing key is cached per (access key id, date, region).
//!
//! Depends on `auth::Principal`, `secret` and the `http`/`sha2`/`hmac`/`subtle` crates only; it must
//! not depend on `core`, `hsm`, `front` or `server`. Nothing here logs, and no error message
//! carries a secret or a signature.

mod canonical;
mod date;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::auth::Principal;
use crate::secret::SecretString;
use canonical::{CanonicalInput, write_canonical_request};
use date::{AMZ_DATE_LEN, format_amz_date, parse_amz_date, within_skew};

/// The only algorithm SigV4 defines for headers.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The clock-skew allowance the XKS spec asks for (±5 minutes).
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(300);

const X_AMZ_DATE: &str = "x-amz-date";
const X_AMZ_CONTENT_SHA256: &str = "x-amz-content-sha256";
const TERMINATOR: &str = "aws4_request";

type HmacSha256 = Hmac<Sha256>;

/// One access key id and its secret.
#[derive(Clone, Debug)]
pub struct SigV4Credential {
    /// The public half; selects the secret.
    pub access_key_id: String,
    /// The shared secret (`Debug` prints `[redacted]`).
    pub secret: SecretString,
}

/// Which regions a credential scope may name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionPolicy {
    /// Any region (multi-Region deployments that do not want to list them).
    Any,
    /// Exactly one of these.
    OneOf(Vec<String>),
}

impl RegionPolicy {
    fn allows(&self, region: &str) -> bool {
        match self {
            RegionPolicy::Any => true,
            RegionPolicy::OneOf(regions) => regions.iter().any(|r| r == region),
        }
    }
}

/// The parts of an HTTP request that SigV4 covers, borrowed from the server's request.
#[derive(Clone, Copy, Debug)]
pub struct SignedRequest<'a> {
    /// HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// The path as received (percent-encoded as on the wire), e.g. `/p/kms/xks/v1/health`.
    pub path: &'a str,
    /// The raw query string without `?` (normally empty).
    pub query: &'a str,
    /// All request headers.
    pub headers: &'a HeaderMap,
    /// The request URI's authority, used as `host` when there is no `Host` header (HTTP/2).
    pub authority: Option<&'a str>,
    /// The raw body.
    pub body: &'a [u8],
}

/// Why a request was not authenticated. Messages never contain a secret or a signature.
#[derive(Debug, thiserror::Error)]
pub enum SigV4Error {
    /// No `Authorization` header.
    #[error("missing Authorization header")]
    MissingAuthorization,
    /// The `Authorization` header is not a well-formed SigV4 header.
    #[error("malformed Authorization header: {0}")]
    MalformedAuthorization(&'static str),
    /// An algorithm other than `AWS4-HMAC-SHA256`.
    #[error("unsupported authorization algorithm")]
    UnsupportedAlgorithm,
    /// The access key id is not configured.
    #[error("unknown access key id")]
    UnknownAccessKey,
    /// The credential scope names another service.
    #[error("credential scope names the wrong service")]
    WrongService,
    /// The credential scope names a region that is not allowed.
    #[error("credential scope region is not allowed")]
    RegionNotAllowed,
    /// The credential scope date differs from the `X-Amz-Date` date.
    #[error("credential scope date does not match X-Amz-Date")]
    ScopeDateMismatch,
    /// No `X-Amz-Date` header.
    #[error("missing X-Amz-Date header")]
    MissingDate,
    /// `X-Amz-Date` is not `yyyymmddThhmmssZ` (or appears twice).
    #[error("malformed X-Amz-Date header")]
    MalformedDate,
    /// `X-Amz-Date` is too far from the server's clock.
    #[error("X-Amz-Date is outside the allowed clock skew")]
    ClockSkew,
    /// `host` or `x-amz-date` is not among the signed headers.
    #[error("header {0} is not signed")]
    HeaderNotSigned(&'static str),
    /// A header listed in `SignedHeaders` is absent from the request.
    #[error("signed header {0:?} is missing from the request")]
    SignedHeaderMissing(String),
    /// A signed `x-amz-content-sha256` differs from the body's hash.
    #[error("x-amz-content-sha256 does not match the body")]
    ContentHashMismatch,
    /// The signature does not match.
    #[error("signature does not match")]
    SignatureMismatch,
}

impl SigV4Error {
    /// A short snake_case label for metrics (`ekm_auth_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            SigV4Error::MissingAuthorization => "missing_authorization",
            SigV4Error::MalformedAuthorization(_) => "malformed_authorization",
            SigV4Error::UnsupportedAlgorithm => "unsupported_algorithm",
            SigV4Error::UnknownAccessKey => "unknown_access_key",
            SigV4Error::WrongService => "wrong_service",
            SigV4Error::RegionNotAllowed => "region_not_allowed",
            SigV4Error::ScopeDateMismatch => "scope_date_mismatch",
            SigV4Error::MissingDate => "missing_date",
            SigV4Error::MalformedDate => "malformed_date",
            SigV4Error::ClockSkew => "clock_skew",
            SigV4Error::HeaderNotSigned(_) => "header_not_signed",
            SigV4Error::SignedHeaderMissing(_) => "signed_header_missing",
            SigV4Error::ContentHashMismatch => "content_hash_mismatch",
            SigV4Error::SignatureMismatch => "signature_mismatch",
        }
    }
}

/// Verifies SigV4 `Authorization` headers for one service against a set of credentials.
///
/// Immutable after construction (credential rotation builds a new verifier), `Send + Sync`; the
/// only interior state is the bounded signing-key cache.
pub struct SigV4Verifier {
    service: String,
    regions: RegionPolicy,
    max_skew: Duration,
    credentials: Vec<SigV4Credential>,
    keys: KeyCache,
}

impl fmt::Debug for SigV4Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self
            .credentials
            .iter()
            .map(|c| c.access_key_id.as_str())
            .collect();
        f.debug_struct("SigV4Verifier")
            .field("service", &self.service)
            .field("regions", &self.regions)
            .field("max_skew", &self.max_skew)
            .field("access_key_ids", &ids)
            .finish_non_exhaustive()
    }
}

impl SigV4Verifier {
    /// A verifier for `service` (e.g. `kms-xks-proxy`). When two credentials share an access key
    /// id the first wins (config validation should reject that).
    pub fn new(
        service: &str,
        regions: RegionPolicy,
        max_skew: Duration,
        credentials: Vec<SigV4Credential>,
    ) -> Self {
        let region_count = match &regions {
            RegionPolicy::Any => 4,
            RegionPolicy::OneOf(r) => r.len().max(1),
        };
        // Enough for every credential × region over the two dates a ±skew window can straddle,
        // with headroom; an attacker cycling regions under `Any` can only cause recomputation.
        let capacity = (credentials.len().max(1) * region_count * 3).clamp(16, 1024);
        Self {
            service: service.to_owned(),
            regions,
            max_skew,
            credentials,
            keys: KeyCache::new(capacity),
        }
    }

    /// Authenticates `req` at time `now`; on success returns who signed it.
    pub fn verify(
        &self,
        req: &SignedRequest<'_>,
        now: SystemTime,
    ) -> Result<Principal, SigV4Error> {
        let authorization = single_header(req.headers, http::header::AUTHORIZATION.as_str())
            .map_err(|()| SigV4Error::MalformedAuthorization("more than one Authorization header"))?
            .ok_or(SigV4Error::MissingAuthorization)?;
        let authorization = authorization
            .to_str()
            .map_err(|_| SigV4Error::MalformedAuthorization("not visible ASCII"))?;
        let auth = parse_authorization(authorization)?;
        let scope = parse_credential(auth.credential)?;

        if scope.service != self.service {
            return Err(SigV4Error::WrongService);
        }
        if !self.regions.allows(scope.region) {
            return Err(SigV4Error::RegionNotAllowed);
        }
        let credential = self
            .credentials
            .iter()
            .find(|c| c.access_key_id == scope.access_key_id)
            .ok_or(SigV4Error::UnknownAccessKey)?;
        let signed = parse_signed_headers(auth.signed_headers)?;

        let amz_date = single_header(req.headers, X_AMZ_DATE)
            .map_err(|()| SigV4Error::MalformedDate)?
            .ok_or(SigV4Error::MissingDate)?
            .to_str()
            .map_err(|_| SigV4Error::MalformedDate)?;
        let timestamp = parse_amz_date(amz_date).ok_or(SigV4Error::MalformedDate)?;
        if amz_date.get(..8) != Some(scope.date) {
            return Err(SigV4Error::ScopeDateMismatch);
        }
        if !within_skew(now, timestamp, self.max_skew) {
            return Err(SigV4Error::ClockSkew);
        }

        let payload_hash = hex_sha256(req.body);
        // Only a signed content hash binds anything; an unsigned one could be rewritten in
        // transit anyway, so it is ignored like any other unsigned header.
        if signed.content_sha256 {
            let claimed = single_header(req.headers, X_AMZ_CONTENT_SHA256)
                .map_err(|()| SigV4Error::ContentHashMismatch)?
                .ok_or_else(|| SigV4Error::SignedHeaderMissing(X_AMZ_CONTENT_SHA256.to_owned()))?;
            if !claimed.as_bytes().eq_ignore_ascii_case(&payload_hash) {
                return Err(SigV4Error::ContentHashMismatch);
            }
        }

        let mut hasher = Sha256::new();
        write_canonical_request(
            &mut hasher,
            &CanonicalInput {
                method: req.method,
                path: req.path,
                query: req.query,
                headers: req.headers,
                authority: req.authority,
                signed_headers: auth.signed_headers,
                payload_hash: ascii(&payload_hash),
            },
        )?;
        let canonical_hash = hasher.finalize();

        let key = self
            .keys
            .get_or_derive(auth.credential, || {
                derive_signing_key(
                    credential.secret.expose(),
                    scope.date,
                    scope.region,
                    scope.service,
                )
            })
            // HMAC accepts keys of any length, so this cannot happen; fail closed if it does.
            .ok_or(SigV4Error::SignatureMismatch)?;
        let expected = signature(&key, amz_date, scope.scope, &canonical_hash)
            .ok_or(SigV4Error::SignatureMismatch)?;

        if bool::from(expected.ct_eq(&auth.signature)) {
            Ok(Principal::SigV4 {
                access_key_id: credential.access_key_id.clone(),
                region: scope.region.to_owned(),
            })
        } else {
            Err(SigV4Error::SignatureMismatch)
        }
    }
}

/// Signs a request: sets `x-amz-date` and `authorization` in `headers`, signing exactly
/// `signed_headers` (names are lowercased and sorted as SigV4 requires). `headers` must already
/// hold every signed header other than `x-amz-date`, normally `host`.
///
/// Derives the signing key on every call; [`SigV4Signer`] keeps it across calls.
#[allow(clippy::too_many_arguments)] // mirrors the SigV4 inputs one to one; a struct adds nothing
pub fn sign(
    method: &str,
    path: &str,
    query: &str,
    headers: &mut HeaderMap,
    body: &[u8],
    signed_headers: &[&str],
    access_key_id: &str,
    secret: &SecretString,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<(), SigV4Error> {
    let scope = ScopeRef {
        access_key_id,
        region,
        service,
    };
    let request = RequestRef {
        method,
        path,
        query,
        body,
        signed_headers,
    };
    sign_with(&request, headers, &scope, time, |date| {
        derive_signing_key(secret.expose(), date, region, service).map(Arc::new)
    })
}

/// A signer for one credential and scope (access key id, secret, region, service) that keeps the
/// derived signing key of the current date, so signing costs one body hash, one canonical-request
/// hash and one HMAC. For clients that sign every request (the benchmark). `Send + Sync`.
pub struct SigV4Signer {
    access_key_id: String,
    secret: SecretString,
    region: String,
    service: String,
    /// The key of the last date signed for; dates change once a day.
    key: std::sync::Mutex<Option<([u8; 8], Arc<SigningKey>)>>,
}

impl fmt::Debug for SigV4Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigV4Signer")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl SigV4Signer {
    /// A signer for this credential and scope.
    pub fn new(access_key_id: &str, secret: SecretString, region: &str, service: &str) -> Self {
        Self {
            access_key_id: access_key_id.to_owned(),
            secret,
            region: region.to_owned(),
            service: service.to_owned(),
            key: std::sync::Mutex::new(None),
        }
    }

    /// Same as [`sign`] with this signer's credential and scope.
    #[allow(clippy::too_many_arguments)] // the request parts of `sign`, minus the credential
    pub fn sign(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &mut HeaderMap,
        body: &[u8],
        signed_headers: &[&str],
        time: SystemTime,
    ) -> Result<(), SigV4Error> {
        let scope = ScopeRef {
            access_key_id: &self.access_key_id,
            region: &self.region,
            service: &self.service,
        };
        let request = RequestRef {
            method,
            path,
            query,
            body,
            signed_headers,
        };
        sign_with(&request, headers, &scope, time, |date| {
            let mut day = [0u8; 8];
            day.copy_from_slice(date.as_bytes().get(..8)?);
            // A poisoned lock only means another thread panicked; the cached key is still valid.
            let mut slot = self.key.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((cached_day, key)) = slot.as_ref()
                && *cached_day == day
            {
                return Some(Arc::clone(key));
            }
            let key = Arc::new(derive_signing_key(
                self.secret.expose(),
                date,
                &self.region,
                &self.service,
            )?);
            *slot = Some((day, Arc::clone(&key)));
            Some(key)
        })
    }
}

/// The credential and scope a signature is made for.
struct ScopeRef<'a> {
    access_key_id: &'a str,
    region: &'a str,
    service: &'a str,
}

/// The request parts a signature covers (headers apart: they are written to).
struct RequestRef<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    body: &'a [u8],
    signed_headers: &'a [&'a str],
}

/// The signing core shared by [`sign`] and [`SigV4Signer`]; `key_for(date)` supplies the signing
/// key for the `yyyymmdd` date.
fn sign_with(
    req: &RequestRef<'_>,
    headers: &mut HeaderMap,
    scope: &ScopeRef<'_>,
    time: SystemTime,
    key_for: impl FnOnce(&str) -> Option<Arc<SigningKey>>,
) -> Result<(), SigV4Error> {
    let amz_date_bytes = format_amz_date(time).ok_or(SigV4Error::MalformedDate)?;
    let amz_date = std::str::from_utf8(&amz_date_bytes).map_err(|_| SigV4Error::MalformedDate)?;
    headers.insert(
        HeaderName::from_static(X_AMZ_DATE),
        HeaderValue::from_bytes(&amz_date_bytes).map_err(|_| SigV4Error::MalformedDate)?,
    );

    let mut names: Vec<String> = req
        .signed_headers
        .iter()
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    names.sort_unstable();
    names.dedup();
    let signed = names.join(";");

    let payload_hash = hex_sha256(req.body);
    let mut hasher = Sha256::new();
    write_canonical_request(
        &mut hasher,
        &CanonicalInput {
            method: req.method,
            path: req.path,
            query: req.query,
            headers,
            authority: None,
            signed_headers: &signed,
            payload_hash: ascii(&payload_hash),
        },
    )?;
    let canonical_hash = hasher.finalize();

    let date = &amz_date[..8];
    let (region, service) = (scope.region, scope.service);
    let scope_line = format!("{date}/{region}/{service}/{TERMINATOR}");
    // HMAC accepts keys of any length, so key derivation cannot fail; fail closed if it does.
    let key = key_for(date).ok_or(SigV4Error::SignatureMismatch)?;
    let sig = signature(&key, amz_date, &scope_line, &canonical_hash)
        .ok_or(SigV4Error::SignatureMismatch)?;
    let value = format!(
        "{ALGORITHM} Credential={}/{scope_line}, SignedHeaders={signed}, Signature={}",
        scope.access_key_id,
        hex::encode(sig)
    );
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&value)
            .map_err(|_| SigV4Error::MalformedAuthorization("not a valid header value"))?,
    );
    Ok(())
}

/// The three components of `AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
struct Authorization<'a> {
    credential: &'a str,
    signed_headers: &'a str,
    signature: [u8; 32],
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, SigV4Error> {
    let value = value.trim();
    if value.is_empty() {
        return Err(SigV4Error::MalformedAuthorization("empty"));
    }
    let (algorithm, rest) = value.split_once(' ').unwrap_or((value, ""));
    if algorithm != ALGORITHM {
        return Err(SigV4Error::UnsupportedAlgorithm);
    }
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (name, v) = part
            .split_once('=')
            .ok_or(SigV4Error::MalformedAuthorization("component without '='"))?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(SigV4Error::MalformedAuthorization("unknown component")),
        };
        if slot.replace(v).is_some() {
            return Err(SigV4Error::MalformedAuthorization("duplicate component"));
        }
    }
    let credential = credential.ok_or(SigV4Error::MalformedAuthorization("missing Credential"))?;
    let signed_headers =
        signed_headers.ok_or(SigV4Error::MalformedAuthorization("missing SignedHeaders"))?;
    let signature_hex = signature.ok_or(SigV4Error::MalformedAuthorization("missing Signature"))?;
    let mut signature = [0u8; 32];
    hex::decode_to_slice(signature_hex, &mut signature)
        .map_err(|_| SigV4Error::MalformedAuthorization("Signature is not 64 hex digits"))?;
    Ok(Authorization {
        credential,
        signed_headers,
        signature,
    })
}

/// `AKID/yyyymmdd/region/service/aws4_request`, split.
struct Scope<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    /// `yyyymmdd/region/service/aws4_request`, the scope line of the string to sign.
    scope: &'a str,
}

fn parse_credential(credential: &str) -> Result<Scope<'_>, SigV4Error> {
    fn malformed() -> SigV4Error {
        SigV4Error::MalformedAuthorization(
            "Credential is not AKID/date/region/service/aws4_request",
        )
    }
    let (access_key_id, scope) = credential.split_once('/').ok_or_else(malformed)?;
    let mut parts = scope.split('/');
    let (Some(date), Some(region), Some(service), Some(terminator), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(malformed());
    };
    if access_key_id.is_empty() || region.is_empty() || terminator != TERMINATOR {
        return Err(malformed());
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SigV4Error::MalformedAuthorization(
            "Credential date is not yyyymmdd",
        ));
    }
    Ok(Scope {
        access_key_id,
        date,
        region,
        service,
        scope,
    })
}

/// What the verifier needs to know about `SignedHeaders` besides the string itself.
struct SignedHeaderSet {
    content_sha256: bool,
}

/// Checks `SignedHeaders`: non-empty lowercase header-name tokens, strictly ascending (SigV4 sorts
/// them; strictness also rules out duplicates), including `host` and `x-amz-date`.
fn parse_signed_headers(list: &str) -> Result<SignedHeaderSet, SigV4Error> {
    let (mut host, mut date, mut content_sha256) = (false, false, false);
    let mut previous: Option<&str> = None;
    for name in list.split(';') {
        if name.is_empty() || !name.bytes().all(is_lowercase_token_byte) {
            return Err(SigV4Error::MalformedAuthorization(
                "SignedHeaders must be lowercase header names separated by ';'",
            ));
        }
        if previous.is_some_and(|p| p >= name) {
            return Err(SigV4Error::MalformedAuthorization(
                "SignedHeaders must be sorted and unique",
            ));
        }
        previous = Some(name);
        match name {
            "host" => host = true,
            X_AMZ_DATE => date = true,
            X_AMZ_CONTENT_SHA256 => content_sha256 = true,
            _ => {}
        }
    }
    if !host {
        return Err(SigV4Error::HeaderNotSigned("host"));
    }
    if !date {
        return Err(SigV4Error::HeaderNotSigned(X_AMZ_DATE));
    }
    Ok(SignedHeaderSet { content_sha256 })
}

/// RFC 9110 token characters, without uppercase letters.
fn is_lowercase_token_byte(b: u8) -> bool {
    b.is_ascii_lowercase()
        || b.is_ascii_digit()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// The only value of header `name`: `Ok(None)` if absent, `Err(())` if repeated.
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(()),
    }
}

/// Lowercase hex SHA-256, on the stack.
fn hex_sha256(data: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    // 32 digest bytes always fit 64 hex digits, so encoding cannot fail.
    let _ = hex::encode_to_slice(Sha256::digest(data), &mut out);
    out
}

/// Hex digits are ASCII, so this never falls back; kept total to avoid a panic path.
fn ascii(hex: &[u8]) -> &str {
    std::str::from_utf8(hex).unwrap_or_default()
}

/// A derived SigV4 signing key; zeroized when the last holder drops it.
#[derive(Zeroize, ZeroizeOnDrop)]
struct SigningKey([u8; 32]);

fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> Option<[u8; 32]> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    for part in parts {
        mac.update(part);
    }
    Some(mac.finalize().into_bytes().into())
}

/// `HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request")`.
fn derive_signing_key(secret: &str, date: &str, region: &str, service: &str) -> Option<SigningKey> {
    let mut k_secret = Zeroizing::new(Vec::with_capacity(4 + secret.len()));
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret.as_bytes());
    let k_date = Zeroizing::new(hmac_parts(&k_secret, &[date.as_bytes()])?);
    let k_region = Zeroizing::new(hmac_parts(&*k_date, &[region.as_bytes()])?);
    let k_service = Zeroizing::new(hmac_parts(&*k_region, &[service.as_bytes()])?);
    Some(SigningKey(hmac_parts(
        &*k_service,
        &[TERMINATOR.as_bytes()],
    )?))
}

/// HMAC of the string to sign, fed in pieces:
/// `AWS4-HMAC-SHA256 \n amz-date \n scope \n hex(SHA-256(canonical request))`.
fn signature(
    key: &SigningKey,
    amz_date: &str,
    scope: &str,
    canonical_hash: &[u8],
) -> Option<[u8; 32]> {
    let mut hash_hex = [0u8; 64];
    hex::encode_to_slice(canonical_hash, &mut hash_hex).ok()?;
    debug_assert_eq!(amz_date.len(), AMZ_DATE_LEN);
    hmac_parts(
        &key.0,
        &[
            ALGORITHM.as_bytes(),
            b"\n",
            amz_date.as_bytes(),
            b"\n",
            scope.as_bytes(),
            b"\n",
            &hash_hex,
        ],
    )
}

/// Derived signing keys by credential string (`AKID/date/region/service/aws4_request`), which is
/// borrowed straight from the header so a hit allocates nothing. Entries are only added after the
/// access key, service, region and date were checked. When full it is simply emptied: entries are
/// cheap to re-derive and at most a few are live at a time.
struct KeyCache {
    map: RwLock<HashMap<Box<str>, Arc<SigningKey>>>,
    capacity: usize,
}

impl KeyCache {
    fn new(capacity: usize) -> Self {
        Self {
            map: RwLock::new(HashMap::with_capacity(capacity.min(64))),
            capacity,
        }
    }

    fn get_or_derive(
        &self,
        credential: &str,
        derive: impl FnOnce() -> Option<SigningKey>,
    ) -> Option<Arc<SigningKey>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        if let Some(key) = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(credential)
        {
            return Some(Arc::clone(key));
        }
        let key = Arc::new(derive()?);
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(credential.into(), Arc::clone(&key));
        Some(key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Fuzzing and corpus-replay entry points: the verifier's parsers of attacker-controlled header
/// text, without secrets or clocks, so a property can be checked on every input. Not an API.
#[doc(hidden)]
pub mod fuzz_support {
    use http::HeaderMap;
    use sha2::{Digest, Sha256};

    use super::canonical::{CanonicalInput, write_canonical_request};
    use super::{
        ALGORITHM, SigV4Error, parse_authorization, parse_credential, parse_signed_headers,
    };

    /// The components the verifier reads out of an `Authorization` value.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ParsedAuthorization {
        /// `Credential=`
        pub credential: String,
        /// `SignedHeaders=`
        pub signed_headers: String,
        /// `Signature=`, decoded.
        pub signature: [u8; 32],
        /// Whether `Credential` splits into a valid scope.
        pub credential_ok: bool,
        /// Whether `SignedHeaders` passes the verifier's rules.
        pub signed_headers_ok: bool,
    }

    /// Parse `value` exactly as the verifier does.
    pub fn parse(value: &str) -> Result<ParsedAuthorization, SigV4Error> {
        let auth = parse_authorization(value)?;
        let scope = parse_credential(auth.credential);
        if let Ok(scope) = &scope {
            // The scope is the credential after the access key id, verbatim.
            let rebuilt = format!("{}/{}", scope.access_key_id, scope.scope);
            if rebuilt != auth.credential || !scope.scope.starts_with(scope.date) {
                return Err(SigV4Error::MalformedAuthorization("scope split lost bytes"));
            }
            let _ = (scope.region, scope.service);
        }
        Ok(ParsedAuthorization {
            credential: auth.credential.to_owned(),
            signed_headers: auth.signed_headers.to_owned(),
            signature: auth.signature,
            credential_ok: scope.is_ok(),
            signed_headers_ok: parse_signed_headers(auth.signed_headers).is_ok(),
        })
    }

    /// The canonical form of a parsed value (the shape signers send).
    pub fn render(parsed: &ParsedAuthorization) -> String {
        format!(
            "{ALGORITHM} Credential={}, SignedHeaders={}, Signature={}",
            parsed.credential,
            parsed.signed_headers,
            hex::encode(parsed.signature)
        )
    }

    /// Whether `SignedHeaders` passes the verifier's rules.
    pub fn signed_headers_ok(list: &str) -> bool {
        parse_signed_headers(list).is_ok()
    }

    /// The canonical request the verifier hashes, written into a buffer; `Err` when a signed
    /// header is missing. Also checks that the hashing sink sees exactly these bytes.
    pub fn canonical_request(
        method: &str,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        authority: Option<&str>,
        signed_headers: &str,
    ) -> Result<Vec<u8>, SigV4Error> {
        let input = CanonicalInput {
            method,
            path,
            query,
            headers,
            authority,
            signed_headers,
            payload_hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        };
        let mut bytes = Vec::new();
        write_canonical_request(&mut bytes, &input)?;
        let mut hasher = Sha256::new();
        write_canonical_request(&mut hasher, &input)?;
        if hasher.finalize()[..] != Sha256::digest(&bytes)[..] {
            return Err(SigV4Error::MalformedAuthorization(
                "hashing sink and buffer disagree",
            ));
        }
        Ok(bytes)
    }
}
