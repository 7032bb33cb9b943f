//! The configuration file as serde sees it: every key of `config.example.toml`, with defaults.
//! Unknown keys are errors (a typo in a security setting must not be silently ignored).

use serde::Deserialize;

use super::secret_source::SecretSource;

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[server]`
    #[serde(default)]
    pub server: RawServer,
    /// `[[listener]]`
    #[serde(default)]
    pub listener: Vec<RawListener>,
    /// `[admin]`
    pub admin: Option<RawAdmin>,
    /// `[hsm]`
    pub hsm: Option<RawHsm>,
    /// `[health]`
    #[serde(default)]
    pub health: RawHealth,
    /// `[security]`
    #[serde(default)]
    pub security: RawSecurity,
    /// `[logging]`
    #[serde(default)]
    pub logging: RawLogging,
    /// `[xks]`
    #[serde(default)]
    pub xks: RawXks,
    /// `[gcp]`
    pub gcp: Option<RawGcp>,
    /// `[azure]`
    pub azure: Option<RawAzure>,
}

/// `[server]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Per-request deadline.
    pub request_timeout_ms: Option<u64>,
    /// Time allowed to send request headers.
    pub header_read_timeout_ms: Option<u64>,
    /// Time allowed for a TLS handshake.
    pub tls_handshake_timeout_ms: Option<u64>,
    /// Largest request body.
    pub max_body_bytes: Option<usize>,
    /// Most concurrent connections.
    pub max_connections: Option<usize>,
    /// Drain time on shutdown.
    pub shutdown_grace_ms: Option<u64>,
    /// Offer HTTP/2.
    pub http2: Option<bool>,
    /// Close a keep-alive connection with no request in flight after this long.
    pub idle_timeout_secs: Option<u64>,
    /// HTTP/2 PING interval on idle connections (0 = no pings).
    pub http2_keepalive_interval_secs: Option<u64>,
    /// Close an HTTP/2 connection whose PING is not answered within this time.
    pub http2_keepalive_timeout_secs: Option<u64>,
    /// Most connections open at once from one source IP address (0 = no limit).
    pub max_connections_per_ip: Option<usize>,
}

/// `[[listener]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Name for logs.
    pub name: Option<String>,
    /// `host:port`
    pub address: String,
    /// Must be `true` to serve without TLS (local testing only).
    #[serde(default)]
    pub plain_http: bool,
    /// `[listener.tls]`
    pub tls: Option<RawTls>,
}

/// `[listener.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain (leaf first).
    pub certificate: String,
    /// PEM private key.
    pub private_key: String,
    /// `[listener.tls.client_auth]`: require client certificates (mTLS).
    pub client_auth: Option<RawClientAuth>,
}

/// `[listener.tls.client_auth]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientAuth {
    /// PEM bundle of trusted client CAs.
    pub ca_bundle: String,
    /// Allowed subject CNs / DNS SANs; empty allows any certificate from the CA.
    #[serde(default)]
    pub allowed_subjects: Vec<String>,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `host:port`
    pub address: String,
}

/// `[hsm]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsm {
    /// PKCS#11 module path.
    pub module: String,
    /// Token label.
    pub token_label: Option<String>,
    /// Token serial (instead of the label).
    pub token_serial: Option<String>,
    /// User PIN.
    pub user_pin: Option<SecretSource>,
    /// Worker threads.
    pub workers: Option<usize>,
    /// Queue capacity.
    pub queue_capacity: Option<usize>,
    /// Per-operation deadline.
    pub op_timeout_ms: Option<u64>,
    /// Allow extractable / non-sensitive keys.
    #[serde(default)]
    pub allow_exportable_keys: bool,
    /// Key cache capacity.
    pub key_cache_capacity: Option<u64>,
    /// Use per-session key copies (SoftHSM speed-up).
    #[serde(default)]
    pub session_key_copies: bool,
    /// Who generates the AES-GCM IV: `proxy-random`, `hsm-in-params`, `hsm-appended`.
    pub gcm_iv: Option<String>,
    /// Key cache entry lifetime.
    pub key_cache_ttl_secs: Option<u64>,
    /// Lifetime of an "unknown label" entry.
    pub negative_cache_ms: Option<u64>,
    /// First wait after a failed token/module recovery attempt.
    pub recovery_backoff_initial_ms: Option<u64>,
    /// Longest wait between recovery attempts.
    pub recovery_backoff_max_ms: Option<u64>,
    /// A worker stuck in one call this long is replaced (0 = never).
    pub hung_call_ms: Option<u64>,
    /// Largest input of one AES-GCM call the HSM accepts.
    pub max_data_bytes: Option<usize>,
}

/// `[health]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Dedicated health-check key label.
    pub key: Option<String>,
    /// Background check interval.
    pub interval_secs: Option<u64>,
    /// Oldest cached report served.
    pub max_age_secs: Option<u64>,
}

/// `[security]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    /// Kill switch file.
    pub kill_switch_file: Option<String>,
    /// Keys refused for every operation.
    #[serde(default)]
    pub disabled_keys: Vec<String>,
    /// How often the fleet state is read from the HSM.
    pub state_poll_secs: Option<u64>,
}

/// `[logging]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    /// `text` or `json`.
    pub format: Option<String>,
    /// Filter directive.
    pub level: Option<String>,
    /// Separate audit file.
    pub audit_file: Option<String>,
    /// Fail key operations whose audit line cannot be written.
    pub audit_required: Option<bool>,
    /// Label of the HSM key that MACs the audit checkpoints.
    pub audit_hmac_key: Option<String>,
    /// Interval between audit checkpoints.
    pub audit_checkpoint_ms: Option<u64>,
    /// Rotate the audit file past this size.
    pub audit_max_bytes: Option<u64>,
}

/// `[xks]`
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawXks {
    /// `xksProxyFleetSize`
    pub fleet_size: Option<u32>,
    /// `xksProxyVendor`
    pub vendor: Option<String>,
    /// `[[xks.key_store]]`
    #[serde(default)]
    pub key_store: Vec<RawKeyStore>,
}

/// `[[xks.key_store]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyStore {
    /// Name.
    pub name: String,
    /// Path prefix (`""` or `/a/b`).
    #[serde(default)]
    pub path_prefix: String,
    /// Accepted regions; `["*"]` for any.
    pub regions: Vec<String>,
    /// `spec` (default) or `aws-sample`.
    pub aad_framing: Option<String>,
    /// aws-sample framing only: the sample proxy's static `ciphertext_metadata_b64`.
    pub ciphertext_metadata: Option<String>,
    /// Exposed key labels (globs); `["*"]` for all.
    pub keys: Vec<String>,
    /// Serve (default) or answer InvalidStateException.
    pub enabled: Option<bool>,
    /// Largest plaintext/ciphertext (bytes).
    pub max_plaintext_bytes: Option<usize>,
    /// Largest AAD (bytes).
    pub max_aad_bytes: Option<usize>,
    /// Request-rate quota of the whole key store (absent: unlimited).
    pub quota: Option<RawQuota>,
    /// `[[xks.key_store.credential]]`
    #[serde(default)]
    pub credential: Vec<RawCredential>,
    /// `[[xks.key_store.rule]]`
    #[serde(default)]
    pub rule: Vec<RawRule>,
}

/// `quota = { rate = …, burst = … }` (XKS key store, `[gcp]`, Azure prefix).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    /// Requests per second on average.
    pub rate: f64,
    /// Requests admitted back to back (signed, so a negative value is reported at its path).
    pub burst: i64,
}

/// `[[gcp.quota_override]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuotaOverride {
    /// The service account (exact `email` claim) these settings apply to.
    pub service_account: String,
    /// Requests per second on average.
    pub rate: f64,
    /// Requests admitted back to back.
    pub burst: i64,
}

/// `[[xks.key_store.credential]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    /// 20–30 chars of `[A-Z2-7]`.
    pub access_key_id: String,
    /// 43–64 chars of `[A-Za-z0-9/+=]`.
    pub secret: SecretSource,
}

/// `[[xks.key_store.rule]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Name reported in denials.
    pub name: String,
    /// Keys the rule applies to (globs; default all).
    pub keys: Option<Vec<String>>,
    /// Operations the rule applies to (`metadata`, `encrypt`, `decrypt`; default all).
    pub operations: Option<Vec<String>>,
    /// The requestMetadata field constrained.
    pub attribute: String,
    /// Allowed values (globs).
    pub allow: Vec<String>,
}

/// `[azure]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAzure {
    /// `proxy_vendor` in `/info`.
    pub vendor: Option<String>,
    /// `ekm_vendor` in `/info`.
    pub ekm_vendor: Option<String>,
    /// `ekm_product` in `/info`.
    pub ekm_product: Option<String>,
    /// `[[azure.prefix]]`
    #[serde(default)]
    pub prefix: Vec<RawAzurePrefix>,
}

/// `[[azure.prefix]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAzurePrefix {
    /// Name in logs, metrics and audit lines.
    pub name: String,
    /// `/segment[/segment…]`, at most 64 characters of `[A-Za-z0-9/-]`.
    pub path_prefix: String,
    /// PEM CA bundle the client certificate must chain to (narrower than the listener's);
    /// absent: the listener's CA bundle decides.
    pub ca_bundle: Option<String>,
    /// Client certificate subjects (CN or DNS SAN) accepted; at least one.
    pub allowed_subjects: Vec<String>,
    /// Exposed key labels (globs); `["*"]` for all but the health-check key.
    pub keys: Vec<String>,
    /// Serve (default) or answer 403 to every key operation.
    pub enabled: Option<bool>,
    /// Request-rate quota of each client certificate subject under this prefix (absent:
    /// unlimited).
    pub quota: Option<RawQuota>,
    /// `[[azure.prefix.rule]]`
    #[serde(default)]
    pub rule: Vec<RawRule>,
}

/// `[gcp]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGcp {
    /// Path before `/<key path>:wrap` (e.g. `/gcp/v0/keys`).
    pub path_prefix: String,
    /// Largest wrap plaintext / unwrap blob (bytes).
    pub max_plaintext_bytes: Option<usize>,
    /// Largest additionalAuthenticatedData (bytes).
    pub max_aad_bytes: Option<usize>,
    /// Verified-token cache entries; 0 disables the cache.
    pub token_cache_capacity: Option<u64>,
    /// Request-rate quota of each service account without an override (absent: unlimited).
    pub quota: Option<RawQuota>,
    /// `[[gcp.quota_override]]`: per-service-account quotas.
    #[serde(default)]
    pub quota_override: Vec<RawQuotaOverride>,
    /// `[[gcp.issuer]]`
    #[serde(default)]
    pub issuer: Vec<RawIssuer>,
    /// `[gcp.access_reasons]`: the default Key Access Justifications policy.
    pub access_reasons: Option<RawAccessReasons>,
    /// `[[gcp.key]]`
    #[serde(default)]
    pub key: Vec<RawGcpKey>,
}

/// `[[gcp.issuer]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    /// Name in logs and metrics.
    pub name: String,
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
    /// HTTPS URL of the JWKS.
    pub jwks_url: Option<String>,
    /// Local JWKS file (instead of the URL).
    pub jwks_file: Option<String>,
    /// PEM roots for the JWKS URL instead of the system's.
    pub jwks_ca_file: Option<String>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Accepted signature algorithms (default RS256).
    pub algorithms: Option<Vec<String>>,
    /// Clock skew allowed on exp/nbf/iat.
    pub leeway_secs: Option<u64>,
    /// Allowed `email` values (globs).
    pub service_accounts: Vec<String>,
    /// Require `email_verified = true` (default true).
    pub require_email_verified: Option<bool>,
    /// At most one unknown-kid refresh per this many seconds.
    pub jwks_refresh_min_interval_secs: Option<u64>,
    /// JWKS lifetime when the response has no cache headers.
    pub jwks_default_ttl_secs: Option<u64>,
    /// JWKS fetch timeout.
    pub jwks_fetch_timeout_ms: Option<u64>,
}

/// `[gcp.access_reasons]` (also a key's `access_reasons`)
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAccessReasons {
    /// Allowed reasons, by enum name or number.
    pub allow: Vec<toml::Value>,
    /// Allow requests without a justification.
    #[serde(default)]
    pub allow_absent: bool,
    /// Allow REASON_UNSPECIFIED.
    #[serde(default)]
    pub allow_unspecified: bool,
    /// Allow codes this build does not know.
    #[serde(default)]
    pub allow_unknown: bool,
    /// Let key health checks through whatever their reason (default true).
    pub allow_health_checks: Option<bool>,
}

/// `[[gcp.key]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGcpKey {
    /// Key path in the key URI.
    pub path: String,
    /// HSM key label used for new wraps (default: the path).
    pub hsm_key: Option<String>,
    /// HSM key labels still accepted for unwrap.
    #[serde(default)]
    pub previous_hsm_keys: Vec<String>,
    /// Serve (default) or refuse with FAILED_PRECONDITION.
    pub enabled: Option<bool>,
    /// Globs the request's relativeResourceName must match.
    pub resource_names: Option<Vec<String>>,
    /// Per-key justification policy.
    pub access_reasons: Option<RawAccessReasons>,
    /// `[[gcp.key.grant]]`
    #[serde(default)]
    pub grant: Vec<RawGrant>,
}

/// `[[gcp.key.grant]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    /// Name in denials and audit lines.
    pub name: String,
    /// Allowed service accounts (globs).
    pub service_accounts: Vec<String>,
    /// `wrap`, `unwrap` (default both).
    pub operations: Option<Vec<String>>,
}
