//! TLS (stub; being written).
