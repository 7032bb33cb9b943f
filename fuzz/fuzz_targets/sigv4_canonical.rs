//! Fuzz target `sigv4_canonical`: runs `ekm_proxy::fuzzing::sigv4_canonical`, the same property check
//! `tests/fuzz_corpus.rs` replays over `fuzz/corpus/sigv4_canonical` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = ekm_proxy::fuzzing::sigv4_canonical(data) {
        panic!("property failed: {why}");
    }
});
