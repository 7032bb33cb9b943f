//! Fuzz target `config`: runs `ekm_proxy::fuzzing::config`, the same property check
//! `tests/fuzz_corpus.rs` replays over `fuzz/corpus/config` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = ekm_proxy::fuzzing::config(data) {
        panic!("property failed: {why}");
    }
});
