#!/usr/bin/env bash
# Soak: mixed XKS + Cloud EKM load at c=32 (encrypt, decrypt, wrap, unwrap; 8 each) for N minutes
# against a fresh dev profile served through the fault-injecting PKCS#11 module
# (crates/p11-fault), which meanwhile injects a token outage, latency spikes, error bursts and
# hangs, while the proxy is reloaded with SIGHUP every few minutes.
#
# Prints a Markdown report (and writes it to --report FILE) and exits non-zero when any request
# hung (no answer within 10 s), RSS grew by 10 % or more after warm-up, the sessions open on the
# token at the end differ from the start, an answer was neither a success nor one of the
# protocols' retryable errors (XKS 500/503/429, Cloud EKM 503/504/429), the proxy did not stop
# cleanly on SIGTERM, or its audit chain (written to the work dir) does not verify with the HSM.
#
#   hsm-config/soak.sh                      # the 30-minute soak (release build)
#   hsm-config/soak.sh --minutes 2 --outage-secs 10 --debug   # the short version CI runs
#   hsm-config/soak.sh --session-copies     # with hsm.session_key_copies = true (see below)
#
# The proxy runs with the production default hsm.session_key_copies = false. With copies, every
# session reopened by a recovery makes new session copies of the keys, and SoftHSMv2 keeps every
# session object it ever made in memory until C_Finalize (about 240 bytes each, inside our
# process): an error storm with thousands of recoveries then grows RSS by megabytes that are
# SoftHSM's, not the proxy's (RELIABILITY.md, run 3).
#
# Everything lives in a temp dir (token, config, certificates, control files); the proxy listens
# on free loopback ports. Its log (server.log, kept with SOAK_KEEP=1) leaves out the lines of
# successful requests, which would be gigabytes; every refusal, error and event line is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
. hsm-config/lib.sh

minutes=30
outage=30
report=""
profile=release
copies=false
while [ $# -gt 0 ]; do
  case "$1" in
    --session-copies) copies=true; shift ;;
    --minutes) minutes="$2"; shift 2 ;;
    --outage-secs) outage="$2"; shift 2 ;;
    --report) report="$2"; shift 2 ;;
    --debug) profile=debug; shift ;;
    *) echo "usage: $0 [--minutes N] [--outage-secs S] [--report FILE] [--debug] [--session-copies]" >&2; exit 64 ;;
  esac
done
total=$((minutes * 60))
[ "$total" -ge 60 ] || { echo "soak: --minutes must be at least 1" >&2; exit 64; }

ensure_packages
work="$(mktemp -d)"
server_pid=""
bench_pids=()
cleanup() {
  for p in "${bench_pids[@]}" $server_pid; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${SOAK_KEEP:-}" ]; then echo "soak: work dir kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

fault_profile "$work" "$profile"
# A hung-call limit the hang bursts reach, and a recovery backoff that keeps outages short.
sed -i -e 's#^\[hsm\]#[hsm]\nhung_call_ms = 4000\nrecovery_backoff_max_ms = 2000#' \
  -e "s#^session_key_copies = .*#session_key_copies = $copies#" "$cfg"
grep -q "^session_key_copies = $copies" "$cfg" || { echo "soak: could not set session_key_copies" >&2; exit 1; }
# The audit chain goes to a real file (rotated at logging.audit_max_bytes) and is verified with
# the HSM's MAC key after a graceful stop: every decision made through the faults must be on an
# unbroken chain covered by HSM checkpoints. About 350 bytes per request (a 30-minute release
# soak writes a few GB into the work dir).
sed -i -e "s#^audit_file = .*#audit_file = \"$work/audit.jsonl\"#" "$cfg"
grep -q "^audit_file = \"$work/audit.jsonl\"" "$cfg" || { echo "soak: could not set audit_file" >&2; exit 1; }
start_proxy "$work/server.log" --no-ok-lines
port="$tls_port"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status" 2>/dev/null || echo 0; }
open_sessions() { sed -n 's/.*"open_sessions":\([0-9]*\).*/\1/p' "$stats" 2>/dev/null || echo "?"; }
metric() { curl -s "http://$admin/metrics" | awk -v s="$1" '$1 == s {print $2}'; }

sessions_start="$(open_sessions)"
rss_start="$(rss_kb)"

run_bench() { # scenario
  "$exe" bench --url "https://localhost:$port/dev-keystore" --ca "$work/certs/dev/ca.pem" \
    --gcp-signer "$work/certs/dev/jwt-signer.pem" --scenario "$1" --concurrency 8 \
    --duration "${total}s" --warmup 0s --request-timeout 10s --no-raw --json \
    >"$work/bench-$1.json" 2>"$work/bench-$1.log"
}
for s in encrypt decrypt gcp-wrap gcp-unwrap; do
  run_bench "$s" &
  bench_pids+=($!)
done

started=$(date +%s)
# RSS and thread count every 10 s, so a growth can be told apart as a step (at an event) or a slope.
threads() { awk '/^Threads/ {print $2}' "/proc/$server_pid/status" 2>/dev/null || echo 0; }
( while kill -0 "$server_pid" 2>/dev/null; do
    printf '%s\t%s\t%s\n' "$(( $(date +%s) - started ))" "$(rss_kb)" "$(threads)"; sleep 10
  done ) >"$work/rss.tsv" &
bench_pids+=($!)
at() { # wait until second $1 of the run
  local now; now=$(( $(date +%s) - started ))
  [ "$1" -gt "$now" ] && sleep $(( $1 - now ))
  return 0
}
log() { printf '%4ss  %s\n' "$(( $(date +%s) - started ))" "$*" | tee -a "$work/events.txt" >&2; }

# The chaos schedule, as fractions of the run; SIGHUP every sixth.
hup_every=$(( total / 6 ))
events() {
  local t
  for t in $(seq "$hup_every" "$hup_every" $(( total - hup_every / 2 ))); do echo "$t hup"; done
  echo "$(( total / 10 )) warm"
  echo "$(( total * 20 / 100 )) latency"
  echo "$(( total * 25 / 100 )) clear"
  echo "$(( total * 35 / 100 )) errors"
  echo "$(( total * 40 / 100 )) clear"
  echo "$(( total * 50 / 100 )) outage"
  echo "$(( total * 50 / 100 + outage )) restore"
  echo "$(( total * 70 / 100 )) hang"
  echo "$(( total * 75 / 100 )) clear"
  echo "$(( total * 80 / 100 )) mixed"
  echo "$(( total * 85 / 100 )) clear"
}
rss_warm=""
while read -r t what; do
  at "$t"
  case "$what" in
    hup) kill -HUP "$server_pid"; log "SIGHUP (reload)" ;;
    warm) rss_warm="$(rss_kb)"; log "warm-up over: RSS ${rss_warm} kB" ;;
    latency) faults '{"latency_us":{"C_Encrypt":20000,"C_Decrypt":20000}}'; log "latency spike: +20 ms on C_Encrypt/C_Decrypt" ;;
    errors) faults '{"errors":[{"functions":["C_Encrypt","C_Decrypt"],"ckr":"CKR_DEVICE_ERROR","probability":0.02},{"functions":["C_Encrypt"],"ckr":"CKR_GENERAL_ERROR","count":20}]}'; log "error burst: 2 % CKR_DEVICE_ERROR, 20 × CKR_GENERAL_ERROR" ;;
    outage) faults '{"removed":true,"after_restore":"reinit_required"}'; log "token removed (outage ${outage}s; the module must be re-initialised after)" ;;
    restore) faults '{"removed":false,"after_restore":"reinit_required"}'; log "token back" ;;
    hang) faults '{"hang":{"functions":["C_Encrypt","C_Decrypt"],"ms":6000,"count":3}}'; log "hang burst: 3 calls hang 6 s" ;;
    mixed) faults '{"latency_us":{"*":3000},"errors":[{"functions":["C_Decrypt"],"ckr":"CKR_SESSION_HANDLE_INVALID","probability":0.01}]}'; log "latency +3 ms everywhere, 1 % lost sessions" ;;
    clear) faults '{}'; log "faults cleared" ;;
  esac
done < <(events | sort -n -s -k1,1)

for p in "${bench_pids[@]::4}"; do wait "$p" || true; done
kill "${bench_pids[4]}" 2>/dev/null || true
bench_pids=()
sleep 1
rss_end="$(rss_kb)"
sessions_end="$(open_sessions)"
recoveries="$(curl -s "http://$admin/metrics" | grep '^ekm_hsm_recoveries_total' | tr '\n' ' ')"
replaced="$(metric ekm_hsm_workers_replaced_total)"
ready="$(curl -s -o /dev/null -w '%{http_code}' "http://$admin/readyz")"
# Graceful stop (SIGTERM writes the last checkpoint), then the chain across all its files.
faults '{}'
kill -TERM "$server_pid" 2>/dev/null || true
stopped=0
wait "$server_pid" 2>/dev/null || stopped=$?
server_pid=""
audit_rc=0
"$exe" audit verify --config "$cfg" >"$work/audit-verify.txt" 2>&1 || audit_rc=$?

status=0
python3 - "$work" "$minutes" "$outage" "$rss_start" "${rss_warm:-$rss_start}" "$rss_end" \
  "$sessions_start" "$sessions_end" "$ready" "$recoveries" "${replaced:-0}" "$profile" "$copies" \
  "$stopped" "$audit_rc" >"$work/report.md" <<'PY' || status=$?
import json, sys, pathlib
work, minutes, outage, rss0, rssw, rss1, s0, s1, ready, recov, replaced, profile, copies, stopped, audit_rc = sys.argv[1:]
work = pathlib.Path(work)
retryable = {"xks": {"500", "503", "429"}, "gcp": {"503", "504", "429"}}
rows, problems = [], []
tot_sent = tot_ok = tot_hung = 0
classes = {}
for s in ["encrypt", "decrypt", "gcp-wrap", "gcp-unwrap"]:
    text = (work / f"bench-{s}.json").read_text().strip().splitlines()
    if not text:
        problems.append(f"{s}: no benchmark output ({(work / f'bench-{s}.log').read_text()[-500:]})")
        continue
    r = json.loads(text[-1])
    lane = r.get("proxy") or {}
    ok = lane.get("requests", 0)
    errors = lane.get("errors", {})
    sent = ok + lane.get("error_total", 0)
    hung = errors.get("timeout", 0)
    front = "gcp" if s.startswith("gcp") else "xks"
    for k, n in errors.items():
        classes[f"{front} {k}"] = classes.get(f"{front} {k}", 0) + n
        if k != "timeout" and k not in retryable[front]:
            problems.append(f"{s}: {n} × {k} (not a retryable answer)")
    tot_sent += sent; tot_ok += ok; tot_hung += hung
    rows.append(f"| {s} | {sent} | {sent - hung - errors.get('transport', 0)} | {ok} | {json.dumps(errors, sort_keys=True)} | {hung} | {lane.get('latency_ms', {}).get('p99', '?')} |")
rss0, rssw, rss1 = int(rss0), int(rssw), int(rss1)
growth = (rss1 - rssw) / rssw * 100 if rssw else 0.0
if tot_hung: problems.append(f"{tot_hung} requests hung (no answer within 10 s)")
if growth >= 10: problems.append(f"RSS grew {growth:.1f} % after warm-up")
if s0 != s1: problems.append(f"sessions open on the token: {s0} at the start, {s1} at the end")
if ready != "200": problems.append(f"/readyz answered {ready} at the end")
if stopped != "0": problems.append(f"shutdown: the proxy exited with status {stopped} on SIGTERM")
audit_report = (work / "audit-verify.txt").read_text().strip()
if audit_rc != "0": problems.append(f"audit: `ekm-proxy audit verify` exit {audit_rc}: {audit_report[-800:]}")
print(f"# Soak report: {minutes} min, c=32, outage {outage} s ({profile} build, session_key_copies = {copies})\n")
print("| scenario | sent | answered | 200 | errors by class | hung | p99 ms (successes) |")
print("|---|---:|---:|---:|---|---:|---:|")
print("\n".join(rows))
print(f"\nTotal: {tot_sent} sent, {tot_sent - tot_hung} answered, {tot_ok} succeeded, {tot_hung} hung.")
print(f"Errors by class: {json.dumps(classes, sort_keys=True)}\n")
print(f"RSS: {rss0/1024:.1f} MiB at start, {rssw/1024:.1f} MiB after warm-up, {rss1/1024:.1f} MiB at the end "
      f"({growth:+.1f} % after warm-up).")
print(f"Sessions open on the token: {s0} at the start, {s1} at the end. /readyz at the end: {ready}.")
print(f"Recoveries: {recov.strip() or 'none'}; workers replaced: {replaced}.\n")
print("Audit chain after a graceful stop (`ekm-proxy audit verify`, MACs checked in the HSM):\n")
print("```\n" + audit_report + "\n```\n")
samples = [l.split("\t") for l in (work / "rss.tsv").read_text().splitlines() if l.count("\t") == 2]
if samples:
    step = max(1, len(samples) // 12)
    print("RSS over the run (s: MiB, threads): " + ", ".join(
        f"{t}: {int(k)/1024:.1f}, {n}" for t, k, n in samples[::step]) + "\n")
print("Events:\n")
print("```\n" + (work / "events.txt").read_text() + "```")
checks = 7  # hung, RSS, sessions, readiness, retryable answers, clean shutdown, audit chain
failed = len({p.split(":")[0] if ":" in p else p for p in problems}) if problems else 0
failed = min(failed, checks)
if problems:
    print("\n**FAILED:**\n" + "\n".join(f"- {p}" for p in problems))
else:
    print("\n**PASSED**: nothing hung, RSS flat after warm-up, no session leaked, every error retryable,\n"
          "clean shutdown, the audit chain verifies.")
print(f"\nsoak: {checks - failed} passed, {failed} failed")
sys.exit(1 if problems else 0)
PY
cat "$work/report.md"
[ -z "$report" ] || cp "$work/report.md" "$report"
exit $status
