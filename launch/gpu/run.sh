#!/usr/bin/env bash
# Trains on the GPUs of this node: one process over all local GPUs; with several nodes, one such
# process per node joined through jax.distributed.
#
# usage: launch/gpu/run.sh --config SPEC --workdir DIR [--topology NAME] [--install]
#                          [--nodes N --node-rank R --coordinator HOST:PORT] [--log-dir DIR] [--print]
#                          [-- TRAIN_ARGS...]
#
#   --topology     a GPU preset of configs/topologies.py (1xH100, 8xH100, 16xH100): sets the mesh
#   --install      first run `pip install -e .[cuda]` (jax with CUDA 12) into the active Python
#   --nodes, --node-rank, --coordinator
#                  a multi-node run without SLURM: start this script on every node with the same
#                  --coordinator (node 0's address and a free port) and its own --node-rank.
#                  Under SLURM (srun, see train.sbatch) they come from SLURM_NTASKS, SLURM_PROCID and
#                  the job's first node.
#   Logs: LOG_DIR/node-R.log (default: logs/ of this checkout). Rerunning resumes from --workdir.
#   --print        print the commands instead of running them
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/../lib.sh"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"

CONFIG="" WORKDIR="" TOPOLOGY="" INSTALL=0 NODES="" NODE_RANK="" COORDINATOR="" LOG_DIR="$ROOT/logs"
PORT="${VTIMELLM_COORDINATOR_PORT:-8476}"
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --topology) TOPOLOGY="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --nodes) NODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --coordinator) COORDINATOR="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --print) PRINT=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n $CONFIG ]] || die "--config is required (see --help)"
[[ -n $WORKDIR ]] || die "--workdir is required (see --help)"

# Under srun, one task per node: SLURM names the processes and the first node coordinates.
if [[ -z $NODES && ${SLURM_NTASKS:-1} -gt 1 ]]; then
  NODES="$SLURM_NTASKS"
  NODE_RANK="$SLURM_PROCID"
  if [[ -z $COORDINATOR ]]; then
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)" || true
    COORDINATOR="${first:-${SLURM_JOB_NODELIST%%,*}}:$PORT"
  fi
fi
NODES="${NODES:-1}"
if ((NODES > 1)); then
  [[ -n $COORDINATOR && -n $NODE_RANK ]] || die "--nodes $NODES needs --coordinator HOST:PORT and --node-rank"
  ((NODE_RANK >= 0 && NODE_RANK < NODES)) || die "--node-rank $NODE_RANK is not in [0, $NODES)"
  # Read by vtimellm_jax.training.trainer.maybe_initialize_distributed.
  run export JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NODES" JAX_PROCESS_ID="$NODE_RANK"
fi

if ((INSTALL)); then
  (cd "$ROOT" && run python3 -m pip install --quiet -e ".[cuda]")
fi

train=(vtimellm-jax train --config "$CONFIG" --workdir "$WORKDIR")
[[ -z $TOPOLOGY ]] || train+=(--topology "$TOPOLOGY")
train+=("${TRAIN_ARGS[@]}")
log="$LOG_DIR/node-${NODE_RANK:-0}.log"
if ((PRINT)); then
  echo "+ $(quote "${train[@]}") 2>&1 | tee -a $(quote "$log")"
  exit 0
fi
mkdir -p "$LOG_DIR"
cd "$ROOT"
"${train[@]}" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
