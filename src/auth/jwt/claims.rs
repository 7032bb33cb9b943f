//! The claims of a verified token and the checks on them: issuer, audience, `exp`/`nbf`/`iat`
//! against the caller's clock with leeway, and the `email` / `email_verified` service-account rule.
//!
//! Runs only on claims whose signature has verified (except [`peek_issuer`], which reads the
//! unverified `iss` solely to choose which issuer's keys to verify with).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;

use super::{IssuerSettings, JwtError};

/// The registered and Google claims the verifier reads; others are ignored.
#[derive(Debug, Deserialize)]
pub(super) struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<serde_json::Number>,
    #[serde(default)]
    nbf: Option<serde_json::Number>,
    #[serde(default)]
    iat: Option<serde_json::Number>,
    #[serde(default)]
    email: Option<String>,
    /// Google sends a bool, sometimes the string `"true"`.
    #[serde(default)]
    email_verified: Option<Value>,
}

/// `aud` is one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// What the checks establish.
#[derive(Debug)]
pub(super) struct Checked {
    /// `sub`, empty when absent (authorization goes by the email).
    pub(super) subject: String,
    /// The allowed, verified email.
    pub(super) email: String,
    /// `exp`, seconds since the epoch.
    pub(super) exp: u64,
}

/// The unverified `iss` of a compact JWT's payload segment, to pick the issuer configuration.
/// `Err(Malformed)` when the payload is not base64url JSON; `Ok(None)` when it has no string `iss`.
pub(super) fn peek_issuer(payload_b64: &str) -> Result<Option<String>, JwtError> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        iss: Option<Value>,
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| JwtError::Malformed)?;
    let peek: Peek = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    Ok(peek.iss.and_then(|v| v.as_str().map(str::to_owned)))
}

/// Check verified claims against `issuer`'s rules at `now` (seconds since the epoch).
pub(super) fn check(
    claims: Claims,
    issuer: &IssuerSettings,
    now: u64,
) -> Result<Checked, JwtError> {
    let leeway = issuer.leeway.as_secs();
    match &claims.iss {
        Some(iss) if issuer.issuers.iter().any(|accepted| accepted == iss) => {}
        _ => return Err(JwtError::WrongIssuer),
    }
    let audience_ok = match &claims.aud {
        Some(Audience::One(aud)) => issuer.audiences.contains(aud),
        Some(Audience::Many(auds)) => auds.iter().any(|aud| issuer.audiences.contains(aud)),
        None => false,
    };
    if !audience_ok {
        return Err(JwtError::WrongAudience);
    }
    let exp = numeric_date(claims.exp.as_ref())?.ok_or(JwtError::Malformed)?;
    if now > exp.saturating_add(leeway) {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric_date(claims.nbf.as_ref())?
        && nbf > now.saturating_add(leeway)
    {
        return Err(JwtError::NotYetValid);
    }
    if let Some(iat) = numeric_date(claims.iat.as_ref())?
        && iat > now.saturating_add(leeway)
    {
        return Err(JwtError::IssuedInFuture);
    }
    let email = match claims.email {
        Some(email) if !email.is_empty() => email,
        _ => return Err(JwtError::MissingEmail),
    };
    if issuer.require_email_verified && !is_true(claims.email_verified.as_ref()) {
        return Err(JwtError::EmailNotVerified);
    }
    // A glob's `*` matches any character, so `service-*@domain` would also match
    // `service-x@evil@domain`: only a plain address (one `@`, no whitespace or controls) is
    // matched at all.
    let plain_address = email.bytes().filter(|&b| b == b'@').count() == 1
        && email.bytes().all(|b| b.is_ascii_graphic());
    if !plain_address || !issuer.service_accounts.iter().any(|p| p.matches(&email)) {
        return Err(JwtError::EmailNotAllowed);
    }
    Ok(Checked {
        subject: claims.sub.unwrap_or_default(),
        email,
        exp,
    })
}

/// A NumericDate (RFC 7519 §2): non-negative seconds, integer or fractional (truncated).
fn numeric_date(value: Option<&serde_json::Number>) -> Result<Option<u64>, JwtError> {
    let Some(value) = value else { return Ok(None) };
    if let Some(secs) = value.as_u64() {
        return Ok(Some(secs));
    }
    match value.as_f64() {
        // The range check makes the truncating cast exact enough and never saturating.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(secs) if secs.is_finite() && (0.0..1.0e15).contains(&secs) => Ok(Some(secs as u64)),
        _ => Err(JwtError::Malformed),
    }
}

/// `true` or `"true"` (any case); anything else, including absence, is not verified.
fn is_true(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}
