#!/usr/bin/env bash
# Build refine-af's CPU base image from Debian's archive, with no container registry:
# Debian bookworm + Python 3.11 (python3, python3-venv), minimal, made by mmdebstrap
# and loaded with `docker import`.
#   scripts/base-image.sh            tags refine-af/base:bookworm-py3.11 (REFINE_AF_BASE_IMAGE)
# DEBIAN_MIRROR (default http://deb.debian.org/debian) points it at a mirror.
# The installed package versions are written to /usr/share/refine-af/base-packages.txt
# inside the image and to .cache/images/base-packages.txt on the host.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools docker mmdebstrap || exit 2
require_docker_daemon

ref="$(base_image_ref)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
record="$REPO_ROOT/.cache/images/base-packages.txt"
mkdir -p "${record%/*}"
tarball="$(mktemp --suffix=.tar)"
trap 'rm -f "$tarball"' EXIT

log "building $ref with mmdebstrap from $mirror (Debian bookworm, python3.11)"
# minbase + the interpreter; no docs, man pages or apt lists. The hook records
# every installed package with its exact version. The hooks' $1 (the root folder) is
# mmdebstrap's to expand, hence the single quotes.
# shellcheck disable=SC2016
if ! mmdebstrap --quiet --variant=minbase \
  --include=python3,python3-venv,passwd,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='mkdir -p "$1/usr/share/refine-af"' \
  --customize-hook='chroot "$1" dpkg-query -W -f "\${Package}=\${Version}\n" > "$1/usr/share/refine-af/base-packages.txt"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$tarball" \
  "deb $mirror bookworm main" \
  "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main"; then
  printf 'error: mmdebstrap could not build the base (Debian archive %s unreachable?); nothing was tagged.\n' "$mirror" >&2
  printf '  fix: check that apt-get update works, or set DEBIAN_MIRROR=<your Debian mirror>, then rerun: scripts/base-image.sh\n' >&2
  exit 2
fi
tar -xOf "$tarball" ./usr/share/refine-af/base-packages.txt >"$record"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "refine-af base: mmdebstrap bookworm, $(grep -c . "$record") packages" \
  "$tarball" "$ref" >/dev/null
log "tagged $ref ($(grep -E '^python3.11=' "$record")); package versions in ${record#"$REPO_ROOT"/}"
