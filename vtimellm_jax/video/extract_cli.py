"""`vtimellm-jax extract-features`: videos (or images) -> CLIP feature files the release can read.

  vtimellm-jax extract-features --videos videos/ --clip ckpt/clip-vit-l14 --out feat/
  vtimellm-jax extract-features --videos stage2_videos.txt --splits stage2.json --clip ckpt/clip --out feat/
  vtimellm-jax extract-features --videos videos/ --data stage2.json --clip ckpt/clip --out feat/stage2
  vtimellm-jax extract-features --videos images/ --images --clip ckpt/clip --out feat_stage1/
  vtimellm-jax extract-features --videos videos/ --clip tiny-random --out /tmp/feat   # no weights needed

Each video gives `{out}/{id}.npy`, float16 [100, 768] (images: [768]); the id is the file name
without extension. Finished ids (a whole float16 file of the expected shape) are skipped, so a
stopped run is resumed by running it again; an unreadable or wrong-shaped file is extracted again.
`--data` extracts exactly the ids a stage-2/3 data file uses, each with its `meta.split`; an id
with no video is a failure. Inputs that cannot be read are listed in `{out}/failures.jsonl`; the exit status is then 1.
`--shard i/n` extracts every n-th input (sorted by id) from the i-th, so n processes or machines
can share one output folder; shard i lists its failures in `{out}/failures.i-of-n.jsonl`. Launched
as one process per host (`launch/` scripts, SLURM: `jax.distributed`), process i of n takes shard
i/n by itself and process 0 merges every shard's failures into `{out}/failures.jsonl`. `--out` may
be a bucket (gs://..., through etils.epath with gcsfs), as training workdirs may.
"""

from __future__ import annotations

import argparse
import os
import sys

from vtimellm_jax import cli_types
from vtimellm_jax.video.clip_source import TINY_RANDOM_SIZES


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--videos", required=True,
                      help="a folder (searched recursively), one file, or a .txt list of paths (one a line, "
                           "relative to the list's folder)")
  parser.add_argument("--clip", required=True,
                      help=f"a CLIP model directory from `convert clip`, a source `convert clip --src` accepts "
                           f"(converted on the fly), or {' / '.join(TINY_RANDOM_SIZES)} for a random tiny CLIP "
                           "at 224 / 64 px (quickstart, tests)")
  parser.add_argument("--out", required=True, help="output folder for {id}.npy and failures.jsonl; local or "
                                                   "gs://bucket/... (with gcsfs, as in the tpu extra)")
  parser.add_argument("--splits", default=None,
                      help="JSON: {id: [start_s, end_s]} or a stage-2/3 data file (records' meta.split)")
  parser.add_argument("--data", default=None,
                      help="a stage-2/3 data file: extract only the ids it uses, with their meta.split "
                           "(then `data check` finds every feature; not with --splits)")
  parser.add_argument("--images", action="store_true", help="inputs are images: write [768] per image (stage 1)")
  parser.add_argument("--batch-size", type=cli_types.int_at_least(1), default=800,
                      help="frames per encoder call (rounded to whole videos and to the device count)")
  parser.add_argument("--workers", type=cli_types.int_at_least(1), default=min(8, os.cpu_count() or 1),
                      help="decoding threads")
  parser.add_argument("--dtype", default="auto", choices=cli_types.DTYPES_OR_AUTO,
                      help="compute dtype; auto: float16 on GPU (as the release), bfloat16 on TPU, float32 on CPU")
  parser.add_argument("--seed", type=cli_types.int_at_least(0), default=0, help="seed of a random --clip")
  parser.add_argument("--shard", type=cli_types.shard, default=None, metavar="I/N",
                      help="extract only shard I (from 0) of N: every N-th input of the list sorted by id, from "
                           "the I-th; failures go to failures.I-of-N.jsonl (for several machines or processes)")
  parser.add_argument("--time-limit", type=cli_types.number_in(0), default=600.0, metavar="SECONDS",
                      help="a video still decoding after this long is a failure (0: no limit; default 600)")
  parser.add_argument("--max-video-gb", type=cli_types.number_in(0), default=4.0, metavar="GB",
                      help="a video whose 100 decoded frames would take more is a failure, before decoding "
                           "(0: no limit; default 4, about 100 frames of 4K; two videos per worker are in flight)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax import model_io, sharding
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.video import clip_source, extract, sampling

  if args.batch_size < 1 or args.workers < 1:
    raise UserError("--batch-size and --workers must be at least 1")
  if args.data is not None and (args.splits is not None or args.images):
    raise UserError("--data takes the splits from the data file: not with --splits or --images")
  if args.splits is not None and args.images:
    raise UserError("--splits applies to videos, not --images")
  items, failures = extract.list_inputs(args.videos, args.images)
  splits = None
  if args.data is not None:
    data_ids, splits = sampling.load_data_file(args.data)
    items, failures = extract.select(items, failures, data_ids, args.data)
  elif args.splits is not None:
    splits = sampling.load_splits(args.splits)
  sharding.maybe_initialize_distributed()  # one process per host under launch/ scripts or SLURM
  shard = extract.process_shard(args.shard)
  if shard is not None:
    items, failures = extract.shard(items, failures, *shard)
  model = clip_source.load_clip(args.clip, clip_source.compute_dtype(args.dtype), args.seed)
  per_item = 1 if args.images else sampling.NUM_FRAMES
  encoder = extract.BatchEncoder(model, args.batch_size, frames_per_item=per_item)
  out_dir = model_io.storage_path(args.out)
  failures_name = extract.failures_file_name(shard)
  summary = extract.extract(items, failures, out_dir, encoder, images=args.images, splits=splits,
                            workers=args.workers, progress=not args.no_progress, failures_name=failures_name,
                            limits=dict(time_limit=args.time_limit, max_bytes=int(args.max_video_gb * 2**30)))
  total = len(items) + len(failures)
  of_shard = "" if shard is None else f" of shard {shard[0]}/{shard[1]}"
  replaced = f" ({summary.replaced} replacing unreadable or wrong-shaped files)" if summary.replaced else ""
  if summary.front_to_back:
    replaced += f" ({summary.front_to_back} decoded front to back, as logged above)"
  print(f"{summary.done} extracted{replaced}, {summary.skipped} already done, {summary.failed} failed, of {total} "
        f"input(s){of_shard} -> {out_dir}", file=sys.stderr)
  if args.shard is None and shard is not None:  # split by process: one merged report
    failures_name = extract.merge_failures(out_dir, shard[1]).name
  if summary.failed:
    print(f"{summary.failed} input(s) failed: reasons in {out_dir / failures_name}", file=sys.stderr)
    return 1
  return 0
