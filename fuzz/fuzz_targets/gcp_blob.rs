//! Fuzz target `gcp_blob`: runs `ekm_proxy::fuzzing::gcp_blob`, the same property check
//! `tests/fuzz_corpus.rs` replays over `fuzz/corpus/gcp_blob` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = ekm_proxy::fuzzing::gcp_blob(data) {
        panic!("property failed: {why}");
    }
});
