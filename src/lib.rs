//! ekm-proxy: an external key manager proxy in front of a PKCS#11 HSM.
//!
//! Module map, in the order a request travels (see DESIGN.md §1):
//!
//! - [`server`]: TCP listeners, TLS (rustls), HTTP (hyper 1), routing, the admin listener.
//! - [`front`]: one module per cloud protocol; parses the wire format into core requests and maps
//!   [`core::CryptoError`] back to the wire exactly once.
//! - [`auth`]: proves who is calling (SigV4, JWT against a JWKS, client certificate) and yields a
//!   [`auth::Principal`].
//! - [`authz`]: decides whether a principal may do an operation on a key; only it makes a
//!   [`authz::Permit`].
//! - [`core`]: protocol-neutral key operations, key state and framing over the [`core::Backend`] seam.
//! - [`hsm`]: the PKCS#11 backend; the only module that imports the PKCS#11 bindings.
//! - [`config`], [`app`]: configuration parsing/validation and the composition root;
//!   [`background`]: the tasks it starts (fleet-state polling, audit checkpoints).
//! - [`connect_info`], [`policy_explain`]: commands that read the configuration only (never the
//!   HSM): what each cloud needs to connect, and why a sample request is allowed or denied.
//! - [`metrics`], [`audit`], [`host`]: leaves every module may use (`host`: the host name and
//!   user id audit records name).
//! - `dev`, `client`, `bench` (cargo feature `tools`, on by default, off in the production
//!   build): the dev profile (token, keys, certificates, JWT signer), XKS and Cloud EKM clients,
//!   and the benchmark.
//! - `fuzzing` (hidden): the property checks the `cargo fuzz` targets and the corpus-replay test
//!   share.
//!
//! Dependency rules (arrows point inward; a test greps for violations):
//! `main → app → server → front::* → {auth, authz, core}`; `app → hsm → core`; `app → config`;
//! any module → `metrics`, `audit`. Never `front → hsm`; never HTTP or wire-JSON types in `core`
//! or `hsm`; never the PKCS#11 bindings outside `hsm`.

#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod background;
#[cfg(feature = "tools")]
pub mod bench;
#[cfg(feature = "tools")]
pub mod client;
pub mod config;
pub mod connect_info;
pub mod core;
#[cfg(feature = "tools")]
pub mod dev;
pub mod fleet_admin;
pub mod front;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod hsm;
pub mod logging;
pub mod metrics;
pub mod policy_explain;
pub mod secret;
pub mod server;
