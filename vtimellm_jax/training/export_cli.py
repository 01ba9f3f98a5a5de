"""`vtimellm-jax export`: a training run or model directory -> a JAX model dir, the release's files, or HF.

  vtimellm-jax export --model runs/stage3 --out ckpt/vtimellm-7b                  # JAX (LoRA merged)
  vtimellm-jax export --model runs/stage3 --format release --out torch/stage3     # mm_projector.bin + lora/
  vtimellm-jax export --model ckpt/vtimellm-7b --format hf --out torch/hf         # merged HF LLaMA + projector
  vtimellm-jax export --model ckpt/vtimellm-glm --format chatglm --out torch/glm  # ChatGLM3's own names

--model takes a training workdir (run.json + checkpoints/; --workdir is the same flag) or a model
directory (model.json + params/). Formats:
  jax      one VTimeLLM model directory with the tokenizer beside it (LoRA merged unless --keep-lora),
           which `chat` and `eval` load.
  release  what the release's PyTorch code loads: mm_projector.bin and, when the model holds unmerged
           LoRA, a peft folder lora/ for its --stage2/--stage3 arguments (PeftModel.from_pretrained
           reads it too). The LoRA applies on top of the model's base weights; --with-base also
           writes those as an HF directory base/ (needed when the base is not plain Vicuna). A
           ChatGLM3 model writes the release's ChatGLM names (transformer.mm_projector, LoRA on
           query_key_value, dense, dense_h_to_4h, dense_4h_to_h, output_layer) and its base as
           chatglm3-base/ in ChatGLM3's original names (the release picks its ChatGLM loader when
           --model_base contains "chatglm").
  hf       a merged HF directory (safetensors, config.json, tokenizer files) plus mm_projector.bin:
           LLaMA for Vicuna models, GlmForCausalLM for ChatGLM3 models.
  chatglm  ChatGLM3 models only: a merged directory in ChatGLM3's original names and config.json
           (THUDM's layout, the release's --model_base) plus mm_projector.bin. ChatGLM3's remote
           code (tokenization_chatglm.py, and what config.json's auto_map names) is copied from
           the ChatGLM3 folder the model was converted from; where that is not known or lacks a
           file, the output names the files to copy in. chatglm3-base/ of --format release too.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from vtimellm_jax import cli_types

FORMATS = ("jax", "release", "hf", "chatglm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__.split("\n\n", 1)[1]
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--model", help="a training workdir (run.json) or a model directory (model.json)")
  source.add_argument("--workdir", dest="model", help="same as --model")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--format", default="jax", choices=FORMATS, help="what to write (default: %(default)s)")
  parser.add_argument("--keep-lora", action="store_true", help="jax: keep the trained LoRA unmerged (to train on)")
  parser.add_argument("--step", type=cli_types.int_at_least(0), default=None, help="workdir checkpoint step (default: the latest)")
  parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                      help="hf / chatglm / base weights dtype (default: the model's storage dtype)")
  parser.add_argument("--adapter-format", default="bin", choices=("bin", "safetensors"),
                      help="release: adapter_model.bin (default, what every peft >= 0.4 reads, as the release's "
                           "own files) or adapter_model.safetensors")
  parser.add_argument("--with-base", action="store_true", help="release: also write the base weights as HF base/")


def _quantised_note(workdir: pathlib.Path) -> str:
  """Returns what the export says of a run trained on a quantised base ("" for any other run)."""
  from vtimellm_jax.training import model_setup

  qtype = model_setup.read_run_config(str(workdir)).model.get("quant")
  return (f" (trained on a base quantised to {qtype}: written with the full-precision base it was quantised from; "
          f"answer with --quant {qtype} to quantise it again)") if qtype else ""


def _kind(path: pathlib.Path) -> str:
  """Returns 'workdir' or 'model' for --model, or raises UserError."""
  from vtimellm_jax import model_io
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.training import model_setup

  if (path / model_setup.RUN_JSON).is_file():
    return "workdir"
  if (path / model_io.MODEL_JSON).is_file():
    return "model"
  raise UserError(f"--model {path}: neither a training workdir ({model_setup.RUN_JSON}) nor a model directory "
                  f"({model_io.MODEL_JSON})")


def _export_jax_model_dir(src: pathlib.Path, out: pathlib.Path, keep_lora: bool) -> str:
  """Re-saves a model directory (LoRA merged unless `keep_lora`); returns what was done."""
  from vtimellm_jax import model_io
  from vtimellm_jax.convert.llama import copy_tokenizer
  from vtimellm_jax.models import load, lora

  meta = model_io.read_model_json(src)
  model = load.load_model(src)
  merged = 0 if keep_lora else lora.merge_lora(model)
  extra = {k: v for k, v in meta.items() if k not in ("kind", "config", "lora")}
  load.save_model(model, out, **extra)
  copy_tokenizer(src, out)
  return f"{merged} LoRA layers merged" if merged else "no LoRA merged"


def _chatglm_code_source(model_dir: pathlib.Path) -> pathlib.Path | None:
  """Returns the ChatGLM3 folder a model directory, or the run it was exported from, was converted from; or None.

  A run's export records the workdir (`source_workdir`): its base model directory, else its
  tokenizer folder, says where the LLM came from.
  """
  from vtimellm_jax import model_io
  from vtimellm_jax.convert import chatglm
  from vtimellm_jax.training import model_setup

  found = chatglm.code_source(model_dir)
  workdir = model_io.read_model_json(model_dir).get("source_workdir")
  if found is not None or not workdir or not (pathlib.Path(workdir) / model_setup.RUN_JSON).is_file():
    return found
  config = model_setup.read_run_config(workdir)
  for candidate in (config.model.base, config.data.tokenizer):
    found = chatglm.code_source(candidate) if candidate else None
    if found is not None:
      return found
  return None


def export_torch(model_dir: pathlib.Path, fmt: str, out: pathlib.Path, dtype: str | None = None,
                 adapter_format: str = "bin", with_base: bool = False) -> list[str]:
  """Writes the `release`, `hf` or `chatglm` files of a model directory to `out`; returns lines describing them."""
  from vtimellm_jax import model_io
  from vtimellm_jax.convert import chatglm as chatglm_convert
  from vtimellm_jax.convert import export_formats, release
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.models import chatglm, load, lora

  meta = model_io.read_model_json(model_dir)
  if meta["kind"] not in ("vtimellm", "llama"):
    raise UserError(f"{model_dir}: holds a '{meta['kind']}' model; only VTimeLLM / LLaMA models export to PyTorch")
  model = load.load_model(model_dir)
  family = release.family_of(model.config)
  if fmt == "chatglm" and family is not release.CHATGLM:
    raise UserError(f"{model_dir}: --format chatglm writes ChatGLM3's names; this is a LLaMA model (use --format hf)")
  dtype = dtype or model.config.param_dtype
  if fmt in ("hf", "chatglm"):
    lora.merge_lora(model)
  llm, projector, factors = export_formats.split_tree(load.params_tree(model), family)
  out.mkdir(parents=True, exist_ok=True)
  lines = []
  if projector:
    export_formats.write_projector(projector, out / export_formats.PROJECTOR_FILE, family)
    lines.append(f"{out / export_formats.PROJECTOR_FILE}: the adapter (keys {family.projector_prefix}.weight/.bias)")
  elif fmt == "release":
    raise UserError(f"{model_dir}: a plain LLM has no mm_projector to export in the release's format")

  def write_llm(folder: pathlib.Path, layout: str) -> tuple[str, list[str]]:
    """Returns (what was written, lines about the files beside it)."""
    if family is release.CHATGLM:
      code_src = _chatglm_code_source(model_dir) if layout == "chatglm" else None
      notes = export_formats.write_chatglm_dir(llm, model.config, folder, dtype, layout, tokenizer_src=model_dir,
                                               code_src=code_src, regrouped=chatglm_convert.was_regrouped(meta))
      return ("HF GlmForCausalLM" if layout == "hf" else "ChatGLM3 (original names)"), notes
    export_formats.write_hf_dir(llm, model.config, folder, dtype, tokenizer_src=model_dir)
    return "HF LLaMA", []

  if fmt in ("hf", "chatglm"):
    kind, notes = write_llm(out, fmt)
    return lines + [f"{out}: merged {kind} directory ({dtype})"] + notes
  # The release loads ChatGLM3 with its own code, and only when --model_base contains "chatglm".
  base_dir = out / (export_formats.CHATGLM_BASE_DIR if family is release.CHATGLM else export_formats.BASE_DIR)
  if with_base:
    kind, notes = write_llm(base_dir, "chatglm")
    lines += [f"{base_dir}: the base LLM, {kind} directory ({dtype}), for --model_base"] + notes
  if not factors:
    return lines + ["the model holds no unmerged LoRA, so only the projector was written; its LLM weights "
                    "are exported with --format hf (or --with-base)"]
  source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
  base_name = str(base_dir.absolute()) if with_base else source.get("base")
  spec = meta["lora"]
  if family is release.CHATGLM:  # peft's target_modules in the release's ChatGLM names
    theirs = {ours: name for name, ours in chatglm.RELEASE_LORA_TARGETS.items()}
    spec = {**spec, "targets": [theirs[t] for t in spec["targets"]]}
  export_formats.write_peft_folder(factors, spec, out / export_formats.LORA_DIR, base_name, adapter_format)
  lines.append(f"{out / export_formats.LORA_DIR}: peft LoRA folder (r={meta['lora']['rank']}, "
               f"alpha={meta['lora']['alpha']}, {len(factors) // 2} layers)")
  if source.get("merged"):
    lines.append("the LoRA applies on top of the base with these LoRA folders merged first, in order: "
                 + ", ".join(source["merged"]))
  elif not with_base:
    lines.append("the LoRA applies on top of this model's base weights (pass --with-base to write them too)")
  return lines


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.training import export

  src, out = pathlib.Path(args.model), pathlib.Path(args.out)
  kind = _kind(src)
  if out.exists() and src.resolve() == out.resolve():
    raise UserError(f"--out {out} is the source itself; choose another directory")
  if args.step is not None and kind != "workdir":
    raise UserError("--step selects a checkpoint of a training workdir; --model is a model directory")
  if args.keep_lora and args.format != "jax":
    raise UserError(f"--keep-lora is for --format jax (--format {args.format} "
                    f"{'writes LoRA separately' if args.format == 'release' else 'merges it'})")
  if args.format == "jax":
    if kind == "workdir":
      export.export_workdir(src, out, keep_lora=args.keep_lora, step=args.step)
      print(f"exported {src} -> {out}{_quantised_note(src)}")
    else:
      print(f"exported {src} -> {out} ({_export_jax_model_dir(src, out, args.keep_lora)})")
    return 0
  if kind == "workdir":
    # The run's model is assembled once as a model directory (LoRA unmerged), then exported.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
      export.export_workdir(src, tmp, keep_lora=True, step=args.step)
      lines = export_torch(pathlib.Path(tmp), args.format, out, args.dtype, args.adapter_format, args.with_base)
  else:
    lines = export_torch(src, args.format, out, args.dtype, args.adapter_format, args.with_base)
  print(f"exported {src} -> {out} ({args.format}){_quantised_note(src) if kind == 'workdir' else ''}:")
  for line in lines:
    print(f"  {line}")
  return 0
