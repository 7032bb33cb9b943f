//! Fuzz target `gcp_request`: runs `ekm_proxy::fuzzing::gcp_request`, the same property check
//! `tests/fuzz_corpus.rs` replays over `fuzz/corpus/gcp_request` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = ekm_proxy::fuzzing::gcp_request(data) {
        panic!("property failed: {why}");
    }
});
