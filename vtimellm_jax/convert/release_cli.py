"""`vtimellm-jax convert release`: the released VTimeLLM checkpoints -> one model directory for `chat`.

  vtimellm-jax convert release --base checkpoints/vicuna-7b-v1.5 \\
      --projector checkpoints/vtimellm-vicuna-v1-5-7b-stage1/mm_projector.bin \\
      --stage2 checkpoints/vtimellm-vicuna-v1-5-7b-stage2 \\
      --stage3 checkpoints/vtimellm-vicuna-v1-5-7b-stage3 \\
      --clip checkpoints/clip/ViT-L-14.pt --out ckpt/vtimellm-7b

The model equals what the release's `load_pretrained_model` builds: Vicuna, the stage-1 adapter,
stage-2 LoRA merged, then stage-3 LoRA merged (`--keep-lora` leaves the last one unmerged, to train
on). With --clip, the CLIP encoder is converted into `<out>/clip` for `chat --video --clip`.
The ChatGLM3 release works the same way: --base a ChatGLM3-6B directory (its original
transformer.encoder... names, or HF GlmForCausalLM), and its vtimellm-chatglm3-6b-stage{1,2,3} files,
whose LoRA uses ChatGLM's names (query_key_value, dense, dense_h_to_4h, dense_4h_to_h, output_layer).
"""

from __future__ import annotations

import argparse
import pathlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__.split("\n\n", 1)[1]
  parser.add_argument("--base", required=True, help="HF Vicuna directory, or a ChatGLM3-6B directory in original or HF Glm "
                                             "names (config.json, weights, tokenizer.model), or either "
                                             "converted by convert llama / convert chatglm")
  parser.add_argument("--projector", required=True, help="stage-1 mm_projector.bin")
  parser.add_argument("--stage2", help="stage-2 peft LoRA folder (adapter_config.json, adapter_model.bin|safetensors)")
  parser.add_argument("--stage3", help="stage-3 peft LoRA folder, merged after stage 2")
  parser.add_argument("--clip", help="CLIP ViT-L/14: OpenAI ViT-L-14.pt or an HF / open_clip directory; "
                                     "converted into <out>/clip")
  parser.add_argument("--out", required=True, help="output model directory")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="storage dtype of the LLM weights (the adapter stays float32)")
  parser.add_argument("--keep-lora", action="store_true",
                      help="keep the last LoRA (stage 3, else stage 2) unmerged, to continue training it")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.convert import clip as convert_clip
  from vtimellm_jax.convert import release

  config, notes = release.convert_release(args.base, args.projector, args.out, stage2=args.stage2,
                                          stage3=args.stage3, dtype=args.dtype, keep_lora=args.keep_lora)
  for note in notes:
    print(f"note: {note}")
  stages = [f"{name} {'kept as LoRA' if args.keep_lora and path == (args.stage3 or args.stage2) else 'merged'}"
            for name, path in (("stage 2", args.stage2), ("stage 3", args.stage3)) if path]
  print(f"converted the release -> {args.out}: {config.num_layers} layers, d_model {config.hidden_size}, "
        f"{args.dtype}; projector loaded{''.join(', ' + s for s in stages)}")
  if args.clip:
    print(convert_clip.convert_to_directory(args.clip, pathlib.Path(args.out) / "clip"))
  return 0
