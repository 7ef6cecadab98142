#!/usr/bin/env bash
# Build refine-af's container images with docker, from hash-pinned locks, with no
# network inside `docker build` and no container registry needed.
#   scripts/build-images.sh [runtime-cpu|runtime-gpu|mlflow|s3-standin ...]
#   (default: runtime-cpu mlflow s3-standin)
# 1. base: BASE_IMAGE if set; else the Dockerfiles' public default when it is present
#    or can be pulled; else refine-af/base:bookworm-py3.11, built from Debian's
#    archive by scripts/base-image.sh (said so when it happens).
# 2. wheelhouse: .wheelhouse/<image>/ filled on this host by `pip download` of the
#    image's locks (images/locks/*.txt) plus refine-af's own wheel; it is the build
#    context, so the Dockerfiles install with --no-index --require-hashes.
# 3. docker build; the tag is set only when the build succeeds.
# Tags: $REFINE_AF_IMAGE_REGISTRY/<name>:$REFINE_AF_IMAGE_TAG (default
# ghcr.io/refine-af/<name>:0.1.0), the names components/images.py gives the pipeline.
# Extra `docker build` flags go in DOCKER_BUILD_ARGS. Exit 2 when a prerequisite is missing.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools docker || exit 2
docker info >/dev/null 2>&1 || {
  printf "error: docker's daemon does not answer ('docker info' fails); nothing was built.\n" >&2
  printf '  fix: start it (as root: dockerd >/var/log/dockerd.log 2>&1 &, or: systemctl start docker) and rerun: make images\n' >&2
  exit 2
}

# Written for bash 3.2 (macOS): an empty array is never expanded under `set -u`.
(($# > 0)) || set -- runtime-cpu mlflow s3-standin

# The locks each image installs from (images/locks/<flavour>.txt).
locks_of() {
  case "$1" in
    runtime-cpu) echo "cpu model build" ;;
    runtime-gpu) echo "gpu build" ;;
    mlflow) echo "mlflow" ;;
    s3-standin) echo "s3" ;;
    *) return 1 ;;
  esac
}

pick_base() {
  if [[ -n "${BASE_IMAGE:-}" ]]; then
    printf '%s' "$BASE_IMAGE"
    return
  fi
  local public local_base
  public="$(sed -n 's/^ARG BASE_IMAGE=//p' "$REPO_ROOT/images/runtime-cpu/Dockerfile")"
  if docker image inspect "$public" >/dev/null 2>&1 || timeout 120 docker pull -q "$public" >/dev/null 2>&1; then
    printf '%s' "$public"
    return
  fi
  local_base="$(base_image_ref)"
  log "the public base $public cannot be pulled; using $local_base (Debian bookworm from Debian's archive, scripts/base-image.sh)" >&2
  docker image inspect "$local_base" >/dev/null 2>&1 || "$REPO_ROOT/scripts/base-image.sh" >&2
  printf '%s' "$local_base"
}

# fill_wheelhouse IMAGE DIR : DIR/deps holds the image's locks and every file they pin
# (skipped when a stamp says the same locks were fetched before); DIR/project holds
# refine-af's wheel from this checkout, a layer of its own so a code change does not
# reinstall the dependencies.
fill_wheelhouse() {
  local name="$1" dir="$2" flavour stamp locks=()
  mkdir -p "$dir/deps"
  for flavour in $(locks_of "$name"); do locks+=("$REPO_ROOT/images/locks/$flavour.txt"); done
  stamp="$dir/deps/.complete-$(cat ${locks[@]+"${locks[@]}"} | sha256sum | cut -c1-16)"
  if [[ ! -e "$stamp" ]]; then
    for flavour in $(locks_of "$name"); do
      cp "$REPO_ROOT/images/locks/$flavour.txt" "$dir/deps/"
      log "wheelhouse ${dir#"$REPO_ROOT"/}: pip download -r images/locks/$flavour.txt"
      python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        ${pip_target[@]+"${pip_target[@]}"} -r "$REPO_ROOT/images/locks/$flavour.txt" -d "$dir/deps" \
        || die "pip download of images/locks/$flavour.txt failed (see above); fix: check that pip reaches PyPI (pip config list), then rerun: make images"
    done
    rm -f "$dir"/deps/.complete-*
    touch "$stamp"
  fi
  mkdir -p "$dir/project"
  if [[ "$name" == runtime-* ]]; then
    rm -f "$dir"/project/refine_af-*.whl
    log "wheelhouse ${dir#"$REPO_ROOT"/}: refine-af's wheel from this checkout"
    SOURCE_DATE_EPOCH=315532800 python3 -m pip wheel --quiet --disable-pip-version-check \
      --no-deps -w "$dir/project" "$REPO_ROOT" >/dev/null
  fi
}

[[ -z "$(python3 "$REPO_ROOT/scripts/lock.py" --check 2>&1)" ]] \
  || die "$(python3 "$REPO_ROOT/scripts/lock.py" --check 2>&1 | head -1)"
base=""
extra_args=()
[[ -z "${DOCKER_BUILD_ARGS:-}" ]] || read -r -a extra_args <<<"$DOCKER_BUILD_ARGS"
for name in "$@"; do
  dockerfile="$REPO_ROOT/images/$name/Dockerfile"
  if [[ ! -f "$dockerfile" ]] || ! locks_of "$name" >/dev/null; then
    die "no such image: $name (images: runtime-cpu runtime-gpu mlflow s3-standin)"
  fi
  ref="$(image_ref "$name")"
  build_args=(${extra_args[@]+"${extra_args[@]}"})
  if [[ "$name" != runtime-gpu ]]; then
    [[ -n "$base" ]] || base="$(pick_base)"
    build_args+=(--build-arg "BASE_IMAGE=$base")
  fi
  context="$REPO_ROOT/.wheelhouse/$name"
  # the runtime-gpu lock is resolved for Ubuntu 24.04's Python 3.12, not this host's
  pip_target=()
  [[ "$name" != runtime-gpu ]] || pip_target=(--python-version 3.12 --platform manylinux_2_28_x86_64)
  fill_wheelhouse "$name" "$context"
  log "building $ref${base:+ on $base}"
  docker build ${build_args[@]+"${build_args[@]}"} -f "$dockerfile" -t "$ref" "$context" \
    || die "docker build of $name failed (see above); $ref was not (re)tagged"
  log "built $ref ($(docker image inspect -f '{{.Size}}' "$ref" | awk '{printf "%.2f GB", $1/1e9}'))"
done
