//! The PKCS#11 HSM backend: the only module that imports `cryptoki` (DESIGN.md §4).
//!
//! - [`settings`]: [`HsmSettings`] and [`TokenSelector`] (plain data from `config`).
//! - `module`: the process-wide registry of initialized PKCS#11 modules (one per path; the one
//!   justified global, because `C_Initialize`/`C_Finalize` are process-wide) and token selection.
//! - `worker`: OS threads, each owning one logged-in session; jobs and the session-level rungs of
//!   the recovery ladder.
//! - `pool`: the worker threads, the supervisor thread, and the replacement of hung workers.
//! - `recovery`: the token state and the supervisor, which climbs the token- and module-level
//!   rungs (find the slot again, `C_Finalize` + `C_Initialize`) with backoff and jitter.
//! - `keys`: label → handle lookup (exactly one match), attributes → `core::KeyInfo`, the custody
//!   check, and the moka cache warmed at start.
//! - `gcm`: `CKM_AES_GCM` with the vendor's IV convention ([`GcmIvMode`]).
//! - `keywrap`: AES Key Wrap (RFC 3394/5649) and RSA-OAEP inside the HSM, and the start-up
//!   trial of what the token supports.
//! - `mac`: HMAC-SHA-256 inside the HSM, for the audit chain's checkpoints.
//! - [`state`]: the fleet state (disabled keys and key stores, kill switch) as data objects.
//! - `errors`: [`HsmError`] and the single `CKR_*` → `CryptoError` mapping.
//! - [`backend`]: [`Pkcs11Backend`], the async handle implementing `core::Backend`.
//! - [`bootstrap`]: idempotent token and key creation (dev setup, tests, `keys create`).
//!
//! Depends on `core`, `metrics` and `secret` only; never on HTTP, wire formats or front ends.

pub mod backend;
pub mod bootstrap;
mod errors;
mod gcm;
mod keys;
mod keywrap;
mod mac;
mod module;
mod pool;
mod recovery;
pub mod settings;
pub mod state;
mod worker;

pub use backend::Pkcs11Backend;
pub use bootstrap::{
    KeyKind, KeyReport, KeySpec, TokenReport, create_key, destroy_key, ensure_key, ensure_token,
    generate_key, import_aes_key,
};
pub use errors::HsmError;
pub use module::ModuleGuard;
pub use settings::{GcmIvMode, HsmSettings, TokenSelector};
