#!/usr/bin/env bash
# Trains a stage on a Cloud TPU slice end to end, surviving preemption: create the slice, ship
# and install the code on every worker, train on all workers; if the slice is preempted (spot or
# queued capacity taken back), delete it, create it again and rerun the same command, which
# resumes from the gs:// workdir's latest orbax checkpoint. The SIGTERM a preempted VM receives
# makes training save a checkpoint of the step it reached and exit with status 143 (docs/launch.md).
# Deletes the slice when training ends.
#
# usage: launch/tpu/run.sh --zone ZONE --topology TOPOLOGY --config SPEC --workdir gs://BUCKET/PATH
#                          [--name NAME] [--project PROJECT] [--provisioning on-demand|spot|queued|queued-spot]
#                          [--spot] [--queued] [--max-restarts N] [--keep] [--log-dir DIR] [--print]
#                          [-- TRAIN_ARGS...]
#
#   example: launch/tpu/run.sh --zone us-west4-a --topology v5e-16 --provisioning queued-spot \
#              --config configs/stage2.py:7b --workdir gs://my-bucket/vtimellm/stage2 -- \
#              --config.data.json=/data/stage2.json --config.data.features=/data/features
#   --topology also sets the training mesh (passed on as `train --topology`).
#   --max-restarts  recreations after preemption before giving up (default 20)
#   --keep          keep the slice after training
#   --print         print the commands of one pass instead of running them
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
need CONFIG --config
need WORKDIR --workdir
resolve_topology
TRAIN_ARGS=(--topology "$TOPOLOGY" "${TRAIN_ARGS[@]}")

restarts=0
while :; do
  if ((PRINT)) || [[ $(tpu_state) != READY ]]; then
    tpu_create
  fi
  tpu_wait_ready
  tpu_ship
  tpu_install
  status=0
  tpu_train || status=$?
  ((status != 0)) || break
  state="$(tpu_state)"
  # Status 143: training received SIGTERM (a preemption or maintenance notice), finished its step and
  # saved a checkpoint of it; resume even if the slice still reports READY.
  [[ $state != READY || $status == 143 ]] ||
    die "training failed on a healthy slice (status $status, not a preemption); see $LOG_DIR/$NAME.log"
  ((restarts < MAX_RESTARTS)) || die "preempted $restarts times; giving up (rerun to resume)"
  restarts=$((restarts + 1))
  echo "$NAME is $state: recreating it (restart $restarts of $MAX_RESTARTS); training resumes from $WORKDIR" >&2
  tpu_delete
done
((KEEP)) || tpu_delete
