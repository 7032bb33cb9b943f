//! Errors of the HSM layer and the one mapping from PKCS#11 return values to [`CryptoError`].
//!
//! [`map_ckr`] is the only place that decides what a `CKR_*` means for a caller and for the worker
//! that saw it (keep the session, refresh a key handle, reopen the session). The raw `CKR_*` name is
//! logged here and never put into a `CryptoError`, which may reach a peer.
//!
//! Depends on `cryptoki` error types and `core::CryptoError` only.

use std::borrow::Cow;
use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

use crate::core::CryptoError;

/// `CKR_AEAD_DECRYPT_FAILED` (PKCS#11 3.0). cryptoki 0.12 has no `RvError` variant for it, so it
/// arrives as `UnknownErrorCode(0x42)`.
const CKR_AEAD_DECRYPT_FAILED: u64 = 0x42;

/// Start-up and administration failures, with operator-facing messages. Never contains a PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The settings are unusable.
    #[error("invalid HSM settings: {}", .0.join("; "))]
    InvalidSettings(Vec<String>),
    /// `dlopen` or the function list lookup failed.
    #[error("cannot load PKCS#11 module {}: {detail}", path.display())]
    ModuleLoad {
        /// Module path.
        path: PathBuf,
        /// Loader message.
        detail: String,
    },
    /// `C_Initialize` failed.
    #[error("C_Initialize of PKCS#11 module {} failed: {ckr}", path.display())]
    Initialize {
        /// Module path.
        path: PathBuf,
        /// The `CKR_*` name.
        ckr: String,
    },
    /// No token matches the selector.
    #[error("no token with {wanted} in PKCS#11 module {}; tokens present: {}", module.display(), list_or_none(available))]
    TokenNotFound {
        /// What was asked for (`label "x"` / `serial "y"`).
        wanted: String,
        /// Module path.
        module: PathBuf,
        /// `label (serial s)` of every initialized token the module shows.
        available: Vec<String>,
    },
    /// More than one token matches the selector.
    #[error("more than one token with {wanted}: {}; select the token by serial", matches.join(", "))]
    TokenAmbiguous {
        /// What was asked for.
        wanted: String,
        /// The matching tokens.
        matches: Vec<String>,
    },
    /// `C_InitToken` is needed but every slot holds an initialized token.
    #[error("cannot create token \"{label}\": the module has no free (uninitialized) slot")]
    NoFreeSlot {
        /// Label of the token that was to be created.
        label: String,
    },
    /// `C_Login` was refused. Workers never retry this on their own (retrying a wrong PIN locks it).
    #[error("C_Login as {user} on token \"{token}\" failed: {ckr}")]
    Login {
        /// `user` or `security officer`.
        user: &'static str,
        /// Token label.
        token: String,
        /// The `CKR_*` name (never the PIN).
        ckr: String,
    },
    /// A key label matches several objects.
    #[error("key label \"{label}\" is ambiguous: {count} objects carry it")]
    KeyAmbiguous {
        /// The label.
        label: String,
        /// How many objects carry it.
        count: usize,
    },
    /// A key is to be created under a label a key on the token carries already.
    #[error("a key labelled \"{label}\" exists already on the token; choose another label")]
    KeyExists {
        /// The label.
        label: String,
    },
    /// Any other PKCS#11 failure during start-up or administration.
    #[error("PKCS#11 {op} failed: {ckr}")]
    Pkcs11 {
        /// The operation (`C_OpenSession`, `C_GenerateKey`, ...).
        op: &'static str,
        /// The `CKR_*` name or cryptoki's message.
        ckr: String,
    },
    /// A worker thread could not be started.
    #[error("cannot start HSM worker thread: {0}")]
    Thread(String),
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

impl HsmError {
    /// Wrap a cryptoki error from an administrative call.
    pub(crate) fn pkcs11(op: &'static str, err: &CkError) -> Self {
        HsmError::Pkcs11 {
            op,
            ckr: ck_error_name(err).into_owned(),
        }
    }
}

/// The PKCS#11 operation a return value came from; decides how some codes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Encrypt,
    Decrypt,
    /// Key wrapping (AES Key Wrap, RSA-OAEP encryption), by `C_Encrypt` or `C_WrapKey`.
    Wrap,
    /// Key unwrapping, by `C_Decrypt` or `C_UnwrapKey`.
    Unwrap,
    Random,
    FindKey,
    ReadAttributes,
    TokenInfo,
    ListKeys,
    /// Reading the fleet state objects.
    ReadState,
    /// HMAC inside the HSM (audit checkpoints).
    Mac,
    OpenSession,
    Login,
}

impl Op {
    /// Metric label and log field.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Wrap => "wrap",
            Op::Unwrap => "unwrap",
            Op::Random => "random",
            Op::FindKey => "find_key",
            Op::ReadAttributes => "read_attributes",
            Op::TokenInfo => "token_info",
            Op::ListKeys => "list_keys",
            Op::ReadState => "read_state",
            Op::Mac => "mac",
            Op::OpenSession => "open_session",
            Op::Login => "login",
        }
    }
}

/// What the worker must do after a failure, besides answering the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Nothing: the session is fine (wrong key usage, bad tag, ...).
    None,
    /// The cached object handle is stale: look the key up again and retry once.
    RefreshKey,
    /// An operation is still active on the session: terminate it and retry once.
    ResetOperation,
    /// The session or the login is gone: reopen, log in, retry once. A `CKR_GENERAL_ERROR`
    /// also starts here and climbs to [`Recovery::RecoverToken`] when it survives the reopen.
    ReopenSession,
    /// The token, the device or the module is gone: the supervisor finds the slot again and, if
    /// sessions still cannot be opened, re-initialises the module. Callers fail fast meanwhile.
    RecoverToken,
}

/// The rungs of the recovery ladder, as counted in `ekm_hsm_recoveries_total{level}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecoveryLevel {
    /// A worker reopened its session (or logged in again).
    Session,
    /// The token was found again (maybe in another slot) and sessions opened.
    Slot,
    /// The module was finalized and initialized again.
    Module,
}

impl RecoveryLevel {
    /// Metric label and log field.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RecoveryLevel::Session => "session",
            RecoveryLevel::Slot => "slot",
            RecoveryLevel::Module => "module",
        }
    }
}

/// A failed HSM call: what to tell the caller and what the worker must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    pub(crate) error: CryptoError,
    pub(crate) recovery: Recovery,
}

impl Fault {
    /// A failure that needs no recovery.
    pub(crate) fn plain(error: CryptoError) -> Self {
        Self {
            error,
            recovery: Recovery::None,
        }
    }
}

impl From<CryptoError> for Fault {
    fn from(error: CryptoError) -> Self {
        Fault::plain(error)
    }
}

/// Whether a login failure must never be retried automatically (PIN problems: retrying a wrong
/// PIN walks the token towards a lockout).
pub(crate) fn login_is_fatal(err: &CkError) -> bool {
    matches!(
        err,
        CkError::Pkcs11(
            RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinExpired
                | RvError::PinLocked
                | RvError::UserPinNotInitialized
                | RvError::UserTypeInvalid
                | RvError::UserTooManyTypes
                | RvError::UserAnotherAlreadyLoggedIn,
            _
        )
    )
}

/// THE mapping from a cryptoki error to a caller-facing [`CryptoError`] and a worker [`Recovery`].
/// Logs the raw `CKR_*` name (debug for caller-caused conditions, warn otherwise); the name is
/// never part of the returned error's message.
pub(crate) fn map_ckr(op: Op, err: &CkError) -> Fault {
    let rv = match err {
        CkError::Pkcs11(rv, _) => *rv,
        other => {
            // Not a PKCS#11 return value: a conversion or binding problem on our side.
            tracing::warn!(op = op.as_str(), error = %other, "PKCS#11 binding error");
            return Fault::plain(CryptoError::Internal(format!("{}: {other}", op.as_str())));
        }
    };
    let fault = classify(op, rv);
    let name = ckr_name(rv);
    match (&fault.error, fault.recovery) {
        // Caller-caused or routine: bad tags and wrong usage can be frequent, keep them quiet.
        (CryptoError::InvalidCiphertext | CryptoError::InvalidKeyUsage(_), _)
        | (_, Recovery::RefreshKey | Recovery::ResetOperation) => {
            tracing::debug!(op = op.as_str(), ckr = %name, kind = fault.error.kind(), "PKCS#11 call failed");
        }
        _ => {
            tracing::warn!(op = op.as_str(), ckr = %name, kind = fault.error.kind(), "PKCS#11 call failed");
        }
    }
    fault
}

/// The decision table behind [`map_ckr`], without logging (unit-tested).
fn classify(op: Op, rv: RvError) -> Fault {
    use RvError as R;
    let unavailable = || CryptoError::HsmUnavailable("HSM session lost; reconnecting".to_owned());
    let internal =
        || CryptoError::Internal(format!("PKCS#11 {} failed: {}", op.as_str(), ckr_name(rv)));
    match rv {
        // Lost session or login: the worker reopens (or logs in again) and retries once.
        R::SessionHandleInvalid | R::SessionClosed | R::UserNotLoggedIn => Fault {
            error: unavailable(),
            recovery: Recovery::ReopenSession,
        },

        // Lost token, device or module: no session can help; the supervisor climbs the ladder.
        R::DeviceRemoved
        | R::DeviceError
        | R::TokenNotPresent
        | R::TokenNotRecognized
        | R::SlotIdInvalid
        | R::CryptokiNotInitialized => Fault {
            error: CryptoError::HsmUnavailable(
                "the HSM token is unavailable; recovering".to_owned(),
            ),
            recovery: Recovery::RecoverToken,
        },

        // A cached handle went stale (key deleted and recreated, token logged out, ...).
        R::ObjectHandleInvalid | R::KeyHandleInvalid => Fault {
            error: CryptoError::KeyNotFound,
            recovery: Recovery::RefreshKey,
        },

        // Left over from an earlier failure on this session; terminate it and go again.
        R::OperationActive => Fault {
            error: internal(),
            recovery: Recovery::ResetOperation,
        },

        // Authentication failure. SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR; other
        // modules use these codes. None of them says anything about the session, which stays.
        // Unwrapping reports a failed integrity check (RFC 3394/5649) or OAEP decoding the same
        // ways, plus the wrapped-key codes of C_UnwrapKey.
        R::GeneralError
        | R::FunctionFailed
        | R::EncryptedDataInvalid
        | R::EncryptedDataLenRange
        | R::UnknownErrorCode(CKR_AEAD_DECRYPT_FAILED)
            if matches!(op, Op::Decrypt | Op::Unwrap) =>
        {
            Fault::plain(CryptoError::InvalidCiphertext)
        }
        R::WrappedKeyInvalid | R::WrappedKeyLenRange if op == Op::Unwrap => {
            Fault::plain(CryptoError::InvalidCiphertext)
        }

        // The key's own attributes forbid it: the HSM is the authority here.
        R::KeyFunctionNotPermitted => Fault::plain(CryptoError::InvalidKeyUsage(format!(
            "the key's attributes do not permit {}",
            op.as_str()
        ))),
        R::KeyTypeInconsistent => Fault::plain(CryptoError::InvalidKeyUsage(format!(
            "the key's type cannot be used for {}",
            op.as_str()
        ))),
        R::KeySizeRange => Fault::plain(CryptoError::Unsupported(
            "key size not supported by the HSM".to_owned(),
        )),
        R::MechanismInvalid | R::MechanismParamInvalid => {
            Fault::plain(CryptoError::Unsupported(format!(
                "the HSM does not support this mechanism or its parameters for {}",
                op.as_str()
            )))
        }
        R::DataLenRange | R::DataInvalid => Fault::plain(CryptoError::Unsupported(
            "input size not supported by the HSM".to_owned(),
        )),

        // The device is alive but cannot take more work right now.
        R::DeviceMemory | R::HostMemory | R::SessionCount => Fault::plain(
            CryptoError::HsmUnavailable("the HSM is out of resources".to_owned()),
        ),

        // Says nothing about the cause. Modules use it for a lost connection or a vanished token
        // store (SoftHSM does when its token directory disappears), so it is treated as a lost
        // session first and escalates to the token when it survives a reopen. Never the caller's
        // fault, so never "key not found" or "invalid ciphertext" (except on decrypt, above).
        R::GeneralError => Fault {
            error: unavailable(),
            recovery: Recovery::ReopenSession,
        },

        _ => Fault::plain(internal()),
    }
}

/// The `CKR_*` name of a return value: `SessionHandleInvalid` → `CKR_SESSION_HANDLE_INVALID`.
pub(crate) fn ckr_name(rv: RvError) -> Cow<'static, str> {
    match rv {
        RvError::VendorDefined(code) => Cow::Owned(format!("CKR_VENDOR_DEFINED(0x{code:08x})")),
        RvError::UnknownErrorCode(CKR_AEAD_DECRYPT_FAILED) => {
            Cow::Borrowed("CKR_AEAD_DECRYPT_FAILED")
        }
        RvError::UnknownErrorCode(code) => Cow::Owned(format!("CKR_0x{code:08x}")),
        other => {
            // RvError's Debug is the CamelCase variant name; PKCS#11 spells it SCREAMING_SNAKE.
            let camel = format!("{other:?}");
            let mut out = String::with_capacity(camel.len() + 8);
            out.push_str("CKR");
            for ch in camel.chars() {
                if ch.is_ascii_uppercase() {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            Cow::Owned(out)
        }
    }
}

/// The `CKR_*` name, or cryptoki's message when the error is not a PKCS#11 return value.
pub(crate) fn ck_error_name(err: &CkError) -> Cow<'static, str> {
    match err {
        CkError::Pkcs11(rv, _) => ckr_name(*rv),
        other => Cow::Owned(other.to_string()),
    }
}

/// The return value inside a cryptoki error, if any.
pub(crate) fn rv_of(err: &CkError) -> Option<RvError> {
    match err {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    fn ck(rv: RvError) -> CkError {
        CkError::Pkcs11(rv, Function::Decrypt)
    }

    #[test]
    fn ckr_names() {
        assert_eq!(
            ckr_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            ckr_name(RvError::UnknownErrorCode(0x42)),
            "CKR_AEAD_DECRYPT_FAILED"
        );
        assert_eq!(
            ckr_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(0x80000001)"
        );
    }

    #[test]
    fn tag_mismatch_is_invalid_ciphertext_and_keeps_the_session() {
        for rv in [
            RvError::GeneralError,
            RvError::FunctionFailed,
            RvError::EncryptedDataInvalid,
            RvError::EncryptedDataLenRange,
            RvError::UnknownErrorCode(CKR_AEAD_DECRYPT_FAILED),
        ] {
            let f = map_ckr(Op::Decrypt, &ck(rv));
            assert_eq!(f, Fault::plain(CryptoError::InvalidCiphertext), "{rv:?}");
        }
        // The same codes on encrypt are not the caller's fault: a general error is retryable.
        let f = map_ckr(Op::Encrypt, &ck(RvError::GeneralError));
        assert!(matches!(f.error, CryptoError::HsmUnavailable(_)), "{f:?}");
        assert_eq!(f.recovery, Recovery::ReopenSession);
        assert!(matches!(
            map_ckr(Op::Encrypt, &ck(RvError::FunctionFailed)).error,
            CryptoError::Internal(_)
        ));
    }

    #[test]
    fn lost_sessions_reopen() {
        for rv in [
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::UserNotLoggedIn,
            RvError::GeneralError,
        ] {
            let f = map_ckr(Op::Encrypt, &ck(rv));
            assert_eq!(f.recovery, Recovery::ReopenSession, "{rv:?}");
            assert!(matches!(f.error, CryptoError::HsmUnavailable(_)));
        }
    }

    #[test]
    fn lost_tokens_and_modules_climb_to_the_supervisor() {
        for op in [
            Op::Encrypt,
            Op::Decrypt,
            Op::FindKey,
            Op::TokenInfo,
            Op::OpenSession,
        ] {
            for rv in [
                RvError::DeviceRemoved,
                RvError::DeviceError,
                RvError::TokenNotPresent,
                RvError::TokenNotRecognized,
                RvError::SlotIdInvalid,
                RvError::CryptokiNotInitialized,
            ] {
                let f = map_ckr(op, &ck(rv));
                assert_eq!(f.recovery, Recovery::RecoverToken, "{op:?} {rv:?}");
                // Retryable on every wire, never "not found".
                assert!(
                    matches!(f.error, CryptoError::HsmUnavailable(_)),
                    "{op:?} {rv:?}"
                );
            }
        }
    }

    #[test]
    fn caller_faults_touch_nothing() {
        for (op, rv) in [
            (Op::Decrypt, RvError::EncryptedDataInvalid),
            (Op::Decrypt, RvError::GeneralError),
            (Op::Encrypt, RvError::DataLenRange),
            (Op::Encrypt, RvError::KeyFunctionNotPermitted),
            (Op::Encrypt, RvError::MechanismParamInvalid),
        ] {
            assert_eq!(
                map_ckr(op, &ck(rv)).recovery,
                Recovery::None,
                "{op:?} {rv:?}"
            );
        }
    }

    #[test]
    fn usage_handles_and_internal() {
        assert!(matches!(
            map_ckr(Op::Encrypt, &ck(RvError::KeyFunctionNotPermitted)),
            Fault {
                error: CryptoError::InvalidKeyUsage(_),
                recovery: Recovery::None
            }
        ));
        assert_eq!(
            map_ckr(Op::Encrypt, &ck(RvError::KeyHandleInvalid)).recovery,
            Recovery::RefreshKey
        );
        assert_eq!(
            map_ckr(Op::Decrypt, &ck(RvError::ObjectHandleInvalid)).recovery,
            Recovery::RefreshKey
        );
        assert_eq!(
            map_ckr(Op::Decrypt, &ck(RvError::OperationActive)).recovery,
            Recovery::ResetOperation
        );
        let f = map_ckr(Op::Random, &ck(RvError::ArgumentsBad));
        assert!(matches!(f.error, CryptoError::Internal(ref m) if m.contains("CKR_ARGUMENTS_BAD")));
        assert!(matches!(
            map_ckr(Op::Encrypt, &CkError::NotSupported).error,
            CryptoError::Internal(_)
        ));
    }

    #[test]
    fn caller_facing_errors_never_name_the_ckr() {
        for rv in [
            RvError::SessionHandleInvalid,
            RvError::GeneralError,
            RvError::KeyFunctionNotPermitted,
        ] {
            let msg = map_ckr(Op::Decrypt, &ck(rv)).error.to_string();
            assert!(!msg.contains("CKR_"), "{msg}");
        }
    }

    #[test]
    fn pin_errors_are_fatal_for_login() {
        assert!(login_is_fatal(&CkError::Pkcs11(
            RvError::PinIncorrect,
            Function::Login
        )));
        assert!(login_is_fatal(&CkError::Pkcs11(
            RvError::PinLocked,
            Function::Login
        )));
        assert!(!login_is_fatal(&CkError::Pkcs11(
            RvError::DeviceError,
            Function::Login
        )));
    }

    #[test]
    fn operator_messages() {
        let e = HsmError::TokenNotFound {
            wanted: "label \"x\"".into(),
            module: "/m.so".into(),
            available: vec!["a (serial 1)".into(), "b (serial 2)".into()],
        };
        assert_eq!(
            e.to_string(),
            "no token with label \"x\" in PKCS#11 module /m.so; tokens present: a (serial 1), b (serial 2)"
        );
        let e = HsmError::Login {
            user: "user",
            token: "t".into(),
            ckr: "CKR_PIN_INCORRECT".into(),
        };
        assert_eq!(
            e.to_string(),
            "C_Login as user on token \"t\" failed: CKR_PIN_INCORRECT"
        );
    }
}
