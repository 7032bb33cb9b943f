//! SigV4 (stub; being written).
