#!/usr/bin/env bash
# Load locally built images into the kind cluster (build them first:
# scripts/build-images.sh).
#   scripts/kind-load.sh [runtime-cpu|runtime-gpu|mlflow ...]   (default: runtime-cpu mlflow)
# The default is what a kind run needs: the one image the pipeline compiled with
# `--profile cpu` names (tests/test_scripts.py compares them) and the MLflow server's.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools docker kind || exit 1
require_docker_daemon

cluster="${KIND_CLUSTER_NAME:-refine-af}"
(($# > 0)) || set -- runtime-cpu mlflow

for name in "$@"; do
  ref="$(image_ref "$name")"
  docker image inspect "$ref" >/dev/null 2>&1 \
    || die "image $ref not found locally; build it with scripts/build-images.sh $name"
  refs=("$ref")
  # k8s/ names one MLflow image; load the build under that name too when the
  # registry or tag differ.
  if [[ "$name" == mlflow && "$ref" != "$(manifest_mlflow_image)" ]]; then
    docker tag "$ref" "$(manifest_mlflow_image)"
    refs+=("$(manifest_mlflow_image)")
  fi
  for r in "${refs[@]}"; do
    log "loading $r into kind cluster $cluster"
    kind load docker-image --name "$cluster" "$r"
  done
done
