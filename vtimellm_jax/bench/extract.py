"""Host CPU per video of feature extraction, ours and the release's, and videos/s end to end.

  vtimellm-jax bench extract --videos tests/fixtures/vtimellm_official/demo.mp4 --clip tiny-random
  vtimellm-jax bench extract --videos some_videos/ --clip ckpt/clip-vit-l14 --iters 3

One JSON line per path:
- `"path": "ours"`: what `extract-features` runs on the host: decode the 100 sampled frames (one
  FFmpeg thread) and cut and pack the window the resize reads; resize, crop and normalisation run on
  the device with the encoder.
- `"path": "release"`: the release's host side, decord `get_batch` of the same frames (one thread)
  and torchvision's bicubic Resize, CenterCrop and Normalize on the CPU; measured only where decord
  and torchvision are installed (otherwise the line says which is missing).
`host_cpu_s_per_video` is the process's CPU time (user + system, every thread) spent in that host
work, the encoder excluded; `videos_per_s` is end to end (host work, then encoding with the same
jitted CLIP and waiting for the features), one video at a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import time

import numpy as np

from vtimellm_jax import cli_types


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="vtimellm-jax bench extract", description=__doc__.splitlines()[0])
  parser.add_argument("--videos", required=True, help="a video, a folder of videos or a .txt list (as extract-features)")
  parser.add_argument("--clip", default="tiny-random", help="as extract-features --clip (default: tiny-random)")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
  parser.add_argument("--iters", type=cli_types.int_at_least(1), default=3, help="passes over the videos")
  return parser.parse_args(argv)


def _cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _ours_host(path, size: int):
  from vtimellm_jax.video import decode, preprocess, sampling

  frames = decode.read_frames(path, None, sampling.NUM_FRAMES, threads=1).frames
  return preprocess.pack([preprocess.source_window(frames, size)], 1)


def _release_host(path, size: int):
  import decord
  import torch
  from torchvision import transforms

  from vtimellm_jax.video import preprocess, sampling

  reader = decord.VideoReader(str(path), num_threads=1)
  indices = sampling.frame_indices(len(reader), reader.get_avg_fps(), None, sampling.NUM_FRAMES)
  frames = torch.from_numpy(reader.get_batch(indices.tolist()).asnumpy()).permute(0, 3, 1, 2).float() / 255
  transform = transforms.Compose([
      transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=False),
      transforms.CenterCrop(size),
      transforms.Normalize(preprocess.MEAN.tolist(), preprocess.STD.tolist())])
  return transform(frames).permute(0, 2, 3, 1).numpy()


def _measure(items, host, encode, iters: int) -> dict:
  host_cpu = wall = 0.0
  encode(host(items[0].path))  # compile outside the clock
  for _ in range(iters):
    for item in items:
      start_wall, start_cpu = time.perf_counter(), _cpu_s()
      inputs = host(item.path)
      host_cpu += _cpu_s() - start_cpu
      encode(inputs)
      wall += time.perf_counter() - start_wall
  count = iters * len(items)
  return dict(videos=len(items), iters=iters, host_cpu_s_per_video=round(host_cpu / count, 3),
              videos_per_s=round(count / wall, 2))


def main(argv=None) -> int:
  args = _parse_args(argv)
  import jax
  from flax import nnx

  from vtimellm_jax.errors import UserError
  from vtimellm_jax.video import clip_source, extract, preprocess

  items, failures = extract.list_inputs(args.videos, images=False)
  if failures or not items:
    raise UserError(f"{args.videos}: cannot benchmark unreadable inputs: "
                    + "; ".join(f"{f.path}: {f.reason}" for f in failures))
  model = clip_source.load_clip(args.clip, clip_source.compute_dtype(args.dtype))
  size = model.cfg.image_size

  @nnx.jit
  def encode_packed(model, frames, rows, cols):
    return model.encode_image(preprocess.device_pixels(frames, rows, cols)[0])

  @nnx.jit
  def encode_pixels(model, pixels):
    return model.encode_image(pixels)

  device = jax.devices()[0]
  common = dict(what="extract", device=device.device_kind, backend=device.platform, clip=args.clip, size=size)
  ours = _measure(items, lambda p: _ours_host(p, size),
                  lambda packed: encode_packed(model, *packed).block_until_ready(), args.iters)
  print(json.dumps(dict(path="ours", **common, **ours)), flush=True)
  missing = [name for name in ("decord", "torchvision") if importlib.util.find_spec(name) is None]
  if missing:
    print(json.dumps(dict(path="release", **common, skipped=f"not installed: {', '.join(missing)}")), flush=True)
    return 0
  release = _measure(items, lambda p: _release_host(p, size),
                     lambda pixels: encode_pixels(model, np.asarray(pixels)).block_until_ready(), args.iters)
  print(json.dumps(dict(path="release", **common, **release)), flush=True)
  return 0
