#!/usr/bin/env bash
# Runs `vtimellm-jax train` on every worker of a TPU slice (created by create.sh, set up by setup.sh).
#
# usage: launch/tpu/train.sh --zone ZONE --config SPEC --workdir gs://BUCKET/PATH [--name NAME]
#                            [--project PROJECT] [--log-dir DIR] [--print] [-- TRAIN_ARGS...]
#
#   --config      e.g. configs/stage2.py:7b
#   --workdir     gs:// path for checkpoints and logs; rerunning resumes from its latest checkpoint
#   TRAIN_ARGS    passed to `vtimellm-jax train`, e.g. --topology v5e-16 --config.data.json=...
#   Logs: each worker writes ~/vtimellm-logs/NAME-worker-N.log and copies it to WORKDIR/logs/;
#   the combined stream is appended to LOG_DIR/NAME.log here (default: logs/ of this checkout).
#   --print       print the commands instead of running them
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
tpu_train
