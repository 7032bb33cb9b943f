//! The process-wide PKCS#11 module registry, and token (slot) selection.
//!
//! # Why this is the one justified global
//!
//! `C_Initialize` and `C_Finalize` act on the whole process, not on an object: a second
//! `C_Initialize` fails with `CKR_CRYPTOKI_ALREADY_INITIALIZED`, and one `C_Finalize` closes every
//! session of every user of the module in the process. Two owners of the same module (the serving
//! backend and `keys create`, two backends in one test binary, the bootstrap and the backend) must
//! therefore share one initialized context. The registry maps a module path to a `Weak` handle:
//! the first user loads and initializes, later users share it, and the last one to drop it
//! finalizes. It holds no settings and no sessions; everything else is passed explicitly.
//!
//! Must not depend on anything in the crate except `errors` and `settings`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::{Slot, TokenInfo};

use super::errors::{HsmError, ck_error_name};
use super::settings::TokenSelector;

/// A loaded, initialized PKCS#11 module shared by everyone in the process using the same path.
pub(crate) struct Module {
    ctx: Pkcs11,
    path: PathBuf,
    /// False when someone outside this registry had already initialized the module: then it is
    /// theirs to finalize, not ours.
    owns_initialization: bool,
    /// Serializes token administration (`C_InitToken` picks "the first free slot"; two concurrent
    /// creators would pick the same one and the second would re-initialize the first's token).
    admin: Mutex<()>,
}

type Registry = Mutex<HashMap<PathBuf, Weak<Module>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the map or `()` inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long `acquire` waits for a concurrent last-user drop of the same module to finish
/// finalizing before giving up.
const TEARDOWN_WAIT: Duration = Duration::from_secs(10);

impl Module {
    /// The shared module for `path`, loading and initializing (with OS locking) if needed.
    pub(crate) fn acquire(path: &Path) -> Result<Arc<Module>, HsmError> {
        // Canonical path, so a symlink and its target share one context (dlopen shares the
        // library anyway, and with it the C_Initialize state).
        let key = std::fs::canonicalize(path).map_err(|e| HsmError::ModuleLoad {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let started = Instant::now();
        loop {
            let mut map = lock(registry());
            match map.get(&key).map(Weak::upgrade) {
                Some(Some(module)) => return Ok(module),
                Some(None) => {
                    // The last user is dropping it right now and will finalize under this lock:
                    // initializing before that finishes would be undone by its C_Finalize.
                    drop(map);
                    if started.elapsed() > TEARDOWN_WAIT {
                        return Err(HsmError::ModuleLoad {
                            path: key,
                            detail: "timed out waiting for the previous user to finalize it"
                                .to_owned(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                None => {
                    let module = Arc::new(Module::load(&key)?);
                    map.insert(key, Arc::downgrade(&module));
                    return Ok(module);
                }
            }
        }
    }

    fn load(path: &Path) -> Result<Module, HsmError> {
        let ctx = Pkcs11::new(path).map_err(|e| HsmError::ModuleLoad {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        let owns_initialization = match ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) => true,
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::warn!(module = %path.display(), "PKCS#11 module was already initialized by other code in this process; sharing it");
                false
            }
            Err(e) => {
                return Err(HsmError::Initialize {
                    path: path.to_path_buf(),
                    ckr: ck_error_name(&e).into_owned(),
                });
            }
        };
        tracing::info!(module = %path.display(), "PKCS#11 module loaded and initialized");
        Ok(Module {
            ctx,
            path: path.to_path_buf(),
            owns_initialization,
            admin: Mutex::new(()),
        })
    }

    /// The cryptoki context.
    pub(crate) fn ctx(&self) -> &Pkcs11 {
        &self.ctx
    }

    /// The module path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `C_Finalize` then `C_Initialize`: the last rung of the recovery ladder, for client
    /// libraries that lost their HSM and recover only when re-initialised. Every session of every
    /// user of this module in the process dies: the caller must have stopped its own calls and
    /// must forget (never close) its old session handles.
    pub(crate) fn reinitialize(&self) -> Result<(), HsmError> {
        let _admin = self.admin_lock();
        match self.ctx.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => {
                // Initialising again is still worth a try: some modules report errors here for
                // sessions that were already dead.
                tracing::debug!(module = %self.path.display(), ckr = %ck_error_name(&e), "C_Finalize failed");
            }
        }
        match self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                tracing::info!(module = %self.path.display(), "PKCS#11 module re-initialised");
                Ok(())
            }
            Err(e) => Err(HsmError::Initialize {
                path: self.path.clone(),
                ckr: ck_error_name(&e).into_owned(),
            }),
        }
    }

    /// Hold this while creating tokens.
    pub(crate) fn admin_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.admin)
    }

    /// Every slot that holds an initialized token, with its token info.
    pub(crate) fn tokens(&self) -> Result<Vec<(Slot, TokenInfo)>, HsmError> {
        let slots = self
            .ctx
            .get_slots_with_token()
            .map_err(|e| HsmError::pkcs11("C_GetSlotList", &e))?;
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            match self.ctx.get_token_info(slot) {
                Ok(info) if info.token_initialized() => out.push((slot, info)),
                Ok(_) => {}
                // A slot whose token vanished between the two calls is simply not a candidate.
                Err(e) => {
                    tracing::debug!(slot = slot.id(), ckr = %ck_error_name(&e), "C_GetTokenInfo failed")
                }
            }
        }
        Ok(out)
    }

    /// The slot holding the token `selector` names: exactly one match, else an operator-facing
    /// error listing the tokens that exist.
    pub(crate) fn find_token(
        &self,
        selector: &TokenSelector,
    ) -> Result<(Slot, TokenInfo), HsmError> {
        let tokens = self.tokens()?;
        let describe = |info: &TokenInfo| {
            format!(
                "{} (serial {})",
                info.label().trim(),
                info.serial_number().trim()
            )
        };
        let mut matches: Vec<(Slot, TokenInfo)> = tokens
            .iter()
            .filter(|(_, info)| match selector {
                TokenSelector::Label(label) => info.label().trim_end() == label.trim_end(),
                TokenSelector::Serial(serial) => info.serial_number().trim() == serial.trim(),
            })
            .cloned()
            .collect();
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(HsmError::TokenNotFound {
                wanted: selector.to_string(),
                module: self.path.clone(),
                available: tokens.iter().map(|(_, info)| describe(info)).collect(),
            }),
            _ => Err(HsmError::TokenAmbiguous {
                wanted: selector.to_string(),
                matches: matches.iter().map(|(_, info)| describe(info)).collect(),
            }),
        }
    }
}

/// Keeps a PKCS#11 module loaded and initialized while held, so a series of bootstrap calls (or
/// tests creating many tokens) does not `C_Initialize` and `C_Finalize` it around every call.
/// Cheap to clone. The backend holds its own; this is for tools and tests.
#[derive(Clone, Debug)]
pub struct ModuleGuard {
    _module: Arc<Module>,
}

impl ModuleGuard {
    /// Load and initialize the module at `path` (or share it if this process already has).
    pub fn acquire(path: &Path) -> Result<Self, HsmError> {
        Module::acquire(path).map(|module| ModuleGuard { _module: module })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // Under the registry lock, so a concurrent `acquire` cannot initialize the module again
        // before this C_Finalize has run (see `acquire`).
        let mut map = lock(registry());
        if map.get(&self.path).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&self.path);
        }
        if self.owns_initialization {
            if let Err(e) = self.ctx.clone().finalize() {
                tracing::warn!(module = %self.path.display(), ckr = %ck_error_name(&e), "C_Finalize failed");
            } else {
                tracing::debug!(module = %self.path.display(), "PKCS#11 module finalized");
            }
        }
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_module_is_an_operator_error() {
        let err = Module::acquire(Path::new("/nonexistent/libnothing.so")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot load PKCS#11 module /nonexistent/libnothing.so"),
            "{msg}"
        );
    }
}
