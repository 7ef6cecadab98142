#!/usr/bin/env bash
# Build refine-af's container images with docker.
#   scripts/build-images.sh [runtime-cpu|runtime-gpu|mlflow ...]   (default: runtime-cpu mlflow)
# Tags: $REFINE_AF_IMAGE_REGISTRY/<name>:$REFINE_AF_IMAGE_TAG
# (default ghcr.io/refine-af/<name>:0.1.0). Extra `docker build` flags go in
# DOCKER_BUILD_ARGS, e.g. DOCKER_BUILD_ARGS="--build-arg WITH_VLLM=1".
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools docker || exit 1
require_docker_daemon

# Written for bash 3.2 (macOS): an empty array is never expanded under `set -u`.
(($# > 0)) || set -- runtime-cpu mlflow

extra_args=()
[[ -z "${DOCKER_BUILD_ARGS:-}" ]] || read -r -a extra_args <<<"$DOCKER_BUILD_ARGS"
for name in "$@"; do
  dockerfile="$REPO_ROOT/images/$name/Dockerfile"
  [[ -f "$dockerfile" ]] || die "no such image: $name (expected $dockerfile)"
  ref="$(image_ref "$name")"
  log "building $ref"
  docker build ${extra_args[@]+"${extra_args[@]}"} -f "$dockerfile" -t "$ref" "$REPO_ROOT"
done
