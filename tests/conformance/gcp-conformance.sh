#!/usr/bin/env bash
# Independent Google Cloud EKM wrap/unwrap conformance client.
#
# Signs its own RS256 ID tokens (JWTs) with openssl, calls `<key URI>:wrap` and `:unwrap` with
# curl, and checks HTTP statuses and google.rpc.Status bodies (`code`, `status`, and, unless
# GCP_CHECK_REASONS=0, the ekm-proxy ErrorInfo `reason`). Prints one line per test plus a final
# "N passed, M failed" line. Exit status: 0 = all passed, 1 = some test failed, 2 = bad setup
# (missing tool, missing file, bad URL).
#
# Dependencies: bash >= 4, curl, openssl (1.1 or 3.x). No jq, no python: tokens are assembled
# with openssl base64 + tr, signed with `openssl dgst -sha256 -sign`, and JSON answers are checked
# with bash regular expressions.
#
# Configuration (environment variables; defaults = the ekm-proxy dev profile):
#   GCP_URL            key URI prefix, without the key path (default https://localhost:8443/gcp/v0/keys)
#   GCP_KEY            key path that the token's service account may wrap and unwrap (default dev-aes-1)
#   GCP_CA             CA bundle for the server certificate (default <repo>/certs/dev/ca.pem)
#   GCP_SIGNER         RSA private key PEM the issuer's JWKS lists (default <repo>/certs/dev/jwt-signer.pem)
#   GCP_KID            its kid in the JWKS               (default dev-signer-1)
#   GCP_ISSUER         token `iss`                        (default https://accounts.google.com)
#   GCP_AUDIENCE       token `aud`                        (default https://localhost:8443)
#   GCP_EMAIL          allowed service account (`email`) (default service-123456789012@gcp-sa-ekms.iam.gserviceaccount.com)
#   GCP_REASON         an allowed KAJ reason              (default CUSTOMER_INITIATED_ACCESS)
#   GCP_DENIED_REASON  a refused KAJ reason; empty skips that test (default THIRD_PARTY_DATA_REQUEST)
#   GCP_HEALTH_CHECKS  1 = health checks without a reason are allowed; 0 skips those tests (default 1)
#   GCP_CHECK_REASONS  1 = also check ekm-proxy's ErrorInfo reasons; 0 = status only (default 1)
#   GCP_CURL_OPTS      extra curl options, split on whitespace (e.g. "--resolve h:443:127.0.0.1")
#   GCP_VERBOSE=1      print every request's status and body
# Flags: -h/--help, -l/--list (list test names), and optional test-name filters (substring match),
#        e.g. `gcp-conformance.sh round_trip token_`.

set -u

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

GCP_URL="${GCP_URL:-https://localhost:8443/gcp/v0/keys}"
GCP_KEY="${GCP_KEY:-dev-aes-1}"
GCP_CA="${GCP_CA:-$REPO_ROOT/certs/dev/ca.pem}"
GCP_SIGNER="${GCP_SIGNER:-$REPO_ROOT/certs/dev/jwt-signer.pem}"
GCP_KID="${GCP_KID:-dev-signer-1}"
GCP_ISSUER="${GCP_ISSUER:-https://accounts.google.com}"
GCP_AUDIENCE="${GCP_AUDIENCE:-https://localhost:8443}"
GCP_EMAIL="${GCP_EMAIL:-service-123456789012@gcp-sa-ekms.iam.gserviceaccount.com}"
GCP_REASON="${GCP_REASON:-CUSTOMER_INITIATED_ACCESS}"
GCP_DENIED_REASON="${GCP_DENIED_REASON-THIRD_PARTY_DATA_REQUEST}"
GCP_HEALTH_CHECKS="${GCP_HEALTH_CHECKS:-1}"
GCP_CHECK_REASONS="${GCP_CHECK_REASONS:-1}"
GCP_CURL_OPTS="${GCP_CURL_OPTS:-}"
GCP_VERBOSE="${GCP_VERBOSE:-0}"

RESOURCE="projects/conformance/locations/us-east1/keyRings/ring/cryptoKeys/key/cryptoKeyVersions/1"

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

setup_error() { echo "gcp-conformance: $*" >&2; exit 2; }

check_setup() {
  command -v curl >/dev/null || setup_error "curl not found"
  command -v openssl >/dev/null || setup_error "openssl not found"
  [ -r "$GCP_CA" ] || setup_error "CA bundle GCP_CA=$GCP_CA is not readable"
  [ -r "$GCP_SIGNER" ] || setup_error "signing key GCP_SIGNER=$GCP_SIGNER is not readable"
  openssl pkey -in "$GCP_SIGNER" -noout 2>/dev/null \
    || setup_error "GCP_SIGNER=$GCP_SIGNER is not a private key openssl can read"
  GCP_URL="${GCP_URL%/}"
  [[ "$GCP_URL" =~ ^https://[^/]+(/.*)?$ ]] || setup_error "GCP_URL=$GCP_URL must look like https://host[:port][/prefix]"
  case "$GCP_HEALTH_CHECKS$GCP_CHECK_REASONS" in 00|01|10|11) ;; *) setup_error "GCP_HEALTH_CHECKS and GCP_CHECK_REASONS are 0 or 1" ;; esac
}

# ---------------------------------------------------------------------------------------------
# HTTP helpers. Every request sets: STATUS (HTTP code, 000 if none), CTYPE, BODY, CURL_RC, CURL_ERR.
# Tests run in subshells, so they may change TOKEN freely.
# ---------------------------------------------------------------------------------------------

STATUS=""; CTYPE=""; BODY=""; CURL_RC=0; CURL_ERR=""
TOKEN=""      # bearer token of the next request; empty = no Authorization header

# call METHOD URL [BODY]
call() {
  local method="$1" url="$2" data="${3-}"
  local args=(-sS --max-time 20 -o "$WORK/resp" -w '%{http_code} %{content_type}'
              --cacert "$GCP_CA" -X "$method")
  # shellcheck disable=SC2206
  local extra=($GCP_CURL_OPTS)
  args+=("${extra[@]}")
  if [ -n "$TOKEN" ]; then
    # The token goes through a config file, not argv, so `ps` does not show it.
    printf 'header = "Authorization: Bearer %s"\n' "$TOKEN" >"$WORK/auth.cfg"
    args+=(-K "$WORK/auth.cfg")
  fi
  if [ "$method" != GET ]; then
    printf '%s' "$data" >"$WORK/req"
    args+=(-H 'Content-Type: application/json' --data-binary @"$WORK/req")
  fi
  : >"$WORK/resp"
  local out
  CURL_RC=0
  out="$(curl "${args[@]}" "$url" 2>"$WORK/err")" || CURL_RC=$?
  STATUS="${out%% *}"; CTYPE="${out#* }"
  [ -n "$STATUS" ] || STATUS=000
  BODY="$(cat "$WORK/resp")"
  CURL_ERR="$(cat "$WORK/err")"
  if [ "$GCP_VERBOSE" = 1 ]; then
    echo "  > $method $url (curl rc $CURL_RC)" >&2
    echo "  < $STATUS $CTYPE $BODY" >&2
  fi
}

# op KEY_PATH wrap|unwrap BODY
op() { call POST "$GCP_URL/$1:$2" "$3"; }

# ---------------------------------------------------------------------------------------------
# Assertions: on failure print why plus the last exchange and end the test (tests run in a subshell).
# ---------------------------------------------------------------------------------------------

fail() {
  echo "$*"
  echo "last response: HTTP $STATUS (curl rc $CURL_RC) content-type '$CTYPE'"
  [ -z "$BODY" ] || echo "body: ${BODY:0:600}"
  [ -z "$CURL_ERR" ] || echo "curl: $CURL_ERR"
  exit 1
}

expect_status() {
  [ "$CURL_RC" = 0 ] || fail "curl failed (rc $CURL_RC), expected HTTP $1"
  [ "$STATUS" = "$1" ] || fail "expected HTTP $1, got $STATUS"
}

expect_json() {
  [[ "$CTYPE" == application/json* ]] || fail "expected Content-Type application/json"
  [[ "$BODY" =~ ^[[:space:]]*\{.*\}[[:space:]]*$ ]] || fail "body is not a JSON object"
}

# The gRPC code of a google.rpc status name, and the HTTP status Google maps it to.
grpc_code() {
  case "$1" in
    INVALID_ARGUMENT) echo 3 ;; DEADLINE_EXCEEDED) echo 4 ;; NOT_FOUND) echo 5 ;;
    PERMISSION_DENIED) echo 7 ;; RESOURCE_EXHAUSTED) echo 8 ;; FAILED_PRECONDITION) echo 9 ;;
    UNIMPLEMENTED) echo 12 ;; INTERNAL) echo 13 ;; UNAVAILABLE) echo 14 ;; UNAUTHENTICATED) echo 16 ;;
    *) echo "?" ;;
  esac
}
http_of() {
  case "$1" in
    INVALID_ARGUMENT|FAILED_PRECONDITION) echo 400 ;; UNAUTHENTICATED) echo 401 ;;
    PERMISSION_DENIED) echo 403 ;; NOT_FOUND) echo 404 ;; RESOURCE_EXHAUSTED) echo 429 ;;
    INTERNAL) echo 500 ;; UNIMPLEMENTED) echo 501 ;; UNAVAILABLE) echo 503 ;; DEADLINE_EXCEEDED) echo 504 ;;
    *) echo "?" ;;
  esac
}

# expect_error STATUS_NAME [ERRORINFO_REASON]: the HTTP status of STATUS_NAME and a google.rpc.Status
# body with that `status`, its gRPC `code` and a printable `message` of reasonable length; with
# GCP_CHECK_REASONS=1 also the ErrorInfo reason. The body must never echo the bearer token.
expect_error() {
  expect_status "$(http_of "$1")"
  expect_json
  expect_eq status "$1" "$(json_str status)"
  expect_eq code "$(grpc_code "$1")" "$(json_int code)"
  local msg; msg="$(json_str message)"
  [ -n "$msg" ] || fail "no message"
  [ "${#msg}" -lt 1024 ] || fail "message is ${#msg} chars"
  [[ "$msg" =~ ^[\ -~]*$ ]] || fail "message has non-printable or non-ASCII characters"
  if [ -n "${2-}" ] && [ "$GCP_CHECK_REASONS" = 1 ]; then
    [[ "$BODY" =~ google\.rpc\.ErrorInfo ]] || fail "no google.rpc.ErrorInfo detail"
    expect_eq "ErrorInfo reason" "$2" "$(json_str reason)"
  fi
  if [ -n "$TOKEN" ]; then
    local sig="${TOKEN##*.}"
    [ "${#sig}" -lt 16 ] || [[ "$BODY" != *"$sig"* ]] || fail "the error body echoes the token"
  fi
}

# expect_eq WHAT EXPECTED ACTUAL
expect_eq() { [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"; }

# ---------------------------------------------------------------------------------------------
# JSON, base64 and JWT helpers (no jq)
# ---------------------------------------------------------------------------------------------

# json_str FIELD -> the string value of "FIELD" in BODY (first occurrence), or empty.
json_str() {
  if [[ "$BODY" =~ \"$1\"[[:space:]]*:[[:space:]]*\"(([^\"\\]|\\.)*)\" ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
  fi
}
# json_int FIELD -> integer value or empty
json_int() {
  if [[ "$BODY" =~ \"$1\"[[:space:]]*:[[:space:]]*(-?[0-9]+) ]]; then printf '%s' "${BASH_REMATCH[1]}"; fi
}

b64e() { openssl base64 -A; }                               # stdin bytes -> base64
b64d() { printf '%s' "$1" | openssl base64 -d -A; }         # base64 arg -> stdout bytes
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }  # stdin bytes -> base64url, unpadded
hex() { od -An -v -tx1 | tr -d ' \n'; }                     # stdin bytes -> lowercase hex

now() { date +%s; }

# claims [EXTRA_JSON_MEMBERS] -> the good claim set plus members given as JSON text (new names
# only: a duplicate name makes the JSON ambiguous, and strict verifiers refuse it; to change a
# member use claims_set, to drop one claims_without).
claims() {
  local t; t="$(now)"
  local c
  c="$(printf '"iss":"%s","aud":"%s","sub":"1234567890","email":"%s","email_verified":true,"iat":%s,"exp":%s,"jti":"%s"' \
    "$GCP_ISSUER" "$GCP_AUDIENCE" "$GCP_EMAIL" "$t" "$((t + 3600))" "$(openssl rand -hex 8)")"
  [ -z "${1-}" ] || c+=",$1"
  printf '{%s}' "$c"
}

# claims_set NAME VALUE_JSON [CLAIMS_JSON] -> the claims (default: the good ones) with NAME's
# value replaced (not duplicated)
claims_set() {
  local c="${3:-$(claims)}"
  c="$(printf '%s' "$c" | sed -E "s/\"$1\":(\"[^\"]*\"|[^,}]*)/\"$1\":$(printf '%s' "$2" | sed 's/[&/\]/\\&/g')/")"
  printf '%s' "$c"
}

# claims_without NAME -> good claims without NAME
claims_without() {
  claims | sed -E "s/\"$1\":(\"[^\"]*\"|[^,}]*),?//; s/,}/}/"
}

# header [ALG] [KID|-] -> JOSE header JSON (KID "-" = no kid)
header() {
  local alg="${1:-RS256}" kid="${2:-$GCP_KID}"
  if [ "$kid" = - ]; then
    printf '{"alg":"%s","typ":"JWT"}' "$alg"
  else
    printf '{"alg":"%s","kid":"%s","typ":"JWT"}' "$alg" "$kid"
  fi
}

# rs256 KEY_PEM HEADER_JSON CLAIMS_JSON -> compact JWS signed with RSASSA-PKCS1-v1_5 SHA-256
rs256() {
  local h p s
  h="$(printf '%s' "$2" | b64url)"
  p="$(printf '%s' "$3" | b64url)"
  s="$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -sign "$1" -binary | b64url)"
  [ -n "$s" ] || setup_error "openssl could not sign with $1"
  printf '%s.%s.%s' "$h" "$p" "$s"
}

# hs256 SECRET_FILE HEADER_JSON CLAIMS_JSON -> compact JWS with HMAC-SHA256 keyed by the file's bytes
hs256() {
  local h p s
  h="$(printf '%s' "$2" | b64url)"
  p="$(printf '%s' "$3" | b64url)"
  s="$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$(hex <"$1")" -binary | b64url)"
  printf '%s.%s.%s' "$h" "$p" "$s"
}

# good_token -> a fresh, valid token
good_token() { rs256 "$GCP_SIGNER" "$(header)" "$(claims)"; }

# Change one character in the middle of a base64/base64url string (same length, still decodable,
# and every bit of that character is significant).
tamper_middle() {
  local v="$1" i=$(( ${#1} / 2 ))
  local c="${v:$i:1}" n=A
  [ "$c" != A ] || n=B
  printf '%s%s%s' "${v:0:$i}" "$n" "${v:$((i + 1))}"
}

# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------

# context [REASON|""] [HEALTH(true|false)] -> additionalContext JSON (REASON "" = no accessReasonContext)
context() {
  local reason="${1-$GCP_REASON}" health="${2:-false}"
  local c
  c="$(printf '"fullResourceName":"//cloudkms.googleapis.com/%s","relativeResourceName":"%s"' "$RESOURCE" "$RESOURCE")"
  [ -z "$reason" ] || c+="$(printf ',"accessReasonContext":{"reason":"%s"}' "$reason")"
  [ "$health" != true ] || c+=',"isKeyHealthCheck":true'
  printf '{%s}' "$c"
}

# wrap_body PLAINTEXT_B64 [AAD_B64|""] [CONTEXT_JSON]
wrap_body() {
  local b
  b="$(printf '{"keyPath":"%s","plaintext":"%s","additionalContext":%s' "$GCP_KEY" "$1" "${3:-$(context)}")"
  [ -z "${2-}" ] || b+="$(printf ',"additionalAuthenticatedData":"%s"' "$2")"
  printf '%s}' "$b"
}

# unwrap_body BLOB_B64 [AAD_B64|""] [CONTEXT_JSON]
unwrap_body() {
  local b
  b="$(printf '{"keyPath":"%s","wrappedBlob":"%s","additionalContext":%s' "$GCP_KEY" "$1" "${3:-$(context)}")"
  [ -z "${2-}" ] || b+="$(printf ',"additionalAuthenticatedData":"%s"' "$2")"
  printf '%s}' "$b"
}

# wrap_ok PLAINTEXT_B64 [AAD_B64] [CONTEXT]: wrap with a good token, check the answer, set BLOB.
wrap_ok() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap "$(wrap_body "$@")"
  expect_status 200
  expect_json
  BLOB="$(json_str wrappedBlob)"
  [ -n "$BLOB" ] || fail "no wrappedBlob"
  b64d "$BLOB" >/dev/null 2>&1 || fail "wrappedBlob is not base64"
  [ "$BLOB" != "$1" ] || fail "wrappedBlob equals the plaintext"
}

# unwrap_ok BLOB_B64 EXPECTED_PLAINTEXT_B64 [AAD_B64] [CONTEXT]
unwrap_ok() {
  local blob="$1" expected="$2"; shift 2
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$blob" "$@")"
  expect_status 200
  expect_json
  local pt; pt="$(json_str plaintext)"
  expect_eq "plaintext (hex)" "$(b64d "$expected" | hex)" "$(b64d "$pt" | hex)"
}

# A blob wrapped at the start of a test that needs one, with AAD "conformance".
AAD_B64="$(printf 'conformance' | b64e)"
PT_B64="$(printf 'a Cloud KMS ciphertext stands in here' | b64e)"

# ---------------------------------------------------------------------------------------------
# Tests: wrap / unwrap
# ---------------------------------------------------------------------------------------------

test_round_trip() {
  wrap_ok "$PT_B64"
  unwrap_ok "$BLOB" "$PT_B64"
}

test_round_trip_with_aad() {
  wrap_ok "$PT_B64" "$AAD_B64"
  unwrap_ok "$BLOB" "$PT_B64" "$AAD_B64"
}

test_round_trip_binary_plaintext() {
  local pt; pt="$(openssl rand 4096 | b64e)"
  wrap_ok "$pt"
  unwrap_ok "$BLOB" "$pt"
}

test_wraps_are_randomized() {
  wrap_ok "$PT_B64"; local first="$BLOB"
  wrap_ok "$PT_B64"
  [ "$first" != "$BLOB" ] || fail "two wraps of the same plaintext gave the same blob"
}

test_snake_case_request() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap "$(printf '{"key_path":"%s","plaintext":"%s","additional_authenticated_data":"%s","additional_context":{"relative_resource_name":"%s","access_reason_context":{"reason":"%s"}}}' \
    "$GCP_KEY" "$PT_B64" "$AAD_B64" "$RESOURCE" "$GCP_REASON")"
  expect_status 200
  BLOB="$(json_str wrappedBlob)"
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(printf '{"wrapped_blob":"%s","additional_authenticated_data":"%s","additional_context":{"access_reason_context":{"reason":"%s"}}}' \
    "$BLOB" "$AAD_B64" "$GCP_REASON")"
  expect_status 200
  expect_eq "plaintext" "$PT_B64" "$(json_str plaintext)"
}

test_unknown_fields_ignored() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap "$(printf '{"plaintext":"%s","somethingNew":{"a":[1,2]},"additionalContext":{"accessReasonContext":{"reason":"%s","future":1},"newContextField":"x"}}' \
    "$PT_B64" "$GCP_REASON")"
  expect_status 200
  expect_json
}

test_numeric_reason() {
  TOKEN="$(good_token)"
  # 5 = CUSTOMER_INITIATED_ACCESS
  op "$GCP_KEY" wrap "$(printf '{"plaintext":"%s","additionalContext":{"accessReasonContext":{"reason":5}}}' "$PT_B64")"
  expect_status 200
}

test_wrong_aad_refused() {
  wrap_ok "$PT_B64" "$AAD_B64"
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$BLOB" "$(printf 'other' | b64e)")"
  expect_error INVALID_ARGUMENT UNWRAP_FAILED
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$BLOB")"
  expect_error INVALID_ARGUMENT UNWRAP_FAILED
}

test_tampered_blob_refused() {
  wrap_ok "$PT_B64"
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$(tamper_middle "$BLOB")")"
  expect_error INVALID_ARGUMENT UNWRAP_FAILED
  # Last byte (inside the GCM tag): decode, flip, re-encode.
  local h; h="$(b64d "$BLOB" | hex)"
  local last="${h: -2}" flipped
  flipped="$(printf '%02x' $(( 0x$last ^ 0x01 )))"
  h="${h:0:${#h}-2}$flipped"
  local bad
  bad="$(printf '%s' "$h" | sed 's/../\\x&/g' | { read -r esc; printf '%b' "$esc"; } | b64e)"
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$bad")"
  expect_error INVALID_ARGUMENT UNWRAP_FAILED
  # The genuine blob still opens.
  unwrap_ok "$BLOB" "$PT_B64"
}

test_garbage_blob_refused() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$(openssl rand 64 | b64e)")"
  expect_error INVALID_ARGUMENT
}

test_unknown_key_path() {
  TOKEN="$(good_token)"
  op "no-such-key-$(openssl rand -hex 4)" wrap "$(printf '{"plaintext":"%s","additionalContext":%s}' "$PT_B64" "$(context)")"
  expect_error NOT_FOUND KEY_NOT_FOUND
}

test_key_path_mismatch() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap "$(printf '{"keyPath":"some-other-key","plaintext":"%s","additionalContext":%s}' "$PT_B64" "$(context)")"
  expect_error INVALID_ARGUMENT INVALID_FIELD
}

test_malformed_json() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap '{"plaintext": '
  expect_error INVALID_ARGUMENT MALFORMED_REQUEST
}

test_bad_base64_plaintext() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap "$(wrap_body 'not*base64!')"
  expect_error INVALID_ARGUMENT INVALID_FIELD
}

test_get_is_refused() {
  TOKEN="$(good_token)"
  call GET "$GCP_URL/$GCP_KEY:wrap"
  [ "$CURL_RC" = 0 ] || fail "curl failed (rc $CURL_RC)"
  [ "$STATUS" != 200 ] || fail "GET on :wrap answered 200"
  [[ "$STATUS" =~ ^(4|5)[0-9][0-9]$ ]] || fail "GET on :wrap answered $STATUS"
  expect_json
  [ -n "$(json_str status)" ] || fail "no google.rpc status"
}

# ---------------------------------------------------------------------------------------------
# Tests: Key Access Justifications and health checks
# ---------------------------------------------------------------------------------------------

test_disallowed_reason_refused() {
  wrap_ok "$PT_B64"
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap "$(wrap_body "$PT_B64" "" "$(context "$GCP_DENIED_REASON")")"
  expect_error PERMISSION_DENIED ACCESS_DENIED
  [[ "$BODY" == *"$GCP_DENIED_REASON"* ]] || fail "the denial does not name the reason"
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$BLOB" "" "$(context "$GCP_DENIED_REASON")")"
  expect_error PERMISSION_DENIED ACCESS_DENIED
}

test_health_check_round_trip() {
  wrap_ok "$PT_B64" "" "$(context "" true)"
  unwrap_ok "$BLOB" "$PT_B64" "" "$(context "" true)"
}

test_health_check_cannot_unwrap_real_blob() {
  wrap_ok "$PT_B64"
  TOKEN="$(good_token)"
  op "$GCP_KEY" unwrap "$(unwrap_body "$BLOB" "" "$(context "" true)")"
  expect_error INVALID_ARGUMENT HEALTH_CHECK_BLOB_REQUIRED
}

# ---------------------------------------------------------------------------------------------
# Tests: tokens
# ---------------------------------------------------------------------------------------------

# refused_token TOKEN ERRORINFO_REASON: a wrap with TOKEN is 401 UNAUTHENTICATED
refused_token() {
  TOKEN="$1"
  op "$GCP_KEY" wrap "$(wrap_body "$PT_B64")"
  expect_error UNAUTHENTICATED "$2"
}

test_token_good_token_accepted() {
  TOKEN="$(good_token)"
  op "$GCP_KEY" wrap "$(wrap_body "$PT_B64")"
  expect_status 200
}

test_token_missing() {
  TOKEN=""
  op "$GCP_KEY" wrap "$(wrap_body "$PT_B64")"
  expect_error UNAUTHENTICATED MISSING_TOKEN
}

test_token_forged_with_another_key() {
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/forger.pem" 2>/dev/null \
    || setup_error "openssl genpkey failed"
  refused_token "$(rs256 "$WORK/forger.pem" "$(header)" "$(claims)")" BAD_SIGNATURE
}

test_token_signature_altered() {
  local t; t="$(good_token)"
  refused_token "${t%.*}.$(tamper_middle "${t##*.}")" BAD_SIGNATURE
}

test_token_claims_altered_after_signing() {
  local good h sig other
  good="$(good_token)"; h="${good%%.*}"; sig="${good##*.}"
  other="$(printf '%s' "$(claims_set email '"attacker@evil.example"')" | b64url)"
  refused_token "$h.$other.$sig" BAD_SIGNATURE
}

test_token_alg_none() {
  local h p
  h="$(header none | b64url)"; p="$(claims | b64url)"
  refused_token "$h.$p." ALGORITHM_NOT_ALLOWED
}

test_token_hs256_keyed_with_public_key() {
  openssl pkey -in "$GCP_SIGNER" -pubout -out "$WORK/public.pem" 2>/dev/null || setup_error "openssl pkey -pubout failed"
  refused_token "$(hs256 "$WORK/public.pem" "$(header HS256)" "$(claims)")" ALGORITHM_NOT_ALLOWED
  openssl pkey -in "$GCP_SIGNER" -pubout -outform DER -out "$WORK/public.der" 2>/dev/null || setup_error "openssl pkey -pubout failed"
  refused_token "$(hs256 "$WORK/public.der" "$(header HS256)" "$(claims)")" ALGORITHM_NOT_ALLOWED
}

test_token_expired() {
  local t c; t="$(now)"
  c="$(claims_set exp "$((t - 3600))" "$(claims_set iat "$((t - 7200))")")"
  refused_token "$(rs256 "$GCP_SIGNER" "$(header)" "$c")" EXPIRED
}

test_token_not_yet_valid() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header)" "$(claims "\"nbf\":$(( $(now) + 3600 ))")")" NOT_YET_VALID
}

test_token_wrong_audience() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header)" "$(claims_set aud '"https://not-this-ekm.example"')")" WRONG_AUDIENCE
}

test_token_wrong_issuer() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header)" "$(claims_set iss '"https://issuer.evil.example"')")" WRONG_ISSUER
}

test_token_unknown_kid() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header RS256 "no-such-kid-$(openssl rand -hex 4)")" "$(claims)")" UNKNOWN_KID
}

test_token_missing_kid() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header RS256 -)" "$(claims)")" MISSING_KID
}

test_token_missing_email() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header)" "$(claims_without email)")" MISSING_EMAIL
}

test_token_email_not_verified() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header)" "$(claims_set email_verified false)")" EMAIL_NOT_VERIFIED
}

test_token_wrong_email() {
  refused_token "$(rs256 "$GCP_SIGNER" "$(header)" "$(claims_set email '"someone@example.com"')")" EMAIL_NOT_ALLOWED
}

TESTS=(
  test_round_trip test_round_trip_with_aad test_round_trip_binary_plaintext test_wraps_are_randomized
  test_snake_case_request test_unknown_fields_ignored test_numeric_reason
  test_wrong_aad_refused test_tampered_blob_refused test_garbage_blob_refused
  test_unknown_key_path test_key_path_mismatch test_malformed_json test_bad_base64_plaintext
  test_get_is_refused
  test_token_good_token_accepted test_token_missing test_token_forged_with_another_key
  test_token_signature_altered test_token_claims_altered_after_signing test_token_alg_none
  test_token_hs256_keyed_with_public_key test_token_expired test_token_not_yet_valid
  test_token_wrong_audience test_token_wrong_issuer test_token_unknown_kid test_token_missing_kid
  test_token_missing_email test_token_email_not_verified test_token_wrong_email
)
DENIED_REASON_TESTS=(test_disallowed_reason_refused)
HEALTH_TESTS=(test_health_check_round_trip test_health_check_cannot_unwrap_real_blob)

PASSED=0
FAILED=0

# run_test NAME: runs the test in a subshell (assertions exit it), prints PASS/FAIL and the reason.
run_test() {
  local name="$1" out rc=0
  out="$( ("$name") 2>&1 )" || rc=$?
  if [ "$rc" = 0 ]; then
    PASSED=$((PASSED + 1))
    printf 'PASS  %s\n' "${name#test_}"
    [ "$GCP_VERBOSE" != 1 ] || [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/      /'
  else
    FAILED=$((FAILED + 1))
    printf 'FAIL  %s\n' "${name#test_}"
    [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/      /'
  fi
}

selected() { # selected NAME FILTERS...
  local name="$1"; shift
  [ $# -eq 0 ] && return 0
  local f
  for f in "$@"; do [[ "$name" == *"$f"* ]] && return 0; done
  return 1
}

main() {
  local filters=() list=0
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      -l|--list) list=1 ;;
      *) filters+=("$1") ;;
    esac
    shift
  done
  local all=("${TESTS[@]}")
  [ -z "$GCP_DENIED_REASON" ] || all+=("${DENIED_REASON_TESTS[@]}")
  [ "$GCP_HEALTH_CHECKS" != 1 ] || all+=("${HEALTH_TESTS[@]}")
  if [ "$list" = 1 ]; then
    printf '%s\n' "${TESTS[@]#test_}" "${DENIED_REASON_TESTS[@]#test_}" "${HEALTH_TESTS[@]#test_}"
    exit 0
  fi

  check_setup
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gcp-conformance.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT

  echo "Cloud EKM conformance: $GCP_URL/$GCP_KEY (iss $GCP_ISSUER, aud $GCP_AUDIENCE, kid $GCP_KID, email $GCP_EMAIL)"
  local t
  for t in "${all[@]}"; do
    selected "$t" "${filters[@]}" && run_test "$t"
  done
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
}

main "$@"
