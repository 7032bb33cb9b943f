//! The per-token control file: format, parsing and validation.

use std::collections::HashMap;

use cryptoki_sys::*;
use serde::Deserialize;

/// Every PKCS#11 v2.40 function name the module knows (the order of `CK_FUNCTION_LIST`).
pub const FUNCTION_NAMES: &[&str] = &[
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
    "C_SignUpdate",
    "C_SignFinal",
    "C_SignRecoverInit",
    "C_SignRecover",
    "C_VerifyInit",
    "C_Verify",
    "C_VerifyUpdate",
    "C_VerifyFinal",
    "C_VerifyRecoverInit",
    "C_VerifyRecover",
    "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_WrapKey",
    "C_UnwrapKey",
    "C_DeriveKey",
    "C_SeedRandom",
    "C_GenerateRandom",
    "C_GetFunctionStatus",
    "C_CancelFunction",
    "C_WaitForSlotEvent",
];

/// `CKR_*` names accepted in `errors[].ckr`.
const CKR_NAMES: &[(&str, CK_RV)] = &[
    ("CKR_OK", CKR_OK),
    ("CKR_CANCEL", CKR_CANCEL),
    ("CKR_HOST_MEMORY", CKR_HOST_MEMORY),
    ("CKR_SLOT_ID_INVALID", CKR_SLOT_ID_INVALID),
    ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
    ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
    ("CKR_ARGUMENTS_BAD", CKR_ARGUMENTS_BAD),
    ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
    ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
    ("CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED),
    ("CKR_ENCRYPTED_DATA_INVALID", CKR_ENCRYPTED_DATA_INVALID),
    ("CKR_ENCRYPTED_DATA_LEN_RANGE", CKR_ENCRYPTED_DATA_LEN_RANGE),
    ("CKR_FUNCTION_CANCELED", CKR_FUNCTION_CANCELED),
    ("CKR_FUNCTION_NOT_SUPPORTED", CKR_FUNCTION_NOT_SUPPORTED),
    ("CKR_DATA_INVALID", CKR_DATA_INVALID),
    ("CKR_DATA_LEN_RANGE", CKR_DATA_LEN_RANGE),
    ("CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID),
    ("CKR_KEY_SIZE_RANGE", CKR_KEY_SIZE_RANGE),
    ("CKR_KEY_TYPE_INCONSISTENT", CKR_KEY_TYPE_INCONSISTENT),
    (
        "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_KEY_FUNCTION_NOT_PERMITTED,
    ),
    ("CKR_USER_ALREADY_LOGGED_IN", CKR_USER_ALREADY_LOGGED_IN),
    ("CKR_MECHANISM_INVALID", CKR_MECHANISM_INVALID),
    ("CKR_MECHANISM_PARAM_INVALID", CKR_MECHANISM_PARAM_INVALID),
    ("CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID),
    ("CKR_OPERATION_ACTIVE", CKR_OPERATION_ACTIVE),
    (
        "CKR_OPERATION_NOT_INITIALIZED",
        CKR_OPERATION_NOT_INITIALIZED,
    ),
    ("CKR_PIN_INCORRECT", CKR_PIN_INCORRECT),
    ("CKR_PIN_LOCKED", CKR_PIN_LOCKED),
    ("CKR_SESSION_CLOSED", CKR_SESSION_CLOSED),
    ("CKR_SESSION_COUNT", CKR_SESSION_COUNT),
    ("CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID),
    ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
    ("CKR_TOKEN_NOT_RECOGNIZED", CKR_TOKEN_NOT_RECOGNIZED),
    ("CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN),
    ("CKR_BUFFER_TOO_SMALL", CKR_BUFFER_TOO_SMALL),
    ("CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED),
    (
        "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        CKR_CRYPTOKI_ALREADY_INITIALIZED,
    ),
];

/// The `CK_RV` for a `CKR_*` name.
pub fn ckr_by_name(name: &str) -> Option<CK_RV> {
    CKR_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, rv)| *rv)
}

/// Parsed control file. Every field is optional; the default is "no faults".
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Function name (or `*`) → microseconds to sleep before forwarding.
    #[serde(default)]
    pub latency_us: HashMap<String, u64>,
    /// Whether `latency_us` also applies to length queries (`C_Encrypt`/`C_Decrypt` with a NULL
    /// output buffer). Off by default: a GCM output length is a pure function of the input length,
    /// which network HSM client libraries answer without a round trip. On, every call pays.
    #[serde(default)]
    pub latency_on_length_queries: bool,
    /// Error rules, checked in order.
    #[serde(default)]
    pub errors: Vec<ErrorRule>,
    /// One hang rule.
    #[serde(default)]
    pub hang: Option<HangRule>,
    /// Simulated token removal.
    #[serde(default)]
    pub removed: bool,
    /// What a restore (`removed` true → false) does.
    #[serde(default)]
    pub after_restore: AfterRestore,
    /// Vendor IV convention for `CKM_AES_GCM` encryption.
    #[serde(default)]
    pub gcm_iv: GcmIv,
}

/// `errors[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRule {
    /// Function names or `*`; absent = `["*"]`.
    #[serde(default = "all_functions")]
    pub functions: Vec<String>,
    /// The error to return.
    pub ckr: Ckr,
    /// Fail only the next `count` matching calls.
    #[serde(default)]
    pub count: Option<u64>,
    /// Fail each matching call with this probability.
    #[serde(default)]
    pub probability: Option<f64>,
}

/// `hang` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HangRule {
    /// Function names or `*`; absent = `["*"]`.
    #[serde(default = "all_functions")]
    pub functions: Vec<String>,
    /// Milliseconds to sleep.
    pub ms: u64,
    /// Only the next `count` matching calls hang; absent = every call.
    #[serde(default)]
    pub count: Option<u64>,
}

/// `ckr`: a `CKR_*` name or a number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Ckr {
    /// Numeric `CK_RV`.
    Number(u64),
    /// `CKR_*` name.
    Name(String),
}

/// `after_restore` values.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterRestore {
    /// Old sessions are gone, new ones work.
    #[default]
    SessionsInvalid,
    /// Everything fails with `CKR_GENERAL_ERROR` until `C_Finalize` + `C_Initialize`.
    ReinitRequired,
}

/// `gcm_iv` values.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum GcmIv {
    /// Pass through.
    #[default]
    #[serde(rename = "proxy")]
    Proxy,
    /// The module generates the IV and writes it into the caller's `pIv`.
    #[serde(rename = "hsm-in-params")]
    HsmInParams,
    /// The module generates the IV and appends it to the `C_Encrypt` output.
    #[serde(rename = "hsm-appended")]
    HsmAppended,
}

fn all_functions() -> Vec<String> {
    vec!["*".to_owned()]
}

/// An error rule with its `ckr` resolved.
#[derive(Debug, Clone)]
pub struct ResolvedError {
    /// The rule.
    pub rule: ErrorRule,
    /// The resolved return value.
    pub rv: CK_RV,
}

/// A validated control file.
#[derive(Debug, Default, Clone)]
pub struct Validated {
    /// The parsed file.
    pub config: Config,
    /// `errors` with `ckr` resolved (same order).
    pub errors: Vec<ResolvedError>,
}

fn check_names(what: &str, names: &[String]) -> Result<(), String> {
    for n in names {
        if n != "*" && !FUNCTION_NAMES.contains(&n.as_str()) {
            return Err(format!("{what}: unknown function name {n:?}"));
        }
    }
    Ok(())
}

/// Parse and validate a control file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Validated, String> {
    let config: Config = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let names: Vec<String> = config.latency_us.keys().cloned().collect();
    check_names("latency_us", &names)?;
    if let Some(h) = &config.hang {
        check_names("hang.functions", &h.functions)?;
    }
    let mut errors = Vec::with_capacity(config.errors.len());
    for (i, rule) in config.errors.iter().enumerate() {
        check_names(&format!("errors[{i}].functions"), &rule.functions)?;
        if let Some(p) = rule.probability
            && !(0.0..=1.0).contains(&p)
        {
            return Err(format!("errors[{i}].probability {p} is not within 0..1"));
        }
        let rv = match &rule.ckr {
            Ckr::Number(n) => CK_RV::try_from(*n).map_err(|e| e.to_string())?,
            Ckr::Name(name) => ckr_by_name(name)
                .ok_or_else(|| format!("errors[{i}].ckr: unknown CKR name {name:?}"))?,
        };
        errors.push(ResolvedError {
            rule: rule.clone(),
            rv,
        });
    }
    Ok(Validated { config, errors })
}

/// Does a rule's function list match `name`?
pub fn matches(functions: &[String], name: &str) -> bool {
    functions.iter().any(|f| f == "*" || f == name)
}

/// File-name stem for a token label: trailing spaces trimmed, characters other than
/// `[A-Za-z0-9._-]` replaced by `_`.
pub fn sanitize_label(label: &str) -> String {
    label
        .trim_end_matches([' ', '\0'])
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let v = parse(
            br#"{
              "latency_us": { "C_Encrypt": 2000, "C_Decrypt": 2000, "*": 0 },
              "errors": [
                { "functions": ["C_Encrypt", "C_Decrypt"], "ckr": "CKR_DEVICE_ERROR", "count": 5 },
                { "functions": ["*"], "ckr": 48, "probability": 0.1 }
              ],
              "hang": { "functions": ["C_Encrypt"], "ms": 10000, "count": 1 },
              "removed": false,
              "after_restore": "sessions_invalid",
              "gcm_iv": "proxy"
            }"#,
        )
        .unwrap();
        assert_eq!(v.errors[0].rv, CKR_DEVICE_ERROR);
        assert_eq!(v.errors[1].rv, 48);
        assert_eq!(v.config.hang.unwrap().ms, 10000);
        assert_eq!(v.config.gcm_iv, GcmIv::Proxy);
    }

    #[test]
    fn empty_object_means_no_faults() {
        let v = parse(b"{}").unwrap();
        assert!(v.errors.is_empty() && !v.config.removed);
        assert_eq!(v.config.after_restore, AfterRestore::SessionsInvalid);
    }

    #[test]
    fn rejects_typos() {
        assert!(parse(br#"{"remove": true}"#).is_err());
        assert!(
            parse(br#"{"errors": [{"functions": ["C_Encrypt"], "ckr": "CKR_NOPE"}]}"#).is_err()
        );
        assert!(parse(br#"{"latency_us": {"C_Encrpyt": 1}}"#).is_err());
        assert!(parse(br#"{"gcm_iv": "hsm"}"#).is_err());
    }

    #[test]
    fn sanitizes_labels() {
        assert_eq!(sanitize_label("t-1-2   "), "t-1-2");
        assert_eq!(sanitize_label("a b/c.d"), "a_b_c.d");
    }
}
