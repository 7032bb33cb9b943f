//! Benchmark options: the `ekm-proxy bench` command line ([`BenchArgs`], clap) and the validated
//! [`BenchOptions`] that [`super::run`] consumes.
//!
//! Everything a run needs is decided here, before any connection is opened, so a typo costs no
//! server start-up. Depends on clap, `hsm::HsmSettings` (the raw lane may be given settings
//! directly, e.g. by a test), `dev::profile` (the defaults are the dev profile's), and
//! `core::WrapAlgorithm` and the Azure front's key-identifier rule (so `--azure-alg` and
//! `--azure-key` are refused here, not by a probe request).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::BenchError;
use crate::core::WrapAlgorithm;
use crate::dev::profile;
use crate::hsm::HsmSettings;
use crate::secret::SecretString;

/// The operations a run can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// XKS Encrypt (AES-GCM with an HSM-generated IV).
    Encrypt,
    /// XKS Decrypt of one ciphertext encrypted before measuring.
    Decrypt,
    /// XKS Decrypt with the tag flipped: every answer must be 400 `InvalidCiphertextException`.
    DecryptBadTag,
    /// XKS GetKeyMetadata.
    Metadata,
    /// XKS GetHealthStatus.
    Health,
    /// Cloud EKM wrap with one cached bearer token (the verifier's token cache hits).
    GcpWrap,
    /// Cloud EKM wrap with a freshly minted token per request (the token cache never hits).
    GcpWrapFresh,
    /// Cloud EKM unwrap of one blob wrapped before measuring, with one cached bearer token.
    GcpUnwrap,
    /// Cloud EKM unwrap with a freshly minted token per request.
    GcpUnwrapFresh,
    /// Azure Managed HSM `wrapkey` of a 32-byte DEK (mutual TLS, `--azure-*` options).
    AzureWrap,
    /// Azure Managed HSM `unwrapkey` of one value wrapped before measuring.
    AzureUnwrap,
}

impl Scenario {
    /// Every scenario, in the order a default run measures them.
    pub const ALL: [Scenario; 11] = [
        Scenario::Encrypt,
        Scenario::Decrypt,
        Scenario::DecryptBadTag,
        Scenario::Metadata,
        Scenario::Health,
        Scenario::GcpWrap,
        Scenario::GcpWrapFresh,
        Scenario::GcpUnwrap,
        Scenario::GcpUnwrapFresh,
        Scenario::AzureWrap,
        Scenario::AzureUnwrap,
    ];

    /// The name used on the command line, in the table and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Encrypt => "encrypt",
            Scenario::Decrypt => "decrypt",
            Scenario::DecryptBadTag => "decrypt-bad-tag",
            Scenario::Metadata => "metadata",
            Scenario::Health => "health",
            Scenario::GcpWrap => "gcp-wrap",
            Scenario::GcpWrapFresh => "gcp-wrap-fresh",
            Scenario::GcpUnwrap => "gcp-unwrap",
            Scenario::GcpUnwrapFresh => "gcp-unwrap-fresh",
            Scenario::AzureWrap => "azure-wrap",
            Scenario::AzureUnwrap => "azure-unwrap",
        }
    }

    /// Whether this is a Google Cloud EKM scenario (bearer token, `--gcp-*` options).
    pub fn is_gcp(self) -> bool {
        matches!(
            self,
            Scenario::GcpWrap
                | Scenario::GcpWrapFresh
                | Scenario::GcpUnwrap
                | Scenario::GcpUnwrapFresh
        )
    }

    /// Whether this is an Azure Managed HSM scenario (its own mTLS listener, `--azure-*` options).
    pub fn is_azure(self) -> bool {
        matches!(self, Scenario::AzureWrap | Scenario::AzureUnwrap)
    }

    /// Whether every request carries a newly minted token.
    pub fn fresh_token(self) -> bool {
        matches!(self, Scenario::GcpWrapFresh | Scenario::GcpUnwrapFresh)
    }

    /// Whether the raw HSM lane has an equivalent operation (metadata and health are answered
    /// from caches, so a "raw" number would measure nothing).
    pub fn has_raw_lane(self) -> bool {
        !matches!(self, Scenario::Metadata | Scenario::Health)
    }
}

impl serde::Serialize for Scenario {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `ekm-proxy bench`: drive a proxy over HTTPS with signed XKS requests and Cloud EKM requests
/// with bearer tokens, measure the raw HSM lane in the same run, and print both with their ratio.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Target: scheme, host:port and key store path prefix.
    #[arg(long, default_value = "https://localhost:8443/dev-keystore")]
    pub url: String,
    /// CA bundle (PEM) the server certificate must chain to (https only).
    #[arg(long, default_value = "certs/dev/ca.pem")]
    pub ca: PathBuf,
    /// Client certificate (PEM) for mTLS listeners; needs --client-key.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS listeners; needs --client-cert.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// SigV4 access key id.
    #[arg(long, default_value = profile::ACCESS_KEY_ID)]
    pub access_key_id: String,
    /// SigV4 secret (default: the public dev secret).
    #[arg(long, env = "EKM_BENCH_SECRET", default_value = profile::SECRET, hide_default_value = true, hide_env_values = true)]
    pub secret: String,
    /// Region in the SigV4 credential scope.
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// External key id (token label) used by every key operation.
    #[arg(long, default_value = "dev-aes-1")]
    pub key: String,
    /// Cloud EKM key URI path prefix (gcp-* scenarios).
    #[arg(long, default_value = profile::GCP_PREFIX)]
    pub gcp_prefix: String,
    /// Cloud EKM key path (gcp-* scenarios).
    #[arg(long, default_value = profile::GCP_KEY_PATH)]
    pub gcp_key: String,
    /// HSM key label behind --gcp-key, for the raw lane; default: the key path.
    #[arg(long)]
    pub gcp_hsm_key: Option<String>,
    /// RSA private key (PEM) the gcp-* scenarios sign their RS256 tokens with.
    #[arg(long, default_value = profile::JWT_SIGNER_PATH)]
    pub gcp_signer: PathBuf,
    /// `kid` of the tokens (the JWKS key id of --gcp-signer).
    #[arg(long, default_value = profile::JWT_KID)]
    pub gcp_kid: String,
    /// `email` of the tokens: the calling service account.
    #[arg(long, default_value = profile::GCP_SERVICE_ACCOUNT)]
    pub gcp_email: String,
    /// `aud` of the tokens.
    #[arg(long, default_value = profile::GCP_AUDIENCE)]
    pub gcp_audience: String,
    /// `iss` of the tokens.
    #[arg(long, default_value = profile::GCP_ISSUER)]
    pub gcp_issuer: String,
    /// Azure Managed HSM target (azure-* scenarios): https, host:port of the mTLS listener and the
    /// path prefix. Those scenarios present --client-cert/--client-key, by default the dev
    /// profile's certs/dev/client.pem and client-key.pem.
    #[arg(long, default_value = DEV_AZURE_URL)]
    pub azure_url: String,
    /// Azure key identifier (the HSM key label) the azure-* scenarios wrap and unwrap with.
    #[arg(long, default_value = profile::AZURE_AES_KEY)]
    pub azure_key: String,
    /// Azure wrapping algorithm: A256KW, A256KWP (AES-256 key), RSA-OAEP, RSA-OAEP-256 (RSA key).
    #[arg(long, default_value = "A256KW", value_parser = parse_wrap_algorithm)]
    pub azure_alg: WrapAlgorithm,
    /// Scenarios to run (repeatable or comma-separated); default: all.
    #[arg(long = "scenario", value_enum, value_delimiter = ',')]
    pub scenarios: Vec<Scenario>,
    /// Concurrency levels: one measured run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,32,64")]
    pub concurrency: Vec<usize>,
    /// Keep-alive connections per run; default: one per concurrent request.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Measured window of each run, e.g. 5s, 300ms, 1m.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Traffic before the measured window (connections, caches and CPU clocks settle).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Plaintext bytes per encrypt (and ciphertext bytes per decrypt).
    #[arg(long, default_value_t = 32)]
    pub plaintext_size: usize,
    /// AAD bytes per encrypt/decrypt (0: no AAD field).
    #[arg(long, default_value_t = 64)]
    pub aad_size: usize,
    /// Threads of the load generator's runtime (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Per-request deadline; a request still unanswered counts as a `timeout` error.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Configuration of the HSM for the raw lane (and of the server with --spawn).
    #[arg(long, default_value = "hsm-config/dev.toml")]
    pub config: PathBuf,
    /// Skip the raw HSM lane.
    #[arg(long)]
    pub no_raw: bool,
    /// Start the dev-profile server (`serve --config <config>`) as a child, and stop it at the end.
    #[arg(long)]
    pub spawn: bool,
    /// With --spawn: save the server's stdout/stderr to this file (default: keep only the tail,
    /// shown if the server fails).
    #[arg(long)]
    pub server_log: Option<PathBuf>,
    /// The server's process id, for CPU and memory figures (known by itself with --spawn).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Extra idle keep-alive connections held open during the whole run.
    #[arg(long, default_value_t = 0)]
    pub idle_connections: usize,
    /// The server's admin listener (plain HTTP, `GET /metrics`), to report HSM session reopens
    /// per run; default with --spawn: the dev profile's 127.0.0.1:9090.
    #[arg(long)]
    pub admin: Option<std::net::SocketAddr>,
    /// SoftHSM configuration used when SOFTHSM2_CONF is not set (written if missing with --spawn).
    #[arg(long, default_value = "hsm-config/softhsm2-dev.conf")]
    pub softhsm_conf: PathBuf,
    /// Print one JSON object per scenario and concurrency instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
}

/// Where the server is: parsed from `--url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `https` (true) or `http`.
    pub tls: bool,
    /// Host as written in the URL, without IPv6 brackets: the TLS server name.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Key store path prefix without a trailing slash (may be empty).
    pub prefix: String,
}

impl Target {
    /// Parse `scheme://host[:port][/prefix]` (the value of `--url`).
    pub fn parse(url: &str) -> Result<Self, BenchError> {
        Self::parse_flag("--url", url)
    }

    /// [`Target::parse`] for the value of the option `flag`, which error messages name.
    pub fn parse_flag(flag: &str, url: &str) -> Result<Self, BenchError> {
        let bad = |why: &str| BenchError::Options(format!("{flag} {url:?}: {why}"));
        let uri: http::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be https or http")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            tls,
            host,
            port,
            prefix,
        })
    }

    /// The `Host` header value (and the host the SigV4 signature covers).
    pub fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How the raw HSM lane gets its settings.
#[derive(Clone, Debug)]
pub enum RawLane {
    /// No raw lane.
    Off,
    /// Load `hsm` settings from this configuration file (after `--spawn` set the profile up).
    Config(PathBuf),
    /// Use these settings (tests, tools).
    Settings(Box<HsmSettings>),
}

/// What the Cloud EKM scenarios send, and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcpOptions {
    /// Key URI path prefix without a trailing slash, e.g. `/gcp/v0/keys`.
    pub prefix: String,
    /// Key path.
    pub key_path: String,
    /// HSM key label behind it (the raw lane's key).
    pub hsm_key: String,
    /// Token signing key (PEM).
    pub signer: PathBuf,
    /// Token `kid`.
    pub kid: String,
    /// Token `email`.
    pub email: String,
    /// Token `aud`.
    pub audience: String,
    /// Token `iss`.
    pub issuer: String,
}

/// What the Azure Managed HSM scenarios send, where, and with which client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureOptions {
    /// `--azure-url` as given, for messages.
    pub url: String,
    /// The mTLS listener and path prefix (always https).
    pub target: Target,
    /// Key identifier, which is also the HSM key label (the raw lane's key).
    pub key: String,
    /// The wrapping algorithm.
    pub alg: WrapAlgorithm,
    /// Client certificate and key files: `--client-cert`/`--client-key`, or the dev profile's.
    pub client_identity: (PathBuf, PathBuf),
}

/// How to start the dev-profile server as a child.
#[derive(Clone, Debug)]
pub struct SpawnOptions {
    /// The `ekm-proxy` executable.
    pub exe: PathBuf,
    /// Its configuration; `dev init --root .` creates it first if it is the dev default and absent.
    pub config: PathBuf,
    /// SoftHSM configuration for the child when SOFTHSM2_CONF is not set.
    pub softhsm_conf: Option<PathBuf>,
    /// Save the child's output here; `None` keeps only the tail in memory.
    pub log: Option<PathBuf>,
    /// How long to wait for `GET /ping` to answer.
    pub ready_timeout: Duration,
}

/// A validated benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The server.
    pub target: Target,
    /// CA bundle file (https).
    pub ca: PathBuf,
    /// Client certificate and key files (mTLS).
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// SigV4 access key id.
    pub access_key_id: String,
    /// SigV4 secret.
    pub secret: SecretString,
    /// SigV4 region.
    pub region: String,
    /// Key label.
    pub key: String,
    /// The Cloud EKM scenarios' key and token.
    pub gcp: GcpOptions,
    /// The Azure scenarios' listener, key and algorithm.
    pub azure: AzureOptions,
    /// Scenarios, in run order.
    pub scenarios: Vec<Scenario>,
    /// Concurrency levels, in run order.
    pub concurrency: Vec<usize>,
    /// Connections per run; `None`: one per concurrent request.
    pub connections: Option<usize>,
    /// Measured window.
    pub duration: Duration,
    /// Warm-up before the window.
    pub warmup: Duration,
    /// Plaintext size in bytes.
    pub plaintext_size: usize,
    /// AAD size in bytes (0: none).
    pub aad_size: usize,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// The raw HSM lane.
    pub raw: RawLane,
    /// Start the server as a child.
    pub spawn: Option<SpawnOptions>,
    /// Server pid for /proc figures (ignored with `spawn`, which knows it).
    pub server_pid: Option<u32>,
    /// Idle keep-alive connections held open during the run.
    pub idle_connections: usize,
    /// The server's admin listener, for `ekm_hsm_session_reopens_total`.
    pub admin: Option<std::net::SocketAddr>,
    /// Allow a non-loopback target.
    pub allow_remote: bool,
}

/// The dev profile's Azure target: its mTLS listener and Azure path prefix
/// ([`profile::AZURE_PREFIX`]).
pub const DEV_AZURE_URL: &str = "https://localhost:9443/azure";
/// The dev client certificate the azure-* scenarios present when `--client-cert` is not given
/// (relative to the repository root, like the other dev defaults).
pub const DEV_CLIENT_CERT: &str = "certs/dev/client.pem";
/// Its private key.
pub const DEV_CLIENT_KEY: &str = "certs/dev/client-key.pem";

/// The dev profile's admin port (`hsm-config/dev.toml`).
pub const DEV_ADMIN_PORT: u16 = 9090;

/// Largest concurrency (and connection count) accepted: far beyond what one load generator on
/// the same machine can drive, and it bounds file descriptors.
pub const MAX_CONCURRENCY: usize = 4096;
/// Largest number of idle connections accepted.
pub const MAX_IDLE_CONNECTIONS: usize = 16_384;
/// Largest measured window: the run must stay bounded in time, yet a soak
/// (`hsm-config/soak.sh`) measures one window of 30 minutes or more.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Largest warm-up and per-request deadline.
pub const MAX_WARMUP: Duration = Duration::from_secs(600);

impl BenchOptions {
    /// Parse a `bench` argument list (without the program and subcommand names), for tests and
    /// tools: `BenchOptions::from_cli(["--url", "https://127.0.0.1:4433/ks", "--duration", "300ms"])`.
    pub fn from_cli<I, S>(args: I) -> Result<Self, BenchError>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BenchArgs,
        }
        use clap::Parser as _;
        let argv = std::iter::once(std::ffi::OsString::from("bench"))
            .chain(args.into_iter().map(Into::into));
        let w = Wrapper::try_parse_from(argv).map_err(|e| BenchError::Options(e.to_string()))?;
        Self::from_args(&w.args)
    }

    /// Validate parsed arguments.
    pub fn from_args(a: &BenchArgs) -> Result<Self, BenchError> {
        let target = Target::parse(&a.url)?;
        let opt = |why: String| Err(BenchError::Options(why));
        if a.concurrency.is_empty() || a.concurrency.iter().any(|&c| c == 0 || c > MAX_CONCURRENCY)
        {
            return opt(format!(
                "--concurrency: each value must be in 1..={MAX_CONCURRENCY}"
            ));
        }
        if let Some(n) = a.connections
            && (n == 0 || n > MAX_CONCURRENCY)
        {
            return opt(format!("--connections must be in 1..={MAX_CONCURRENCY}"));
        }
        if a.duration.is_zero() || a.duration > MAX_DURATION {
            return opt(format!(
                "--duration must be more than 0 and at most {}s",
                MAX_DURATION.as_secs()
            ));
        }
        if a.warmup > MAX_WARMUP || a.request_timeout.is_zero() || a.request_timeout > MAX_WARMUP {
            return opt(format!(
                "--warmup and --request-timeout must be at most {}s (and the timeout more than 0)",
                MAX_WARMUP.as_secs()
            ));
        }
        if a.client_threads == 0 || a.client_threads > 64 {
            return opt("--client-threads must be in 1..=64".into());
        }
        if a.idle_connections > MAX_IDLE_CONNECTIONS {
            return opt(format!(
                "--idle-connections must be at most {MAX_IDLE_CONNECTIONS}"
            ));
        }
        // The spec caps plaintext at 4300 bytes minimum supported; the dev server accepts 64 KiB.
        // Bigger values are allowed (the server answers what it answers), within reason.
        if a.plaintext_size > 1 << 20 || a.aad_size > u16::MAX as usize {
            return opt(
                "--plaintext-size must be at most 1 MiB and --aad-size at most 65535".into(),
            );
        }
        if let Some(admin) = a.admin
            && !admin.ip().is_loopback()
            && !a.allow_remote
        {
            return opt(format!(
                "--admin {admin} is not a loopback address; add --allow-remote"
            ));
        }
        if !a.gcp_prefix.starts_with('/') || a.gcp_prefix.contains(['?', '#', ' ']) {
            return opt(format!(
                "--gcp-prefix {:?} must be a URL path starting with /",
                a.gcp_prefix
            ));
        }
        if a.gcp_key.is_empty() || a.gcp_key.contains(['?', '#', ' ', ':']) {
            return opt(format!("--gcp-key {:?} is not a key path", a.gcp_key));
        }
        let azure_target = Target::parse_flag("--azure-url", &a.azure_url)?;
        // The Azure front authenticates callers by their client certificate only.
        if !azure_target.tls {
            return opt(format!(
                "--azure-url {:?}: the Azure front is mutual TLS only; use https",
                a.azure_url
            ));
        }
        if !crate::front::azure::settings::valid_prefix(&azure_target.prefix) {
            return opt(format!(
                "--azure-url {:?}: needs the Azure path prefix, e.g. {DEV_AZURE_URL}",
                a.azure_url
            ));
        }
        if !crate::front::azure::settings::valid_key_id(&a.azure_key) {
            return opt(format!(
                "--azure-key {:?}: a key identifier is 1 to 64 characters of A-Z, a-z, 0-9 and -",
                a.azure_key
            ));
        }
        let mut scenarios = if a.scenarios.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            a.scenarios.clone()
        };
        dedup_keep_order(&mut scenarios);
        let mut concurrency = a.concurrency.clone();
        dedup_keep_order(&mut concurrency);
        let client_identity = match (&a.client_cert, &a.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return opt("--client-cert and --client-key go together".into()),
        };
        // Only the Azure scenarios fall back to the dev client certificate: the XKS and Cloud
        // EKM listeners keep presenting none unless asked, as before.
        let azure_identity = client_identity
            .clone()
            .unwrap_or_else(|| (DEV_CLIENT_CERT.into(), DEV_CLIENT_KEY.into()));
        let spawn = if a.spawn {
            Some(SpawnOptions {
                exe: std::env::current_exe().map_err(|e| {
                    BenchError::Options(format!("cannot find the ekm-proxy executable: {e}"))
                })?,
                config: a.config.clone(),
                softhsm_conf: Some(a.softhsm_conf.clone()),
                log: a.server_log.clone(),
                ready_timeout: Duration::from_secs(30),
            })
        } else {
            None
        };
        Ok(Self {
            target,
            ca: a.ca.clone(),
            client_identity,
            access_key_id: a.access_key_id.clone(),
            secret: SecretString::from(a.secret.as_str()),
            region: a.region.clone(),
            key: a.key.clone(),
            gcp: GcpOptions {
                prefix: a.gcp_prefix.trim_end_matches('/').to_owned(),
                key_path: a.gcp_key.clone(),
                hsm_key: a.gcp_hsm_key.clone().unwrap_or_else(|| a.gcp_key.clone()),
                signer: a.gcp_signer.clone(),
                kid: a.gcp_kid.clone(),
                email: a.gcp_email.clone(),
                audience: a.gcp_audience.clone(),
                issuer: a.gcp_issuer.clone(),
            },
            azure: AzureOptions {
                url: a.azure_url.clone(),
                target: azure_target,
                key: a.azure_key.clone(),
                alg: a.azure_alg,
                client_identity: azure_identity,
            },
            scenarios,
            concurrency,
            connections: a.connections,
            duration: a.duration,
            warmup: a.warmup,
            plaintext_size: a.plaintext_size,
            aad_size: a.aad_size,
            request_timeout: a.request_timeout,
            raw: if a.no_raw {
                RawLane::Off
            } else {
                RawLane::Config(a.config.clone())
            },
            spawn,
            server_pid: a.server_pid,
            idle_connections: a.idle_connections,
            admin: a.admin.or_else(|| {
                a.spawn
                    .then(|| std::net::SocketAddr::from(([127, 0, 0, 1], DEV_ADMIN_PORT)))
            }),
            allow_remote: a.allow_remote,
        })
    }
}

fn dedup_keep_order<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut seen = Vec::with_capacity(v.len());
    v.retain(|x| {
        if seen.contains(x) {
            false
        } else {
            seen.push(*x);
            true
        }
    });
}

/// Parse a JOSE wrapping algorithm name, exactly as the Azure API spells it.
pub fn parse_wrap_algorithm(s: &str) -> Result<WrapAlgorithm, String> {
    WrapAlgorithm::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = WrapAlgorithm::ALL.iter().map(|a| a.name()).collect();
        format!("{s:?} is not one of {}", names.join(", "))
    })
}

/// Parse `5s`, `300ms`, `1.5s`, `2m`, `250us`, or bare seconds (`5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 5s, 300ms)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use us, ms, s or m)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn urls() {
        let t = Target::parse("https://localhost:8443/dev-keystore/").unwrap();
        assert_eq!(
            t,
            Target {
                tls: true,
                host: "localhost".into(),
                port: 8443,
                prefix: "/dev-keystore".into()
            }
        );
        assert_eq!(t.host_header(), "localhost:8443");
        let t = Target::parse("http://127.0.0.1").unwrap();
        assert_eq!((t.tls, t.port, t.prefix.as_str()), (false, 80, ""));
        let t = Target::parse("https://[::1]:9443/a/b").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("::1", 9443, "/a/b")
        );
        assert_eq!(t.host_header(), "[::1]:9443");
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("localhost:8443").is_err());
        assert!(Target::parse("https://h/p?x=1").is_err());
    }

    #[test]
    fn defaults_are_the_dev_profile() {
        let o = BenchOptions::from_cli(Vec::<String>::new()).unwrap();
        assert_eq!(o.target.prefix, profile::PREFIX);
        assert_eq!(o.access_key_id, profile::ACCESS_KEY_ID);
        assert_eq!(o.secret.expose(), profile::SECRET);
        assert_eq!(o.scenarios, Scenario::ALL.to_vec());
        assert_eq!(o.concurrency, vec![1, 32, 64]);
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.warmup, Duration::from_secs(1));
        assert_eq!((o.plaintext_size, o.aad_size), (32, 64));
        assert!(matches!(o.raw, RawLane::Config(_)));
        assert!(o.spawn.is_none() && o.connections.is_none());
        assert_eq!(o.gcp.prefix, profile::GCP_PREFIX);
        assert_eq!(o.gcp.key_path, profile::GCP_KEY_PATH);
        assert_eq!(o.gcp.hsm_key, profile::GCP_KEY_PATH);
        assert_eq!(o.gcp.kid, profile::JWT_KID);
        assert_eq!(o.gcp.email, profile::GCP_SERVICE_ACCOUNT);
        assert_eq!(o.gcp.audience, profile::GCP_AUDIENCE);
        assert_eq!(o.gcp.issuer, profile::GCP_ISSUER);
        assert_eq!(
            o.gcp.signer,
            std::path::PathBuf::from(profile::JWT_SIGNER_PATH)
        );
    }

    #[test]
    fn gcp_scenarios() {
        let o = BenchOptions::from_cli([
            "--scenario",
            "gcp-wrap,gcp-unwrap-fresh",
            "--gcp-prefix",
            "/ekm/",
            "--gcp-key",
            "a/b",
            "--gcp-hsm-key",
            "label-1",
        ])
        .unwrap();
        assert_eq!(
            o.scenarios,
            vec![Scenario::GcpWrap, Scenario::GcpUnwrapFresh]
        );
        assert_eq!(
            (
                o.gcp.prefix.as_str(),
                o.gcp.key_path.as_str(),
                o.gcp.hsm_key.as_str()
            ),
            ("/ekm", "a/b", "label-1")
        );
        assert!(Scenario::GcpWrapFresh.fresh_token() && !Scenario::GcpWrap.fresh_token());
        assert!(
            Scenario::ALL
                .iter()
                .filter(|s| s.is_gcp())
                .all(|s| s.has_raw_lane())
        );
        assert!(!Scenario::Encrypt.is_gcp());
        for s in Scenario::ALL {
            assert_eq!(
                clap::ValueEnum::to_possible_value(&s).unwrap().get_name(),
                s.as_str()
            );
        }
        for bad in [
            vec!["--gcp-prefix", "gcp"],
            vec!["--gcp-key", "k:wrap"],
            vec!["--gcp-key", ""],
        ] {
            assert!(
                BenchOptions::from_cli(bad.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn azure_scenarios() {
        let o = BenchOptions::from_cli(["--scenario", "azure-wrap,azure-unwrap"]).unwrap();
        assert_eq!(
            o.scenarios,
            vec![Scenario::AzureWrap, Scenario::AzureUnwrap]
        );
        assert!(o.scenarios.iter().all(|s| s.is_azure() && s.has_raw_lane()));
        assert!(!Scenario::GcpWrap.is_azure() && !Scenario::AzureWrap.is_gcp());
        // The dev profile: its mTLS listener, Azure prefix and AES key-encryption key, and its
        // client certificate for these scenarios only.
        assert_eq!(
            DEV_AZURE_URL,
            format!("https://localhost:9443{}", profile::AZURE_PREFIX)
        );
        assert_eq!(o.azure.target.port, 9443);
        assert_eq!(o.azure.target.prefix, profile::AZURE_PREFIX);
        assert_eq!(o.azure.key, profile::AZURE_AES_KEY);
        assert_eq!(o.azure.alg, WrapAlgorithm::A256Kw);
        assert_eq!(
            o.azure.client_identity,
            (DEV_CLIENT_CERT.into(), DEV_CLIENT_KEY.into())
        );
        assert!(
            o.client_identity.is_none(),
            "the XKS target keeps no client certificate"
        );

        let o = BenchOptions::from_cli([
            "--azure-url",
            "https://127.0.0.1:4443/mhsm/pool-a/",
            "--azure-key",
            profile::AZURE_RSA_KEY,
            "--azure-alg",
            "RSA-OAEP-256",
            "--client-cert",
            "c.pem",
            "--client-key",
            "k.pem",
        ])
        .unwrap();
        assert_eq!(o.azure.target.prefix, "/mhsm/pool-a");
        assert_eq!(o.azure.alg, WrapAlgorithm::RsaOaep256);
        assert_eq!(o.azure.client_identity, ("c.pem".into(), "k.pem".into()));
        assert_eq!(o.client_identity, Some(("c.pem".into(), "k.pem".into())));
        for alg in ["A256KW", "A256KWP", "RSA-OAEP", "RSA-OAEP-256"] {
            let o = BenchOptions::from_cli(["--azure-alg", alg]).unwrap();
            assert_eq!(o.azure.alg.name(), alg);
        }
        for bad in [
            vec!["--azure-alg", "a256kw"],
            vec!["--azure-alg", "RSA1_5"],
            vec!["--azure-url", "http://localhost:9443/azure"],
            vec!["--azure-url", "https://localhost:9443"],
            vec![
                "--azure-url",
                "https://localhost:9443/azure?api-version=0.1-preview",
            ],
            vec!["--azure-key", "dev_aes"],
            vec!["--azure-key", ""],
        ] {
            assert!(
                BenchOptions::from_cli(bad.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn lists_and_validation() {
        let o = BenchOptions::from_cli([
            "--scenario",
            "decrypt-bad-tag,encrypt",
            "--scenario",
            "encrypt",
            "--concurrency",
            "4,1,4",
            "--duration",
            "300ms",
            "--no-raw",
            "--spawn",
        ])
        .unwrap();
        assert_eq!(
            o.scenarios,
            vec![Scenario::DecryptBadTag, Scenario::Encrypt]
        );
        assert_eq!(o.concurrency, vec![4, 1]);
        assert!(matches!(o.raw, RawLane::Off));
        assert!(o.spawn.is_some());
        for bad in [
            vec!["--concurrency", "0"],
            vec!["--duration", "0s"],
            vec!["--connections", "0"],
            vec!["--client-threads", "0"],
            vec!["--scenario", "sign"],
            vec!["--client-cert", "c.pem"],
            vec!["--aad-size", "70000"],
        ] {
            assert!(
                BenchOptions::from_cli(bad.clone()).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
