# shellcheck shell=bash
# Shared helpers for scripts/*.sh. Sourced, never run. All scripts run under bash 3.2
# (macOS): no bash-4 features, and no expansion of a possibly empty array under `set -u`
# (tests/test_scripts.py checks both).
#
# Everything before the prerequisite check uses bash built-ins only, so a script
# whose tools are missing stops before it changes anything.

REPO_ROOT="$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)"
readonly REPO_ROOT

REFINE_AF_IMAGE_REGISTRY="${REFINE_AF_IMAGE_REGISTRY:-ghcr.io/refine-af}"
REFINE_AF_IMAGE_TAG="${REFINE_AF_IMAGE_TAG:-0.1.0}"

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

install_hint() {
  case "$1" in
    docker) echo "Docker Engine: 'apt-get install docker.io' on Debian/Ubuntu, or https://docs.docker.com/engine/install/" ;;
    mmdebstrap) echo "mmdebstrap (builds the base image from Debian's archive): 'apt-get install mmdebstrap'" ;;
    kind) echo "kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation (a single binary from its release page)" ;;
    kubectl) echo "kubectl: https://kubernetes.io/docs/tasks/tools/#kubectl" ;;
    git) echo "git (kustomize fetches the Kubeflow Pipelines manifests with it): 'sudo apt-get install git' or https://git-scm.com/downloads" ;;
    minikube) echo "minikube: https://minikube.sigs.k8s.io/docs/start/" ;;
    python3) echo "Python 3.11+: https://www.python.org/downloads/" ;;
    *) echo "$1: install it and make sure it is on PATH" ;;
  esac
}

# require_tools TOOL... : report every missing tool with how to install it, and
# return 1 if any is missing.
require_tools() {
  local tool missing=""
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
  done
  if [[ -n "$missing" ]]; then
    printf 'error: missing prerequisite(s):%s\n' "$missing" >&2
    for tool in $missing; do
      printf '  - %s\n' "$(install_hint "$tool")" >&2
    done
    printf 'Nothing was changed.\n' >&2
    return 1
  fi
}

require_docker_daemon() {
  docker info >/dev/null 2>&1 \
    || die "docker is installed but its daemon does not answer ('docker info' fails); start Docker and retry. Nothing was changed."
}

# base_image_ref : the Debian + Python base built locally by scripts/base-image.sh.
base_image_ref() { printf '%s' "${REFINE_AF_BASE_IMAGE:-refine-af/base:bookworm-py3.11}"; }

# image_ref NAME : the reference images are built and loaded under.
image_ref() { printf '%s/%s:%s' "$REFINE_AF_IMAGE_REGISTRY" "$1" "$REFINE_AF_IMAGE_TAG"; }

# manifest_mlflow_image : the MLflow image k8s/base/mlflow/deployment.yaml names.
manifest_mlflow_image() {
  local line
  while IFS= read -r line; do
    case "$line" in
      *"image: "*/mlflow:*) printf '%s' "${line##*image: }"; return 0 ;;
    esac
  done <"$REPO_ROOT/k8s/base/mlflow/deployment.yaml"
  die "no mlflow image in k8s/base/mlflow/deployment.yaml"
}

# install_kfp KUBECTL_ARGS... : Kubeflow Pipelines standalone, cluster-scoped part
# first, then (once its CRDs are established) the namespaced part. Idempotent.
install_kfp() {
  log "installing Kubeflow Pipelines (k8s/kfp/cluster-scoped)"
  kubectl "$@" apply -k "$REPO_ROOT/k8s/kfp/cluster-scoped"
  kubectl "$@" wait --for=condition=established --timeout=180s crd --all
  log "installing Kubeflow Pipelines (k8s/kfp/platform-agnostic)"
  kubectl "$@" apply -k "$REPO_ROOT/k8s/kfp/platform-agnostic"
  log "waiting for Kubeflow Pipelines to become available (first start pulls many images)"
  kubectl "$@" -n kubeflow wait --for=condition=Available --timeout=1800s deployment --all
}

# apply_refine_af OVERLAY KUBECTL_ARGS... : MinIO, PostgreSQL, MLflow and the KFP glue.
apply_refine_af() {
  local overlay="$1"
  shift
  # A Job's pod template is immutable, so applying a changed one fails; both Jobs are
  # idempotent (the secrets Job keeps existing Secrets), so re-create them.
  kubectl "$@" -n refine-af delete job minio-buckets refine-af-secrets --ignore-not-found >/dev/null 2>&1 || true
  log "applying k8s/overlays/$overlay"
  kubectl "$@" apply -k "$REPO_ROOT/k8s/overlays/$overlay"
  log "waiting for the credentials (generated in the cluster on the first apply), MinIO, PostgreSQL and MLflow"
  kubectl "$@" -n refine-af wait --for=condition=complete job/refine-af-secrets --timeout=600s
  kubectl "$@" -n refine-af rollout status deployment/minio --timeout=600s
  kubectl "$@" -n refine-af rollout status statefulset/postgres --timeout=600s
  kubectl "$@" -n refine-af wait --for=condition=complete job/minio-buckets --timeout=600s
  kubectl "$@" -n refine-af rollout status deployment/mlflow --timeout=900s
}
