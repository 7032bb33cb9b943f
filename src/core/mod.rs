//! The protocol-neutral core: key operations, key state, AAD framing, per-caller rate quotas and
//! the `Backend` seam.
//!
//! Everything here is plain Rust data. It must not depend on HTTP (`hyper`, `http`), wire JSON
//! (`serde_json`), the PKCS#11 bindings or any front end: front ends translate their wire format
//! into these types, and `hsm` implements [`Backend`].

pub mod backend;
pub mod error;
pub mod framing;
pub mod health;
pub mod keywrap;
pub mod quota;
pub mod service;
pub mod state;
pub mod types;

pub use backend::Backend;
pub use error::CryptoError;
pub use health::{HealthMonitor, HealthReport};
pub use keywrap::{KeyUnwrap, KeyWrap, WrapAlgorithm, WrapPath, WrapSupport};
pub use quota::{Quotas, Throttled, TokenBucket};
pub use service::{KeyService, KeyServiceSettings, KeyStatus, KillSwitch};
pub use types::*;
