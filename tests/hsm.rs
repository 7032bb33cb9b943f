//! The PKCS#11 backend against a real SoftHSMv2 token per test (made by `hsm::bootstrap`).
//!
//! Run: `export SOFTHSM2_CONF=$(mktemp -d)/softhsm2.conf; cargo test --test hsm`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::softhsm::{TestToken, USER_PIN};
use ekm_proxy::core::{
    AeadDecrypt, AeadEncrypt, AeadSealed, Backend, CryptoError, HealthStatus, KeyType,
};
use ekm_proxy::hsm::bootstrap::{self, KeySpec};
use ekm_proxy::hsm::{HsmError, HsmSettings, Pkcs11Backend, TokenSelector};
use ekm_proxy::metrics::Metrics;
use zeroize::Zeroizing;

const KEY: &str = "dev-aes-1";

fn start(settings: HsmSettings) -> (Pkcs11Backend, Metrics) {
    let metrics = Metrics::standalone();
    let backend = Pkcs11Backend::start(settings, metrics.hsm.clone(), metrics.cache.clone())
        .unwrap_or_else(|e| panic!("backend start: {e}"));
    (backend, metrics)
}

fn enc(key: &str, plaintext: &[u8], aad: &[u8]) -> AeadEncrypt {
    AeadEncrypt {
        key: key.to_owned(),
        plaintext: Zeroizing::new(plaintext.to_vec()),
        aad: aad.to_vec(),
    }
}

fn dec(key: &str, sealed: &AeadSealed, aad: &[u8]) -> AeadDecrypt {
    AeadDecrypt {
        key: key.to_owned(),
        iv: sealed.iv.clone(),
        ciphertext: sealed.ciphertext.clone(),
        tag: sealed.tag,
        aad: aad.to_vec(),
    }
}

/// `ekm_cache_{hits,misses}_total{cache="hsm_key"}` from the rendered metrics.
fn cache_counts(m: &Metrics) -> (u64, u64) {
    let text = String::from_utf8(m.render()).unwrap();
    let get = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{cache=\"hsm_key\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse().unwrap())
    };
    (get("ekm_cache_hits_total"), get("ekm_cache_misses_total"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip() {
    let token = TestToken::new();
    let (hsm, _m) = start(token.settings());
    for (plaintext, aad) in [
        (&b"secret data"[..], &b"\x00\x0bframed aad"[..]),
        (b"", b""),
        (&[7u8; 4096][..], b"x"),
    ] {
        let sealed = hsm.aead_encrypt(enc(KEY, plaintext, aad)).await.unwrap();
        assert_eq!(sealed.iv.len(), 12);
        assert_eq!(sealed.ciphertext.len(), plaintext.len());
        if !plaintext.is_empty() {
            assert_ne!(&sealed.ciphertext[..], plaintext);
        }
        let opened = hsm.aead_decrypt(dec(KEY, &sealed, aad)).await.unwrap();
        assert_eq!(&opened[..], plaintext);
    }
    // Fresh IV every time.
    let a = hsm.aead_encrypt(enc(KEY, b"same", b"")).await.unwrap();
    let b = hsm.aead_encrypt(enc(KEY, b"same", b"")).await.unwrap();
    assert_ne!(a.iv, b.iv);
    assert_ne!(a.ciphertext, b.ciphertext);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_usage_is_enforced_by_the_hsm() {
    let token = TestToken::new();
    let (hsm, _m) = start(token.settings());
    let sealed = hsm.aead_encrypt(enc(KEY, b"data", b"")).await.unwrap();

    let err = hsm
        .aead_encrypt(enc("dev-aes-decrypt-only", b"data", b""))
        .await
        .unwrap_err();
    assert!(matches!(err, CryptoError::InvalidKeyUsage(_)), "{err:?}");
    let err = hsm
        .aead_decrypt(dec("dev-aes-encrypt-only", &sealed, b""))
        .await
        .unwrap_err();
    assert!(matches!(err, CryptoError::InvalidKeyUsage(_)), "{err:?}");
    for op in ["encrypt", "decrypt"] {
        let err = if op == "encrypt" {
            hsm.aead_encrypt(enc("dev-aes-no-usage", b"data", b""))
                .await
                .unwrap_err()
        } else {
            hsm.aead_decrypt(dec("dev-aes-no-usage", &sealed, b""))
                .await
                .unwrap_err()
        };
        assert!(
            matches!(err, CryptoError::InvalidKeyUsage(_)),
            "{op}: {err:?}"
        );
        assert!(!err.to_string().contains("CKR_"), "{err}");
    }
    // The allowed directions work.
    let s = hsm
        .aead_encrypt(enc("dev-aes-encrypt-only", b"x", b""))
        .await
        .unwrap();
    assert_eq!(s.ciphertext.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key() {
    let token = TestToken::new();
    let (hsm, m) = start(token.settings());
    assert_eq!(
        hsm.key_info("no-such-key").await.unwrap_err(),
        CryptoError::KeyNotFound
    );
    assert_eq!(
        hsm.aead_encrypt(enc("no-such-key", b"x", b""))
            .await
            .unwrap_err(),
        CryptoError::KeyNotFound
    );
    let (_, misses) = cache_counts(&m);
    assert!(misses >= 2, "misses {misses}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_info_is_served_from_the_warm_cache() {
    let token = TestToken::new();
    let (hsm, m) = start(token.settings());
    let info = hsm.key_info(KEY).await.unwrap();
    assert_eq!(info.label, KEY);
    assert_eq!(info.key_type, KeyType::Aes);
    assert_eq!(info.bits, 256);
    assert!(info.usage.encrypt && info.usage.decrypt && !info.usage.wrap);
    assert!(info.sensitive && !info.extractable);
    assert_eq!(info.custody_violation, None);
    let info = hsm.key_info("dev-aes-decrypt-only").await.unwrap();
    assert!(!info.usage.encrypt && info.usage.decrypt);
    // Every dev key was cached at start: no miss, and no HSM lookup.
    assert_eq!(cache_counts(&m), (2, 0));
    assert_eq!(m.hsm.op("find_key").get_sample_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tags_are_invalid_ciphertext_and_cost_no_session() {
    let token = TestToken::new();
    let (hsm, m) = start(token.settings());
    let aad = b"\x00\x03aad\x00";
    let sealed = hsm
        .aead_encrypt(enc(KEY, b"attack at dawn", aad))
        .await
        .unwrap();
    let (reopens, logins, sessions) = (
        m.hsm.session_reopens.get(),
        m.hsm.logins.get(),
        m.hsm.sessions.get(),
    );

    for i in 0..100u8 {
        let mut bad = dec(KEY, &sealed, aad);
        match i % 4 {
            0 => bad.tag[usize::from(i) % 16] ^= 1,
            1 => bad.ciphertext[usize::from(i) % 14] ^= 0x80,
            2 => bad.aad = b"\x00\x03abc\x00".to_vec(),
            _ => bad.iv[0] ^= 1,
        }
        let err = hsm.aead_decrypt(bad).await.unwrap_err();
        assert_eq!(err, CryptoError::InvalidCiphertext, "case {i}");
    }
    assert_eq!(m.hsm.session_reopens.get(), reopens, "no session reopened");
    assert_eq!(m.hsm.logins.get(), logins, "no login");
    assert_eq!(m.hsm.sessions.get(), sessions);
    let opened = hsm.aead_decrypt(dec(KEY, &sealed, aad)).await.unwrap();
    assert_eq!(&opened[..], b"attack at dawn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tag_then_good_decrypt_on_one_worker() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.workers = 1;
    let (hsm, m) = start(settings);
    let sealed = hsm.aead_encrypt(enc(KEY, b"payload", b"a")).await.unwrap();
    for _ in 0..5 {
        let mut bad = dec(KEY, &sealed, b"a");
        bad.tag[0] ^= 0xff;
        assert_eq!(
            hsm.aead_decrypt(bad).await.unwrap_err(),
            CryptoError::InvalidCiphertext
        );
        // The same session must accept the next operation of either kind.
        assert_eq!(
            &hsm.aead_decrypt(dec(KEY, &sealed, b"a")).await.unwrap()[..],
            b"payload"
        );
        hsm.aead_encrypt(enc(KEY, b"next", b"")).await.unwrap();
    }
    assert_eq!(m.hsm.session_reopens.get(), 0);
    assert_eq!(m.hsm.logins.get(), 1, "only the start-up login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_byte_iv_is_accepted_and_other_lengths_are_not() {
    let token = TestToken::new();
    let (hsm, _m) = start(token.settings());
    let sealed = hsm.aead_encrypt(enc(KEY, b"data", b"")).await.unwrap();
    // No peer-made 16-byte-IV ciphertext is available (keys never leave the HSM), so this checks
    // that the HSM takes the IV and judges the tag, rather than refusing the parameters.
    let mut d = dec(KEY, &sealed, b"");
    d.iv = vec![9u8; 16];
    assert_eq!(
        hsm.aead_decrypt(d).await.unwrap_err(),
        CryptoError::InvalidCiphertext
    );
    for len in [0, 8, 13, 32] {
        let mut d = dec(KEY, &sealed, b"");
        d.iv = vec![1u8; len];
        assert_eq!(
            hsm.aead_decrypt(d).await.unwrap_err(),
            CryptoError::InvalidCiphertext,
            "iv len {len}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_check_refuses_exportable_keys() {
    let token = TestToken::new();
    let extractable = token.add_key(&KeySpec {
        extractable: true,
        ..KeySpec::aes256("exportable")
    });
    assert!(extractable.created && extractable.info.extractable);
    let readable = token.add_key(&KeySpec {
        sensitive: false,
        ..KeySpec::aes256("readable")
    });
    assert!(readable.info.custody_violation.is_some());

    let (hsm, _m) = start(token.settings());
    let info = hsm.key_info("exportable").await.unwrap();
    assert_eq!(
        info.custody_violation.as_deref(),
        Some(
            "key is extractable (CKA_EXTRACTABLE=true); ekm-proxy refuses keys that can leave the HSM; \
             set hsm.allow_exportable_keys to override"
        )
    );
    let why = hsm
        .key_info("readable")
        .await
        .unwrap()
        .custody_violation
        .unwrap();
    assert!(why.contains("CKA_SENSITIVE=false"), "{why}");
    for key in ["exportable", "readable"] {
        let err = hsm.aead_encrypt(enc(key, b"x", b"")).await.unwrap_err();
        assert!(
            matches!(err, CryptoError::KeyDisabled(ref w) if w.contains("allow_exportable_keys")),
            "{err:?}"
        );
    }
    hsm.shutdown();

    let mut settings = token.settings();
    settings.allow_exportable_keys = true;
    let (hsm, _m) = start(settings);
    assert_eq!(
        hsm.key_info("exportable").await.unwrap().custody_violation,
        None
    );
    let sealed = hsm
        .aead_encrypt(enc("exportable", b"x", b""))
        .await
        .unwrap();
    assert_eq!(
        &hsm.aead_decrypt(dec("exportable", &sealed, b""))
            .await
            .unwrap()[..],
        b"x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_labels_are_refused() {
    let token = TestToken::new();
    let spec = KeySpec::aes256("twice");
    bootstrap::generate_key(&token.module, &token.label, &token.pin(), &spec).unwrap();
    bootstrap::generate_key(&token.module, &token.label, &token.pin(), &spec).unwrap();
    let err = bootstrap::ensure_key(&token.module, &token.label, &token.pin(), &spec).unwrap_err();
    assert!(
        matches!(err, HsmError::KeyAmbiguous { count: 2, .. }),
        "{err}"
    );

    let (hsm, _m) = start(token.settings());
    let expected = CryptoError::KeyDisabled("label is ambiguous: 2 objects".to_owned());
    assert_eq!(hsm.key_info("twice").await.unwrap_err(), expected);
    assert_eq!(
        hsm.aead_encrypt(enc("twice", b"x", b"")).await.unwrap_err(),
        expected
    );
    // Other keys are unaffected.
    hsm.aead_encrypt(enc(KEY, b"x", b"")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_is_busy() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.workers = 1;
    settings.queue_capacity = 1;
    let (hsm, m) = start(settings);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let hsm = hsm.clone();
        tasks.spawn(async move {
            hsm.aead_encrypt(enc(KEY, &vec![1u8; 256 * 1024], b""))
                .await
        });
    }
    let (mut ok, mut busy) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(CryptoError::HsmBusy) => busy += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok} busy {busy}");
    assert_eq!(m.hsm.queue_rejections.get(), busy);
    assert_eq!(m.hsm.queue_depth.get(), 0);
    // Health under no load is fine again.
    assert_eq!(hsm.health().await.status, HealthStatus::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_jobs_time_out_without_reaching_the_hsm() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.workers = 1;
    settings.op_timeout = Duration::from_millis(30);
    let (hsm, m) = start(settings);
    let mut tasks = tokio::task::JoinSet::new();
    let jobs = 40;
    for _ in 0..jobs {
        let hsm = hsm.clone();
        tasks.spawn(async move {
            hsm.aead_encrypt(enc(KEY, &vec![1u8; 1024 * 1024], b""))
                .await
        });
    }
    let (mut ok, mut timeouts) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(CryptoError::HsmTimeout) => timeouts += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(timeouts >= 1, "ok {ok} timeouts {timeouts}");
    // Let the worker work through (and drop) what is left.
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.hsm.queue_depth.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reached_hsm = m.hsm.op("encrypt").get_sample_count();
    assert!(
        reached_hsm < jobs,
        "{reached_hsm} of {jobs} jobs reached the HSM"
    );
    assert_eq!(m.hsm.queue_depth.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_every_session_is_closed() {
    let token = TestToken::new();
    let (hsm, m) = start(token.settings());
    hsm.aead_encrypt(enc(KEY, b"before", b"")).await.unwrap();
    let (reopens, logins) = (m.hsm.session_reopens.get(), m.hsm.logins.get());

    assert_eq!(hsm.close_all_sessions().await.unwrap(), 2);
    let sealed = hsm.aead_encrypt(enc(KEY, b"after", b"")).await.unwrap();
    assert_eq!(
        &hsm.aead_decrypt(dec(KEY, &sealed, b"")).await.unwrap()[..],
        b"after"
    );
    assert!(m.hsm.session_reopens.get() > reopens, "sessions reopened");
    assert!(m.hsm.logins.get() > logins, "logged in again");

    let deadline = Instant::now() + Duration::from_secs(5);
    while m.hsm.sessions.get() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = hsm.health().await;
    assert_eq!(
        (health.status, health.sessions_up, health.sessions_total),
        (HealthStatus::Active, 2, 2),
        "{health:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_the_token_logs_us_out() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.workers = 1;
    let (hsm, m) = start(settings);
    let sealed = hsm.aead_encrypt(enc(KEY, b"before", b"")).await.unwrap();
    let logins = m.hsm.logins.get();

    hsm.logout_all_sessions().await.unwrap();
    // Discovered from the HSM's return codes (stale handle / not logged in), not announced.
    assert_eq!(
        &hsm.aead_decrypt(dec(KEY, &sealed, b"")).await.unwrap()[..],
        b"before"
    );
    hsm.aead_encrypt(enc(KEY, b"after", b"")).await.unwrap();
    assert_eq!(m.hsm.logins.get(), logins + 1);
    assert_eq!(hsm.health().await.status, HealthStatus::Active);
    hsm.logout_all_sessions().await.unwrap();
    assert_eq!(
        hsm.health().await.status,
        HealthStatus::Active,
        "health logs in again too"
    );
    assert_eq!(hsm.key_info(KEY).await.unwrap().label, KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_token() {
    let token = TestToken::new();
    let (hsm, _m) = start(token.settings());
    let h = hsm.health().await;
    assert_eq!(h.status, HealthStatus::Active, "{h:?}");
    assert_eq!(h.token_label, token.label);
    assert_eq!(h.serial, token.serial);
    assert!(h.manufacturer.contains("SoftHSM"), "{h:?}");
    assert!(
        h.versions.starts_with("hw ") && h.versions.contains(" fw "),
        "{}",
        h.versions
    );
    assert_eq!((h.sessions_up, h.sessions_total), (2, 2));
    assert!(h.detail.is_empty());

    hsm.shutdown();
    let h = hsm.health().await;
    assert_eq!(h.status, HealthStatus::Unavailable);
    assert!(matches!(
        hsm.aead_encrypt(enc(KEY, b"x", b"")).await,
        Err(CryptoError::HsmUnavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions() {
    let token = TestToken::new();
    let (hsm, m) = start(token.settings());
    assert_eq!(m.hsm.sessions.get(), 2);
    let clone = hsm.clone();
    hsm.shutdown();
    hsm.shutdown();
    assert_eq!(m.hsm.sessions.get(), 0);
    assert!(matches!(
        clone.random(8).await,
        Err(CryptoError::HsmUnavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes() {
    let token = TestToken::new();
    let (hsm, _m) = start(token.settings());
    let a = hsm.random(32).await.unwrap();
    let b = hsm.random(32).await.unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert!(matches!(
        hsm.random(2 * 1024 * 1024).await,
        Err(CryptoError::Unsupported(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_selected_by_serial() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.token = TokenSelector::Serial(token.serial.clone());
    let (hsm, _m) = start(settings);
    assert_eq!(hsm.health().await.token_label, token.label);
    hsm.aead_encrypt(enc(KEY, b"x", b"")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_lists_the_tokens_present() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.token = TokenSelector::Label("no-such-token".to_owned());
    let metrics = Metrics::standalone();
    let err =
        Pkcs11Backend::start(settings, metrics.hsm.clone(), metrics.cache.clone()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("no token with label \"no-such-token\" in PKCS#11 module"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{} (serial {})", token.label, token.serial)),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_fails_start_without_showing_it() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.user_pin = "wrong-pin-9876".into();
    let metrics = Metrics::standalone();
    let err =
        Pkcs11Backend::start(settings, metrics.hsm.clone(), metrics.cache.clone()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HsmError::Login { .. }), "{msg}");
    assert!(msg.contains("CKR_PIN_INCORRECT"), "{msg}");
    assert!(
        !msg.contains("wrong-pin-9876") && !msg.contains(USER_PIN),
        "{msg}"
    );
    assert_eq!(
        metrics.hsm.logins.get(),
        1,
        "a wrong PIN is tried exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_shows_every_key() {
    let token = TestToken::new();
    token.add_key(&KeySpec {
        extractable: true,
        ..KeySpec::aes256("exportable")
    });
    let (hsm, _m) = start(token.settings());
    let keys = hsm.list_keys().await.unwrap();
    let labels: Vec<&str> = keys.iter().map(|k| k.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "dev-aes-1",
            "dev-aes-decrypt-only",
            "dev-aes-encrypt-only",
            "dev-aes-no-usage",
            "ekm-health-check",
            "exportable"
        ]
    );
    for k in &keys {
        assert_eq!(k.key_spec(), "AES_256", "{}", k.label);
        assert_eq!(
            k.custody_violation.is_some(),
            k.label == "exportable",
            "{}",
            k.label
        );
    }
    let usage = |label: &str| {
        keys.iter()
            .find(|k| k.label == label)
            .unwrap()
            .usage
            .names()
    };
    assert_eq!(usage("dev-aes-1"), ["ENCRYPT", "DECRYPT"]);
    assert_eq!(usage("dev-aes-encrypt-only"), ["ENCRYPT"]);
    assert_eq!(usage("dev-aes-decrypt-only"), ["DECRYPT"]);
    assert!(usage("dev-aes-no-usage").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_is_idempotent() {
    let token = TestToken::new();
    let again = bootstrap::ensure_token(
        &token.module,
        &token.label,
        &token.so_pin.as_str().into(),
        &token.pin(),
    )
    .unwrap();
    assert!(!again.created);
    assert_eq!(again.serial, token.serial);
    let report = token.add_key(&KeySpec::aes256(KEY));
    assert!(!report.created, "dev-aes-1 existed");
    assert!(report.info.usage.encrypt && report.info.sensitive && !report.info.extractable);
    let fresh = token.add_key(&KeySpec::aes256("new-key"));
    assert!(fresh.created);
    assert!(!token.add_key(&KeySpec::aes256("new-key")).created);

    let (hsm, _m) = start(token.settings());
    assert_eq!(hsm.list_keys().await.unwrap().len(), 6);
    // Bootstrap while a backend serves from the same token (and module) does not disturb it.
    token.add_key(&KeySpec::aes256("while-serving"));
    hsm.aead_encrypt(enc("while-serving", b"x", b""))
        .await
        .unwrap();
    hsm.aead_encrypt(enc(KEY, b"x", b"")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_share_the_module() {
    let (a, b) = (TestToken::new(), TestToken::new());
    let (hsm_a, _ma) = start(a.settings());
    let (hsm_b, _mb) = start(b.settings());
    let sealed = hsm_a.aead_encrypt(enc(KEY, b"a", b"")).await.unwrap();
    // Same label, different token, different key.
    assert_eq!(
        hsm_b
            .aead_decrypt(dec(KEY, &sealed, b""))
            .await
            .unwrap_err(),
        CryptoError::InvalidCiphertext
    );
    drop(hsm_a);
    // Dropping one backend must not finalize the module under the other.
    hsm_b.aead_encrypt(enc(KEY, b"b", b"")).await.unwrap();
    assert_eq!(hsm_b.health().await.status, HealthStatus::Active);
}

/// Throughput of the raw HSM lane (no HTTP), printed for the record: 1 worker, 32 in flight,
/// 64-byte plaintexts. Run with `--release --nocapture` for meaningful numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throughput_report() {
    let token = TestToken::new();
    let mut settings = token.settings();
    settings.workers = 1;
    let (hsm, _m) = start(settings);
    let hsm = Arc::new(hsm);
    let per_task = 500;
    let tasks = 32;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let hsm = Arc::clone(&hsm);
        set.spawn(async move {
            for _ in 0..per_task {
                hsm.aead_encrypt(enc(KEY, &[5u8; 64], b"\x00\x00\x00"))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed();
    let ops = f64::from(per_task * tasks) / elapsed.as_secs_f64();
    println!(
        "raw AES-GCM encrypt, 1 worker: {ops:.0} ops/s ({} ops in {elapsed:?})",
        per_task * tasks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_key_copies_are_the_same_key_and_survive_recovery() {
    let token = TestToken::new();
    let (plain, _pm) = start(token.settings());
    let mut settings = token.settings();
    settings.session_key_copies = true;
    settings.workers = 1;
    let (copies, m) = start(settings);
    // Same key material: what one lane seals, the other opens, both ways.
    let sealed = plain
        .aead_encrypt(enc(KEY, b"from the token object", b"a"))
        .await
        .unwrap();
    assert_eq!(
        &copies.aead_decrypt(dec(KEY, &sealed, b"a")).await.unwrap()[..],
        b"from the token object"
    );
    let sealed = copies
        .aead_encrypt(enc(KEY, b"from the session copy", b"b"))
        .await
        .unwrap();
    assert_eq!(
        &plain.aead_decrypt(dec(KEY, &sealed, b"b")).await.unwrap()[..],
        b"from the session copy"
    );
    // Usage restrictions travel with the copy.
    assert!(matches!(
        copies
            .aead_encrypt(enc("dev-aes-decrypt-only", b"x", b""))
            .await,
        Err(CryptoError::InvalidKeyUsage(_))
    ));
    // A bad tag costs no session, and copies die with their session but are made again.
    let mut bad = sealed.clone();
    bad.tag[0] ^= 1;
    let reopens = m.hsm.session_reopens.get();
    assert_eq!(
        copies.aead_decrypt(dec(KEY, &bad, b"b")).await.unwrap_err(),
        CryptoError::InvalidCiphertext
    );
    assert_eq!(m.hsm.session_reopens.get(), reopens);
    assert_eq!(copies.close_all_sessions().await.unwrap(), 1);
    let again = copies
        .aead_encrypt(enc(KEY, b"after recovery", b""))
        .await
        .unwrap();
    assert_eq!(
        &plain.aead_decrypt(dec(KEY, &again, b"")).await.unwrap()[..],
        b"after recovery"
    );
    assert!(m.hsm.session_reopens.get() > reopens);
}
