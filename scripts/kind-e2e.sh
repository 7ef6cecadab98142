#!/usr/bin/env bash
# End-to-end check against the cluster from kind-up.sh: run the pipeline with the
# local-cpu preset through the KFP API, wait for it, then check that MLflow's
# registry holds a new version of the model.
# Environment: KFP_HOST (http://localhost:30880), MLFLOW_URI (http://localhost:30500),
# E2E_CONFIG (configs/local-cpu.yaml), E2E_EXPERIMENT (refine-af-e2e),
# REFINE_AF_MODEL_NAME (refine-af-model). For minikube set KFP_HOST and MLFLOW_URI
# to http://$(minikube -p refine-af ip):30880 and :30500.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

kfp_host="${KFP_HOST:-http://localhost:30880}"
mlflow_uri="${MLFLOW_URI:-http://localhost:30500}"
config="${E2E_CONFIG:-configs/local-cpu.yaml}"
experiment="${E2E_EXPERIMENT:-refine-af-e2e}"
model="${REFINE_AF_MODEL_NAME:-refine-af-model}"

# The project's virtualenv if there is one, else whatever is on PATH.
if [[ -x "$REPO_ROOT/.venv/bin/refine-af" ]]; then
  refine_af="$REPO_ROOT/.venv/bin/refine-af"
  python="$REPO_ROOT/.venv/bin/python"
else
  require_tools refine-af python3 || {
    echo "  - refine-af: 'python3 -m pip install -e \".[pipeline]\"' in $REPO_ROOT" >&2
    exit 1
  }
  refine_af="refine-af"
  python="python3"
fi
cd "$REPO_ROOT"
[[ -f "$config" ]] || die "config $config not found"

# wait_http URL NAME : until URL answers 200 (10 minutes at most).
wait_http() {
  "$python" - "$1" "$2" <<'PY'
import sys, time, urllib.request
url, name = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 600
while True:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            if r.status == 200:
                print(f"==> {name} answers at {url}")
                break
    except Exception as e:  # not up yet
        err = e
    if time.monotonic() > deadline:
        sys.exit(f"error: {name} did not answer at {url}: {err}")
    time.sleep(5)
PY
}

# model_versions : how many versions of $model the registry holds.
model_versions() {
  "$python" - "$mlflow_uri" "$model" <<'PY'
import sys
from mlflow import MlflowClient
uri, name = sys.argv[1], sys.argv[2]
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
print(len(client.search_model_versions(f"name='{name}'")))
PY
}

wait_http "$kfp_host/apis/v2beta1/healthz" "KFP API"
wait_http "$mlflow_uri/health" "MLflow"

before="$(model_versions)"
log "registry has $before version(s) of $model; submitting the pipeline ($config)"
# The cpu profile: every step on runtime-cpu with requests that fit the kind cluster;
# REFINE_AF_IMAGE_REGISTRY / _TAG (read by submit) name the images kind-load.sh loaded.
"$refine_af" submit --host "$kfp_host" --experiment "$experiment" --config "$config" \
  --profile cpu --wait
after="$(model_versions)"

if ((after > before)); then
  "$python" - "$mlflow_uri" "$model" <<'PY'
import sys
from mlflow import MlflowClient
uri, name = sys.argv[1], sys.argv[2]
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
newest = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
print(f"==> PASS: {name} version {newest.version} registered (run {newest.run_id})")
PY
else
  die "FAIL: no new version of $model in the MLflow registry at $mlflow_uri ($before before, $after after)"
fi
