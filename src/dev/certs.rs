//! Dev certificates (stub; being written).
