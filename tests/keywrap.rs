//! Key wrapping inside a real SoftHSMv2 token through the proxy's HSM backend: what the start-up
//! trial finds, the RFC 3394 §4.6 known answer with an imported KEK, A256KWP byte for byte against
//! an independent implementation (the `aes-kw` crate), RSA-OAEP against the `rsa` crate encrypting
//! to the `n`/`e` the backend reads from the HSM, and the refusals (tampered input, an algorithm
//! the token lacks).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use ekm_proxy::core::{Backend as _, CryptoError, KeyUnwrap, KeyWrap, WrapAlgorithm};
use ekm_proxy::hsm::{KeyKind, KeySpec, Pkcs11Backend, TokenSelector};
use ekm_proxy::metrics::Metrics;
use zeroize::Zeroizing;

use common::softhsm::TestToken;

/// RFC 3394 §4.6: 256 bits of key data wrapped with a 256-bit KEK.
const RFC3394_KEK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const RFC3394_DATA: &str = "00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f";
const RFC3394_WRAPPED: &str =
    "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21";

fn backend(token: &TestToken) -> Pkcs11Backend {
    let metrics = Metrics::standalone();
    Pkcs11Backend::start(token.settings(), metrics.hsm.clone(), metrics.cache.clone())
        .unwrap_or_else(|e| panic!("backend: {e}"))
}

fn selector(token: &TestToken) -> TokenSelector {
    TokenSelector::Label(token.label.clone())
}

/// Import the RFC's KEK as `label`, allowed to wrap and unwrap.
fn import_kek(token: &TestToken, label: &str) {
    let spec = KeySpec::aes256(label)
        .with_usage(["wrap", "unwrap"])
        .unwrap();
    ekm_proxy::hsm::import_aes_key(
        &token.module,
        &selector(token),
        &token.pin(),
        &spec,
        &hex::decode(RFC3394_KEK).unwrap(),
    )
    .unwrap();
}

async fn wrap(b: &Pkcs11Backend, key: &str, alg: WrapAlgorithm, data: &[u8]) -> Vec<u8> {
    b.key_wrap(KeyWrap {
        key: key.into(),
        alg,
        plaintext: Zeroizing::new(data.to_vec()),
    })
    .await
    .unwrap_or_else(|e| panic!("{alg} wrap of {} bytes: {e}", data.len()))
}

async fn unwrap(
    b: &Pkcs11Backend,
    key: &str,
    alg: WrapAlgorithm,
    wrapped: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    b.key_unwrap(KeyUnwrap {
        key: key.into(),
        alg,
        wrapped: wrapped.to_vec(),
    })
    .await
    .map(|p| p.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trial_finds_what_softhsm_does() {
    let token = TestToken::new();
    let b = backend(&token);
    let support = b.wrap_support();
    // Debian's SoftHSM 2.6.1: AES wrapping through C_WrapKey only, OAEP with SHA-1 only.
    for alg in [
        WrapAlgorithm::A256Kw,
        WrapAlgorithm::A256Kwp,
        WrapAlgorithm::RsaOaep,
    ] {
        assert!(support.supports(alg), "{alg}: {support:?}");
    }
    assert!(!support.supports(WrapAlgorithm::RsaOaep256), "{support:?}");
    let why = support.refusal(WrapAlgorithm::RsaOaep256).unwrap();
    assert!(why.starts_with("CKR_"), "the HSM's own answer: {why}");
    assert_eq!(support.names(), vec!["A256KW", "A256KWP", "RSA-OAEP"]);
    // Its CKM_AES_KEY_WRAP_PAD wraps unaligned inputs wrongly (zero-padded first): found by trial.
    assert_eq!(support.block_aligned_wrap, vec![WrapAlgorithm::A256Kwp]);
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_key_wrap_gives_the_rfc_3394_answer_and_refuses_tampering() {
    let token = TestToken::new();
    import_kek(&token, "rfc3394-kek");
    let b = backend(&token);
    let data = hex::decode(RFC3394_DATA).unwrap();
    let wrapped = wrap(&b, "rfc3394-kek", WrapAlgorithm::A256Kw, &data).await;
    assert_eq!(hex::encode(&wrapped), RFC3394_WRAPPED);
    let back = unwrap(&b, "rfc3394-kek", WrapAlgorithm::A256Kw, &wrapped)
        .await
        .unwrap();
    assert_eq!(back, data);
    // Any flipped bit fails the RFC's integrity check inside the HSM.
    for at in [0, 8, wrapped.len() - 1] {
        let mut bad = wrapped.clone();
        bad[at] ^= 0x01;
        let err = unwrap(&b, "rfc3394-kek", WrapAlgorithm::A256Kw, &bad)
            .await
            .unwrap_err();
        assert_eq!(err, CryptoError::InvalidCiphertext, "bit flipped at {at}");
    }
    // The session still serves after the refusals.
    assert_eq!(
        unwrap(&b, "rfc3394-kek", WrapAlgorithm::A256Kw, &wrapped)
            .await
            .unwrap(),
        data
    );
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_key_wrap_with_padding_matches_an_independent_implementation() {
    let token = TestToken::new();
    import_kek(&token, "kwp-kek");
    let b = backend(&token);
    let kek: [u8; 32] = hex::decode(RFC3394_KEK).unwrap().try_into().unwrap();
    let reference = aes_kw::KekAes256::from(kek);
    // SoftHSM 2.6.1 zero-pads an unaligned input before wrapping (so its MLI is wrong); the
    // trial found that, and such wraps are refused rather than answered wrongly.
    let aligned_only = b
        .wrap_support()
        .block_aligned_wrap
        .contains(&WrapAlgorithm::A256Kwp);
    for len in [1usize, 7, 8, 20, 32, 64] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let theirs = reference.wrap_with_padding_vec(&data).unwrap();
        // Unwrapping is RFC 5649 for every length: the reference's blob opens to the input.
        let back = unwrap(&b, "kwp-kek", WrapAlgorithm::A256Kwp, &theirs)
            .await
            .unwrap_or_else(|e| panic!("length {len}: {e}"));
        assert_eq!(back, data, "length {len}");
        let ours = b
            .key_wrap(KeyWrap {
                key: "kwp-kek".into(),
                alg: WrapAlgorithm::A256Kwp,
                plaintext: Zeroizing::new(data.clone()),
            })
            .await;
        if aligned_only && len % 8 != 0 {
            match ours {
                Err(CryptoError::Unsupported(why)) => {
                    assert!(why.contains("multiples of 8 bytes"), "{why}")
                }
                other => panic!("length {len}: expected the clear refusal, got {other:?}"),
            }
        } else {
            let ours = ours.unwrap_or_else(|e| panic!("length {len}: {e}"));
            assert_eq!(hex::encode(&ours), hex::encode(&theirs), "length {len}");
        }
    }
    // A tampered blob fails RFC 5649's integrity check inside the HSM.
    let mut bad = reference.wrap_with_padding_vec(&[9u8; 20]).unwrap();
    bad[3] ^= 0x10;
    assert_eq!(
        unwrap(&b, "kwp-kek", WrapAlgorithm::A256Kwp, &bad)
            .await
            .unwrap_err(),
        CryptoError::InvalidCiphertext
    );
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_oaep_round_trips_with_an_independent_encryptor() {
    use rsa::traits::PublicKeyParts as _;

    let token = TestToken::new();
    token.add_key(&KeySpec::new("oaep-rsa", KeyKind::Rsa2048));
    let b = backend(&token);
    let info = b.key_info("oaep-rsa").await.unwrap();
    assert_eq!(info.key_spec(), "RSA_2048");
    let public = info.rsa_public.clone().expect("n and e read from the HSM");
    assert_eq!(public.exponent, vec![0x01, 0x00, 0x01]);
    assert_eq!(public.modulus.len(), 256);
    let n = rsa::BigUint::from_bytes_be(&public.modulus);
    let e = rsa::BigUint::from_bytes_be(&public.exponent);
    let key = rsa::RsaPublicKey::new(n, e).unwrap();
    assert_eq!(key.size(), 256);

    let dek = [0x5au8; 32];
    // Encrypted outside by an independent implementation, decrypted inside the HSM.
    let mut rng = rsa::rand_core::OsRng;
    let sealed = key
        .encrypt(&mut rng, rsa::Oaep::new::<sha1::Sha1>(), &dek)
        .unwrap();
    let opened = unwrap(&b, "oaep-rsa", WrapAlgorithm::RsaOaep, &sealed)
        .await
        .unwrap();
    assert_eq!(opened, dek);
    // Wrapped inside the HSM (with the public key object), unwrapped inside it.
    let wrapped = wrap(&b, "oaep-rsa", WrapAlgorithm::RsaOaep, &dek).await;
    assert_eq!(wrapped.len(), 256);
    assert_ne!(wrapped, sealed, "OAEP is randomized");
    assert_eq!(
        unwrap(&b, "oaep-rsa", WrapAlgorithm::RsaOaep, &wrapped)
            .await
            .unwrap(),
        dek
    );
    // SHA-256 OAEP made outside is refused as an algorithm this HSM lacks, naming it.
    let sealed256 = key
        .encrypt(&mut rng, rsa::Oaep::new::<sha2::Sha256>(), &dek)
        .unwrap();
    match unwrap(&b, "oaep-rsa", WrapAlgorithm::RsaOaep256, &sealed256).await {
        Err(CryptoError::Unsupported(why)) => assert!(why.contains("RSA-OAEP-256"), "{why}"),
        other => panic!("expected the clear refusal, got {other:?}"),
    }
    // A tampered OAEP block fails decoding inside the HSM.
    let mut bad = sealed.clone();
    bad[100] ^= 0x80;
    assert_eq!(
        unwrap(&b, "oaep-rsa", WrapAlgorithm::RsaOaep, &bad)
            .await
            .unwrap_err(),
        CryptoError::InvalidCiphertext
    );
    b.shutdown();
}
