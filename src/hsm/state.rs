//! Fleet state in the HSM: one PKCS#11 data object (`CKO_DATA`) per [`StateMark`], so every
//! replica attached to the token sees the same disabled keys, disabled key stores and kill switch.
//!
//! The objects are private token objects with `CKA_APPLICATION = "ekm-proxy/state/v1"`,
//! `CKA_LABEL` = the target (`key:<label>`, `keystore:<store>`, `killswitch`) and `CKA_VALUE` =
//! the record (who, when, why; never key material). Presence of an object is what disables; the
//! write path creates the new object before destroying older ones, so a target being re-marked
//! never looks enabled, and "enable" destroys every object of the label (healing duplicates two
//! concurrent writers may have made). Data objects are defined by PKCS#11 v2.40 §4.5 and kept by
//! every HSM that keeps keys; nothing here is vendor-specific.
//!
//! Reads run on a worker's read-only session (the poll); writes open their own read-write
//! session (the `keys|keystore|killswitch` commands). Must not depend on HTTP or front ends.

use std::path::Path;
use std::sync::Arc;

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::errors::{Fault, HsmError, Op, map_ckr};
use super::keys::object_copy_lock;
use super::module::Module;
use super::settings::TokenSelector;
use crate::core::state::{MAX_RECORD_BYTES, MAX_STATE_LABEL, StateMark, StateRecord, StateTarget};
use crate::secret::SecretString;

/// `CKA_APPLICATION` of every state object.
pub const APPLICATION: &str = "ekm-proxy/state/v1";

/// The most state objects read in one poll (a token flooded with them must not stall a worker).
const MAX_MARKS: usize = 10_000;

fn template() -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Application(APPLICATION.as_bytes().to_vec()),
    ]
}

/// Every mark on the token. Objects whose label names no target are skipped (and logged).
pub(crate) fn read(session: &Session) -> Result<Vec<StateMark>, Fault> {
    let handles = {
        // Searches exclude the workers' key copies (see keys::find_unique).
        let _guard = object_copy_lock();
        session
            .find_objects(&template())
            .map_err(|e| map_ckr(Op::ReadState, &e))?
    };
    let mut marks = Vec::with_capacity(handles.len().min(MAX_MARKS));
    for handle in handles.into_iter().take(MAX_MARKS) {
        let attrs =
            match session.get_attributes(handle, &[AttributeType::Label, AttributeType::Value]) {
                Ok(attrs) => attrs,
                // Destroyed between the search and the read (an "enable" racing the poll): it is gone.
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::ObjectHandleInvalid,
                    _,
                )) => continue,
                Err(e) => return Err(map_ckr(Op::ReadState, &e)),
            };
        let (mut label, mut value) = (None, Vec::new());
        for attr in attrs {
            match attr {
                Attribute::Label(bytes) => label = Some(bytes),
                Attribute::Value(bytes) => value = bytes,
                _ => {}
            }
        }
        let label = label.unwrap_or_default();
        let target = std::str::from_utf8(&label)
            .ok()
            .filter(|l| l.len() <= MAX_STATE_LABEL)
            .and_then(StateTarget::from_label);
        match target {
            Some(target) => marks.push(StateMark {
                target,
                record: StateRecord::decode(&value),
            }),
            None => tracing::warn!(
                label = %String::from_utf8_lossy(&label[..label.len().min(64)]),
                "ignoring a state object whose label names nothing"
            ),
        }
    }
    Ok(marks)
}

/// What [`write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReport {
    /// Objects created (0 or 1).
    pub created: usize,
    /// Older objects of the same target destroyed.
    pub destroyed: usize,
}

/// Set (`Some(record)`) or clear (`None`) the mark of `target` on the token, in a read-write
/// session of its own. Setting replaces any earlier record of the target.
pub fn write(
    module: &Path,
    token: &TokenSelector,
    user_pin: &SecretString,
    target: &StateTarget,
    record: Option<&StateRecord>,
) -> Result<WriteReport, HsmError> {
    let label = target.label();
    let (session, module) = open_user_session(module, token, user_pin)?;
    let mut search = template().to_vec();
    search.push(Attribute::Label(label.as_bytes().to_vec()));
    let older = session
        .find_objects(&search)
        .map_err(|e| HsmError::pkcs11("C_FindObjects", &e))?;
    let mut created = 0;
    if let Some(record) = record {
        let mut object = template().to_vec();
        object.extend([
            Attribute::Private(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(record.encode()),
        ]);
        session
            .create_object(&object)
            .map_err(|e| HsmError::pkcs11("C_CreateObject", &e))?;
        created = 1;
    }
    let mut destroyed = 0;
    for handle in older {
        destroy(&session, handle)?;
        destroyed += 1;
    }
    drop(session);
    drop(module);
    Ok(WriteReport { created, destroyed })
}

/// Every mark on the token, in a session of its own (`ekm-proxy state show`).
pub fn read_all(
    module: &Path,
    token: &TokenSelector,
    user_pin: &SecretString,
) -> Result<Vec<StateMark>, HsmError> {
    let (session, module) = open_user_session(module, token, user_pin)?;
    let marks = read(&session).map_err(|f| HsmError::Pkcs11 {
        op: "C_FindObjects",
        ckr: f.error.to_string(),
    });
    drop(session);
    drop(module);
    marks
}

fn destroy(session: &Session, handle: ObjectHandle) -> Result<(), HsmError> {
    match session.destroy_object(handle) {
        // Another writer destroyed it first: the outcome is the same.
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::ObjectHandleInvalid, _)) => {
            Ok(())
        }
        Err(e) => Err(HsmError::pkcs11("C_DestroyObject", &e)),
    }
}

/// A logged-in read-write session and the module it belongs to. Callers drop the session first.
fn open_user_session(
    module: &Path,
    token: &TokenSelector,
    user_pin: &SecretString,
) -> Result<(Session, Arc<Module>), HsmError> {
    let module = Module::acquire(module)?;
    let (slot, info) = module.find_token(token)?;
    let session = module
        .ctx()
        .open_rw_session(slot)
        .map_err(|e| HsmError::pkcs11("C_OpenSession", &e))?;
    super::bootstrap::user_login(&session, info.label().trim_end(), user_pin)?;
    Ok((session, module))
}

// A record larger than this would be cut by `StateRecord::encode`; keep the two bounds related.
const _: () = assert!(MAX_RECORD_BYTES >= 1024);
