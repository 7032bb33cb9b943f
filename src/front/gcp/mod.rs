//! Google Cloud External Key Manager (Cloud EKM) wrap/unwrap API.
//!
//! Flow per request: route (`<prefix>/<key path>:wrap|:unwrap`, POST only) → Bearer JWT
//! (`auth::jwt`) → the service account's request-rate quota → key lookup → proto3 JSON (`wire`)
//! → per-key grants and Key Access Justifications (`authz::decide::cloud_ekm`) →
//! `core::KeyService` AES-256-GCM with the blob format and AAD binding of [`blob`] → wire
//! response, with every failure mapped once by [`error`].
//!
//! Depends on `auth`, `authz`, `core`, `metrics`, `audit` and HTTP types; never on `hsm`.

pub mod blob;
pub mod error;
pub mod handler;
mod ops;
pub mod settings;
pub mod wire;

pub use handler::GcpFront;
pub use settings::{GcpKeySettings, GcpLimits, GcpQuotas, GcpSettings};
