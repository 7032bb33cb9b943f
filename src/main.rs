//! The `ekm-proxy` command: serve, validate configuration, explain the policy, inspect keys, set
//! up the dev profile, and benchmark. Exit codes: 0 success, 1 runtime failure, 64 configuration
//! error (`policy explain`: 0 allow, 1 deny, 64 bad configuration or request file).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ekm_proxy::config::{self, EXIT_CONFIG};
use ekm_proxy::core::state::StateTarget;
#[cfg(feature = "tools")]
use ekm_proxy::dev::profile;
use ekm_proxy::fleet_admin;

#[derive(Parser)]
#[command(
    name = "ekm-proxy",
    version,
    about = "External key manager proxy in front of a PKCS#11 HSM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured listeners until SIGTERM or ctrl-c (SIGHUP reloads).
    Serve {
        /// Configuration file.
        #[arg(long, env = "EKM_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Validate the configuration (files, secrets, limits) and report every problem.
    CheckConfig {
        /// Configuration file.
        #[arg(long, env = "EKM_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Print what each cloud's console asks for to connect: XKS endpoint, path and proxy
    /// configuration file, Alibaba fingerprint, Cloud EKM key URIs, Azure URIs and CA.
    ConnectInfo {
        /// Configuration file.
        #[arg(long, env = "EKM_PROXY_CONFIG")]
        config: PathBuf,
        /// Only the XKS key store, Cloud EKM key path or Azure prefix with this name.
        #[arg(long)]
        name: Option<String>,
        /// Include the SigV4 secret in the XKS proxy configuration file.
        #[arg(long)]
        with_secret: bool,
    },
    /// Explain authorization decisions from the configuration alone (no HSM needed).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List, create, import, disable and enable keys on the configured token.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Disable or enable a key store fleet-wide (an XKS key store, `gcp`, or an Azure prefix):
    /// the state lives in the HSM and every replica on the token obeys within
    /// `security.state_poll_secs`.
    Keystore {
        #[command(subcommand)]
        command: SwitchCommand,
    },
    /// Engage or release the fleet-wide kill switch (in the HSM; the local kill-switch file
    /// stays as break-glass).
    Killswitch {
        #[command(subcommand)]
        command: KillCommand,
    },
    /// Show the fleet state in the HSM: disabled keys and key stores, the kill switch, who set
    /// them, when and why.
    State {
        /// Configuration file.
        #[arg(long, env = "EKM_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Check the tamper-evident audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Dev profile helpers (dev only: fixed, public credentials).
    #[cfg(feature = "tools")]
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Benchmark a server over HTTPS with signed XKS requests, and the raw HSM lane (BENCHMARKS.md).
    #[cfg(feature = "tools")]
    Bench(Box<ekm_proxy::bench::BenchArgs>),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Decide a sample request as the server would, and show the rule or grant that decided.
    /// Exit 0 when allowed, 1 when denied, 64 on a bad configuration or request file.
    Explain {
        /// Configuration file (the HSM PIN and SigV4 secrets need not be resolvable).
        #[arg(long, env = "EKM_PROXY_CONFIG")]
        config: PathBuf,
        /// Sample request: a JSON file (see README, "Policy"), or `-` for standard input.
        #[arg(long)]
        request: PathBuf,
        /// Print one JSON object instead of the human-readable report.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List every key: label, type, size, usage, custody attributes, and whether the proxy can use it.
    List {
        /// Configuration file.
        #[arg(long, env = "EKM_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Generate a key inside the HSM (sensitive, non-extractable token object with a unique
    /// CKA_ID); refuses a label that exists.
    Create(KeyArgs),
    /// Import 32 raw bytes (a binary file, or 64 hex digits) as a sensitive, non-extractable
    /// AES-256 key. For known-answer tests and BYOK ceremonies: weaker than `create`, because the
    /// key existed outside the HSM. Refuses a label that exists.
    Import {
        #[command(flatten)]
        key: KeyArgs,
        /// File holding the key: 32 bytes, or 64 hexadecimal digits.
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Refuse every operation with this key on every replica (state in the HSM): XKS
    /// InvalidStateException and GetKeyMetadata DISABLED, Cloud EKM FAILED_PRECONDITION, Azure 403.
    Disable(SwitchArgs),
    /// Undo `keys disable`.
    Enable(SwitchArgs),
}

#[derive(Subcommand)]
enum SwitchCommand {
    /// Refuse every request to the key store on every replica.
    Disable(SwitchArgs),
    /// Undo `disable`.
    Enable(SwitchArgs),
}

/// What `disable`/`enable` act on, and the record they leave.
#[derive(clap::Args)]
struct SwitchArgs {
    /// Key label, or key store name (XKS key store, `gcp`, Azure prefix; `xks:NAME` or
    /// `azure:NAME` when a name is on both).
    name: String,
    #[command(flatten)]
    record: RecordArgs,
}

#[derive(Subcommand)]
enum KillCommand {
    /// Refuse every key operation on every replica.
    Engage(RecordArgs),
    /// Undo `engage`.
    Release(RecordArgs),
}

/// The configuration naming the HSM, and the record a state change leaves in it.
#[derive(clap::Args)]
struct RecordArgs {
    /// Configuration file (its [hsm] section names the module, token and PIN).
    #[arg(long, env = "EKM_PROXY_CONFIG")]
    config: PathBuf,
    /// Who makes the change, for the audit trail (default: $SUDO_USER or $USER @ host).
    #[arg(long)]
    by: Option<String>,
    /// Why, for the audit trail.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check order, hashes and HSM-made checkpoints of audit files (oldest first) and report the
    /// first break by file and line. Exit 0: intact; 1: broken; 2: could not check.
    Verify {
        /// Audit files, oldest first (default: the configured audit file and its rotations).
        files: Vec<PathBuf>,
        /// Configuration: checks each checkpoint's MAC in its HSM (without it, only the chain).
        #[arg(long, env = "EKM_PROXY_CONFIG")]
        config: Option<PathBuf>,
        /// The last file is still being written: lines after its last checkpoint are noted, not
        /// a break.
        #[arg(long)]
        live: bool,
    },
}

/// The key a `keys create` or `keys import` makes.
#[derive(clap::Args)]
struct KeyArgs {
    /// Configuration file (its [hsm] section names the module, token and PIN).
    #[arg(long, env = "EKM_PROXY_CONFIG")]
    config: PathBuf,
    /// CKA_LABEL: the key's external id.
    #[arg(long)]
    label: String,
    /// aes256, rsa2048, rsa3072, rsa4096 or hmac-sha256 (the audit checkpoint key; import:
    /// aes256 only).
    #[arg(long = "type", default_value = "aes256")]
    kind: String,
    /// Comma-separated usage: encrypt, decrypt, wrap, unwrap (default: encrypt,decrypt for AES;
    /// all four for RSA).
    #[arg(long, value_delimiter = ',')]
    usage: Vec<String>,
}

#[cfg(feature = "tools")]
#[derive(Subcommand)]
enum DevCommand {
    /// Create (idempotently) the dev token and keys, the dev certificates and hsm-config/dev.toml.
    Init {
        /// Repository root (where certs/ and hsm-config/ live).
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// PKCS#11 module; default: the installed SoftHSMv2.
        #[arg(long)]
        module: Option<PathBuf>,
    },
    /// Print a Google-style RS256 token signed by the dev signer (for curl against /gcp/v0/keys).
    Token(DevTokenArgs),
}

/// `ekm-proxy dev token`: the claims Cloud KMS's tokens carry, signed by the dev JWT signer.
#[cfg(feature = "tools")]
#[derive(clap::Args)]
struct DevTokenArgs {
    /// `email` claim: the calling service account.
    #[arg(long, default_value = profile::GCP_SERVICE_ACCOUNT)]
    email: String,
    /// `aud` claim.
    #[arg(long, default_value = profile::GCP_AUDIENCE)]
    audience: String,
    /// The RSA signing key (PKCS#8 PEM), created by `ekm-proxy dev init`.
    #[arg(long, default_value = profile::JWT_SIGNER_PATH)]
    signer: PathBuf,
    /// `kid` header: the JWKS key id of the signer.
    #[arg(long, default_value = profile::JWT_KID)]
    kid: String,
    /// Seconds from now until `exp`.
    #[arg(long, default_value_t = 3600)]
    lifetime_secs: u64,
    /// `iss` claim.
    #[arg(long, default_value = profile::GCP_ISSUER)]
    issuer: String,
}

fn main() -> ExitCode {
    // Before anything can touch jsonwebtoken: its provider is fixed by first use.
    ekm_proxy::auth::jwt::ring_verify::install();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::ConnectInfo {
            config,
            name,
            with_secret,
        } => connect_info(&config, name, with_secret),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    config,
                    request,
                    json,
                },
        } => policy_explain(&config, &request, json),
        Command::Keys {
            command: KeysCommand::List { config },
        } => keys_list(&config),
        Command::Keys {
            command: KeysCommand::Create(args),
        } => keys_make(&args, None),
        Command::Keys {
            command: KeysCommand::Import { key, key_file },
        } => keys_make(&key, Some(&key_file)),
        Command::Keys {
            command: KeysCommand::Disable(a),
        } => switch(&a.name, &a.record, true, key_target),
        Command::Keys {
            command: KeysCommand::Enable(a),
        } => switch(&a.name, &a.record, false, key_target),
        Command::Keystore {
            command: SwitchCommand::Disable(a),
        } => switch(&a.name, &a.record, true, store_target),
        Command::Keystore {
            command: SwitchCommand::Enable(a),
        } => switch(&a.name, &a.record, false, store_target),
        Command::Killswitch {
            command: KillCommand::Engage(a),
        } => switch("", &a, true, kill_target),
        Command::Killswitch {
            command: KillCommand::Release(a),
        } => switch("", &a, false, kill_target),
        Command::State { config } => state_show(&config),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    config,
                    live,
                },
        } => audit_verify(&files, config.as_deref(), live),
        #[cfg(feature = "tools")]
        Command::Dev {
            command: DevCommand::Init { root, module },
        } => dev_init(&root, module),
        #[cfg(feature = "tools")]
        Command::Dev {
            command: DevCommand::Token(args),
        } => dev_token(&args),
        #[cfg(feature = "tools")]
        Command::Bench(args) => ekm_proxy::bench::main(*args),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn load(path: &std::path::Path) -> Result<config::Settings, i32> {
    config::load(path).map_err(|e| {
        eprint!("{e}");
        EXIT_CONFIG
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the async runtime: {e}");
            1
        })
}

fn serve(path: &std::path::Path) -> i32 {
    let settings = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let _guard = match ekm_proxy::logging::init(&settings.logging) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot open the audit file: {e}");
            return EXIT_CONFIG;
        }
    };
    match runtime() {
        Ok(rt) => rt.block_on(ekm_proxy::app::serve(settings)),
        Err(code) => code,
    }
}

fn check_config(path: &std::path::Path) -> i32 {
    match load(path) {
        Ok(s) => {
            println!(
                "{}: OK ({} listener(s), {} XKS key store(s), {} Cloud EKM key(s), token {})",
                path.display(),
                s.listeners.len(),
                s.xks.key_stores.len(),
                s.gcp.as_ref().map_or(0, |g| g.keys.len()),
                s.hsm.token
            );
            0
        }
        Err(code) => code,
    }
}

fn connect_info(path: &std::path::Path, name: Option<String>, with_secret: bool) -> i32 {
    let settings = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let options = ekm_proxy::connect_info::Options { name, with_secret };
    match ekm_proxy::connect_info::render(&settings, &options) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            e.exit_code()
        }
    }
}

fn policy_explain(config: &std::path::Path, request: &std::path::Path, json: bool) -> i32 {
    match ekm_proxy::policy_explain::run(config, request) {
        Ok(explanation) => {
            if json {
                println!("{}", explanation.to_json());
            } else {
                print!("{}", explanation.to_text());
            }
            explanation.exit_code()
        }
        Err(e) => {
            // A configuration error's Display ends with its own newline.
            let text = e.to_string();
            eprintln!("{}", text.trim_end());
            e.exit_code()
        }
    }
}

fn keys_list(path: &std::path::Path) -> i32 {
    let settings = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    ekm_proxy::logging::init_cli("warn");
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let metrics = ekm_proxy::metrics::Metrics::standalone();
        let hsm = settings.hsm.clone();
        let started = tokio::task::spawn_blocking(move || {
            ekm_proxy::hsm::Pkcs11Backend::start(hsm, metrics.hsm.clone(), metrics.cache.clone())
        })
        .await;
        let backend = match started {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                eprintln!("HSM: {e}");
                return 1;
            }
            Err(e) => {
                eprintln!("start-up task failed: {e}");
                return 1;
            }
        };
        let keys = match backend.list_keys().await {
            Ok(k) => k,
            Err(e) => {
                eprintln!("cannot list keys: {e}");
                return 1;
            }
        };
        println!("{}", keys_table(&keys));
        backend.shutdown();
        0
    })
}

fn store_target(
    settings: &config::Settings,
    name: &str,
) -> Result<StateTarget, fleet_admin::AdminError> {
    fleet_admin::resolve_store(settings, name).map(StateTarget::Store)
}

/// `keys|keystore disable|enable` and `killswitch engage|release`: one line on success.
fn switch(
    name: &str,
    args: &RecordArgs,
    disable: bool,
    target: impl Fn(&config::Settings, &str) -> Result<StateTarget, fleet_admin::AdminError>,
) -> i32 {
    let settings = match load(&args.config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    ekm_proxy::logging::init_cli("warn");
    let by = fleet_admin::operator(args.by.as_deref());
    let done = target(&settings, name)
        .and_then(|t| fleet_admin::set_state(&settings, &t, disable, &by, &args.reason));
    report(done)
}

fn key_target(_: &config::Settings, name: &str) -> Result<StateTarget, fleet_admin::AdminError> {
    Ok(StateTarget::Key(name.to_owned()))
}

fn kill_target(_: &config::Settings, _: &str) -> Result<StateTarget, fleet_admin::AdminError> {
    Ok(StateTarget::KillSwitch)
}

fn state_show(path: &std::path::Path) -> i32 {
    let settings = match load(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    ekm_proxy::logging::init_cli("warn");
    match fleet_admin::show_state(&settings) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            e.exit_code()
        }
    }
}

fn report(done: Result<String, fleet_admin::AdminError>) -> i32 {
    match done {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            e.exit_code()
        }
    }
}

fn audit_verify(files: &[PathBuf], config: Option<&std::path::Path>, live: bool) -> i32 {
    let settings = match config.map(load).transpose() {
        Ok(s) => s,
        Err(code) => return code,
    };
    ekm_proxy::logging::init_cli("warn");
    match fleet_admin::verify_audit(files, settings.as_ref(), live) {
        Ok(report) => {
            print!("{}", fleet_admin::render_report(&report));
            if report.ok() { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("cannot verify: {e}");
            2
        }
    }
}

/// `keys create` (no key file) or `keys import`: one readable line on success.
fn keys_make(args: &KeyArgs, key_file: Option<&std::path::Path>) -> i32 {
    use ekm_proxy::hsm::{KeyKind, KeySpec};
    let settings = match load(&args.config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    ekm_proxy::logging::init_cli("warn");
    let Some(kind) = KeyKind::from_name(&args.kind) else {
        let names: Vec<&str> = KeyKind::ALL.iter().map(|(_, n)| *n).collect();
        eprintln!(
            "unknown key type \"{}\"; one of: {}",
            args.kind,
            names.join(", ")
        );
        return 64;
    };
    let mut spec = KeySpec::new(args.label.clone(), kind);
    if kind == KeyKind::HmacSha256 && !args.usage.is_empty() {
        eprintln!("an hmac-sha256 key signs and verifies only; --usage does not apply");
        return 64;
    }
    if !args.usage.is_empty() {
        match spec.with_usage(args.usage.iter().map(String::as_str)) {
            Ok(s) => spec = s,
            Err(e) => {
                eprintln!("{e}");
                return 64;
            }
        }
    }
    let hsm = &settings.hsm;
    let made = match key_file {
        None => ekm_proxy::hsm::create_key(&hsm.module, &hsm.token, &hsm.user_pin, &spec),
        Some(path) => match read_key_file(path) {
            Ok(value) => ekm_proxy::hsm::import_aes_key(
                &hsm.module,
                &hsm.token,
                &hsm.user_pin,
                &spec,
                &value,
            ),
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return 64;
            }
        },
    };
    match made {
        Ok(report) => {
            println!("{report}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// A key file: exactly 32 bytes, or 64 hex digits (surrounding white space ignored). The bytes
/// are zeroized when dropped.
fn read_key_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let raw = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| e.to_string())?);
    if raw.len() == 32 {
        return Ok(raw);
    }
    let text = std::str::from_utf8(&raw)
        .map_err(|_| format!("{} bytes: want 32 bytes or 64 hex digits", raw.len()))?
        .trim();
    if text.len() != 64 {
        return Err(format!(
            "{} bytes: want 32 bytes or 64 hex digits",
            raw.len()
        ));
    }
    hex::decode(text)
        .map(zeroize::Zeroizing::new)
        .map_err(|_| "not 64 hex digits".to_owned())
}

#[cfg(feature = "tools")]
fn dev_init(root: &std::path::Path, module: Option<PathBuf>) -> i32 {
    ekm_proxy::logging::init_cli("info");
    match ekm_proxy::dev::profile::init(root, module) {
        Ok(report) => {
            println!("{report}");
            0
        }
        Err(e) => {
            eprintln!("dev init failed: {e}");
            1
        }
    }
}

/// Mints one token and prints it alone on stdout, so `TOKEN=$(ekm-proxy dev token)` works.
#[cfg(feature = "tools")]
fn dev_token(args: &DevTokenArgs) -> i32 {
    use ekm_proxy::client::gcp::{TokenClaims, TokenSigner};
    let signer = match TokenSigner::from_pem_file(&args.signer, args.kid.as_str()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e} (create the dev signer with `ekm-proxy dev init`)");
            return 1;
        }
    };
    let mut claims = TokenClaims::dev(
        &args.email,
        &args.audience,
        std::time::Duration::from_secs(args.lifetime_secs),
    );
    claims.iss.clone_from(&args.issuer);
    match signer.mint(&claims) {
        Ok(token) => {
            println!("{token}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// `keys list` output: one row per key, and whether the proxy would use it (and why not).
fn keys_table(keys: &[ekm_proxy::core::KeyInfo]) -> String {
    let mut out = format!(
        "{:<32} {:<16} {:<40} {:<9} {:<11} {}\n",
        "LABEL", "SPEC", "USAGE", "SENSITIVE", "EXTRACTABLE", "USABLE BY PROXY"
    );
    for k in keys {
        let usable = match (&k.custody_violation, k.is_aes_256()) {
            (Some(why), _) => format!("no: {why}"),
            (None, false) => "no: only AES-256 keys serve XKS requests".to_owned(),
            (None, true) if !k.usage.encrypt && !k.usage.decrypt => {
                "no: neither encrypt nor decrypt allowed".to_owned()
            }
            (None, true) => "yes".to_owned(),
        };
        out.push_str(&format!(
            "{:<32} {:<16} {:<40} {:<9} {:<11} {}\n",
            k.label,
            k.key_spec(),
            k.usage.names().join(","),
            k.sensitive,
            k.extractable,
            usable
        ));
    }
    out
}
