#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! `TestProxy`: the real server, started in-process on 127.0.0.1:0 with real TLS (a fresh CA,
//! server and client certificates per proxy) against a fresh SoftHSMv2 token made by the same
//! bootstrap code `ekm-proxy dev init` runs. The configuration goes through the real config parser.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use ekm_proxy::app::{self, Running};
use ekm_proxy::client::{ClientTls, XksClient, XksClientConfig};
use ekm_proxy::dev::certs::{Authority, IssuedCert, Validity};
use ekm_proxy::dev::profile;
use ekm_proxy::secret::SecretString;

use super::softhsm::TestToken;

/// The dev-profile SigV4 credential every test proxy accepts.
pub const ACCESS_KEY_ID: &str = profile::ACCESS_KEY_ID;
/// Its secret.
pub const SECRET: &str = profile::SECRET;
/// A second credential (rotation).
pub const ACCESS_KEY_ID_2: &str = "SECONDXKSACCESSKEYID2345";
/// Its secret.
pub const SECRET_2: &str = "secondXksSecretAccessKeyForRotationTests0123456789";
/// Key store prefix.
pub const PREFIX: &str = "/dev-keystore";
/// Client certificate subject accepted on the mTLS listener.
pub const CLIENT_SUBJECT: &str = profile::CLIENT_SUBJECT;

/// Knobs for one test proxy; `Default` is the dev profile.
#[derive(Default, Clone)]
pub struct ProxyOptions {
    /// Plain `key = value` lines added to the default key store (e.g. `aad_framing = "aws-sample"`).
    pub key_store_keys: String,
    /// Tables appended after the default key store (e.g. `[[xks.key_store.rule]]` blocks, more key stores).
    pub tables: String,
    /// Lines added to `[hsm]` (a `module = ...` line replaces the token's SoftHSM module).
    pub hsm_keys: String,
    /// Lines added to `[server]`.
    pub server_keys: String,
    /// Lines added to `[security]`.
    pub security_keys: String,
    /// Lines added to `[logging]` (e.g. `audit_file = "…"`).
    pub logging_keys: String,
    /// Also start a plain-HTTP listener named `plain`.
    pub plain_http: bool,
    /// TOML appended last: the `[gcp]` section and its sub-tables (see [`GcpSection`]), or empty.
    pub gcp: String,
}

/// Where the test PKI lives.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Authority,
    pub ca_pem: PathBuf,
    pub server_pem: PathBuf,
    pub server_key: PathBuf,
    pub client: IssuedCert,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Authority::new("ekm-proxy test CA").expect("CA");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert");
        let client = ca
            .issue_client(CLIENT_SUBJECT, Validity::Current)
            .expect("client cert");
        let ca_pem = dir.path().join("ca.pem");
        let server_pem = dir.path().join("server.pem");
        let server_key = dir.path().join("server-key.pem");
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
        std::fs::write(&server_pem, &server.cert_pem).unwrap();
        std::fs::write(&server_key, server.key_pem.as_bytes()).unwrap();
        Self {
            dir,
            ca,
            ca_pem,
            server_pem,
            server_key,
            client,
        }
    }
}

/// A running proxy and everything it was made from.
pub struct TestProxy {
    pub running: Option<Running>,
    pub token: TestToken,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub options: ProxyOptions,
}

impl TestProxy {
    /// The dev profile on a fresh token.
    pub async fn start() -> Self {
        Self::start_with(ProxyOptions::default()).await
    }

    /// A proxy with `options` on a fresh token.
    pub async fn start_with(options: ProxyOptions) -> Self {
        let token = TestToken::new();
        Self::start_on(token, options).await
    }

    /// A proxy on an existing token.
    pub async fn start_on(token: TestToken, options: ProxyOptions) -> Self {
        Self::start_on_pki(token, Pki::new(), options).await
    }

    /// A proxy on an existing token with a PKI made beforehand (for options that name its files,
    /// e.g. another mTLS listener in `tables`).
    pub async fn start_on_pki(token: TestToken, pki: Pki, options: ProxyOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("ekm-proxy.toml");
        std::fs::write(
            &config_path,
            config_text(&token, &pki, &options, dir.path()),
        )
        .unwrap();
        let settings = match ekm_proxy::config::load(&config_path) {
            Ok(s) => s,
            Err(e) => panic!("test config rejected: {e}"),
        };
        let running = app::start(settings)
            .await
            .unwrap_or_else(|e| panic!("proxy did not start: {e}"));
        Self {
            running: Some(running),
            token,
            pki,
            dir,
            config_path,
            options,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub fn addr(&self, listener: &str) -> std::net::SocketAddr {
        self.running()
            .addr(listener)
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    /// Client config for a listener (`tls`, `mtls` or `plain`); mTLS presents the good client cert.
    pub fn client_config(&self, listener: &str) -> XksClientConfig {
        let addr = self.addr(listener);
        let tls = match listener {
            "plain" => None,
            _ => Some(ClientTls {
                ca_pem: self.pki.ca.cert_pem().into_bytes(),
                client_cert_pem: (listener == "mtls")
                    .then(|| self.pki.client.cert_pem.clone().into_bytes()),
                client_key_pem: (listener == "mtls")
                    .then(|| self.pki.client.key_pem.as_bytes().to_vec()),
                server_name: "localhost".into(),
            }),
        };
        XksClientConfig {
            addr,
            tls,
            host: format!("localhost:{}", addr.port()),
            prefix: PREFIX.into(),
            access_key_id: ACCESS_KEY_ID.into(),
            secret: SecretString::from(SECRET),
            region: "us-east-1".into(),
            service: "kms-xks-proxy".into(),
        }
    }

    /// A connected client on `listener`.
    pub async fn client(&self, listener: &str) -> XksClient {
        XksClient::connect(Arc::new(self.client_config(listener)))
            .await
            .expect("connect")
    }

    /// A client on the TLS listener.
    pub async fn tls_client(&self) -> XksClient {
        self.client("tls").await
    }

    /// GET a path on the admin listener; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let addr = self.running().admin_addr().expect("admin listener");
        let mut cfg = self.client_config("tls");
        cfg.addr = addr;
        cfg.tls = None;
        cfg.host = addr.to_string();
        let mut client = XksClient::connect(Arc::new(cfg))
            .await
            .expect("admin connect");
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = client.send_raw(req).await.expect("admin request");
        (
            resp.status,
            String::from_utf8_lossy(&resp.body).into_owned(),
        )
    }

    /// The value of a metric line (exact series text before the value), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(str::to_owned)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Rewrite the config file with other options and reload it in place (like SIGHUP).
    pub fn reload_with(&mut self, options: ProxyOptions) {
        std::fs::write(
            &self.config_path,
            config_text(&self.token, &self.pki, &options, self.dir.path()),
        )
        .unwrap();
        let settings = ekm_proxy::config::load(&self.config_path)
            .unwrap_or_else(|e| panic!("reload config: {e}"));
        self.running().reload(&settings).expect("reload");
        self.options = options;
    }

    /// Stop and drain.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(r) = self.running.as_ref() {
            // Stop accepting; the runtime of the test ends the tasks.
            r.shutdown_handle().trigger();
            r.service().backend().shutdown();
        }
    }
}

fn config_text(token: &TestToken, pki: &Pki, o: &ProxyOptions, dir: &std::path::Path) -> String {
    let mut t = String::new();
    // A test's own request deadline replaces the default one (TOML refuses a key set twice).
    let deadline = if o.server_keys.contains("request_timeout_ms") {
        ""
    } else {
        "request_timeout_ms = 5000\n"
    };
    writeln!(t, "[server]\n{deadline}{}", o.server_keys).unwrap();
    writeln!(
        t,
        r#"[[listener]]
name = "tls"
address = "127.0.0.1:0"
[listener.tls]
certificate = "{server}"
private_key = "{key}"

[[listener]]
name = "mtls"
address = "127.0.0.1:0"
[listener.tls]
certificate = "{server}"
private_key = "{key}"
[listener.tls.client_auth]
ca_bundle = "{ca}"
allowed_subjects = ["{CLIENT_SUBJECT}"]
"#,
        server = pki.server_pem.display(),
        key = pki.server_key.display(),
        ca = pki.ca_pem.display(),
    )
    .unwrap();
    if o.plain_http {
        writeln!(
            t,
            "[[listener]]\nname = \"plain\"\naddress = \"127.0.0.1:0\"\nplain_http = true\n"
        )
        .unwrap();
    }
    writeln!(
        t,
        r#"[admin]
address = "127.0.0.1:0"

[hsm]
{module}token_label = "{label}"
user_pin = "{pin}"
{hsm_defaults}{hsm}

[health]
key = "ekm-health-check"
interval_secs = 3600
max_age_secs = 1

[security]
kill_switch_file = "{kill}"
{security}

[logging]
level = "warn"
{logging}

[[xks.key_store]]
name = "dev"
path_prefix = "{PREFIX}"
regions = ["us-east-1"]
keys = ["dev-aes-1", "dev-aes-encrypt-only", "dev-aes-decrypt-only", "dev-aes-no-usage", "extractable-*", "dup-*", "other-*"]
{ks}
[[xks.key_store.credential]]
access_key_id = "{ACCESS_KEY_ID}"
secret = "{SECRET}"
[[xks.key_store.credential]]
access_key_id = "{ACCESS_KEY_ID_2}"
secret = "{SECRET_2}"

{tables}
{gcp}
"#,
        module = if hsm_sets(&o.hsm_keys, "module") {
            String::new()
        } else {
            format!("module = \"{}\"\n", token.module.display())
        },
        label = token.label,
        pin = token.user_pin,
        hsm = o.hsm_keys,
        hsm_defaults = hsm_defaults(&o.hsm_keys),
        kill = dir.join("KILL").display(),
        security = o.security_keys,
        logging = o.logging_keys,
        ks = o.key_store_keys,
        tables = o.tables,
        gcp = o.gcp,
    )
    .unwrap();
    t
}

/// `[hsm]` defaults that `hsm_keys` does not set itself (TOML forbids a duplicate key).
/// Whether the `[hsm]` lines a test gave set `key`.
fn hsm_sets(hsm_keys: &str, key: &str) -> bool {
    hsm_keys
        .lines()
        .any(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
}

fn hsm_defaults(hsm_keys: &str) -> String {
    let set = |key: &str| hsm_sets(hsm_keys, key);
    // As in the dev profile (SoftHSM): keys are used through per-session copies.
    [
        ("workers", "2"),
        ("op_timeout_ms", "3000"),
        ("session_key_copies", "true"),
    ]
    .iter()
    .filter(|(key, _)| !set(key))
    .map(|(key, value)| format!("{key} = {value}\n"))
    .collect()
}

// ---------------------------------------------------------------------------------------------
// The `[gcp]` section (Google Cloud EKM front end)
// ---------------------------------------------------------------------------------------------

/// Path prefix of the GCP key URIs on test proxies.
pub const GCP_PREFIX: &str = "/gcp/v0/keys";

/// Where the test issuer's JWKS comes from.
#[derive(Clone, Debug)]
pub enum GcpJwks {
    /// An HTTPS URL and the CA file that verifies its certificate.
    Url { url: String, ca_file: PathBuf },
    /// A JWKS file on disk.
    File(PathBuf),
}

/// A `[gcp]` section with one issuer named `test`; every field is TOML text or a value rendered
/// into it. [`GcpSection::new`] gives the defaults the GCP tests build on.
#[derive(Clone, Debug)]
pub struct GcpSection {
    pub jwks: GcpJwks,
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// The issuer's allowed `email` globs.
    pub service_accounts: Vec<String>,
    /// More lines in `[[gcp.issuer]]` (e.g. `jwks_refresh_min_interval_secs = 1`).
    pub issuer_keys: String,
    /// More lines in `[gcp]` (e.g. `max_plaintext_bytes = 64`).
    pub section_keys: String,
    /// The lines of `[gcp.access_reasons]`.
    pub access_reasons: String,
    /// The `[[gcp.key]]` tables (see [`gcp_key`]).
    pub keys: String,
}

/// The default KAJ policy of the tests: the two reasons Google's own operations use, no special
/// case allowed except health checks.
pub const GCP_DEFAULT_REASONS: &str = r#"allow = ["CUSTOMER_INITIATED_ACCESS", "GOOGLE_INITIATED_SYSTEM_OPERATION"]
allow_absent = false
allow_unspecified = false
allow_unknown = false
allow_health_checks = true
"#;

impl GcpSection {
    /// Issuer `https://accounts.google.com` with audience [`super::jwks::AUDIENCE`], every
    /// `service-*@gcp-sa-ekms` agent allowed at the issuer, the default KAJ policy, and key path
    /// `k1` on HSM key `dev-aes-1` granted (wrap and unwrap) to [`super::jwks::SERVICE_ACCOUNT`].
    pub fn new(jwks: GcpJwks) -> Self {
        Self {
            jwks,
            issuers: vec![super::jwks::ISSUER.to_owned()],
            audiences: vec![super::jwks::AUDIENCE.to_owned()],
            service_accounts: vec!["service-*@gcp-sa-ekms.iam.gserviceaccount.com".to_owned()],
            issuer_keys: String::new(),
            section_keys: String::new(),
            access_reasons: GCP_DEFAULT_REASONS.to_owned(),
            keys: gcp_key("k1", "dev-aes-1", "", &[super::jwks::SERVICE_ACCOUNT]),
        }
    }

    /// Served by a running test JWKS server.
    pub fn with_server(server: &super::jwks::JwksServer) -> Self {
        Self::new(GcpJwks::Url {
            url: server.url.clone(),
            ca_file: server.ca_pem.clone(),
        })
    }

    pub fn render(&self) -> String {
        let list = |v: &[String]| {
            let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", items.join(", "))
        };
        let jwks = match &self.jwks {
            GcpJwks::Url { url, ca_file } => {
                format!(
                    "jwks_url = {url:?}\njwks_ca_file = {:?}",
                    ca_file.display().to_string()
                )
            }
            GcpJwks::File(path) => format!("jwks_file = {:?}", path.display().to_string()),
        };
        format!(
            r#"
[gcp]
path_prefix = "{GCP_PREFIX}"
{section}
[[gcp.issuer]]
name = "test"
issuers = {issuers}
{jwks}
audiences = {audiences}
algorithms = ["RS256"]
service_accounts = {sas}
{issuer}
[gcp.access_reasons]
{reasons}
{keys}
"#,
            section = self.section_keys,
            issuers = list(&self.issuers),
            audiences = list(&self.audiences),
            sas = list(&self.service_accounts),
            issuer = self.issuer_keys,
            reasons = self.access_reasons,
            keys = self.keys,
        )
    }

    /// Default proxy options with this section.
    pub fn options(&self) -> ProxyOptions {
        ProxyOptions {
            gcp: self.render(),
            ..Default::default()
        }
    }
}

/// A `[[gcp.key]]` table: `path` on HSM key `hsm_key`, `extra` lines (e.g. `enabled = false`,
/// `resource_names = [...]`, `previous_hsm_keys = [...]`), one grant named `grant` for
/// `service_accounts` (wrap and unwrap).
pub fn gcp_key(path: &str, hsm_key: &str, extra: &str, service_accounts: &[&str]) -> String {
    let sas: Vec<String> = service_accounts.iter().map(|s| format!("{s:?}")).collect();
    format!(
        r#"
[[gcp.key]]
path = "{path}"
hsm_key = "{hsm_key}"
{extra}
[[gcp.key.grant]]
name = "grant"
service_accounts = [{sas}]
operations = ["wrap", "unwrap"]
"#,
        sas = sas.join(", ")
    )
}
