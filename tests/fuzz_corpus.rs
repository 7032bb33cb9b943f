//! Replays every fuzz corpus under `fuzz/corpus/<target>/` through the same property checks the
//! `cargo fuzz` targets run (`ekm_proxy::fuzzing`), on stable and without a fuzzer, so CI keeps
//! every seed and every past finding passing. Also checks that each target has its fuzz binary
//! and a non-empty corpus, so a target cannot be added to one side only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

const FUZZ_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz");

#[test]
fn every_corpus_entry_passes_its_property_check() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, check) in ekm_proxy::fuzzing::TARGETS {
        let dir = Path::new(FUZZ_DIR).join("corpus").join(target);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        assert!(!entries.is_empty(), "{target}: empty corpus");
        for path in entries {
            let data = std::fs::read(&path).unwrap();
            if let Err(why) = check(&data) {
                failures.push(format!("{}: {why}", path.display()));
            }
            replayed += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(replayed >= ekm_proxy::fuzzing::TARGETS.len());
}

#[test]
fn every_target_has_a_fuzz_binary() {
    for (target, _) in ekm_proxy::fuzzing::TARGETS {
        let file = Path::new(FUZZ_DIR)
            .join("fuzz_targets")
            .join(format!("{target}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("ekm_proxy::fuzzing::{target}(")),
            "{} does not run its property check",
            file.display()
        );
    }
}

/// Junk is "rejected input", not a property failure, and an unknown target name is an error
/// (so a typo in a target cannot silently check nothing).
#[test]
fn junk_input_passes_and_unknown_targets_fail() {
    assert!(ekm_proxy::fuzzing::check("no_such_target", b"").is_err());
    for (target, check) in ekm_proxy::fuzzing::TARGETS {
        assert!(check(&[0xff, 0xfe, 0x00]).is_ok(), "{target}");
        assert!(check(b"").is_ok(), "{target}");
    }
}
