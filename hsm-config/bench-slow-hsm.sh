#!/usr/bin/env bash
# Latency hiding against a network-like HSM: the fault-injecting PKCS#11 module (crates/p11-fault)
# adds --latency-us (default 2000) to every C_Encrypt and C_Decrypt of a throwaway dev token, and
# XKS Encrypt is measured at --concurrency (default 64) once per worker count (default 4,8,16,32),
# with the raw HSM lane (the same backend and the same injected latency, no HTTP) in the same run.
# Little's law bounds the rate at workers / latency; the table reports how close the proxy gets.
#
#   hsm-config/bench-slow-hsm.sh [--workers 4,8,16,32] [--latency-us 2000] [--concurrency 64]
#                                [--duration 10s] [--json FILE] [--charge-length-queries]
#
# By default the injected latency is not charged to length queries (C_Encrypt with a NULL output
# buffer, which cryptoki issues before every call; client libraries answer them locally);
# --charge-length-queries charges them too, i.e. two round trips per operation.
set -euo pipefail
cd "$(dirname "$0")/.."
. hsm-config/lib.sh

workers_list="4,8,16,32"
latency=2000
conc=64
duration=10s
json_out=""
charge=false
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers_list="$2"; shift 2 ;;
    --latency-us) latency="$2"; shift 2 ;;
    --concurrency) conc="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --json) json_out="$2"; shift 2 ;;
    --charge-length-queries) charge=true; shift ;;
    *) echo "usage: $0 [--workers LIST] [--latency-us N] [--concurrency N] [--duration D] [--json FILE] [--charge-length-queries]" >&2; exit 64 ;;
  esac
done

ensure_packages
work="$(mktemp -d)"
server_pid=""
cleanup() {
  [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

fault_profile "$work" release
faults "{\"latency_us\":{\"C_Encrypt\":$latency,\"C_Decrypt\":$latency},\"latency_on_length_queries\":$charge}"
base_cfg="$work/base.toml"
cp "$cfg" "$base_cfg"
: >"$work/runs.jsonl"
for w in ${workers_list//,/ }; do
  # Enough queue for the whole concurrency, and a deadline far from the injected latency.
  sed -e "s#^workers = .*#workers = $w\nqueue_capacity = 4096\nop_timeout_ms = 2000#" "$base_cfg" >"$cfg"
  start_proxy "$work/server-$w.log"
  "$exe" bench --url "https://localhost:$tls_port/dev-keystore" --ca "$work/certs/dev/ca.pem" \
    --scenario encrypt --concurrency "$conc" --duration "$duration" --warmup 2s \
    --config "$cfg" --server-pid "$server_pid" --admin "$admin" --json \
    | sed "s/^{/{\"workers\":$w,\"latency_us\":$latency,/" >>"$work/runs.jsonl"
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
done
[ -z "$json_out" ] || cp "$work/runs.jsonl" "$json_out"

python3 - "$work/runs.jsonl" "$conc" "$latency" "$charge" <<'PY'
import json, sys
path, conc, latency, charge = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "true"
queries = "length queries charged too: two round trips per operation" if charge else "length queries free"
print(f"XKS Encrypt at c={conc}, +{latency} us per C_Encrypt/C_Decrypt ({queries}; fault module over SoftHSMv2)\n")
print("| workers | bound w/latency (rps) | proxy rps | % of bound | p50 ms | p99 ms | errors | raw rps | proxy/raw | server CPU us/req |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for line in open(path):
    r = json.loads(line)
    w = r["workers"]
    bound = w / (latency / 1e6)
    p = r.get("proxy") or {}
    raw = r.get("raw") or {}
    lat = p.get("latency_ms", {})
    ratio = r.get("ratio_proxy_raw")
    cpu = r.get("server_cpu_us_per_req")
    print(f"| {w} | {bound:,.0f} | {p.get('rps', 0):,.0f} | {100 * p.get('rps', 0) / bound:.0f} % | "
          f"{lat.get('p50', '?')} | {lat.get('p99', '?')} | {p.get('error_total', '?')} | "
          f"{raw.get('rps', 0):,.0f} | {ratio if ratio is not None else '?'} | {cpu if cpu is not None else '?'} |")
PY
