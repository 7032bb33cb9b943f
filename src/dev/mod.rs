//! The dev profile: certificates, token bootstrap and configuration for trying ekm-proxy locally.
//!
//! DEV ONLY. Everything here uses fixed, published credentials (PIN `1234`, the dev SigV4 key, a
//! JWT signing key on disk); production deployments create tokens, keys and certificates with
//! their own tooling, and verify Google's tokens against Google's keys.

pub mod certs;
pub mod jwt;
pub mod profile;
