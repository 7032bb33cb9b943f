//! Fuzz target `jwt_token`: runs `ekm_proxy::fuzzing::jwt_token`, the same property check
//! `tests/fuzz_corpus.rs` replays over `fuzz/corpus/jwt_token` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = ekm_proxy::fuzzing::jwt_token(data) {
        panic!("property failed: {why}");
    }
});
