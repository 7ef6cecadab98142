#!/usr/bin/env bash
# Delete the minikube profile created by minikube-up.sh (credentials included: they
# live only in the cluster).
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"; [[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=lib.sh
source "$here/lib.sh"

require_tools minikube || exit 1
profile="${MINIKUBE_PROFILE:-refine-af}"
log "deleting minikube profile $profile"
minikube delete -p "$profile"
