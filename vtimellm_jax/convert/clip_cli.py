"""`vtimellm-jax convert clip`: OpenAI / HF / open_clip CLIP vision weights -> a model directory.

  vtimellm-jax convert clip --src checkpoints/clip/ViT-L-14.pt --out ckpt/clip-vit-l14
  vtimellm-jax convert clip --src openai/clip-vit-large-patch14/ --out ckpt/clip-vit-l14
  vtimellm-jax convert clip --src open_clip_dir/ --out ckpt/clip   # open_clip_config.json + weights

The output uses `model_io`'s layout (model.json with kind "clip" + an orbax params/ folder), which
`extract-features --clip` reads.
"""

from __future__ import annotations

import argparse

from vtimellm_jax import cli_types



def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True,
                      help="OpenAI ViT-L-14.pt (TorchScript) or state dict, HF CLIP directory, or open_clip "
                           "directory / state dict")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--dtype", default="float32", choices=cli_types.DTYPES,
                      help="stored weight dtype (OpenAI's fp16 weights are exact in float32)")
  parser.add_argument("--act", default=None, choices=("quick_gelu", "gelu"),
                      help="activation for OpenAI-layout state dicts without a config (default quick_gelu; "
                           "open_clip's own non-OpenAI trainings use gelu)")
  parser.add_argument("--heads", type=cli_types.int_at_least(1), default=None, help="attention heads, if not width / 64")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.convert import clip as convert_clip

  print(convert_clip.convert_to_directory(args.src, args.out, act=args.act, heads=args.heads, dtype=args.dtype))
  return 0
