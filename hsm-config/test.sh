#!/usr/bin/env bash
# Quick start, command 2: run the whole test suite on a fresh machine.
# Installs SoftHSMv2 if missing and gives the tests a SoftHSM configuration in a temp dir, where
# each test creates its own token.
set -euo pipefail
cd "$(dirname "$0")/.."
. hsm-config/lib.sh
ensure_packages
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export SOFTHSM2_CONF="$tmp/softhsm2.conf"
write_softhsm_conf "$SOFTHSM2_CONF"
cargo test --all-targets "$@"
