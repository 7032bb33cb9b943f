//! Token and key creation inside the HSM: the one code path behind the dev setup
//! (`ekm-proxy dev init`, idempotent), `ekm-proxy keys create` / `keys import` (refuse a label that
//! exists), and the integration tests (so tests exercise what users run). Keys are always token
//! objects, private, sensitive and non-extractable unless a spec says otherwise, with a unique
//! random `CKA_ID`.
//!
//! Blocking; call it from a CLI command, start-up, or `spawn_blocking`. Never logs the user out
//! and never calls `C_CloseAllSessions` (either would disturb a backend serving from the same token
//! in this process); the only `C_Logout` ends the SO login used to set the user PIN of a token no
//! one serves from yet. Must not depend on the worker pool, HTTP or any front end.

use std::path::Path;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};

use super::errors::HsmError;
use super::keys::{find_unique, read_info};
use super::module::Module;
use super::settings::TokenSelector;
use crate::core::{CryptoError, KeyInfo};
use crate::secret::SecretString;
use zeroize::Zeroize;

/// What [`ensure_token`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReport {
    /// Token label.
    pub label: String,
    /// Token serial number (select the token by it to survive relabelling).
    pub serial: String,
    /// The slot id right now (informational only: slot ids move).
    pub slot_id: u64,
    /// Whether this call created the token (`C_InitToken` + `C_InitPIN`).
    pub created: bool,
}

/// Key algorithms the HSM is asked to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyKind {
    /// AES, 256 bits (`CKM_AES_KEY_GEN`, `CKA_VALUE_LEN` = 32).
    Aes256,
    /// RSA key pair, 2048-bit modulus (`CKM_RSA_PKCS_KEY_PAIR_GEN`, e = 65537).
    Rsa2048,
    /// RSA key pair, 3072-bit modulus.
    Rsa3072,
    /// RSA key pair, 4096-bit modulus.
    Rsa4096,
    /// Generic secret of 256 bits for `CKM_SHA256_HMAC` (`CKM_GENERIC_SECRET_KEY_GEN`), may sign
    /// and verify only: the audit chain's checkpoint key.
    HmacSha256,
}

impl KeyKind {
    /// Every kind with its command-line name.
    pub const ALL: [(KeyKind, &'static str); 5] = [
        (KeyKind::Aes256, "aes256"),
        (KeyKind::Rsa2048, "rsa2048"),
        (KeyKind::Rsa3072, "rsa3072"),
        (KeyKind::Rsa4096, "rsa4096"),
        (KeyKind::HmacSha256, "hmac-sha256"),
    ];

    /// The command-line name (`aes256`, `rsa3072`, ...).
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("aes256", |(_, name)| name)
    }

    /// The kind a command-line name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
    }

    /// The RSA modulus size, for key pairs.
    fn rsa_bits(self) -> Option<u64> {
        match self {
            KeyKind::Aes256 | KeyKind::HmacSha256 => None,
            KeyKind::Rsa2048 => Some(2048),
            KeyKind::Rsa3072 => Some(3072),
            KeyKind::Rsa4096 => Some(4096),
        }
    }
}

/// The key to make sure exists. Usage flags map to `CKA_ENCRYPT` etc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// `CKA_LABEL`: the key's external id.
    pub label: String,
    /// Algorithm and size.
    pub kind: KeyKind,
    /// `CKA_ENCRYPT`
    pub encrypt: bool,
    /// `CKA_DECRYPT`
    pub decrypt: bool,
    /// `CKA_WRAP`
    pub wrap: bool,
    /// `CKA_UNWRAP`
    pub unwrap: bool,
    /// `CKA_EXTRACTABLE` (false by default: the key never leaves the HSM).
    pub extractable: bool,
    /// `CKA_SENSITIVE` (true by default: the key value is never readable).
    pub sensitive: bool,
}

impl KeySpec {
    /// An AES-256 encrypt+decrypt key, sensitive and non-extractable.
    pub fn aes256(label: impl Into<String>) -> Self {
        Self::new(label, KeyKind::Aes256)
    }

    /// A sensitive, non-extractable key of `kind` with the default usage of its kind: AES
    /// encrypts and decrypts; an RSA pair encrypts, decrypts, wraps and unwraps (the public half
    /// the first and third, the private half the others).
    pub fn new(label: impl Into<String>, kind: KeyKind) -> Self {
        let rsa = kind.rsa_bits().is_some();
        let hmac = kind == KeyKind::HmacSha256;
        Self {
            label: label.into(),
            kind,
            encrypt: !hmac,
            decrypt: !hmac,
            wrap: rsa,
            unwrap: rsa,
            extractable: false,
            sensitive: true,
        }
    }

    /// Set the usage from names (`encrypt`, `decrypt`, `wrap`, `unwrap`); an unknown name is an
    /// error naming it.
    pub fn with_usage<'a>(
        mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, String> {
        self.encrypt = false;
        self.decrypt = false;
        self.wrap = false;
        self.unwrap = false;
        for name in names {
            match name.trim() {
                "encrypt" => self.encrypt = true,
                "decrypt" => self.decrypt = true,
                "wrap" => self.wrap = true,
                "unwrap" => self.unwrap = true,
                other => {
                    return Err(format!(
                        "unknown key usage \"{other}\"; one of: encrypt, decrypt, wrap, unwrap"
                    ));
                }
            }
        }
        Ok(self)
    }
}

/// What [`ensure_key`], [`create_key`] or [`import_aes_key`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReport {
    /// Whether this call generated the key (false: it existed already and was left as is).
    pub created: bool,
    /// The key's attributes as the HSM reports them, with the custody verdict.
    pub info: KeyInfo,
}

impl std::fmt::Display for KeyReport {
    /// `created key 'dev-aes-1': AES_256, usage encrypt,decrypt, sensitive, non-extractable`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.info;
        write!(
            f,
            "{} key '{}': {}, usage {}, {}, {}",
            if self.created { "created" } else { "found" },
            i.label,
            i.key_spec(),
            if i.usage.names().is_empty() {
                "none".to_owned()
            } else {
                i.usage.names().join(",").to_ascii_lowercase()
            },
            if i.sensitive {
                "sensitive"
            } else {
                "NOT sensitive"
            },
            if i.extractable {
                "EXTRACTABLE"
            } else {
                "non-extractable"
            },
        )?;
        if let Some(why) = &i.custody_violation {
            write!(f, " (the proxy will refuse it: {why})")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for TokenReport {
    /// `token 'ekm-dev' (serial 4b9b0e5121267044): created`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "token '{}' (serial {}): {}",
            self.label,
            self.serial,
            if self.created { "created" } else { "exists" }
        )
    }
}

/// Make sure a token labelled `label` exists with a user PIN. If none does, initialize the first
/// slot without a token (`C_InitToken`), then set the user PIN as SO (`C_InitPIN`). A token left
/// half-made (no user PIN) is completed. Existing tokens are never re-initialized.
pub fn ensure_token(
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<TokenReport, HsmError> {
    let module = Module::acquire(module)?;
    // C_InitToken picks "the first free slot": two concurrent creators must not pick the same one.
    let _admin = module.admin_lock();
    let selector = TokenSelector::Label(label.to_owned());
    let created = match module.find_token(&selector) {
        Ok((slot, info)) => {
            if !info.user_pin_initialized() {
                init_user_pin(&module, slot, label, so_pin, user_pin)?;
            }
            false
        }
        Err(HsmError::TokenNotFound { .. }) => {
            let slot = free_slot(&module, label)?;
            let pin = AuthPin::from(so_pin.expose());
            module
                .ctx()
                .init_token(slot, &pin, label)
                .map_err(|e| HsmError::pkcs11("C_InitToken", &e))?;
            // SoftHSM moves a freshly initialized token to a new slot id: find it again by label.
            let (slot, _) = module.find_token(&selector)?;
            init_user_pin(&module, slot, label, so_pin, user_pin)?;
            true
        }
        Err(other) => return Err(other),
    };
    let (slot, info) = module.find_token(&selector)?;
    if created {
        tracing::info!(
            token = label,
            serial = info.serial_number().trim(),
            "token created"
        );
    }
    Ok(TokenReport {
        label: info.label().trim_end().to_owned(),
        serial: info.serial_number().trim().to_owned(),
        slot_id: slot.id(),
        created,
    })
}

/// Make sure the token holds a secret key labelled `spec.label`; generate it if absent. An
/// existing key is reported as found, never modified (its attributes may differ from `spec`;
/// check `info`). Several keys with the label is an error.
pub fn ensure_key(
    module: &Path,
    token_label: &str,
    user_pin: &SecretString,
    spec: &KeySpec,
) -> Result<KeyReport, HsmError> {
    let selector = TokenSelector::Label(token_label.to_owned());
    with_user_session(module, &selector, user_pin, spec, |s| {
        match find_unique(s, &spec.label, class_of(spec.kind)) {
            Ok(handle) => Ok((handle, false)),
            Err(fault) => match fault.error {
                CryptoError::KeyNotFound => Ok((generate(s, spec)?, true)),
                CryptoError::KeyDisabled(_) => Err(HsmError::KeyAmbiguous {
                    label: spec.label.clone(),
                    count: count_labelled(s, &spec.label),
                }),
                other => Err(HsmError::Pkcs11 {
                    op: "C_FindObjects",
                    ckr: other.to_string(),
                }),
            },
        }
    })
}

/// Generate a new key labelled `spec.label` even if one exists already. Not idempotent: for key
/// ceremony tooling and for tests of the ambiguity check (the backend refuses labels that several
/// keys share). Prefer [`ensure_key`].
pub fn generate_key(
    module: &Path,
    token_label: &str,
    user_pin: &SecretString,
    spec: &KeySpec,
) -> Result<KeyReport, HsmError> {
    let selector = TokenSelector::Label(token_label.to_owned());
    with_user_session(module, &selector, user_pin, spec, |s| {
        Ok((generate(s, spec)?, true))
    })
}

/// Generate a new key in the HSM as `spec` says (`ekm-proxy keys create`). Refuses a label that
/// any key on the token carries already ([`HsmError::KeyExists`]): a second key under one label
/// would make both unusable (lookups require exactly one match).
pub fn create_key(
    module: &Path,
    token: &TokenSelector,
    user_pin: &SecretString,
    spec: &KeySpec,
) -> Result<KeyReport, HsmError> {
    with_user_session(module, token, user_pin, spec, |s| {
        refuse_existing(s, &spec.label)?;
        Ok((generate(s, spec)?, true))
    })
}

/// Import 32 raw bytes as a sensitive, non-extractable AES-256 token key (`ekm-proxy keys
/// import`), for known-answer tests and bring-your-own-key ceremonies. Weaker than generation:
/// the key existed outside the HSM. Refuses a label that exists. `spec.kind` must be `Aes256`;
/// the caller zeroizes its own copy of the bytes, this function zeroizes the template's.
pub fn import_aes_key(
    module: &Path,
    token: &TokenSelector,
    user_pin: &SecretString,
    spec: &KeySpec,
    value: &[u8],
) -> Result<KeyReport, HsmError> {
    if spec.kind != KeyKind::Aes256 || value.len() != 32 {
        return Err(HsmError::InvalidSettings(vec![format!(
            "only AES-256 keys (exactly 32 bytes) can be imported; got {} with {} bytes",
            spec.kind.as_str(),
            value.len()
        )]));
    }
    with_user_session(module, token, user_pin, spec, |s| {
        refuse_existing(s, &spec.label)?;
        let mut template = base_template(s, spec)?;
        template.extend([
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::AES),
            Attribute::Encrypt(spec.encrypt),
            Attribute::Decrypt(spec.decrypt),
            Attribute::Wrap(spec.wrap),
            Attribute::Unwrap(spec.unwrap),
            Attribute::Verify(false),
            Attribute::Value(value.to_vec()),
        ]);
        let created = s.create_object(&template);
        for attr in &mut template {
            if let Attribute::Value(bytes) = attr {
                bytes.zeroize();
            }
        }
        let handle = created.map_err(|e| HsmError::pkcs11("C_CreateObject", &e))?;
        Ok((handle, true))
    })
}

/// The object class a lookup of `kind`'s key searches (the private half of a pair).
fn class_of(kind: KeyKind) -> ObjectClass {
    if kind.rsa_bits().is_some() {
        ObjectClass::PRIVATE_KEY
    } else {
        ObjectClass::SECRET_KEY
    }
}

/// `KeyExists` if any token key (secret, private or public) is labelled `label`.
fn refuse_existing(session: &Session, label: &str) -> Result<(), HsmError> {
    for class in [
        ObjectClass::SECRET_KEY,
        ObjectClass::PRIVATE_KEY,
        ObjectClass::PUBLIC_KEY,
    ] {
        let template = [
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let found = session
            .find_objects(&template)
            .map_err(|e| HsmError::pkcs11("C_FindObjects", &e))?;
        if !found.is_empty() {
            return Err(HsmError::KeyExists {
                label: label.to_owned(),
            });
        }
    }
    Ok(())
}

/// Destroy the secret key labelled `label` on the token (exactly one key must carry the label).
/// For key ceremonies and tests. A serving proxy stops using the key at once without
/// `session_key_copies`, and within `hsm.key_cache_ttl_secs` with it.
pub fn destroy_key(
    module: &Path,
    token_label: &str,
    user_pin: &SecretString,
    label: &str,
) -> Result<(), HsmError> {
    let module = Module::acquire(module)?;
    let (slot, _) = module.find_token(&TokenSelector::Label(token_label.to_owned()))?;
    let session = open_rw(&module, slot)?;
    user_login(&session, token_label, user_pin)?;
    let handle =
        find_unique(&session, label, ObjectClass::SECRET_KEY).map_err(|fault| {
            match fault.error {
                CryptoError::KeyDisabled(_) => HsmError::KeyAmbiguous {
                    label: label.to_owned(),
                    count: count_labelled(&session, label),
                },
                other => HsmError::Pkcs11 {
                    op: "C_FindObjects",
                    ckr: other.to_string(),
                },
            }
        })?;
    session
        .destroy_object(handle)
        .map_err(|e| HsmError::pkcs11("C_DestroyObject", &e))?;
    tracing::info!(token = token_label, key = label, "key destroyed");
    Ok(())
}

/// Open a user session on the token, run `act`, and report the key it returns.
fn with_user_session(
    module: &Path,
    token: &TokenSelector,
    user_pin: &SecretString,
    spec: &KeySpec,
    act: impl FnOnce(&Session) -> Result<(ObjectHandle, bool), HsmError>,
) -> Result<KeyReport, HsmError> {
    if spec.label.is_empty() {
        return Err(HsmError::InvalidSettings(vec![
            "key label is empty".to_owned(),
        ]));
    }
    let module = Module::acquire(module)?;
    let (slot, token_info) = module.find_token(token)?;
    let token_label = token_info.label().trim_end().to_owned();
    // Closed on drop, without C_Logout: a serving backend in this process may share the login.
    let session = open_rw(&module, slot)?;
    user_login(&session, &token_label, user_pin)?;
    let (handle, created) = act(&session)?;
    // Report the custody verdict as the default (strict) policy sees it.
    let info = read_info(&session, handle, false).map_err(|f| HsmError::Pkcs11 {
        op: "C_GetAttributeValue",
        ckr: f.error.to_string(),
    })?;
    if created {
        tracing::info!(token = %token_label, key = %spec.label, kind = spec.kind.as_str(), "key created");
    }
    Ok(KeyReport { created, info })
}

fn count_labelled(session: &Session, label: &str) -> usize {
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    session.find_objects(&template).map_or(0, |v| v.len())
}

/// Generate `spec` in the HSM; for a key pair, returns the private half's handle.
fn generate(session: &Session, spec: &KeySpec) -> Result<ObjectHandle, HsmError> {
    let mut template = base_template(session, spec)?;
    if let Some(bits) = spec.kind.rsa_bits() {
        // Both halves share label and CKA_ID; the public half encrypts and wraps, the private
        // half decrypts and unwraps.
        let mut public: Vec<Attribute> = template
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Attribute::Token(_) | Attribute::Label(_) | Attribute::Id(_)
                )
            })
            .cloned()
            .collect();
        public.extend([
            Attribute::Private(false),
            Attribute::Encrypt(spec.encrypt),
            Attribute::Wrap(spec.wrap),
            Attribute::Verify(false),
            Attribute::ModulusBits(Ulong::new(bits)),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        ]);
        template.extend([
            Attribute::Decrypt(spec.decrypt),
            Attribute::Unwrap(spec.unwrap),
        ]);
        let (_, private) = session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &template)
            .map_err(|e| HsmError::pkcs11("C_GenerateKeyPair", &e))?;
        return Ok(private);
    }
    if spec.kind == KeyKind::HmacSha256 {
        // Signs and verifies (the checkpoint MAC and its check), nothing else.
        template.retain(|a| !matches!(a, Attribute::Sign(_)));
        template.extend([
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::GENERIC_SECRET),
            Attribute::Sign(true),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::ValueLen(Ulong::new(32)),
        ]);
        return session
            .generate_key(&Mechanism::GenericSecretKeyGen, &template)
            .map_err(|e| HsmError::pkcs11("C_GenerateKey", &e));
    }
    template.extend([
        Attribute::Encrypt(spec.encrypt),
        Attribute::Decrypt(spec.decrypt),
        Attribute::Wrap(spec.wrap),
        Attribute::Unwrap(spec.unwrap),
        Attribute::Verify(false),
        Attribute::ValueLen(Ulong::new(32)),
    ]);
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(|e| HsmError::pkcs11("C_GenerateKey", &e))
}

/// Attributes every key the proxy makes carries: a private token object, with the spec's
/// custody attributes, no signing or derivation, the label and a fresh 16-byte `CKA_ID` from the
/// HSM's RNG (so tools that key on `CKA_ID` see distinct ids).
fn base_template(session: &Session, spec: &KeySpec) -> Result<Vec<Attribute>, HsmError> {
    let mut id = [0u8; 16];
    session
        .generate_random_slice(&mut id)
        .map_err(|e| HsmError::pkcs11("C_GenerateRandom", &e))?;
    Ok(vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(spec.sensitive),
        Attribute::Extractable(spec.extractable),
        Attribute::Sign(false),
        Attribute::Derive(false),
        Attribute::Label(spec.label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ])
}

/// The first slot that has no initialized token.
fn free_slot(module: &Module, label: &str) -> Result<Slot, HsmError> {
    let slots = module
        .ctx()
        .get_all_slots()
        .map_err(|e| HsmError::pkcs11("C_GetSlotList", &e))?;
    for slot in slots {
        match module.ctx().get_token_info(slot) {
            Ok(info) if !info.token_initialized() => return Ok(slot),
            Ok(_) => {}
            // No token in the slot at all (removable readers): nothing to initialize there.
            Err(CkError::Pkcs11(RvError::TokenNotPresent, _)) => {}
            Err(e) => return Err(HsmError::pkcs11("C_GetTokenInfo", &e)),
        }
    }
    Err(HsmError::NoFreeSlot {
        label: label.to_owned(),
    })
}

fn init_user_pin(
    module: &Module,
    slot: Slot,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), HsmError> {
    let session = open_rw(module, slot)?;
    let so = AuthPin::from(so_pin.expose());
    match session.login(UserType::So, Some(&so)) {
        Ok(()) => {}
        Err(e) => {
            return Err(HsmError::Login {
                user: "security officer",
                token: label.to_owned(),
                ckr: super::errors::ck_error_name(&e).into_owned(),
            });
        }
    }
    let user = AuthPin::from(user_pin.expose());
    let result = session
        .init_pin(&user)
        .map_err(|e| HsmError::pkcs11("C_InitPIN", &e));
    // An SO login must not outlive this call (it would block user logins on the token).
    let _ = session.logout();
    result
}

pub(crate) fn user_login(
    session: &Session,
    token: &str,
    user_pin: &SecretString,
) -> Result<(), HsmError> {
    let pin = AuthPin::from(user_pin.expose());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(HsmError::Login {
            user: "user",
            token: token.to_owned(),
            ckr: super::errors::ck_error_name(&e).into_owned(),
        }),
    }
}

/// A read-write session, closed when dropped.
fn open_rw(module: &Module, slot: Slot) -> Result<Session, HsmError> {
    module
        .ctx()
        .open_rw_session(slot)
        .map_err(|e| HsmError::pkcs11("C_OpenSession", &e))
}
