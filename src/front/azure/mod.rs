//! Azure Key Vault Managed HSM external keys: the EKM Proxy API 0.1-preview
//! (`../shared/specs/azure-ekm.md`). Mutual TLS is the only credential: each path prefix (a
//! tenant or an MHSM pool) names the client certificates it accepts.
//!
//! `POST /<prefix>/info`, `/<prefix>/<key>/metadata`, `/<prefix>/<key>/wrapkey` and
//! `/<prefix>/<key>/unwrapkey`, each with `?api-version=0.1-preview`; JSON bodies carrying
//! `request_context`; base64url without padding; `{code, message}` errors.
//!
//! Depends on `auth`, `authz`, `core`, `metrics`, `audit`, the shared `front::pipeline` and HTTP
//! types; never on `hsm` or `config`.

pub mod error;
pub mod handler;
pub mod settings;
pub mod wire;

pub use handler::AzureFront;
pub use settings::{AzureSettings, PrefixSettings};
