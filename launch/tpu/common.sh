# shellcheck shell=bash disable=SC2034
# (SC2034: options set here are read by the scripts that source this file.)
# Shared by launch/tpu/*.sh: options, and one function per step (create, wait, ship, install,
# train, delete). Source it; it runs nothing by itself.
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NAME="vtimellm-${USER:-tpu}"
ZONE="${CLOUDSDK_COMPUTE_ZONE:-}"
PROJECT=""
TOPOLOGY=""
PROVISIONING="on-demand"  # on-demand | spot | queued | queued-spot
CONFIG=""
WORKDIR=""
MAX_RESTARTS=20
KEEP=0
LOG_DIR="${ROOT}/logs"
TRAIN_ARGS=()
REMOTE_DIR="vtimellm-jax"  # code on each worker, under the home directory
REMOTE_VENV="vtimellm-venv"

parse_args() {
  while (($#)); do
    case "$1" in
      --name) NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --topology) TOPOLOGY="$2"; shift 2 ;;
      --provisioning) PROVISIONING="$2"; shift 2 ;;
      --spot) PROVISIONING="spot"; shift ;;
      --queued) PROVISIONING="queued"; shift ;;
      --config) CONFIG="$2"; shift 2 ;;
      --workdir) WORKDIR="$2"; shift 2 ;;
      --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
      --keep) KEEP=1; shift ;;
      --log-dir) LOG_DIR="$2"; shift 2 ;;
      --print) PRINT=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; TRAIN_ARGS=("$@"); break ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
  [[ -n $ZONE ]] || die "--zone is required (or set CLOUDSDK_COMPUTE_ZONE)"
  case "$PROVISIONING" in
    on-demand | spot | queued | queued-spot) ;;
    *) die "--provisioning must be on-demand, spot, queued or queued-spot, not $PROVISIONING" ;;
  esac
  GCLOUD_FLAGS=(--zone="$ZONE")
  [[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project="$PROJECT")
}

need() {  # need VAR "--flag": dies unless the option was given
  [[ -n ${!1} ]] || die "$2 is required (see --help)"
}

# Sets ACCELERATOR_TYPE, RUNTIME_VERSION and HOSTS from configs/topologies.py.
resolve_topology() {
  need TOPOLOGY --topology
  local line
  line="$(python3 "$ROOT/configs/topologies.py" gcloud "$TOPOLOGY")" || die "bad --topology $TOPOLOGY"
  read -r ACCELERATOR_TYPE RUNTIME_VERSION HOSTS <<<"$line"
  echo "# $TOPOLOGY: accelerator type $ACCELERATOR_TYPE, $HOSTS worker(s), runtime $RUNTIME_VERSION" >&2
}

queued() { [[ $PROVISIONING == queued* ]]; }

tpu_create() {
  resolve_topology
  local spot=()
  [[ $PROVISIONING != *spot ]] || spot=(--spot)
  if queued; then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
}

# Prints the TPU's state: READY or ACTIVE when usable; PREEMPTED, SUSPENDED, ... or NOT_FOUND.
tpu_state() {
  if ((PRINT)); then
    run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)'
    echo READY
    return
  fi
  gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}

tpu_wait_ready() {
  local state
  while :; do
    state="$(tpu_state)"
    case "$state" in
      READY) return 0 ;;
      CREATING | STARTING | RESTARTING | NOT_FOUND) ;;  # a queued resource has no node until granted
      *) queued || die "TPU $NAME is $state" ;;
    esac
    echo "waiting for $NAME (state $state)" >&2
    sleep 60
  done
}

tpu_delete() {
  if queued; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

on_all_workers() {  # on_all_workers COMMAND: runs COMMAND on every worker of the slice at once
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command "$1"
}

# Ships this checkout (tracked and untracked, not ignored files) to every worker.
tpu_ship() {
  local tarball="${TMPDIR:-/tmp}/${NAME}-code.tgz"
  if ((PRINT)); then
    echo "+ git -C $(quote "$ROOT") ls-files -co --exclude-standard -z | tar -C $(quote "$ROOT") --null -T - -czf $(quote "$tarball")" >&3
  else
    git -C "$ROOT" ls-files -co --exclude-standard -z | tar -C "$ROOT" --null -T - -czf "$tarball"
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
  on_all_workers "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/$REMOTE_DIR.tgz -C ~/$REMOTE_DIR"
}

# Installs the package with jax[tpu] (libtpu) into a virtualenv on every worker.
tpu_install() {
  on_all_workers "set -e; cd ~/$REMOTE_DIR; \
(python3 -m venv ~/$REMOTE_VENV || (sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && python3 -m venv ~/$REMOTE_VENV)); \
~/$REMOTE_VENV/bin/pip install --quiet --upgrade pip; ~/$REMOTE_VENV/bin/pip install --quiet -e \".[tpu]\""
}

# Runs the training command on every worker; each worker keeps its own log and copies it into
# the workdir's logs/ when the command ends. Returns the training's exit status.
tpu_train() {
  need CONFIG --config
  need WORKDIR --workdir
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path: the workers share no disk, and a resumed run reads it"
  local train worker log command
  train="$(quote vtimellm-jax train --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")"
  # shellcheck disable=SC2016  # expands on each worker, not here
  worker='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
  log="\$HOME/vtimellm-logs/$NAME-worker-$worker.log"
  # VTIMELLM_DISTRIBUTED=auto: every worker joins one jax.distributed run (jax finds its peers).
  command="cd ~/$REMOTE_DIR; source ~/$REMOTE_VENV/bin/activate; mkdir -p ~/vtimellm-logs; log=$log; \
export VTIMELLM_DISTRIBUTED=auto; $train 2>&1 | tee -a \"\$log\"; status=\${PIPESTATUS[0]}; \
gcloud storage cp \"\$log\" $(quote "${WORKDIR%/}/logs/")\"\$(basename \"\$log\")\" || true; exit \$status"
  if ((PRINT)); then
    on_all_workers "$command"
    return 0
  fi
  mkdir -p "$LOG_DIR"
  on_all_workers "$command" 2>&1 | tee -a "$LOG_DIR/$NAME.log"
  return "${PIPESTATUS[0]}"
}
