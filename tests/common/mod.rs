pub mod jwks;
pub mod proxy;
pub mod softhsm;
