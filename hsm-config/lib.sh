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
