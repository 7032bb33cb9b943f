//! Raw configuration → validated [`Settings`]. Every problem is collected with its key path and
//! reported together; nothing here panics on any input.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawConfig, RawKeyStore, RawListener, RawQuota, RawRule};
use super::{ConfigError, CoreSettings, LogFormat, LoggingSettings, Problem, Settings};
use crate::auth::sigv4::{RegionPolicy, SigV4Credential};
use crate::authz::decide::XKS_ATTRIBUTES;
use crate::authz::{Pattern, Policy, Rule};
use crate::core::framing::AadFraming;
use crate::core::quota::TokenBucket;
use crate::core::{KeyServiceSettings, Operation};
use crate::front::xks::settings::{AAD_CEILING, MAX_METADATA, SPEC_MIN_AAD, SPEC_MIN_PLAINTEXT};
use crate::front::xks::{KeyAllowList, KeyStoreSettings, XksLimits, XksSettings};
use crate::hsm::{GcmIvMode, HsmSettings, TokenSelector};
use crate::secret::SecretString;
use crate::server::tls::{ClientAuth, TlsSettings};
use crate::server::{AdminSettings, ListenerSettings, ServerSettings};

/// The format-version byte that starts our `ciphertextMetadata` (spec framing, version 1).
pub const METADATA_FORMAT_V1: u8 = 0x01;

pub(super) struct Collector {
    pub(super) problems: Vec<Problem>,
}

impl Collector {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Validate `raw`; relative paths resolve against `base`.
pub fn validate(raw: RawConfig, source: &Path, base: &Path) -> Result<Settings, ConfigError> {
    let mut c = Collector {
        problems: Vec::new(),
    };
    let server = server(&raw, &mut c);
    let listeners = listeners(&raw.listener, base, &mut c);
    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| match a.address.parse::<SocketAddr>() {
            Ok(addr) => Some(AdminSettings { addr }),
            Err(_) => {
                c.add(
                    "admin.address",
                    format!("'{}' is not host:port (e.g. 127.0.0.1:9090)", a.address),
                );
                None
            }
        });
    let hsm = hsm(&raw, base, &mut c);
    let mut core = core(&raw, base, &mut c);
    let xks = xks(&raw, base, &core.health_key, &mut c);
    let gcp = raw
        .gcp
        .as_ref()
        .and_then(|g| super::gcp::gcp(g, base, &core.health_key, &mut c));
    let azure = raw.azure.as_ref().and_then(|a| {
        // Cloud EKM's prefix and the XKS API root are routed first.
        let mut taken = vec!["/kms/xks/v1".to_owned()];
        taken.extend(gcp.as_ref().map(|g| g.prefix.clone()));
        super::azure::azure(a, base, &core.health_key, &taken, &mut c)
    });
    if raw.azure.is_some()
        && !listeners.iter().any(|l| {
            l.tls
                .as_ref()
                .is_some_and(|t| matches!(t.client_auth, ClientAuth::Required { .. }))
        })
    {
        c.add(
            "azure",
            "Azure Managed HSM calls over mutual TLS only: add a [[listener]] with [listener.tls.client_auth]",
        );
    }
    let logging = logging(&raw, base, &mut c);
    // The audit trail's MAC key serves no front, whatever their key lists say.
    core.keys
        .reserved_keys
        .insert(logging.audit_hmac_key.clone());
    if let Some(limit) = hsm.as_ref().and_then(|h| h.max_data_bytes) {
        // What a front end lets through must fit into one HSM call: plaintext ‖ 16-byte tag on
        // decrypt (XKS and Cloud EKM both seal with AES-GCM).
        let fits = |max_plaintext: usize| max_plaintext.saturating_add(16) <= limit;
        for (i, ks) in xks.key_stores.iter().enumerate() {
            if !fits(ks.limits.max_plaintext) {
                c.add(
                    format!("xks.key_store[{i}].max_plaintext_bytes"),
                    format!(
                        "{} does not fit the HSM's limit (hsm.max_data_bytes = {limit}): at most {}",
                        ks.limits.max_plaintext,
                        limit.saturating_sub(16)
                    ),
                );
            }
        }
        if let Some(g) = &gcp
            && !fits(g.limits.max_plaintext)
        {
            c.add(
                "gcp.max_plaintext_bytes",
                format!(
                    "{} does not fit the HSM's limit (hsm.max_data_bytes = {limit}): at most {}",
                    g.limits.max_plaintext,
                    limit.saturating_sub(16)
                ),
            );
        }
    }
    if listeners.is_empty() && !c.problems.iter().any(|p| p.path.starts_with("listener")) {
        c.add("listener", "at least one [[listener]] is required");
    }
    if xks.key_stores.is_empty() && raw.gcp.is_none() && raw.azure.is_none() {
        c.add(
            "xks.key_store",
            "nothing to serve: configure at least one [[xks.key_store]], a [gcp] or an [azure] section",
        );
    }
    match (hsm, c.problems.is_empty()) {
        (Some(hsm), true) => Ok(Settings {
            source: source.to_owned(),
            server,
            listeners,
            admin,
            hsm,
            core,
            xks,
            gcp,
            azure,
            logging,
        }),
        _ => Err(ConfigError {
            file: source.to_owned(),
            problems: c.problems,
        }),
    }
}

fn ms(v: Option<u64>, default: Duration) -> Duration {
    v.map_or(default, Duration::from_millis)
}

fn server(raw: &RawConfig, c: &mut Collector) -> ServerSettings {
    let d = ServerSettings::default();
    let s = &raw.server;
    let out = ServerSettings {
        request_timeout: ms(s.request_timeout_ms, d.request_timeout),
        header_read_timeout: ms(s.header_read_timeout_ms, d.header_read_timeout),
        tls_handshake_timeout: ms(s.tls_handshake_timeout_ms, d.tls_handshake_timeout),
        max_body_bytes: s.max_body_bytes.unwrap_or(d.max_body_bytes),
        max_connections: s.max_connections.unwrap_or(d.max_connections),
        shutdown_grace: ms(s.shutdown_grace_ms, d.shutdown_grace),
        http2: s.http2.unwrap_or(d.http2),
        idle_timeout: s
            .idle_timeout_secs
            .map_or(d.idle_timeout, Duration::from_secs),
        http2_keepalive_interval: match s.http2_keepalive_interval_secs {
            None => d.http2_keepalive_interval,
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(secs)),
        },
        http2_keepalive_timeout: s
            .http2_keepalive_timeout_secs
            .map_or(d.http2_keepalive_timeout, Duration::from_secs),
        max_connections_per_ip: s.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
    };
    // A zero would close connections at once (or never time anything out); both are mistakes.
    for (key, value) in [
        ("server.header_read_timeout_ms", out.header_read_timeout),
        ("server.tls_handshake_timeout_ms", out.tls_handshake_timeout),
        ("server.idle_timeout_secs", out.idle_timeout),
        (
            "server.http2_keepalive_timeout_secs",
            out.http2_keepalive_timeout,
        ),
    ] {
        if value.is_zero() {
            c.add(key, "must be greater than 0");
        }
    }
    if out.request_timeout.is_zero() {
        c.add("server.request_timeout_ms", "must be greater than 0");
    }
    if out.max_connections == 0 {
        c.add("server.max_connections", "must be greater than 0");
    }
    // The body must hold the spec's minimum plaintext and AAD in base64 plus JSON overhead.
    let min_body = (SPEC_MIN_PLAINTEXT + SPEC_MIN_AAD).div_ceil(3) * 4 + 4096;
    if out.max_body_bytes < min_body {
        c.add(
            "server.max_body_bytes",
            format!("must be at least {min_body} to accept the XKS spec's minimum sizes"),
        );
    }
    out
}

pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

fn listeners(raw: &[RawListener], base: &Path, c: &mut Collector) -> Vec<ListenerSettings> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, l) in raw.iter().enumerate() {
        let at = format!("listener[{i}]");
        let name = l.name.clone().unwrap_or_else(|| format!("listener-{i}"));
        if !names.insert(name.clone()) {
            c.add(
                format!("{at}.name"),
                format!("duplicate listener name '{name}'"),
            );
        }
        let addr = match l.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.add(
                    format!("{at}.address"),
                    format!("'{}' is not host:port", l.address),
                );
                None
            }
        };
        let tls = match (&l.tls, l.plain_http) {
            (Some(_), true) => {
                c.add(
                    format!("{at}.plain_http"),
                    "plain_http = true conflicts with [listener.tls]",
                );
                None
            }
            (None, false) => {
                c.add(
                    format!("{at}.tls"),
                    "TLS is required; set plain_http = true explicitly for local testing only",
                );
                None
            }
            (None, true) => None,
            (Some(t), false) => {
                let client_auth = match &t.client_auth {
                    None => ClientAuth::None,
                    Some(ca) => ClientAuth::Required {
                        ca_bundle: resolve(base, &ca.ca_bundle),
                        allowed_subjects: ca.allowed_subjects.clone(),
                    },
                };
                for (key, path) in [
                    ("certificate", &t.certificate),
                    ("private_key", &t.private_key),
                ] {
                    if !resolve(base, path).is_file() {
                        c.add(
                            format!("{at}.tls.{key}"),
                            format!("file not found: {}", resolve(base, path).display()),
                        );
                    }
                }
                if let Some(ca) = t
                    .client_auth
                    .as_ref()
                    .filter(|ca| !resolve(base, &ca.ca_bundle).is_file())
                {
                    c.add(
                        format!("{at}.tls.client_auth.ca_bundle"),
                        format!("file not found: {}", resolve(base, &ca.ca_bundle).display()),
                    );
                }
                Some(TlsSettings {
                    cert_chain: resolve(base, &t.certificate),
                    private_key: resolve(base, &t.private_key),
                    client_auth,
                })
            }
        };
        if let Some(addr) = addr.filter(|a| l.plain_http && !a.ip().is_loopback()) {
            tracing::warn!(listener = %name, %addr, "plain-HTTP listener on a non-loopback address");
        }
        if let Some(addr) = addr {
            out.push(ListenerSettings { name, addr, tls });
        }
    }
    out
}

fn hsm(raw: &RawConfig, base: &Path, c: &mut Collector) -> Option<HsmSettings> {
    let Some(h) = &raw.hsm else {
        c.add("hsm", "the [hsm] section is required");
        return None;
    };
    let module = resolve(base, &h.module);
    if !module.is_file() {
        c.add(
            "hsm.module",
            format!("PKCS#11 module not found: {}", module.display()),
        );
    }
    let token = match (&h.token_label, &h.token_serial) {
        (Some(l), None) if !l.is_empty() => Some(TokenSelector::Label(l.clone())),
        (None, Some(s)) if !s.is_empty() => Some(TokenSelector::Serial(s.clone())),
        (Some(_), Some(_)) => {
            c.add(
                "hsm.token_label",
                "set token_label or token_serial, not both",
            );
            None
        }
        _ => {
            c.add(
                "hsm.token_label",
                "token_label (or token_serial) is required",
            );
            None
        }
    };
    let user_pin = match &h.user_pin {
        None => {
            c.add(
                "hsm.user_pin",
                "required (inline, { env = \"NAME\" } or { file = \"path\" })",
            );
            None
        }
        Some(src) => match src.resolve(base) {
            Ok(pin) if pin.is_empty() => {
                c.add("hsm.user_pin", "is empty");
                None
            }
            Ok(pin) => Some(pin),
            Err(e) => {
                c.add("hsm.user_pin", e);
                None
            }
        },
    };
    let workers = h.workers.unwrap_or(HsmSettings::DEFAULT_WORKERS);
    if workers == 0 || workers > 256 {
        c.add("hsm.workers", "must be between 1 and 256");
    }
    let queue_capacity = h
        .queue_capacity
        .unwrap_or(HsmSettings::DEFAULT_QUEUE_CAPACITY);
    if queue_capacity == 0 {
        c.add("hsm.queue_capacity", "must be greater than 0");
    }
    let op_timeout = ms(h.op_timeout_ms, HsmSettings::DEFAULT_OP_TIMEOUT);
    if op_timeout.is_zero() {
        c.add("hsm.op_timeout_ms", "must be greater than 0");
    }
    let gcm_iv = match h.gcm_iv.as_deref() {
        None => GcmIvMode::default(),
        Some(name) => GcmIvMode::from_name(name).unwrap_or_else(|| {
            let names: Vec<&str> = GcmIvMode::ALL.iter().map(|(_, n)| *n).collect();
            c.add(
                "hsm.gcm_iv",
                format!("unknown mode \"{name}\"; one of: {}", names.join(", ")),
            );
            GcmIvMode::default()
        }),
    };
    let key_cache_ttl = h
        .key_cache_ttl_secs
        .map_or(HsmSettings::DEFAULT_KEY_CACHE_TTL, Duration::from_secs);
    if key_cache_ttl.is_zero() {
        c.add("hsm.key_cache_ttl_secs", "must be greater than 0");
    }
    let negative_cache_ttl = ms(h.negative_cache_ms, HsmSettings::DEFAULT_NEGATIVE_CACHE_TTL);
    let recovery_backoff_initial = ms(
        h.recovery_backoff_initial_ms,
        HsmSettings::DEFAULT_RECOVERY_BACKOFF_INITIAL,
    );
    let recovery_backoff_max = ms(
        h.recovery_backoff_max_ms,
        HsmSettings::DEFAULT_RECOVERY_BACKOFF_MAX,
    );
    if recovery_backoff_initial.is_zero() {
        c.add("hsm.recovery_backoff_initial_ms", "must be greater than 0");
    }
    if recovery_backoff_max < recovery_backoff_initial {
        c.add(
            "hsm.recovery_backoff_max_ms",
            "must be at least recovery_backoff_initial_ms",
        );
    }
    let hung_call_limit = ms(h.hung_call_ms, HsmSettings::DEFAULT_HUNG_CALL_LIMIT);
    if !hung_call_limit.is_zero() && hung_call_limit < op_timeout {
        c.add(
            "hsm.hung_call_ms",
            "must be 0 (never replace a stuck worker) or at least op_timeout_ms",
        );
    }
    Some(HsmSettings {
        module,
        token: token?,
        user_pin: user_pin?,
        workers,
        queue_capacity,
        op_timeout,
        allow_exportable_keys: h.allow_exportable_keys,
        key_cache_capacity: h
            .key_cache_capacity
            .unwrap_or(HsmSettings::DEFAULT_KEY_CACHE_CAPACITY),
        session_key_copies: h.session_key_copies,
        gcm_iv,
        key_cache_ttl,
        negative_cache_ttl,
        recovery_backoff_initial,
        recovery_backoff_max,
        hung_call_limit,
        max_data_bytes: match h.max_data_bytes {
            Some(0) => {
                c.add(
                    "hsm.max_data_bytes",
                    "must be greater than 0 (omit it for no limit)",
                );
                None
            }
            other => other,
        },
    })
}

fn core(raw: &RawConfig, base: &Path, c: &mut Collector) -> CoreSettings {
    let h = &raw.health;
    let interval = Duration::from_secs(h.interval_secs.unwrap_or(15));
    let max_age = Duration::from_secs(h.max_age_secs.unwrap_or(30));
    if interval.is_zero() {
        c.add("health.interval_secs", "must be greater than 0");
    }
    let state_poll = Duration::from_secs(raw.security.state_poll_secs.unwrap_or(5));
    if state_poll.is_zero() || state_poll > Duration::from_secs(300) {
        c.add(
            "security.state_poll_secs",
            "must be between 1 and 300 (replicas obey a disabled key within this time)",
        );
    }
    if max_age > Duration::from_secs(60) {
        c.add(
            "health.max_age_secs",
            "must be at most 60 (XKS: health results no older than one minute)",
        );
    }
    CoreSettings {
        keys: KeyServiceSettings {
            disabled_keys: raw.security.disabled_keys.iter().cloned().collect(),
            reserved_keys: Default::default(),
        },
        health_key: h.key.clone().unwrap_or_else(|| "ekm-health-check".into()),
        health_interval: interval,
        health_max_age: max_age,
        kill_switch_file: raw
            .security
            .kill_switch_file
            .as_deref()
            .map(|p| resolve(base, p)),
        state_poll,
    }
}

fn logging(raw: &RawConfig, base: &Path, c: &mut Collector) -> LoggingSettings {
    let l = &raw.logging;
    let format = match l.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            c.add(
                "logging.format",
                format!("'{other}' is not 'text' or 'json'"),
            );
            LogFormat::Text
        }
    };
    let level = l.level.clone().unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        c.add(
            "logging.level",
            format!("'{level}' is not a valid filter (e.g. 'info' or 'warn,ekm_audit=info')"),
        );
    }
    let audit_file = l.audit_file.as_deref().map(|p| resolve(base, p));
    let audit_required = l.audit_required.unwrap_or(false);
    if audit_required && audit_file.is_none() {
        c.add(
            "logging.audit_required",
            "needs logging.audit_file (only a file write can be confirmed before answering)",
        );
    }
    let audit_checkpoint = Duration::from_millis(l.audit_checkpoint_ms.unwrap_or(1000));
    if audit_checkpoint.is_zero() || audit_checkpoint > Duration::from_secs(1) {
        c.add(
            "logging.audit_checkpoint_ms",
            "must be between 1 and 1000 (a checkpoint at least once a second)",
        );
    }
    let audit_hmac_key = l
        .audit_hmac_key
        .clone()
        .unwrap_or_else(|| "ekm-audit-hmac".into());
    if audit_hmac_key.is_empty() {
        c.add("logging.audit_hmac_key", "must not be empty");
    }
    LoggingSettings {
        format,
        level,
        audit_file,
        audit_required,
        audit_hmac_key,
        audit_checkpoint,
        audit_max_bytes: l.audit_max_bytes.unwrap_or(256 * 1024 * 1024),
    }
}

fn xks(raw: &RawConfig, base: &Path, health_key: &str, c: &mut Collector) -> XksSettings {
    let mut stores = Vec::new();
    let mut prefixes = HashSet::new();
    let mut names = HashSet::new();
    for (i, ks) in raw.xks.key_store.iter().enumerate() {
        let at = format!("xks.key_store[{i}]");
        if !names.insert(ks.name.clone()) {
            c.add(
                format!("{at}.name"),
                format!("duplicate key store name '{}'", ks.name),
            );
        }
        // Two prefixes that differ only in slashes would route to one store and hide the other.
        if !prefixes.insert(normalize_prefix(&ks.path_prefix)) {
            c.add(
                format!("{at}.path_prefix"),
                format!(
                    "prefix '{}' is the same as another key store's (after normalizing '/')",
                    ks.path_prefix
                ),
            );
        }
        if let Some(store) = key_store(ks, &at, base, health_key, c) {
            stores.push(store);
        }
    }
    let fleet_size = raw.xks.fleet_size.unwrap_or(1);
    if fleet_size == 0 {
        c.add("xks.fleet_size", "must be greater than 0");
    }
    XksSettings {
        key_stores: stores,
        fleet_size,
        vendor: raw.xks.vendor.clone().unwrap_or_else(|| "ekm-proxy".into()),
    }
}

/// A path prefix with repeated and trailing slashes removed: the form routing compares.
fn normalize_prefix(prefix: &str) -> String {
    prefix
        .split('/')
        .filter(|segment| !segment.is_empty())
        .fold(String::new(), |mut out, segment| {
            out.push('/');
            out.push_str(segment);
            out
        })
}

fn key_store(
    ks: &RawKeyStore,
    at: &str,
    base: &Path,
    health_key: &str,
    c: &mut Collector,
) -> Option<KeyStoreSettings> {
    let before = c.problems.len();
    // KMS accepts `[/<prefix>]/kms/xks/v1` of at most 128 characters from [a-zA-Z0-9/_-].
    let p = &ks.path_prefix;
    let valid_chars = p
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'_' || b == b'-');
    if !p.is_empty()
        && (!p.starts_with('/')
            || p.ends_with('/')
            || !valid_chars
            || p.contains("//")
            || p.len() > 117)
    {
        c.add(
            format!("{at}.path_prefix"),
            "must be empty or '/segment[/segment…]' of [a-zA-Z0-9_-], no trailing '/', at most 117 characters",
        );
    }
    let regions = if ks.regions.iter().any(|r| r == "*") {
        RegionPolicy::Any
    } else if ks.regions.is_empty() {
        c.add(
            format!("{at}.regions"),
            "list the accepted SigV4 regions, or [\"*\"] for any",
        );
        RegionPolicy::Any
    } else {
        RegionPolicy::OneOf(ks.regions.clone())
    };
    if ks.credential.is_empty() {
        c.add(
            format!("{at}.credential"),
            "at least one [[xks.key_store.credential]] is required",
        );
    }
    let mut credentials = Vec::new();
    let mut ids = HashSet::new();
    for (j, cred) in ks.credential.iter().enumerate() {
        let cat = format!("{at}.credential[{j}]");
        let id = &cred.access_key_id;
        if !(20..=30).contains(&id.len())
            || !id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        {
            c.add(
                format!("{cat}.access_key_id"),
                "must be 20-30 characters of A-Z and 2-7 (XKS spec)",
            );
        }
        if !ids.insert(id.clone()) {
            c.add(
                format!("{cat}.access_key_id"),
                "duplicate access key id in this key store",
            );
        }
        match cred.secret.resolve(base) {
            Ok(secret) => {
                if !secret_ok(&secret) {
                    c.add(
                        format!("{cat}.secret"),
                        "must be 43-64 characters of A-Z a-z 0-9 / + = (XKS spec)",
                    );
                }
                credentials.push(SigV4Credential {
                    access_key_id: id.clone(),
                    secret,
                });
            }
            Err(e) => c.add(format!("{cat}.secret"), e),
        }
    }
    let framing = match ks.aad_framing.as_deref() {
        None | Some("spec") => AadFraming::SpecLiteral,
        Some("aws-sample") => AadFraming::AwsSample,
        Some(other) => {
            c.add(
                format!("{at}.aad_framing"),
                format!("'{other}' is not 'spec' or 'aws-sample'"),
            );
            AadFraming::SpecLiteral
        }
    };
    let ciphertext_metadata = match (framing, &ks.ciphertext_metadata) {
        (AadFraming::SpecLiteral, Some(_)) => {
            c.add(
                format!("{at}.ciphertext_metadata"),
                "only for aad_framing = \"aws-sample\"; spec framing writes its own versioned metadata",
            );
            Vec::new()
        }
        (AadFraming::SpecLiteral, None) => vec![METADATA_FORMAT_V1],
        (AadFraming::AwsSample, None) => Vec::new(),
        (AadFraming::AwsSample, Some(b64)) => {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(bytes) if bytes.len() <= MAX_METADATA => bytes,
                Ok(_) => {
                    c.add(
                        format!("{at}.ciphertext_metadata"),
                        "decodes to more than 20 bytes",
                    );
                    Vec::new()
                }
                Err(_) => {
                    c.add(
                        format!("{at}.ciphertext_metadata"),
                        "is not canonical base64",
                    );
                    Vec::new()
                }
            }
        }
    };
    let keys = exposed_keys(&ks.keys, at, health_key, c);
    let limits = XksLimits {
        max_plaintext: ks
            .max_plaintext_bytes
            .unwrap_or(XksLimits::default().max_plaintext),
        max_aad: ks.max_aad_bytes.unwrap_or(XksLimits::default().max_aad),
    };
    if limits.max_plaintext < SPEC_MIN_PLAINTEXT {
        c.add(
            format!("{at}.max_plaintext_bytes"),
            format!("must be at least {SPEC_MIN_PLAINTEXT} (XKS spec minimum)"),
        );
    }
    if !(SPEC_MIN_AAD..=AAD_CEILING).contains(&limits.max_aad) {
        c.add(
            format!("{at}.max_aad_bytes"),
            format!("must be between {SPEC_MIN_AAD} (XKS spec minimum) and {AAD_CEILING} (2-byte length prefix)"),
        );
    }
    let mut rules = Vec::new();
    for (j, r) in ks.rule.iter().enumerate() {
        let rat = format!("{at}.rule[{j}]");
        const OPERATIONS: [Operation; 3] = [
            Operation::KeyMetadata,
            Operation::Encrypt,
            Operation::Decrypt,
        ];
        let rule = policy_rule(r, &rat, &XKS_ATTRIBUTES, &OPERATIONS, c);
        let covers_metadata = rule
            .operations
            .as_ref()
            .is_none_or(|ops| ops.contains(&Operation::KeyMetadata));
        if r.attribute == "kmsKeyArn" && covers_metadata {
            // KMS sends no kmsKeyArn with GetKeyMetadata (CreateKey: the KMS key does not exist yet),
            // so such a rule would deny every CreateKey.
            c.add(
                format!("{rat}.operations"),
                "a kmsKeyArn rule must not apply to metadata (CreateKey sends no kmsKeyArn); set operations = [\"encrypt\", \"decrypt\"]",
            );
        }
        rules.push(rule);
    }
    let quota = ks
        .quota
        .as_ref()
        .and_then(|q| quota(q, &format!("{at}.quota"), c));
    (c.problems.len() == before).then(|| KeyStoreSettings {
        name: ks.name.clone(),
        prefix: ks.path_prefix.clone(),
        credentials,
        regions,
        framing,
        ciphertext_metadata,
        keys,
        policy: Policy::new(rules),
        limits,
        enabled: ks.enabled.unwrap_or(true),
        quota,
    })
}

/// A `quota = { rate, burst }` table at `at`.
pub(super) fn quota(q: &RawQuota, at: &str, c: &mut Collector) -> Option<TokenBucket> {
    token_bucket(q.rate, q.burst, at, c)
}

/// Quota settings whose keys live at `at.rate` and `at.burst`: a finite rate above 0 (a zero
/// rate would never refill; to refuse everything, disable the key store or prefix instead) and a
/// burst of at least 1 (with 0 no request could ever pass).
pub(super) fn token_bucket(
    rate: f64,
    burst: i64,
    at: &str,
    c: &mut Collector,
) -> Option<TokenBucket> {
    let before = c.problems.len();
    if !(rate.is_finite() && rate > 0.0) {
        c.add(
            format!("{at}.rate"),
            format!("{rate} is not a number of requests per second above 0 (e.g. 500 or 0.5)"),
        );
    }
    let burst = match u32::try_from(burst) {
        Ok(b) if b >= 1 => Some(b),
        _ => {
            c.add(
                format!("{at}.burst"),
                format!("{burst} is not between 1 and {}", u32::MAX),
            );
            None
        }
    };
    let burst = burst?;
    (c.problems.len() == before).then_some(TokenBucket {
        rate_per_sec: rate,
        burst,
    })
}

/// The keys a key store or prefix exposes: `["*"]` for all, else the listed globs; never the
/// health-check key (wildcards do not match it, and naming it is a config error).
pub(super) fn exposed_keys(
    keys: &[String],
    at: &str,
    health_key: &str,
    c: &mut Collector,
) -> KeyAllowList {
    if let Some(j) = keys.iter().position(|k| k == health_key) {
        c.add(
            format!("{at}.keys[{j}]"),
            format!(
                "'{health_key}' is the health-check key (health.key); it cannot be a customer key"
            ),
        );
    }
    if keys.iter().any(|k| k == "*") {
        KeyAllowList::any(health_key)
    } else if keys.is_empty() {
        c.add(
            format!("{at}.keys"),
            "list the exposed key labels, or [\"*\"] for all",
        );
        KeyAllowList::any(health_key)
    } else {
        KeyAllowList::only(keys.iter().map(Pattern::new).collect(), health_key)
    }
}

/// One `[[….rule]]`: its attribute must be one of `attributes`, its operations among
/// `operations`, its allow list non-empty.
pub(super) fn policy_rule(
    r: &RawRule,
    at: &str,
    attributes: &[&str],
    operations: &[Operation],
    c: &mut Collector,
) -> Rule {
    if !attributes.contains(&r.attribute.as_str()) {
        c.add(
            format!("{at}.attribute"),
            format!("'{}' is not one of {}", r.attribute, attributes.join(", ")),
        );
    }
    if r.allow.is_empty() {
        c.add(
            format!("{at}.allow"),
            "an empty allow list denies every request; list at least one pattern",
        );
    }
    // "metadata, encrypt or decrypt"
    let names: Vec<&str> = operations.iter().map(Operation::as_str).collect();
    let names = match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    let parsed = r.operations.as_ref().map(|ops| {
        ops.iter()
            .filter_map(|op| match Operation::parse(op) {
                Some(o) if operations.contains(&o) => Some(o),
                _ => {
                    c.add(format!("{at}.operations"), format!("'{op}' is not {names}"));
                    None
                }
            })
            .collect()
    });
    Rule {
        name: r.name.clone(),
        keys: r.keys.as_ref().map_or_else(
            || vec![Pattern::new("*")],
            |k| k.iter().map(Pattern::new).collect(),
        ),
        operations: parsed,
        attribute: r.attribute.clone(),
        allow: r.allow.iter().map(Pattern::new).collect(),
    }
}

fn secret_ok(secret: &SecretString) -> bool {
    let s = secret.expose();
    (43..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'+' || b == b'=')
}
