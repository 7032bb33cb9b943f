#!/usr/bin/env python3
"""Regenerate the seed corpora in fuzz/corpus/ from real requests: the AWS SigV4 test-suite
vectors, XKS request bodies in the shape KMS sends (spec section 2), Cloud EKM bodies in the
shape Google sends, a token signed by the test signer, the test JWKS and the example config.
Run from the repository root: python3 fuzz/seeds/make_corpus.py (needs openssl for the token)."""
import base64, hashlib, json, os, subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-")
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def b64u(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


suite = json.load(open(os.path.join(ROOT, "tests/fixtures/sigv4/aws-sig-v4-test-suite.json")))
date = suite["amz_date"][:8]
for v in suite["vectors"]:
    signed = ";".join(v["signed_headers"])
    cred = f'{suite["access_key_id"]}/{date}/{suite["region"]}/{suite["service"]}/aws4_request'
    put("sigv4_authorization", v["name"],
        f'AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders={signed}, Signature={v["signature"]}')
    headers = "".join(f"{n}:{val}\n" for n, val in v["headers"]) + f'X-Amz-Date:{suite["amz_date"]}\n'
    put("sigv4_canonical", v["name"], f'{v["method"]}\n{v["path"]}\n{v["query"]}\n{signed}\n{headers}')
# What KMS sends an XKS proxy (host;x-amz-date), and odd paths that stress the URI encoder.
put("sigv4_authorization", "kms-xks",
    "AWS4-HMAC-SHA256 Credential=AKIA4GBY3I6JCE5M2HPM/20221118/us-east-1/kms-xks-proxy/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=" + "ab" * 32)
put("sigv4_canonical", "kms-xks-encrypt",
    "POST\n/dev-keystore/kms/xks/v1/keys/dev-aes-1/encrypt\n\nhost;x-amz-date\n"
    "host:xks.example.com\nx-amz-date:20221118T000000Z\ncontent-type:application/json\n")
put("sigv4_canonical", "kept-triplet-then-space",
    "POST\n/a%41 b/%zz/%4\n\nhost;x-amz-date\nhost:h\nx-amz-date:20221118T000000Z\n")

md = {
    "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
    "kmsKeyArn": "arn:aws:kms:us-east-2:123456789012:/key/1234abcd-12ab-34cd-56ef-1234567890ab",
    "kmsOperation": "Encrypt",
    "kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
    "kmsViaService": "ebs",
}
put("xks_request", "health", b"\x00" + json.dumps(
    {"requestMetadata": {"kmsRequestId": "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
                         "kmsOperation": "KmsHealthCheck"}}).encode())
put("xks_request", "metadata", b"\x00" + json.dumps(
    {"requestMetadata": dict(md, kmsOperation="CreateKey")}).encode())
put("xks_request", "encrypt", b"\x01" + json.dumps({
    "requestMetadata": md,
    "additionalAuthenticatedData": "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n",
    "plaintext": "SGVsbG8gV29ybGQh",
    "encryptionAlgorithm": "AES_GCM",
    "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}).encode())
put("xks_request", "decrypt", b"\x02" + json.dumps({
    "requestMetadata": dict(md, kmsOperation="Decrypt", awsSourceVpc="vpc-0123", awsSourceVpce="vpce-0123"),
    "additionalAuthenticatedData": "cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n",
    "encryptionAlgorithm": "AES_GCM",
    "ciphertext": "ghxkK1txeDNn3q8Y",
    "ciphertextMetadata": "a2V5X3ZlcnNpb249MQ==",
    "initializationVector": "HMrlRw85cAJUd5Ax",
    "authenticationTag": "vBxN2ncH1oEkR8WVXpmyYQ=="}).encode())
put("xks_request", "escaped-strings", b"\x01" + json.dumps(
    {"requestMetadata": {"kmsRequestId": "a\u00e9\n\"b"}, "plaintext": "AA=="}).encode())

ctx = {"fullResourceName": "//cloudkms.googleapis.com/projects/p/locations/us/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
       "relativeResourceName": "projects/p/locations/us/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
       "accessReasonContext": {"reason": "CUSTOMER_INITIATED_ACCESS"}}
put("gcp_request", "wrap", json.dumps({"keyPath": "k1", "plaintext": "AAECAwQFBgcICQoLDA0ODw==",
                                       "additionalAuthenticatedData": "YWFk", "additionalContext": ctx,
                                       "keyUriPrefix": "https://ekm.example.com/gcp/v0/keys/"}))
put("gcp_request", "unwrap-snake", json.dumps({"key_path": "k1", "wrapped_blob": "AQAJZGV2LWFlcy0x",
                                               "additional_context": {"access_reason_context": {"reason": 6},
                                                                      "is_key_health_check": True}}))
put("gcp_request", "reason-numeric-string", json.dumps(
    {"additionalContext": {"accessReasonContext": {"reason": "3"}}, "plaintext": "-_8"}))
put("gcp_request", "reason-lowercase", json.dumps(
    {"additionalContext": {"accessReasonContext": {"reason": "third_party_data_request"}}}))

label = b"dev-aes-1"
blob = bytes([1, 0, len(label)]) + label + bytes(range(12)) + b"ciphertext!" + bytes(range(16, 32))
put("gcp_blob", "wrap-v1", blob)
put("gcp_blob", "health-check-v1", bytes([1, 1, len(label)]) + label + bytes(12) + bytes(16))

signer = os.path.join(ROOT, "tests/fixtures/jwt/signer-1.pem")
header = b64u(json.dumps({"alg": "RS256", "kid": "test-signer-1", "typ": "JWT"}).encode())
payload = b64u(json.dumps({"iss": "https://accounts.google.com", "aud": "https://ekm.example.com",
                           "sub": "1234", "email": "service-1@example.iam.gserviceaccount.com",
                           "email_verified": True, "iat": 1699999990, "exp": 1700003590}).encode())
signing_input = f"{header}.{payload}".encode()
sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", signer], input=signing_input,
                     capture_output=True, check=True).stdout
put("jwt_token", "rs256", f"{header}.{payload}.{b64u(sig)}")
put("jwt_token", "crit-header", f'{b64u(json.dumps({"alg": "RS256", "kid": "k", "crit": ["x"]}).encode())}.{payload}.AA')
put("jwt_token", "alg-none", f'{b64u(json.dumps({"alg": "none", "kid": "k"}).encode())}.{payload}.')

put("jwks", "test-signer", open(os.path.join(ROOT, "tests/fixtures/jwt/signer-1.jwks.json"), "rb").read())
put("jwks", "mixed", json.dumps({"keys": [
    {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
    {"kty": "EC", "crv": "P-256", "kid": "e", "use": "sig",
     "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
    {"kty": "OKP", "crv": "Ed25519", "kid": "o", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}))

put("config", "example", open(os.path.join(ROOT, "config.example.toml"), "rb").read())
put("config", "minimal-xks", """
[[listener]]
name = "plain"
address = "127.0.0.1:0"
plain_http = true
[hsm]
module = "/nonexistent/libsofthsm2.so"
token_label = "t"
user_pin = "1234"
[[xks.key_store]]
name = "dev"
path_prefix = "/dev"
regions = ["us-east-1"]
keys = ["*"]
[[xks.key_store.credential]]
access_key_id = "DEVXKSACCESSKEYIDABCD"
secret = "devXksSecretAccessKeyNotForProductionUse0123456789"
""")
