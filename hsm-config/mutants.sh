#!/usr/bin/env bash
# Mutation testing with cargo-mutants, one source file at a time, each against the tests that
# exercise it (the whole suite per mutant would take days on a 2-core machine).
#
#   hsm-config/mutants.sh src/auth/sigv4.rs src/config/validate.rs     # every mutant in the files
#   hsm-config/mutants.sh --in-diff change.diff src/server/listener.rs # only lines a diff touched
#   hsm-config/mutants.sh --re 'request.rs:(105|136):' src/front/xks/request.rs  # re-run survivors
#
# Runs in place (`cargo mutants --in-place`) so each mutant is an incremental build: use a
# dedicated git worktree, never one you are editing (an interrupted run can leave a mutant behind;
# `git checkout -- src` undoes it). Results go to mutants.out/<file>/; the summary line per file
# ("N mutants tested: …") is printed at the end. Needs cargo-mutants (`cargo install cargo-mutants`).
set -euo pipefail
cd "$(dirname "$0")/.."
. hsm-config/lib.sh

diff_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --in-diff) diff_args+=(--in-diff "$(realpath "$2")"); shift 2 ;;
    # Only mutants whose name matches (e.g. the survivors of a run: 'handler.rs:(33|147):').
    --re) diff_args+=(--re "$2"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--in-diff FILE] [--re REGEX] SRC_FILE..." >&2; exit 64; }
command -v cargo-mutants >/dev/null || { echo "mutants: install cargo-mutants first (cargo install cargo-mutants)" >&2; exit 1; }
if ! git diff --quiet -- src; then
  echo "mutants: src/ has uncommitted changes; run this in a clean worktree" >&2
  exit 1
fi

ensure_packages
tmp="$(mktemp -d)"
trap 'git checkout -q -- src; rm -rf "$tmp"' EXIT
export SOFTHSM2_CONF="$tmp/softhsm2.conf"
write_softhsm_conf "$SOFTHSM2_CONF"
export P11_FAULT_DIR="$tmp/p11-fault"
mkdir -p "$P11_FAULT_DIR"
cargo build -q -p p11-fault
P11_FAULT_LIB="$(cargo_target_dir)/debug/libp11_fault.so"
export P11_FAULT_LIB
# Debug info only slows the relink each mutant needs.
export CARGO_PROFILE_DEV_DEBUG=0

# The test targets that exercise each file (unit tests always run).
tests_for() {
  case "$1" in
    src/auth/sigv4*) echo "--test xks --test fuzz_corpus" ;;
    src/auth/jwt*) echo "--test gcp --test gcp_audit --test fuzz_corpus" ;;
    # quota: throttling and its audit line; faults: the request deadline's answer; audit_chain:
    # what an XKS decision line records.
    src/front/xks/*) echo "--test xks --test fuzz_corpus --test quota --test faults --test audit_chain" ;;
    src/front/gcp/*) echo "--test gcp --test gcp_audit --test fuzz_corpus --test quota --test faults" ;;
    src/audit/*) echo "--test gcp_audit --test xks --test audit_chain" ;;
    src/config/*) echo "--test config" ;;
    src/app.rs) echo "--test config --test xks --test fleet --test audit_chain" ;;
    # xks: the lingering close's drain (rejected client certificates get the alert, not a reset);
    # faults: a request slower than the idle timeout (an HSM made slow) is not cut off.
    src/server/listener.rs|src/server/mod.rs|src/metrics.rs) echo "--test connections --test tls --test xks --test faults" ;;
    src/fuzzing.rs) echo "--test fuzz_corpus" ;;
    src/hsm/*) echo "--test hsm --test faults --test keys" ;;
    src/authz/*) echo "--test gcp --test xks --test config" ;;
    *) echo "--tests" ;;
  esac
}

summary=()
for f in "$@"; do
  out="mutants.out/${f//\//_}"
  mkdir -p "$out"
  # shellcheck disable=SC2046
  cargo mutants --in-place --no-shuffle --file "$f" "${diff_args[@]}" --output "$out" \
    -- --lib $(tests_for "$f") 2>&1 | tee "$out/console.log" | grep -E "^(MISSED|TIMEOUT)|mutants tested" || true
  summary+=("$f: $(grep -E 'mutants tested' "$out/console.log" | tail -1)")
done
printf '%s\n' "${summary[@]}"
