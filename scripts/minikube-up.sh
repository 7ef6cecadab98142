#!/usr/bin/env bash
# Like kind-up.sh, on minikube (profile `refine-af`): start minikube unless it
# runs, install Kubeflow Pipelines, build the images and `minikube image load`
# them, apply k8s/overlays/minikube (credentials are generated in the cluster) and wait.
# Environment: MINIKUBE_PROFILE (refine-af), MINIKUBE_CPUS (4), MINIKUBE_MEMORY
# (8192, MiB), SKIP_BUILD=1, SKIP_KFP=1, REFINE_AF_IMAGE_REGISTRY / REFINE_AF_IMAGE_TAG.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools minikube docker kubectl git || exit 1
require_docker_daemon

profile="${MINIKUBE_PROFILE:-refine-af}"
ctx=(--context "$profile")

if minikube -p "$profile" status >/dev/null 2>&1; then
  log "minikube profile $profile is running"
else
  log "starting minikube profile $profile"
  minikube start -p "$profile" --cpus "${MINIKUBE_CPUS:-4}" --memory "${MINIKUBE_MEMORY:-8192}"
fi

if [[ "${SKIP_KFP:-0}" == 1 ]]; then
  log "SKIP_KFP=1: not installing Kubeflow Pipelines"
else
  install_kfp "${ctx[@]}"
fi

if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
  log "SKIP_BUILD=1: using images already built"
else
  "$REPO_ROOT/scripts/build-images.sh" runtime-cpu mlflow
fi
for name in runtime-cpu mlflow; do
  ref="$(image_ref "$name")"
  log "loading $ref into minikube"
  minikube -p "$profile" image load "$ref"
done
if [[ "$(image_ref mlflow)" != "$(manifest_mlflow_image)" ]]; then
  docker tag "$(image_ref mlflow)" "$(manifest_mlflow_image)"
  minikube -p "$profile" image load "$(manifest_mlflow_image)"
fi

apply_refine_af minikube "${ctx[@]}"

ip="$(minikube -p "$profile" ip)"
cat <<MSG

refine-af is up on minikube profile '$profile' (kubectl context $profile):
  KFP UI and API   http://$ip:30880
  MLflow           http://$ip:30500
  MinIO console    http://$ip:30901   (user and password: kubectl -n refine-af get secret minio-root -o yaml)
If the node IP is not reachable from this host (docker driver on macOS/Windows),
use kubectl port-forward (see docs/deploy.md).
End-to-end check: KFP_HOST=http://$ip:30880 MLFLOW_URI=http://$ip:30500 scripts/kind-e2e.sh
MSG
