#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::jwks::{KeySet, Lookup, MAX_TTL, MIN_TTL, effective_ttl, header_ttl};
use super::*;
use crate::metrics::Metrics;

// Test-only RSA-2048 keys shared with the integration tests (see tests/fixtures/jwt/README.md).
const SIGNER_1: &str = include_str!("../../../tests/fixtures/jwt/signer-1.pem");
const SIGNER_1_PUB: &str = include_str!("../../../tests/fixtures/jwt/signer-1.pub.pem");
const SIGNER_2: &str = include_str!("../../../tests/fixtures/jwt/signer-2.pem");
const ATTACKER: &str = include_str!("../../../tests/fixtures/jwt/attacker.pem");

const ISS: &str = "https://accounts.google.com";
const AUD: &str = "https://ekm.example.com";
const EMAIL: &str = "service-123456789012@gcp-sa-ekms.iam.gserviceaccount.com";

/// The public JWK of a private PEM, as a JSON object with `kid` (and `alg` unless `None`).
fn jwk(pem: &str, kid: &str, alg: Option<&str>) -> Value {
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let mut jwk =
        serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap()).unwrap();
    let obj = jwk.as_object_mut().unwrap();
    obj.insert("kid".into(), json!(kid));
    obj.insert("use".into(), json!("sig"));
    match alg {
        Some(alg) => obj.insert("alg".into(), json!(alg)),
        None => obj.remove("alg"),
    };
    jwk
}

fn write_jwks(path: &Path, keys: &[Value]) {
    std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Good Google-like claims issued at `at`, valid one hour.
fn claims_at(at: SystemTime) -> Value {
    let t = secs(at);
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "1234567890",
        "azp": "1234567890",
        "email": EMAIL,
        "email_verified": true,
        "iat": t,
        "exp": t + 3600,
    })
}

fn mint(pem: &str, kid: Option<&str>, alg: Algorithm, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A compact JWT with an arbitrary header and no signature check possible.
fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn issuer_settings(jwks: PathBuf) -> IssuerSettings {
    IssuerSettings {
        name: "google".into(),
        issuers: vec![ISS.into(), "accounts.google.com".into()],
        jwks: JwksSource::File(jwks),
        audiences: vec![AUD.into()],
        algorithms: vec![Algorithm::RS256],
        leeway: Duration::from_secs(30),
        service_accounts: vec![Pattern::new(
            "service-*@gcp-sa-ekms.iam.gserviceaccount.com",
        )],
        require_email_verified: true,
        refresh_min_interval: Duration::from_secs(3600),
        default_ttl: Duration::from_secs(3600),
        fetch_timeout: Duration::from_secs(5),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    jwks: PathBuf,
    metrics: Metrics,
    verifier: JwtVerifier,
}

impl Fixture {
    /// A verifier for one file-backed issuer publishing signer-1 as `k1`.
    fn new(tweak: impl FnOnce(&mut IssuerSettings)) -> Self {
        Self::with(&[jwk(SIGNER_1, "k1", Some("RS256"))], 10_000, tweak)
    }

    fn with(keys: &[Value], cache: u64, tweak: impl FnOnce(&mut IssuerSettings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        if !keys.is_empty() {
            write_jwks(&jwks, keys);
        }
        let mut issuer = issuer_settings(jwks.clone());
        tweak(&mut issuer);
        let metrics = Metrics::standalone();
        let verifier = JwtVerifier::new(
            &JwtSettings {
                issuers: vec![issuer],
                token_cache_capacity: cache,
            },
            metrics.jwt.clone(),
        )
        .unwrap();
        Self {
            _dir: dir,
            jwks,
            metrics,
            verifier,
        }
    }

    async fn verify(&self, token: &str) -> Result<Principal, JwtError> {
        self.verifier.verify(Some(&bearer(token)), now()).await
    }

    async fn verify_at(&self, token: &str, at: SystemTime) -> Result<Principal, JwtError> {
        self.verifier.verify(Some(&bearer(token)), at).await
    }

    /// The value of one sample in the text exposition (0 when absent).
    fn metric(&self, sample: &str) -> u64 {
        let text = String::from_utf8(self.metrics.render()).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    fn fetches(&self, outcome: &str) -> u64 {
        self.metric(&format!(
            "ekm_jwks_fetches_total{{issuer=\"google\",outcome=\"{outcome}\"}}"
        ))
    }
}

fn good_token() -> String {
    mint(SIGNER_1, Some("k1"), Algorithm::RS256, &claims_at(now()))
}

fn with_claim(key: &str, value: Value) -> Value {
    let mut claims = claims_at(now());
    claims[key] = value;
    claims
}

fn without_claim(key: &str) -> Value {
    let mut claims = claims_at(now());
    claims.as_object_mut().unwrap().remove(key);
    claims
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn valid_token_yields_the_service_account() {
    let f = Fixture::new(|_| {});
    let principal = f.verify(&good_token()).await.unwrap();
    assert_eq!(
        principal,
        Principal::Jwt {
            issuer: "google".into(),
            subject: "1234567890".into(),
            email: EMAIL.into(),
        }
    );
    assert_eq!(principal.name(), EMAIL);
    assert_eq!(f.fetches("ok"), 1);
    assert_eq!(f.metric("ekm_jwks_keys{issuer=\"google\"}"), 1);
}

#[tokio::test]
async fn second_accepted_iss_spelling_and_aud_array_are_accepted() {
    let f = Fixture::new(|_| {});
    let mut claims = claims_at(now());
    claims["iss"] = json!("accounts.google.com");
    claims["aud"] = json!(["https://other.example", AUD]);
    let token = mint(SIGNER_1, Some("k1"), Algorithm::RS256, &claims);
    f.verify(&token).await.unwrap();
}

#[tokio::test]
async fn missing_or_non_bearer_authorization_is_missing_token() {
    let f = Fixture::new(|_| {});
    let v = &f.verifier;
    assert_eq!(v.verify(None, now()).await, Err(JwtError::MissingToken));
    assert_eq!(v.verify(Some(""), now()).await, Err(JwtError::MissingToken));
    assert_eq!(
        v.verify(Some("Bearer "), now()).await,
        Err(JwtError::MissingToken)
    );
    assert_eq!(
        v.verify(Some("Basic dXNlcjpwYXNz"), now()).await,
        Err(JwtError::MissingToken)
    );
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let token = good_token();
    assert!(
        v.verify(Some(&format!("bearer {token}")), now())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn malformed_tokens_are_malformed() {
    let f = Fixture::new(|_| {});
    for token in ["abc", "a.b", "a.b.c.d", "!!!.###.$$$", "a.b c.d"] {
        assert_eq!(f.verify(token).await, Err(JwtError::Malformed), "{token}");
    }
    let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(f.verify(&huge).await, Err(JwtError::Malformed));
    // Signed correctly but the payload is not a JSON object of claims.
    let header = json!({"alg": "RS256", "kid": "k1", "typ": "JWT"});
    let token = raw_token(&header, &json!("just a string"), b"sig");
    assert_eq!(f.verify(&token).await, Err(JwtError::Malformed));
}

#[tokio::test]
async fn critical_header_extensions_are_refused() {
    let f = Fixture::new(|_| {});
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".into());
    header.crit = Some(vec!["exp".into()]);
    let token = jsonwebtoken::encode(
        &header,
        &claims_at(now()),
        &EncodingKey::from_rsa_pem(SIGNER_1.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(f.verify(&token).await, Err(JwtError::Malformed));
}

#[tokio::test]
async fn bad_signature_is_refused() {
    let f = Fixture::new(|_| {});
    // Signed by a key the issuer never published, under a published kid.
    let forged = mint(ATTACKER, Some("k1"), Algorithm::RS256, &claims_at(now()));
    assert_eq!(f.verify(&forged).await, Err(JwtError::BadSignature));
    // A genuine token whose payload was altered afterwards.
    let good = good_token();
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut claims = claims_at(now());
    claims["email"] = json!("service-999@gcp-sa-ekms.iam.gserviceaccount.com");
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    parts[1] = &payload;
    assert_eq!(
        f.verify(&parts.join(".")).await,
        Err(JwtError::BadSignature)
    );
}

#[tokio::test]
async fn alg_none_is_refused() {
    let f = Fixture::new(|_| {});
    // jsonwebtoken's header parser knows no `none`; we still name the reason.
    assert!(
        jsonwebtoken::decode_header(raw_token(
            &json!({"alg": "none", "kid": "k1"}),
            &claims_at(now()),
            b""
        ))
        .is_err()
    );
    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "kid": "k1", "typ": "JWT"});
        let token = raw_token(&header, &claims_at(now()), b"");
        assert_eq!(
            f.verify(&token).await,
            Err(JwtError::AlgorithmNotAllowed),
            "{alg}"
        );
        // Also with the trailing dot stripped, and with a bogus signature.
        let stripped = token.trim_end_matches('.').to_owned() + ".";
        assert_eq!(
            f.verify(&stripped).await,
            Err(JwtError::AlgorithmNotAllowed)
        );
        let signed = raw_token(&header, &claims_at(now()), b"xx");
        assert_eq!(f.verify(&signed).await, Err(JwtError::AlgorithmNotAllowed));
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let f = Fixture::new(|_| {});
    let jwk = jwk(SIGNER_1, "k1", None);
    let modulus = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let jwk_text = jwk.to_string();
    // Every form an attacker might guess the verifier would use as the HMAC secret.
    let secrets: [&[u8]; 4] = [
        SIGNER_1_PUB.as_bytes(),
        SIGNER_1_PUB.trim_end().as_bytes(),
        &modulus,
        jwk_text.as_bytes(),
    ];
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        for secret in secrets {
            let mut header = Header::new(alg);
            header.kid = Some("k1".into());
            let token = jsonwebtoken::encode(
                &header,
                &claims_at(now()),
                &EncodingKey::from_secret(secret),
            )
            .unwrap();
            assert_eq!(
                f.verify(&token).await,
                Err(JwtError::AlgorithmNotAllowed),
                "{alg:?}"
            );
        }
    }
}

#[tokio::test]
async fn hmac_can_never_be_configured() {
    for name in ["HS256", "HS384", "HS512", "none", "None", "RSA-OAEP", ""] {
        assert!(parse_algorithm(name).is_err(), "{name}");
    }
    assert_eq!(parse_algorithm("RS256"), Ok(Algorithm::RS256));
    assert_eq!(parse_algorithm("PS256"), Ok(Algorithm::PS256));
    assert_eq!(parse_algorithm("ES256"), Ok(Algorithm::ES256));
    assert_eq!(parse_algorithm("EdDSA"), Ok(Algorithm::EdDSA));
    // Settings built without parse_algorithm are refused too.
    let dir = tempfile::tempdir().unwrap();
    let mut issuer = issuer_settings(dir.path().join("jwks.json"));
    issuer.algorithms = vec![Algorithm::RS256, Algorithm::HS256];
    let err = JwtVerifier::new(
        &JwtSettings {
            issuers: vec![issuer],
            token_cache_capacity: 0,
        },
        Metrics::standalone().jwt,
    )
    .unwrap_err();
    assert!(err.to_string().contains("HMAC"), "{err}");
}

#[tokio::test]
async fn algorithm_outside_the_issuer_list_is_refused() {
    // Only PS256 allowed; the JWK carries no alg so the key itself could do either.
    let f = Fixture::with(&[jwk(SIGNER_1, "k1", None)], 0, |i| {
        i.algorithms = vec![Algorithm::PS256];
    });
    let rs = mint(SIGNER_1, Some("k1"), Algorithm::RS256, &claims_at(now()));
    assert_eq!(f.verify(&rs).await, Err(JwtError::AlgorithmNotAllowed));
    let ps = mint(SIGNER_1, Some("k1"), Algorithm::PS256, &claims_at(now()));
    f.verify(&ps).await.unwrap();
}

#[tokio::test]
async fn jwk_alg_must_match_the_token_alg() {
    // The issuer allows RS256 and RS512, but the key is published for RS256 only.
    let f = Fixture::new(|i| i.algorithms = vec![Algorithm::RS256, Algorithm::RS512]);
    let rs512 = mint(SIGNER_1, Some("k1"), Algorithm::RS512, &claims_at(now()));
    assert_eq!(f.verify(&rs512).await, Err(JwtError::AlgorithmNotAllowed));
    // An RSA key can never serve an EC algorithm either.
    let set = KeySet::parse(
        json!({"keys": [jwk(SIGNER_1, "k1", None)]})
            .to_string()
            .as_bytes(),
        "t",
    )
    .unwrap();
    assert!(matches!(
        set.lookup("k1", Algorithm::ES256),
        Lookup::Incompatible
    ));
    assert!(matches!(
        set.lookup("k1", Algorithm::HS256),
        Lookup::Incompatible
    ));
    assert!(matches!(
        set.lookup("k1", Algorithm::PS512),
        Lookup::Found(_)
    ));
    assert!(matches!(set.lookup("k2", Algorithm::RS256), Lookup::Absent));
}

#[tokio::test]
async fn time_claims_are_checked_with_leeway() {
    let f = Fixture::with(&[jwk(SIGNER_1, "k1", Some("RS256"))], 0, |_| {});
    let issued = now();
    let token = mint(SIGNER_1, Some("k1"), Algorithm::RS256, &claims_at(issued));
    let exp = issued + Duration::from_secs(3600);
    // Within the 30 s leeway after exp: accepted; beyond it: expired.
    f.verify_at(&token, exp + Duration::from_secs(29))
        .await
        .unwrap();
    assert_eq!(
        f.verify_at(&token, exp + Duration::from_secs(31)).await,
        Err(JwtError::Expired)
    );

    let soon = secs(now()) + 120;
    let nbf = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("nbf", json!(soon)),
    );
    assert_eq!(f.verify(&nbf).await, Err(JwtError::NotYetValid));
    let near = secs(now()) + 10;
    let nbf_within = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("nbf", json!(near)),
    );
    f.verify(&nbf_within).await.unwrap();

    let iat = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("iat", json!(soon)),
    );
    assert_eq!(f.verify(&iat).await, Err(JwtError::IssuedInFuture));

    let no_exp = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &without_claim("exp"),
    );
    assert_eq!(f.verify(&no_exp).await, Err(JwtError::Malformed));
    let bad_exp = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("exp", json!("soon")),
    );
    assert_eq!(f.verify(&bad_exp).await, Err(JwtError::Malformed));
    let negative = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("exp", json!(-1)),
    );
    assert_eq!(f.verify(&negative).await, Err(JwtError::Malformed));
    // Fractional NumericDates are legal.
    let frac = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("exp", json!(secs(now()) as f64 + 600.5)),
    );
    f.verify(&frac).await.unwrap();
}

#[tokio::test]
async fn audience_and_issuer_are_checked() {
    let f = Fixture::new(|_| {});
    let wrong_aud = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("aud", json!("https://evil.example")),
    );
    assert_eq!(f.verify(&wrong_aud).await, Err(JwtError::WrongAudience));
    let no_aud = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &without_claim("aud"),
    );
    assert_eq!(f.verify(&no_aud).await, Err(JwtError::WrongAudience));
    let aud_path = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("aud", json!(format!("{AUD}/gcp"))),
    );
    assert_eq!(f.verify(&aud_path).await, Err(JwtError::WrongAudience));

    let f = Fixture::new(|_| {});
    let wrong_iss = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("iss", json!("https://evil.example")),
    );
    assert_eq!(f.verify(&wrong_iss).await, Err(JwtError::WrongIssuer));
    let no_iss = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &without_claim("iss"),
    );
    assert_eq!(f.verify(&no_iss).await, Err(JwtError::WrongIssuer));
    // Unknown issuers never cause a key fetch.
    assert_eq!(f.fetches("ok"), 0);
}

#[tokio::test]
async fn kid_is_required() {
    let f = Fixture::new(|_| {});
    let token = mint(SIGNER_1, None, Algorithm::RS256, &claims_at(now()));
    assert_eq!(f.verify(&token).await, Err(JwtError::MissingKid));
    let empty = mint(SIGNER_1, Some(""), Algorithm::RS256, &claims_at(now()));
    assert_eq!(f.verify(&empty).await, Err(JwtError::MissingKid));
}

#[tokio::test]
async fn unknown_kid_refreshes_at_most_once_per_interval() {
    let f = Fixture::new(|i| i.refresh_min_interval = Duration::from_secs(3600));
    f.verify(&good_token()).await.unwrap();
    assert_eq!(f.fetches("ok"), 1);
    for (n, kid) in ["nope-1", "nope-2", "nope-3"].into_iter().enumerate() {
        let token = mint(SIGNER_1, Some(kid), Algorithm::RS256, &claims_at(now()));
        assert_eq!(f.verify(&token).await, Err(JwtError::UnknownKid));
        // The first unknown kid refetched; the others were rate-limited.
        assert_eq!(f.fetches("ok"), 2);
        assert_eq!(
            f.metric("ekm_jwks_refresh_rate_limited_total{issuer=\"google\"}"),
            n as u64
        );
    }
}

#[tokio::test]
async fn email_rules() {
    let f = Fixture::new(|_| {});
    let no_email = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &without_claim("email"),
    );
    assert_eq!(f.verify(&no_email).await, Err(JwtError::MissingEmail));
    let empty = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("email", json!("")),
    );
    assert_eq!(f.verify(&empty).await, Err(JwtError::MissingEmail));

    for (value, ok) in [
        (json!(true), true),
        (json!("true"), true),
        (json!(false), false),
        (json!("false"), false),
        (json!(1), false),
    ] {
        let token = mint(
            SIGNER_1,
            Some("k1"),
            Algorithm::RS256,
            &with_claim("email_verified", value.clone()),
        );
        let result = f.verify(&token).await;
        if ok {
            result.unwrap();
        } else {
            assert_eq!(result, Err(JwtError::EmailNotVerified), "{value}");
        }
    }
    let unverified = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &without_claim("email_verified"),
    );
    assert_eq!(f.verify(&unverified).await, Err(JwtError::EmailNotVerified));

    let other = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim("email", json!("someone@example.com")),
    );
    assert_eq!(f.verify(&other).await, Err(JwtError::EmailNotAllowed));
    // A look-alike domain suffix does not match the glob.
    let suffix = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim(
            "email",
            json!("service-1@gcp-sa-ekms.iam.gserviceaccount.com.evil.example"),
        ),
    );
    assert_eq!(f.verify(&suffix).await, Err(JwtError::EmailNotAllowed));
    // The glob's `*` could span an extra `@`: such addresses are never matched.
    let smuggled = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &with_claim(
            "email",
            json!("service-x@evil.example@gcp-sa-ekms.iam.gserviceaccount.com"),
        ),
    );
    assert_eq!(f.verify(&smuggled).await, Err(JwtError::EmailNotAllowed));
}

#[tokio::test]
async fn email_verified_may_be_optional() {
    let f = Fixture::new(|i| i.require_email_verified = false);
    let unverified = mint(
        SIGNER_1,
        Some("k1"),
        Algorithm::RS256,
        &without_claim("email_verified"),
    );
    f.verify(&unverified).await.unwrap();
}

#[tokio::test]
async fn jwks_file_rotation_adds_and_revokes_keys() {
    let f = Fixture::new(|i| i.refresh_min_interval = Duration::ZERO);
    let old = good_token();
    f.verify(&old).await.unwrap();
    f.verify(&old).await.unwrap(); // now cached

    // The issuer rotates: k2 appears, k1 is withdrawn.
    write_jwks(&f.jwks, &[jwk(SIGNER_2, "k2", Some("RS256"))]);
    let new = mint(SIGNER_2, Some("k2"), Algorithm::RS256, &claims_at(now()));
    f.verify(&new).await.unwrap();
    assert_eq!(f.fetches("ok"), 2);
    assert_eq!(f.verify(&old).await, Err(JwtError::UnknownKid));
    // A fresh token under the withdrawn key is refused as well.
    assert_eq!(f.verify(&good_token()).await, Err(JwtError::UnknownKid));
}

#[tokio::test]
async fn jwks_file_is_reread_when_its_lifetime_ends() {
    let f = Fixture::new(|i| i.default_ttl = Duration::from_millis(200));
    let token = good_token();
    f.verify(&token).await.unwrap();
    write_jwks(&f.jwks, &[jwk(SIGNER_2, "k2", Some("RS256"))]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The cached token's kid left the set when the file was re-read: revoked without any
    // unknown-kid refresh (the interval is an hour).
    assert_eq!(f.verify(&token).await, Err(JwtError::UnknownKid));
    let new = mint(SIGNER_2, Some("k2"), Algorithm::RS256, &claims_at(now()));
    f.verify(&new).await.unwrap();
}

#[tokio::test]
async fn fetch_failure_keeps_the_last_good_set() {
    let f = Fixture::with(&[jwk(SIGNER_1, "k1", Some("RS256"))], 0, |i| {
        i.refresh_min_interval = Duration::ZERO;
    });
    f.verify(&good_token()).await.unwrap();
    std::fs::write(&f.jwks, b"{ not json").unwrap();
    // An unknown kid forces a refetch, which fails; the old set stays in service.
    let unknown = mint(SIGNER_2, Some("k2"), Algorithm::RS256, &claims_at(now()));
    assert_eq!(f.verify(&unknown).await, Err(JwtError::UnknownKid));
    assert_eq!(f.fetches("error"), 1);
    f.verify(&good_token()).await.unwrap();
    // A set with no usable key is a failure too, not a revocation of everything.
    write_jwks(
        &f.jwks,
        &[json!({"kty": "oct", "kid": "k9", "k": "c2VjcmV0"})],
    );
    assert_eq!(f.verify(&unknown).await, Err(JwtError::UnknownKid));
    assert!(f.fetches("error") >= 2);
    f.verify(&good_token()).await.unwrap();
    std::fs::remove_file(&f.jwks).unwrap();
    f.verify(&good_token()).await.unwrap();
}

#[tokio::test]
async fn no_key_set_at_all_is_unavailable() {
    let f = Fixture::with(&[], 10, |i| i.refresh_min_interval = Duration::ZERO);
    f.verifier.prefetch().await; // logs, never fails
    let err = f.verify(&good_token()).await.unwrap_err();
    assert_eq!(err, JwtError::JwksUnavailable);
    assert!(err.is_unavailable());
    assert_eq!(err.reason(), "jwks_unavailable");
    assert!(f.fetches("error") >= 2);
    // Once the file appears, tokens verify.
    write_jwks(&f.jwks, &[jwk(SIGNER_1, "k1", Some("RS256"))]);
    f.verify(&good_token()).await.unwrap();
}

#[tokio::test]
async fn without_a_set_failed_fetches_back_off() {
    let f = Fixture::with(&[], 10, |i| {
        i.refresh_min_interval = Duration::from_secs(3600)
    });
    for _ in 0..5 {
        assert_eq!(
            f.verify(&good_token()).await,
            Err(JwtError::JwksUnavailable)
        );
    }
    assert_eq!(f.fetches("error"), 1);
}

#[tokio::test]
async fn prefetch_warms_the_set() {
    let f = Fixture::new(|_| {});
    f.verifier.prefetch().await;
    assert_eq!(f.fetches("ok"), 1);
    f.verify(&good_token()).await.unwrap();
    assert_eq!(f.fetches("ok"), 1);
    assert_eq!(f.metric("ekm_cache_hits_total{cache=\"jwks\"}"), 1);
}

#[tokio::test]
async fn verified_tokens_are_cached_until_exp() {
    let f = Fixture::new(|_| {});
    let token = good_token();
    for _ in 0..3 {
        f.verify(&token).await.unwrap();
    }
    assert_eq!(f.metric("ekm_cache_misses_total{cache=\"jwt\"}"), 1);
    assert_eq!(f.metric("ekm_cache_hits_total{cache=\"jwt\"}"), 2);
    // A cached token is still refused once expired.
    let later = now() + Duration::from_secs(3600 + 31);
    assert_eq!(f.verify_at(&token, later).await, Err(JwtError::Expired));
}

#[tokio::test]
async fn token_cache_can_be_disabled() {
    let f = Fixture::with(&[jwk(SIGNER_1, "k1", Some("RS256"))], 0, |_| {});
    let token = good_token();
    f.verify(&token).await.unwrap();
    f.verify(&token).await.unwrap();
    assert_eq!(f.metric("ekm_cache_hits_total{cache=\"jwt\"}"), 0);
    assert_eq!(f.metric("ekm_cache_misses_total{cache=\"jwt\"}"), 0);
}

#[tokio::test]
async fn concurrent_misses_fetch_once() {
    let f = std::sync::Arc::new(Fixture::new(|_| {}));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let token = good_token();
            f.verify(&token).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(f.fetches("ok"), 1);
}

#[test]
fn jwks_parsing_is_lenient_but_loads_only_signature_keys() {
    let good = jwk(SIGNER_1, "k1", Some("RS256"));
    let mut enc = jwk(SIGNER_2, "enc", None);
    enc["use"] = json!("enc");
    let mut ops = jwk(SIGNER_2, "ops", None);
    ops["key_ops"] = json!(["encrypt"]);
    let mut oaep = jwk(SIGNER_2, "oaep", None);
    oaep["alg"] = json!("RSA-OAEP");
    let mut no_kid = jwk(SIGNER_2, "x", None);
    no_kid.as_object_mut().unwrap().remove("kid");
    let mut weak = jwk(SIGNER_2, "weak", None);
    weak["n"] = json!(URL_SAFE_NO_PAD.encode([0xC5u8; 128])); // 1024 bits
    let mut hs = jwk(SIGNER_2, "hs", None);
    hs["alg"] = json!("HS256");
    let doc = json!({"keys": [
        good,
        enc,
        ops,
        oaep,
        no_kid,
        weak,
        hs,
        {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
        {"kty": "XYZ", "kid": "odd"},
        {"kty": "EC", "kid": "curve", "crv": "secp256k1", "x": "AA", "y": "AA"},
        "not an object",
    ]});
    let set = KeySet::parse(doc.to_string().as_bytes(), "t").unwrap();
    assert_eq!(set.len(), 1);
    assert!(set.contains("k1"));

    assert!(KeySet::parse(b"[]", "t").is_err());
    assert!(KeySet::parse(b"{\"keys\": []}", "t").is_err());
    assert!(KeySet::parse(b"not json", "t").is_err());
}

#[test]
fn cache_headers_set_the_lifetime() {
    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }
    let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
    let ttl = |pairs: &[(&str, &str)]| header_ttl(&headers(pairs), now);

    assert_eq!(ttl(&[]), None);
    // Google's usual answer.
    assert_eq!(
        ttl(&[(
            "cache-control",
            "public, max-age=21600, must-revalidate, no-transform"
        )]),
        Some(Duration::from_secs(21600))
    );
    assert_eq!(
        ttl(&[("cache-control", "max-age=\"600\"")]),
        Some(Duration::from_secs(600))
    );
    assert_eq!(
        ttl(&[("cache-control", "max-age=600"), ("age", "100")]),
        Some(Duration::from_secs(500))
    );
    assert_eq!(
        ttl(&[("cache-control", "public"), ("cache-control", "max-age=90")]),
        Some(Duration::from_secs(90))
    );
    assert_eq!(ttl(&[("cache-control", "no-store")]), Some(Duration::ZERO));
    assert_eq!(
        ttl(&[("cache-control", "max-age=600, no-cache")]),
        Some(Duration::ZERO)
    );
    // Cache-Control wins over Expires.
    assert_eq!(
        ttl(&[
            ("cache-control", "max-age=120"),
            ("expires", "Sun, 06 Nov 1994 10:49:37 GMT")
        ]),
        Some(Duration::from_secs(120))
    );
    assert_eq!(
        ttl(&[("expires", "Sun, 06 Nov 1994 10:49:37 GMT")]),
        Some(Duration::from_secs(7200))
    );
    assert_eq!(
        ttl(&[
            ("expires", "Sun, 06 Nov 1994 10:49:37 GMT"),
            ("date", "Sun, 06 Nov 1994 10:19:37 GMT")
        ]),
        Some(Duration::from_secs(1800))
    );
    assert_eq!(ttl(&[("expires", "0")]), Some(Duration::ZERO));
    assert_eq!(
        ttl(&[("expires", "Sat, 05 Nov 1994 08:49:37 GMT")]),
        Some(Duration::ZERO)
    );

    let default = Duration::from_secs(3600);
    assert_eq!(effective_ttl(None, default), default);
    assert_eq!(effective_ttl(Some(Duration::ZERO), default), MIN_TTL);
    assert_eq!(
        effective_ttl(Some(Duration::from_secs(90)), default),
        Duration::from_secs(90)
    );
    assert_eq!(
        effective_ttl(Some(Duration::from_secs(10 * 86_400)), default),
        MAX_TTL
    );
}

#[test]
fn jwks_url_must_be_https() {
    let dir = tempfile::tempdir().unwrap();
    let build = |url: &str, ca_file: Option<PathBuf>| {
        let mut issuer = issuer_settings(dir.path().join("unused"));
        issuer.jwks = JwksSource::Url {
            url: url.into(),
            ca_file,
        };
        JwtVerifier::new(
            &JwtSettings {
                issuers: vec![issuer],
                token_cache_capacity: 0,
            },
            Metrics::standalone().jwt,
        )
    };
    for url in [
        "http://www.googleapis.com/oauth2/v3/certs",
        "file:///etc/jwks.json",
        "nonsense",
    ] {
        let err = build(url, None).unwrap_err();
        assert!(err.to_string().contains("google"), "{err}");
    }
    build("https://www.googleapis.com/oauth2/v3/certs", None).unwrap();

    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        crate::dev::certs::Authority::new("jwks test CA")
            .unwrap()
            .cert_pem(),
    )
    .unwrap();
    build("https://jwks.example/keys", Some(ca)).unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(build("https://jwks.example/keys", Some(empty)).is_err());
    assert!(
        build(
            "https://jwks.example/keys",
            Some(dir.path().join("missing.pem"))
        )
        .is_err()
    );
}

#[test]
fn duplicate_iss_across_issuers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = issuer_settings(dir.path().join("a.json"));
    let mut b = issuer_settings(dir.path().join("b.json"));
    b.name = "other".into();
    let err = JwtVerifier::new(
        &JwtSettings {
            issuers: vec![a, b],
            token_cache_capacity: 0,
        },
        Metrics::standalone().jwt,
    )
    .unwrap_err();
    assert!(err.to_string().contains("already accepted"), "{err}");
}

#[test]
fn reasons_are_snake_case_and_distinct() {
    let all = [
        JwtError::MissingToken,
        JwtError::Malformed,
        JwtError::AlgorithmNotAllowed,
        JwtError::MissingKid,
        JwtError::UnknownKid,
        JwtError::BadSignature,
        JwtError::Expired,
        JwtError::NotYetValid,
        JwtError::IssuedInFuture,
        JwtError::WrongAudience,
        JwtError::WrongIssuer,
        JwtError::MissingEmail,
        JwtError::EmailNotVerified,
        JwtError::EmailNotAllowed,
        JwtError::JwksUnavailable,
    ];
    let reasons: std::collections::HashSet<_> = all.iter().map(JwtError::reason).collect();
    assert_eq!(reasons.len(), all.len());
    for e in all {
        assert!(
            e.reason()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
        );
        assert_eq!(e.is_unavailable(), e == JwtError::JwksUnavailable);
    }
}

// ---------------------------------------------------------------------------------------------
// The URL source, against a real HTTPS server on 127.0.0.1:0 with its own CA.

/// What the test server answers, changeable at run time.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

struct JwksServer {
    url: String,
    ca_file: PathBuf,
    reply: std::sync::Arc<std::sync::Mutex<Reply>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    if_none_match: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    _dir: tempfile::TempDir,
}

impl JwksServer {
    async fn start(reply: Reply) -> Self {
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex};

        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};

        let dir = tempfile::tempdir().unwrap();
        let ca = crate::dev::certs::Authority::new("jwks unit-test CA").unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let leaf = ca.issue_server(&["localhost"]).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();

        let reply = Arc::new(Mutex::new(reply));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let if_none_match = Arc::new(Mutex::new(None));
        let (r, n, inm) = (reply.clone(), requests.clone(), if_none_match.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (r, n, inm) = (r.clone(), n.clone(), inm.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            n.fetch_add(1, Ordering::SeqCst);
                            *inm.lock().unwrap() = req
                                .headers()
                                .get(http::header::IF_NONE_MATCH)
                                .map(|v| v.to_str().unwrap().to_owned());
                            let reply = r.lock().unwrap().clone();
                            async move {
                                let mut resp = http::Response::builder().status(reply.status);
                                for (k, v) in reply.headers {
                                    resp = resp.header(k, v);
                                }
                                Ok::<_, std::convert::Infallible>(
                                    resp.body(http_body_util::Full::new(bytes::Bytes::from(
                                        reply.body,
                                    )))
                                    .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://localhost:{port}/oauth2/v3/certs"),
            ca_file,
            reply,
            requests,
            if_none_match,
            _dir: dir,
        }
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn jwks_reply(keys: &[Value], headers: Vec<(&'static str, String)>) -> Reply {
    Reply {
        status: 200,
        body: json!({ "keys": keys }).to_string().into_bytes(),
        headers,
    }
}

fn url_fixture(
    server: &JwksServer,
    tweak: impl FnOnce(&mut IssuerSettings),
) -> (Metrics, JwtVerifier) {
    let mut issuer = issuer_settings(PathBuf::new());
    issuer.jwks = JwksSource::Url {
        url: server.url.clone(),
        ca_file: Some(server.ca_file.clone()),
    };
    issuer.refresh_min_interval = Duration::ZERO;
    tweak(&mut issuer);
    let metrics = Metrics::standalone();
    let verifier = JwtVerifier::new(
        &JwtSettings {
            issuers: vec![issuer],
            token_cache_capacity: 0,
        },
        metrics.jwt.clone(),
    )
    .unwrap();
    (metrics, verifier)
}

fn rendered(metrics: &Metrics) -> String {
    String::from_utf8(metrics.render()).unwrap()
}

#[tokio::test]
async fn url_source_fetches_over_https_and_revalidates_with_etag() {
    let server = JwksServer::start(jwks_reply(
        &[jwk(SIGNER_1, "k1", Some("RS256"))],
        vec![
            ("cache-control", "public, max-age=3600".into()),
            ("etag", "\"v1\"".into()),
        ],
    ))
    .await;
    let (metrics, verifier) = url_fixture(&server, |_| {});
    verifier
        .verify(Some(&bearer(&good_token())), now())
        .await
        .unwrap();
    verifier
        .verify(Some(&bearer(&good_token())), now())
        .await
        .unwrap();
    assert_eq!(server.requests(), 1, "max-age keeps the set cached");
    assert_eq!(*server.if_none_match.lock().unwrap(), None);

    // An unknown kid forces a conditional refetch; 304 keeps the set.
    server.set(Reply {
        status: 304,
        body: Vec::new(),
        headers: vec![("cache-control", "max-age=3600".into())],
    });
    let unknown = mint(SIGNER_2, Some("k2"), Algorithm::RS256, &claims_at(now()));
    assert_eq!(
        verifier.verify(Some(&bearer(&unknown)), now()).await,
        Err(JwtError::UnknownKid)
    );
    assert_eq!(server.requests(), 2);
    assert_eq!(
        server.if_none_match.lock().unwrap().as_deref(),
        Some("\"v1\"")
    );
    let text = rendered(&metrics);
    assert!(
        text.contains("ekm_jwks_fetches_total{issuer=\"google\",outcome=\"not_modified\"} 1"),
        "{text}"
    );
    verifier
        .verify(Some(&bearer(&good_token())), now())
        .await
        .unwrap();

    // The issuer rotates.
    server.set(jwks_reply(
        &[jwk(SIGNER_2, "k2", Some("RS256"))],
        vec![("etag", "\"v2\"".into())],
    ));
    verifier
        .verify(Some(&bearer(&unknown)), now())
        .await
        .unwrap();
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn url_source_failures_keep_the_last_good_set() {
    let server = JwksServer::start(jwks_reply(&[jwk(SIGNER_1, "k1", Some("RS256"))], vec![])).await;
    let (metrics, verifier) = url_fixture(&server, |_| {});
    verifier.prefetch().await;
    let unknown = mint(SIGNER_2, Some("k2"), Algorithm::RS256, &claims_at(now()));
    for bad in [
        Reply {
            status: 500,
            body: b"oops".to_vec(),
            headers: vec![],
        },
        Reply {
            status: 200,
            body: vec![b' '; MAX_BODY_PLUS_ONE],
            headers: vec![],
        },
        Reply {
            status: 200,
            body: b"<html>".to_vec(),
            headers: vec![],
        },
    ] {
        server.set(bad);
        assert_eq!(
            verifier.verify(Some(&bearer(&unknown)), now()).await,
            Err(JwtError::UnknownKid)
        );
        verifier
            .verify(Some(&bearer(&good_token())), now())
            .await
            .unwrap();
    }
    let text = rendered(&metrics);
    assert!(
        text.contains("ekm_jwks_fetches_total{issuer=\"google\",outcome=\"error\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("ekm_jwks_keys{issuer=\"google\"} 1"),
        "{text}"
    );
}

const MAX_BODY_PLUS_ONE: usize = super::jwks::MAX_JWKS_BYTES + 1;

#[tokio::test]
async fn url_source_refuses_an_untrusted_server() {
    let server = JwksServer::start(jwks_reply(&[jwk(SIGNER_1, "k1", Some("RS256"))], vec![])).await;
    // Trust a different CA than the one that issued the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let other_ca = other.path().join("ca.pem");
    std::fs::write(
        &other_ca,
        crate::dev::certs::Authority::new("someone else")
            .unwrap()
            .cert_pem(),
    )
    .unwrap();
    let (_, verifier) = url_fixture(&server, |i| {
        i.jwks = JwksSource::Url {
            url: server.url.clone(),
            ca_file: Some(other_ca),
        };
    });
    assert_eq!(
        verifier.verify(Some(&bearer(&good_token())), now()).await,
        Err(JwtError::JwksUnavailable)
    );
    assert_eq!(server.requests(), 0);
}

#[test]
fn a_jwks_file_may_be_exactly_the_size_limit_but_not_more() {
    let dir = tempfile::tempdir().unwrap();
    let body = json!({ "keys": [jwk(SIGNER_1, "k1", Some("RS256"))] }).to_string();
    let limit = jwks::MAX_JWKS_BYTES;
    // Padded with JSON whitespace: still a valid set, exactly at the limit and one byte over.
    let at_limit = dir.path().join("at-limit.json");
    std::fs::write(
        &at_limit,
        format!("{body}{}", " ".repeat(limit - body.len())),
    )
    .unwrap();
    assert_eq!(check_jwks_file(&at_limit), Ok(1));
    let over = dir.path().join("over.json");
    std::fs::write(
        &over,
        format!("{body}{}", " ".repeat(limit + 1 - body.len())),
    )
    .unwrap();
    let err = check_jwks_file(&over).unwrap_err();
    assert!(err.contains("larger than"), "{err}");
}

#[test]
fn a_reload_carries_a_fetched_key_set_over_only_to_the_same_issuer_and_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = |u: &str| JwksSource::Url {
        url: u.into(),
        ca_file: None,
    };
    let settings = |name: &str, source: JwksSource| JwtSettings {
        issuers: vec![IssuerSettings {
            name: name.into(),
            jwks: source,
            ..issuer_settings(dir.path().join("unused.json"))
        }],
        token_cache_capacity: 10,
    };
    let metrics = Metrics::standalone();
    let first = JwtVerifier::new(
        &settings("google", url("https://keys.example/a")),
        metrics.jwt.clone(),
    )
    .unwrap();
    let set = KeySet::parse(
        json!({ "keys": [jwk(SIGNER_1, "k1", Some("RS256"))] })
            .to_string()
            .as_bytes(),
        "google",
    )
    .unwrap();
    first.issuers[0].keys.seed(Arc::new(set));
    let carried = |name: &str, source: JwksSource| {
        JwtVerifier::replacing(&settings(name, source), metrics.jwt.clone(), &first)
            .unwrap()
            .issuers[0]
            .keys
            .last_good()
            .is_some()
    };
    assert!(carried("google", url("https://keys.example/a")));
    assert!(
        !carried("google", url("https://keys.example/b")),
        "another URL"
    );
    assert!(
        !carried("other", url("https://keys.example/a")),
        "another issuer"
    );
}

#[test]
fn fuzz_support_counts_keys_and_finds_them_like_the_verifier() {
    let two = json!({ "keys": [
        jwk(SIGNER_1, "k1", Some("RS256")),
        jwk(SIGNER_2, "k2", Some("RS256")),
    ] })
    .to_string();
    assert_eq!(fuzz_support::jwks(two.as_bytes()), Ok(2));
    assert!(fuzz_support::jwks(b"{\"keys\": []}").is_err());
    assert!(fuzz_support::jwks(b"not json").is_err());
    assert!(fuzz_support::jwks_has(
        two.as_bytes(),
        "k2",
        Algorithm::RS256
    ));
    assert!(!fuzz_support::jwks_has(
        two.as_bytes(),
        "k3",
        Algorithm::RS256
    ));
    assert!(!fuzz_support::jwks_has(b"not json", "k1", Algorithm::RS256));
}
