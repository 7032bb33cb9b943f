//! The HTTP lane: N workers, each sending one request at a time over keep-alive connections, for a
//! warm-up and then a measured window.
//!
//! Cheap per request on purpose (the load generator shares the machine with the server): the path,
//! URI and `Host` value are built once, and the request goes straight to
//! [`Connection::send_raw`]. XKS bodies are a template rendered by one copy plus an in-place
//! `kmsRequestId`, signed with a fresh SigV4 signature at send time. Cloud EKM bodies are fixed,
//! with either one cached bearer token or one minted per request (RS256 signing is then most of the
//! load generator's cost). Azure bodies are a template with an in-place `request_id`, sent on the
//! Azure target's own mutual-TLS connections with no other credential. Sees the proxy only through
//! the wire, via `client`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::Full;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

use super::options::{AzureOptions, BenchOptions, GcpOptions, Scenario, Target};
use super::stats::LaneStats;
use super::{BenchError, RunningLane, Window};
use crate::auth::sigv4;
use crate::client::gcp::{self, AdditionalContext, GcpOp, TokenClaims, TokenSigner};
use crate::client::{ClientError, ClientTls, Connection, Connector, Response, xks};
use crate::secret::SecretString;

/// SigV4 service name of XKS.
const SERVICE: &str = "kms-xks-proxy";
/// Headers every request signs, as KMS does.
const SIGNED_HEADERS: [&str; 2] = ["host", "x-amz-date"];
/// Pause after a failed reconnect, so a dead server does not turn a worker into a busy loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// Connections opened at once when setting up (bounded so 1,000 idle connections do not
/// arrive as one handshake storm).
const CONNECT_PARALLELISM: usize = 32;

/// Lifetime of the Cloud EKM tokens: longer than any run.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Bytes the Azure scenarios wrap: Azure Managed HSM wraps 256-bit AES data encryption keys.
pub const AZURE_DEK_LEN: usize = 32;
/// The EKM Proxy API version the Azure requests ask for. Written out rather than taken from the
/// server's front end, so the benchmark speaks the published API whatever the server says.
const AZURE_API_VERSION: &str = "0.1-preview";
/// `request_context.pool_name` of the Azure requests (a rule pinning pool names refuses it, and
/// the probe says so).
const AZURE_POOL: &str = "ekm-bench";
/// Where the Azure request id sits in the body: rewritten per request, as MHSM sends a new one
/// for each call (the server logs and audits it).
const AZURE_REQUEST_ID: &str = "/request_context/request_id";

/// The server as the HTTP lane sees it: where, how to connect, and how to sign.
pub struct HttpTarget {
    connector: Connector,
    host: HeaderValue,
    prefix: String,
    access_key_id: String,
    secret: SecretString,
    region: String,
    gcp: GcpOptions,
    /// The Cloud EKM token signer, or why it could not be loaded (reported by the gcp scenarios
    /// only, so an XKS-only run does not need it).
    signer: Result<TokenSigner, String>,
    /// The claims of every Cloud EKM token, before `iat`/`exp`/`jti` are set per token.
    claims: TokenClaims,
}

impl HttpTarget {
    /// Read the TLS material named in `opts` and prepare a connector to `addr` (`--url`: the XKS
    /// and Cloud EKM scenarios).
    pub fn new(opts: &BenchOptions, addr: SocketAddr) -> Result<Self, BenchError> {
        let signer = if opts.scenarios.iter().any(|s| s.is_gcp()) {
            TokenSigner::from_pem_file(&opts.gcp.signer, opts.gcp.kid.as_str())
                .map_err(|e| e.to_string())
        } else {
            Err("no Cloud EKM scenario was selected".to_owned())
        };
        Self::build(
            opts,
            &opts.target,
            opts.client_identity.as_ref(),
            signer,
            addr,
        )
    }

    /// The Azure target (`--azure-url`) at `addr`: its own listener, always presenting a client
    /// certificate, which is the Azure front's only credential.
    pub fn azure(opts: &BenchOptions, addr: SocketAddr) -> Result<Self, BenchError> {
        let az = &opts.azure;
        Self::build(
            opts,
            &az.target,
            Some(&az.client_identity),
            Err("the Azure front takes no bearer token".to_owned()),
            addr,
        )
    }

    fn build(
        opts: &BenchOptions,
        target: &Target,
        identity: Option<&(std::path::PathBuf, std::path::PathBuf)>,
        signer: Result<TokenSigner, String>,
        addr: SocketAddr,
    ) -> Result<Self, BenchError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| BenchError::Options(format!("cannot read {}: {e}", p.display())))
        };
        let tls = if target.tls {
            let (client_cert_pem, client_key_pem) = match identity {
                Some((c, k)) => (Some(read(c)?), Some(read(k)?)),
                None => (None, None),
            };
            Some(ClientTls {
                ca_pem: read(&opts.ca)?,
                client_cert_pem,
                client_key_pem,
                server_name: target.host.clone(),
            })
        } else {
            None
        };
        let host_header = target.host_header();
        let host = HeaderValue::from_str(&host_header).map_err(|_| {
            BenchError::Options(format!("host {host_header:?} is not a valid Host header"))
        })?;
        let connector =
            Connector::new(addr, tls.as_ref()).map_err(|e| BenchError::Options(e.to_string()))?;
        let mut claims = TokenClaims::dev(&opts.gcp.email, &opts.gcp.audience, TOKEN_LIFETIME);
        claims.iss.clone_from(&opts.gcp.issuer);
        Ok(Self {
            connector,
            host,
            prefix: target.prefix.clone(),
            access_key_id: opts.access_key_id.clone(),
            secret: opts.secret.clone(),
            region: opts.region.clone(),
            gcp: opts.gcp.clone(),
            signer,
            claims,
        })
    }

    /// One new keep-alive connection (TLS sessions are resumed across connections).
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        self.connector.connect().await
    }

    /// `GET /ping` on `client`: the status, for the readiness wait.
    pub async fn ping(&self, client: &mut Connection) -> Result<u16, ClientError> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = http::Uri::from_static("/ping");
        req.headers_mut().insert(HOST, self.host.clone());
        Ok(client.send_raw(req).await?.status)
    }

    /// The request for `op`, numbered (`nonce`, `worker`, `seq`) to make its `kmsRequestId` or
    /// token id unique. Signed now: every XKS request carries a fresh `x-amz-date` and signature,
    /// as KMS sends them; a fresh-token Cloud EKM request a newly minted token.
    fn request(
        &self,
        op: &Operation,
        nonce: u16,
        worker: u16,
        seq: u64,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let body = match &op.body {
            OpBody::Template(template) => template.render(nonce, worker, seq),
            OpBody::Fixed(b) => b.clone(),
        };
        match &op.auth {
            OpAuth::SigV4 => sigv4::sign(
                "POST",
                &op.path,
                "",
                &mut headers,
                &body,
                &SIGNED_HEADERS,
                &self.access_key_id,
                &self.secret,
                &self.region,
                SERVICE,
                std::time::SystemTime::now(),
            )?,
            OpAuth::Bearer(value) => {
                headers.insert(AUTHORIZATION, value.clone());
            }
            OpAuth::FreshBearer => {
                let token =
                    self.mint(Some(format!("{:x}-{nonce:x}-{worker:x}-{seq:x}", op.pid)))?;
                headers.insert(AUTHORIZATION, bearer(&token)?);
            }
            OpAuth::MutualTls => {}
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = op.uri.clone();
        *req.headers_mut() = headers;
        Ok(req)
    }

    /// A token issued now, with token id `jti`.
    fn mint(&self, jti: Option<String>) -> Result<String, ClientError> {
        let signer = self
            .signer
            .as_ref()
            .map_err(|e| ClientError::Token(e.clone()))?;
        let mut claims = self.claims.clone();
        claims.reissue_at(std::time::SystemTime::now());
        claims.jti = jti;
        signer
            .mint(&claims)
            .map_err(|e| ClientError::Token(e.to_string()))
    }

    /// Send `op` once on `client` and check the answer is the expected one; the error text says
    /// what came back instead. Used before measuring, so a misconfiguration is one clear line
    /// rather than a table of errors.
    pub async fn probe(&self, client: &mut Connection, op: &Operation) -> Result<Response, String> {
        let req = self.request(op, 0, 0, 0).map_err(|e| e.to_string())?;
        let resp = client.send_raw(req).await.map_err(|e| e.to_string())?;
        if op.expect.accepts(&resp) {
            Ok(resp)
        } else {
            Err(describe(&resp))
        }
    }

    /// The operation for `scenario`. Decrypt and unwrap scenarios first encrypt (wrap) one
    /// plaintext through the server (on `client`) and decrypt (unwrap) that ciphertext, with its
    /// tag flipped for bad-tag.
    pub async fn operation(
        &self,
        client: &mut Connection,
        scenario: Scenario,
        opts: &BenchOptions,
    ) -> Result<Operation, String> {
        if scenario.is_gcp() {
            return self.gcp_operation(client, scenario, opts).await;
        }
        if scenario.is_azure() {
            return self.azure_operation(client, scenario, &opts.azure).await;
        }
        let key = &opts.key;
        let plaintext = pattern(opts.plaintext_size, 0);
        let aad = (opts.aad_size > 0).then(|| pattern(opts.aad_size, 7));
        let op = match scenario {
            Scenario::Encrypt => self.op(
                &format!("keys/{key}/encrypt"),
                xks::encrypt_body(xks::KMS_KEY_ARN, &plaintext, aad.as_deref(), false),
                Expect::Ok,
            )?,
            Scenario::Decrypt | Scenario::DecryptBadTag => {
                let encrypt = self.op(
                    &format!("keys/{key}/encrypt"),
                    xks::encrypt_body(xks::KMS_KEY_ARN, &plaintext, aad.as_deref(), false),
                    Expect::Ok,
                )?;
                let resp = self
                    .probe(client, &encrypt)
                    .await
                    .map_err(|e| format!("encrypting the test ciphertext: {e}"))?;
                let mut sealed = xks::parse_encrypt_response(&resp.body)
                    .map_err(|e| format!("encrypt response: {e}"))?;
                let expect = if scenario == Scenario::DecryptBadTag {
                    if let Some(b) = sealed.tag.first_mut() {
                        *b ^= 0x01;
                    }
                    Expect::BadTag
                } else {
                    Expect::Ok
                };
                self.op(
                    &format!("keys/{key}/decrypt"),
                    xks::decrypt_body_for(xks::KMS_KEY_ARN, &sealed, aad.as_deref()),
                    expect,
                )?
            }
            Scenario::Metadata => self.op(
                &format!("keys/{key}/metadata"),
                xks::metadata_body(),
                Expect::Ok,
            )?,
            Scenario::Health => self.op("health", xks::health_body(), Expect::Ok)?,
            _ => return Err(format!("{} is not an XKS scenario", scenario.as_str())),
        };
        self.probe(client, &op)
            .await
            .map_err(|e| format!("probe request: {e}"))?;
        Ok(op)
    }

    fn op(&self, suffix: &str, body: Vec<u8>, expect: Expect) -> Result<Operation, String> {
        let path = format!("{}/kms/xks/v1/{suffix}", self.prefix);
        Operation::new(
            path,
            OpBody::Template(BodyTemplate::new(body)?),
            OpAuth::SigV4,
            expect,
        )
    }

    /// A Cloud EKM wrap or unwrap, as Cloud KMS sends it for a customer's request (reason
    /// `CUSTOMER_INITIATED_ACCESS`). Unwrap scenarios unwrap one blob wrapped through the server.
    async fn gcp_operation(
        &self,
        client: &mut Connection,
        scenario: Scenario,
        opts: &BenchOptions,
    ) -> Result<Operation, String> {
        if let Err(e) = &self.signer {
            return Err(format!("token signer: {e}"));
        }
        let g = &self.gcp;
        let plaintext = pattern(opts.plaintext_size, 0);
        let aad = (opts.aad_size > 0).then(|| pattern(opts.aad_size, 7));
        let context = AdditionalContext::customer_initiated();
        // One token per scenario for the cached variants (and for the setup wrap), as a caller
        // that reuses its token until it expires.
        let cached =
            bearer(&self.mint(None).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let auth = if scenario.fresh_token() {
            OpAuth::FreshBearer
        } else {
            OpAuth::Bearer(cached.clone())
        };
        let wrap = |auth| {
            self.gcp_op(
                GcpOp::Wrap,
                gcp::wrap_body(&g.key_path, &plaintext, aad.as_deref(), Some(&context)),
                auth,
            )
        };
        let op = match scenario {
            Scenario::GcpWrap | Scenario::GcpWrapFresh => wrap(auth)?,
            _ => {
                let resp = self
                    .probe(client, &wrap(OpAuth::Bearer(cached))?)
                    .await
                    .map_err(|e| format!("wrapping the test blob: {e}"))?;
                let blob = gcp::parse_wrap_response(&resp.body)
                    .map_err(|e| format!("wrap response: {e}"))?;
                self.gcp_op(
                    GcpOp::Unwrap,
                    gcp::unwrap_body(&g.key_path, &blob, aad.as_deref(), Some(&context)),
                    auth,
                )?
            }
        };
        self.probe(client, &op)
            .await
            .map_err(|e| format!("probe request: {e}"))?;
        Ok(op)
    }

    fn gcp_op(&self, op: GcpOp, body: Vec<u8>, auth: OpAuth) -> Result<Operation, String> {
        let path = gcp::key_url_path(&self.gcp.prefix, &self.gcp.key_path, op);
        Operation::new(path, OpBody::Fixed(Bytes::from(body)), auth, Expect::Ok)
    }

    /// An Azure `wrapkey` of a [`AZURE_DEK_LEN`]-byte key, or an `unwrapkey` of one value wrapped
    /// through the server first. The unwrap probe must give the key back: a 200 with other bytes
    /// is a broken server, said once here rather than counted as successes.
    async fn azure_operation(
        &self,
        client: &mut Connection,
        scenario: Scenario,
        az: &AzureOptions,
    ) -> Result<Operation, String> {
        let dek = pattern(AZURE_DEK_LEN, 0);
        let wrap = self.azure_op("wrapkey", az, &dek)?;
        if scenario == Scenario::AzureWrap {
            self.probe(client, &wrap)
                .await
                .map_err(|e| format!("probe request: {e}"))?;
            return Ok(wrap);
        }
        let resp = self
            .probe(client, &wrap)
            .await
            .map_err(|e| format!("wrapping the test key: {e}"))?;
        let wrapped = azure_value(&resp.body).map_err(|e| format!("wrapkey response: {e}"))?;
        let unwrap = self.azure_op("unwrapkey", az, &wrapped)?;
        let resp = self
            .probe(client, &unwrap)
            .await
            .map_err(|e| format!("probe request: {e}"))?;
        let unwrapped = azure_value(&resp.body).map_err(|e| format!("unwrapkey response: {e}"))?;
        if unwrapped != dek {
            return Err("unwrapkey answered 200 with other bytes than were wrapped".to_owned());
        }
        Ok(unwrap)
    }

    /// `POST <prefix>/<key>/<op>?api-version=…` with `value` (base64url, no padding) under the
    /// scenario's algorithm; no credential but the connection's client certificate.
    fn azure_op(&self, op: &str, az: &AzureOptions, value: &[u8]) -> Result<Operation, String> {
        let path = format!(
            "{}/{}/{op}?api-version={AZURE_API_VERSION}",
            self.prefix, az.key
        );
        let body = serde_json::json!({
            "request_context": {
                // Rewritten per request (the template's slot); distinct from the correlation id
                // so the slot is found unambiguously.
                "request_id": "00000000-0000-4000-8000-000000000000",
                "correlation_id": format!("ekm-bench-{}", std::process::id()),
                "pool_name": AZURE_POOL,
            },
            "alg": az.alg.name(),
            "value": URL_SAFE_NO_PAD.encode(value),
        });
        let body = serde_json::to_vec(&body).map_err(|e| format!("request body: {e}"))?;
        Operation::new(
            path,
            OpBody::Template(BodyTemplate::at(body, AZURE_REQUEST_ID)?),
            OpAuth::MutualTls,
            Expect::Ok,
        )
    }
}

/// The decoded `value` of an Azure `wrapkey`/`unwrapkey` answer.
fn azure_value(body: &[u8]) -> Result<Vec<u8>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let value = v
        .get("value")
        .and_then(serde_json::Value::as_str)
        .ok_or("no \"value\" field")?;
    URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|e| format!("value is not base64url without padding: {e}"))
}

/// `Bearer <token>` as a sensitive header value (never printed by `Debug`).
fn bearer(token: &str) -> Result<HeaderValue, ClientError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ClientError::Token("the token is not a valid header value".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// `len` deterministic bytes (content does not matter to AES-GCM's cost).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One call, prepared once per scenario.
pub struct Operation {
    path: String,
    uri: http::Uri,
    body: OpBody,
    auth: OpAuth,
    expect: Expect,
    /// This process's id, read once (for fresh token ids).
    pid: u32,
}

impl Operation {
    fn new(path: String, body: OpBody, auth: OpAuth, expect: Expect) -> Result<Self, String> {
        let uri: http::Uri = path
            .parse()
            .map_err(|e| format!("request path {path:?}: {e}"))?;
        Ok(Self {
            path,
            uri,
            body,
            auth,
            expect,
            pid: std::process::id(),
        })
    }
}

/// The body of each request.
enum OpBody {
    /// A body whose request id (XKS `kmsRequestId`, Azure `request_id`) is rewritten per request.
    Template(BodyTemplate),
    /// The same bytes every time (Cloud EKM has no request id in the body).
    Fixed(Bytes),
}

/// How each request proves who sends it.
enum OpAuth {
    /// A SigV4 signature made at send time.
    SigV4,
    /// This `Authorization: Bearer` value every time.
    Bearer(HeaderValue),
    /// A token minted at send time, with a unique `jti`.
    FreshBearer,
    /// Nothing in the request: the connection's client certificate is the credential (Azure).
    MutualTls,
}

/// Which answers count as success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// 200.
    Ok,
    /// 400 with `InvalidCiphertextException` (the bad-tag scenario).
    BadTag,
}

impl Expect {
    /// Whether `resp` is the expected answer.
    pub fn accepts(self, resp: &Response) -> bool {
        match self {
            Expect::Ok => resp.status == 200,
            // A byte search, not a JSON parse: the client's CPU is shared with the server.
            Expect::BadTag => {
                resp.status == 400 && contains(&resp.body, b"InvalidCiphertextException")
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `HTTP <status> <errorName | google.rpc.Status | Azure code: message | body start>`, for the
/// first unexpected answer.
fn describe(resp: &Response) -> String {
    if let Some(name) = resp.error_name() {
        return format!("HTTP {} {name}", resp.status);
    }
    if let Some((code, message)) = azure_error(&resp.body) {
        return format!("HTTP {} {code}: {message}", resp.status);
    }
    match resp.rpc_status() {
        Some(s) => match s.reason() {
            Some(reason) => format!("HTTP {} {} ({reason})", resp.status, s.status),
            None => format!("HTTP {} {}", resp.status, s.status),
        },
        None => {
            let body = String::from_utf8_lossy(&resp.body[..resp.body.len().min(160)]).into_owned();
            format!("HTTP {} {body:?}", resp.status)
        }
    }
}

/// `code` and `message` of an Azure error body (`{"code": …, "message": …}`), if it is one.
fn azure_error(body: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |field: &str| v.get(field)?.as_str().map(str::to_owned);
    Some((text("code")?, text("message")?))
}

/// A request body with a 36-character request id slot rewritten per request.
#[derive(Clone, Debug)]
pub struct BodyTemplate {
    bytes: Vec<u8>,
    id_at: usize,
    /// This process's id, read once: `std::process::id()` is a system call every time.
    pid: u32,
}

/// Length of a UUID-shaped request id.
const ID_LEN: usize = 36;

impl BodyTemplate {
    /// Find the `kmsRequestId` the XKS body builder put in `body`.
    pub fn new(body: Vec<u8>) -> Result<Self, String> {
        Self::at(body, "/requestMetadata/kmsRequestId")
    }

    /// Find the 36-character id at the JSON `pointer` of `body`; its bytes must occur once, so
    /// the slot rewritten is the id and nothing else.
    pub fn at(body: Vec<u8>, pointer: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("request body: {e}"))?;
        let id = v
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .filter(|id| id.len() == ID_LEN)
            .ok_or_else(|| format!("request body has no 36-character id at {pointer}"))?;
        let mut found = body
            .windows(ID_LEN)
            .enumerate()
            .filter(|(_, w)| *w == id.as_bytes())
            .map(|(i, _)| i);
        let id_at = found
            .next()
            .ok_or_else(|| format!("the id at {pointer} is not in the body bytes"))?;
        if found.next().is_some() {
            return Err(format!("the id at {pointer} occurs twice in the body"));
        }
        Ok(Self {
            bytes: body,
            id_at,
            pid: std::process::id(),
        })
    }

    /// The body with a fresh request id: one allocation and one copy.
    pub fn render(&self, nonce: u16, worker: u16, seq: u64) -> Bytes {
        let mut v = self.bytes.clone();
        if let Some(slot) = v.get_mut(self.id_at..self.id_at + ID_LEN) {
            write_request_id(slot, self.pid, nonce, worker, seq);
        }
        Bytes::from(v)
    }
}

/// Write a UUID-shaped id `pppppppp-wwww-4nnn-8sss-ssssssssssss` (process, worker, run nonce,
/// sequence): unique across the run, and across concurrent bench processes by pid.
pub fn write_request_id(dst: &mut [u8], pid: u32, nonce: u16, worker: u16, seq: u64) {
    if dst.len() != ID_LEN {
        return;
    }
    hex_into(&mut dst[0..8], u64::from(pid));
    dst[8] = b'-';
    hex_into(&mut dst[9..13], u64::from(worker));
    dst[13] = b'-';
    dst[14] = b'4';
    hex_into(&mut dst[15..18], u64::from(nonce));
    dst[18] = b'-';
    dst[19] = b'8';
    hex_into(&mut dst[20..23], seq >> 48);
    dst[23] = b'-';
    hex_into(&mut dst[24..36], seq);
}

/// The low `4 × dst.len()` bits of `value` as lowercase hex.
fn hex_into(dst: &mut [u8], mut value: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in dst.iter_mut().rev() {
        *b = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// Where a worker gets its connection for the next request.
enum Conns {
    /// Connections of its own, used in turn (`--connections` ≥ concurrency).
    Own {
        slots: Vec<Option<Connection>>,
        next: usize,
    },
    /// A pool shared with other workers (`--connections` < concurrency).
    Shared(Arc<Pool>),
}

/// FIFO pool of connection slots; `None` is a slot whose connection broke and must be reopened.
struct Pool {
    tx: mpsc::UnboundedSender<Option<Connection>>,
    rx: Mutex<mpsc::UnboundedReceiver<Option<Connection>>>,
}

impl Conns {
    async fn take(&mut self) -> Option<Connection> {
        match self {
            Conns::Own { slots, next } => slots.get_mut(*next).and_then(Option::take),
            Conns::Shared(pool) => pool.rx.lock().await.recv().await.flatten(),
        }
    }

    fn give(&mut self, slot: Option<Connection>) {
        match self {
            Conns::Own { slots, next } => {
                if let Some(s) = slots.get_mut(*next) {
                    *s = slot;
                }
                *next = (*next + 1) % slots.len().max(1);
            }
            Conns::Shared(pool) => {
                let _ = pool.tx.send(slot);
            }
        }
    }
}

/// Short label of a client failure, for the error counts.
pub fn error_kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::Config(_) => "config",
        ClientError::Connect(_) => "connect",
        ClientError::Tls(_) => "tls",
        ClientError::HandshakeIo(_) => "tls-io",
        ClientError::Http(_) => "http",
        ClientError::Sign(_) => "sign",
        ClientError::Token(_) => "token",
        ClientError::Request(_) => "request",
    }
}

/// Open `n` connections, at most [`CONNECT_PARALLELISM`] at a time. Returns those that opened and
/// the failures.
pub async fn open_connections(
    target: &Arc<HttpTarget>,
    n: usize,
) -> (Vec<Connection>, Vec<ClientError>) {
    let mut open = Vec::with_capacity(n);
    let mut failed = Vec::new();
    let mut set = JoinSet::new();
    let mut started = 0;
    while started < n || !set.is_empty() {
        while started < n && set.len() < CONNECT_PARALLELISM {
            let t = Arc::clone(target);
            // One request each, so they are keep-alive connections between requests (as a KMS
            // connection is) rather than connections that never asked for anything, which the
            // server closes after header_read_timeout.
            set.spawn(async move {
                let mut c = t.connect().await?;
                t.ping(&mut c).await?;
                Ok(c)
            });
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(c))) => open.push(c),
            Some(Ok(Err(e))) => failed.push(e),
            Some(Err(e)) => failed.push(ClientError::Config(format!("connect task: {e}"))),
            None => break,
        }
    }
    (open, failed)
}

/// Open the connections, then start `concurrency` workers that send `op` until the window ends:
/// the warm-up starts now and the window right after it.
#[allow(clippy::too_many_arguments)] // plain values of one lane; a struct would only rename them
pub async fn start_lane(
    target: &Arc<HttpTarget>,
    op: Arc<Operation>,
    concurrency: usize,
    connections: usize,
    request_timeout: Duration,
    nonce: u16,
    warmup: Duration,
    duration: Duration,
) -> Result<RunningLane, BenchError> {
    let (clients, failed) = open_connections(target, connections).await;
    if let Some(e) = failed.first() {
        return Err(BenchError::Connect(format!(
            "{} of {connections} connections failed: {e}",
            failed.len()
        )));
    }
    // Deal connections out: with at least one per worker, each worker owns its own (no sharing on
    // the hot path); with fewer, workers queue for them.
    let mut per_worker: Vec<Conns> = Vec::with_capacity(concurrency);
    if connections >= concurrency {
        let mut slots: Vec<Vec<Option<Connection>>> =
            (0..concurrency).map(|_| Vec::new()).collect();
        for (i, c) in clients.into_iter().enumerate() {
            if let Some(s) = slots.get_mut(i % concurrency) {
                s.push(Some(c));
            }
        }
        per_worker.extend(slots.into_iter().map(|slots| Conns::Own { slots, next: 0 }));
    } else {
        let (tx, rx) = mpsc::unbounded_channel();
        for c in clients {
            let _ = tx.send(Some(c));
        }
        let pool = Arc::new(Pool {
            tx,
            rx: Mutex::new(rx),
        });
        per_worker.extend((0..concurrency).map(|_| Conns::Shared(Arc::clone(&pool))));
    }

    let window = Window::after(warmup, duration);
    let mut workers = JoinSet::new();
    for (id, conns) in per_worker.into_iter().enumerate() {
        let stats = LaneStats::new()?;
        let (target, op) = (Arc::clone(target), Arc::clone(&op));
        let id = u16::try_from(id).unwrap_or(u16::MAX);
        workers.spawn(worker(
            target,
            op,
            conns,
            stats,
            id,
            nonce,
            window,
            request_timeout,
        ));
    }
    Ok(RunningLane { window, workers })
}

#[allow(clippy::too_many_arguments)] // a task entry point: every argument is moved in once
async fn worker(
    target: Arc<HttpTarget>,
    op: Arc<Operation>,
    mut conns: Conns,
    mut stats: LaneStats,
    id: u16,
    nonce: u16,
    window: Window,
    request_timeout: Duration,
) -> LaneStats {
    let mut seq: u64 = 0;
    while Instant::now() < window.end {
        let mut client = match conns.take().await {
            Some(c) => c,
            None => match target.connect().await {
                Ok(c) => {
                    stats.record_reconnect();
                    c
                }
                Err(e) => {
                    if window.contains(Instant::now()) {
                        stats.record_kind(error_kind(&e), || format!("reconnect: {e}"));
                    }
                    conns.give(None);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            },
        };
        seq += 1;
        let req = match target.request(&op, nonce, id, seq) {
            Ok(r) => r,
            Err(e) => {
                // Signing failures do not go away by retrying: stop this worker, say why.
                stats.record_kind(error_kind(&e), || e.to_string());
                conns.give(Some(client));
                break;
            }
        };
        let sent = Instant::now();
        let result = tokio::time::timeout(request_timeout, client.send_raw(req)).await;
        let done = Instant::now();
        // Only answers that arrive inside the window count (warm-up and overrun do not).
        let counted = window.contains(done);
        let reusable = match result {
            Ok(Ok(resp)) => {
                if counted {
                    if op.expect.accepts(&resp) {
                        stats.record_ok(done - sent);
                    } else {
                        stats.record_status(resp.status, || describe(&resp));
                    }
                }
                // The server may close after an answer (`Connection: close`); reopen then.
                !client.is_closed()
            }
            Ok(Err(e)) => {
                if counted {
                    stats.record_kind(error_kind(&e), || e.to_string());
                }
                // A failure can return without waiting; yield so a single-threaded runtime still
                // runs the sampler and the other workers.
                tokio::task::yield_now().await;
                !client.is_closed()
            }
            Err(_) => {
                if counted {
                    stats.record_kind("timeout", || {
                        format!("no answer within {request_timeout:?}")
                    });
                }
                // A request is still in flight on this HTTP/1.1 connection: it cannot be reused.
                false
            }
        };
        conns.give(reusable.then_some(client));
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::gcp::TokenClaims;
    use crate::dev::profile;

    fn response(status: u16, body: &'static str) -> Response {
        Response {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn request_ids_are_uuid_shaped_and_distinct() {
        let t = BodyTemplate::new(xks::encrypt_body("arn", b"pt", None, false)).unwrap();
        let a = t.render(3, 7, 1);
        let b = t.render(3, 7, 2);
        assert_ne!(a, b);
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let id = v["requestMetadata"]["kmsRequestId"].as_str().unwrap();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![8, 4, 4, 4, 12]
        );
        assert_eq!(parts[1], "0007");
        assert_eq!(parts[2], "4003");
        assert_eq!(parts[4], "000000000001");
        assert!(id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        // The rest of the body is untouched.
        assert_eq!(v["plaintext"], "cHQ=");
        assert_eq!(a.len(), t.bytes.len());
    }

    #[test]
    fn every_body_has_an_id_slot() {
        for body in [
            xks::health_body(),
            xks::metadata_body(),
            xks::decrypt_body("arn", b"c", b"iv", b"tag", Some(b"aad"), None),
        ] {
            assert!(BodyTemplate::new(body).is_ok());
        }
        assert!(BodyTemplate::new(b"{}".to_vec()).is_err());
    }

    #[test]
    fn expectations() {
        assert!(Expect::Ok.accepts(&response(200, "{}")));
        assert!(!Expect::Ok.accepts(&response(400, "{}")));
        let bad_tag = response(
            400,
            r#"{"errorName":"InvalidCiphertextException","errorMessage":"x"}"#,
        );
        assert!(Expect::BadTag.accepts(&bad_tag));
        assert!(!Expect::BadTag.accepts(&response(400, r#"{"errorName":"ValidationException"}"#)));
        assert!(!Expect::BadTag.accepts(&response(200, "InvalidCiphertextException")));
        assert_eq!(
            describe(&response(403, r#"{"errorName":"AccessDeniedException"}"#)),
            "HTTP 403 AccessDeniedException"
        );
        assert_eq!(
            describe(&response(502, "bad gateway")),
            "HTTP 502 \"bad gateway\""
        );
        assert_eq!(
            describe(&response(
                401,
                r#"{"code":16,"status":"UNAUTHENTICATED","message":"x","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"EXPIRED"}]}"#
            )),
            "HTTP 401 UNAUTHENTICATED (EXPIRED)"
        );
    }

    #[test]
    fn fresh_tokens_are_distinct_and_cached_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        crate::dev::jwt::ensure_dev_signer(dir.path()).unwrap();
        let signer = dir.path().join(crate::dev::jwt::SIGNER_FILE);
        let opts = BenchOptions::from_cli([
            "--url",
            "http://127.0.0.1:1/ks",
            "--scenario",
            "gcp-wrap-fresh",
            "--gcp-signer",
            signer.to_str().unwrap(),
        ])
        .unwrap();
        let target = HttpTarget::new(&opts, "127.0.0.1:1".parse().unwrap()).unwrap();
        let auth_of = |op: &Operation, seq| {
            let req = target.request(op, 1, 2, seq).unwrap();
            assert_eq!(req.uri().path(), "/gcp/v0/keys/dev-aes-1:wrap");
            let v = req.headers()[AUTHORIZATION].clone();
            assert!(v.is_sensitive());
            v.to_str().unwrap().to_owned()
        };
        let fresh = target
            .gcp_op(GcpOp::Wrap, b"{}".to_vec(), OpAuth::FreshBearer)
            .unwrap();
        let (a, b) = (auth_of(&fresh, 1), auth_of(&fresh, 2));
        assert_ne!(a, b);
        let claims = |header: &str| -> TokenClaims {
            let token = header.strip_prefix("Bearer ").unwrap();
            let payload = token.split('.').nth(1).unwrap();
            use base64::Engine as _;
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap();
            serde_json::from_slice(&json).unwrap()
        };
        let c = claims(&a);
        assert_eq!(
            c.jti.as_deref(),
            Some(&*format!("{:x}-1-2-1", std::process::id()))
        );
        assert_eq!(c.email.as_deref(), Some(profile::GCP_SERVICE_ACCOUNT));
        assert_eq!(c.aud, profile::GCP_AUDIENCE);
        assert_eq!(c.iss, profile::GCP_ISSUER);

        let token = target.mint(None).unwrap();
        let cached = target
            .gcp_op(
                GcpOp::Wrap,
                b"{}".to_vec(),
                OpAuth::Bearer(bearer(&token).unwrap()),
            )
            .unwrap();
        assert_eq!(auth_of(&cached, 1), auth_of(&cached, 2));
    }

    #[test]
    fn azure_requests_carry_a_fresh_request_id_and_no_credential() {
        let dir = tempfile::tempdir().unwrap();
        crate::dev::certs::ensure_dev_pki(dir.path(), &["localhost"]).unwrap();
        let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let opts = BenchOptions::from_cli([
            "--scenario",
            "azure-wrap",
            "--ca",
            &file("ca.pem"),
            "--client-cert",
            &file("client.pem"),
            "--client-key",
            &file("client-key.pem"),
            "--azure-alg",
            "A256KWP",
        ])
        .unwrap();
        let target = HttpTarget::azure(&opts, "127.0.0.1:1".parse().unwrap()).unwrap();
        let dek = pattern(AZURE_DEK_LEN, 0);
        let op = target.azure_op("wrapkey", &opts.azure, &dek).unwrap();
        let req = target.request(&op, 1, 2, 3).unwrap();
        assert_eq!(
            req.uri().path_and_query().unwrap().as_str(),
            "/azure/dev-aes-kek-1/wrapkey?api-version=0.1-preview"
        );
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.headers()[HOST], "localhost:9443");
        assert!(req.headers().get(AUTHORIZATION).is_none());
        let OpBody::Template(template) = &op.body else {
            panic!("the request id is rewritten per request");
        };
        let body = |seq| -> serde_json::Value {
            serde_json::from_slice(&template.render(1, 2, seq)).unwrap()
        };
        let (a, b) = (body(1), body(2));
        let id = |v: &serde_json::Value| v["request_context"]["request_id"].clone();
        assert_ne!(id(&a), id(&b));
        assert_eq!(id(&a).as_str().unwrap().len(), ID_LEN);
        assert_eq!(
            a["request_context"]["correlation_id"],
            b["request_context"]["correlation_id"]
        );
        assert_eq!(a["request_context"]["pool_name"], AZURE_POOL);
        assert_eq!(a["alg"], "A256KWP");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(a["value"].as_str().unwrap())
                .unwrap(),
            dek
        );
        assert_eq!(azure_value(br#"{"value":"AAEC"}"#).unwrap(), vec![0, 1, 2]);
        assert!(azure_value(br#"{"value":"AAEC=="}"#).is_err());
        assert!(azure_value(br#"{"code":"Forbidden"}"#).is_err());
        assert_eq!(
            describe(&response(
                403,
                r#"{"code":"Forbidden","message":"key is disabled"}"#
            )),
            "HTTP 403 Forbidden: key is disabled"
        );
        // A request id that occurs twice cannot be a slot.
        let twice = format!(
            r#"{{"request_context":{{"request_id":"{id}","correlation_id":"{id}"}}}}"#,
            id = "00000000-0000-4000-8000-000000000000"
        );
        assert!(BodyTemplate::at(twice.into_bytes(), AZURE_REQUEST_ID).is_err());
    }

    #[test]
    fn hex() {
        let mut b = [0u8; 4];
        hex_into(&mut b, 0x1_abcd);
        assert_eq!(&b, b"abcd");
        assert_eq!(pattern(3, 1), vec![1, 32, 63]);
    }
}
