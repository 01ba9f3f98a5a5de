#!/usr/bin/env bash
# Creates a Cloud TPU slice for a topology of configs/topologies.py and waits until it is READY.
#
# usage: launch/tpu/create.sh --zone ZONE --topology TOPOLOGY [--name NAME] [--project PROJECT]
#                             [--provisioning on-demand|spot|queued|queued-spot] [--spot] [--queued] [--print]
#
#   --topology      v4-8, v4-32, v5p-8, v5p-64, v5e-16, v5e-32, v6e-8, v6e-16 (python3 configs/topologies.py list)
#   --provisioning  on-demand TPU VM (default), spot VM, or a queued resource (waits for capacity)
#   --print         print the gcloud commands instead of running them
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_create
tpu_wait_ready
