#!/usr/bin/env bash
# Quick start, command 2: run the whole test suite on a fresh machine.
# Installs SoftHSMv2 if missing and gives the tests a SoftHSM configuration in a temp dir, where
# each test creates its own token. Builds the fault-injecting PKCS#11 module (crates/p11-fault)
# that the fault, recovery and IV-convention tests put between the proxy and SoftHSM, and tells
# the tests where it is (P11_FAULT_LIB) and where its control files go (P11_FAULT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
. hsm-config/lib.sh
ensure_packages
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export SOFTHSM2_CONF="$tmp/softhsm2.conf"
write_softhsm_conf "$SOFTHSM2_CONF"
export P11_FAULT_DIR="$tmp/p11-fault"
mkdir -p "$P11_FAULT_DIR"
cargo build -p p11-fault
P11_FAULT_LIB="$(cargo_target_dir)/debug/libp11_fault.so"
export P11_FAULT_LIB
cargo test --workspace --all-targets "$@"
