//! The dev profile: certificates, token bootstrap and configuration for trying ekm-proxy locally.
//!
//! DEV ONLY. Everything here uses fixed, published credentials (PIN `1234`, the dev SigV4 key);
//! production deployments create tokens, keys and certificates with their own tooling.

pub mod certs;
pub mod profile;
