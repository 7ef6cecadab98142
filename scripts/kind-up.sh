#!/usr/bin/env bash
# Bring up refine-af on a local kind cluster:
#   1. check prerequisites (docker, kind, kubectl, git) and stop, changing nothing, if any is missing;
#   2. create the kind cluster `refine-af` from k8s/kind/cluster.yaml unless it exists;
#   3. install Kubeflow Pipelines 2.17 standalone (k8s/kfp/);
#   4. build the runtime-cpu and mlflow images and load them into the cluster (the
#      images a `refine-af submit --profile cpu` pipeline and k8s/ name);
#   5. apply k8s/overlays/kind and wait until the in-cluster credentials, MinIO,
#      PostgreSQL and MLflow are ready.
# Safe to re-run. Environment: KIND_CLUSTER_NAME (refine-af), KIND_NODE_IMAGE
# (kind's default), SKIP_BUILD=1 (load existing images without building),
# SKIP_KFP=1 (KFP already installed), REFINE_AF_IMAGE_REGISTRY / REFINE_AF_IMAGE_TAG.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools docker kind kubectl git || exit 1
require_docker_daemon

cluster="${KIND_CLUSTER_NAME:-refine-af}"
ctx=(--context "kind-$cluster")

exists=0
while IFS= read -r name; do
  [[ "$name" == "$cluster" ]] && exists=1
done < <(kind get clusters 2>/dev/null)

if ((exists)); then
  log "kind cluster $cluster exists"
else
  log "creating kind cluster $cluster"
  create_args=(--name "$cluster" --config "$REPO_ROOT/k8s/kind/cluster.yaml" --wait 180s)
  [[ -z "${KIND_NODE_IMAGE:-}" ]] || create_args+=(--image "$KIND_NODE_IMAGE")
  kind create cluster "${create_args[@]}"
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
KIND_CLUSTER_NAME="$cluster" "$REPO_ROOT/scripts/kind-load.sh" runtime-cpu mlflow

apply_refine_af kind "${ctx[@]}"

cat <<MSG

refine-af is up on kind cluster '$cluster' (kubectl context kind-$cluster):
  KFP UI and API   http://localhost:30880
  MLflow           http://localhost:30500
  MinIO console    http://localhost:30901   (user and password: kubectl -n refine-af get secret minio-root -o yaml)
Next: make kind-e2e   (or: refine-af submit --host http://localhost:30880 --profile cpu --config configs/local-cpu.yaml)
MSG
