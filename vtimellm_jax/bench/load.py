"""Peak host memory and time of loading a model directory (or converting an HF LLaMA), one JSON line.

  python -m vtimellm_jax.bench.load --model ckpt/vicuna-7b
  python -m vtimellm_jax.bench.load --convert-from hf/vicuna-7b-v1.5      # `convert llama` to a temporary dir
  python -m vtimellm_jax.bench.load --model ckpt/vicuna-7b --mesh-fsdp 8  # split over 8 devices
  python -m vtimellm_jax.bench.load --model ckpt/vicuna-7b --quant nf4    # quantised as it loads (QLoRA)
  python -m vtimellm_jax.bench.load --make-random-hf /tmp/llama-0.74b      # a random bf16 HF LLaMA to measure

Each measurement runs in a fresh process, and so does a baseline: the same process loading a tiny
model (JAX started, libraries imported, the load path compiled). The figure that matters is the
measured process's peak resident memory above the baseline's, over the weights' bytes:
`ratio` = (peak_rss - baseline_peak_rss) / weight_bytes (`load_model` holds the model once plus
the array in flight; converting holds the output once plus the tensor in hand). On a CPU host the
devices' memory is host memory, so the loaded arrays count too.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from vtimellm_jax import cli_types

# The shape `--make-random-hf` writes: 0.74B parameters, 1.48 GB in bfloat16.
RANDOM_HF = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_layers=12, num_heads=16, num_kv_heads=16)


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vtimellm_jax.bench.load", description=__doc__.splitlines()[0])
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--model", help="a model directory to load with load_model")
  what.add_argument("--convert-from", help="an HF LLaMA directory to convert (convert llama) into a temporary dir")
  what.add_argument("--make-random-hf", metavar="DIR",
                    help=f"write a random bfloat16 HF LLaMA of {RANDOM_HF} to DIR (safetensors) and exit")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="--convert-from: storage dtype")
  parser.add_argument("--mesh-fsdp", type=cli_types.int_at_least(1), default=1, help="split the loaded model over this many devices")
  parser.add_argument("--quant", default="none", choices=cli_types.ANSWER_QUANTS,
                      help="--model: load the decoder projections quantised as they are read (config model.quant); "
                           "`ratio` stays over the float weights' bytes")
  parser.add_argument("--child", choices=("load", "convert"), help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _child(args: argparse.Namespace) -> dict:
  """Runs one load or conversion in this process; returns its seconds and the weights' bytes."""
  import jax
  import numpy as np
  from flax import nnx

  from vtimellm_jax import model_io, sharding
  from vtimellm_jax.convert import llama as llama_convert
  from vtimellm_jax.models import load

  jax.numpy.zeros(1).block_until_ready()  # the backend starts before the clock
  start = time.perf_counter()
  if args.child == "convert":
    llama_convert.convert_llama(args.convert_from, args.out, dtype=args.dtype)
    directory = args.out
  else:
    devices = jax.devices()[:args.mesh_fsdp]
    mesh = sharding.make_mesh(data=1, fsdp=len(devices), tensor=1, devices=devices)
    quant = {"quant": args.quant} if args.quant != "none" else {}
    jax.block_until_ready(jax.tree.leaves(nnx.state(load.load_model(args.model, mesh=mesh, **quant))))
    directory = args.model
  seconds = time.perf_counter() - start
  weights = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in model_io.saved_arrays(directory).values())
  return {"seconds": seconds, "weight_bytes": weights}


def _measure(argv: list[str]) -> tuple[dict, int]:
  """Runs this module as a child with `argv`; returns (its JSON result, its peak RSS in bytes)."""
  env = dict(os.environ)
  if "--mesh-fsdp" in argv and env.get("JAX_PLATFORMS", "cpu") == "cpu":
    n = argv[argv.index("--mesh-fsdp") + 1]
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen([sys.executable, "-m", "vtimellm_jax.bench.load", *argv], stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env)
    out = proc.stdout.read()
    proc.stdout.close()
    # Reaped here rather than by Popen, to read the child's own peak resident memory.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
      err.seek(0)
      raise RuntimeError(f"bench load child {' '.join(argv)} failed:\n{err.read()[-3000:]}")
  return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024


def run(args: argparse.Namespace) -> dict:
  """Returns the measurement: the target's and the tiny baseline's peak RSS, time, and the ratio."""
  from flax import nnx

  from vtimellm_jax.models import llama, load
  from vtimellm_jax.models.llama import LlamaForCausalLM

  with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
    tiny = pathlib.Path(tmp) / "tiny"
    load.save_model(LlamaForCausalLM(llama.tiny(param_dtype="bfloat16", dtype="bfloat16"), nnx.Rngs(0)), tiny)
    common = ["--mesh-fsdp", str(args.mesh_fsdp)]
    _, baseline = _measure(["--child", "load", "--model", str(tiny), *common])
    if args.model:
      result, peak = _measure(["--child", "load", "--model", args.model, "--quant", args.quant, *common])
      what, source = "load_model", args.model
    else:
      out = pathlib.Path(tmp) / "converted"
      result, peak = _measure(["--child", "convert", "--convert-from", args.convert_from, "--out", str(out),
                               "--dtype", args.dtype, *common])
      what, source = "convert_llama", args.convert_from
  weights = result["weight_bytes"]
  gb = lambda b: round(b / 1e9, 3)  # noqa: E731
  return dict(what=what, source=source, mesh_fsdp=args.mesh_fsdp, quant=args.quant, seconds=round(result["seconds"], 2),
              weight_gb=gb(weights), peak_rss_gb=gb(peak), baseline_peak_rss_gb=gb(baseline),
              above_baseline_gb=gb(peak - baseline), ratio=round((peak - baseline) / weights, 3))


def make_random_hf(out: str | pathlib.Path) -> int:
  """Writes a random bfloat16 HF LLaMA directory of the `RANDOM_HF` shape; returns its parameter count."""
  import ml_dtypes
  import numpy as np

  from vtimellm_jax.convert import export_formats, llama as llama_convert
  from vtimellm_jax.models.llama import LlamaConfig

  config = LlamaConfig(**RANDOM_HF, param_dtype="bfloat16")
  rng = np.random.default_rng(0)
  tensors = {}
  for path, struct in llama_convert.abstract_params(config).items():
    for name, layer, transform in llama_convert.table.to_source(path, llama_convert.LLAMA_TABLE, struct.shape[0]):
      shape = transform(np.empty(struct.shape[1:] if layer is not None else struct.shape, np.int8)).shape
      tensors[name] = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
  export_formats.write_hf_dir(tensors, config, out, "bfloat16")
  return sum(t.size for t in tensors.values())


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.make_random_hf:
    count = make_random_hf(args.make_random_hf)
    print(json.dumps({"what": "random_hf_llama", "out": args.make_random_hf, "parameters": count}), flush=True)
    return 0
  if args.child:
    print(json.dumps(_child(args)), flush=True)
    return 0
  print(json.dumps(run(args)), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
