//! Fleet state in the HSM: one PKCS#11 data object (`CKO_DATA`) per [`StateMark`], so every
//! replica attached to the token sees the same disabled keys, disabled key stores and kill switch.
//!
//! The objects are private token objects with `CKA_APPLICATION = "ekm-proxy/state/v1"`,
//! `CKA_LABEL` = the target (`key:<label>`, `keystore:<store>`, `killswitch`) and `CKA_VALUE` =
//! the record (active or not, who, when, why; never key material). An object whose record is
//! active disables its target. Every write creates the new object before destroying the older
//! ones of the label (healing duplicates two concurrent writers may have made), so a target being
//! re-marked never looks enabled; "enable" leaves an inactive record naming who enabled it, so
//! every replica can audit the author of both changes. Data objects are defined by PKCS#11 v2.40 §4.5 and kept by
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
    /// Whether the target was switched off before.
    pub was_active: bool,
    /// Whether a record was written (enabling a target that is not disabled writes nothing).
    pub written: bool,
}

/// Record `record` for `target` on the token (active: disable or engage; inactive: enable or
/// release), replacing earlier records, in a read-write session of its own.
pub fn write(
    module: &Path,
    token: &TokenSelector,
    user_pin: &SecretString,
    target: &StateTarget,
    record: &StateRecord,
) -> Result<WriteReport, HsmError> {
    let label = target.label();
    let (session, module) = open_user_session(module, token, user_pin)?;
    let mut search = template().to_vec();
    search.push(Attribute::Label(label.as_bytes().to_vec()));
    let older = session
        .find_objects(&search)
        .map_err(|e| HsmError::pkcs11("C_FindObjects", &e))?;
    let mut was_active = false;
    for handle in &older {
        let value = session
            .get_attributes(*handle, &[AttributeType::Value])
            .map_err(|e| HsmError::pkcs11("C_GetAttributeValue", &e))?;
        for attr in value {
            if let Attribute::Value(bytes) = attr {
                was_active |= StateRecord::decode(&bytes).active;
            }
        }
    }
    if !record.active && !was_active {
        drop(session);
        drop(module);
        return Ok(WriteReport {
            was_active,
            written: false,
        });
    }
    {
        let mut object = template().to_vec();
        object.extend([
            Attribute::Private(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(record.encode()),
        ]);
        session
            .create_object(&object)
            .map_err(|e| HsmError::pkcs11("C_CreateObject", &e))?;
    }
    for handle in older {
        destroy(&session, handle)?;
    }
    drop(session);
    drop(module);
    Ok(WriteReport {
        was_active,
        written: true,
    })
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
