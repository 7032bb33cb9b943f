//! `ekm-proxy keys create | import | list` end to end: the real binary against a fresh SoftHSMv2
//! token, and what it made checked through the proxy's own HSM backend (a known-answer AES-GCM
//! vector for an imported key, a round trip for a generated one).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ekm_proxy::core::{AeadDecrypt, AeadEncrypt, Backend as _, CryptoError};
use ekm_proxy::hsm::Pkcs11Backend;
use ekm_proxy::metrics::Metrics;
use zeroize::Zeroizing;

use common::softhsm::TestToken;

/// AES-256-GCM test case 16 of McGrew & Viega, "The Galois/Counter Mode of Operation" (96-bit IV,
/// 20-byte AAD, 60-byte plaintext).
const KAT_KEY: &str = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
const KAT_IV: &str = "cafebabefacedbaddecaf888";
const KAT_AAD: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
const KAT_PT: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
const KAT_CT: &str = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662";
const KAT_TAG: &str = "76fc6ece0f4e1768cddf8853bb2d551b";

/// A config file for the CLI on `token` (one plain listener and key store: the CLI reads only
/// `[hsm]`, but the file must be valid).
fn config(token: &TestToken, dir: &Path) -> PathBuf {
    let path = dir.join("ekm-proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"
plain_http = true

[hsm]
module = "{module}"
token_label = "{label}"
user_pin = "{pin}"

[[xks.key_store]]
name = "dev"
path_prefix = "/dev"
regions = ["us-east-1"]
keys = ["*"]
[[xks.key_store.credential]]
access_key_id = "{id}"
secret = "{secret}"
"#,
            module = token.module.display(),
            label = token.label,
            pin = token.user_pin,
            id = common::proxy::ACCESS_KEY_ID,
            secret = common::proxy::SECRET,
        ),
    )
    .unwrap();
    path
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ekm-proxy"))
        .args(args)
        .output()
        .expect("run ekm-proxy")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn backend(token: &TestToken) -> Pkcs11Backend {
    let metrics = Metrics::standalone();
    Pkcs11Backend::start(token.settings(), metrics.hsm.clone(), metrics.cache.clone())
        .unwrap_or_else(|e| panic!("backend: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_create_makes_custodial_keys_and_refuses_existing_labels() {
    let token = TestToken::empty();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&token, dir.path());
    let cfg = cfg.to_str().unwrap();

    let o = cli(&["keys", "create", "--config", cfg, "--label", "made-aes"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        stdout(&o).trim(),
        "created key 'made-aes': AES_256, usage encrypt,decrypt, sensitive, non-extractable"
    );
    let o = cli(&[
        "keys",
        "create",
        "--config",
        cfg,
        "--label",
        "made-rsa",
        "--type",
        "rsa2048",
        "--usage",
        "decrypt,unwrap",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        stdout(&o).trim(),
        "created key 'made-rsa': RSA_2048, usage decrypt,unwrap, sensitive, non-extractable"
    );

    // A label that exists is refused, whatever the type; nothing is changed.
    for kind in ["aes256", "rsa2048"] {
        let o = cli(&[
            "keys", "create", "--config", cfg, "--label", "made-aes", "--type", kind,
        ]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("exists already"), "{}", text(&o));
    }
    let o = cli(&[
        "keys", "create", "--config", cfg, "--label", "x", "--type", "des3",
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("one of: aes256, rsa2048, rsa3072, rsa4096"));
    let o = cli(&[
        "keys", "create", "--config", cfg, "--label", "x", "--usage", "sign",
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));

    let o = cli(&["keys", "list", "--config", cfg]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let list = stdout(&o);
    let line = |label: &str| {
        list.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label} not listed:\n{list}"))
            .to_owned()
    };
    assert!(line("made-aes").contains("AES_256"), "{list}");
    assert!(line("made-aes").ends_with("yes"), "{list}");
    assert!(line("made-rsa").contains("RSA_2048"), "{list}");
    assert_eq!(
        list.lines().filter(|l| l.starts_with("made-aes")).count(),
        1,
        "one key per label: {list}"
    );

    // The generated AES key works inside the HSM.
    let b = backend(&token);
    let sealed = b
        .aead_encrypt(AeadEncrypt {
            key: "made-aes".into(),
            plaintext: Zeroizing::new(b"made by keys create".to_vec()),
            aad: b"aad".to_vec(),
        })
        .await
        .unwrap();
    let opened = b
        .aead_decrypt(AeadDecrypt {
            key: "made-aes".into(),
            iv: sealed.iv.clone(),
            ciphertext: sealed.ciphertext.clone(),
            tag: sealed.tag,
            aad: b"aad".to_vec(),
        })
        .await
        .unwrap();
    assert_eq!(&opened[..], b"made by keys create");
    let info = b.key_info("made-aes").await.unwrap();
    assert!(info.sensitive && !info.extractable && info.custody_violation.is_none());
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_import_gives_the_known_answer_inside_the_hsm() {
    let token = TestToken::empty();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&token, dir.path());
    let cfg = cfg.to_str().unwrap();
    // The same key as hex text and as 32 raw bytes.
    let hex_file = dir.path().join("kat.hex");
    std::fs::write(&hex_file, format!("{KAT_KEY}\n")).unwrap();
    let raw_file = dir.path().join("kat.bin");
    std::fs::write(&raw_file, hex::decode(KAT_KEY).unwrap()).unwrap();
    for (label, file) in [("kat-hex", &hex_file), ("kat-raw", &raw_file)] {
        let o = cli(&[
            "keys",
            "import",
            "--config",
            cfg,
            "--label",
            label,
            "--key-file",
            file.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert_eq!(
            stdout(&o).trim(),
            format!(
                "created key '{label}': AES_256, usage encrypt,decrypt, sensitive, non-extractable"
            )
        );
    }
    let b = backend(&token);
    for label in ["kat-hex", "kat-raw"] {
        let opened = b
            .aead_decrypt(AeadDecrypt {
                key: label.into(),
                iv: hex::decode(KAT_IV).unwrap(),
                ciphertext: hex::decode(KAT_CT).unwrap(),
                tag: hex::decode(KAT_TAG).unwrap().try_into().unwrap(),
                aad: hex::decode(KAT_AAD).unwrap(),
            })
            .await
            .unwrap_or_else(|e| panic!("{label}: known-answer decrypt: {e}"));
        assert_eq!(hex::encode(&opened[..]), KAT_PT, "{label}");
        let info = b.key_info(label).await.unwrap();
        assert!(info.sensitive && !info.extractable, "{label}: {info:?}");
    }
    // A flipped tag bit is refused by the HSM: the key is really the KAT key, not a lucky one.
    let mut tag: [u8; 16] = hex::decode(KAT_TAG).unwrap().try_into().unwrap();
    tag[0] ^= 1;
    let err = b
        .aead_decrypt(AeadDecrypt {
            key: "kat-raw".into(),
            iv: hex::decode(KAT_IV).unwrap(),
            ciphertext: hex::decode(KAT_CT).unwrap(),
            tag,
            aad: hex::decode(KAT_AAD).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err, CryptoError::InvalidCiphertext);
    b.shutdown();

    // Refused: an existing label, a wrong length, a non-AES type.
    let short = dir.path().join("short.bin");
    std::fs::write(&short, [7u8; 31]).unwrap();
    for (args, code, says) in [
        (
            vec![
                "--label",
                "kat-raw",
                "--key-file",
                raw_file.to_str().unwrap(),
            ],
            1,
            "exists already",
        ),
        (
            vec!["--label", "short", "--key-file", short.to_str().unwrap()],
            64,
            "want 32 bytes",
        ),
        (
            vec![
                "--label",
                "rsa",
                "--type",
                "rsa2048",
                "--key-file",
                raw_file.to_str().unwrap(),
            ],
            1,
            "only AES-256 keys",
        ),
    ] {
        let mut all = vec!["keys", "import", "--config", cfg];
        all.extend(args);
        let o = cli(&all);
        assert_eq!(o.status.code(), Some(code), "{}", text(&o));
        assert!(text(&o).contains(says), "{}", text(&o));
    }
}

#[test]
fn dev_init_prints_readable_lines() {
    // The dev profile's report uses the same formatting as `keys create`: no Rust Debug structs.
    let token = TestToken::new();
    let report = ekm_proxy::hsm::ensure_key(
        &token.module,
        &token.label,
        &token.pin(),
        &ekm_proxy::hsm::KeySpec::aes256("dev-aes-1"),
    )
    .unwrap();
    let line = report.to_string();
    assert_eq!(
        line,
        "found key 'dev-aes-1': AES_256, usage encrypt,decrypt, sensitive, non-extractable"
    );
    assert!(!line.contains('{'), "{line}");
}
