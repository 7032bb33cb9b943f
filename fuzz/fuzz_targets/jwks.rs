//! Fuzz target `jwks`: runs `ekm_proxy::fuzzing::jwks`, the same property check
//! `tests/fuzz_corpus.rs` replays over `fuzz/corpus/jwks` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = ekm_proxy::fuzzing::jwks(data) {
        panic!("property failed: {why}");
    }
});
