//! Key wrapping inside the HSM: AES Key Wrap (`CKM_AES_KEY_WRAP`, RFC 3394), AES Key Wrap with
//! Padding (`CKM_AES_KEY_WRAP_PAD`, RFC 5649 in SoftHSM and the HSMs we know) and RSA-OAEP
//! (`CKM_RSA_PKCS_OAEP` with SHA-1 or SHA-256 and the matching MGF1), plus the start-up trial
//! that finds out which of them the token does, and how.
//!
//! AES wrapping runs by `C_Encrypt`/`C_Decrypt` on the bytes where the module allows it, else by
//! `C_WrapKey`/`C_UnwrapKey` of a short-lived session object (a generic secret holding the bytes,
//! destroyed right after; SoftHSM takes this path). RSA-OAEP encrypts with the pair's public key
//! object and decrypts with the private key, both inside the HSM: no RSA operation, OAEP decoding
//! or unwrapping ever happens in the proxy.
//!
//! `CKM_AES_KEY_WRAP_KWP` (0x210B) cannot be named through cryptoki 0.12 without `unsafe` (it has
//! no variant, and its vendor-defined escape refuses standard codes), so A256KWP uses
//! `CKM_AES_KEY_WRAP_PAD`; the trial checks its output has RFC 5649's length.
//!
//! Runs on a worker thread with that worker's session; knows nothing of queues, caches or
//! recovery. Failures go through `errors::map_ckr`.

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use zeroize::{Zeroize, Zeroizing};

use super::errors::{Fault, Op, ck_error_name, map_ckr};
use crate::core::{CryptoError, Plaintext, WrapAlgorithm, WrapPath, WrapSupport};

/// The PKCS#11 mechanism for `alg`.
fn mechanism(alg: WrapAlgorithm) -> Mechanism<'static> {
    let oaep =
        |hash, mgf| Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()));
    match alg {
        WrapAlgorithm::A256Kw => Mechanism::AesKeyWrap,
        WrapAlgorithm::A256Kwp => Mechanism::AesKeyWrapPad,
        WrapAlgorithm::RsaOaep => oaep(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        WrapAlgorithm::RsaOaep256 => oaep(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
    }
}

/// The mechanism's PKCS#11 name, for `/info` and the log.
pub(crate) fn mechanism_name(alg: WrapAlgorithm) -> &'static str {
    match alg {
        WrapAlgorithm::A256Kw => "CKM_AES_KEY_WRAP",
        WrapAlgorithm::A256Kwp => "CKM_AES_KEY_WRAP_PAD",
        WrapAlgorithm::RsaOaep => "CKM_RSA_PKCS_OAEP(SHA-1)",
        WrapAlgorithm::RsaOaep256 => "CKM_RSA_PKCS_OAEP(SHA-256)",
    }
}

/// Wrap `plaintext` with `alg`. `key` is the AES key, or the RSA private key whose `public`
/// half encrypts; `path` is how the token does AES wrapping (ignored for RSA).
pub(crate) fn wrap(
    session: &Session,
    key: ObjectHandle,
    public: Option<ObjectHandle>,
    alg: WrapAlgorithm,
    path: WrapPath,
    plaintext: &[u8],
) -> Result<Vec<u8>, Fault> {
    let mech = mechanism(alg);
    if alg.is_rsa() {
        let Some(public) = public else {
            return Err(Fault::plain(CryptoError::Unsupported(
                "the RSA key has no public key object on the token to wrap with".to_owned(),
            )));
        };
        return session
            .encrypt(&mech, public, plaintext)
            .map_err(|e| map_ckr(Op::Wrap, &e));
    }
    match path {
        WrapPath::EncryptDecrypt => session
            .encrypt(&mech, key, plaintext)
            .map_err(|e| map_ckr(Op::Wrap, &e)),
        WrapPath::WrapUnwrapKey => wrap_as_object(session, &mech, key, plaintext),
    }
}

/// Unwrap `wrapped` with `alg` (the inverse of [`wrap`]; `key` is the AES or RSA private key).
pub(crate) fn unwrap(
    session: &Session,
    key: ObjectHandle,
    alg: WrapAlgorithm,
    path: WrapPath,
    wrapped: &[u8],
) -> Result<Plaintext, Fault> {
    let mech = mechanism(alg);
    if alg.is_rsa() || path == WrapPath::EncryptDecrypt {
        return session
            .decrypt(&mech, key, wrapped)
            .map(Zeroizing::new)
            .map_err(|e| map_ckr(Op::Unwrap, &e));
    }
    unwrap_as_object(session, &mech, key, wrapped)
}

/// The template of the short-lived session object that carries the bytes through
/// `C_WrapKey`/`C_UnwrapKey`: a private session object whose value can be read back (it holds the
/// caller's own bytes, which the caller sent or will receive anyway).
fn carrier_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

fn wrap_as_object(
    session: &Session,
    mech: &Mechanism,
    key: ObjectHandle,
    plaintext: &[u8],
) -> Result<Vec<u8>, Fault> {
    let mut template = carrier_template();
    template.push(Attribute::Value(plaintext.to_vec()));
    let created = session.create_object(&template);
    // The copy of the bytes in the template is the caller's secret: wipe it.
    for attr in &mut template {
        if let Attribute::Value(bytes) = attr {
            bytes.zeroize();
        }
    }
    let carrier = created.map_err(|e| map_ckr(Op::Wrap, &e))?;
    let wrapped = session.wrap_key(mech, key, carrier);
    let _ = session.destroy_object(carrier);
    wrapped.map_err(|e| map_ckr(Op::Wrap, &e))
}

fn unwrap_as_object(
    session: &Session,
    mech: &Mechanism,
    key: ObjectHandle,
    wrapped: &[u8],
) -> Result<Plaintext, Fault> {
    let carrier = session
        .unwrap_key(mech, key, wrapped, &carrier_template())
        .map_err(|e| map_ckr(Op::Unwrap, &e))?;
    let read = session.get_attributes(carrier, &[AttributeType::Value]);
    let _ = session.destroy_object(carrier);
    let attrs = read.map_err(|e| map_ckr(Op::Unwrap, &e))?;
    attrs
        .into_iter()
        .find_map(|attr| match attr {
            Attribute::Value(bytes) => Some(Zeroizing::new(bytes)),
            _ => None,
        })
        .ok_or_else(|| {
            Fault::plain(CryptoError::Internal(
                "C_UnwrapKey made an object without a readable value".to_owned(),
            ))
        })
}

/// Find out what the token can do: each algorithm is tried on short-lived session keys made for
/// the trial (an AES-256 key and an RSA-2048 pair, destroyed after), with known inputs whose
/// round trips must come back equal and whose wrapped lengths must be the RFCs'.
/// `C_GetMechanismInfo` alone is not enough: SoftHSM lists `CKM_RSA_PKCS_OAEP` but accepts only
/// SHA-1 parameters, and its `CKM_AES_KEY_WRAP_PAD` zero-pads an input that is not a multiple of
/// 8 bytes before wrapping (its unwrapping is RFC 5649), so such wraps would not round-trip.
pub(crate) fn probe(session: &Session) -> WrapSupport {
    let mut support = WrapSupport::default();
    match trial_aes_key(session) {
        Ok(aes) => {
            for alg in [WrapAlgorithm::A256Kw, WrapAlgorithm::A256Kwp] {
                match probe_aes(session, aes, alg) {
                    Ok((path, aligned_only)) => {
                        support
                            .supported
                            .push((alg, mechanism_name(alg), Some(path)));
                        if aligned_only {
                            support.block_aligned_wrap.push(alg);
                        }
                    }
                    Err(why) => support.unsupported.push((alg, why)),
                }
            }
            let _ = session.destroy_object(aes);
        }
        Err(why) => {
            for alg in [WrapAlgorithm::A256Kw, WrapAlgorithm::A256Kwp] {
                support.unsupported.push((alg, why.clone()));
            }
        }
    }
    match trial_rsa_pair(session) {
        Ok((public, private)) => {
            for alg in [WrapAlgorithm::RsaOaep, WrapAlgorithm::RsaOaep256] {
                let mech = mechanism(alg);
                let result = round_trip(
                    &[0x5a; 32],
                    |data| session.encrypt(&mech, public, data),
                    |data| session.decrypt(&mech, private, data),
                    None,
                );
                match result {
                    Ok(()) => support.supported.push((alg, mechanism_name(alg), None)),
                    Err(why) => support.unsupported.push((alg, why)),
                }
            }
            let _ = session.destroy_object(public);
            let _ = session.destroy_object(private);
        }
        Err(why) => {
            for alg in [WrapAlgorithm::RsaOaep, WrapAlgorithm::RsaOaep256] {
                support.unsupported.push((alg, why.clone()));
            }
        }
    }
    support
}

/// AES wrapping by `C_Encrypt` first, then by `C_WrapKey`: the first path whose two-block trial
/// round-trips to the RFC's length wins. For A256KWP a one-block, unaligned trial follows (7
/// bytes wrap to exactly 16 under RFC 5649); when only it fails, the token wraps block-aligned
/// inputs only (`true`).
fn probe_aes(
    session: &Session,
    key: ObjectHandle,
    alg: WrapAlgorithm,
) -> Result<(WrapPath, bool), String> {
    let mech = mechanism(alg);
    let two_blocks = [0xa5u8; 16];
    // RFC 3394 and RFC 5649 both add one 8-byte block to a two-block input.
    let direct = round_trip(
        &two_blocks,
        |data| session.encrypt(&mech, key, data),
        |data| session.decrypt(&mech, key, data),
        Some(24),
    );
    let path = match direct {
        Ok(()) => WrapPath::EncryptDecrypt,
        Err(direct_why) => {
            let as_object = round_trip_faults(
                &two_blocks,
                |data| wrap_as_object(session, &mech, key, data),
                |data| unwrap_as_object(session, &mech, key, data).map(|p| p.to_vec()),
                Some(24),
            );
            match as_object {
                Ok(()) => WrapPath::WrapUnwrapKey,
                Err(object_why) => {
                    return Err(format!("C_Encrypt: {direct_why}; C_WrapKey: {object_why}"));
                }
            }
        }
    };
    if alg != WrapAlgorithm::A256Kwp {
        return Ok((path, false));
    }
    let unaligned = [0x3cu8; 7];
    let result = match path {
        WrapPath::EncryptDecrypt => round_trip(
            &unaligned,
            |data| session.encrypt(&mech, key, data),
            |data| session.decrypt(&mech, key, data),
            Some(16),
        ),
        WrapPath::WrapUnwrapKey => round_trip_faults(
            &unaligned,
            |data| wrap_as_object(session, &mech, key, data),
            |data| unwrap_as_object(session, &mech, key, data).map(|p| p.to_vec()),
            Some(16),
        ),
    };
    Ok((path, result.is_err()))
}

fn round_trip(
    input: &[u8],
    seal: impl Fn(&[u8]) -> cryptoki::error::Result<Vec<u8>>,
    open: impl Fn(&[u8]) -> cryptoki::error::Result<Vec<u8>>,
    expect_len: Option<usize>,
) -> Result<(), String> {
    let name = |e: cryptoki::error::Error| ck_error_name(&e).into_owned();
    round_trip_faults(
        input,
        |data| seal(data).map_err(|e| Fault::plain(CryptoError::Unsupported(name(e)))),
        |data| open(data).map_err(|e| Fault::plain(CryptoError::Unsupported(name(e)))),
        expect_len,
    )
}

fn round_trip_faults(
    input: &[u8],
    seal: impl Fn(&[u8]) -> Result<Vec<u8>, Fault>,
    open: impl Fn(&[u8]) -> Result<Vec<u8>, Fault>,
    expect_len: Option<usize>,
) -> Result<(), String> {
    let why = |f: Fault| match f.error {
        CryptoError::Unsupported(name) => name,
        other => other.to_string(),
    };
    let wrapped = seal(input).map_err(why)?;
    if let Some(expected) = expect_len.filter(|expected| wrapped.len() != *expected) {
        return Err(format!(
            "{} bytes wrapped into {}, not the {expected} the RFC gives",
            input.len(),
            wrapped.len()
        ));
    }
    let back = open(&wrapped).map_err(why)?;
    if back != input {
        return Err(format!(
            "the trial did not round-trip ({} bytes came back for {})",
            back.len(),
            input.len()
        ));
    }
    Ok(())
}

/// A session AES-256 key for the trial (sensitive, never leaves the HSM, gone with the session).
fn trial_aes_key(session: &Session) -> Result<ObjectHandle, String> {
    let template = [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::ValueLen(Ulong::new(32)),
    ];
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(|e| format!("trial AES key: {}", ck_error_name(&e)))
}

/// A session RSA-2048 pair for the trial.
fn trial_rsa_pair(session: &Session) -> Result<(ObjectHandle, ObjectHandle), String> {
    let public = [
        Attribute::Token(false),
        Attribute::Encrypt(true),
        Attribute::Wrap(true),
        Attribute::ModulusBits(Ulong::new(2048)),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
    ];
    let private = [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Decrypt(true),
        Attribute::Unwrap(true),
    ];
    session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .map_err(|e| format!("trial RSA key pair: {}", ck_error_name(&e)))
}
