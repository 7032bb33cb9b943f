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
    args+=(--aws-sigv4 "aws:amz:$SIG_REGION:$SIG_SERVICE" --user "$SIG_AKID:$SIG_SECRET")
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

# Fails the TLS handshake: curl exit 35 (handshake) or 56 (TLS 1.3: alert read after the client's
# Finished) and no HTTP status; if curl names an alert it must be handshake_failure.
expect_handshake_rejected() {
  case "$CURL_RC" in
    35|56) ;;
    *) fail "expected the TLS handshake to fail (curl rc 35 or 56), got curl rc $CURL_RC" ;;
  esac
  [ "$STATUS" = 000 ] || fail "got an HTTP answer ($STATUS) although the certificate must be rejected"
  if [[ "$CURL_ERR" == *alert* ]] && [[ "$CURL_ERR" != *"alert handshake failure"* ]]; then
    fail "expected a fatal handshake_failure alert"
  fi
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
  [ -n "$n" ] && [ "$n" -gt 0 ] || fail "xksProxyFleetSize missing or not > 0"
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

test_auth_stale_date() {
  # curl signs with an X-Amz-Date the caller supplies; 10 minutes old is outside the +-5 min window.
  local d; d="$(date -u -d '-10 minutes' +%Y%m%dT%H%M%SZ 2>/dev/null)" \
    || d="$(date -u -v-10M +%Y%m%dT%H%M%SZ)"
  EXTRA_HEADERS=("X-Amz-Date: $d")
  post health "$(health_body)"
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

# Both TLS versions: 1.2 fails inside the handshake, 1.3 typically on the first read.
expect_rejected_on_both_tls_versions() {
  local v
  for v in 1.2 1.3; do
    if [ "$v" = 1.2 ]; then TLS_ARGS=(--tlsv1.2 --tls-max 1.2); else TLS_ARGS=(--tlsv1.3); fi
    post health "$(health_body)"
    expect_handshake_rejected
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
  expect_rejected_on_both_tls_versions
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
  test_auth_other_service test_auth_unsigned test_auth_unsigned_encrypt test_auth_stale_date
  test_malformed_json test_encrypt_bad_base64_plaintext test_encrypt_wrong_algorithm
  test_encrypt_wrong_cdiv_algorithm test_encrypt_missing_request_metadata test_unknown_fields_ignored
  test_unknown_path_prefix test_unknown_operation_path test_get_on_health_is_405 test_get_on_encrypt_is_405
)
MTLS_TESTS=(
  test_mtls_accepts_configured_client_cert test_mtls_rejects_no_client_cert
  test_mtls_rejects_self_signed_client_cert test_mtls_rejects_unknown_ca_client_cert
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
  if [ -n "$XKS_CLIENT_CERT" ]; then all+=("${MTLS_TESTS[@]}"); fi
  if [ "$list" = 1 ]; then printf '%s\n' "${all[@]#test_}" "${MTLS_TESTS[@]#test_}" | awk '!seen[$0]++'; exit 0; fi

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
