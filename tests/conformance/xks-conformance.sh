#!/usr/bin/env bash
# Independent AWS KMS XKS Proxy API v1 conformance client.
#
# Talks to any XKS proxy over HTTPS with curl's built-in SigV4 signer (--aws-sigv4), checks HTTP
# status codes and errorName values against the XKS v1 spec, and prints one line per test plus a
# final "N passed, M failed" line. Exit status: 0 = all passed, 1 = some test failed,
# 2 = bad setup (missing tool, missing file, bad URL).
#
# Dependencies: bash >= 4, curl >= 7.75 (--aws-sigv4), openssl (base64, SHA-256, throwaway certs).
# No jq and no python: JSON answers are checked with bash regular expressions.
#
# Configuration (environment variables; defaults = the ekm-proxy dev profile):
#   XKS_URL               base URI up to and including /kms/xks/v1
#                         (default https://localhost:8443/dev-keystore/kms/xks/v1)
#   XKS_ACCESS_KEY_ID     SigV4 access key id        (default DEVXKSACCESSKEYIDABCD)
#   XKS_SECRET            SigV4 secret access key    (default the dev secret)
#   XKS_REGION            SigV4 region               (default us-east-1)
#   XKS_CA                CA bundle for the server certificate (default <repo>/certs/dev/ca.pem)
#   XKS_CLIENT_CERT       client certificate PEM (mTLS listener). When set together with
#   XKS_CLIENT_KEY        its key, the rejected-client-certificate cases run as well.
#   XKS_CLIENT_CA_KEY     optional: private key of the CA that issues client certificates (and
#   XKS_CLIENT_CA_CERT    its certificate, default XKS_CA). With it, certificates that chain to the
#                         trusted CA but are expired, not yet valid or for another subject are
#                         tested too (they must be rejected), next to a good one (accepted).
#   XKS_KEY               key with ENCRYPT+DECRYPT   (default dev-aes-1)
#   XKS_ENCRYPT_ONLY_KEY  key with ENCRYPT only      (default dev-aes-encrypt-only)
#   XKS_DECRYPT_ONLY_KEY  key with DECRYPT only      (default dev-aes-decrypt-only)
#   XKS_NO_USAGE_KEY      key with neither           (default dev-aes-no-usage)
#   XKS_CURL_OPTS         extra curl options, split on whitespace (e.g. "--resolve h:443:127.0.0.1")
#   XKS_VERBOSE=1         print every request's status and body
# Flags: -h/--help, -l/--list (list test names), and optional test-name filters (substring match),
#        e.g. `xks-conformance.sh encrypt_only mtls`.

set -u

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

XKS_URL="${XKS_URL:-https://localhost:8443/dev-keystore/kms/xks/v1}"
XKS_ACCESS_KEY_ID="${XKS_ACCESS_KEY_ID:-DEVXKSACCESSKEYIDABCD}"
XKS_SECRET="${XKS_SECRET:-devXksSecretAccessKeyNotForProductionUse0123456789}"
XKS_REGION="${XKS_REGION:-us-east-1}"
XKS_CA="${XKS_CA:-$REPO_ROOT/certs/dev/ca.pem}"
XKS_CLIENT_CERT="${XKS_CLIENT_CERT:-}"
XKS_CLIENT_KEY="${XKS_CLIENT_KEY:-}"
XKS_CLIENT_CA_KEY="${XKS_CLIENT_CA_KEY:-}"
XKS_CLIENT_CA_CERT="${XKS_CLIENT_CA_CERT:-$XKS_CA}"
XKS_KEY="${XKS_KEY:-dev-aes-1}"
XKS_ENCRYPT_ONLY_KEY="${XKS_ENCRYPT_ONLY_KEY:-dev-aes-encrypt-only}"
XKS_DECRYPT_ONLY_KEY="${XKS_DECRYPT_ONLY_KEY:-dev-aes-decrypt-only}"
XKS_NO_USAGE_KEY="${XKS_NO_USAGE_KEY:-dev-aes-no-usage}"
XKS_CURL_OPTS="${XKS_CURL_OPTS:-}"
XKS_VERBOSE="${XKS_VERBOSE:-0}"

SERVICE="kms-xks-proxy"

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

setup_error() { echo "xks-conformance: $*" >&2; exit 2; }

check_setup() {
  command -v curl >/dev/null || setup_error "curl not found (need curl >= 7.75 for --aws-sigv4)"
  command -v openssl >/dev/null || setup_error "openssl not found"
  local v major minor
  v="$(curl --version | head -n1 | awk '{print $2}')"
  major="${v%%.*}"; minor="${v#*.}"; minor="${minor%%.*}"
  if [ "$major" -lt 7 ] || { [ "$major" -eq 7 ] && [ "$minor" -lt 75 ]; }; then
    setup_error "curl $v is too old: --aws-sigv4 needs curl >= 7.75"
  fi
  [ -r "$XKS_CA" ] || setup_error "CA bundle XKS_CA=$XKS_CA is not readable"
  if [ -n "$XKS_CLIENT_CERT" ] || [ -n "$XKS_CLIENT_KEY" ]; then
    [ -r "$XKS_CLIENT_CERT" ] || setup_error "XKS_CLIENT_CERT=$XKS_CLIENT_CERT is not readable"
    [ -r "$XKS_CLIENT_KEY" ] || setup_error "XKS_CLIENT_KEY=$XKS_CLIENT_KEY is not readable"
  fi
  if [ -n "$XKS_CLIENT_CA_KEY" ]; then
    [ -r "$XKS_CLIENT_CA_KEY" ] || setup_error "XKS_CLIENT_CA_KEY=$XKS_CLIENT_CA_KEY is not readable"
    [ -r "$XKS_CLIENT_CA_CERT" ] || setup_error "XKS_CLIENT_CA_CERT=$XKS_CLIENT_CA_CERT is not readable"
  fi
  XKS_URL="${XKS_URL%/}"
  [[ "$XKS_URL" =~ ^(https?://[^/]+)(/.*)?/kms/xks/v1$ ]] \
    || setup_error "XKS_URL=$XKS_URL must look like https://host[:port][/prefix]/kms/xks/v1"
  ORIGIN="${BASH_REMATCH[1]}"
  BASE="$XKS_URL"
}

# ---------------------------------------------------------------------------------------------
# HTTP helpers. Every request sets: STATUS (HTTP code, 000 if none), CTYPE, BODY, CURL_RC, CURL_ERR.
# The signing identity comes from SIG_* and the client certificate from CERT_ARGS; tests run in
# subshells, so they may overwrite these freely.
# ---------------------------------------------------------------------------------------------

SIG_REGION="$XKS_REGION"
SIG_SERVICE="$SERVICE"
SIG_AKID="$XKS_ACCESS_KEY_ID"
SIG_SECRET="$XKS_SECRET"
SIGN=1                 # 0 = send the request unsigned
CERT_ARGS=()           # filled in main() from XKS_CLIENT_CERT / XKS_CLIENT_KEY
TLS_ARGS=()            # e.g. (--tlsv1.2 --tls-max 1.2)
EXTRA_HEADERS=()       # more -H arguments

STATUS=""; CTYPE=""; BODY=""; CURL_RC=0; CURL_ERR=""

# call METHOD URL [BODY]
call() {
  local method="$1" url="$2" data="${3-}"
  local args=(-sS --max-time 20 -o "$WORK/resp" -w '%{http_code} %{content_type}'
              --cacert "$XKS_CA" -X "$method" "${TLS_ARGS[@]}" "${CERT_ARGS[@]}")
  # shellcheck disable=SC2206
  local extra=($XKS_CURL_OPTS)
  args+=("${extra[@]}")
  if [ "$SIGN" = 1 ]; then
    # The credential goes through a config file, not argv, so `ps` does not show the secret.
    printf 'user = "%s:%s"\n' "$SIG_AKID" "$SIG_SECRET" >"$WORK/auth.cfg"
    args+=(--aws-sigv4 "aws:amz:$SIG_REGION:$SIG_SERVICE" -K "$WORK/auth.cfg")
  fi
  local h
  for h in "${EXTRA_HEADERS[@]}"; do args+=(-H "$h"); done
  if [ "$method" = POST ]; then
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
  if [ "$XKS_VERBOSE" = 1 ]; then
    echo "  > $method $url (curl rc $CURL_RC)" >&2
    echo "  < $STATUS $CTYPE $BODY" >&2
  fi
}

# post RELATIVE_PATH BODY   (relative to XKS_URL)
post() { call POST "$BASE/$1" "$2"; }

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

# expect_error HTTP_STATUS ERROR_NAME
expect_error() {
  expect_status "$1"
  expect_json
  local name
  name="$(json_str errorName)"
  [ "$name" = "$2" ] || fail "expected errorName $2, got '${name}'"
  if [[ "$BODY" =~ \"errorMessage\"[[:space:]]*: ]]; then
    local msg
    msg="$(json_str errorMessage)"
    [ "${#msg}" -lt 512 ] || fail "errorMessage is ${#msg} chars (must be < 512)"
    [[ "$msg" =~ ^[\ -~]*$ ]] || fail "errorMessage has non-printable or non-ASCII characters"
  fi
}

# expect_eq WHAT EXPECTED ACTUAL
expect_eq() { [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"; }

# The last request must have died in the TLS handshake, with no HTTP answer. curl reports that as
# 35 (handshake failed), 56 (TLS 1.3: the server's alert arrives on the first read), 55 (TLS 1.3:
# the server closed the connection before curl sent the request) or 98 (alert certificate_required).
# If curl names the alert, it must be one of ALERTS (curl/OpenSSL wording, e.g. "handshake failure").
# expect_handshake_rejected ALERT...
expect_handshake_rejected() {
  case "$CURL_RC" in
    35|55|56|98) ;;
    *) fail "expected the TLS handshake to fail (curl rc 35, 55, 56 or 98), got curl rc $CURL_RC" ;;
  esac
  [ "$STATUS" = 000 ] || fail "got an HTTP answer ($STATUS) although the client certificate must be rejected"
  if [[ "$CURL_ERR" == *" alert "* ]]; then
    local a
    for a in "$@"; do [[ "$CURL_ERR" == *"alert $a"* ]] && return 0; done
    fail "curl reports a TLS alert other than: $*"
  fi
}

# The alert the server sends, seen by openssl s_client (curl does not always report it on TLS 1.3).
# expect_server_alert TLS_VERSION(1.2|1.3) ALERT_NUMBER... (40 = handshake_failure, 116 = certificate_required)
expect_server_alert() {
  local ver="$1"; shift
  local hostport="${ORIGIN#*://}"
  [[ "$hostport" == *:* ]] || hostport="$hostport:443"
  local cert=()
  [ "${#CERT_ARGS[@]}" -eq 0 ] || cert=(-cert "${CERT_ARGS[1]}" -key "${CERT_ARGS[3]}")
  local out
  out="$(printf 'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n' \
    | timeout 20 openssl s_client -connect "$hostport" -servername "${hostport%:*}" -CAfile "$XKS_CA" \
        "-tls${ver/./_}" "${cert[@]}" -ign_eof 2>&1)"
  [[ "$out" =~ SSL\ alert\ number\ ([0-9]+) ]] \
    || { CURL_ERR="${out:0:800}"; fail "openssl s_client (TLS $ver): the server sent no TLS alert"; }
  local n="${BASH_REMATCH[1]}" a
  for a in "$@"; do [ "$n" = "$a" ] && return 0; done
  fail "TLS $ver: server sent alert number $n, expected one of: $*"
}

# ---------------------------------------------------------------------------------------------
# JSON and base64 helpers (no jq)
# ---------------------------------------------------------------------------------------------

# json_str FIELD -> the string value of "FIELD" in BODY (first occurrence), or empty.
json_str() {
  if [[ "$BODY" =~ \"$1\"[[:space:]]*:[[:space:]]*\"(([^\"\\]|\\.)*)\" ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
  fi
}
# json_has FIELD -> success if the key is present
json_has() { [[ "$BODY" =~ \"$1\"[[:space:]]*: ]]; }
# json_int FIELD -> integer value or empty
json_int() {
  if [[ "$BODY" =~ \"$1\"[[:space:]]*:[[:space:]]*(-?[0-9]+) ]]; then printf '%s' "${BASH_REMATCH[1]}"; fi
}
# json_str_array FIELD -> the array's string elements, sorted, comma-separated (e.g. DECRYPT,ENCRYPT)
json_str_array() {
  [[ "$BODY" =~ \"$1\"[[:space:]]*:[[:space:]]*\[([^]]*)\] ]] || { printf '<absent>'; return; }
  local inner="${BASH_REMATCH[1]}"
  inner="${inner//[[:space:]]/}"
  inner="${inner//\"/}"
  [ -n "$inner" ] || return 0
  printf '%s' "$inner" | tr ',' '\n' | LC_ALL=C sort | paste -sd, -
}

sha256_hex() { openssl dgst -sha256 | awk '{print $NF}'; }                          # stdin -> hex
hmac_hex() { printf '%s' "$2" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$1" | awk '{print $NF}'; }
b64e() { openssl base64 -A; }                        # stdin bytes -> base64
b64d() { printf '%s' "$1" | openssl base64 -d -A; }  # base64 arg -> stdout bytes
b64len() { b64d "$1" | wc -c | tr -d ' '; }          # decoded length of a base64 arg
rand_b64() { openssl rand "$1" | b64e; }             # N random bytes, base64
request_id() { local h; h="$(openssl rand -hex 16)"; echo "${h:0:8}-${h:8:4}-${h:12:4}-${h:16:4}-${h:20:12}"; }

# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------

PRINCIPAL="arn:aws:iam::123456789012:user/xks-conformance"
key_arn() { echo "arn:aws:kms:$XKS_REGION:123456789012:key/$(request_id)"; }

health_body() {
  printf '{"requestMetadata":{"kmsRequestId":"%s","kmsOperation":"KmsHealthCheck"}}' "$(request_id)"
}

# metadata_body [kmsOperation]
metadata_body() {
  local op="${1:-CreateKey}"
  if [ "$op" = DescribeKey ]; then   # pre-v1.0.3 clients also send kmsKeyArn
    printf '{"requestMetadata":{"awsPrincipalArn":"%s","kmsKeyArn":"%s","kmsOperation":"DescribeKey","kmsRequestId":"%s"}}' \
      "$PRINCIPAL" "$(key_arn)" "$(request_id)"
  else
    printf '{"requestMetadata":{"awsPrincipalArn":"%s","kmsOperation":"%s","kmsRequestId":"%s"}}' \
      "$PRINCIPAL" "$op" "$(request_id)"
  fi
}

crypto_metadata() { # crypto_metadata kmsOperation
  printf '{"awsPrincipalArn":"%s","kmsKeyArn":"%s","kmsOperation":"%s","kmsRequestId":"%s","kmsViaService":"ebs"}' \
    "$PRINCIPAL" "$(key_arn)" "$1" "$(request_id)"
}

# encrypt_body PLAINTEXT_B64 [AAD_B64|""] [CDIV_ALGO|""] [ALGORITHM]
encrypt_body() {
  local pt="$1" aad="${2-}" cdiv="${3-}" alg="${4:-AES_GCM}"
  local b
  b="$(printf '{"requestMetadata":%s,"plaintext":"%s","encryptionAlgorithm":"%s"' \
        "$(crypto_metadata GenerateDataKey)" "$pt" "$alg")"
  [ -z "$aad" ] || b+=",\"additionalAuthenticatedData\":\"$aad\""
  [ -z "$cdiv" ] || b+=",\"ciphertextDataIntegrityValueAlgorithm\":\"$cdiv\""
  printf '%s}' "$b"
}

# decrypt_body CIPHERTEXT IV TAG [AAD|""] [METADATA|""]
decrypt_body() {
  local ct="$1" iv="$2" tag="$3" aad="${4-}" md="${5-}"
  local b
  b="$(printf '{"requestMetadata":%s,"ciphertext":"%s","encryptionAlgorithm":"AES_GCM","initializationVector":"%s","authenticationTag":"%s"' \
        "$(crypto_metadata Decrypt)" "$ct" "$iv" "$tag")"
  [ -z "$aad" ] || b+=",\"additionalAuthenticatedData\":\"$aad\""
  [ -z "$md" ] || b+=",\"ciphertextMetadata\":\"$md\""
  printf '%s}' "$b"
}

# encrypt_ok KEY PLAINTEXT_B64 [AAD] [CDIV_ALGO]: encrypt, check the answer's shape and set
# CT, IV, TAG, MD (ciphertextMetadata, may be empty), CDIV.
encrypt_ok() {
  local key="$1" pt="$2" aad="${3-}" cdiv="${4-}"
  post "keys/$key/encrypt" "$(encrypt_body "$pt" "$aad" "$cdiv")"
  expect_status 200
  expect_json
  CT="$(json_str ciphertext)"; IV="$(json_str initializationVector)"
  TAG="$(json_str authenticationTag)"; MD="$(json_str ciphertextMetadata)"
  CDIV="$(json_str ciphertextDataIntegrityValue)"
  json_has ciphertext || fail "no ciphertext"
  [ -n "$IV" ] || fail "no initializationVector"
  [ -n "$TAG" ] || fail "no authenticationTag"
  expect_eq "ciphertext length (bytes)" "$(b64len "$pt")" "$(b64len "$CT")"
  local ivlen; ivlen="$(b64len "$IV")"
  [ "$ivlen" = 12 ] || [ "$ivlen" = 16 ] || fail "IV is $ivlen bytes (must be 12 or 16)"
  expect_eq "authenticationTag length (bytes)" 16 "$(b64len "$TAG")"
  [ "$(b64len "$MD")" -le 20 ] || fail "ciphertextMetadata is longer than 20 bytes"
  if [ -n "$cdiv" ]; then [ -n "$CDIV" ] || fail "CDIV requested but no ciphertextDataIntegrityValue"; fi
}

# A well-formed ciphertext that no key produced: 12-byte IV, 16-byte tag, 32 bytes of data.
garbage_decrypt_body() {
  decrypt_body "$(rand_b64 32)" "$(rand_b64 12)" "$(rand_b64 16)" "$(printf 'garbage' | b64e)"
}

# Flip the first base64 character of a value (keeps length and validity, changes the first byte).
tamper() {
  local v="$1" c="${1:0:1}" n=A
  [ "$c" != A ] || n=B
  printf '%s%s' "$n" "${v:1}"
}

# ---------------------------------------------------------------------------------------------
# Tests: GetHealthStatus
# ---------------------------------------------------------------------------------------------

test_health_ok() {
  post health "$(health_body)"
  expect_status 200
  expect_json
  local n; n="$(json_int xksProxyFleetSize)"
  [[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] || fail "xksProxyFleetSize missing or not > 0"
  local f
  for f in xksProxyVendor xksProxyModel ekmVendor; do json_has "$f" || fail "missing $f"; done
  [[ "$BODY" =~ \"ekmFleetDetails\"[[:space:]]*:[[:space:]]*\[[[:space:]]*\{ ]] || fail "ekmFleetDetails is not a non-empty array"
  local hs; hs="$(json_str healthStatus)"
  case "$hs" in ACTIVE|DEGRADED|UNAVAILABLE) ;; *) fail "healthStatus '$hs' is not ACTIVE|DEGRADED|UNAVAILABLE" ;; esac
  json_has id || fail "ekmFleetDetails[].id missing"
  json_has model || fail "ekmFleetDetails[].model missing"
}

test_health_ok_http1() {
  TLS_ARGS=(--http1.1)
  post health "$(health_body)"
  expect_status 200
  expect_json
}

test_health_other_operations() {
  local op
  for op in CreateCustomKeyStore ConnectCustomKeyStore UpdateCustomKeyStore SomeFutureOperation; do
    post health "$(printf '{"requestMetadata":{"kmsRequestId":"%s","kmsOperation":"%s"}}' "$(request_id)" "$op")"
    expect_status 200
  done
}

test_health_empty_body_object() {
  post health '{}'
  expect_error 400 ValidationException
}

test_health_empty_request_metadata() {
  post health '{"requestMetadata":{}}'
  expect_error 400 ValidationException
}

# ---------------------------------------------------------------------------------------------
# Tests: GetKeyMetadata
# ---------------------------------------------------------------------------------------------

# check_metadata KEY EXPECTED_SORTED_USAGE
check_metadata() {
  post "keys/$1/metadata" "$(metadata_body)"
  expect_status 200
  expect_json
  expect_eq keySpec AES_256 "$(json_str keySpec)"
  expect_eq keyUsage "$2" "$(json_str_array keyUsage)"
  expect_eq keyStatus ENABLED "$(json_str keyStatus)"
}

test_metadata_key() { check_metadata "$XKS_KEY" DECRYPT,ENCRYPT; }
test_metadata_encrypt_only_key() { check_metadata "$XKS_ENCRYPT_ONLY_KEY" ENCRYPT; }
test_metadata_decrypt_only_key() { check_metadata "$XKS_DECRYPT_ONLY_KEY" DECRYPT; }
test_metadata_no_usage_key() { check_metadata "$XKS_NO_USAGE_KEY" ""; }

test_metadata_legacy_describe_key() {
  post "keys/$XKS_KEY/metadata" "$(metadata_body DescribeKey)"
  expect_status 200
  expect_eq keySpec AES_256 "$(json_str keySpec)"
}

test_metadata_unknown_key() {
  post "keys/no-such-key-$(openssl rand -hex 4)/metadata" "$(metadata_body)"
  expect_error 404 KeyNotFoundException
}

test_metadata_empty_request_metadata() {
  post "keys/$XKS_KEY/metadata" '{"requestMetadata":{}}'
  expect_error 400 ValidationException
}

# ---------------------------------------------------------------------------------------------
# Tests: Encrypt / Decrypt
# ---------------------------------------------------------------------------------------------

test_round_trip() {
  local pt; pt="$(rand_b64 32)"
  encrypt_ok "$XKS_KEY" "$pt"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$TAG" "" "$MD")"
  expect_status 200
  expect_json
  expect_eq plaintext "$pt" "$(json_str plaintext)"
}

test_round_trip_with_aad() {
  local pt aad
  pt="$(rand_b64 48)"; aad="$(printf 'project=nile,department=marketing' | b64e)"
  encrypt_ok "$XKS_KEY" "$pt" "$aad"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$TAG" "$aad" "$MD")"
  expect_status 200
  expect_eq plaintext "$pt" "$(json_str plaintext)"
}

test_round_trip_spec_minimum_sizes() {
  # The spec requires support for >= 4300 bytes of plaintext and >= 8192 bytes of AAD.
  local pt aad
  pt="$(rand_b64 4300)"; aad="$(rand_b64 8192)"
  encrypt_ok "$XKS_KEY" "$pt" "$aad"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$TAG" "$aad" "$MD")"
  expect_status 200
  expect_eq plaintext "$pt" "$(json_str plaintext)"
}

test_encrypt_cdiv_sha256() {
  local pt aad expected
  pt="$(rand_b64 32)"; aad="$(rand_b64 40)"
  encrypt_ok "$XKS_KEY" "$pt" "$aad" SHA_256
  # CDIV = Base64(SHA-256(AAD || ciphertextMetadata || IV || ciphertext || tag)), decoded bytes.
  expected="$({ b64d "$aad"; b64d "$MD"; b64d "$IV"; b64d "$CT"; b64d "$TAG"; } \
              | openssl dgst -sha256 -binary | b64e)"
  expect_eq ciphertextDataIntegrityValue "$expected" "$CDIV"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$TAG" "$aad" "$MD")"
  expect_status 200
  expect_eq plaintext "$pt" "$(json_str plaintext)"
}

test_decrypt_wrong_aad() {
  local pt; pt="$(rand_b64 32)"
  encrypt_ok "$XKS_KEY" "$pt" "$(printf 'right aad' | b64e)"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$TAG" "$(printf 'wrong aad' | b64e)" "$MD")"
  expect_error 400 InvalidCiphertextException
}

test_decrypt_tampered_tag() {
  local pt aad; pt="$(rand_b64 32)"; aad="$(rand_b64 16)"
  encrypt_ok "$XKS_KEY" "$pt" "$aad"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$(tamper "$TAG")" "$aad" "$MD")"
  expect_error 400 InvalidCiphertextException
}

test_decrypt_tampered_ciphertext() {
  local pt aad; pt="$(rand_b64 32)"; aad="$(rand_b64 16)"
  encrypt_ok "$XKS_KEY" "$pt" "$aad"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$(tamper "$CT")" "$IV" "$TAG" "$aad" "$MD")"
  expect_error 400 InvalidCiphertextException
}

test_decrypt_tampered_iv() {
  local pt; pt="$(rand_b64 32)"
  encrypt_ok "$XKS_KEY" "$pt"
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$(tamper "$IV")" "$TAG" "" "$MD")"
  expect_error 400 InvalidCiphertextException
}

test_decrypt_tampered_metadata() {
  local pt; pt="$(rand_b64 32)"
  encrypt_ok "$XKS_KEY" "$pt"
  local md
  if [ -n "$MD" ]; then md="$(tamper "$MD")"; else md="$(printf 'x' | b64e)"; fi
  post "keys/$XKS_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$TAG" "" "$md")"
  expect_error 400 InvalidCiphertextException
}

test_encrypt_unknown_key() {
  post "keys/no-such-key-$(openssl rand -hex 4)/encrypt" "$(encrypt_body "$(rand_b64 32)")"
  expect_error 404 KeyNotFoundException
}

# ---------------------------------------------------------------------------------------------
# Tests: usage-restricted keys
# ---------------------------------------------------------------------------------------------

test_encrypt_only_key_encrypts() {
  encrypt_ok "$XKS_ENCRYPT_ONLY_KEY" "$(rand_b64 32)" "$(rand_b64 8)"
}

test_encrypt_only_key_refuses_cdiv() {
  # CDIV needs a verification decrypt, which an encrypt-only key does not allow.
  post "keys/$XKS_ENCRYPT_ONLY_KEY/encrypt" "$(encrypt_body "$(rand_b64 32)" "" SHA_256)"
  expect_error 400 InvalidKeyUsageException
}

test_encrypt_only_key_refuses_decrypt() {
  local aad; aad="$(rand_b64 8)"
  encrypt_ok "$XKS_ENCRYPT_ONLY_KEY" "$(rand_b64 32)" "$aad"
  post "keys/$XKS_ENCRYPT_ONLY_KEY/decrypt" "$(decrypt_body "$CT" "$IV" "$TAG" "$aad" "$MD")"
  expect_error 400 InvalidKeyUsageException
}

test_decrypt_only_key_refuses_encrypt() {
  post "keys/$XKS_DECRYPT_ONLY_KEY/encrypt" "$(encrypt_body "$(rand_b64 32)")"
  expect_error 400 InvalidKeyUsageException
}

test_decrypt_only_key_garbage_is_invalid_ciphertext() {
  # Usage is checked first; DECRYPT is allowed, so a well-formed forged ciphertext fails the tag check.
  post "keys/$XKS_DECRYPT_ONLY_KEY/decrypt" "$(garbage_decrypt_body)"
  expect_error 400 InvalidCiphertextException
}

test_no_usage_key_refuses_encrypt() {
  post "keys/$XKS_NO_USAGE_KEY/encrypt" "$(encrypt_body "$(rand_b64 32)")"
  expect_error 400 InvalidKeyUsageException
}

test_no_usage_key_refuses_decrypt() {
  post "keys/$XKS_NO_USAGE_KEY/decrypt" "$(garbage_decrypt_body)"
  expect_error 400 InvalidKeyUsageException
}

# ---------------------------------------------------------------------------------------------
# Tests: SigV4 authentication
# ---------------------------------------------------------------------------------------------

test_auth_wrong_secret() {
  SIG_SECRET="wrong${XKS_SECRET:5}"
  post health "$(health_body)"
  expect_error 401 AuthenticationFailedException
}

test_auth_unknown_access_key_id() {
  SIG_AKID="UNKNOWNACCESSKEYID2345"
  post health "$(health_body)"
  expect_error 401 AuthenticationFailedException
}

test_auth_other_region() {
  SIG_REGION="eu-west-3"
  [ "$XKS_REGION" != eu-west-3 ] || SIG_REGION="ap-southeast-2"
  post health "$(health_body)"
  expect_error 401 AuthenticationFailedException
}

test_auth_other_service() {
  SIG_SERVICE="kms"
  post health "$(health_body)"
  expect_error 401 AuthenticationFailedException
}

test_auth_unsigned() {
  SIGN=0
  post health "$(health_body)"
  expect_error 401 AuthenticationFailedException
}

test_auth_unsigned_encrypt() {
  SIGN=0
  post "keys/$XKS_KEY/encrypt" "$(encrypt_body "$(rand_b64 32)")"
  expect_error 401 AuthenticationFailedException
}

# An independent SigV4 signer (openssl HMAC), signing only host;x-amz-date as KMS does, with a
# date of our choosing (curl's own signer always uses "now"). Sets AUTH_HEADER.
# sigv4_sign AMZ_DATE PATH BODY
sigv4_sign() {
  local amz_date="$1" path="$2" body="$3"
  local day="${amz_date:0:8}" host="${ORIGIN#*://}"
  local scope="$day/$SIG_REGION/$SIG_SERVICE/aws4_request"
  local canonical string_to_sign k sig
  canonical="$(printf 'POST\n%s\n\nhost:%s\nx-amz-date:%s\n\nhost;x-amz-date\n%s' \
    "$path" "$host" "$amz_date" "$(printf '%s' "$body" | sha256_hex)")"
  string_to_sign="$(printf 'AWS4-HMAC-SHA256\n%s\n%s\n%s' "$amz_date" "$scope" \
    "$(printf '%s' "$canonical" | sha256_hex)")"
  k="$(printf '%s' "$day" | openssl dgst -sha256 -mac HMAC -macopt "key:AWS4$SIG_SECRET" | awk '{print $NF}')"
  k="$(hmac_hex "$k" "$SIG_REGION")"
  k="$(hmac_hex "$k" "$SIG_SERVICE")"
  k="$(hmac_hex "$k" aws4_request)"
  sig="$(hmac_hex "$k" "$string_to_sign")"
  AUTH_HEADER="Authorization: AWS4-HMAC-SHA256 Credential=$SIG_AKID/$scope, SignedHeaders=host;x-amz-date, Signature=$sig"
}

# amz_date_offset MINUTES -> X-Amz-Date that many minutes from now (negative = past)
amz_date_offset() {
  date -u -d "$1 minutes" +%Y%m%dT%H%M%SZ 2>/dev/null || date -u -v"${1}M" +%Y%m%dT%H%M%SZ
}

# hand_signed_post MINUTES_OFFSET REL SIGNED_BODY [SENT_BODY]
hand_signed_post() {
  local d; d="$(amz_date_offset "$1")"
  sigv4_sign "$d" "${BASE#"$ORIGIN"}/$2" "$3"
  SIGN=0
  TLS_ARGS+=(--http1.1)
  EXTRA_HEADERS=("X-Amz-Date: $d" "$AUTH_HEADER")
  post "$2" "${4-$3}"
}

test_auth_kms_style_signed_headers() {
  # Control for the tests below: host;x-amz-date only, current date -> accepted.
  hand_signed_post 0 health "$(health_body)"
  expect_status 200
}

test_auth_date_within_skew() {
  hand_signed_post -3 "keys/$XKS_KEY/metadata" "$(metadata_body)"
  expect_status 200
}

test_auth_stale_date() {
  hand_signed_post -10 health "$(health_body)"
  expect_error 401 AuthenticationFailedException
}

test_auth_future_date() {
  hand_signed_post +10 health "$(health_body)"
  expect_error 401 AuthenticationFailedException
}

test_auth_body_altered_after_signing() {
  local pt; pt="$(rand_b64 32)"
  local body; body="$(encrypt_body "$pt")"
  hand_signed_post 0 "keys/$XKS_KEY/encrypt" "$body" "${body/$pt/$(rand_b64 32)}"
  expect_error 401 AuthenticationFailedException
}

# ---------------------------------------------------------------------------------------------
# Tests: bad input
# ---------------------------------------------------------------------------------------------

test_malformed_json() {
  post "keys/$XKS_KEY/encrypt" '{"requestMetadata": {"kmsRequestId": "x", '
  expect_error 400 ValidationException
}

test_encrypt_bad_base64_plaintext() {
  post "keys/$XKS_KEY/encrypt" "$(encrypt_body 'not*base64!!')"
  expect_error 400 ValidationException
}

test_encrypt_wrong_algorithm() {
  post "keys/$XKS_KEY/encrypt" "$(encrypt_body "$(rand_b64 32)" "" "" AES_CBC)"
  expect_error 400 ValidationException
}

test_encrypt_wrong_cdiv_algorithm() {
  post "keys/$XKS_KEY/encrypt" "$(encrypt_body "$(rand_b64 32)" "" SHA_1)"
  expect_error 400 ValidationException
}

test_encrypt_missing_request_metadata() {
  post "keys/$XKS_KEY/encrypt" "{\"plaintext\":\"$(rand_b64 16)\",\"encryptionAlgorithm\":\"AES_GCM\"}"
  expect_error 400 ValidationException
}

test_unknown_fields_ignored() {
  local pt; pt="$(rand_b64 16)"
  post "keys/$XKS_KEY/encrypt" \
    "$(encrypt_body "$pt" | sed 's/"requestMetadata":{/"requestMetadata":{"someFutureField":"x",/; s/}$/,"anotherFutureField":[1,2]}/')"
  expect_status 200
}

# ---------------------------------------------------------------------------------------------
# Tests: URI paths and methods
# ---------------------------------------------------------------------------------------------

test_unknown_path_prefix() {
  call POST "$ORIGIN/no-such-prefix-$(openssl rand -hex 4)/kms/xks/v1/health" "$(health_body)"
  expect_error 404 InvalidUriPathException
}

test_unknown_operation_path() {
  post "keys/$XKS_KEY/sign" "$(metadata_body)"
  expect_error 404 InvalidUriPathException
}

test_get_on_health_is_405() {
  call GET "$BASE/health"
  expect_status 405
}

test_get_on_encrypt_is_405() {
  call GET "$BASE/keys/$XKS_KEY/encrypt"
  expect_status 405
}

# ---------------------------------------------------------------------------------------------
# Tests: mTLS client certificate rejection (only with XKS_CLIENT_CERT/XKS_CLIENT_KEY)
# ---------------------------------------------------------------------------------------------

# Subject CN of the configured (good) client certificate, so a forged one differs only in trust.
client_cn() {
  local s; s="$(openssl x509 -in "$XKS_CLIENT_CERT" -noout -subject -nameopt RFC2253 2>/dev/null)"
  if [[ "$s" =~ CN=([^,]+) ]]; then printf '%s' "${BASH_REMATCH[1]}"; else printf 'xks-client'; fi
}

# openssl config for throwaway certificates: a client certificate with the extensions a real one
# carries (subject CN = $1), and a CA.
write_openssl_conf() {
  cat >"$WORK/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $1
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:$1
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
EOF
}

# new_key FILE: a P-256 private key
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>"$WORK/openssl.err" \
  || fail "openssl genpkey failed: $(cat "$WORK/openssl.err")"; }

# A handshake with the current CERT_ARGS must be aborted on TLS 1.2 and on TLS 1.3, with a fatal
# handshake_failure alert (40) unless more alert numbers are given.
# expect_rejected_on_both_tls_versions [EXTRA_ALERT_NUMBER EXTRA_ALERT_NAME]
expect_rejected_on_both_tls_versions() {
  local nums=(40) names=("handshake failure") v
  if [ $# -ge 2 ]; then nums+=("$1"); names+=("$2"); fi
  for v in 1.2 1.3; do
    if [ "$v" = 1.2 ]; then TLS_ARGS=(--tlsv1.2 --tls-max 1.2); else TLS_ARGS=(--tlsv1.3); fi
    post health "$(health_body)"
    expect_handshake_rejected "${names[@]}"
    expect_server_alert "$v" "${nums[@]}"
  done
}

test_mtls_accepts_configured_client_cert() {
  local v
  for v in 1.2 1.3; do
    if [ "$v" = 1.2 ]; then TLS_ARGS=(--tlsv1.2 --tls-max 1.2); else TLS_ARGS=(--tlsv1.3); fi
    post health "$(health_body)"
    expect_status 200
  done
}

test_mtls_rejects_no_client_cert() {
  CERT_ARGS=()
  # rustls (like the AWS sample proxy) answers an empty Certificate message itself with
  # certificate_required (116), which RFC 8446 prescribes for TLS 1.3; accept it besides
  # handshake_failure.
  expect_rejected_on_both_tls_versions 116 "certificate required"
}

test_mtls_rejects_self_signed_client_cert() {
  write_openssl_conf "$(client_cn)"
  new_key "$WORK/self-key.pem"
  openssl req -x509 -new -config "$WORK/openssl.cnf" -extensions client_ext -days 2 \
    -key "$WORK/self-key.pem" -out "$WORK/self.pem" 2>"$WORK/openssl.err" \
    || fail "openssl could not make a self-signed certificate: $(cat "$WORK/openssl.err")"
  CERT_ARGS=(--cert "$WORK/self.pem" --key "$WORK/self-key.pem")
  expect_rejected_on_both_tls_versions
}

test_mtls_rejects_unknown_ca_client_cert() {
  write_openssl_conf "$(client_cn)"
  new_key "$WORK/uca-key.pem"
  new_key "$WORK/ucl-key.pem"
  openssl req -x509 -new -config "$WORK/openssl.cnf" -extensions ca_ext -days 2 \
    -subj "/CN=xks-conformance untrusted CA" -key "$WORK/uca-key.pem" -out "$WORK/uca.pem" \
    2>"$WORK/openssl.err" || fail "openssl could not make a CA: $(cat "$WORK/openssl.err")"
  openssl req -new -config "$WORK/openssl.cnf" -key "$WORK/ucl-key.pem" -out "$WORK/ucl.csr" \
    2>"$WORK/openssl.err" || fail "openssl could not make a CSR: $(cat "$WORK/openssl.err")"
  openssl x509 -req -in "$WORK/ucl.csr" -CA "$WORK/uca.pem" -CAkey "$WORK/uca-key.pem" \
    -set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$WORK/openssl.cnf" -extensions client_ext \
    -out "$WORK/ucl.pem" 2>"$WORK/openssl.err" \
    || fail "openssl could not issue the client certificate: $(cat "$WORK/openssl.err")"
  CERT_ARGS=(--cert "$WORK/ucl.pem" --key "$WORK/ucl-key.pem")
  expect_rejected_on_both_tls_versions
}

# issue_from_trusted_ca CN DAYS_FROM DAYS_TO OUT: a client certificate for CN from the trusted client
# CA (XKS_CLIENT_CA_CERT/KEY), valid from now+DAYS_FROM to now+DAYS_TO; writes OUT.pem, OUT-key.pem.
issue_from_trusted_ca() {
  local cn="$1" from="$2" to="$3" out="$4"
  write_openssl_conf "$cn"
  mkdir -p "$WORK/ca"; : >"$WORK/ca/index.txt"; openssl rand -hex 8 >"$WORK/ca/serial"
  cat >>"$WORK/openssl.cnf" <<EOF
[ca]
default_ca = xca
[xca]
database = $WORK/ca/index.txt
new_certs_dir = $WORK/ca
serial = $WORK/ca/serial
default_md = sha256
policy = policy_any
unique_subject = no
[policy_any]
commonName = supplied
EOF
  new_key "$out-key.pem"
  openssl req -new -config "$WORK/openssl.cnf" -key "$out-key.pem" -out "$out.csr" 2>"$WORK/openssl.err" \
    || fail "openssl could not make a CSR: $(cat "$WORK/openssl.err")"
  local start end
  start="$(date -u -d "$from days" +%Y%m%d%H%M%SZ 2>/dev/null || date -u -v"${from}d" +%Y%m%d%H%M%SZ)"
  end="$(date -u -d "$to days" +%Y%m%d%H%M%SZ 2>/dev/null || date -u -v"${to}d" +%Y%m%d%H%M%SZ)"
  openssl ca -batch -notext -config "$WORK/openssl.cnf" -cert "$XKS_CLIENT_CA_CERT" \
    -keyfile "$XKS_CLIENT_CA_KEY" -in "$out.csr" -out "$out.pem" -startdate "$start" -enddate "$end" \
    -extensions client_ext >/dev/null 2>"$WORK/openssl.err" \
    || fail "openssl ca could not issue the client certificate: $(cat "$WORK/openssl.err")"
  CERT_ARGS=(--cert "$out.pem" --key "$out-key.pem")
}

test_mtls_accepts_trusted_ca_cert_made_here() {
  # Control for the three tests below: same recipe, right subject, valid now -> accepted.
  issue_from_trusted_ca "$(client_cn)" -1 30 "$WORK/good"
  post health "$(health_body)"
  expect_status 200
}

test_mtls_rejects_expired_client_cert() {
  issue_from_trusted_ca "$(client_cn)" -30 -1 "$WORK/expired"
  expect_rejected_on_both_tls_versions
}

test_mtls_rejects_not_yet_valid_client_cert() {
  issue_from_trusted_ca "$(client_cn)" 1 30 "$WORK/future"
  expect_rejected_on_both_tls_versions
}

test_mtls_rejects_other_subject_client_cert() {
  issue_from_trusted_ca "not-an-allowed-client-$(openssl rand -hex 3)" -1 30 "$WORK/other"
  expect_rejected_on_both_tls_versions
}

# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------

TESTS=(
  test_health_ok test_health_ok_http1 test_health_other_operations
  test_health_empty_body_object test_health_empty_request_metadata
  test_metadata_key test_metadata_encrypt_only_key test_metadata_decrypt_only_key
  test_metadata_no_usage_key test_metadata_legacy_describe_key test_metadata_unknown_key
  test_metadata_empty_request_metadata
  test_round_trip test_round_trip_with_aad test_round_trip_spec_minimum_sizes
  test_encrypt_cdiv_sha256 test_decrypt_wrong_aad test_decrypt_tampered_tag
  test_decrypt_tampered_ciphertext test_decrypt_tampered_iv test_decrypt_tampered_metadata
  test_encrypt_unknown_key
  test_encrypt_only_key_encrypts test_encrypt_only_key_refuses_cdiv test_encrypt_only_key_refuses_decrypt
  test_decrypt_only_key_refuses_encrypt test_decrypt_only_key_garbage_is_invalid_ciphertext
  test_no_usage_key_refuses_encrypt test_no_usage_key_refuses_decrypt
  test_auth_wrong_secret test_auth_unknown_access_key_id test_auth_other_region
  test_auth_other_service test_auth_unsigned test_auth_unsigned_encrypt
  test_auth_kms_style_signed_headers test_auth_date_within_skew test_auth_stale_date test_auth_future_date
  test_auth_body_altered_after_signing
  test_malformed_json test_encrypt_bad_base64_plaintext test_encrypt_wrong_algorithm
  test_encrypt_wrong_cdiv_algorithm test_encrypt_missing_request_metadata test_unknown_fields_ignored
  test_unknown_path_prefix test_unknown_operation_path test_get_on_health_is_405 test_get_on_encrypt_is_405
)
MTLS_TESTS=(
  test_mtls_accepts_configured_client_cert test_mtls_rejects_no_client_cert
  test_mtls_rejects_self_signed_client_cert test_mtls_rejects_unknown_ca_client_cert
)
MTLS_CA_TESTS=(
  test_mtls_accepts_trusted_ca_cert_made_here test_mtls_rejects_expired_client_cert
  test_mtls_rejects_not_yet_valid_client_cert test_mtls_rejects_other_subject_client_cert
)

PASSED=0
FAILED=0

# run_test NAME: runs the test in a subshell (assertions exit it), prints PASS/FAIL and the reason.
run_test() {
  local name="$1" out rc=0
  out="$( ("$name") 2>&1 )" || rc=$?
  if [ "$rc" = 0 ]; then
    PASSED=$((PASSED + 1))
    printf 'PASS  %s\n' "${name#test_}"
    [ "$XKS_VERBOSE" != 1 ] || [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/      /'
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
  if [ -n "$XKS_CLIENT_CERT" ]; then
    all+=("${MTLS_TESTS[@]}")
    if [ -n "$XKS_CLIENT_CA_KEY" ]; then all+=("${MTLS_CA_TESTS[@]}"); fi
  fi
  if [ "$list" = 1 ]; then
    printf '%s\n' "${TESTS[@]#test_}" "${MTLS_TESTS[@]#test_}" "${MTLS_CA_TESTS[@]#test_}"
    exit 0
  fi

  check_setup
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/xks-conformance.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  if [ -n "$XKS_CLIENT_CERT" ]; then CERT_ARGS=(--cert "$XKS_CLIENT_CERT" --key "$XKS_CLIENT_KEY"); fi

  echo "XKS conformance: $XKS_URL (region $XKS_REGION, access key $XKS_ACCESS_KEY_ID, $(
    [ -n "$XKS_CLIENT_CERT" ] && echo "client certificate $XKS_CLIENT_CERT" || echo "no client certificate"))"
  local t
  for t in "${all[@]}"; do
    selected "$t" "${filters[@]}" && run_test "$t"
  done
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
}

main "$@"
