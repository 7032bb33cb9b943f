//! The dependency rules of DESIGN.md §2, checked on the source text: `cryptoki` only under
//! `src/hsm/`; no HTTP or wire-JSON types in `core` or `hsm`; `front` never reaches into `hsm`;
//! `core` never reaches into `front`, `server` or `hsm`; `policy explain` never needs the HSM or
//! a listener.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// Lines of code (comments stripped) of every file under `src/<dir>` that mention `needle`.
fn offenders(dir: &str, needles: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let files = if root.is_dir() {
        rust_files(&root)
    } else {
        vec![root.with_extension("rs")]
    };
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for needle in needles {
                if code.contains(needle) {
                    out.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    out
}

#[test]
fn cryptoki_only_in_hsm() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    for file in rust_files(&src) {
        if file.starts_with(src.join("hsm")) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        if text
            .lines()
            .any(|l| l.split("//").next().unwrap_or("").contains("cryptoki"))
        {
            bad.push(file.display().to_string());
        }
    }
    assert!(bad.is_empty(), "cryptoki used outside src/hsm/: {bad:?}");
}

#[test]
fn no_http_or_wire_json_in_core_or_hsm() {
    for dir in ["core", "hsm"] {
        let bad = offenders(dir, &["hyper::", "http::", "serde_json::", "http_body"]);
        assert!(bad.is_empty(), "HTTP/wire types in src/{dir}: {bad:#?}");
    }
}

#[test]
fn front_never_reaches_into_hsm() {
    let bad = offenders("front", &["crate::hsm", "super::super::hsm"]);
    assert!(bad.is_empty(), "front depends on hsm: {bad:#?}");
}

#[test]
fn core_depends_only_inward() {
    let bad = offenders(
        "core",
        &[
            "crate::front",
            "crate::server",
            "crate::hsm",
            "crate::config",
            "crate::app",
        ],
    );
    assert!(bad.is_empty(), "core depends outward: {bad:#?}");
}

#[test]
fn auth_and_authz_know_nothing_of_fronts_servers_or_the_hsm() {
    for dir in ["auth", "authz"] {
        let bad = offenders(
            dir,
            &[
                "crate::front",
                "crate::server",
                "crate::hsm",
                "crate::config",
                "crate::app",
            ],
        );
        assert!(bad.is_empty(), "src/{dir} depends outward: {bad:#?}");
    }
}

#[test]
fn fronts_never_read_configuration() {
    // Fronts receive their own typed settings from `config`; the arrow never points back.
    let bad = offenders("front", &["crate::config"]);
    assert!(bad.is_empty(), "front depends on config: {bad:#?}");
}

#[test]
fn policy_explain_needs_neither_the_hsm_nor_a_listener() {
    // It must run where only the configuration is (an operator's laptop), and decide with the
    // fronts' settings and `authz::decide`, not with a front's handlers.
    let bad = offenders(
        "policy_explain",
        &[
            "crate::hsm",
            "crate::server",
            "crate::app",
            "handler",
            "wire::",
        ],
    );
    assert!(bad.is_empty(), "policy_explain depends outward: {bad:#?}");
}

#[test]
fn the_checker_sees_violations() {
    // Guard against a checker that silently checks nothing: it must see cryptoki in src/hsm.
    assert!(
        !offenders("hsm", &["cryptoki"]).is_empty(),
        "layering checker found no files under src/hsm"
    );
}
