//! Configuration: every problem is reported at once with its key path; `check-config` exits 64 on
//! error and 0 on success; secrets never appear in errors or `Debug` output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

const GOOD_CREDENTIAL: &str = r#"
[[xks.key_store.credential]]
access_key_id = "DEVXKSACCESSKEYIDABCD"
secret = "devXksSecretAccessKeyNotForProductionUse0123456789"
"#;

fn module() -> String {
    // Any existing file passes the module-path check; parsing never loads it.
    std::env::current_exe().unwrap().display().to_string()
}

fn good_config() -> String {
    format!(
        r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"
plain_http = true

[hsm]
module = "{module}"
token_label = "t"
user_pin = "1234"

[[xks.key_store]]
name = "dev"
path_prefix = "/dev"
regions = ["us-east-1"]
keys = ["*"]
{GOOD_CREDENTIAL}
"#,
        module = module()
    )
}

#[test]
fn a_good_config_validates() {
    let settings =
        ekm_proxy::config::from_str(&good_config(), Path::new("t.toml"), Path::new("/")).unwrap();
    assert_eq!(settings.listeners.len(), 1);
    assert_eq!(settings.xks.key_stores[0].prefix, "/dev");
    assert_eq!(
        settings.xks.key_stores[0].ciphertext_metadata,
        vec![0x01],
        "spec framing writes a version byte"
    );
    // `["*"]` exposes every key but the health-check key; a list exposes only what it names.
    let all = &settings.xks.key_stores[0].keys;
    assert!(all.allows("dev-aes-1") && all.allows("anything"));
    assert!(!all.allows("ekm-health-check"));
    let listed = ekm_proxy::config::from_str(
        &good_config().replace(r#"keys = ["*"]"#, r#"keys = ["dev-aes-1", "team-*"]"#),
        Path::new("t.toml"),
        Path::new("/"),
    )
    .unwrap();
    let listed = &listed.xks.key_stores[0].keys;
    assert!(listed.allows("dev-aes-1") && listed.allows("team-7"));
    assert!(!listed.allows("other") && !listed.allows("ekm-health-check"));
    let debug = format!("{settings:?}");
    assert!(
        !debug.contains("devXksSecretAccessKey"),
        "SigV4 secret leaked into Debug"
    );
    assert!(!debug.contains("\"1234\""), "PIN leaked into Debug");
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let text = r#"
[server]
max_body_bytes = 10

[[listener]]
address = "nonsense"

[[listener]]
address = "0.0.0.0:8443"

[hsm]
module = "/nonexistent/libpkcs11.so"
user_pin = { env = "EKM_TEST_SURELY_UNSET_VARIABLE" }
workers = 0

[health]
max_age_secs = 120

[[xks.key_store]]
name = "a"
path_prefix = "no-leading-slash/"
regions = []
keys = []
max_plaintext_bytes = 100
max_aad_bytes = 70000
aad_framing = "rot13"
[[xks.key_store.credential]]
access_key_id = "lowercase-is-invalid"
secret = "short"
[[xks.key_store.rule]]
name = "r"
attribute = "notAnAttribute"
operations = ["sign"]
allow = []
[[xks.key_store.rule]]
name = "arn-binding-without-operations"
attribute = "kmsKeyArn"
allow = ["*"]
"#;
    let err = ekm_proxy::config::from_str(text, Path::new("bad.toml"), Path::new("/")).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "server.max_body_bytes",
        "listener[0].address",
        "listener[0].tls",
        "listener[1].tls",
        "hsm.module",
        "hsm.token_label",
        "hsm.user_pin",
        "hsm.workers",
        "health.max_age_secs",
        "xks.key_store[0].path_prefix",
        "xks.key_store[0].regions",
        "xks.key_store[0].keys",
        "xks.key_store[0].max_plaintext_bytes",
        "xks.key_store[0].max_aad_bytes",
        "xks.key_store[0].aad_framing",
        "xks.key_store[0].credential[0].access_key_id",
        "xks.key_store[0].credential[0].secret",
        "xks.key_store[0].rule[0].attribute",
        "xks.key_store[0].rule[0].operations",
        "xks.key_store[0].rule[0].allow",
        "xks.key_store[0].rule[1].operations",
    ] {
        assert!(
            paths.contains(&expected),
            "missing problem for {expected}; got {paths:#?}"
        );
    }
    let text = err.to_string();
    assert!(
        !text.contains("short\""),
        "secret value in the error text: {text}"
    );
}

#[test]
fn unknown_keys_and_syntax_errors_are_refused() {
    let typo = good_config().replace("token_label", "token_lable");
    let err = ekm_proxy::config::from_str(&typo, Path::new("t.toml"), Path::new("/")).unwrap_err();
    assert!(err.to_string().contains("token_lable"), "{err}");
    let err = ekm_proxy::config::from_str("[hsm", Path::new("t.toml"), Path::new("/")).unwrap_err();
    assert_eq!(err.problems[0].path, "(syntax)");
}

#[test]
fn secrets_from_files_and_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pin"), "9876\n").unwrap();
    std::fs::write(
        dir.path().join("xks-secret"),
        "devXksSecretAccessKeyNotForProductionUse0123456789\n",
    )
    .unwrap();
    let text = good_config()
        .replace("user_pin = \"1234\"", "user_pin = { file = \"pin\" }")
        .replace(
            "secret = \"devXksSecretAccessKeyNotForProductionUse0123456789\"",
            "secret = { file = \"xks-secret\" }",
        );
    let s = ekm_proxy::config::from_str(&text, Path::new("t.toml"), dir.path()).unwrap();
    assert_eq!(s.hsm.user_pin.expose(), "9876", "trailing newline stripped");
    assert_eq!(s.xks.key_stores[0].credentials[0].secret.expose().len(), 50);
}

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, good_config()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        good_config().replace("regions = [\"us-east-1\"]", "regions = []"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("xks.key_store[0].regions"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .args(["check-config", "--config", "/nonexistent/ekm.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// A config serving only Cloud EKM, with `gcp_extra` appended to its `[[gcp.key]]`.
fn gcp_config(issuer_extra: &str, reasons: &str, key_extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"
plain_http = true

[hsm]
module = "{module}"
token_label = "t"
user_pin = "1234"

[gcp]
path_prefix = "/gcp/v0/keys"

[[gcp.issuer]]
name = "google"
issuers = ["https://accounts.google.com"]
jwks_file = "jwks.json"
audiences = ["https://ekm.example.com"]
service_accounts = ["service-*@gcp-sa-ekms.iam.gserviceaccount.com"]
{issuer_extra}

{reasons}

[[gcp.key]]
path = "ring/kek-1"
{key_extra}
"#,
        module = module()
    )
}

/// A directory holding `jwks.json`, a copy of the test signer's key set (a config's
/// `jwks_file = "jwks.json"` resolves against it).
fn jwks_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/jwt/signer-1.jwks.json"
        ),
        dir.path().join("jwks.json"),
    )
    .unwrap();
    dir
}

const GOOD_REASONS: &str = r#"
[gcp.access_reasons]
allow = ["CUSTOMER_INITIATED_ACCESS", 6]
allow_absent = true
"#;

const GOOD_GRANT: &str = r#"
[[gcp.key.grant]]
name = "kms"
service_accounts = ["service-1@gcp-sa-ekms.iam.gserviceaccount.com"]
"#;

#[test]
fn a_gcp_only_config_validates_with_its_defaults() {
    let text = gcp_config("", GOOD_REASONS, GOOD_GRANT);
    let dir = jwks_dir();
    let settings = ekm_proxy::config::from_str(&text, Path::new("t.toml"), dir.path()).unwrap();
    assert!(settings.xks.key_stores.is_empty());
    let gcp = settings.gcp.expect("gcp section");
    assert_eq!(gcp.prefix, "/gcp/v0/keys");
    let issuer = &gcp.jwt.issuers[0];
    assert_eq!(
        issuer.algorithms,
        vec![jsonwebtoken::Algorithm::RS256],
        "RS256 is the default"
    );
    assert!(issuer.require_email_verified);
    assert!(matches!(
        &issuer.jwks,
        ekm_proxy::auth::jwt::JwksSource::File(p) if *p == dir.path().join("jwks.json")
    ));
    let key = &gcp.keys[0];
    assert_eq!(
        key.hsm_key, "ring/kek-1",
        "the HSM key defaults to the path"
    );
    assert!(key.enabled);
    let reasons = &key.access.reasons;
    assert_eq!(reasons.allow.len(), 2);
    assert!(reasons.allow_absent && !reasons.allow_unspecified && !reasons.allow_unknown);
    assert!(
        reasons.allow_health_checks,
        "health checks default to allowed"
    );
    assert_eq!(
        key.access.grants[0].operations,
        vec![
            ekm_proxy::core::Operation::Wrap,
            ekm_proxy::core::Operation::Unwrap
        ]
    );
}

#[test]
fn gcp_problems_are_all_reported_with_their_paths() {
    let issuer_extra = r#"
algorithms = ["HS256", "none", "RS256"]
jwks_url = "http://issuer.example/certs"
leeway_secs = 3600
jwks_refresh_min_interval_secs = 0
"#;
    let reasons = r#"
[gcp.access_reasons]
allow = ["CUSTOMER_INITIATED_ACCESS", "NOT_A_REASON", 99]
"#;
    let key_extra = r#"
previous_hsm_keys = [""]
resource_names = []
[[gcp.key.grant]]
name = "g"
service_accounts = []
operations = ["wrap", "encrypt"]
[[gcp.key]]
path = "ring/../escape"
[[gcp.key]]
path = "ring/kek-1"
"#;
    let err = ekm_proxy::config::from_str(
        &gcp_config(issuer_extra, reasons, key_extra),
        Path::new("t.toml"),
        Path::new("/"),
    )
    .unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "gcp.issuer[0].algorithms",
        "gcp.issuer[0].jwks_url",
        "gcp.issuer[0].leeway_secs",
        "gcp.issuer[0].jwks_refresh_min_interval_secs",
        "gcp.access_reasons.allow",
        "gcp.key[0].previous_hsm_keys[0]",
        "gcp.key[0].resource_names",
        "gcp.key[0].grant[0].service_accounts",
        "gcp.key[0].grant[0].operations",
        "gcp.key[1].path",
        "gcp.key[1].grant",
        "gcp.key[2].path",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
    let algorithms: Vec<_> = err
        .problems
        .iter()
        .filter(|p| p.path == "gcp.issuer[0].algorithms")
        .collect();
    assert_eq!(
        algorithms.len(),
        2,
        "HS256 and none are both refused: {algorithms:?}"
    );
    assert_eq!(
        err.problems
            .iter()
            .filter(|p| p.path == "gcp.access_reasons.allow")
            .count(),
        2,
        "the unknown name and the unknown number are both reported"
    );
}

#[test]
fn a_gcp_key_needs_an_explicit_justification_policy() {
    let err = ekm_proxy::config::from_str(
        &gcp_config("", "", GOOD_GRANT),
        Path::new("t.toml"),
        Path::new("/"),
    )
    .unwrap_err();
    assert!(
        err.problems.iter().any(|p| p.path == "gcp.access_reasons"),
        "{err}"
    );
}

#[test]
fn the_example_config_uses_only_known_keys_and_a_valid_gcp_section() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap();
    // Files and environment variables it names do not exist here; everything else must validate.
    let problems = match ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    };
    for p in &problems {
        assert_ne!(p.path, "(syntax)", "{p}");
        assert!(!p.path.starts_with("gcp"), "{p}");
        // The Azure section's only problem here is the CA file it names, which does not exist.
        assert!(
            !p.path.starts_with("azure") || p.path.ends_with(".ca_bundle"),
            "{p}"
        );
    }
    assert!(
        problems
            .iter()
            .any(|p| p.path == "azure.prefix[0].ca_bundle"),
        "the Azure section was validated: {problems:?}"
    );
}

/// A config around one vendor profile's `[hsm]` section: the module path and PIN replaced by ones
/// that exist here, one plain listener and one key store with `store_extra` lines.
fn profile_config(profile: &str, store_extra: &str) -> String {
    let path = format!(
        "{}/hsm-config/profiles/{profile}.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let hsm: String = text
        .lines()
        .map(|l| {
            if l.starts_with("module =") {
                format!("module = \"{}\"", module())
            } else if l.starts_with("user_pin =") {
                "user_pin = \"1234\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"
plain_http = true

{hsm}

[[xks.key_store]]
name = "dev"
path_prefix = "/dev"
regions = ["us-east-1"]
keys = ["*"]
{store_extra}
{GOOD_CREDENTIAL}
"#
    )
}

#[test]
fn vendor_profiles_validate_and_set_their_iv_convention() {
    use ekm_proxy::hsm::GcmIvMode;
    for (profile, mode) in [
        ("softhsm", GcmIvMode::ProxyRandom),
        ("luna", GcmIvMode::HsmAppended),
        ("cloudhsm", GcmIvMode::HsmInParams),
        ("nshield", GcmIvMode::HsmInParams),
    ] {
        // CloudHSM's 16 KiB per call: a key store must keep its plaintext limit within it.
        let store = if profile == "cloudhsm" {
            "max_plaintext_bytes = 16368"
        } else {
            ""
        };
        let settings = ekm_proxy::config::from_str(
            &profile_config(profile, store),
            Path::new("t.toml"),
            Path::new("/"),
        )
        .unwrap_or_else(|e| panic!("profile {profile}: {e}"));
        assert_eq!(settings.hsm.gcm_iv, mode, "profile {profile}");
    }
    // The CloudHSM limit is enforced against the default key-store limit (64 KiB).
    let err = ekm_proxy::config::from_str(
        &profile_config("cloudhsm", ""),
        Path::new("t.toml"),
        Path::new("/"),
    )
    .unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["xks.key_store[0].max_plaintext_bytes"], "{err}");
    assert!(err.to_string().contains("at most 16368"), "{err}");
}

#[test]
fn hsm_recovery_and_iv_settings_are_checked() {
    let cfg = good_config().replace(
        "user_pin = \"1234\"",
        "user_pin = \"1234\"\ngcm_iv = \"hsm-generated\"\nhung_call_ms = 500\nop_timeout_ms = 2000\n\
         max_data_bytes = 0\nrecovery_backoff_initial_ms = 5000\nrecovery_backoff_max_ms = 100\n\
         key_cache_ttl_secs = 0",
    );
    let err = ekm_proxy::config::from_str(&cfg, Path::new("t.toml"), Path::new("/")).unwrap_err();
    let mut paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "hsm.gcm_iv",
            "hsm.hung_call_ms",
            "hsm.key_cache_ttl_secs",
            "hsm.max_data_bytes",
            "hsm.recovery_backoff_max_ms",
        ],
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("one of: proxy-random, hsm-in-params, hsm-appended"),
        "{err}"
    );
    // The defaults: the proxy's own IV, replacement after 10 s, 5 s negative cache.
    let settings =
        ekm_proxy::config::from_str(&good_config(), Path::new("t.toml"), Path::new("/")).unwrap();
    assert_eq!(settings.hsm.gcm_iv, ekm_proxy::hsm::GcmIvMode::ProxyRandom);
    assert_eq!(settings.hsm.hung_call_limit.as_secs(), 10);
    assert_eq!(settings.hsm.negative_cache_ttl.as_secs(), 5);
    assert_eq!(settings.hsm.max_data_bytes, None);
}

#[test]
fn a_jwks_file_must_exist_parse_and_hold_a_usable_key() {
    let dir = jwks_dir();
    let text = gcp_config("", GOOD_REASONS, GOOD_GRANT);
    assert!(ekm_proxy::config::from_str(&text, Path::new("t.toml"), dir.path()).is_ok());
    let cases: [(&str, &[u8]); 4] = [
        ("missing", b""),
        ("garbage", b"this is not json {"),
        ("not a key set", br#"{"issuer": "x"}"#),
        (
            "no usable key",
            br#"{"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}"#,
        ),
    ];
    for (what, bytes) in cases {
        let path = dir.path().join("jwks.json");
        if what == "missing" {
            std::fs::remove_file(&path).unwrap();
        } else {
            std::fs::write(&path, bytes).unwrap();
        }
        let err =
            ekm_proxy::config::from_str(&text, Path::new("t.toml"), dir.path()).expect_err(what);
        assert!(
            err.problems
                .iter()
                .any(|p| p.path == "gcp.issuer[0].jwks_file"),
            "{what}: {err}"
        );
    }
    // check-config reports it too (it validates through the same path).
    let config = dir.path().join("ekm.toml");
    std::fs::write(&config, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gcp.issuer[0].jwks_file"), "{stderr}");
}

#[test]
fn the_health_check_key_is_never_a_customer_key() {
    // Wildcards never match it.
    for pattern in ["*", "ekm-*"] {
        let text = good_config().replace(r#"keys = ["*"]"#, &format!("keys = [{pattern:?}]"));
        let settings =
            ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")).unwrap();
        let keys = &settings.xks.key_stores[0].keys;
        assert!(!keys.allows("ekm-health-check"), "{pattern}");
        assert!(keys.allows("ekm-customer-1"), "{pattern}");
    }
    // Naming it is an error, as a configured health key too.
    let text = good_config().replace(
        r#"keys = ["*"]"#,
        r#"keys = ["customer-1", "ekm-health-check"]"#,
    );
    let err = ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")).unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.path == "xks.key_store[0].keys[1]"),
        "{err}"
    );
    let text = format!("{}\n[health]\nkey = \"hk\"\n", good_config())
        .replace(r#"keys = ["*"]"#, r#"keys = ["hk"]"#);
    let err = ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")).unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.path == "xks.key_store[0].keys[0]"),
        "{err}"
    );
    // A Cloud EKM key (current or previous version) naming it.
    let dir = jwks_dir();
    for (extra, path) in [
        ("hsm_key = \"ekm-health-check\"", "gcp.key[0].hsm_key"),
        (
            "previous_hsm_keys = [\"ekm-health-check\"]",
            "gcp.key[0].previous_hsm_keys[0]",
        ),
    ] {
        let text = gcp_config("", GOOD_REASONS, &format!("{extra}\n{GOOD_GRANT}"));
        let err = ekm_proxy::config::from_str(&text, Path::new("t.toml"), dir.path()).unwrap_err();
        assert!(err.problems.iter().any(|p| p.path == path), "{err}");
    }
}

#[test]
fn xks_prefixes_that_normalize_alike_are_refused() {
    let second = |prefix: &str| {
        format!(
            "{}\n[[xks.key_store]]\nname = \"two\"\npath_prefix = {prefix:?}\nregions = [\"us-east-1\"]\nkeys = [\"*\"]\n{GOOD_CREDENTIAL}",
            good_config()
        )
    };
    // Nested prefixes are fine (routing takes the longest match).
    let nested = second("/dev/kms/xks/v1/dev");
    assert!(
        ekm_proxy::config::from_str(&nested, Path::new("t.toml"), Path::new("/")).is_ok(),
        "nested prefixes are allowed"
    );
    for dup in ["/dev", "/dev/", "//dev", "/dev//"] {
        let err = ekm_proxy::config::from_str(&second(dup), Path::new("t.toml"), Path::new("/"))
            .unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.path == "xks.key_store[1].path_prefix" && p.message.contains("dev")),
            "{dup}: {err}"
        );
    }
}

#[test]
fn azure_problems_are_reported_with_their_paths() {
    // No mTLS listener, a prefix breaking the API's rules, the health key, a rule on an unknown
    // attribute and operation: each is reported at its own key path.
    let text = format!(
        r#"{base}
[azure]
[[azure.prefix]]
name = "p"
path_prefix = "/bad_prefix/"
allowed_subjects = []
keys = ["k1", "ekm-health-check"]
[[azure.prefix.rule]]
name = "r"
attribute = "awsPrincipalArn"
allow = ["x"]
operations = ["encrypt"]
"#,
        base = good_config()
    );
    let err = ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")).unwrap_err();
    let at = |path: &str| {
        err.problems
            .iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {err}"))
            .message
            .clone()
    };
    assert!(at("azure").contains("mutual TLS"));
    assert!(at("azure.prefix[0].path_prefix").contains("64 characters"));
    assert!(at("azure.prefix[0].allowed_subjects").contains("at least one"));
    assert!(at("azure.prefix[0].keys[1]").contains("health-check key"));
    assert!(at("azure.prefix[0].rule[0].attribute").contains("clientCertificateSubject"));
    assert_eq!(
        at("azure.prefix[0].rule[0].operations"),
        "'encrypt' is not metadata, wrap or unwrap"
    );
}

#[test]
fn quotas_parse_on_key_stores_service_accounts_and_prefixes() {
    // An integer rate is a rate too.
    let text = good_config().replace(
        r#"keys = ["*"]"#,
        "keys = [\"*\"]\nquota = { rate = 500, burst = 1000 }",
    );
    let settings = ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")).unwrap();
    assert_eq!(
        settings.xks.key_stores[0].quota,
        Some(ekm_proxy::core::TokenBucket {
            rate_per_sec: 500.0,
            burst: 1000
        })
    );
    let unlimited =
        ekm_proxy::config::from_str(&good_config(), Path::new("t.toml"), Path::new("/")).unwrap();
    assert_eq!(
        unlimited.xks.key_stores[0].quota, None,
        "no quota: unlimited"
    );

    let sa = "service-1@gcp-sa-ekms.iam.gserviceaccount.com";
    let key_extra = format!(
        r#"{GOOD_GRANT}
[gcp.quota]
rate = 0.5
burst = 2
[[gcp.quota_override]]
service_account = "{sa}"
rate = 100.0
burst = 200
"#
    );
    let dir = jwks_dir();
    let settings = ekm_proxy::config::from_str(
        &gcp_config("", GOOD_REASONS, &key_extra),
        Path::new("t.toml"),
        dir.path(),
    )
    .unwrap();
    let quotas = settings.gcp.unwrap().quotas;
    let (limit, label) = quotas.for_service_account(sa).unwrap();
    assert_eq!((limit.rate_per_sec, limit.burst, label), (100.0, 200, sa));
    let (limit, label) = quotas
        .for_service_account("service-2@gcp-sa-ekms.iam.gserviceaccount.com")
        .unwrap();
    assert_eq!(
        (limit.rate_per_sec, limit.burst, label),
        (0.5, 2, "default")
    );
}

#[test]
fn quota_problems_are_reported_with_their_paths() {
    let store = |name: &str, prefix: &str, quota: &str| {
        format!(
            "[[xks.key_store]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nregions = [\"*\"]\nkeys = [\"*\"]\nquota = {quota}\n{GOOD_CREDENTIAL}"
        )
    };
    let text = format!(
        "{}\n{}\n{}\n{}",
        good_config(),
        store("zero", "/zero", "{ rate = 0, burst = 0 }"),
        store("negative", "/negative", "{ rate = -1.5, burst = -3 }"),
        store("huge", "/huge", "{ rate = nan, burst = 5000000000 }"),
    );
    let err = ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    for i in 1..=3 {
        for key in ["rate", "burst"] {
            let path = format!("xks.key_store[{i}].quota.{key}");
            assert!(paths.contains(&path.as_str()), "{path} missing: {err}");
        }
    }

    let key_extra = format!(
        r#"{GOOD_GRANT}
[gcp.quota]
rate = inf
burst = 0
[[gcp.quota_override]]
service_account = "not-an-email"
rate = 1
burst = 1
[[gcp.quota_override]]
service_account = "someone@elsewhere.example"
rate = 1
burst = 1
[[gcp.quota_override]]
service_account = "service-1@gcp-sa-ekms.iam.gserviceaccount.com"
rate = 1
burst = 1
[[gcp.quota_override]]
service_account = "service-1@gcp-sa-ekms.iam.gserviceaccount.com"
rate = 0
burst = 1
"#
    );
    let dir = jwks_dir();
    let err = ekm_proxy::config::from_str(
        &gcp_config("", GOOD_REASONS, &key_extra),
        Path::new("t.toml"),
        dir.path(),
    )
    .unwrap_err();
    let at = |path: &str| {
        err.problems
            .iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {err}"))
            .message
            .clone()
    };
    at("gcp.quota.rate");
    at("gcp.quota.burst");
    assert!(at("gcp.quota_override[0].service_account").contains("email"));
    assert!(at("gcp.quota_override[1].service_account").contains("matches no issuer"));
    assert!(at("gcp.quota_override[3].service_account").contains("duplicate"));
    at("gcp.quota_override[3].rate");
    assert!(
        !err.problems
            .iter()
            .any(|p| p.path.starts_with("gcp.quota_override[2]")),
        "{err}"
    );

    let text = format!(
        r#"{base}
[azure]
[[azure.prefix]]
name = "p"
path_prefix = "/azure"
allowed_subjects = ["mhsm.example"]
keys = ["*"]
quota = {{ rate = 0.0, burst = 0 }}
"#,
        base = good_config()
    );
    let err = ekm_proxy::config::from_str(&text, Path::new("t.toml"), Path::new("/")).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"azure.prefix[0].quota.rate"), "{err}");
    assert!(paths.contains(&"azure.prefix[0].quota.burst"), "{err}");

    // A misspelt key inside the table is refused, not ignored.
    let typo = good_config().replace(
        r#"keys = ["*"]"#,
        "keys = [\"*\"]\nquota = { rate = 1, burts = 1 }",
    );
    let err = ekm_proxy::config::from_str(&typo, Path::new("t.toml"), Path::new("/")).unwrap_err();
    assert!(err.to_string().contains("burts"), "{err}");
}
