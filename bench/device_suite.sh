#!/usr/bin/env bash
# Device benchmark suite: every figure of one GPU session (at most --budget-s seconds), as JSON lines
# in one file, ours and the PyTorch baselines' side by side on the same GPU.
#
# usage: bench/device_suite.sh [--out FILE] [--wheels DIR] [--torch-bench DIR] [--size 7b|tiny]
#                              [--budget-s 540] [--steps NAME,NAME,...]
#
# Steps, in order of priority: our figures each beside its PyTorch baseline, then A/Bs, then traces. A
# step runs under its own time limit (or what is left of the budget, if less), and is skipped, with a
# line saying so, when less than its "need" is left. Limits, needs and expected seconds on one H200 at
# 7B (start-up, model creation and compiles included): estimated from the run of 2026-12-04 (14 of these
# steps in 407 s) where it had the step, else (*) a guess; each line now records its step's wall time
# (step_wall_s), so the next run can replace the guesses:
#
#   step                 limit need expect  what
#   train_none             150   60    40   the 7B LoRA train step, B=8, L=256, remat none (bench.train);
#                                           train_none_xla (XLA's attention, not cuDNN's) only if it failed
#   train_full             150   60    40   the same with full remat (the release's checkpointing)
#   train_lora             150   60    40*  the same with the LoRA-aware remat policy (--remat lora)
#   torch_train_ckpt       150   60    50   HF + peft, same shapes, gradient checkpointing (+ HF generate)
#   torch_nockpt_static    300  150   150*  HF + peft without checkpointing (+ HF generate), then HF decode
#                                           with a static cache under torch.compile (STATIC=1), the
#                                           strongest PyTorch decode; one process: one model creation
#   decode                 120   40    25   greedy decode, batch 1, 160 prompt positions, 128 new tokens,
#                                           with the answering commands' flags (GEMMs on cuBLAS)
#   eval_1024              180   60    60*  grounding questions at the release's 1,024 new tokens: 2
#                                           answered one at a time against 16 at a time (bench.eval)
#   clip                    90   40    40   CLIP ViT-L/14 frames/s at batch 100 and 800, fp16
#   torch_clip_compiled    240  150   150*  HF CLIP, eager and under torch.compile (COMPILE=1)
#   serve                  180   60    75*  64 chat requests one at a time against 64 at once on 64 slots,
#                                           random 7B in bf16 (bench.serve)
#   eval                   120   40    35   32 grounding questions at 64 new tokens, 1 vs 16 at a time
#   decode_int8            120   45    35*  decode with the decoder projections held in int8 (`chat --quant
#                                           int8`; quantised on the device before timing): against decode,
#                                           the bytes a token reads and the speed they buy
#   decode_nf4             120   45    40*  the same in nf4, doubly quantised (the QLoRA base)
#   train_qlora            150   60    50*  train_none on a base quantised to nf4, doubly (QLoRA, the
#                                           release's --bits 4): tokens/s and memory against train_none
#   train_none_cublas      150   60    40*  A/B: train_none with every GEMM on cuBLAS
#                                           (XLA_FLAGS=--xla_gpu_enable_triton_gemm=false)
#   train_none_dbuf        150   60    45*  A/B: train_none with --xla_gpu_enable_while_loop_double_buffering
#   decode_stacked         120   45    30*  A/B: decode on the stacked layers training runs (a scan; XLA
#                                           copies each layer's kernels out of the stack) instead of the
#                                           answering layout (bench.decode --layout stacked)
#   decode_no_cmdbuf       100   45    30*  A/B: decode with XLA's command buffers (CUDA graphs) off
#                                           (--xla_gpu_enable_command_buffer=)
#   decode_triton          100   45    30   A/B: decode with XLA's default Triton GEMMs
#   clip_xla                90   40    30*  A/B: clip with XLA's attention instead of cuDNN's (--attention xla)
#   clip_cublas             90   40    30   A/B: clip with its GEMMs on cuBLAS
#   train_2048             150   70    35   the stage-2 recipe's shape: B=8 at 2048 positions, full remat,
#                                           loss 512 positions at a time
#   trace_train            120   60    45*  jax.profiler trace of one train_none step
#   trace_decode            90   45    30*  jax.profiler trace of one decode call (prefill + one step)
#
# Expected: about 1,185 s for every step, 15 s of them the header and module check. The default budget
# of 540 s (a 15-minute device session less a cold start) runs the figures through eval_1024 and clip,
# skips torch_clip_compiled (150 s needed), then runs what still fits of serve and eval. The rest is one more
# device call, with the baselines its A/Bs are measured against on that same machine:
#   bench/device_suite.sh ... --steps torch_clip_compiled,train_none,train_none_cublas,train_none_dbuf,decode,\
#     decode_int8,decode_nf4,train_qlora,decode_stacked,decode_no_cmdbuf,decode_triton,clip,clip_xla,clip_cublas,train_2048,\
#     trace_train,trace_decode
# Traces: DIR/train.{xplane.pb,perfetto.json.gz} and DIR/decode.{...}, DIR being the output file's name with
# _traces for .jsonl ($OUT/device_suite_traces/ on the device: one level down, so they come back);
# xprof / TensorBoard open the .xplane.pb, https://ui.perfetto.dev the .perfetto.json.gz.
# Every JSON line a step prints is written as {"step": NAME, ...its fields..., "step_wall_s": S}; a step that
# fails or times out writes {"step": NAME, "error": "...", ...} (with its last stderr lines) and the suite
# goes on (lines printed before a timeout are kept). The first line ("step": "header") records the device,
# the UTC date, the git commit and the jax/torch versions; the second ("deps") the module check; the last
# ("end") the wall time. Rates carry peak_fraction / hbm_fraction where the device kind is known
# (vtimellm_jax/device_peaks.py).
#
#   --out FILE         the JSON-lines file, overwritten (default: $OUT/device_suite.jsonl when OUT is
#                      set, as on the device machine, whose $OUT comes back; else ./device_suite.jsonl);
#                      every step's stderr goes to the same name with .log for .jsonl
#   --wheels DIR       every wheel in DIR is installed (pip --no-index --no-deps --target, into a
#                      temporary folder put first on PYTHONPATH) before anything runs, so these versions
#                      win over the machine's: the modules a bare CUDA machine lacks (grain, ml_collections,
#                      tensorflow_datasets, array_record and their own dependencies). Leave out flax,
#                      optax and orbax: the machine's are matched to its jax (flax 0.12.8 does not import
#                      under jax 0.11.2; the 0.12.10 there does). A module the steps
#                      need that is still missing stops the suite (exit 3) before measuring anything,
#                      naming it; av, tensorboardX, pycocoevalcap and matplotlib (extraction, logging and
#                      captioning metrics, which no step runs) are only reported.
#   --torch-bench DIR  the folder of torch_peft_baseline.py and torch_clip_baseline.py (default: shared/bench
#                      or ../shared/bench of this checkout, whichever exists). The torch steps are skipped
#                      when it is absent or torch sees no CUDA device.
#   --size tiny        the same steps at tiny shapes and a few iterations: a CPU smoke test of the suite
#                      (a few minutes; tests/test_device_suite.py). The torch baselines are skipped.
#   --budget-s N       seconds for the whole suite, checks included (default 540)
#   --steps LIST       run only these steps (comma-separated names of the table), in the table's order
#
# The project runs from this working tree without installation (PYTHONPATH=<repo root>), since the
# device machine gets a copy of the tree only. On the device, with the baselines and wheels copied into
# ignored folders of the checkout (and named in the run's carry), one run of about 9 minutes:
#   bench/device_suite.sh --wheels .whl --torch-bench .torch_bench --out "$OUT/device_suite.jsonl"
# Environment: PYTHON (default python3: the interpreter of every step); VTIMELLM_SUITE_EXTRA_MODULES,
# extra module names (space- or comma-separated) the dependency check requires, used by the tests to
# check that a missing module is reported.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

usage() {
  awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}

die() {
  echo "device_suite: error: $*" >&2
  exit 2
}

log() {
  echo "device_suite: $*" >&2
}

absolute() {
  if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}

OUT_FILE="${OUT:+$OUT/device_suite.jsonl}"
OUT_FILE="${OUT_FILE:-device_suite.jsonl}"
WHEELS="" TORCH_BENCH="" SIZE="7b" BUDGET=540 STEP_RC=0 STEPS=""
for candidate in "$ROOT/shared/bench" "$ROOT/../shared/bench"; do
  if [[ -z $TORCH_BENCH && -d $candidate ]]; then TORCH_BENCH="$candidate"; fi
done
while (($#)); do
  case "$1" in
    --out) OUT_FILE="${2:?--out needs a file}"; shift 2 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --torch-bench) TORCH_BENCH="${2:?--torch-bench needs a folder}"; shift 2 ;;
    --size) SIZE="${2:?--size needs 7b or tiny}"; shift 2 ;;
    --budget-s) BUDGET="${2:?--budget-s needs seconds}"; shift 2 ;;
    --steps) STEPS="${2:?--steps needs step names}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ $SIZE == 7b || $SIZE == tiny ]] || die "--size must be 7b or tiny, got $SIZE"
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget-s must be a whole number of seconds, got $BUDGET"
KNOWN_STEPS=(train_none train_none_xla train_full train_lora torch_train_ckpt torch_nockpt_static decode eval_1024 clip
  torch_clip_compiled serve eval train_none_cublas train_none_dbuf decode_stacked decode_no_cmdbuf decode_triton
  clip_xla clip_cublas train_2048 trace_train
  trace_decode)
for step in ${STEPS//,/ }; do
  [[ " ${KNOWN_STEPS[*]} " == *" $step "* ]] || die "--steps: no step named $step (the steps: ${KNOWN_STEPS[*]})"
done
# Made absolute before the cd below, so relative paths mean what they meant to the caller.
OUT_FILE="$(absolute "$OUT_FILE")"
if [[ -n $WHEELS ]]; then WHEELS="$(absolute "$WHEELS")"; fi
if [[ -n $TORCH_BENCH ]]; then TORCH_BENCH="$(absolute "$TORCH_BENCH")"; fi
LOG_FILE="${OUT_FILE%.jsonl}.log"
TRACE_DIR="${OUT_FILE%.jsonl}_traces"
mkdir -p "$(dirname "$OUT_FILE")"
rm -f "$TRACE_DIR"/{train,decode}.{xplane.pb,perfetto.json.gz}  # a trace skipped now leaves none of an earlier run
: >"$OUT_FILE"
: >"$LOG_FILE"

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
SECONDS=0

# Prints one JSON object of key/value pairs ("step" first; digits become numbers) and appends it to
# the output file.
EMIT_PY='
import json, sys
print(json.dumps({k: int(v) if v.isdigit() else v for k, v in zip(sys.argv[1::2], sys.argv[2::2])}))
'
emit() {
  "$PYTHON" -c "$EMIT_PY" "$@" | tee -a "$OUT_FILE"
}

# Tags each JSON line of a step's stdout with the step's name; adds an error line (with the end of
# its stderr) when the step failed, timed out or printed nothing.
TAG_PY='
import json, sys
name, rc, limit, wall, out_path, err_path = sys.argv[1:]
rc, printed = int(rc), 0
for line in open(out_path, errors="replace"):
  try:
    record = json.loads(line)
  except ValueError:
    continue
  if isinstance(record, dict):
    print(json.dumps({"step": name, **record, "step_wall_s": int(wall)}))
    printed += 1
if rc or not printed:
  tail = open(err_path, errors="replace").read().strip().splitlines()[-12:]
  why = (f"timed out after {limit} s" if rc == 124 else f"killed (timed out after {limit} s, or out of memory)"
         if rc == 137 else f"exit status {rc}" if rc else "exit status 0 but no JSON line")
  print(json.dumps({"step": name, "error": why + (": " + "\n".join(tail) if tail else ""), "rc": rc,
                    "wall_s": int(wall)}))
'

# Whether --steps (if given) names the step (train_none's fallback goes with it).
selected() {
  [[ -z $STEPS || ",$STEPS," == *",$1,"* || ($1 == train_none_xla && ",$STEPS," == *",train_none,"*) ]]
}

# run_step NAME LIMIT_S NEED_S COMMAND...: runs COMMAND under a timeout of LIMIT_S (or what is left of
# the budget), unless less than NEED_S is left; its JSON lines go to the output file, tagged. The limits
# are the 7B ones; at tiny shapes every step gets TINY_LIMIT_S and needs 5 s.
TINY_LIMIT_S=120
run_step() {
  local name=$1 limit=$2 need=$3 left rc=0 start
  shift 3
  if ! selected "$name"; then return 0; fi
  if [[ $SIZE == tiny ]]; then limit=$TINY_LIMIT_S need=5; fi
  left=$((BUDGET - SECONDS))
  if ((left < need)); then
    emit step "$name" skipped "budget: ${left} s of ${BUDGET} s left, the step needs about ${need} s"
    return 0
  fi
  if ((limit > left)); then limit=$left; fi
  log "$name (timeout ${limit} s, $((BUDGET - SECONDS)) s of the budget left): $*"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" </dev/null >"$TMP/stdout" 2>"$TMP/stderr" || rc=$?
  "$PYTHON" -c "$TAG_PY" "$name" "$rc" "$limit" "$((SECONDS - start))" "$TMP/stdout" "$TMP/stderr" |
    tee -a "$OUT_FILE"
  { echo "== $name: $* (exit status $rc after $((SECONDS - start)) s)"; cat "$TMP/stderr"; } >>"$LOG_FILE"
  log "$name: exit status $rc after $((SECONDS - start)) s"
  STEP_RC=$rc
}

# The carried wheels, installed before the header so that it reports the versions the steps run.
if [[ -n $WHEELS ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]})); then
    log "installing ${#wheels[@]} wheels from $WHEELS"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$TMP/site" "${wheels[@]}" >&2; then
      export PYTHONPATH="$TMP/site:$PYTHONPATH"
    else
      log "pip install of the wheels in $WHEELS failed"
    fi
  else
    log "no wheels in $WHEELS"
  fi
fi

# The header: device, date, commit, versions. Runs before the module check, so it never needs more
# than the standard library, jax and torch, and it reports what of those is absent.
HEADER_PY='
import datetime, json, os, platform, sys
record = {"step": "header", "suite": "bench/device_suite.sh", "size": sys.argv[1], "budget_s": int(sys.argv[2]),
          "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "git_commit": sys.argv[3] or None, "git_dirty": bool(sys.argv[4]) if sys.argv[3] else None,
          "host": platform.node(), "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS")}
try:
  import jax, jaxlib
  device = jax.devices()[0]
  record.update(jax=jax.__version__, jaxlib=jaxlib.__version__, device=device.device_kind, backend=device.platform,
                device_count=jax.device_count())
except Exception as e:  # reported, not fatal: the steps say the rest
  record["jax_error"] = repr(e)[:300]
for name in ("flax", "transformers", "torch"):
  try:
    record[name] = __import__(name).__version__
  except Exception as e:
    record[f"{name}_error"] = repr(e)[:300]
print(json.dumps(record))
'
# SUITE_GIT_COMMIT names the commit where the tree's own git cannot (a copy of a working tree).
commit="${SUITE_GIT_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)}"
dirty="$(if [[ -n $commit ]]; then git -C "$ROOT" status --porcelain 2>/dev/null | head -c 1; fi)"
"$PYTHON" -c "$HEADER_PY" "$SIZE" "$BUDGET" "$commit" "$dirty" | tee -a "$OUT_FILE"

# The modules the steps import (pyproject.toml's dependencies they reach, plus etils), as import=pip
# names; a bare CUDA machine with jax, flax, optax, orbax-checkpoint, transformers and torch lacks some.
# OPTIONAL: dependencies of the project that no step here imports, only reported.
REQUIRED=(jax=jax flax=flax optax=optax orbax.checkpoint=orbax-checkpoint etils=etils grain=grain
  ml_collections=ml-collections tensorflow_datasets=tensorflow-datasets array_record=array-record
  transformers=transformers tokenizers=tokenizers sentencepiece=sentencepiece google.protobuf=protobuf
  safetensors=safetensors numpy=numpy ml_dtypes=ml-dtypes tqdm=tqdm PIL=pillow)
OPTIONAL=(av=av tensorboardX=tensorboardX pycocoevalcap=pycocoevalcap matplotlib=matplotlib)
extras="${VTIMELLM_SUITE_EXTRA_MODULES:-}"
for extra in ${extras//,/ }; do
  REQUIRED+=("$extra=$extra")
done

# Imports each module (a real import: an installed module whose own dependency is missing is broken);
# prints the JSON line and writes the pip names of the required ones absent or broken to argv[1].
# argv[2]: how many of the pairs after it are required; the rest are optional.
DEPS_PY='
import importlib, json, sys
pairs, n_required = sys.argv[3:], int(sys.argv[2])
absent, broken, optional_missing, versions = [], {}, [], {}
for i, pair in enumerate(pairs):
  module, pip_name = pair.split("=", 1)
  try:
    versions[module] = getattr(importlib.import_module(module), "__version__", None)
    continue
  except ModuleNotFoundError as e:
    why = None if e.name and (module == e.name or module.startswith(e.name + ".")) else repr(e)[:200]
  except Exception as e:
    why = repr(e)[:200]
  if i >= n_required:
    optional_missing.append(module)
    continue
  if why is None:
    absent.append(module)
  else:
    broken[module] = why
  open(sys.argv[1], "a").write(pip_name + "\n")
print(json.dumps({"step": "deps", "checked": [p.split("=")[0] for p in pairs[:n_required]], "missing": absent,
                  "broken": broken, "optional_missing": optional_missing,
                  "versions": {k: v for k, v in versions.items() if isinstance(v, str)}}))
'
: >"$TMP/missing"
"$PYTHON" -c "$DEPS_PY" "$TMP/missing" "${#REQUIRED[@]}" "${REQUIRED[@]}" "${OPTIONAL[@]}" | tee -a "$OUT_FILE"
if [[ -s $TMP/missing ]]; then
  where="${WHEELS:+not among the wheels in $WHEELS}"
  emit step deps error "missing modules: $(tr '\n' ' ' <"$TMP/missing")(${where:-give their wheels with --wheels DIR})"
  log "not measuring anything: modules are missing or broken: $(tr '\n' ' ' <"$TMP/missing")(--wheels DIR installs them)"
  exit 3
fi

# The torch baselines need CUDA (they hard-code it) and their folder.
torch_skip=""
if [[ $SIZE == tiny ]]; then
  torch_skip="--size tiny: the baselines have no tiny shapes"
elif [[ -z $TORCH_BENCH || ! -d $TORCH_BENCH ]]; then
  torch_skip="no baseline folder (--torch-bench ${TORCH_BENCH:-not given})"
fi
if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  torch_skip="no CUDA device"
fi
torch_step() {
  if ! selected "$1"; then return 0; fi
  if [[ -n $torch_skip ]]; then emit step "$1" skipped "$torch_skip"; else run_step "$@"; fi
}

peft_baseline=("$PYTHON" "$TORCH_BENCH/torch_peft_baseline.py")
clip_baseline=("$PYTHON" "$TORCH_BENCH/torch_clip_baseline.py")
flags() {  # the caller's XLA_FLAGS with more flags after them
  echo "${XLA_FLAGS:+$XLA_FLAGS }$*"
}
if [[ $SIZE == 7b ]]; then
  train=("$PYTHON" -m vtimellm_jax.bench.train --size 7b --batch 8)
  decode=("$PYTHON" -m vtimellm_jax.bench.decode --size 7b)
  clip=("$PYTHON" -m vtimellm_jax.bench.clip --config clip_vit_l14 --batch-sizes "100,800" --dtype float16)
  eval_long=("$PYTHON" -m vtimellm_jax.bench.eval --size 7b --queries 16 --alone-queries 2 --batch-size 16
    --max-new-tokens 1024)
  eval_short=("$PYTHON" -m vtimellm_jax.bench.eval --size 7b --queries 32 --batch-size 16 --max-new-tokens 64)
  serve=("$PYTHON" -m vtimellm_jax.bench.serve --size 7b --requests 64 --slots 64)
  train_2048=(--text-len 1949 --remat full --loss-chunk 512 --warmup 1 --iters 3)
  trace_train=(--remat none --warmup 1 --iters 1)
  trace_decode=(--repeats 1)
else
  # A few iterations at tiny shapes: each step is mostly Python start-up and compilation.
  train=("$PYTHON" -m vtimellm_jax.bench.train --size tiny --batch 2 --text-len 24 --lora-rank 4 --warmup 1 --iters 1)
  decode=("$PYTHON" -m vtimellm_jax.bench.decode --size tiny --prompt-len 8 --new-tokens 4 --repeats 1)
  clip=("$PYTHON" -m vtimellm_jax.bench.clip --config tiny --batch-sizes "8,32" --warmup 1 --iters 2)
  eval_long=("$PYTHON" -m vtimellm_jax.bench.eval --size tiny --queries 4 --alone-queries 1 --batch-size 4
    --max-new-tokens 32)
  eval_short=("$PYTHON" -m vtimellm_jax.bench.eval --size tiny --queries 4 --batch-size 2 --max-new-tokens 4)
  serve=("$PYTHON" -m vtimellm_jax.bench.serve --size tiny --requests 6 --slots 3 --context 640 --max-tokens 4)
  train_2048=(--text-len 40 --remat full --loss-chunk 16)
  trace_train=(--remat none)
  trace_decode=()
fi

run_step train_none 150 60 "${train[@]}" --remat none
if ((STEP_RC)); then  # cuDNN attention is what a GPU adds over the CPU tests: try XLA's
  run_step train_none_xla 150 90 "${train[@]}" --remat none --attention xla
fi
run_step train_full 150 60 "${train[@]}" --remat full
run_step train_lora 150 60 "${train[@]}" --remat lora
torch_step torch_train_ckpt 150 60 env SIZE=7b B=8 "${peft_baseline[@]}"
torch_step torch_nockpt_static 300 150 env SIZE=7b B=8 CKPT=0 STATIC=1 "${peft_baseline[@]}"
run_step decode 120 40 "${decode[@]}"
run_step eval_1024 180 60 "${eval_long[@]}"
run_step clip 90 40 "${clip[@]}"
torch_step torch_clip_compiled 240 150 env COMPILE=1 "${clip_baseline[@]}"
run_step serve 180 60 "${serve[@]}"
run_step eval 120 40 "${eval_short[@]}"
run_step decode_int8 120 45 "${decode[@]}" --quant int8
run_step decode_nf4 120 45 "${decode[@]}" --quant nf4
run_step train_qlora 150 60 "${train[@]}" --remat none --quant nf4
# A/Bs, each against its figure above, measured on the same machine.
run_step train_none_cublas 150 60 env XLA_FLAGS="$(flags --xla_gpu_enable_triton_gemm=false)" "${train[@]}" --remat none
run_step train_none_dbuf 150 60 env XLA_FLAGS="$(flags --xla_gpu_enable_while_loop_double_buffering=true)" \
  "${train[@]}" --remat none
run_step decode_stacked 120 45 "${decode[@]}" --layout stacked
run_step decode_no_cmdbuf 100 45 env XLA_FLAGS="$(flags --xla_gpu_enable_command_buffer=)" "${decode[@]}"
run_step decode_triton 100 45 env XLA_FLAGS="$(flags --xla_gpu_enable_triton_gemm=true)" "${decode[@]}"
run_step clip_xla 90 40 "${clip[@]}" --attention xla
run_step clip_cublas 90 40 env XLA_FLAGS="$(flags --xla_gpu_enable_triton_gemm=false)" "${clip[@]}"
run_step train_2048 150 70 "${train[@]}" "${train_2048[@]}"
# Traces of one step each, kept beside the output file (on the device under $OUT, so they come back).
run_step trace_train 120 60 "${train[@]}" "${trace_train[@]}" --profile-dir "$TRACE_DIR"
run_step trace_decode 90 45 "${decode[@]}" "${trace_decode[@]}" --profile-dir "$TRACE_DIR"
emit step end wall_s "$SECONDS" budget_s "$BUDGET"
log "done in $SECONDS s: $OUT_FILE"
