pub mod proxy;
pub mod softhsm;
