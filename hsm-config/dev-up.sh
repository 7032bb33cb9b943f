#!/usr/bin/env bash
# Quick start, command 1: set everything up and run the proxy with the dev profile.
#   - installs SoftHSMv2 if missing
#   - creates (idempotently) the dev token 'ekm-dev' and its keys, the dev CA and certificates in
#     certs/dev/, and hsm-config/dev.toml
#   - runs the proxy in the foreground: https://localhost:8443 (TLS), https://localhost:9443 (mTLS),
#     admin http://127.0.0.1:9090
# DEV ONLY: the PIN, SigV4 secret and certificates are public.
set -euo pipefail
cd "$(dirname "$0")/.."
. hsm-config/lib.sh
ensure_packages
export SOFTHSM2_CONF="$PWD/hsm-config/softhsm2-dev.conf"
write_softhsm_conf "$SOFTHSM2_CONF"
cargo build --release --quiet
target/release/ekm-proxy dev init --root .
echo "SOFTHSM2_CONF=$SOFTHSM2_CONF (export it to use 'ekm-proxy keys list --config hsm-config/dev.toml')" >&2
exec target/release/ekm-proxy serve --config hsm-config/dev.toml
