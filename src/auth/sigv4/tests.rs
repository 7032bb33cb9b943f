//! Tests of the SigV4 signer and verifier: the AWS test-suite known-answer vectors in
//! `tests/fixtures/sigv4/`, sign→verify round trips, and one test per rejection reason.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use serde::Deserialize;

use super::canonical::{CanonicalInput, write_canonical_request};
use super::*;

#[derive(Deserialize)]
struct Suite {
    access_key_id: String,
    secret: String,
    region: String,
    service: String,
    amz_date: String,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: String,
    signed_headers: Vec<String>,
    creq: Option<String>,
    signature: String,
}

fn suite() -> Suite {
    let text = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sigv4/aws-sig-v4-test-suite.json"
    ));
    serde_json::from_str(text).unwrap()
}

/// 2015-08-30T12:36:00Z.
fn suite_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_440_938_160)
}

fn vector_headers(v: &Vector) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in &v.headers {
        h.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    h
}

fn expected_authorization(s: &Suite, v: &Vector) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential={}/20150830/{}/{}/aws4_request, SignedHeaders={}, Signature={}",
        s.access_key_id,
        s.region,
        s.service,
        v.signed_headers.join(";"),
        v.signature
    )
}

#[test]
fn signer_reproduces_the_aws_test_suite() {
    let s = suite();
    assert!(s.vectors.len() >= 15);
    for v in &s.vectors {
        let mut headers = vector_headers(v);
        let signed: Vec<&str> = v.signed_headers.iter().map(String::as_str).collect();
        sign(
            &v.method,
            &v.path,
            &v.query,
            &mut headers,
            v.body.as_bytes(),
            &signed,
            &s.access_key_id,
            &SecretString::from(s.secret.as_str()),
            &s.region,
            &s.service,
            suite_time(),
        )
        .unwrap();
        assert_eq!(headers["x-amz-date"], s.amz_date.as_str(), "{}", v.name);
        assert_eq!(
            headers["authorization"],
            expected_authorization(&s, v).as_str(),
            "{}",
            v.name
        );
    }
}

#[test]
fn canonical_requests_match_the_published_creq() {
    let s = suite();
    let mut checked = 0;
    for v in s.vectors.iter().filter(|v| v.creq.is_some()) {
        let mut headers = vector_headers(v);
        headers.insert("x-amz-date", HeaderValue::from_str(&s.amz_date).unwrap());
        let mut out = Vec::new();
        write_canonical_request(
            &mut out,
            &CanonicalInput {
                method: &v.method,
                path: &v.path,
                query: &v.query,
                headers: &headers,
                authority: None,
                signed_headers: &v.signed_headers.join(";"),
                payload_hash: ascii(&hex_sha256(v.body.as_bytes())),
            },
        )
        .unwrap();
        assert_eq!(Some(String::from_utf8(out).unwrap()), v.creq, "{}", v.name);
        checked += 1;
    }
    assert!(checked >= 4);
}

#[test]
fn verifier_accepts_the_aws_test_suite() {
    let s = suite();
    let verifier = SigV4Verifier::new(
        &s.service,
        RegionPolicy::OneOf(vec![s.region.clone()]),
        DEFAULT_MAX_SKEW,
        vec![SigV4Credential {
            access_key_id: s.access_key_id.clone(),
            secret: SecretString::from(s.secret.as_str()),
        }],
    );
    for v in &s.vectors {
        let mut headers = vector_headers(v);
        headers.insert("x-amz-date", HeaderValue::from_str(&s.amz_date).unwrap());
        headers.insert(
            "authorization",
            HeaderValue::from_str(&expected_authorization(&s, v)).unwrap(),
        );
        let req = SignedRequest {
            method: &v.method,
            path: &v.path,
            query: &v.query,
            headers: &headers,
            authority: None,
            body: v.body.as_bytes(),
        };
        let principal = verifier.verify(&req, suite_time());
        assert_eq!(
            principal.unwrap(),
            Principal::SigV4 {
                access_key_id: s.access_key_id.clone(),
                region: s.region.clone(),
            },
            "{}",
            v.name
        );
    }
    // All vectors share one (key, date, region): one derivation, cached.
    assert_eq!(verifier.keys.len(), 1);
}

// ---- XKS-shaped round trips and rejections -------------------------------------------------

const AKID: &str = "AKIAXKSTESTKEY2345672";
const SECRET: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";
const AKID2: &str = "AKIAXKSROTATEDKEY67ABC";
const SECRET2: &str = "cm90YXRlZC1zZWNyZXQtcm90YXRlZC1zZWNyZXQtcm90YXRlZA==";
const SERVICE: &str = "kms-xks-proxy";
const PATH: &str = "/dev-keystore/kms/xks/v1/keys/key-1/encrypt";
const BODY: &[u8] = br#"{"requestMetadata":{"kmsRequestId":"1"},"plaintext":"AAAA"}"#;
const HOST: &str = "xks.example.com:8443";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn verifier() -> SigV4Verifier {
    SigV4Verifier::new(
        SERVICE,
        RegionPolicy::OneOf(vec!["us-east-1".into(), "eu-west-1".into()]),
        DEFAULT_MAX_SKEW,
        vec![
            SigV4Credential {
                access_key_id: AKID.into(),
                secret: SecretString::from(SECRET),
            },
            SigV4Credential {
                access_key_id: AKID2.into(),
                secret: SecretString::from(SECRET2),
            },
        ],
    )
}

/// What a test varies when signing.
struct Signing<'a> {
    signed: &'a [&'a str],
    akid: &'a str,
    secret: &'a str,
    region: &'a str,
    service: &'a str,
    time: SystemTime,
}

impl Default for Signing<'_> {
    fn default() -> Self {
        Self {
            signed: &["host", "x-amz-date"],
            akid: AKID,
            secret: SECRET,
            region: "us-east-1",
            service: SERVICE,
            time: now(),
        }
    }
}

fn signed_headers_with(s: &Signing<'_>, mut headers: HeaderMap) -> HeaderMap {
    if !headers.contains_key("host") {
        headers.insert("host", HeaderValue::from_static(HOST));
    }
    sign(
        "POST",
        PATH,
        "",
        &mut headers,
        BODY,
        s.signed,
        s.akid,
        &SecretString::from(s.secret),
        s.region,
        s.service,
        s.time,
    )
    .unwrap();
    headers
}

fn signed_headers(s: &Signing<'_>) -> HeaderMap {
    signed_headers_with(s, HeaderMap::new())
}

fn verify_with(headers: &HeaderMap, path: &str, body: &[u8]) -> Result<Principal, SigV4Error> {
    verifier().verify(
        &SignedRequest {
            method: "POST",
            path,
            query: "",
            headers,
            authority: None,
            body,
        },
        now(),
    )
}

fn verify(headers: &HeaderMap) -> Result<Principal, SigV4Error> {
    verify_with(headers, PATH, BODY)
}

fn set_authorization(headers: &mut HeaderMap, value: &str) {
    headers.insert("authorization", HeaderValue::from_str(value).unwrap());
}

fn authorization(headers: &HeaderMap) -> String {
    headers["authorization"].to_str().unwrap().to_owned()
}

#[test]
fn round_trip_kms_style() {
    let h = signed_headers(&Signing::default());
    assert!(authorization(&h).contains(
        "/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature="
    ));
    assert_eq!(
        verify(&h).unwrap(),
        Principal::SigV4 {
            access_key_id: AKID.into(),
            region: "us-east-1".into()
        }
    );
}

#[test]
fn round_trip_curl_style_with_content_type() {
    let mut base = HeaderMap::new();
    base.insert("content-type", HeaderValue::from_static("application/json"));
    let h = signed_headers_with(
        &Signing {
            signed: &["content-type", "host", "x-amz-date"],
            ..Signing::default()
        },
        base,
    );
    assert!(verify(&h).is_ok());
}

#[test]
fn second_credential_and_second_region_work() {
    let h = signed_headers(&Signing {
        akid: AKID2,
        secret: SECRET2,
        region: "eu-west-1",
        ..Signing::default()
    });
    assert_eq!(
        verify(&h).unwrap(),
        Principal::SigV4 {
            access_key_id: AKID2.into(),
            region: "eu-west-1".into()
        }
    );
    // Each credential only with its own secret.
    let h = signed_headers(&Signing {
        akid: AKID2,
        secret: SECRET,
        ..Signing::default()
    });
    assert!(matches!(verify(&h), Err(SigV4Error::SignatureMismatch)));
}

#[test]
fn region_policy_any_accepts_any_region() {
    let v = SigV4Verifier::new(
        SERVICE,
        RegionPolicy::Any,
        DEFAULT_MAX_SKEW,
        vec![SigV4Credential {
            access_key_id: AKID.into(),
            secret: SecretString::from(SECRET),
        }],
    );
    let h = signed_headers(&Signing {
        region: "ap-southeast-7",
        ..Signing::default()
    });
    let req = SignedRequest {
        method: "POST",
        path: PATH,
        query: "",
        headers: &h,
        authority: None,
        body: BODY,
    };
    assert!(v.verify(&req, now()).is_ok());
}

#[test]
fn http2_authority_stands_in_for_host() {
    let mut h = signed_headers(&Signing::default());
    h.remove("host");
    let req = |authority| SignedRequest {
        method: "POST",
        path: PATH,
        query: "",
        headers: &h,
        authority,
        body: BODY,
    };
    assert!(verifier().verify(&req(Some(HOST)), now()).is_ok());
    assert!(matches!(
        verifier().verify(&req(Some("other.example.com")), now()),
        Err(SigV4Error::SignatureMismatch)
    ));
    assert!(matches!(
        verifier().verify(&req(None), now()),
        Err(SigV4Error::SignedHeaderMissing(n)) if n == "host"
    ));
}

#[test]
fn tampering_is_detected() {
    let h = signed_headers(&Signing::default());
    // Body.
    assert!(matches!(
        verify_with(&h, PATH, b"{}"),
        Err(SigV4Error::SignatureMismatch)
    ));
    // Path.
    assert!(matches!(
        verify_with(&h, "/dev-keystore/kms/xks/v1/keys/key-2/encrypt", BODY),
        Err(SigV4Error::SignatureMismatch)
    ));
    // Signed header value.
    let mut t = h.clone();
    t.insert("host", HeaderValue::from_static("evil.example.com"));
    assert!(matches!(verify(&t), Err(SigV4Error::SignatureMismatch)));
    // Date moved by one second (still within skew, still the same day).
    let mut t = h.clone();
    let date = t["x-amz-date"].to_str().unwrap().to_owned();
    let bumped = format!(
        "{}{}Z",
        &date[..14],
        if &date[14..15] == "0" { 1 } else { 0 }
    );
    t.insert("x-amz-date", HeaderValue::from_str(&bumped).unwrap());
    assert!(matches!(verify(&t), Err(SigV4Error::SignatureMismatch)));
    // Method.
    let req = SignedRequest {
        method: "PUT",
        path: PATH,
        query: "",
        headers: &h,
        authority: None,
        body: BODY,
    };
    assert!(matches!(
        verifier().verify(&req, now()),
        Err(SigV4Error::SignatureMismatch)
    ));
    // An unsigned header may change freely.
    let mut t = h.clone();
    t.insert("user-agent", HeaderValue::from_static("anything"));
    assert!(verify(&t).is_ok());
}

#[test]
fn every_signature_nibble_matters() {
    let h = signed_headers(&Signing::default());
    let auth = authorization(&h);
    let at = auth.find("Signature=").unwrap() + "Signature=".len();
    for i in at..auth.len() {
        let mut bytes = auth.clone().into_bytes();
        bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
        let mut t = h.clone();
        set_authorization(&mut t, std::str::from_utf8(&bytes).unwrap());
        assert!(
            matches!(verify(&t), Err(SigV4Error::SignatureMismatch)),
            "{i}"
        );
    }
}

#[test]
fn clock_skew_both_ways() {
    let skew = DEFAULT_MAX_SKEW;
    for (offset_secs, ok) in [
        (-300i64, true),
        (300, true),
        (-301, false),
        (301, false),
        (-3600, false),
        (86_400, false),
    ] {
        let time = if offset_secs < 0 {
            now() - Duration::from_secs(offset_secs.unsigned_abs())
        } else {
            now() + Duration::from_secs(offset_secs.unsigned_abs())
        };
        let h = signed_headers(&Signing {
            time,
            ..Signing::default()
        });
        let r = verify(&h);
        if ok {
            assert!(r.is_ok(), "{offset_secs}: {r:?}");
        } else {
            assert!(
                matches!(r, Err(SigV4Error::ClockSkew)),
                "{offset_secs}: {r:?}"
            );
        }
    }
    assert_eq!(skew, Duration::from_secs(300));
}

#[test]
fn wrong_service_region_and_key() {
    let h = signed_headers(&Signing {
        service: "kms",
        ..Signing::default()
    });
    assert!(matches!(verify(&h), Err(SigV4Error::WrongService)));
    let h = signed_headers(&Signing {
        region: "us-west-2",
        ..Signing::default()
    });
    assert!(matches!(verify(&h), Err(SigV4Error::RegionNotAllowed)));
    let h = signed_headers(&Signing {
        akid: "AKIAUNKNOWNKEY234567A",
        ..Signing::default()
    });
    assert!(matches!(verify(&h), Err(SigV4Error::UnknownAccessKey)));
    let h = signed_headers(&Signing {
        secret: SECRET2,
        ..Signing::default()
    });
    assert!(matches!(verify(&h), Err(SigV4Error::SignatureMismatch)));
}

#[test]
fn scope_date_must_match_x_amz_date() {
    let mut h = signed_headers(&Signing::default());
    let auth = authorization(&h);
    let date = h["x-amz-date"].to_str().unwrap()[..8].to_owned();
    set_authorization(&mut h, &auth.replace(&format!("/{date}/"), "/20000101/"));
    assert!(matches!(verify(&h), Err(SigV4Error::ScopeDateMismatch)));
}

#[test]
fn host_and_date_must_be_signed() {
    let h = signed_headers(&Signing {
        signed: &["x-amz-date"],
        ..Signing::default()
    });
    assert!(matches!(
        verify(&h),
        Err(SigV4Error::HeaderNotSigned("host"))
    ));
    let h = signed_headers(&Signing {
        signed: &["host"],
        ..Signing::default()
    });
    assert!(matches!(
        verify(&h),
        Err(SigV4Error::HeaderNotSigned("x-amz-date"))
    ));
}

#[test]
fn signed_header_must_be_present() {
    let mut base = HeaderMap::new();
    base.insert("content-type", HeaderValue::from_static("application/json"));
    let mut h = signed_headers_with(
        &Signing {
            signed: &["content-type", "host", "x-amz-date"],
            ..Signing::default()
        },
        base,
    );
    h.remove("content-type");
    assert!(matches!(
        verify(&h),
        Err(SigV4Error::SignedHeaderMissing(n)) if n == "content-type"
    ));
    // The signer refuses to sign a header it does not have.
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static(HOST));
    let r = sign(
        "POST",
        PATH,
        "",
        &mut h,
        BODY,
        &["content-type", "host", "x-amz-date"],
        AKID,
        &SecretString::from(SECRET),
        "us-east-1",
        SERVICE,
        now(),
    );
    assert!(matches!(r, Err(SigV4Error::SignedHeaderMissing(n)) if n == "content-type"));
}

#[test]
fn content_sha256_is_checked_only_when_signed() {
    let good = hex::encode(Sha256::digest(BODY));
    let bad = hex::encode(Sha256::digest(b"other"));
    let with = |value: &str, signed: &'static [&'static str]| {
        let mut base = HeaderMap::new();
        base.insert(
            "x-amz-content-sha256",
            HeaderValue::from_str(value).unwrap(),
        );
        signed_headers_with(
            &Signing {
                signed,
                ..Signing::default()
            },
            base,
        )
    };
    let all: &'static [&'static str] = &["host", "x-amz-content-sha256", "x-amz-date"];
    assert!(verify(&with(&good, all)).is_ok());
    assert!(matches!(
        verify(&with(&bad, all)),
        Err(SigV4Error::ContentHashMismatch)
    ));
    assert!(matches!(
        verify(&with("UNSIGNED-PAYLOAD", all)),
        Err(SigV4Error::ContentHashMismatch)
    ));
    // Present but not signed: ignored.
    assert!(verify(&with(&bad, &["host", "x-amz-date"])).is_ok());
}

#[test]
fn missing_and_malformed_headers() {
    let h = signed_headers(&Signing::default());
    let auth = authorization(&h);

    let mut t = h.clone();
    t.remove("authorization");
    assert!(matches!(verify(&t), Err(SigV4Error::MissingAuthorization)));

    let mut t = h.clone();
    t.remove("x-amz-date");
    assert!(matches!(verify(&t), Err(SigV4Error::MissingDate)));

    for bad_date in [
        "2023-11-14T22:13:20Z",
        "20231114T221320",
        "20231131T221320Z",
    ] {
        let mut t = h.clone();
        t.insert("x-amz-date", HeaderValue::from_static(bad_date));
        assert!(
            matches!(verify(&t), Err(SigV4Error::MalformedDate)),
            "{bad_date}"
        );
    }
    let mut t = h.clone();
    t.append("x-amz-date", h["x-amz-date"].clone());
    assert!(matches!(verify(&t), Err(SigV4Error::MalformedDate)));

    let mut t = h.clone();
    set_authorization(
        &mut t,
        &auth.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"),
    );
    assert!(matches!(verify(&t), Err(SigV4Error::UnsupportedAlgorithm)));
    set_authorization(&mut t, "Basic dXNlcjpwYXNz");
    assert!(matches!(verify(&t), Err(SigV4Error::UnsupportedAlgorithm)));

    let mut t = h.clone();
    t.append("authorization", h["authorization"].clone());
    assert!(matches!(
        verify(&t),
        Err(SigV4Error::MalformedAuthorization(_))
    ));

    let sig = &auth[auth.find("Signature=").unwrap()..];
    let malformed = [
        String::new(),
        "AWS4-HMAC-SHA256".to_owned(),
        auth.replace("SignedHeaders=host;x-amz-date, ", ""),
        auth.replace(", Signature=", ", Signature=zz"),
        auth.replace(sig, "Signature=abcd"),
        auth.replace("Credential=", "Credentials="),
        format!("{auth}, {sig}"),
        auth.replace("/aws4_request", "/aws5_request"),
        auth.replace("/us-east-1/", "/us-east-1/extra/"),
        auth.replace("host;x-amz-date", "x-amz-date;host"),
        auth.replace("host;x-amz-date", "Host;x-amz-date"),
        auth.replace("host;x-amz-date", "host;;x-amz-date"),
        auth.replace("host;x-amz-date", "host;host;x-amz-date"),
    ];
    for bad in &malformed {
        let mut t = h.clone();
        set_authorization(&mut t, bad);
        let r = verify(&t);
        assert!(
            matches!(r, Err(SigV4Error::MalformedAuthorization(_))),
            "{bad:?}: {r:?}"
        );
    }
}

#[test]
fn reasons_and_messages_never_leak() {
    let h = signed_headers(&Signing::default());
    let auth = authorization(&h);
    let sig = auth.rsplit('=').next().unwrap().to_owned();
    let errors = [
        SigV4Error::MissingAuthorization,
        SigV4Error::MalformedAuthorization("x"),
        SigV4Error::UnsupportedAlgorithm,
        SigV4Error::UnknownAccessKey,
        SigV4Error::WrongService,
        SigV4Error::RegionNotAllowed,
        SigV4Error::ScopeDateMismatch,
        SigV4Error::MissingDate,
        SigV4Error::MalformedDate,
        SigV4Error::ClockSkew,
        SigV4Error::HeaderNotSigned("host"),
        SigV4Error::SignedHeaderMissing("content-type".into()),
        SigV4Error::ContentHashMismatch,
        SigV4Error::SignatureMismatch,
    ];
    let mut reasons = std::collections::HashSet::new();
    for e in &errors {
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET) && !text.contains(&sig), "{text}");
        assert!(
            e.reason()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
        );
        reasons.insert(e.reason());
    }
    assert_eq!(reasons.len(), errors.len());
    let dbg = format!("{:?}", verifier());
    assert!(
        dbg.contains(AKID) && !dbg.contains(SECRET) && !dbg.contains(SECRET2),
        "{dbg}"
    );
}

#[test]
fn signing_keys_are_cached_per_key_date_region() {
    let v = verifier();
    let check = |s: &Signing<'_>| {
        let h = signed_headers(s);
        let req = SignedRequest {
            method: "POST",
            path: PATH,
            query: "",
            headers: &h,
            authority: None,
            body: BODY,
        };
        v.verify(&req, now()).unwrap();
    };
    check(&Signing::default());
    check(&Signing::default());
    assert_eq!(v.keys.len(), 1);
    check(&Signing {
        region: "eu-west-1",
        ..Signing::default()
    });
    check(&Signing {
        akid: AKID2,
        secret: SECRET2,
        ..Signing::default()
    });
    assert_eq!(v.keys.len(), 3);
}

#[test]
fn key_cache_is_bounded() {
    let cache = KeyCache::new(16);
    for i in 0..100 {
        let k = cache.get_or_derive(&format!("AKID/20240101/r{i}/s/aws4_request"), || {
            Some(SigningKey([0; 32]))
        });
        assert!(k.is_some());
        assert!(cache.len() <= 16);
    }
}

#[test]
fn verifier_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SigV4Verifier>();
}

#[test]
fn cached_signer_matches_the_free_function_across_dates() {
    let signer = SigV4Signer::new(AKID, SecretString::from(SECRET), "us-east-1", SERVICE);
    let day = Duration::from_secs(86_400);
    for time in [now(), now() + Duration::from_secs(1), now() + day, now()] {
        let mut a = HeaderMap::new();
        a.insert("host", HeaderValue::from_static(HOST));
        let mut b = a.clone();
        signer
            .sign(
                "POST",
                PATH,
                "",
                &mut a,
                BODY,
                &["host", "x-amz-date"],
                time,
            )
            .unwrap();
        sign(
            "POST",
            PATH,
            "",
            &mut b,
            BODY,
            &["host", "x-amz-date"],
            AKID,
            &SecretString::from(SECRET),
            "us-east-1",
            SERVICE,
            time,
        )
        .unwrap();
        assert_eq!(a, b);
    }
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static(HOST));
    signer
        .sign(
            "POST",
            PATH,
            "",
            &mut h,
            BODY,
            &["host", "x-amz-date"],
            now(),
        )
        .unwrap();
    assert!(verify(&h).is_ok());
    assert!(!format!("{signer:?}").contains(SECRET));
}

#[test]
fn fuzz_support_parses_renders_and_canonicalizes_like_the_verifier() {
    use super::fuzz_support as fs;
    let value = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
    let parsed = fs::parse(value).unwrap();
    assert!(
        parsed.credential_ok && parsed.signed_headers_ok,
        "{parsed:?}"
    );
    assert_eq!(
        parsed.credential,
        "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request"
    );
    // Rendering is a fixed point of parsing.
    assert_eq!(fs::parse(&fs::render(&parsed)).unwrap(), parsed);
    // A credential without a valid scope parses, but says so.
    let no_scope = fs::parse(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE, SignedHeaders=host;x-amz-date, \
         Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    )
    .unwrap();
    assert!(!no_scope.credential_ok, "{no_scope:?}");
    assert!(no_scope.signed_headers_ok, "{no_scope:?}");
    assert!(fs::signed_headers_ok("host;x-amz-date"));
    assert!(!fs::signed_headers_ok("x-amz-date;host"), "must be sorted");
    assert!(!fs::signed_headers_ok(""));

    let mut headers = HeaderMap::new();
    headers.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
    let canonical = fs::canonical_request(
        "GET",
        "/",
        "",
        &headers,
        Some("example.amazonaws.com"),
        "host;x-amz-date",
    )
    .unwrap();
    let text = String::from_utf8(canonical).unwrap();
    assert!(
        text.starts_with("GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n"),
        "{text}"
    );
    assert!(
        fs::canonical_request("GET", "/", "", &headers, None, "host;x-amz-date;x-missing").is_err(),
        "a signed header that is absent"
    );
}
