# Shared helpers for the dev and test scripts (sourced, not run).

# Install what the proxy and its tests need on a fresh Debian machine, if missing.
ensure_packages() {
  local missing=()
  [ -e /usr/lib/softhsm/libsofthsm2.so ] || [ -e /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so ] \
    || [ -e /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so ] || missing+=(softhsm2)
  command -v curl >/dev/null || missing+=(curl)
  command -v cc >/dev/null || missing+=(gcc)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! command -v cargo >/dev/null; then
    echo "cargo is not installed: install Rust (https://rustup.rs) and run this again" >&2
    exit 1
  fi
}

# Write a SoftHSMv2 config whose token directory sits next to it.
write_softhsm_conf() {
  local conf="$1" dir
  dir="$(dirname "$conf")"
  mkdir -p "$dir/tokens"
  if [ ! -f "$conf" ]; then
    printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' "$dir" >"$conf"
  fi
}

# Cargo's target directory (CARGO_TARGET_DIR or ./target), as an absolute path.
cargo_target_dir() {
  local dir="${CARGO_TARGET_DIR:-target}"
  case "$dir" in /*) ;; *) dir="$PWD/$dir" ;; esac
  printf '%s\n' "$dir"
}

# A throwaway dev profile in directory $1 (token, keys, certificates, config) that serves through
# the fault-injecting PKCS#11 module (crates/p11-fault) on free loopback ports, built in profile $2
# (release or debug). Exports SOFTHSM2_CONF and P11_FAULT_DIR; sets exe, cfg, control (the
# module's control file for the dev token), stats (its stats file) and the faults() helper.
fault_profile() {
  local work="$1" profile="$2" target lib
  export SOFTHSM2_CONF="$work/softhsm2.conf"
  write_softhsm_conf "$SOFTHSM2_CONF"
  export P11_FAULT_DIR="$work/p11-fault"
  mkdir -p "$P11_FAULT_DIR" "$work/hsm-config" "$work/certs"
  if [ "$profile" = release ]; then
    cargo build --release --workspace --quiet
  else
    cargo build --workspace --quiet
  fi
  target="$(cargo_target_dir)/$profile"
  exe="$target/ekm-proxy"
  lib="$target/libp11_fault.so"
  "$exe" dev init --root "$work" >"$work/dev-init.log" 2>&1 || { cat "$work/dev-init.log" >&2; return 1; }
  cfg="$work/hsm-config/dev.toml"
  # The audit chain is computed and its checkpoints MACed in the (faulty) HSM as in production,
  # but written to /dev/null: a 30-minute soak would otherwise write gigabytes of audit lines.
  sed -i -e "s#^module = .*#module = \"$lib\"#" \
         -e 's#^address = "127.0.0.1:[0-9]*"#address = "127.0.0.1:0"#' \
         -e 's#^audit_file = .*#audit_file = "/dev/null"#' "$cfg"
  control="$P11_FAULT_DIR/ekm-dev.json"
  stats="$P11_FAULT_DIR/ekm-dev.stats.json"
  faults '{}'
}

# Replace the fault module's control document (temp file + rename: never read half-written).
faults() { printf '%s\n' "$1" >"$control.tmp" && mv "$control.tmp" "$control"; }

# Start the proxy on $cfg with its log in $1; sets server_pid, tls_port and admin (host:port).
# With a second argument `--no-ok-lines`, the per-request lines of successful requests
# (`outcome=ok`) are left out of the log: under load they are gigabytes (a 30-minute soak wrote
# about 16 GB) and say nothing a failure investigation needs; every other line is kept.
start_proxy() {
  local log="$1" tls=""
  # The log exists before the proxy starts: with --no-ok-lines it is created by the filter,
  # which may start after the first poll below (and a missing file fails the pipeline).
  : >"$log"
  if [ "${2:-}" = "--no-ok-lines" ]; then
    # Process substitution keeps $! the proxy's own pid (RSS sampling, signals).
    "$exe" serve --config "$cfg" > >(grep --line-buffered -v 'outcome=ok' >"$log") 2>&1 &
  else
    "$exe" serve --config "$cfg" >"$log" 2>&1 &
  fi
  server_pid=$!
  admin=""
  for _ in $(seq 1 200); do
    tls="$(sed -n 's/.*listening listener=tls addr=\([0-9.:]*\).*/\1/p' "$log" | head -n1 || true)"
    admin="$(sed -n 's/.*admin listening addr=\([0-9.:]*\).*/\1/p' "$log" | head -n1 || true)"
    [ -n "$tls" ] && [ -n "$admin" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$tls" ] || [ -z "$admin" ]; then
    echo "the proxy did not start:" >&2
    cat "$log" >&2
    return 1
  fi
  tls_port="${tls##*:}"
}
