#!/usr/bin/env bash
# Delete the kind cluster created by kind-up.sh (and everything in it, credentials
# included: they live only in the cluster). The built images are kept.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools kind || exit 1
cluster="${KIND_CLUSTER_NAME:-refine-af}"

exists=0
while IFS= read -r name; do
  [[ "$name" == "$cluster" ]] && exists=1
done < <(kind get clusters 2>/dev/null)

if ((exists)); then
  log "deleting kind cluster $cluster"
  kind delete cluster --name "$cluster"
else
  log "no kind cluster named $cluster; nothing to do"
fi
