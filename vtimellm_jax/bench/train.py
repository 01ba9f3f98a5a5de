"""LoRA training-step throughput of the stage-2 recipe on random weights (tokens/s, TFLOP/s, memory).

  python -m vtimellm_jax.bench.train --size 7b --batch 8 --remat none
  python -m vtimellm_jax.bench.train --size 7b --batch 8 --remat none --quant nf4   # QLoRA
  python -m vtimellm_jax.bench.train --size tiny --batch 2 --text-len 28 --iters 2   # CPU smoke test
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m vtimellm_jax.bench.train --size 7b --remat lora

The model, its trainable/frozen split, the optimizer and the jitted step are the trainer's own
(`training.trainer.TrainState` of the stage-2 recipe, on one device), so what is measured is what
trains. Shapes follow the PyTorch baseline `torch_peft_baseline.py`: B rows of 100 video features + T_TEXT
text tokens, labels on the text after the first 60 answer-free positions, and useful FLOPs counted
the same way (4 x frozen matmul parameters + 3 x attention per token), so the JSON lines of both
scripts compare directly. XLA_FLAGS is taken from the environment as it is (training adds no flags
of its own, unlike the answering commands of vtimellm_jax/xla_flags.py) and recorded in each line,
so flags are compared one process per setting. `--quant` holds the frozen decoder projections
quantised (the QLoRA base, random weights quantised on the device); its useful FLOPs are counted as
the float step's, so the two compare as tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from vtimellm_jax import cli_types, device_peaks
from vtimellm_jax.errors import UserError

NUM_FEATURES = 100


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="vtimellm-jax bench train", description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="7b", choices=("tiny", "7b", "13b"))
  parser.add_argument("--batch", type=cli_types.int_at_least(1), default=8)
  # 157 text ids incl. the placeholder -> 256 positions, the baseline's L (156 text + 100 video).
  parser.add_argument("--text-len", type=cli_types.int_at_least(2), default=157, help="text ids per row incl. the placeholder (L = text + 99)")
  # models/llama.py's REMAT_MODES, spelled out so that --help starts no JAX.
  parser.add_argument("--remat", default="none", choices=("none", "full", "save_dots", "lora"))
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "splash", "per_head"),
                      help="attention kernel; auto: cuDNN on GPU, splash on TPU (16-bit), per_head on CPU, else XLA")
  parser.add_argument("--loss-chunk", type=cli_types.int_at_least(0), default=0, metavar="N",
                      help="compute the loss N positions at a time (the 7B/13B recipe: 512); 0: full logits")
  parser.add_argument("--lora-rank", type=cli_types.int_at_least(1), default=64)
  parser.add_argument("--quant", default="none", choices=cli_types.ANSWER_QUANTS,
                      help="the frozen decoder projections held quantised, as `model.quant` holds a QLoRA base "
                           "(nf4, fp4: doubly quantised; default: %(default)s)")
  parser.add_argument("--warmup", type=cli_types.int_at_least(0), default=2)
  parser.add_argument("--iters", type=cli_types.int_at_least(1), default=10)
  parser.add_argument("--profile-dir", metavar="DIR",
                      help="after timing, trace one more step with jax.profiler into "
                           "DIR/train.{xplane.pb,perfetto.json.gz}")
  return parser.parse_args(argv)


def run_bench(args: argparse.Namespace) -> dict:
  """Returns the measurement dict of one configuration."""
  if args.loss_chunk < 0:
    raise UserError(f"--loss-chunk must be >= 0 (0: full logits), got {args.loss_chunk}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from vtimellm_jax import sharding
  from vtimellm_jax.training import config_files, step as step_lib, trainer

  on_cpu = jax.default_backend() == "cpu"
  dtype = ("float32" if on_cpu else "bfloat16") if args.dtype == "auto" else args.dtype
  # The stage-2 recipe (LoRA with dropout 0.05 on every projection, AdamW) with no model.base: the
  # preset's random weights, created on the device.
  run = config_files.bundled("stage2").get_config(args.size)
  run.model.update(dict(dtype=dtype, param_dtype=dtype, remat=args.remat, attention_impl=args.attention,
                        loss_chunk=args.loss_chunk, quant="" if args.quant == "none" else args.quant))
  run.lora.rank, run.lora.alpha = args.lora_rank, 2.0 * args.lora_rank
  state = trainer.TrainState(run, sharding.single_device_mesh(), None, total_steps=1000)
  config = state.model_config
  trainable, opt_state, frozen = state.trainable, state.opt_state, state.frozen
  step = state.jit_step()

  b, t = args.batch, args.text_len
  rng = np.random.RandomState(0)
  ids = rng.randint(3, config.vocab_size, (1, b, t)).astype(np.int32)
  # The baseline splices its features after text token 40 and trains on text from token 60 on.
  placeholder = min(40, t // 4)
  ids[:, :, placeholder] = -200
  labels = np.full((1, b, t), -100, np.int32)
  answer_from = min(placeholder + 21, t - 1)
  labels[:, :, answer_from:] = ids[:, :, answer_from:]
  batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "attention_mask": jnp.ones((1, b, t), jnp.int32),
           "features": jnp.asarray(rng.randn(1, b, NUM_FEATURES, 768).astype(np.float16))}
  key = jax.random.key(0)

  t_compile = time.perf_counter()
  compiled = step.lower(trainable, opt_state, frozen, batch, jnp.int32(0), key).compile()
  t_compile = time.perf_counter() - t_compile
  analysis = compiled.memory_analysis()  # the compiler's own figures, as the AOT dry run reports them
  for i in range(args.warmup):
    trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, jnp.int32(i), key)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(args.iters):
    trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, jnp.int32(i), key)
  loss = float(metrics["loss"])
  seconds = (time.perf_counter() - t0) / args.iters
  seq = t - 1 + NUM_FEATURES
  tokens_per_s = b * seq / seconds
  traced = {}
  if args.profile_dir:
    from vtimellm_jax.bench import trace  # pylint: disable=g-import-not-at-top

    def one_step():
      nonlocal trainable, opt_state
      trainable, opt_state, step_metrics = compiled(trainable, opt_state, frozen, batch, jnp.int32(args.iters), key)
      jax.block_until_ready(step_metrics)

    traced = trace.trace_one_call(one_step, args.profile_dir, "train")
  useful_flops = step_lib.training_flops_per_token(config, seq) * tokens_per_s
  stats = jax.devices()[0].memory_stats() or {}
  return dict(what="jax_lora_train", size=args.size, B=b, L=seq, remat=args.remat, dtype=dtype,
              attention=args.attention, loss_chunk=args.loss_chunk, quant=args.quant,
              backend=jax.default_backend(), step_s=round(seconds, 4), tokens_per_s=round(tokens_per_s, 1),
              useful_tflops=round(useful_flops / 1e12, 2),
              **device_peaks.fractions(jax.devices()[0], flops_per_s=useful_flops),
              peak_mem_gb=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2), compile_s=round(t_compile, 1),
              loss=loss, **_analysis_gib(analysis), **traced)


def _analysis_gib(analysis) -> dict:
  """The compiled step's memory analysis in GiB (temporaries and arguments per device); {} without one."""
  if analysis is None:
    return {}
  return dict(temp_gib=round(analysis.temp_size_in_bytes / 2**30, 2),
              argument_gib=round(analysis.argument_size_in_bytes / 2**30, 2))


def main(argv=None) -> int:
  print(json.dumps(run_bench(_parse_args(argv)) | {"xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
