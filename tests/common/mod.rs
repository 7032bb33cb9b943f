pub mod cloud_ekm;
pub mod fault;
pub mod jwks;
pub mod proxy;
pub mod softhsm;
