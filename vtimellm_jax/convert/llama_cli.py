"""`vtimellm-jax convert llama`: an HF LLaMA/Vicuna directory -> a vtimellm-jax model directory."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True, help="HF directory: config.json, *.safetensors or pytorch_model-*.bin, tokenizer files")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="storage dtype of the weights")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.convert import llama

  config = llama.convert_llama(args.src, args.out, dtype=args.dtype)
  print(f"converted {args.src} -> {args.out}: {config.num_layers} layers, d_model {config.hidden_size}, "
        f"vocab {config.vocab_size}, {args.dtype}")
  return 0
