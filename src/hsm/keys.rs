//! Key lookup by label, attribute reading (→ `core::KeyInfo`), the custody check, and the
//! label → handle cache.
//!
//! Every function that touches the HSM takes a `&Session` and runs on a worker thread; the cache
//! itself is read from async code on the hot path (`key_info`, the pre-check before enqueueing).
//! Must not depend on the worker pool, on HTTP or on any front end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::errors::{Fault, Op, map_ckr};
use crate::core::{CryptoError, KeyInfo, KeyType, KeyUsage, RsaPublicKey};
use crate::metrics::CacheMetrics;

/// Cache name in `ekm_cache_{hits,misses}_total{cache}`.
pub(crate) const CACHE_NAME: &str = "hsm_key";

/// Cache name of the "no such label" entries.
pub(crate) const NEGATIVE_CACHE_NAME: &str = "hsm_key_unknown";

/// A resolved key: its handle (valid for every session of this process while logged in) and what
/// the HSM says about it.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    /// The secret key, or the private key of an RSA pair.
    pub(crate) handle: ObjectHandle,
    /// The public key object with the same label, for an RSA pair that has one (public-key
    /// operations run on it, inside the HSM).
    pub(crate) public: Option<ObjectHandle>,
    pub(crate) info: KeyInfo,
    /// The handle generation this entry was resolved in (see [`KeyCache::generation`]).
    pub(crate) generation: u64,
}

/// Label → [`KeyEntry`], shared by the async side and the workers.
pub(crate) struct KeyCache {
    /// Entries live `key_cache_ttl`: the HSM stays the authority on every operation (a revoked
    /// usage fails there at once); the lifetime bounds how long `key_info` may report attributes
    /// an operator has since changed, and how long a deleted key keeps working through a session
    /// copy, at the cost of one lookup per key per period.
    entries: moka::sync::Cache<String, Arc<KeyEntry>>,
    /// Labels a search on a healthy token did not find, for `negative_cache_ttl` (None when 0):
    /// a flood of made-up key ids costs one `C_FindObjects` per label per period.
    unknown: Option<moka::sync::Cache<String, ()>>,
    metrics: CacheMetrics,
    /// Bumped whenever a worker had to open a new session or log in again after the first time.
    /// Some HSMs hand out new object handles after a re-login (and may reuse old numbers for other
    /// objects), so an entry resolved in an older generation is looked up again before use.
    generation: AtomicU64,
    allow_exportable_keys: bool,
}

impl KeyCache {
    pub(crate) fn new(
        capacity: u64,
        ttl: Duration,
        negative_ttl: Duration,
        metrics: CacheMetrics,
        allow_exportable_keys: bool,
    ) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            unknown: (!negative_ttl.is_zero()).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .time_to_live(negative_ttl)
                    .build()
            }),
            metrics,
            generation: AtomicU64::new(0),
            allow_exportable_keys,
        }
    }

    /// The cached entry for `label`, counting the hit or miss.
    pub(crate) fn get(&self, label: &str) -> Option<Arc<KeyEntry>> {
        let found = self.entries.get(label);
        if found.is_some() {
            self.metrics.hit(CACHE_NAME);
        } else {
            self.metrics.miss(CACHE_NAME);
        }
        found
    }

    /// The cached entry for `label` if it was resolved in `generation` (worker side; not counted
    /// as a hit or miss: the request was counted when it entered).
    pub(crate) fn fresh(&self, label: &str, generation: u64) -> Option<Arc<KeyEntry>> {
        self.entries
            .get(label)
            .filter(|entry| entry.generation == generation)
    }

    pub(crate) fn insert(&self, entry: Arc<KeyEntry>) {
        self.entries.insert(entry.info.label.clone(), entry);
    }

    pub(crate) fn invalidate(&self, label: &str) {
        self.entries.invalidate(label);
    }

    /// Whether a recent search on a healthy token found no key `label` (counted as a hit or miss
    /// of the negative cache).
    pub(crate) fn known_unknown(&self, label: &str) -> bool {
        let Some(unknown) = &self.unknown else {
            return false;
        };
        let known = unknown.contains_key(label);
        if known {
            self.metrics.hit(NEGATIVE_CACHE_NAME);
        }
        known
    }

    /// Remember that the token holds no key `label` (for the negative cache's lifetime).
    pub(crate) fn remember_unknown(&self, label: &str) {
        if let Some(unknown) = &self.unknown {
            self.metrics.miss(NEGATIVE_CACHE_NAME);
            unknown.insert(label.to_owned(), ());
        }
    }

    /// Forget everything (after the token or module was recovered: handles may have changed,
    /// keys may have come or gone) and mark every handle in flight as suspect.
    pub(crate) fn reset(&self) {
        self.entries.invalidate_all();
        if let Some(unknown) = &self.unknown {
            unknown.invalidate_all();
        }
        self.bump_generation();
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Mark every cached handle as suspect (after a session reopen or re-login).
    pub(crate) fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn allow_exportable_keys(&self) -> bool {
        self.allow_exportable_keys
    }

    /// Find the key `label` on `session` (a secret key, else a private key and its public
    /// half), read its attributes and cache it. One `C_FindObjects` plus one
    /// `C_GetAttributeValue` round for a secret key; two more searches for an RSA pair.
    pub(crate) fn resolve(&self, session: &Session, label: &str) -> Result<Arc<KeyEntry>, Fault> {
        let generation = self.generation();
        let (handle, public) = match find_unique(session, label, ObjectClass::SECRET_KEY) {
            Err(Fault {
                error: CryptoError::KeyNotFound,
                ..
            }) => {
                let handle = find_unique(session, label, ObjectClass::PRIVATE_KEY)?;
                (handle, find_public(session, label)?)
            }
            found => (found?, None),
        };
        let info = read_info(session, handle, self.allow_exportable_keys)?;
        let entry = Arc::new(KeyEntry {
            handle,
            public,
            info,
            generation,
        });
        self.insert(entry.clone());
        Ok(entry)
    }

    /// Fill the cache with every labelled secret and private key on the token (start-up
    /// warm-up). Labels that several keys share are left out: a lookup of them reports the
    /// ambiguity.
    pub(crate) fn warm(&self, session: &Session) -> Result<usize, Fault> {
        let generation = self.generation();
        let keys = list(
            session,
            &[ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY],
            self.allow_exportable_keys,
        )?;
        let publics = list(session, &[ObjectClass::PUBLIC_KEY], true)?;
        // The public half of a pair: the one public key with the pair's label.
        let public_of = |label: &str| {
            let mut same = publics.iter().filter(|(_, info)| info.label == label);
            match (same.next(), same.next()) {
                (Some((handle, _)), None) => Some(*handle),
                _ => None,
            }
        };
        // `list` sorts by label, so keys sharing a label are neighbours.
        let shared_label = |i: usize| {
            let label = &keys[i].1.label;
            (i > 0 && keys[i - 1].1.label == *label)
                || keys
                    .get(i + 1)
                    .is_some_and(|(_, next)| next.label == *label)
        };
        let mut count = 0;
        for (i, (handle, info)) in keys.iter().enumerate() {
            if info.label.is_empty() || shared_label(i) {
                continue;
            }
            let public = if info.key_type == KeyType::Rsa {
                public_of(&info.label)
            } else {
                None
            };
            self.insert(Arc::new(KeyEntry {
                handle: *handle,
                public,
                info: info.clone(),
                generation,
            }));
            count += 1;
        }
        Ok(count)
    }
}

/// Held while a worker searches for a key by label or copies a key into its session (see
/// [`find_unique`]). Process-wide: session objects are visible to every session of this process
/// and to no other process.
pub(crate) fn object_copy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // The lock guards no data: a panic elsewhere while holding it leaves nothing inconsistent.
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The one object of `class` labelled `label`: none is `KeyNotFound`, several is `KeyDisabled`.
pub(crate) fn find_unique(
    session: &Session,
    label: &str,
    class: ObjectClass,
) -> Result<ObjectHandle, Fault> {
    // Token objects only: the keys this proxy serves live on the token. Session objects with the
    // same label (the workers' per-session copies, visible to every session of this process) are
    // not other keys, and counting them would make every label "ambiguous".
    let template = [
        Attribute::Class(class),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let found = {
        // SoftHSM shows a session copy that a peer worker is making (C_CopyObject) with the
        // original's CKA_TOKEN=true for an instant, so a search running meanwhile saw the label
        // twice (the soak caught it as a 400 "ambiguous" answer). Searches and copies exclude each
        // other; both are rare (cache misses, one copy per worker and key).
        let _guard = object_copy_lock();
        session
            .find_objects(&template)
            .map_err(|e| map_ckr(Op::FindKey, &e))?
    };
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(Fault::plain(CryptoError::KeyNotFound)),
        many => Err(Fault::plain(CryptoError::KeyDisabled(format!(
            "label is ambiguous: {} objects",
            many.len()
        )))),
    }
}

/// The public key labelled `label`, if exactly one exists (an RSA pair's public half).
fn find_public(session: &Session, label: &str) -> Result<Option<ObjectHandle>, Fault> {
    match find_unique(session, label, ObjectClass::PUBLIC_KEY) {
        Ok(handle) => Ok(Some(handle)),
        Err(Fault {
            error: CryptoError::KeyNotFound | CryptoError::KeyDisabled(_),
            ..
        }) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Every key of the given classes on the token, with its attributes, sorted by label.
pub(crate) fn list(
    session: &Session,
    classes: &[ObjectClass],
    allow_exportable_keys: bool,
) -> Result<Vec<(ObjectHandle, KeyInfo)>, Fault> {
    let mut out = Vec::new();
    for class in classes {
        let handles = {
            // See `find_unique`: a copy in the making would be listed as a second key.
            let _guard = object_copy_lock();
            session
                .find_objects(&[Attribute::Class(*class), Attribute::Token(true)])
                .map_err(|e| map_ckr(Op::ListKeys, &e))?
        };
        for handle in handles {
            out.push((handle, read_info(session, handle, allow_exportable_keys)?));
        }
    }
    out.sort_by(|a, b| a.1.label.cmp(&b.1.label));
    Ok(out)
}

/// The attributes read for every key (absent ones are skipped by cryptoki and read as false/0).
const INFO_ATTRIBUTES: &[AttributeType] = &[
    AttributeType::Label,
    AttributeType::Class,
    AttributeType::KeyType,
    AttributeType::ValueLen,
    AttributeType::Modulus,
    AttributeType::ModulusBits,
    AttributeType::PublicExponent,
    AttributeType::EcParams,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
    AttributeType::Sensitive,
    AttributeType::Extractable,
];

/// Read a key's attributes into a [`KeyInfo`], including the custody verdict.
pub(crate) fn read_info(
    session: &Session,
    handle: ObjectHandle,
    allow_exportable_keys: bool,
) -> Result<KeyInfo, Fault> {
    let attrs = session
        .get_attributes(handle, INFO_ATTRIBUTES)
        .map_err(|e| map_ckr(Op::ReadAttributes, &e))?;
    Ok(info_from_attributes(&attrs, allow_exportable_keys))
}

/// Pure part of [`read_info`] (unit-tested).
pub(crate) fn info_from_attributes(attrs: &[Attribute], allow_exportable_keys: bool) -> KeyInfo {
    let mut label = String::new();
    let mut class = None;
    let mut key_type = KeyType::Other("UNKNOWN".to_owned());
    let mut value_len = 0u64;
    let mut modulus_bits = 0u64;
    let mut ec_bits = 0u32;
    let mut modulus = Vec::new();
    let mut exponent = Vec::new();
    let mut usage = KeyUsage::default();
    // Absent CKA_SENSITIVE reads as "not sensitive" and absent CKA_EXTRACTABLE as "extractable":
    // the custody check must fail closed when a module does not say.
    let mut sensitive = false;
    let mut extractable = true;
    for attr in attrs {
        match attr {
            Attribute::Label(bytes) => label = String::from_utf8_lossy(bytes).into_owned(),
            Attribute::Class(c) => class = Some(*c),
            Attribute::KeyType(kt) => key_type = key_type_of(*kt),
            Attribute::ValueLen(len) => value_len = u64::from(*len),
            Attribute::Modulus(m) => {
                let significant = strip_leading_zeros(m);
                modulus_bits = modulus_bits.max(significant.len() as u64 * 8);
                modulus = significant.to_vec();
            }
            Attribute::PublicExponent(e) => exponent = strip_leading_zeros(e).to_vec(),
            Attribute::ModulusBits(bits) => modulus_bits = modulus_bits.max(u64::from(*bits)),
            Attribute::EcParams(params) => ec_bits = curve_bits(params),
            Attribute::Encrypt(v) => usage.encrypt = *v,
            Attribute::Decrypt(v) => usage.decrypt = *v,
            Attribute::Sign(v) => usage.sign = *v,
            Attribute::Verify(v) => usage.verify = *v,
            Attribute::Wrap(v) => usage.wrap = *v,
            Attribute::Unwrap(v) => usage.unwrap = *v,
            Attribute::Derive(v) => usage.derive = *v,
            Attribute::Sensitive(v) => sensitive = *v,
            Attribute::Extractable(v) => extractable = *v,
            _ => {}
        }
    }
    let bits = match key_type {
        KeyType::Rsa => modulus_bits,
        KeyType::Ec => u64::from(ec_bits),
        _ => value_len.saturating_mul(8),
    };
    // Only secret and private keys can leak key material; public keys are public.
    let custodial = class != Some(ObjectClass::PUBLIC_KEY);
    let rsa_public = (key_type == KeyType::Rsa && !modulus.is_empty() && !exponent.is_empty())
        .then_some(RsaPublicKey { modulus, exponent });
    let custody_violation = if allow_exportable_keys || !custodial {
        None
    } else {
        custody_reason(sensitive, extractable)
    };
    KeyInfo {
        label,
        key_type,
        bits: u32::try_from(bits).unwrap_or(u32::MAX),
        usage,
        sensitive,
        extractable,
        custody_violation,
        rsa_public,
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// Why the custody check refuses a key with these attributes, if it does.
pub(crate) fn custody_reason(sensitive: bool, extractable: bool) -> Option<String> {
    const OVERRIDE: &str = "set hsm.allow_exportable_keys to override";
    match (extractable, sensitive) {
        (true, _) => Some(format!(
            "key is extractable (CKA_EXTRACTABLE=true); ekm-proxy refuses keys that can leave the HSM; {OVERRIDE}"
        )),
        (false, false) => Some(format!(
            "key is not sensitive (CKA_SENSITIVE=false); ekm-proxy refuses keys whose value can be read from the HSM; {OVERRIDE}"
        )),
        (false, true) => None,
    }
}

fn key_type_of(kt: CkKeyType) -> KeyType {
    if kt == CkKeyType::AES {
        KeyType::Aes
    } else if kt == CkKeyType::GENERIC_SECRET {
        KeyType::GenericSecret
    } else if kt == CkKeyType::RSA {
        KeyType::Rsa
    } else if kt == CkKeyType::EC {
        KeyType::Ec
    } else {
        let name = kt.to_string();
        KeyType::Other(name.strip_prefix("CKK_").unwrap_or(&name).to_owned())
    }
}

/// Field size in bits of a named curve given as DER `CKA_EC_PARAMS` (an OID); 0 when unknown.
fn curve_bits(params: &[u8]) -> u32 {
    const CURVES: &[(&[u8], u32)] = &[
        (
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            256,
        ), // P-256
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22], 384), // P-384
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23], 521), // P-521
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a], 256), // secp256k1
    ];
    CURVES
        .iter()
        .find(|(oid, _)| *oid == params)
        .map_or(0, |(_, bits)| *bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::types::Ulong;

    fn aes(sensitive: bool, extractable: bool) -> Vec<Attribute> {
        vec![
            Attribute::Label(b"k1".to_vec()),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::AES),
            Attribute::ValueLen(Ulong::new(32)),
            Attribute::Encrypt(true),
            Attribute::Decrypt(false),
            Attribute::Sensitive(sensitive),
            Attribute::Extractable(extractable),
        ]
    }

    #[test]
    fn aes_key_info() {
        let info = info_from_attributes(&aes(true, false), false);
        assert_eq!(info.label, "k1");
        assert!(info.is_aes_256());
        assert_eq!(info.key_spec(), "AES_256");
        assert!(info.usage.encrypt && !info.usage.decrypt);
        assert_eq!(info.custody_violation, None);
    }

    #[test]
    fn custody_check() {
        let info = info_from_attributes(&aes(true, true), false);
        let why = info.custody_violation.unwrap();
        assert!(
            why.starts_with("key is extractable (CKA_EXTRACTABLE=true)"),
            "{why}"
        );
        assert!(why.contains("hsm.allow_exportable_keys"));
        let why = info_from_attributes(&aes(false, false), false)
            .custody_violation
            .unwrap();
        assert!(why.contains("CKA_SENSITIVE=false"), "{why}");
        assert_eq!(
            info_from_attributes(&aes(false, true), true).custody_violation,
            None
        );
        // A module that does not report the attributes fails closed.
        let bare = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::AES),
        ];
        assert!(
            info_from_attributes(&bare, false)
                .custody_violation
                .is_some()
        );
    }

    #[test]
    fn rsa_and_ec_sizes() {
        let mut modulus = vec![0u8; 1];
        modulus.extend(vec![0xffu8; 256]);
        let rsa = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(CkKeyType::RSA),
            Attribute::Modulus(modulus),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ];
        assert_eq!(info_from_attributes(&rsa, false).key_spec(), "RSA_2048");
        let ec = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(CkKeyType::EC),
            Attribute::EcParams(vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]),
        ];
        assert_eq!(info_from_attributes(&ec, false).key_spec(), "EC_384");
        let public = [
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(CkKeyType::RSA),
        ];
        assert_eq!(info_from_attributes(&public, false).custody_violation, None);
        assert_eq!(key_type_of(CkKeyType::DES3), KeyType::Other("DES3".into()));
    }
}
