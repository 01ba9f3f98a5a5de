"""`vtimellm-jax export --workdir DIR --out DIR`: a training run -> one self-contained model directory.

The base the run sat on, the adapter and merged LoRA it loaded, and its trained parameters become
one VTimeLLM model directory (LoRA merged unless --keep-lora) with the tokenizer beside it, which
`chat` and `eval` load.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True, help="a training workdir (holds run.json and checkpoints/)")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--keep-lora", action="store_true", help="keep the trained LoRA unmerged (to train on)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.training import export

  out = export.export_workdir(args.workdir, args.out, keep_lora=args.keep_lora, step=args.step)
  print(f"exported {args.workdir} -> {out}")
  return 0
