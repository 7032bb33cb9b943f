//! What the Google Cloud EKM tests need on the token side, made here independently of the
//! proxy's own JWT code: RSA signing keys (PEM fixtures in `tests/fixtures/jwt`), tokens minted
//! with jsonwebtoken (plus hand-made forgeries it refuses to produce: `alg: none`, HS256 keyed
//! with the RSA public key), and [`JwksServer`], a real HTTPS JWKS endpoint on 127.0.0.1:0 whose
//! key set, cache headers and health a test changes at run time and whose requests it counts.
//!
//! The server is a minimal hyper HTTP/1.1 responder behind tokio-rustls, with its own test CA
//! (written to a PEM file the proxy is told to trust through `jwks_ca_file`), so the proxy's JWKS
//! fetch goes through real TLS and certificate verification exactly as against Google's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use bytes::Bytes;
use ekm_proxy::dev::certs::Authority;
use http_body_util::Full;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value, json};

/// `iss` of every good test token (Google's).
pub const ISSUER: &str = "https://accounts.google.com";
/// `aud` of every good test token; the test proxies accept it.
pub const AUDIENCE: &str = "https://ekm.test.example";
/// The Cloud EKM service agent every test key grants.
pub const SERVICE_ACCOUNT: &str = "service-123456789012@gcp-sa-ekms.iam.gserviceaccount.com";
/// Another project's service agent: matches the issuer's service-account glob but has no grant
/// on the default test keys.
pub const OTHER_SERVICE_ACCOUNT: &str = "service-999999999999@gcp-sa-ekms.iam.gserviceaccount.com";
/// Token lifetime of [`TokenBuilder`] defaults.
pub const LIFETIME_SECS: u64 = 3600;

// ---------------------------------------------------------------------------------------------
// Signing keys
// ---------------------------------------------------------------------------------------------

/// An RSA-2048 signing key and its public JWK.
pub struct TestKey {
    /// The `kid` the JWKS lists it under.
    pub kid: &'static str,
    /// PKCS#8 PEM of the private key.
    pub pem: &'static str,
    /// Where that PEM lives on disk (for the conformance script).
    pub path: PathBuf,
    pub encoding: EncodingKey,
    /// Public modulus and exponent (big-endian bytes).
    pub n: Vec<u8>,
    pub e: Vec<u8>,
}

impl TestKey {
    fn load(kid: &'static str, file: &'static str, pem: &'static str) -> Self {
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes())
            .unwrap_or_else(|e| panic!("fixture {file}: {e}"));
        let jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("public JWK");
        let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
            panic!("fixture {file} is not an RSA key");
        };
        let n = B64URL.decode(&rsa.n).expect("n");
        let e = B64URL.decode(&rsa.e).expect("e");
        assert_eq!(n.len(), 256, "fixture {file}: RSA-2048");
        Self {
            kid,
            pem,
            path: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt"))
                .join(file),
            encoding,
            n,
            e,
        }
    }

    /// The public JWK as Google publishes it (`kty`, `alg`, `use`, `kid`, `n`, `e`).
    pub fn jwk(&self) -> Value {
        self.jwk_as(self.kid)
    }

    /// The public JWK under another `kid`.
    pub fn jwk_as(&self, kid: &str) -> Value {
        json!({
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": kid,
            "n": B64URL.encode(&self.n),
            "e": B64URL.encode(&self.e),
        })
    }

    /// The public key as an SPKI PEM (`-----BEGIN PUBLIC KEY-----`), built from n and e.
    pub fn public_pem(&self) -> String {
        let rsa_public_key = der_seq(&[der_uint(&self.n), der_uint(&self.e)]);
        // AlgorithmIdentifier { rsaEncryption, NULL }
        let alg_id = [
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
            0x00,
        ];
        let mut bit_string = vec![0x00];
        bit_string.extend_from_slice(&rsa_public_key);
        let spki = der_seq(&[alg_id.to_vec(), der_tlv(0x03, &bit_string)]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// A token builder with the good default claims, signed RS256 by this key under its kid.
    pub fn token(&'static self) -> TokenBuilder {
        TokenBuilder::new(self)
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn der_uint(big_endian: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = big_endian.iter().copied().skip_while(|b| *b == 0).collect();
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(&trimmed);
    der_tlv(0x02, &content)
}

fn der_seq(items: &[Vec<u8>]) -> Vec<u8> {
    der_tlv(0x30, &items.concat())
}

/// The issuer's current signing key (kid `test-signer-1`).
pub fn signer1() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        TestKey::load(
            "test-signer-1",
            "signer-1.pem",
            include_str!("../fixtures/jwt/signer-1.pem"),
        )
    })
}

/// The key the issuer rotates to (kid `test-signer-2`).
pub fn signer2() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        TestKey::load(
            "test-signer-2",
            "signer-2.pem",
            include_str!("../fixtures/jwt/signer-2.pem"),
        )
    })
}

/// A key no JWKS lists. Its kid is set to signer 1's by default, so its tokens look right but
/// carry a signature the listed key does not verify.
pub fn attacker() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        TestKey::load(
            "test-signer-1",
            "attacker.pem",
            include_str!("../fixtures/jwt/attacker.pem"),
        )
    })
}

/// `{"keys": [...]}` listing `keys` under their own kids.
pub fn jwks_of(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A token under construction: header (alg, kid) and claims, good by default.
pub struct TokenBuilder {
    key: &'static TestKey,
    kid: Option<String>,
    claims: Map<String, Value>,
}

impl TokenBuilder {
    fn new(key: &'static TestKey) -> Self {
        static NONCE: AtomicU64 = AtomicU64::new(0);
        let now = now_secs();
        let claims = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "azp": "112233445566778899000",
            "sub": "112233445566778899000",
            "email": SERVICE_ACCOUNT,
            "email_verified": true,
            "iat": now,
            "exp": now + LIFETIME_SECS as i64,
            // Unique per token: a test that wants a token the proxy has not cached gets one.
            "jti": format!("t-{}-{}", std::process::id(), NONCE.fetch_add(1, Ordering::Relaxed)),
        });
        let Value::Object(claims) = claims else {
            unreachable!()
        };
        Self {
            key,
            kid: Some(key.kid.to_owned()),
            claims,
        }
    }

    /// Sets (or replaces) a claim.
    pub fn claim(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.claims.insert(name.to_owned(), value.into());
        self
    }

    /// Removes a claim.
    pub fn without(mut self, name: &str) -> Self {
        self.claims.remove(name);
        self
    }

    /// Header `kid` (`None` = no kid).
    pub fn kid(mut self, kid: Option<&str>) -> Self {
        self.kid = kid.map(str::to_owned);
        self
    }

    pub fn email(self, email: &str) -> Self {
        self.claim("email", email)
    }

    /// The claims as they stand.
    pub fn claims(&self) -> Value {
        Value::Object(self.claims.clone())
    }

    /// RS256-signed by the builder's key.
    pub fn sign(&self) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, &self.claims, &self.key.encoding).expect("sign token")
    }

    /// `{"alg":"none"}` with an empty signature (the classic unsigned forgery).
    pub fn sign_none(&self) -> String {
        let mut header = json!({"alg": "none", "typ": "JWT"});
        if let Some(kid) = &self.kid {
            header["kid"] = json!(kid);
        }
        format!(
            "{}.{}.",
            B64URL.encode(serde_json::to_vec(&header).unwrap()),
            B64URL.encode(serde_json::to_vec(&self.claims).unwrap())
        )
    }

    /// HS256 with `secret` as the HMAC key (the algorithm-confusion forgery: an attacker uses
    /// the issuer's *public* key, which they know, as the shared secret).
    pub fn sign_hs256(&self, secret: &[u8]) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, &self.claims, &EncodingKey::from_secret(secret))
            .expect("sign HS256")
    }
}

/// The token with one character of its signature changed (still valid base64url, same length).
pub fn tamper_signature(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').expect("three parts");
    let mut sig: Vec<u8> = sig.bytes().collect();
    // Change a character in the middle: every bit of it is significant (the last one may carry
    // padding bits that decoders ignore).
    let i = sig.len() / 2;
    sig[i] = if sig[i] == b'A' { b'B' } else { b'A' };
    format!("{head}.{}", String::from_utf8(sig).unwrap())
}

// ---------------------------------------------------------------------------------------------
// The JWKS server
// ---------------------------------------------------------------------------------------------

/// How the JWKS endpoint behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 with the current key set.
    Up,
    /// 500 with a small error body.
    Error500,
    /// Accept TCP connections and close them at once, before the TLS handshake.
    Refuse,
    /// 200 with a body that is not a JWKS.
    Garbage,
}

struct State {
    body: Mutex<Bytes>,
    mode: Mutex<Mode>,
    max_age: Mutex<Option<u64>>,
    requests: AtomicUsize,
    connections: AtomicUsize,
}

/// A running HTTPS JWKS endpoint.
pub struct JwksServer {
    /// `https://127.0.0.1:<port>/oauth2/v3/certs`.
    pub url: String,
    /// PEM file of the CA that issued the server certificate (the proxy's `jwks_ca_file`).
    pub ca_pem: PathBuf,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// Path the key set is served at; every other path is 404.
pub const JWKS_PATH: &str = "/oauth2/v3/certs";

impl JwksServer {
    /// Serves `jwks` with `Cache-Control: public, max-age=300`.
    pub async fn start(jwks: Value) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::new("ekm-proxy test JWKS CA").expect("CA");
        let cert = ca
            .issue_server(&["127.0.0.1", "localhost"])
            .expect("server cert");
        let ca_pem = dir.path().join("jwks-ca.pem");
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();

        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("server cert PEM");
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("server key PEM");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind JWKS server");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            body: Mutex::new(Bytes::from(serde_json::to_vec(&jwks).unwrap())),
            mode: Mutex::new(Mode::Up),
            max_age: Mutex::new(Some(300)),
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, acceptor, state.clone()));
        Self {
            url: format!("https://127.0.0.1:{port}{JWKS_PATH}"),
            ca_pem,
            state,
            task,
            _dir: dir,
        }
    }

    /// Replaces the key set served from now on.
    pub fn set_jwks(&self, jwks: Value) {
        *self.state.body.lock().unwrap() = Bytes::from(serde_json::to_vec(&jwks).unwrap());
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// `Cache-Control: public, max-age=N` (`None`: no Cache-Control header at all).
    pub fn set_max_age(&self, max_age: Option<u64>) {
        *self.state.max_age.lock().unwrap() = max_age;
    }

    /// HTTP requests received (any path, any answer).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted (including refused ones).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        if *state.mode.lock().unwrap() == Mode::Refuse {
            drop(tcp);
            continue;
        }
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req)) }
            });
            // One request per connection: every fetch is a new connection, so `Refuse` takes
            // effect at once (no pooled keep-alive connection survives it) and
            // `connections()` counts fetches.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

fn answer(
    state: &State,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mode = *state.mode.lock().unwrap();
    let response = http::Response::builder();
    if req.uri().path() != JWKS_PATH || req.method() != http::Method::GET {
        return response
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found")))
            .unwrap();
    }
    match mode {
        Mode::Error500 | Mode::Refuse => response
            .status(500)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"backend error")))
            .unwrap(),
        Mode::Garbage => response
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"keys\": \"not a list\"")))
            .unwrap(),
        Mode::Up => {
            let mut response = response
                .status(200)
                .header("content-type", "application/json; charset=UTF-8");
            if let Some(age) = *state.max_age.lock().unwrap() {
                response = response.header("cache-control", format!("public, max-age={age}"));
            }
            response
                .body(Full::new(state.body.lock().unwrap().clone()))
                .unwrap()
        }
    }
}
