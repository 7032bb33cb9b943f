#!/usr/bin/env bash
# Offline checks of the deployment assets (no cluster needed):
#   - every Kubernetes manifest in deploy/kubernetes/ against the Kubernetes OpenAPI schemas
#     (kubernetes-validate, strict: unknown fields are errors), file by file, no kustomize;
#   - kustomization.yaml lists only files that exist;
#   - the ConfigMap's config.toml is TOML and consistent with the Deployment (xks.fleet_size =
#     replicas, terminationGracePeriodSeconds > preStop + server.shutdown_grace_ms, secrets as files);
#   - deploy/monitoring/*.yaml is YAML with Prometheus rule groups, *.json is JSON.
# (tests/deploy.rs checks that the monitoring files name only metrics the proxy exports.)
#
# Needs python3 (Debian 12: python3 + python3-venv, installed with apt-get when missing) and PyPI
# for kubernetes-validate and PyYAML, installed into a throwaway venv (or the one in
# $EKM_VALIDATE_VENV, kept between runs). Exit status 0 when everything passes.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.30}"
KV_VERSION="${KV_VERSION:-1.37.0}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing: python3 python3-venv" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv >/dev/null
fi

if [ -n "${EKM_VALIDATE_VENV:-}" ]; then
  venv="$EKM_VALIDATE_VENV"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  venv="$tmp/venv"
fi
if [ ! -x "$venv/bin/kubernetes-validate" ] || ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VERSION" PyYAML
fi
py="$venv/bin/python"
kv="$venv/bin/kubernetes-validate"

failed=0
fail() { echo "FAIL: $*"; failed=1; }

echo "kubernetes-validate $("$py" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))'), Kubernetes $K8S_VERSION schemas"
for f in "$here"/kubernetes/*.yaml; do
  name="kubernetes/$(basename "$f")"
  [ "$(basename "$f")" = kustomization.yaml ] && continue
  if out="$("$kv" --strict --kubernetes-version "$K8S_VERSION" "$f" 2>&1)"; then
    echo "ok    $name"
  else
    fail "$name"
    echo "$out" | sed 's/^/      /'
  fi
done

if ! "$py" - "$here" <<'PY'; then failed=1; fi
import json, pathlib, sys, tomllib
import yaml

here = pathlib.Path(sys.argv[1])
bad = []

def check(cond, msg):
    if not cond:
        bad.append(msg)

kust = yaml.safe_load((here / "kubernetes/kustomization.yaml").read_text())
for res in kust.get("resources", []):
    check((here / "kubernetes" / res).is_file(), f"kustomization.yaml: missing resource {res}")
print("ok    kubernetes/kustomization.yaml (resources exist)")

cm = yaml.safe_load((here / "kubernetes/configmap.yaml").read_text())
try:
    cfg = tomllib.loads(cm["data"]["config.toml"])
except tomllib.TOMLDecodeError as e:
    bad.append(f"configmap.yaml: config.toml is not TOML: {e}")
    cfg = None
dep = yaml.safe_load((here / "kubernetes/deployment.yaml").read_text())
if cfg is not None:
    before = len(bad)
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    check(cfg["xks"]["fleet_size"] == spec["replicas"],
          f"xks.fleet_size {cfg['xks']['fleet_size']} != replicas {spec['replicas']}")
    check(spec["replicas"] >= 2, "fewer than 2 replicas")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["", "0"])
    pre_s = int(pre[-1]) if pre[0] == "sleep" else 0
    grace = cfg["server"]["shutdown_grace_ms"] / 1000
    check(pod["terminationGracePeriodSeconds"] > pre_s + grace,
          f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} <= preStop {pre_s} s + drain {grace} s")
    pin = cfg["hsm"]["user_pin"]
    check(isinstance(pin, dict) and set(pin) == {"file"}, "hsm.user_pin is not { file = ... }")
    for store in cfg["xks"]["key_store"]:
        for cred in store["credential"]:
            s = cred["secret"]
            check(isinstance(s, dict) and set(s) in ({"file"}, {"env"}), f"key store {store['name']}: secret inline")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for path in [pin.get("file", "")] + [l["tls"]["certificate"] for l in cfg["listener"]]:
        check(any(path.startswith(m.rstrip("/") + "/") or path == m for m in mounts),
              f"{path} is not under a volume mount")
    ports = {p["containerPort"] for p in c["ports"]}
    for l in cfg["listener"] + [cfg["admin"]]:
        port = int(l["address"].rsplit(":", 1)[1])
        check(port in ports, f"listener {l.get('name', 'admin')} port {port} is not a containerPort")
        check(port >= 1024, f"port {port} needs a capability the container drops")
    sc = c["securityContext"]
    check(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
          and sc.get("capabilities", {}).get("drop") == ["ALL"], "container securityContext not hardened")
    if len(bad) == before:
        print("ok    kubernetes/configmap.yaml config.toml (TOML, consistent with deployment.yaml)")

for f in sorted((here / "monitoring").glob("*.y*ml")):
    try:
        doc = yaml.safe_load(f.read_text())
        groups = doc["groups"]
        n = 0
        for g in groups:
            check(isinstance(g.get("name"), str), f"{f.name}: group without name")
            for r in g["rules"]:
                n += 1
                check(("alert" in r) != ("record" in r) and isinstance(r.get("expr"), str),
                      f"{f.name}: rule {r.get('alert') or r.get('record')} malformed")
                if "alert" in r:
                    check("severity" in r.get("labels", {}), f"{f.name}: {r['alert']} has no severity")
        print(f"ok    monitoring/{f.name} (YAML, {len(groups)} groups, {n} rules)")
    except Exception as e:
        bad.append(f"{f.name}: {type(e).__name__}: {e}")
for f in sorted((here / "monitoring").glob("*.json")):
    try:
        doc = json.loads(f.read_text())
        check(isinstance(doc.get("panels"), list) and doc["panels"], f"{f.name}: no panels")
        print(f"ok    monitoring/{f.name} (JSON, {len(doc['panels'])} panels)")
    except Exception as e:
        bad.append(f"{f.name}: {type(e).__name__}: {e}")

for b in bad:
    print(f"FAIL: {b}")
sys.exit(1 if bad else 0)
PY

# The ConfigMap's config.toml through the real parser (`ekm-proxy check-config`), with its
# /etc/ekm-proxy paths moved to a temp dir holding the dev certificates and dummy secrets and the
# module replaced by SoftHSM. Only when a built binary and SoftHSM are present (CI has both).
bin="${EKM_PROXY_BIN:-}"
for b in "$here/../target/debug/ekm-proxy" "$here/../target/release/ekm-proxy"; do
  [ -z "$bin" ] && [ -x "$b" ] && bin="$b"
done
module=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so; do
  [ -z "$module" ] && [ -e "$m" ] && module="$m"
done
dev="$here/../certs/dev"
if [ -n "$bin" ] && [ -n "$module" ] && [ -f "$dev/server.pem" ]; then
  cc="$(mktemp -d)"
  mkdir -p "$cc/tls" "$cc/secrets"
  cp "$dev/server.pem" "$cc/tls/server-chain.pem"
  cp "$dev/server-key.pem" "$cc/tls/server-key.pem"
  cp "$dev/ca.pem" "$cc/tls/client-roots.pem"
  printf 'dummy-pin\n' >"$cc/secrets/hsm-pin"
  printf 'dummyXksSecretForValidateSh0123456789abcdefgh\n' >"$cc/secrets/xks-prod-secret"
  "$py" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["config.toml"])' \
    "$here/kubernetes/configmap.yaml" \
    | sed "s#/etc/ekm-proxy#$cc#g; s#/run/ekm-proxy#$cc#g; s#\"/opt/hsm/lib/libpkcs11.so\"#\"$module\"#" \
    >"$cc/config.toml"
  if out="$("$bin" check-config --config "$cc/config.toml" 2>&1)"; then
    echo "ok    kubernetes/configmap.yaml config.toml (ekm-proxy check-config)"
  else
    fail "kubernetes/configmap.yaml: ekm-proxy check-config"
    echo "$out" | sed 's/^/      /'
  fi
  rm -rf "$cc"
else
  echo "skip  ekm-proxy check-config of the ConfigMap (needs a built target/*/ekm-proxy, SoftHSM and certs/dev)"
fi

if [ "$failed" -ne 0 ]; then
  echo "deployment manifests: FAILED"
  exit 1
fi
echo "deployment manifests: all checks passed"
