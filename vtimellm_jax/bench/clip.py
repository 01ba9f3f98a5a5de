"""CLIP encoder throughput (frames/s per batch size) and end-to-end extraction (videos/s).

  python -m vtimellm_jax.bench.clip --config clip_vit_l14 --batch-sizes 100,800 --dtype float16
  python -m vtimellm_jax.bench.clip --config tiny --batch-sizes 8,32 --iters 3     # CPU smoke test
  python -m vtimellm_jax.bench.clip --config tiny --videos some_videos/ --workers 8  # + end to end
  python -m vtimellm_jax.bench.clip --batch-sizes "" --preprocess 64x64,360x640,720x1280  # preprocessing alone

Weights are random (numpy, `models.clip.random_params`): speed does not depend on their values.
Each result is one JSON line on stdout, in the shape of the PyTorch baseline `torch_clip_baseline.py`'s, so
both can be run in one device session and compared line by line. Beside frames/s an encoder line
gives the model FLOPs per frame (`models.clip.flops_per_image`) and, where the device's dense
16-bit peak is known (`vtimellm_jax.device_peaks`), the fraction of it achieved (`peak_fraction`).
`--attention` picks the kernel for an A/B (`auto` is what extract-features uses: cuDNN on a GPU in
16 bits, XLA elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from vtimellm_jax import cli_types, device_peaks, model_io


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vtimellm_jax.bench.clip", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="clip_vit_l14", choices=("clip_vit_l14", "tiny"))
  parser.add_argument("--batch-sizes", default="100,800", help="comma-separated frames per call")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                      help="attention kernel (auto: cuDNN flash attention on a GPU in float16/bfloat16, else XLA)")
  parser.add_argument("--warmup", type=cli_types.int_at_least(0), default=3)
  parser.add_argument("--iters", type=cli_types.int_at_least(1), default=10)
  parser.add_argument("--videos", default=None, help="also time extract-features over these videos")
  parser.add_argument("--workers", type=cli_types.int_at_least(1), default=8, help="decoding threads for --videos")
  parser.add_argument("--e2e-batch-size", type=cli_types.int_at_least(1), default=800, help="frames per encoder call for --videos")
  parser.add_argument("--preprocess", default="", help="also time the preprocessing of 100 random frames of "
                      "these HxW sizes: host window and packing, and the jitted device resize (e.g. 64x64,720x1280)")
  return parser.parse_args(argv)


def _emit(**record) -> None:
  print(json.dumps(record), flush=True)


def bench_encoder(model, batch_size: int, warmup: int, iters: int) -> dict:
  """Returns timing of the jitted encoder on random float[batch_size, 224, 224, 3] inputs, and its share of peak."""
  import jax
  from flax import nnx

  from vtimellm_jax.models import clip as clip_model

  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, pixels):
    return nnx.merge(graphdef, state).encode_image(pixels)

  size = model.cfg.image_size
  pixels = jax.device_put(np.random.default_rng(0).standard_normal((batch_size, size, size, 3), np.float32))
  start = time.perf_counter()
  compiled = encode.lower(state, pixels).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    compiled(state, pixels).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    out = compiled(state, pixels)
  out.block_until_ready()
  seconds = (time.perf_counter() - start) / iters
  flops = clip_model.flops_per_image(model.cfg)
  achieved = flops * batch_size / seconds
  return dict(batch=batch_size, s=round(seconds, 4), frames_per_s=round(batch_size / seconds, 1),
              gflops_per_frame=round(flops / 1e9, 3), tflops_per_s=round(achieved / 1e12, 2),
              **device_peaks.fractions(jax.devices()[0], flops_per_s=achieved),
              compile_s=round(compile_s, 1), out=list(out.shape))


def bench_end_to_end(model, videos: str, workers: int, batch_size: int) -> dict:
  """Returns videos/s of the whole extract-features pipeline (decode + preprocess + encode + save)."""
  from vtimellm_jax.video import extract, sampling

  items, failures = extract.list_inputs(videos, images=False)
  encoder = extract.BatchEncoder(model, batch_size, frames_per_item=sampling.NUM_FRAMES)
  # Compile the first video's bucket before the clock starts, so the rate is nearer the steady
  # state (other buckets still compile on the clock).
  if items:
    encoder([extract.load_video(items[0], None, sampling.NUM_FRAMES, model.cfg.image_size).window])()
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    summary = extract.extract(items, failures, model_io.storage_path(out), encoder, images=False, workers=workers,
                              progress=False)
    seconds = time.perf_counter() - start
  return dict(videos=summary.done, failed=summary.failed, workers=workers, s=round(seconds, 2),
              videos_per_s=round(summary.done / seconds, 2),
              frames_per_s=round(summary.done * sampling.NUM_FRAMES / seconds, 1), programs=encoder.programs)


def bench_preprocess(height: int, width: int, iters: int) -> dict:
  """Returns the time to preprocess 100 random frames of height x width: host window + packing, device resize."""
  import jax

  from vtimellm_jax.video import preprocess, sampling

  frames = np.random.default_rng(0).integers(0, 256, (sampling.NUM_FRAMES, height, width, 3), dtype=np.uint8)
  resize = jax.jit(preprocess.device_pixels)
  resize(*preprocess.pack([preprocess.source_window(frames)], 1)).block_until_ready()  # compile
  host_s = device_s = 0.0
  for _ in range(iters):
    start = time.perf_counter()
    packed = preprocess.pack([preprocess.source_window(frames)], 1)
    packed = jax.device_put(packed)
    jax.block_until_ready(packed)
    host_s += time.perf_counter() - start
    start = time.perf_counter()
    resize(*packed).block_until_ready()
    device_s += time.perf_counter() - start
  seconds = (host_s + device_s) / iters
  return dict(mode="preprocess", height=height, width=width, s_per_video=round(seconds, 4),
              host_s=round(host_s / iters, 4), device_s=round(device_s / iters, 4),
              frames_per_s=round(sampling.NUM_FRAMES / seconds, 1))


def main(argv=None) -> int:
  args = _parse_args(argv)
  import jax

  from vtimellm_jax.models import clip as clip_model, load
  from vtimellm_jax.video import clip_source

  cfg = clip_model.PRESETS[args.config]()
  dtype = clip_source.compute_dtype(args.dtype)
  model = load.random_clip(cfg, seed=0, dtype=dtype, attention_impl=args.attention)
  device = jax.devices()[0]
  kernel = clip_model.attention_kernel(args.attention, dtype, cfg.width // cfg.heads)
  common = dict(what=f"jax_clip_{args.config}_{dtype.name}", device=device.device_kind, backend=device.platform,
                attention=args.attention, attention_kernel=kernel, xla_flags=os.environ.get("XLA_FLAGS", ""))
  for batch_size in (int(b) for b in args.batch_sizes.split(",") if b):
    _emit(**common, **bench_encoder(model, batch_size, args.warmup, args.iters))
  for size in filter(None, args.preprocess.split(",")):
    height, width = (int(v) for v in size.lower().split("x"))
    _emit(what="jax_preprocess", backend=jax.default_backend(), **bench_preprocess(height, width, args.iters))
  if args.videos:
    _emit(**common, mode="end_to_end", **bench_end_to_end(model, args.videos, args.workers, args.e2e_batch_size))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
