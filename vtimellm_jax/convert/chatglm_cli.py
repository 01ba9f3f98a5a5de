"""`vtimellm-jax convert chatglm`: a ChatGLM3 directory (original names or HF Glm) -> a model directory."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--src", required=True,
                      help="ChatGLM3 directory: config.json (model_type chatglm: original transformer.encoder... "
                           "names; or glm: HF GlmForCausalLM), *.safetensors or pytorch_model-*.bin, tokenizer.model")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="storage dtype of the weights")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.convert import chatglm

  config, layout = chatglm.convert_chatglm(args.src, args.out, dtype=args.dtype)
  print(f"converted {args.src} ({layout} layout) -> {args.out}: {config.num_layers} layers, d_model "
        f"{config.hidden_size}, {config.num_heads} heads in {config.num_kv_heads} kv groups, vocab "
        f"{config.vocab_size}, {args.dtype}")
  return 0
