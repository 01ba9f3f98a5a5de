"""`vtimellm-jax extract-features`: videos (or images) -> CLIP feature files the release can read.

  vtimellm-jax extract-features --videos videos/ --clip ckpt/clip-vit-l14 --out feat/
  vtimellm-jax extract-features --videos stage2_videos.txt --splits stage2.json --clip ckpt/clip --out feat/
  vtimellm-jax extract-features --videos images/ --images --clip ckpt/clip --out feat_stage1/
  vtimellm-jax extract-features --videos videos/ --clip tiny-random --out /tmp/feat   # no weights needed

Each video gives `{out}/{id}.npy`, float16 [100, 768] (images: [768]); the id is the file name
without extension. Finished ids are skipped, so a stopped run is resumed by running it again.
Inputs that cannot be read are listed in `{out}/failures.jsonl`; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

TINY_RANDOM = "tiny-random"
# Random tiny CLIPs by name: (image size, patch size). The 64-px one reads the quickstart's 64-px
# videos without upsampling them to 224 px, several times faster (docs/synthetic.md).
TINY_RANDOM_SIZES = {TINY_RANDOM: (224, 32), "tiny-random-64": (64, 8)}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--videos", required=True,
                      help="a folder (searched recursively), one file, or a .txt list of paths (one a line, "
                           "relative to the list's folder)")
  parser.add_argument("--clip", required=True,
                      help=f"a CLIP model directory from `convert clip`, a source `convert clip --src` accepts "
                           f"(converted on the fly), or {' / '.join(TINY_RANDOM_SIZES)} for a random tiny CLIP "
                           "at 224 / 64 px (quickstart, tests)")
  parser.add_argument("--out", required=True, help="output folder for {id}.npy and failures.jsonl")
  parser.add_argument("--splits", default=None,
                      help="JSON: {id: [start_s, end_s]} or a stage-2/3 data file (records' meta.split)")
  parser.add_argument("--images", action="store_true", help="inputs are images: write [768] per image (stage 1)")
  parser.add_argument("--batch-size", type=int, default=800,
                      help="frames per encoder call (rounded to whole videos and to the device count)")
  parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="decoding threads")
  parser.add_argument("--dtype", default="auto", choices=DTYPES,
                      help="compute dtype; auto: float16 on GPU (as the release), bfloat16 on TPU, float32 on CPU")
  parser.add_argument("--seed", type=int, default=0, help="seed of a random --clip")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def compute_dtype(name: str):
  """Returns the jnp dtype for --dtype, resolving 'auto' by the default backend."""
  import jax
  import jax.numpy as jnp

  if name == "auto":
    name = {"gpu": "float16", "tpu": "bfloat16"}.get(jax.default_backend(), "float32")
  return jnp.dtype(name)


def load_clip(spec: str, dtype, seed: int = 0):
  """Returns a ClipVision from a model directory, a convertible source, or 'tiny-random'."""
  from vtimellm_jax import model_io
  from vtimellm_jax.convert import clip as convert_clip
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.models import clip as clip_model

  if spec in TINY_RANDOM_SIZES:
    return clip_model.init_random(clip_model.tiny(*TINY_RANDOM_SIZES[spec]), seed, dtype=dtype)
  path = pathlib.Path(spec)
  if (path / model_io.MODEL_JSON).is_file():
    return clip_model.load(path, dtype=dtype)
  if not path.exists():
    raise UserError(f"--clip {spec}: not found (a converted CLIP directory, a CLIP checkpoint, or one of "
                    f"{', '.join(TINY_RANDOM_SIZES)})")
  print(f"converting {spec} on the fly (save time next run with `vtimellm-jax convert clip`)", file=sys.stderr)
  cfg, params, _ = convert_clip.convert(path)
  return clip_model.from_params(cfg, params, dtype=dtype, source=spec)


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.video import extract, sampling

  if args.batch_size < 1 or args.workers < 1:
    raise UserError("--batch-size and --workers must be at least 1")
  items, failures = extract.list_inputs(args.videos, args.images)
  splits = None
  if args.splits is not None:
    if args.images:
      raise UserError("--splits applies to videos, not --images")
    splits = sampling.load_splits(args.splits)
  model = load_clip(args.clip, compute_dtype(args.dtype), args.seed)
  per_item = 1 if args.images else sampling.NUM_FRAMES
  batch_size = max(1, args.batch_size // per_item) * per_item
  encoder = extract.BatchEncoder(model, batch_size)
  out_dir = pathlib.Path(args.out)
  summary = extract.extract(items, failures, out_dir, encoder, images=args.images, splits=splits,
                            workers=args.workers, progress=not args.no_progress)
  total = len(items) + len(failures)
  print(f"{summary.done} extracted, {summary.skipped} already done, {summary.failed} failed, of {total} "
        f"input(s) -> {out_dir}", file=sys.stderr)
  if summary.failed:
    print(f"{summary.failed} input(s) failed: reasons in {out_dir / extract.FAILURES}", file=sys.stderr)
    return 1
  return 0
