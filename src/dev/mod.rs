//! The dev profile: certificates, token bootstrap and config for trying ekm-proxy locally.

pub mod certs;
