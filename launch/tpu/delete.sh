#!/usr/bin/env bash
# Deletes a TPU slice (or its queued resource).
#
# usage: launch/tpu/delete.sh --zone ZONE [--name NAME] [--project PROJECT] [--queued] [--print]
#
#   --queued      the slice came from a queued resource (deletes the resource and its node)
#   --print       print the gcloud command instead of running it
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_delete
