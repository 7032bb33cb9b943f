//! `ekm-proxy connect-info` through the real binary: the XKS path and importable proxy
//! configuration file (secret only with `--with-secret`), the Alibaba fingerprint (checked
//! against an independent SHA-256 of the leaf DER), the Cloud EKM key URI, the Azure URI, CA and
//! subjects, `--name` filtering and the exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::proxy::{CLIENT_SUBJECT, Pki};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

const ACCESS_KEY_ID: &str = "CONNECTINFOACCESSKEYID";
const SECRET: &str = "connectInfoSecretAccessKeyNotForProductionUse0123";
const SA: &str = "service-42@gcp-sa-ekms.iam.gserviceaccount.com";

struct Setup {
    pki: Pki,
    config: PathBuf,
}

/// TLS listener `tls` on 8443 (leaf-only chain file), mTLS listener `mtls` on 443 (leaf + CA),
/// key store `shop` under `/shop`, Cloud EKM key `ring/kek-1`, Azure prefix `tenant-a`.
fn setup() -> Setup {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let chain = dir.join("server-chain.pem");
    let leaf = std::fs::read_to_string(&pki.server_pem).unwrap();
    std::fs::write(&chain, format!("{leaf}{}", pki.ca.cert_pem())).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/jwt/signer-1.jwks.json"
        ),
        dir.join("jwks.json"),
    )
    .unwrap();
    let text = format!(
        r#"
[[listener]]
name = "tls"
address = "0.0.0.0:8443"
[listener.tls]
certificate = "{server}"
private_key = "{key}"

[[listener]]
name = "mtls"
address = "0.0.0.0:443"
[listener.tls]
certificate = "{chain}"
private_key = "{key}"
[listener.tls.client_auth]
ca_bundle = "{ca}"

[hsm]
module = "{module}"
token_label = "t"
user_pin = "1234"

[[xks.key_store]]
name = "shop"
path_prefix = "/shop"
regions = ["us-east-1"]
keys = ["*"]
[[xks.key_store.credential]]
access_key_id = "{ACCESS_KEY_ID}"
secret = "{SECRET}"

[gcp]
path_prefix = "/gcp/v0/keys"

[[gcp.issuer]]
name = "google"
issuers = ["https://accounts.google.com"]
jwks_file = "jwks.json"
audiences = ["https://ekm.example.com"]
service_accounts = ["service-*@gcp-sa-ekms.iam.gserviceaccount.com"]

[gcp.access_reasons]
allow = ["CUSTOMER_INITIATED_ACCESS"]

[[gcp.key]]
path = "ring/kek-1"
hsm_key = "dev-aes-1"
[[gcp.key.grant]]
name = "kms"
service_accounts = ["{SA}"]
operations = ["wrap", "unwrap"]

[azure]

[[azure.prefix]]
name = "tenant-a"
path_prefix = "/azure/a"
ca_bundle = "ca.pem"
allowed_subjects = ["{CLIENT_SUBJECT}"]
keys = ["*"]
"#,
        server = pki.server_pem.display(),
        key = pki.server_key.display(),
        chain = chain.display(),
        ca = pki.ca_pem.display(),
        // Any existing file passes the module-path check; connect-info never loads it.
        module = std::env::current_exe().unwrap().display(),
    );
    let config = dir.join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    Setup { pki, config }
}

fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .arg("connect-info")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("EKM_PROXY_CONFIG")
        .output()
        .unwrap()
}

fn stdout_ok(out: &Output) -> String {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{text}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The pretty-printed JSON object of the output: from a line `{` to the next line `}`.
fn json_block(text: &str) -> serde_json::Value {
    let start = text.find("\n{\n").expect("no JSON block") + 1;
    let end = start
        + text[start..]
            .find("\n}\n")
            .expect("unterminated JSON block")
        + 2;
    serde_json::from_str(&text[start..end]).unwrap()
}

fn leaf_sha256(pem: &Path) -> String {
    let bytes = std::fs::read(pem).unwrap();
    let leaf = CertificateDer::pem_slice_iter(&bytes)
        .next()
        .unwrap()
        .unwrap();
    Sha256::digest(leaf.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn every_cloud_gets_what_its_console_asks_for() {
    let s = setup();
    let text = stdout_ok(&run(&s.config, &[]));
    println!("{text}");

    // AWS: endpoint candidates from the certificate's DNS name (not the 0.0.0.0 bind address),
    // the port only when it is not 443, and the path.
    assert!(
        text.contains("https://localhost:8443    (listener \"tls\", TLS)"),
        "{text}"
    );
    assert!(
        text.contains("https://localhost    (listener \"mtls\", mTLS)"),
        "{text}"
    );
    assert!(!text.contains("0.0.0.0"), "{text}");
    assert!(text.contains("XksProxyUriPath: /shop/kms/xks/v1"), "{text}");
    let file = json_block(&text);
    assert_eq!(
        file,
        serde_json::json!({
            "XksProxyUriPath": "/shop/kms/xks/v1",
            "XksProxyAuthenticationCredential": {
                "AccessKeyId": ACCESS_KEY_ID,
                "RawSecretAccessKey": "<run with --with-secret>",
            }
        })
    );
    assert!(
        !text.contains(SECRET),
        "secret printed without --with-secret"
    );

    // Alibaba: same path, the AccessKey ID and the SHA-256 of each listener's leaf DER.
    assert!(
        text.contains("External proxy path: /shop/kms/xks/v1"),
        "{text}"
    );
    assert!(
        text.contains(&format!("AccessKey ID: {ACCESS_KEY_ID}")),
        "{text}"
    );
    let fingerprint = leaf_sha256(&s.pki.server_pem);
    assert_eq!(fingerprint.len(), 64);
    assert!(
        text.contains(&format!("  {fingerprint}    (listener \"tls\", TLS)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("  {fingerprint}    (listener \"mtls\", mTLS)")),
        "{text}"
    );

    // Google: the key URI on the TLS listener only (Cloud EKM presents no client certificate)
    // and the service account granted.
    assert!(
        text.contains("  https://localhost:8443/gcp/v0/keys/ring/kek-1    (listener \"tls\")"),
        "{text}"
    );
    assert!(!text.contains("https://localhost/gcp/"), "{text}");
    assert!(
        text.contains(&format!("  {SA} (wrap, unwrap; grant \"kms\")")),
        "{text}"
    );

    // Azure: the URI on the mTLS listener only, the CA (the chain file holds it as #2), the
    // prefix's own CA bundle resolved against the config's directory, and the subject.
    assert!(
        text.contains("  https://localhost/azure/a    (listener \"mtls\")"),
        "{text}"
    );
    assert!(!text.contains("https://localhost:8443/azure"), "{text}");
    assert!(text.contains("issued by: CN=ekm-proxy test CA"), "{text}");
    assert!(
        text.contains("the issuer's certificate is #2 in the chain file"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Client certificates must also chain to (this prefix): {}",
            s.pki.dir.path().join("ca.pem").display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Client certificate subjects allowed: {CLIENT_SUBJECT}"
        )),
        "{text}"
    );
}

#[test]
fn the_secret_is_printed_only_when_asked_for() {
    let s = setup();
    let text = stdout_ok(&run(&s.config, &["--with-secret"]));
    let file = json_block(&text);
    assert_eq!(
        file["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        SECRET
    );
    assert_eq!(
        file["XksProxyAuthenticationCredential"]["AccessKeyId"],
        ACCESS_KEY_ID
    );
}

#[test]
fn name_limits_the_output_and_an_unknown_name_exits_64() {
    let s = setup();
    let text = stdout_ok(&run(&s.config, &["--name", "ring/kek-1"]));
    assert!(text.contains("/gcp/v0/keys/ring/kek-1"), "{text}");
    assert!(
        !text.contains("XksProxyUriPath") && !text.contains("/azure/a"),
        "{text}"
    );

    let text = stdout_ok(&run(&s.config, &["--name", "tenant-a"]));
    assert!(
        text.contains("/azure/a") && !text.contains("/gcp/v0/keys"),
        "{text}"
    );

    let text = stdout_ok(&run(&s.config, &["--name", "shop"]));
    assert!(text.contains("XksProxyUriPath: /shop/kms/xks/v1"), "{text}");
    assert!(
        !text.contains("/azure/a") && !text.contains("/gcp/v0/keys"),
        "{text}"
    );

    let out = run(&s.config, &["--name", "nope"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["\"nope\"", "shop", "ring/kek-1", "tenant-a"] {
        assert!(err.contains(name), "{name} missing from: {err}");
    }
}

#[test]
fn config_and_certificate_errors_have_their_exit_codes() {
    let s = setup();
    // Validation fails (the server certificate is missing): a configuration error.
    std::fs::remove_file(&s.pki.server_pem).unwrap();
    assert_eq!(run(&s.config, &[]).status.code(), Some(64));
    // The file exists but is not a certificate: validation does not parse it, connect-info does.
    std::fs::write(&s.pki.server_pem, "not a certificate\n").unwrap();
    let out = run(&s.config, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
