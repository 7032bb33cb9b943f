//! AWS KMS External Key Store proxy API v1 (also the XKS-shaped Alibaba Cloud XKI path).
//!
//! Flow per request: route (key store by path prefix, operation by path suffix, POST only) →
//! SigV4 → JSON (`wire`) → key allow-list → secondary authorization (`authz`) → size limits →
//! `core::KeyService` → wire response, with every failure mapped once by [`error`].
//!
//! Depends on `auth`, `authz`, `core`, `metrics`, `audit` and HTTP types; never on `hsm`.

pub mod error;
pub mod handler;
mod ops;
mod request;
pub mod settings;
pub mod wire;

pub use handler::XksFront;
pub use settings::{KeyAllowList, KeyStoreSettings, NotServed, XksLimits, XksSettings};
