#!/usr/bin/env bash
# Independent Azure Managed HSM EKM Proxy API 0.1-preview conformance client.
#
# Calls `POST <prefix>/info`, `<prefix>/<key>/metadata`, `/wrapkey` and `/unwrapkey`
# (?api-version=0.1-preview) with curl over mutual TLS, and checks HTTP statuses and the API's
# `{code, message}` error bodies. Expectations are computed here: wrapped lengths (RFC 3394,
# RFC 5649, RSA modulus), and RSA-OAEP interoperability (openssl encrypts a DEK to the public key
# rebuilt from the `n`/`e` the proxy reports; the proxy must unwrap it). The algorithms to test
# are learned from /info's `supported_algorithms`; an algorithm it does not list must be refused
# with a 400 that names it. Prints one line per test plus a final "N passed, M failed" line.
# Exit status: 0 = all passed, 1 = some test failed, 2 = bad setup (missing tool, missing file,
# bad URL).
#
# Dependencies: bash >= 4, curl, openssl (1.1 or 3.x). No jq, no python: the RSA public key is
# assembled with `openssl asn1parse -genconf`, base64url with openssl base64 + tr, and JSON
# answers are checked with bash regular expressions.
#
# Configuration (environment variables; defaults = the ekm-proxy dev profile):
#   AZURE_URL          base URI: origin and path prefix (default https://localhost:9443/azure)
#   AZURE_CA           CA bundle for the server certificate (default <repo>/certs/dev/ca.pem)
#   AZURE_CERT         client certificate PEM the prefix accepts (default <repo>/certs/dev/client.pem)
#   AZURE_KEY          its private key                 (default <repo>/certs/dev/client-key.pem)
#   AZURE_AES_KEY      AES-256 key with wrap/unwrap; empty skips AES tests (default dev-aes-kek-1)
#   AZURE_RSA_KEY      RSA key (2048/3072/4096); empty skips RSA tests     (default dev-rsa-1)
#   AZURE_POOL         request_context.pool_name       (default dev-pool)
#   AZURE_NO_CERT_URL  optional: the same prefix on a listener that does not ask for a client
#                      certificate (e.g. https://localhost:8443/azure); requests there without
#                      one must get 401 Unauthorized. Empty skips that test (default empty)
#   AZURE_KEK_KEY      optional: an AES-256 wrap/unwrap key whose value the tester knows, given
#   AZURE_KEK_HEX      as 64 hex digits in AZURE_KEK_HEX; enables known-answer tests (A256KW and
#                      A256KWP computed with openssl enc -id-aes256-wrap[-pad], and the RFC 3394
#                      §4.6 vector when it is the RFC's KEK). Empty skips them (default empty)
#   AZURE_NO_WRAP_KEY  optional: an exposed key whose HSM attributes allow neither wrap nor unwrap
#                      (dev profile: dev-aes-no-usage); its metadata must not offer wrapKey or
#                      unwrapKey if those are then refused. Empty skips that test (default empty)
#   AZURE_ALGORITHMS   algorithms expected to work, space- or comma-separated (default: learned
#                      from /info's supported_algorithms; all four if /info does not list any)
#   AZURE_CURL_OPTS    extra curl options, split on whitespace (e.g. "--resolve h:443:127.0.0.1")
#   AZURE_VERBOSE=1    print every request's status and body
# Flags: -h/--help, -l/--list (list test names), and optional test-name filters (substring match),
#        e.g. `azure-conformance.sh rsa_oaep mtls_`.

set -u

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

AZURE_URL="${AZURE_URL:-https://localhost:9443/azure}"
AZURE_CA="${AZURE_CA:-$REPO_ROOT/certs/dev/ca.pem}"
AZURE_CERT="${AZURE_CERT:-$REPO_ROOT/certs/dev/client.pem}"
AZURE_KEY="${AZURE_KEY:-$REPO_ROOT/certs/dev/client-key.pem}"
AZURE_AES_KEY="${AZURE_AES_KEY-dev-aes-kek-1}"
AZURE_RSA_KEY="${AZURE_RSA_KEY-dev-rsa-1}"
AZURE_POOL="${AZURE_POOL:-dev-pool}"
AZURE_NO_CERT_URL="${AZURE_NO_CERT_URL:-}"
AZURE_NO_WRAP_KEY="${AZURE_NO_WRAP_KEY:-}"
AZURE_KEK_KEY="${AZURE_KEK_KEY:-}"
AZURE_KEK_HEX="${AZURE_KEK_HEX:-}"
AZURE_ALGORITHMS="${AZURE_ALGORITHMS:-}"
AZURE_CURL_OPTS="${AZURE_CURL_OPTS:-}"
AZURE_VERBOSE="${AZURE_VERBOSE:-0}"

API_VERSION="0.1-preview"
# RFC 3394 §4.6: 256 bits of key data wrapped with a 256-bit KEK.
RFC3394_KEK="000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
RFC3394_DATA="00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f"
RFC3394_WRAPPED="28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21"
ALL_ALGS=(A256KW A256KWP RSA-OAEP RSA-OAEP-256)
SUPPORTED=()   # filled in main()

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

setup_error() { echo "azure-conformance: $*" >&2; exit 2; }

check_setup() {
  command -v curl >/dev/null || setup_error "curl not found"
  command -v openssl >/dev/null || setup_error "openssl not found"
  [ -r "$AZURE_CA" ] || setup_error "CA bundle AZURE_CA=$AZURE_CA is not readable"
  [ -r "$AZURE_CERT" ] || setup_error "client certificate AZURE_CERT=$AZURE_CERT is not readable"
  [ -r "$AZURE_KEY" ] || setup_error "client key AZURE_KEY=$AZURE_KEY is not readable"
  openssl x509 -in "$AZURE_CERT" -noout 2>/dev/null \
    || setup_error "AZURE_CERT=$AZURE_CERT is not a certificate openssl can read"
  openssl pkey -in "$AZURE_KEY" -noout 2>/dev/null \
    || setup_error "AZURE_KEY=$AZURE_KEY is not a private key openssl can read"
  AZURE_URL="${AZURE_URL%/}"
  [[ "$AZURE_URL" =~ ^(https://[^/]+)/[^?#]+$ ]] \
    || setup_error "AZURE_URL=$AZURE_URL must look like https://host[:port]/prefix"
  ORIGIN="${BASH_REMATCH[1]}"
  AZURE_NO_CERT_URL="${AZURE_NO_CERT_URL%/}"
  if [ -n "$AZURE_NO_CERT_URL" ]; then
    [[ "$AZURE_NO_CERT_URL" =~ ^https://[^/]+/[^?#]+$ ]] \
      || setup_error "AZURE_NO_CERT_URL=$AZURE_NO_CERT_URL must look like https://host[:port]/prefix"
  fi
  local k
  for k in "$AZURE_AES_KEY" "$AZURE_RSA_KEY" "$AZURE_NO_WRAP_KEY" "$AZURE_KEK_KEY"; do
    [ -z "$k" ] || [[ "$k" =~ ^[A-Za-z0-9-]{1,64}$ ]] \
      || setup_error "key identifier '$k' is not 1 to 64 characters of A-Z a-z 0-9 -"
  done
  if [ -n "$AZURE_KEK_KEY$AZURE_KEK_HEX" ]; then
    [ -n "$AZURE_KEK_KEY" ] || setup_error "AZURE_KEK_HEX is set but AZURE_KEK_KEY is empty"
    [[ "$AZURE_KEK_HEX" =~ ^[0-9A-Fa-f]{64}$ ]] || setup_error "AZURE_KEK_HEX must be 64 hex digits (an AES-256 key)"
    AZURE_KEK_HEX="${AZURE_KEK_HEX,,}"
    printf '0123456789abcdef' | openssl enc -id-aes256-wrap -K "$AZURE_KEK_HEX" -iv A6A6A6A6A6A6A6A6 >/dev/null 2>&1 \
      || setup_error "this openssl cannot compute AES key wrap (openssl enc -id-aes256-wrap); unset AZURE_KEK_KEY"
  fi
  [ -n "$AZURE_AES_KEY$AZURE_RSA_KEY" ] || setup_error "AZURE_AES_KEY and AZURE_RSA_KEY are both empty"
  [[ "$AZURE_POOL" =~ ^[\ -~]+$ && "$AZURE_POOL" != *[\"\\]* ]] \
    || setup_error "AZURE_POOL must be printable ASCII without quotes or backslashes"
  if [ -n "$AZURE_ALGORITHMS" ]; then
    local a
    for a in ${AZURE_ALGORITHMS//,/ }; do
      known_alg "$a" || setup_error "AZURE_ALGORITHMS: '$a' is not one of ${ALL_ALGS[*]}"
    done
  fi
}

known_alg() { local a; for a in "${ALL_ALGS[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
supported() { local a; for a in "${SUPPORTED[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
is_rsa_alg() { [[ "$1" == RSA-* ]]; }
# alg_key ALG -> the configured key that algorithm applies to (may be empty)
alg_key() { if is_rsa_alg "$1"; then printf '%s' "$AZURE_RSA_KEY"; else printf '%s' "$AZURE_AES_KEY"; fi; }

# ---------------------------------------------------------------------------------------------
# HTTP helpers. Every request sets: STATUS (HTTP code, 000 if none), CTYPE, BODY, CURL_RC, CURL_ERR.
# The client certificate comes from CERT_ARGS; tests run in subshells, so they may change it.
# ---------------------------------------------------------------------------------------------

CERT_ARGS=()           # filled in main() from AZURE_CERT / AZURE_KEY
TLS_ARGS=()            # e.g. (--tlsv1.2 --tls-max 1.2)
SENT_VALUE=""          # the last `value` sent; error bodies must not echo it

STATUS=""; CTYPE=""; BODY=""; CURL_RC=0; CURL_ERR=""; LAST_REQ=""

# call METHOD URL [BODY]
call() {
  local method="$1" url="$2" data="${3-}"
  local args=(-sS --max-time 20 -o "$WORK/resp" -w '%{http_code} %{content_type}'
              --cacert "$AZURE_CA" -X "$method" "${TLS_ARGS[@]}" "${CERT_ARGS[@]}")
  # shellcheck disable=SC2206
  local extra=($AZURE_CURL_OPTS)
  args+=("${extra[@]}")
  if [ "$method" != GET ]; then
    printf '%s' "$data" >"$WORK/req"
    args+=(-H 'Content-Type: application/json' --data-binary @"$WORK/req")
  fi
  : >"$WORK/resp"
  LAST_REQ="$method ${url#"$ORIGIN"}"
  local out
  CURL_RC=0
  out="$(curl "${args[@]}" "$url" 2>"$WORK/err")" || CURL_RC=$?
  STATUS="${out%% *}"; CTYPE="${out#* }"
  [ -n "$STATUS" ] || STATUS=000
  BODY="$(cat "$WORK/resp")"
  CURL_ERR="$(cat "$WORK/err")"
  if [ "$AZURE_VERBOSE" = 1 ]; then
    echo "  > $method $url (curl rc $CURL_RC)" >&2
    echo "  < $STATUS $CTYPE $BODY" >&2
  fi
}

# api PATH BODY [QUERY]: POST to AZURE_URL/PATH?QUERY (default api-version=0.1-preview; "" = none)
api() {
  local query="${3-api-version=$API_VERSION}"
  call POST "$AZURE_URL/$1${query:+?$query}" "$2"
}

# ---------------------------------------------------------------------------------------------
# Assertions: on failure print why plus the last exchange and end the test (tests run in a subshell).
# ---------------------------------------------------------------------------------------------

fail() {
  echo "$*"
  echo "last request: $LAST_REQ"
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

# expect_eq WHAT EXPECTED ACTUAL
expect_eq() { [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"; }

# The HTTP status the API gives each error code.
status_of() {
  case "$1" in
    InvalidRequest) echo 400 ;; Unauthorized) echo 401 ;; Forbidden) echo 403 ;;
    KeyNotFound|NotFound) echo 404 ;; MethodNotAllowed) echo 405 ;; TooManyRequests) echo 429 ;;
    InternalError) echo 500 ;; ServiceUnavailable) echo 503 ;; GatewayTimeout) echo 504 ;;
    *) echo "?" ;;
  esac
}

# expect_error CODE [TEXT]: the HTTP status of CODE and a `{code, message}` body with that code
# and a short printable message (containing TEXT, if given). The body must not echo the value sent.
expect_error() {
  expect_status "$(status_of "$1")"
  expect_json
  expect_eq code "$1" "$(json_str code)"
  local msg; msg="$(json_str message)"
  [ -n "$msg" ] || fail "no message"
  [ "${#msg}" -lt 1024 ] || fail "message is ${#msg} chars"
  [[ "$msg" =~ ^[\ -~]*$ ]] || fail "message has non-printable or non-ASCII characters"
  [ -z "${2-}" ] || [[ "$msg" == *"$2"* ]] || fail "the message does not name '$2'"
  [ "${#SENT_VALUE}" -lt 16 ] || [[ "$BODY" != *"$SENT_VALUE"* ]] || fail "the error body echoes the value sent"
}

# The last request must have died in the TLS handshake, with no HTTP answer and a TLS alert from
# the server. curl reports that as 35 (handshake failed), 56 (TLS 1.3: the server's alert arrives
# on the first read) or 98 (alert certificate_required), and names the alert; 55 (TLS 1.3: the
# server closed the connection before curl could send the request or read the alert) is accepted
# without one. The alert must be one of ALERTS (curl/OpenSSL wording, e.g. "handshake failure").
# expect_handshake_rejected ALERT...
expect_handshake_rejected() {
  case "$CURL_RC" in
    35|55|56|98) ;;
    *) fail "expected the TLS handshake to fail (curl rc 35, 55, 56 or 98), got curl rc $CURL_RC" ;;
  esac
  [ "$STATUS" = 000 ] || fail "got an HTTP answer ($STATUS) although the client certificate must be refused"
  if [[ "$CURL_ERR" =~ alert\ ([a-z][a-z\ ]*[a-z]) ]]; then
    local got="${BASH_REMATCH[1]}" a
    for a in "$@"; do [ "$got" = "$a" ] && return 0; done
    fail "the server sent the TLS alert '$got'; expected one of: $*"
  fi
  [ "$CURL_RC" = 55 ] || fail "curl reports no TLS alert from the server"
}

# Alerts a server may send for a certificate it does not trust (rustls sends handshake_failure).
UNTRUSTED_ALERTS=("handshake failure" "bad certificate" "unknown ca" "certificate unknown" "access denied")

# ---------------------------------------------------------------------------------------------
# JSON, base64url and hex helpers (no jq)
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
# json_str_array FIELD -> the array's string elements in order, comma-separated; <absent> if none
json_str_array() {
  [[ "$BODY" =~ \"$1\"[[:space:]]*:[[:space:]]*\[([^]]*)\] ]] || { printf '<absent>'; return; }
  local inner="${BASH_REMATCH[1]}"
  inner="${inner//[[:space:]]/}"
  inner="${inner//\"/}"
  printf '%s' "$inner"
}
# sorted_csv CSV -> the same elements, sorted
sorted_csv() { [ -z "$1" ] || printf '%s' "$1" | tr ',' '\n' | LC_ALL=C sort | paste -sd, -; }

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }  # stdin bytes -> base64url, unpadded
# is_b64url STR -> success if STR is unpadded base64url (RFC 7515 §2)
is_b64url() { [[ "$1" =~ ^[A-Za-z0-9_-]*$ ]] && [ $(( ${#1} % 4 )) != 1 ]; }
# b64url_dec STR -> stdout bytes
b64url_dec() {
  local s="${1//-/+}"
  s="${s//_//}"
  while [ $(( ${#s} % 4 )) != 0 ]; do s+="="; done
  printf '%s' "$s" | openssl base64 -d -A
}
b64url_len() { b64url_dec "$1" | wc -c | tr -d ' '; }         # decoded length
hex() { od -An -v -tx1 | tr -d ' \n'; }                        # stdin bytes -> lowercase hex
unhex() { printf '%b' "$(printf '%s' "$1" | sed 's/../\\x&/g')"; }  # hex arg -> stdout bytes
hex_to_b64url() { unhex "$1" | b64url; }
# rand_file N FILE: N random bytes
rand_file() { openssl rand -out "$2" "$1" 2>/dev/null || fail "openssl rand failed"; }
file_b64url() { b64url <"$1"; }

# flip_byte HEX INDEX [MASK] -> HEX with byte INDEX xor MASK (default 01)
flip_byte() {
  local h="$1" i=$(( $2 * 2 )) m="${3:-01}"
  printf '%s%02x%s' "${h:0:$i}" $(( 0x${h:$i:2} ^ 0x$m )) "${h:$((i + 2))}"
}

uuid() { local h; h="$(openssl rand -hex 16)"; echo "${h:0:8}-${h:8:4}-${h:12:4}-${h:16:4}-${h:20:12}"; }

# ---------------------------------------------------------------------------------------------
# Request bodies and operations
# ---------------------------------------------------------------------------------------------

ctx() { printf '{"request_id":"%s","correlation_id":"%s","pool_name":"%s"}' "$(uuid)" "$(uuid)" "$AZURE_POOL"; }
ctx_body() { printf '{"request_context":%s}' "$(ctx)"; }
# wrap_body ALG VALUE_B64URL
wrap_body() { printf '{"request_context":%s,"alg":"%s","value":"%s"}' "$(ctx)" "$1" "$2"; }

# key_op KEY wrapkey|unwrapkey ALG VALUE_B64URL
key_op() {
  SENT_VALUE="$4"
  api "$1/$2" "$(wrap_body "$3" "$4")"
  LAST_REQ+=" (alg '$3', value of ${#4} characters)"
}

# expect_value -> the `value` of a 200 answer (checked to be unpadded base64url), in VALUE
expect_value() {
  expect_status 200
  expect_json
  json_has value || fail "no value"
  VALUE="$(json_str value)"
  is_b64url "$VALUE" || fail "value is not unpadded base64url"
}

# wrap_ok KEY ALG FILE: wrap the file's bytes; sets WRAPPED (base64url).
wrap_ok() {
  key_op "$1" wrapkey "$2" "$(file_b64url "$3")"
  expect_value
  WRAPPED="$VALUE"
  [ -n "$WRAPPED" ] || fail "$2 wrap gave an empty value"
  [ "$WRAPPED" != "$SENT_VALUE" ] || fail "$2 wrap gave back the plaintext"
}

# unwrap_ok KEY ALG WRAPPED_B64URL EXPECTED_FILE
unwrap_ok() {
  key_op "$1" unwrapkey "$2" "$3"
  expect_value
  expect_eq "$2 unwrapped value (hex)" "$(hex <"$4")" "$(b64url_dec "$VALUE" | hex)"
}

# refused KEY wrapkey|unwrapkey ALG VALUE_B64URL [TEXT]: 400 InvalidRequest (naming TEXT)
refused() { key_op "$1" "$2" "$3" "$4"; expect_error InvalidRequest "${5-}"; }

# Expected wrapped lengths, computed here: RFC 3394 adds one 64-bit block; RFC 5649 pads to whole
# blocks and adds one; RSA gives the modulus length.
kw_len() { echo $(( $1 + 8 )); }
kwp_len() { echo $(( ($1 + 7) / 8 * 8 + 8 )); }

# ---------------------------------------------------------------------------------------------
# RSA: the public key rebuilt from n and e, and OAEP encryption with openssl
# ---------------------------------------------------------------------------------------------

# rsa_setup: metadata of AZURE_RSA_KEY; sets RSA_N, RSA_E, RSA_BITS, RSA_LEN (bytes) and writes
# $WORK/rsa-pub.pem (SubjectPublicKeyInfo DER assembled with asn1parse -genconf).
rsa_setup() {
  api "$AZURE_RSA_KEY/metadata" "$(ctx_body)"
  expect_status 200
  expect_json
  RSA_N="$(json_str n)"; RSA_E="$(json_str e)"; RSA_BITS="$(json_int key_size)"
  [ -n "$RSA_N" ] || fail "metadata of $AZURE_RSA_KEY has no n"
  [ -n "$RSA_E" ] || fail "metadata of $AZURE_RSA_KEY has no e"
  is_b64url "$RSA_N" || fail "n is not unpadded base64url"
  is_b64url "$RSA_E" || fail "e is not unpadded base64url"
  [[ "$RSA_BITS" =~ ^(2048|3072|4096)$ ]] || fail "key_size '$RSA_BITS' is not 2048, 3072 or 4096"
  RSA_LEN=$(( RSA_BITS / 8 ))
  cat >"$WORK/rsa.cnf" <<EOF
asn1 = SEQUENCE:spki
[spki]
algorithm = SEQUENCE:rsa_alg
key = BITWRAP,SEQUENCE:rsa_key
[rsa_alg]
oid = OID:rsaEncryption
params = NULL
[rsa_key]
n = INTEGER:0x$(b64url_dec "$RSA_N" | hex)
e = INTEGER:0x$(b64url_dec "$RSA_E" | hex)
EOF
  openssl asn1parse -genconf "$WORK/rsa.cnf" -out "$WORK/rsa-pub.der" -noout >/dev/null 2>"$WORK/openssl.err" \
    || fail "openssl asn1parse could not encode n/e: $(cat "$WORK/openssl.err")"
  openssl pkey -pubin -inform DER -in "$WORK/rsa-pub.der" -out "$WORK/rsa-pub.pem" 2>"$WORK/openssl.err" \
    || fail "openssl does not accept n/e as an RSA public key: $(cat "$WORK/openssl.err")"
}

oaep_md() { if [ "$1" = RSA-OAEP-256 ]; then echo sha256; else echo sha1; fi; }
oaep_hlen() { if [ "$1" = RSA-OAEP-256 ]; then echo 32; else echo 20; fi; }
# Largest OAEP plaintext (RFC 8017 §7.1.1): k - 2 hLen - 2
oaep_max() { echo $(( RSA_LEN - 2 * $(oaep_hlen "$1") - 2 )); }

# oaep_seal OAEP_MD MGF1_MD IN OUT: RSAES-OAEP encryption to $WORK/rsa-pub.pem with openssl
oaep_seal() {
  openssl pkeyutl -encrypt -pubin -inkey "$WORK/rsa-pub.pem" -in "$3" -out "$4" \
    -pkeyopt rsa_padding_mode:oaep -pkeyopt "rsa_oaep_md:$1" -pkeyopt "rsa_mgf1_md:$2" \
    2>"$WORK/openssl.err" || fail "openssl pkeyutl OAEP ($1/$2) failed: $(cat "$WORK/openssl.err")"
}

# ---------------------------------------------------------------------------------------------
# Tests: info and metadata
# ---------------------------------------------------------------------------------------------

test_info_ok() {
  api info "$(ctx_body)"
  expect_status 200
  expect_json
  expect_eq api_version "$API_VERSION" "$(json_str api_version)"
  local f
  for f in proxy_vendor proxy_name ekm_vendor ekm_product; do
    [ -n "$(json_str "$f")" ] || fail "$f is missing or not a non-empty string"
  done
  # supported_algorithms is ekm-proxy's addition to the API's fields: checked when present.
  local algs; algs="$(json_str_array supported_algorithms)"
  if [ "$algs" = "<absent>" ]; then
    ! json_has supported_algorithms || fail "supported_algorithms is not an array of strings"
    echo "note: no supported_algorithms in /info"
    return 0
  fi
  [ -n "$algs" ] || fail "supported_algorithms is empty"
  local a seen=","
  for a in ${algs//,/ }; do
    known_alg "$a" || fail "supported_algorithms lists '$a', not one of ${ALL_ALGS[*]}"
    [[ "$seen" != *",$a,"* ]] || fail "supported_algorithms lists $a twice"
    seen+="$a,"
  done
}

test_info_request_id_optional() {
  api info "$(printf '{"request_context":{"correlation_id":"%s","pool_name":"%s"}}' "$(uuid)" "$AZURE_POOL")"
  expect_status 200
  expect_eq api_version "$API_VERSION" "$(json_str api_version)"
}

test_metadata_aes_key() {
  api "$AZURE_AES_KEY/metadata" "$(ctx_body)"
  expect_status 200
  expect_json
  expect_eq key_type oct "$(json_str key_type)"
  expect_eq key_size 256 "$(json_int key_size)"
  expect_eq key_ops "unwrapKey,wrapKey" "$(sorted_csv "$(json_str_array key_ops)")"
  ! json_has n || fail "an oct key has n"
  ! json_has e || fail "an oct key has e"
}

test_metadata_rsa_key() {
  rsa_setup
  expect_eq key_type RSA "$(json_str key_type)"
  expect_eq key_ops "unwrapKey,wrapKey" "$(sorted_csv "$(json_str_array key_ops)")"
  expect_eq "e" AQAB "$RSA_E"
  local nhex; nhex="$(b64url_dec "$RSA_N" | hex)"
  expect_eq "n length (bytes)" "$RSA_LEN" "$(( ${#nhex} / 2 ))"
  (( 0x${nhex:0:2} >= 0x80 )) || fail "n has a leading zero byte or is shorter than key_size bits"
  (( 0x${nhex: -2} % 2 == 1 )) || fail "n is even"
  local text; text="$(openssl pkey -pubin -in "$WORK/rsa-pub.pem" -noout -text 2>&1)"
  [[ "$text" == *"($RSA_BITS bit)"* ]] || fail "openssl sees another key size: ${text:0:80}"
  [[ "$text" == *"Exponent: 65537 "* ]] || fail "openssl sees another exponent"
}

test_metadata_unknown_key() {
  api "no-such-key-$(openssl rand -hex 4)/metadata" "$(ctx_body)"
  expect_error KeyNotFound
}

# ---------------------------------------------------------------------------------------------
# Tests: AES key wrap (A256KW, RFC 3394; A256KWP, RFC 5649)
# ---------------------------------------------------------------------------------------------

test_round_trip_a256kw() {
  local n first
  for n in 16 24 32 64 520; do
    rand_file "$n" "$WORK/dek"
    wrap_ok "$AZURE_AES_KEY" A256KW "$WORK/dek"
    expect_eq "A256KW wrapped length of $n bytes" "$(kw_len "$n")" "$(b64url_len "$WRAPPED")"
    unwrap_ok "$AZURE_AES_KEY" A256KW "$WRAPPED" "$WORK/dek"
  done
  # RFC 3394 is deterministic: the same key and plaintext give the same wrapped value.
  first="$WRAPPED"
  wrap_ok "$AZURE_AES_KEY" A256KW "$WORK/dek"
  expect_eq "second A256KW wrap of the same bytes" "$first" "$WRAPPED"
}

test_a256kw_plaintext_lengths() {
  # RFC 3394 wraps n >= 2 64-bit blocks.
  local n
  for n in 8 12 17 33; do
    rand_file "$n" "$WORK/dek"
    refused "$AZURE_AES_KEY" wrapkey A256KW "$(file_b64url "$WORK/dek")"
  done
  refused "$AZURE_AES_KEY" wrapkey A256KW ""
}

test_tampered_a256kw_refused() { aes_tamper A256KW; }

test_round_trip_a256kwp() {
  local n first
  for n in 8 16 32 64 520; do
    rand_file "$n" "$WORK/dek"
    wrap_ok "$AZURE_AES_KEY" A256KWP "$WORK/dek"
    expect_eq "A256KWP wrapped length of $n bytes" "$(kwp_len "$n")" "$(b64url_len "$WRAPPED")"
    unwrap_ok "$AZURE_AES_KEY" A256KWP "$WRAPPED" "$WORK/dek"
  done
  # RFC 5649 is deterministic too.
  first="$WRAPPED"
  wrap_ok "$AZURE_AES_KEY" A256KWP "$WORK/dek"
  expect_eq "second A256KWP wrap of the same bytes" "$first" "$WRAPPED"
}

# RFC 5649 wraps any length from 1 byte. An HSM whose mechanism cannot may refuse lengths that are
# not a multiple of 8 with a clear 400 naming A256KWP; what it must never do is answer 200 with a
# value that does not unwrap to exactly the bytes sent.
test_a256kwp_unaligned_lengths() {
  local n
  for n in 1 7 20 31 33; do
    rand_file "$n" "$WORK/dek"
    key_op "$AZURE_AES_KEY" wrapkey A256KWP "$(file_b64url "$WORK/dek")"
    if [ "$STATUS" = 200 ]; then
      expect_value
      expect_eq "A256KWP wrapped length of $n bytes" "$(kwp_len "$n")" "$(b64url_len "$VALUE")"
      unwrap_ok "$AZURE_AES_KEY" A256KWP "$VALUE" "$WORK/dek"
      echo "note: A256KWP wraps $n bytes"
    else
      expect_error InvalidRequest A256KWP
      echo "note: A256KWP wrap of $n bytes refused: $(json_str message)"
    fi
  done
  refused "$AZURE_AES_KEY" wrapkey A256KWP ""
}

test_tampered_a256kwp_refused() { aes_tamper A256KWP; }

# aes_tamper ALG: wrap 32 random bytes, then every kind of damaged value must get 400
# InvalidRequest, and the genuine value must still unwrap.
aes_tamper() {
  local alg="$1" h bad
  rand_file 32 "$WORK/dek"
  wrap_ok "$AZURE_AES_KEY" "$alg" "$WORK/dek"
  h="$(b64url_dec "$WRAPPED" | hex)"
  local len=$(( ${#h} / 2 ))
  for bad in \
      "$(flip_byte "$h" 0)" "$(flip_byte "$h" 7 80)" "$(flip_byte "$h" $((len / 2)))" \
      "$(flip_byte "$h" $((len - 1)))" "${h:16}" "${h:0:$(( (len - 8) * 2 ))}" \
      "${h}00" "${h:0:$(( (len - 1) * 2 ))}" "${h}$(openssl rand -hex 8)"; do
    refused "$AZURE_AES_KEY" unwrapkey "$alg" "$(hex_to_b64url "$bad")"
  done
  # Random bytes of a plausible length, and nothing at all.
  refused "$AZURE_AES_KEY" unwrapkey "$alg" "$(openssl rand 40 | b64url)"
  refused "$AZURE_AES_KEY" unwrapkey "$alg" ""
  unwrap_ok "$AZURE_AES_KEY" "$alg" "$WRAPPED" "$WORK/dek"
}

# kek_openssl wrap|unwrap ALG IN OUT [KEK_HEX]: AES key wrap (RFC 3394 / RFC 5649) computed by
# openssl with the known KEK (default AZURE_KEK_HEX)
kek_openssl() {
  local dir=() cipher iv
  [ "$1" != unwrap ] || dir=(-d)
  if [ "$2" = A256KW ]; then cipher=id-aes256-wrap; iv=A6A6A6A6A6A6A6A6; else cipher=id-aes256-wrap-pad; iv=A65959A6; fi
  openssl enc "${dir[@]}" "-$cipher" -K "${5:-$AZURE_KEK_HEX}" -iv "$iv" -in "$3" -out "$4" 2>"$WORK/openssl.err" \
    || fail "openssl enc -$cipher failed: $(cat "$WORK/openssl.err")"
}

# AZURE_KEK_KEY: the proxy's A256KW equals openssl's, byte for byte, and unwraps openssl's; a
# value wrapped under another KEK is refused.
test_a256kw_known_answer() {
  local n
  if [ "$AZURE_KEK_HEX" = "$RFC3394_KEK" ]; then
    unhex "$RFC3394_DATA" >"$WORK/dek"
    wrap_ok "$AZURE_KEK_KEY" A256KW "$WORK/dek"
    expect_eq "RFC 3394 §4.6 wrapped value" "$RFC3394_WRAPPED" "$(b64url_dec "$WRAPPED" | hex)"
    unwrap_ok "$AZURE_KEK_KEY" A256KW "$(hex_to_b64url "$RFC3394_WRAPPED")" "$WORK/dek"
  fi
  for n in 16 24 32 64 520; do
    rand_file "$n" "$WORK/dek"
    kek_openssl wrap A256KW "$WORK/dek" "$WORK/theirs"
    wrap_ok "$AZURE_KEK_KEY" A256KW "$WORK/dek"
    expect_eq "A256KW of $n bytes (hex), proxy vs openssl" "$(hex <"$WORK/theirs")" "$(b64url_dec "$WRAPPED" | hex)"
    unwrap_ok "$AZURE_KEK_KEY" A256KW "$(file_b64url "$WORK/theirs")" "$WORK/dek"
  done
  kek_openssl wrap A256KW "$WORK/dek" "$WORK/theirs" "$(openssl rand -hex 32)"
  refused "$AZURE_KEK_KEY" unwrapkey A256KW "$(file_b64url "$WORK/theirs")"
}

# AZURE_KEK_KEY: every length openssl wraps with RFC 5649 unwraps in the proxy; the proxy's wraps
# equal openssl's (an HSM that cannot wrap unaligned lengths may refuse them with a 400 naming
# A256KWP, but must never answer with a different value).
test_a256kwp_known_answer() {
  local n
  for n in 1 7 8 9 20 31 32 33 64 520; do
    rand_file "$n" "$WORK/dek"
    kek_openssl wrap A256KWP "$WORK/dek" "$WORK/theirs"
    unwrap_ok "$AZURE_KEK_KEY" A256KWP "$(file_b64url "$WORK/theirs")" "$WORK/dek"
    key_op "$AZURE_KEK_KEY" wrapkey A256KWP "$(file_b64url "$WORK/dek")"
    if [ $(( n % 8 )) = 0 ] || [ "$STATUS" = 200 ]; then
      expect_value
      expect_eq "A256KWP of $n bytes (hex), proxy vs openssl" "$(hex <"$WORK/theirs")" "$(b64url_dec "$VALUE" | hex)"
    else
      expect_error InvalidRequest A256KWP
    fi
  done
  kek_openssl wrap A256KWP "$WORK/dek" "$WORK/theirs" "$(openssl rand -hex 32)"
  refused "$AZURE_KEK_KEY" unwrapkey A256KWP "$(file_b64url "$WORK/theirs")"
}

# A256KW and A256KWP use different initial values (A6A6A6A6A6A6A6A6 vs A65959A6 || length), so the
# same bytes wrap differently and neither unwraps as the other.
test_kw_and_kwp_are_distinct() {
  rand_file 32 "$WORK/dek"
  wrap_ok "$AZURE_AES_KEY" A256KW "$WORK/dek"; local kw="$WRAPPED"
  wrap_ok "$AZURE_AES_KEY" A256KWP "$WORK/dek"; local kwp="$WRAPPED"
  [ "$kw" != "$kwp" ] || fail "A256KW and A256KWP give the same wrapped value"
  refused "$AZURE_AES_KEY" unwrapkey A256KWP "$kw"
  refused "$AZURE_AES_KEY" unwrapkey A256KW "$kwp"
}

# ---------------------------------------------------------------------------------------------
# Tests: RSA-OAEP (SHA-1) and RSA-OAEP-256 (SHA-256, MGF1-SHA-256)
# ---------------------------------------------------------------------------------------------

# rsa_round_trip ALG: wrap in the proxy, unwrap in the proxy; OAEP is randomized.
rsa_round_trip() {
  local alg="$1" n first
  rsa_setup
  for n in 16 32 64; do
    rand_file "$n" "$WORK/dek"
    wrap_ok "$AZURE_RSA_KEY" "$alg" "$WORK/dek"
    expect_eq "$alg wrapped length" "$RSA_LEN" "$(b64url_len "$WRAPPED")"
    unwrap_ok "$AZURE_RSA_KEY" "$alg" "$WRAPPED" "$WORK/dek"
  done
  first="$WRAPPED"
  wrap_ok "$AZURE_RSA_KEY" "$alg" "$WORK/dek"
  [ "$first" != "$WRAPPED" ] || fail "two $alg wraps of the same bytes are identical (OAEP is randomized)"
  unwrap_ok "$AZURE_RSA_KEY" "$alg" "$WRAPPED" "$WORK/dek"
}

# rsa_interop ALG: openssl encrypts DEKs to the public key rebuilt from n/e, the proxy unwraps
# them. A value sealed with the other hash must not unwrap.
rsa_interop() {
  local alg="$1" md other n
  md="$(oaep_md "$alg")"
  if [ "$md" = sha1 ]; then other=sha256; else other=sha1; fi
  rsa_setup
  for n in 32 16 1; do
    rand_file "$n" "$WORK/dek"
    oaep_seal "$md" "$md" "$WORK/dek" "$WORK/sealed"
    unwrap_ok "$AZURE_RSA_KEY" "$alg" "$(file_b64url "$WORK/sealed")" "$WORK/dek"
  done
  oaep_seal "$other" "$other" "$WORK/dek" "$WORK/sealed"
  refused "$AZURE_RSA_KEY" unwrapkey "$alg" "$(file_b64url "$WORK/sealed")"
  if [ "$alg" = RSA-OAEP-256 ]; then
    # JOSE's RSA-OAEP-256 uses SHA-256 for MGF1 too.
    oaep_seal sha256 sha1 "$WORK/dek" "$WORK/sealed"
    refused "$AZURE_RSA_KEY" unwrapkey "$alg" "$(file_b64url "$WORK/sealed")"
  fi
}

# rsa_max_length ALG: the largest OAEP plaintext wraps and unwraps (sealed by openssl and by the
# proxy); one byte more is refused.
rsa_max_length() {
  local alg="$1" md max
  md="$(oaep_md "$alg")"
  rsa_setup
  max="$(oaep_max "$alg")"
  rand_file "$max" "$WORK/dek"
  oaep_seal "$md" "$md" "$WORK/dek" "$WORK/sealed"
  unwrap_ok "$AZURE_RSA_KEY" "$alg" "$(file_b64url "$WORK/sealed")" "$WORK/dek"
  wrap_ok "$AZURE_RSA_KEY" "$alg" "$WORK/dek"
  unwrap_ok "$AZURE_RSA_KEY" "$alg" "$WRAPPED" "$WORK/dek"
  rand_file $(( max + 1 )) "$WORK/long"
  refused "$AZURE_RSA_KEY" wrapkey "$alg" "$(file_b64url "$WORK/long")"
  # OAEP can carry an empty message (mLen = 0); a proxy may also refuse it as no key at all.
  : >"$WORK/empty"
  key_op "$AZURE_RSA_KEY" wrapkey "$alg" ""
  if [ "$STATUS" = 200 ]; then
    expect_value
    expect_eq "$alg wrapped length of 0 bytes" "$RSA_LEN" "$(b64url_len "$VALUE")"
    unwrap_ok "$AZURE_RSA_KEY" "$alg" "$VALUE" "$WORK/empty"
    echo "note: $alg wraps an empty value"
  else
    expect_error InvalidRequest
  fi
}

# rsa_tamper ALG: damaged or foreign values get 400 InvalidRequest, never 500.
rsa_tamper() {
  local alg="$1" md h bad
  md="$(oaep_md "$alg")"
  rsa_setup
  rand_file 32 "$WORK/dek"
  oaep_seal "$md" "$md" "$WORK/dek" "$WORK/sealed"
  h="$(hex <"$WORK/sealed")"
  for bad in \
      "$(flip_byte "$h" $(( RSA_LEN / 2 )) 40)" "$(flip_byte "$h" $(( RSA_LEN - 1 )))" "$(flip_byte "$h" 1)" \
      "${h:2}" "${h}00" "00$(openssl rand -hex $(( RSA_LEN - 1 )))" \
      "$(printf 'ff%.0s' $(seq "$RSA_LEN"))" "$(printf '00%.0s' $(seq "$RSA_LEN"))"; do
    refused "$AZURE_RSA_KEY" unwrapkey "$alg" "$(hex_to_b64url "$bad")"
  done
  refused "$AZURE_RSA_KEY" unwrapkey "$alg" ""
  unwrap_ok "$AZURE_RSA_KEY" "$alg" "$(file_b64url "$WORK/sealed")" "$WORK/dek"
}

test_round_trip_rsa_oaep() { rsa_round_trip RSA-OAEP; }
test_rsa_oaep_openssl_interop() { rsa_interop RSA-OAEP; }
test_rsa_oaep_max_length() { rsa_max_length RSA-OAEP; }
test_tampered_rsa_oaep_refused() { rsa_tamper RSA-OAEP; }
test_round_trip_rsa_oaep_256() { rsa_round_trip RSA-OAEP-256; }
test_rsa_oaep_256_openssl_interop() { rsa_interop RSA-OAEP-256; }
test_rsa_oaep_256_max_length() { rsa_max_length RSA-OAEP-256; }
test_tampered_rsa_oaep_256_refused() { rsa_tamper RSA-OAEP-256; }

# Every algorithm /info does not list (and whose key is configured): wrap and unwrap of
# well-formed values get 400 InvalidRequest naming the algorithm.
test_unsupported_algorithms_refused() {
  local alg key
  for alg in "${ALL_ALGS[@]}"; do
    supported "$alg" && continue
    key="$(alg_key "$alg")"
    [ -n "$key" ] || continue
    rand_file 32 "$WORK/dek"
    refused "$key" wrapkey "$alg" "$(file_b64url "$WORK/dek")" "$alg"
    if is_rsa_alg "$alg"; then
      rsa_setup
      oaep_seal "$(oaep_md "$alg")" "$(oaep_md "$alg")" "$WORK/dek" "$WORK/sealed"
    else
      openssl rand -out "$WORK/sealed" 40 2>/dev/null
    fi
    refused "$key" unwrapkey "$alg" "$(file_b64url "$WORK/sealed")" "$alg"
    echo "note: $alg is not supported and is refused with: $(json_str message)"
  done
}

# ---------------------------------------------------------------------------------------------
# Tests: requests the API refuses
# ---------------------------------------------------------------------------------------------

# any_key / any_alg: a configured key and an algorithm that applies to it (for request checks)
any_key() { if [ -n "$AZURE_AES_KEY" ]; then printf '%s' "$AZURE_AES_KEY"; else printf '%s' "$AZURE_RSA_KEY"; fi; }
any_alg() { if [ -n "$AZURE_AES_KEY" ]; then echo A256KW; else echo RSA-OAEP; fi; }
good_wrap_body() { wrap_body "$(any_alg)" "$(openssl rand 32 | b64url)"; }

test_missing_api_version() {
  api "$(any_key)/wrapkey" "$(good_wrap_body)" ""
  expect_error InvalidRequest
  api info "$(ctx_body)" ""
  expect_error InvalidRequest
  api "$(any_key)/metadata" "$(ctx_body)" "apiversion=$API_VERSION"
  expect_error InvalidRequest
}

test_other_api_version() {
  local v
  for v in 7.4 0.2-preview 1.0 "" "0.1-preview-x"; do
    api "$(any_key)/wrapkey" "$(good_wrap_body)" "api-version=$v"
    expect_error InvalidRequest
  done
  api info "$(ctx_body)" "api-version=7.5"
  expect_error InvalidRequest
}

test_unknown_key() {
  local key op; key="no-such-key-$(openssl rand -hex 4)"
  for op in wrapkey unwrapkey; do
    api "$key/$op" "$(good_wrap_body)"
    expect_error KeyNotFound
  done
  # 64 characters is the longest valid key identifier: unknown, not invalid.
  api "$(printf 'k%.0s' $(seq 64))/wrapkey" "$(good_wrap_body)"
  expect_error KeyNotFound
}

test_invalid_key_id() {
  local key
  for key in bad_key "bad.key" "$(printf 'k%.0s' $(seq 65))" "bad%20key"; do
    api "$key/wrapkey" "$(good_wrap_body)"
    expect_error InvalidRequest
  done
  api "bad_key/metadata" "$(ctx_body)"
  expect_error InvalidRequest
}

test_unknown_operation() {
  local key; key="$(any_key)"
  api "$key/encrypt" "$(good_wrap_body)"
  expect_error NotFound
  api "$key/wrapkey/more" "$(good_wrap_body)"
  expect_error NotFound
  api "no-such-operation" "$(ctx_body)"
  expect_error NotFound
}

test_padded_base64url() {
  local key alg v; key="$(any_key)"; alg="$(any_alg)"
  v="$(openssl rand 32 | b64url)"
  refused "$key" wrapkey "$alg" "$v="                          # 32 bytes with its padding
  refused "$key" wrapkey "$alg" "$(openssl rand 40 | b64url)===="    # padding that is not even due
  # Standard alphabet: 0xfb 0xff 0xbf encodes to "+/+/", 0xff 0xff 0xff to "////" (24 bytes in all)
  refused "$key" wrapkey "$alg" "$(printf '%b' '\xfb\xff\xbf' | openssl base64 -A)$(printf '%b' '\xff\xff\xff' | openssl base64 -A)$(openssl rand 18 | b64url)"
  refused "$key" wrapkey "$alg" "not*base64url!"
  refused "$key" wrapkey "$alg" "${v:0:41}"                   # 41 characters: impossible length
}

test_missing_request_context() {
  local key alg v; key="$(any_key)"; alg="$(any_alg)"
  v="$(openssl rand 32 | b64url)"
  api "$key/wrapkey" "$(printf '{"alg":"%s","value":"%s"}' "$alg" "$v")"
  expect_error InvalidRequest
  api "$key/metadata" '{}'
  expect_error InvalidRequest
  api info '{}'
  expect_error InvalidRequest
  api info '{"request_context":null}'
  expect_error InvalidRequest
  local c
  for c in "{\"request_id\":\"r\",\"pool_name\":\"$AZURE_POOL\"}" \
           '{"request_id":"r","correlation_id":"c"}' \
           "{\"correlation_id\":\"\",\"pool_name\":\"$AZURE_POOL\"}" \
           '{"correlation_id":"c","pool_name":""}' \
           '{"correlation_id":"c","pool_name":5}' \
           '"not an object"'; do
    api "$key/wrapkey" "$(printf '{"request_context":%s,"alg":"%s","value":"%s"}' "$c" "$alg" "$v")"
    expect_error InvalidRequest
  done
}

test_unknown_alg() {
  local key v a; key="$(any_key)"
  v="$(openssl rand 32 | b64url)"
  for a in A128KW A192KW a256kw RSA1_5 dir none ""; do
    refused "$key" wrapkey "$a" "$v"
  done
  api "$key/wrapkey" "$(printf '{"request_context":%s,"value":"%s"}' "$(ctx)" "$v")"
  expect_error InvalidRequest
  api "$key/wrapkey" "$(printf '{"request_context":%s,"alg":"%s"}' "$(ctx)" "$(any_alg)")"
  expect_error InvalidRequest
  api "$key/unwrapkey" "$(printf '{"request_context":%s,"alg":5,"value":"%s"}' "$(ctx)" "$v")"
  expect_error InvalidRequest
}

test_wrong_algorithm_for_key_type() {
  local v alg; v="$(openssl rand 32 | b64url)"
  if [ -n "$AZURE_RSA_KEY" ]; then
    for alg in A256KW A256KWP; do
      refused "$AZURE_RSA_KEY" wrapkey "$alg" "$v" "$alg"
      refused "$AZURE_RSA_KEY" unwrapkey "$alg" "$(openssl rand 40 | b64url)" "$alg"
    done
  fi
  if [ -n "$AZURE_AES_KEY" ]; then
    for alg in RSA-OAEP RSA-OAEP-256; do
      refused "$AZURE_AES_KEY" wrapkey "$alg" "$v" "$alg"
      refused "$AZURE_AES_KEY" unwrapkey "$alg" "$(openssl rand 384 | b64url)" "$alg"
    done
  fi
}

test_malformed_json() {
  local key; key="$(any_key)"
  api "$key/wrapkey" '{"request_context": {"correlation_id": "c", '
  expect_error InvalidRequest
  api "$key/wrapkey" '[]'
  expect_error InvalidRequest
  api info ''
  expect_error InvalidRequest
}

test_unknown_fields_ignored() {
  api info "$(printf '{"request_context":{"correlation_id":"%s","pool_name":"%s","future":{"a":[1]}},"extra":true}' "$(uuid)" "$AZURE_POOL")"
  expect_status 200
  local key alg; key="$(any_key)"; alg="$(any_alg)"
  rand_file 32 "$WORK/dek"
  api "$key/wrapkey" "$(printf '{"request_context":%s,"alg":"%s","value":"%s","kid":"x","more":[1,2]}' "$(ctx)" "$alg" "$(file_b64url "$WORK/dek")")"
  expect_value
  unwrap_ok "$key" "$alg" "$VALUE" "$WORK/dek"
}

test_other_methods_are_405() {
  local m
  for m in GET PUT DELETE; do
    call "$m" "$AZURE_URL/info?api-version=$API_VERSION" "$(ctx_body)"
    expect_error MethodNotAllowed
    call "$m" "$AZURE_URL/$(any_key)/wrapkey?api-version=$API_VERSION" "$(good_wrap_body)"
    expect_error MethodNotAllowed
  done
}

test_http1_and_http2() {
  local v
  for v in --http1.1 --http2; do
    TLS_ARGS=("$v")
    api info "$(ctx_body)"
    LAST_REQ+=" ($v)"
    expect_status 200
    expect_eq api_version "$API_VERSION" "$(json_str api_version)"
  done
}

# A body far larger than any wrap request (1 MiB) gets an answer, not a dropped connection or a
# 5xx: 400 InvalidRequest or 413 (or 200, for a proxy without a limit). HTTP/1.1, as MHSM speaks.
test_oversized_body_answered() {
  TLS_ARGS=(--http1.1)
  local key alg; key="$(any_key)"; alg="$(any_alg)"
  { printf '{"request_context":%s,"alg":"%s","value":"' "$(ctx)" "$alg"
    head -c 1048576 /dev/zero | tr '\0' 'A'
    printf '"}'; } >"$WORK/big"
  call POST "$AZURE_URL/$key/wrapkey?api-version=$API_VERSION" "$(cat "$WORK/big")"
  [ "$CURL_RC" = 0 ] || fail "no answer to a 1 MiB body (curl rc $CURL_RC)"
  case "$STATUS" in
    200) echo "note: a 1 MiB value was wrapped" ;;
    413) ;;
    *) expect_error InvalidRequest ;;
  esac
  # The listener still serves.
  TLS_ARGS=()
  api info "$(ctx_body)"
  expect_status 200
}

# AZURE_NO_WRAP_KEY: a key the prefix exposes whose HSM attributes allow neither wrapping nor
# unwrapping (dev profile: dev-aes-no-usage). Its metadata may be refused (400/403/404); if it is
# answered, key_ops must not offer an operation that wrapkey/unwrapkey then refuse.
test_metadata_matches_what_the_key_can_do() {
  local key="$AZURE_NO_WRAP_KEY" ops alg
  api "$key/metadata" "$(ctx_body)"
  case "$STATUS" in
    400|403|404) expect_error "$(json_str code)"; echo "note: metadata of $key refused: $(json_str message)"; return 0 ;;
  esac
  expect_status 200
  ops=",$(json_str_array key_ops),"
  if [ "$(json_str key_type)" = oct ]; then alg=A256KW; else alg=RSA-OAEP; fi
  rand_file 32 "$WORK/dek"
  if [[ "$ops" == *,wrapKey,* ]]; then
    key_op "$key" wrapkey "$alg" "$(file_b64url "$WORK/dek")"
    [ "$STATUS" != 403 ] || fail "metadata of $key lists wrapKey in key_ops, but wrapkey is refused"
  fi
  if [[ "$ops" == *,unwrapKey,* ]]; then
    key_op "$key" unwrapkey "$alg" "$(openssl rand 40 | b64url)"
    [ "$STATUS" != 403 ] || fail "metadata of $key lists unwrapKey in key_ops, but unwrapkey is refused"
  fi
}

# ---------------------------------------------------------------------------------------------
# Tests: mutual TLS
# ---------------------------------------------------------------------------------------------

# Subject CN of the configured client certificate, so a forged one differs only in trust.
client_cn() {
  local s; s="$(openssl x509 -in "$AZURE_CERT" -noout -subject -nameopt RFC2253 2>/dev/null)"
  if [[ "$s" =~ CN=([^,]+) ]]; then printf '%s' "${BASH_REMATCH[1]}"; else printf 'ekm-client'; fi
}

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

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>"$WORK/openssl.err" \
  || fail "openssl genpkey failed: $(cat "$WORK/openssl.err")"; }

# tls_version 1.2|1.3: pin the TLS version of the next requests
tls_version() { if [ "$1" = 1.2 ]; then TLS_ARGS=(--tlsv1.2 --tls-max 1.2); else TLS_ARGS=(--tlsv1.3); fi; }

# ROUNDS times: the configured certificate gets in, then BAD_CERT_ARGS is refused in the handshake
# on TLS 1.2 and on TLS 1.3 (so neither an earlier success nor an earlier refusal is remembered
# for the subject); at the end the configured certificate still gets in.
# expect_refused_repeatedly ROUNDS
expect_refused_repeatedly() {
  local v i good=(--cert "$AZURE_CERT" --key "$AZURE_KEY")
  for i in $(seq "$1"); do
    TLS_ARGS=(); CERT_ARGS=("${good[@]}")
    api info "$(ctx_body)"
    expect_status 200
    CERT_ARGS=("${BAD_CERT_ARGS[@]}")
    for v in 1.2 1.3; do
      tls_version "$v"
      api info "$(ctx_body)"
      LAST_REQ+=" (TLS $v, round $i)"
      expect_handshake_rejected "${UNTRUSTED_ALERTS[@]}"
    done
  done
  TLS_ARGS=(); CERT_ARGS=("${good[@]}")
  api info "$(ctx_body)"
  expect_status 200
}

test_mtls_client_cert_accepted() {
  local v
  for v in 1.2 1.3; do
    tls_version "$v"
    api info "$(ctx_body)"
    expect_status 200
    expect_json
  done
}

# Without a certificate the mTLS listener must refuse the handshake (or, if it makes certificates
# optional, the API must answer 401 Unauthorized).
test_mtls_no_client_cert_refused() {
  CERT_ARGS=()
  local v
  for v in 1.2 1.3; do
    tls_version "$v"
    api info "$(ctx_body)"
    if [ "$STATUS" = 000 ]; then
      # rustls answers an empty Certificate message with certificate_required (RFC 8446 §4.4.2.4).
      expect_handshake_rejected "certificate required" "handshake failure" "bad certificate"
    else
      expect_error Unauthorized
    fi
  done
}

# AZURE_NO_CERT_URL: a listener that does not ask for a certificate. The API must answer 401
# before it looks at keys: an unknown key is 401 as well, not 404.
test_no_client_cert_unauthorized() {
  CERT_ARGS=()
  local base="$AZURE_NO_CERT_URL" q="api-version=$API_VERSION"
  call POST "$base/info?$q" "$(ctx_body)"
  expect_error Unauthorized
  call POST "$base/$(any_key)/metadata?$q" "$(ctx_body)"
  expect_error Unauthorized
  call POST "$base/$(any_key)/wrapkey?$q" "$(good_wrap_body)"
  expect_error Unauthorized
  call POST "$base/no-such-key-$(openssl rand -hex 4)/unwrapkey?$q" "$(good_wrap_body)"
  expect_error Unauthorized
  # Presenting the good certificate there changes nothing if the server never asks for it.
}

test_mtls_self_signed_client_cert_refused() {
  write_openssl_conf "$(client_cn)"
  new_key "$WORK/self-key.pem"
  openssl req -x509 -new -config "$WORK/openssl.cnf" -extensions client_ext -days 2 \
    -key "$WORK/self-key.pem" -out "$WORK/self.pem" 2>"$WORK/openssl.err" \
    || fail "openssl could not make a self-signed certificate: $(cat "$WORK/openssl.err")"
  BAD_CERT_ARGS=(--cert "$WORK/self.pem" --key "$WORK/self-key.pem")
  expect_refused_repeatedly 3
}

test_mtls_unknown_ca_client_cert_refused() {
  write_openssl_conf "$(client_cn)"
  new_key "$WORK/uca-key.pem"
  new_key "$WORK/ucl-key.pem"
  openssl req -x509 -new -config "$WORK/openssl.cnf" -extensions ca_ext -days 2 \
    -subj "/CN=azure-conformance untrusted CA" -key "$WORK/uca-key.pem" -out "$WORK/uca.pem" \
    2>"$WORK/openssl.err" || fail "openssl could not make a CA: $(cat "$WORK/openssl.err")"
  openssl req -new -config "$WORK/openssl.cnf" -key "$WORK/ucl-key.pem" -out "$WORK/ucl.csr" \
    2>"$WORK/openssl.err" || fail "openssl could not make a CSR: $(cat "$WORK/openssl.err")"
  openssl x509 -req -in "$WORK/ucl.csr" -CA "$WORK/uca.pem" -CAkey "$WORK/uca-key.pem" \
    -set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$WORK/openssl.cnf" -extensions client_ext \
    -out "$WORK/ucl.pem" 2>"$WORK/openssl.err" \
    || fail "openssl could not issue the client certificate: $(cat "$WORK/openssl.err")"
  BAD_CERT_ARGS=(--cert "$WORK/ucl.pem" --key "$WORK/ucl-key.pem")
  expect_refused_repeatedly 2
}

# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------

INFO_TESTS=(test_info_ok test_info_request_id_optional)
AES_TESTS=(test_metadata_aes_key)
RSA_TESTS=(test_metadata_rsa_key)
KEY_TESTS=(test_metadata_unknown_key)
A256KW_TESTS=(test_round_trip_a256kw test_a256kw_plaintext_lengths test_tampered_a256kw_refused)
A256KWP_TESTS=(test_round_trip_a256kwp test_a256kwp_unaligned_lengths test_tampered_a256kwp_refused)
KW_BOTH_TESTS=(test_kw_and_kwp_are_distinct)
RSA_OAEP_TESTS=(test_round_trip_rsa_oaep test_rsa_oaep_openssl_interop test_rsa_oaep_max_length
  test_tampered_rsa_oaep_refused)
RSA_OAEP_256_TESTS=(test_round_trip_rsa_oaep_256 test_rsa_oaep_256_openssl_interop
  test_rsa_oaep_256_max_length test_tampered_rsa_oaep_256_refused)
UNSUPPORTED_TESTS=(test_unsupported_algorithms_refused)
REQUEST_TESTS=(
  test_missing_api_version test_other_api_version test_unknown_key test_invalid_key_id
  test_unknown_operation test_padded_base64url test_missing_request_context test_unknown_alg
  test_wrong_algorithm_for_key_type test_malformed_json test_unknown_fields_ignored
  test_other_methods_are_405 test_http1_and_http2 test_oversized_body_answered
)
NO_WRAP_KEY_TESTS=(test_metadata_matches_what_the_key_can_do)
KEK_A256KW_TESTS=(test_a256kw_known_answer)
KEK_A256KWP_TESTS=(test_a256kwp_known_answer)
MTLS_TESTS=(
  test_mtls_client_cert_accepted test_mtls_no_client_cert_refused
  test_mtls_self_signed_client_cert_refused test_mtls_unknown_ca_client_cert_refused
)
NO_CERT_TESTS=(test_no_client_cert_unauthorized)

PASSED=0
FAILED=0

# run_test NAME: runs the test in a subshell (assertions exit it), prints PASS/FAIL and the reason.
run_test() {
  local name="$1" out rc=0
  out="$( ("$name") 2>&1 )" || rc=$?
  if [ "$rc" = 0 ]; then
    PASSED=$((PASSED + 1))
    printf 'PASS  %s\n' "${name#test_}"
    [ "$AZURE_VERBOSE" != 1 ] || [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/      /'
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

# discover_algorithms: SUPPORTED from AZURE_ALGORITHMS, else from /info, else all four.
discover_algorithms() {
  if [ -n "$AZURE_ALGORITHMS" ]; then
    read -r -a SUPPORTED <<<"${AZURE_ALGORITHMS//,/ }"
    ALGS_FROM="AZURE_ALGORITHMS"
    return
  fi
  api info "$(ctx_body)"
  local algs; algs="$(json_str_array supported_algorithms)"
  if [ "$STATUS" = 200 ] && [ "$algs" != "<absent>" ] && [ -n "$algs" ]; then
    read -r -a SUPPORTED <<<"${algs//,/ }"
    ALGS_FROM="/info"
  else
    SUPPORTED=("${ALL_ALGS[@]}")
    ALGS_FROM="no list from /info (HTTP $STATUS, curl rc $CURL_RC): assuming all"
  fi
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
  if [ "$list" = 1 ]; then
    local t
    for t in "${INFO_TESTS[@]}" "${AES_TESTS[@]}" "${RSA_TESTS[@]}" "${KEY_TESTS[@]}" \
        "${A256KW_TESTS[@]}" "${A256KWP_TESTS[@]}" "${KW_BOTH_TESTS[@]}" "${KEK_A256KW_TESTS[@]}" \
        "${KEK_A256KWP_TESTS[@]}" "${RSA_OAEP_TESTS[@]}" \
        "${RSA_OAEP_256_TESTS[@]}" "${UNSUPPORTED_TESTS[@]}" "${REQUEST_TESTS[@]}" \
        "${NO_WRAP_KEY_TESTS[@]}" "${MTLS_TESTS[@]}" "${NO_CERT_TESTS[@]}"; do
      printf '%s\n' "${t#test_}"
    done
    exit 0
  fi

  check_setup
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/azure-conformance.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  CERT_ARGS=(--cert "$AZURE_CERT" --key "$AZURE_KEY")
  discover_algorithms

  local all=("${INFO_TESTS[@]}") unsupported=0 a
  [ -z "$AZURE_AES_KEY" ] || all+=("${AES_TESTS[@]}")
  [ -z "$AZURE_RSA_KEY" ] || all+=("${RSA_TESTS[@]}")
  all+=("${KEY_TESTS[@]}")
  if [ -n "$AZURE_AES_KEY" ]; then
    ! supported A256KW || all+=("${A256KW_TESTS[@]}")
    ! supported A256KWP || all+=("${A256KWP_TESTS[@]}")
    ! supported A256KW || ! supported A256KWP || all+=("${KW_BOTH_TESTS[@]}")
  fi
  if [ -n "$AZURE_KEK_KEY" ]; then
    ! supported A256KW || all+=("${KEK_A256KW_TESTS[@]}")
    ! supported A256KWP || all+=("${KEK_A256KWP_TESTS[@]}")
  fi
  if [ -n "$AZURE_RSA_KEY" ]; then
    ! supported RSA-OAEP || all+=("${RSA_OAEP_TESTS[@]}")
    ! supported RSA-OAEP-256 || all+=("${RSA_OAEP_256_TESTS[@]}")
  fi
  for a in "${ALL_ALGS[@]}"; do
    if ! supported "$a" && [ -n "$(alg_key "$a")" ]; then unsupported=1; fi
  done
  [ "$unsupported" = 0 ] || all+=("${UNSUPPORTED_TESTS[@]}")
  all+=("${REQUEST_TESTS[@]}")
  [ -z "$AZURE_NO_WRAP_KEY" ] || all+=("${NO_WRAP_KEY_TESTS[@]}")
  all+=("${MTLS_TESTS[@]}")
  [ -z "$AZURE_NO_CERT_URL" ] || all+=("${NO_CERT_TESTS[@]}")

  echo "Azure EKM conformance: $AZURE_URL (client certificate $AZURE_CERT, keys '${AZURE_AES_KEY}' '${AZURE_RSA_KEY}', pool $AZURE_POOL)"
  echo "algorithms: ${SUPPORTED[*]} ($ALGS_FROM)"
  local t
  for t in "${all[@]}"; do
    selected "$t" "${filters[@]}" && run_test "$t"
  done
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
}

main "$@"
