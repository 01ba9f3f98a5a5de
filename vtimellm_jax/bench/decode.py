"""Generation speed at batch 1: prefill seconds, decode tokens/s, and tokens/s end to end.

  python -m vtimellm_jax.bench.decode --size 7b --dtype bfloat16          # GPU, Vicuna-7B shapes
  python -m vtimellm_jax.bench.decode --size tiny --new-tokens 32 --repeats 2   # CPU smoke test
  python $TORCH_BENCH/torch_peft_baseline.py                           # HF generate, same shapes

Weights are random (speed does not depend on their values) and the stop token is disabled, so
every run generates exactly --new-tokens tokens. The default shapes are those of the torch baseline
(a prompt of 160 embeddings: 100 frame features + 60 text tokens; 128 new tokens, greedy), whose
`tokens_per_s` is new tokens over the whole `generate` call; `tokens_per_s` here is the same ratio.
`decode_tokens_per_s` leaves out the prefill: (new_tokens - 1) / (t(new_tokens) - t(1)), and
`weight_gb_per_s` is the parameter bytes read per second at that rate. Decode at batch 1 is bound
by reading every weight once per token: `read_gb_per_s` adds each row's KV cache up to its
position (`decode_bytes`), and `hbm_fraction` is that over the device's HBM bandwidth where its
kind is known (`device_peaks`). One JSON line on stdout per batch size.

`--quant int8|nf4|fp4` holds the decoder projections quantised, as `chat --quant` does. `--cost-only
[TARGET]` times nothing: it compiles one decode step from shapes alone (for a GPU preset such as
1xH100 on a host without one, as `train --dry-run` does) and prints XLA's cost analysis of it, the
bytes a step accesses at least, so formats compare without the device.

`--profile-dir DIR` then traces one call of the prefill and one decode step (2 new tokens, compiled
before the trace) with jax.profiler into DIR/decode.{xplane.pb,perfetto.json.gz}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from vtimellm_jax import cli_types, device_peaks, xla_flags



def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vtimellm_jax.bench.decode", description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="7b", choices=("tiny", "7b", "13b"), help="LLaMA preset")
  parser.add_argument("--dtype", default="auto", choices=cli_types.DTYPES_OR_AUTO,
                      help="weights and compute; auto: bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--prompt-len", type=cli_types.int_at_least(1), default=160, help="prompt embeddings (default: %(default)s)")
  parser.add_argument("--new-tokens", type=cli_types.int_at_least(1), default=128, help="tokens generated (default: %(default)s)")
  parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default: %(default)s)")
  parser.add_argument("--temperature", type=cli_types.number_in(0), default=0.0, help="0: greedy (default); the release samples at 0.05")
  parser.add_argument("--repeats", type=cli_types.int_at_least(1), default=3, help="timed runs; the best is reported")
  parser.add_argument("--layout", default="answering", choices=("answering", "stacked"),
                      help="the answering layout every answering command runs (one module per layer, fused "
                           "projections; docs/models.md), or the stacked layers training runs, for an A/B")
  parser.add_argument("--quant", default="none", choices=cli_types.ANSWER_QUANTS,
                      help="decoder projections quantised as `chat --quant` holds them (default: %(default)s)")
  parser.add_argument("--cost-only", metavar="TARGET", nargs="?", const="here",
                      help="no timing: XLA's cost analysis of one decode step (bytes accessed, flops) per batch "
                           "size, compiled from shapes alone for this machine's first device ('here') or a GPU "
                           "preset of configs/topologies.py (e.g. 1xH100: needs JAX_PLATFORMS=cpu and the cuda extra)")
  parser.add_argument("--profile-dir", metavar="DIR",
                      help="trace the prefill and one decode step with jax.profiler into "
                           "DIR/decode.{xplane.pb,perfetto.json.gz}")
  return parser.parse_args(argv)


def _dtype(name: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top

  if name != "auto":
    return name
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def random_model(size: str, dtype: str, layout: str = "answering", quant: str = "none"):
  """Returns a LLaMA of preset `size` with random weights created on the device, in `layout`, its
  decoder projections quantised as `answerer.Answerer` quantises them (`quant`: `cli_types.ANSWER_QUANTS`)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import answering, families, load, lora  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models.llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top

  config = families.preset(families.preset_of_size(size), dtype=dtype, param_dtype=dtype)
  # A jitted init builds the weights on the device, without a host copy of 13 GB; then the layers
  # are held one array per layer, as every answering command holds them.
  model = load.sharded_model(lambda: LlamaForCausalLM(config, nnx.Rngs(0)), what="the benchmark model")
  model = answering.answering_layout(model) if layout == "answering" else model
  if quant != "none":
    lora.quantize_for_answering(model, quant)
  return model


def weight_bytes(model) -> int:
  """Returns the bytes of the model's weights as held: float parameters and quantised kernels."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import quant  # pylint: disable=g-import-not-at-top

  held = nnx.state(model, nnx.Any(nnx.Param, quant.QuantizedWeight))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held))


def step_cost(size: str, dtype: str, quant: str, batch: int = 1, prompt_len: int = 160, device=None) -> dict:
  """Returns XLA's cost analysis of one decode step (batch `batch`, the window after `prompt_len`)
  of the answering layout, compiled from abstract arrays for `device` (default: the first device;
  a compile-only GPU from `aot.target_devices` on a host without one): bytes accessed and flops.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vtimellm_jax import sharding  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.inference import generate  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import answering, families, kv_cache, lora  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models.llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top

  config = families.preset(families.preset_of_size(size), dtype=dtype, param_dtype=dtype)

  def build():
    model = answering.answering_layout(LlamaForCausalLM(config, nnx.Rngs(0)))
    if quant != "none":
      lora.quantize_for_answering(model, quant)
    return model

  model = nnx.eval_shape(build)
  graphdef, state = nnx.split(model)
  cache_len = kv_cache.cache_length(prompt_len + 128)
  cache = jax.eval_shape(lambda: model.init_cache(batch, cache_len))
  window = kv_cache.decode_window(prompt_len + 1, cache_len)

  def step(state, cache, tokens_b, positions_bt):
    step = kv_cache.CacheStep(positions_bt=positions_bt, window=window)
    return generate.decode_step(nnx.merge(graphdef, state), cache, tokens_b, step)

  device = device or jax.devices()[0]
  placed = jax.sharding.SingleDeviceSharding(device)
  args = (state, cache, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch, 1), jnp.int32))
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), args)
  # Traced under the device's mesh, so that what depends on the platform (`sharding.target_platform`)
  # is decided for that device rather than for this host.
  with jax.sharding.use_abstract_mesh(sharding.single_device_mesh(device).abstract_mesh):
    compiled = jax.jit(step).lower(*args).compile()
  cost = compiled.cost_analysis()  # None from a compile-only GPU client
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  memory = compiled.memory_analysis()
  weights = weight_bytes(model)
  window_bytes = batch * kv_cache.bytes_per_position(config) * window
  return dict(what="jax_decode_step_cost", size=size, dtype=dtype, quant=quant, batch=batch, window=window,
              weight_bytes=weights,
              # What a step must read: every weight as held and the cache window. A program that
              # dequantised a kernel into memory would show it in its temporaries.
              min_read_bytes=weights + window_bytes, temp_bytes=int(memory.temp_size_in_bytes),
              bytes_accessed=int(cost["bytes accessed"]) if "bytes accessed" in cost else None,
              flops=int(cost["flops"]) if "flops" in cost else None, device=str(device.device_kind))


def decode_bytes(weight_bytes: int, kv_bytes_per_position: int, batch: int, prompt_len: int, new_tokens: int) -> int:
  """Returns the bytes a generate call reads at least: every weight once per token, each row's cache up to its position.

  The prefill and each of the new_tokens - 1 decode steps read the weights; decode step i (from 1)
  reads each row's keys and values of prompt_len + i positions.
  """
  steps = new_tokens - 1
  return new_tokens * weight_bytes + batch * kv_bytes_per_position * (steps * prompt_len + steps * (steps + 1) // 2)


def _best_time(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def bench(model, batch: int, prompt_len: int, new_tokens: int, temperature: float, repeats: int,
          profile_dir: str | None = None) -> dict:
  """Returns the timings of generating `new_tokens` after random prompts of `prompt_len` embeddings."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.inference import generate  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import kv_cache  # pylint: disable=g-import-not-at-top

  cfg = model.config
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len))
  embeds = jax.block_until_ready(model.model.embed(jax.numpy.asarray(ids)))
  lengths = np.full((batch,), prompt_len, np.int32)

  def run(n: int) -> None:
    config = generate.GenerationConfig(max_new_tokens=n, temperature=temperature, eos_id=-1)
    out = generate.generate(model, embeds, lengths, config, seed=0)
    assert out.steps == n, (out.steps, n)

  start = time.perf_counter()
  run(new_tokens)  # compiles
  run(1)
  compile_s = time.perf_counter() - start
  full = _best_time(lambda: run(new_tokens), repeats)
  prefill = _best_time(lambda: run(1), repeats)
  decode_rate = (new_tokens - 1) / max(full - prefill, 1e-9)
  weights = weight_bytes(model)
  # Bytes of the decode steps alone (the prefill's left out, as decode_rate leaves out its time).
  step_bytes = (decode_bytes(weights, kv_cache.bytes_per_position(cfg), batch, prompt_len, new_tokens)
                - weights) / max(new_tokens - 1, 1)
  traced = {}
  if profile_dir:
    from vtimellm_jax.bench import trace  # pylint: disable=g-import-not-at-top

    run(2)  # compiles the two-token program outside the trace
    traced = trace.trace_one_call(lambda: run(2), profile_dir, "decode")
  return dict(what="jax_decode", size=None, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
              dtype=cfg.dtype, temperature=temperature, s=round(full, 4), prefill_s=round(prefill, 4),
              tokens_per_s=round(batch * new_tokens / full, 1),
              decode_tokens_per_s=round(batch * decode_rate, 1),
              weight_gb_per_s=round(weights * decode_rate / 1e9, 1),
              read_gb_per_s=round(step_bytes * decode_rate / 1e9, 1),
              **device_peaks.fractions(jax.devices()[0], bytes_per_s=step_bytes * decode_rate),
              compile_s=round(compile_s, 1), device=str(jax.devices()[0].device_kind), **traced)


def main(argv=None) -> int:
  args = _parse_args(argv)
  xla_flags.use_answering_flags()  # what chat and eval run with
  if args.cost_only:
    device = None
    if args.cost_only != "here":
      from vtimellm_jax.training import aot  # pylint: disable=g-import-not-at-top

      device = aot.target_devices(aot.resolve(args.cost_only))[0]
    dtype = args.dtype if args.dtype != "auto" else ("float32" if args.cost_only == "here" and _dtype("auto") ==
                                                     "float32" else "bfloat16")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
      print(json.dumps(step_cost(args.size, dtype, args.quant, batch, args.prompt_len, device)), flush=True)
    return 0
  model = random_model(args.size, _dtype(args.dtype), args.layout, args.quant)
  for batch in [int(b) for b in args.batch_sizes.split(",")]:
    record = bench(model, batch, args.prompt_len, args.new_tokens, args.temperature, args.repeats,
                   args.profile_dir if batch == int(args.batch_sizes.split(",")[0]) else None)
    record["size"], record["layout"], record["quant"] = args.size, args.layout, args.quant
    record["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
