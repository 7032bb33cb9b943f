//! Fuzz target `sigv4_authorization`: runs `ekm_proxy::fuzzing::sigv4_authorization`, the same property check
//! `tests/fuzz_corpus.rs` replays over `fuzz/corpus/sigv4_authorization` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = ekm_proxy::fuzzing::sigv4_authorization(data) {
        panic!("property failed: {why}");
    }
});
