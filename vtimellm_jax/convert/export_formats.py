"""A VTimeLLM model directory -> the files PyTorch users load: the release's layout, or plain HF.

Names are the model's family's (`release.Family`): Vicuna's HF LLaMA names, or ChatGLM3's original
`transformer.encoder.layers.N...` names with the adapter at `transformer.mm_projector`.
  release  `mm_projector.bin` (torch state dict, keys `model.mm_projector.weight` [d, 768] and
           `.bias`, `transformer.mm_projector.*` for ChatGLM3, as the release's stage 1 saves it)
           and, when the model holds unmerged LoRA, a peft folder `lora/` (adapter_config.json,
           adapter_model.bin or .safetensors, an empty non_lora_trainables.bin) that
           `PeftModel.from_pretrained` and the release's `load_lora` read unchanged. The LoRA
           applies on top of the model's own base weights; `with_base` also writes those as an HF
           directory `base/` (ChatGLM3: `chatglm3-base/` in its original names).
  hf       a merged HF LLaMA directory (config.json, safetensors shards, tokenizer files) that
           `transformers.LlamaForCausalLM.from_pretrained` loads (for ChatGLM3: an HF Glm directory
           for `GlmForCausalLM`), plus `mm_projector.bin`.
  chatglm  (ChatGLM3 only) a merged directory in ChatGLM3's original names and config.json, as THUDM's
           checkpoint and the release's `--model_base` have them, plus `mm_projector.bin`. Its
           remote code (tokenization_chatglm.py and the files config.json's auto_map names) is the
           user's own, copied from the ChatGLM3 folder the model was converted from; the project
           ships none.
Names come from the conversion tables (the family's rules and peft rules) read backwards.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from vtimellm_jax import cli_types, model_io
from vtimellm_jax.convert import chatglm, llama, release, table
from vtimellm_jax.errors import ConversionError, UserError
from vtimellm_jax.models import chatglm as chatglm_model
from vtimellm_jax.models.llama import LlamaConfig

PROJECTOR_FILE = "mm_projector.bin"
LORA_DIR = "lora"
BASE_DIR = "base"
CHATGLM_BASE_DIR = "chatglm3-base"  # the release loads a ChatGLM base only from a path containing "chatglm"
MAX_SHARD_BYTES = 5 * 2**30  # HF's default shard size


def _torch_tensor(array: np.ndarray, dtype: str | None = None):
  """Returns a contiguous CPU torch tensor of `array` (bfloat16 included), cast to `dtype` if given."""
  import torch

  array = np.asarray(array)
  if array.dtype.name == "bfloat16":
    # numpy cannot hand bfloat16 to torch; reinterpret the bits.
    tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)
  else:
    tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
  return tensor if dtype is None else tensor.to(getattr(torch, dtype))


def split_tree(tree: dict, family: release.Family = release.VICUNA
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Returns ({name: LLM weight}, {name: projector weight}, {peft key: LoRA factor}) of a params tree.

  Names are the family's PyTorch names; stacked layer arrays are split into one entry per layer, in
  the torch layout.
  """
  llm, projector, lora, problems = {}, {}, {}, []
  for path, value in model_io.flatten(tree).items():
    lora_items = table.unstack(path, value, family.peft_rules)
    if lora_items is not None:
      lora.update(lora_items)
      continue
    items = table.unstack(path, value, family.rules)
    if items is None:
      problems.append(f"no PyTorch name for {path}")
      continue
    for name, array in items:
      (projector if name in family.projector_names() else llm)[name] = array
  if problems:
    raise ConversionError("the model's parameters", problems)
  return llm, projector, lora


def write_projector(projector: dict[str, np.ndarray], path: str | pathlib.Path,
                    family: release.Family = release.VICUNA) -> pathlib.Path:
  """Writes the adapter as the release's `mm_projector.bin` (float32 torch state dict); returns its path."""
  import torch

  if set(projector) != set(family.projector_names()):
    raise UserError(f"the model has no complete mm_projector (found {sorted(projector)}); is it a VTimeLLM model?")
  torch.save({name: _torch_tensor(value, "float32") for name, value in projector.items()}, path)
  return pathlib.Path(path)


def adapter_config(lora_spec: dict, base_name: str | None) -> dict:
  """Returns a peft `adapter_config.json` dict for our LoRA spec {"rank", "alpha", "targets"}.

  Only fields peft 0.4 already knew are written (the release asks for peft>=0.4.0 and older peft
  refuses unknown fields); newer peft gives the rest (use_rslora, use_dora, ...) their defaults.
  """
  alpha = lora_spec["alpha"]
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "revision": None,
      "r": int(lora_spec["rank"]), "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
      "target_modules": sorted(lora_spec["targets"]), "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
      "layers_to_transform": None, "layers_pattern": None,
  }


def write_peft_folder(lora: dict[str, np.ndarray], lora_spec: dict, folder: str | pathlib.Path,
                      base_name: str | None = None, weights_format: str = "bin") -> pathlib.Path:
  """Writes a peft LoRA folder (config, factors in float32, empty non_lora_trainables.bin); returns it."""
  import torch

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {key: _torch_tensor(value, "float32") for key, value in sorted(lora.items())}
  if weights_format == "safetensors":
    from safetensors.torch import save_file

    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
  elif weights_format == "bin":
    torch.save(tensors, folder / "adapter_model.bin")
  else:
    raise UserError(f"adapter weights format must be safetensors or bin, got {weights_format!r}")
  (folder / release.ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora_spec, base_name), indent=2) + "\n")
  # The release's training writes this file beside every LoRA; empty: nothing but LoRA trained.
  torch.save({}, folder / release.NON_LORA_TRAINABLES)
  return folder


def write_hf_dir(llm: dict[str, np.ndarray], config: LlamaConfig, folder: str | pathlib.Path, dtype: str,
                 tokenizer_src: str | pathlib.Path | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                 config_json: dict | None = None, tokenizer_files=llama.TOKENIZER_FILES) -> list[str]:
  """Writes an HF LLaMA directory (config.json, safetensors shards + index); returns the tokenizer files copied.

  `config_json` replaces the LLaMA config.json of `config` (another family's own config).
  """
  from safetensors.torch import save_file

  if dtype not in cli_types.DTYPES:
    raise UserError(f"--dtype must be one of {', '.join(cli_types.DTYPES)}, got {dtype!r}")
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  itemsize = np.dtype(np.float32 if dtype == "float32" else np.float16).itemsize
  shards: list[list[str]] = [[]]
  size = 0
  for name, value in llm.items():
    nbytes = value.size * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  weight_map, total = {}, 0
  for k, names in enumerate(shards):
    file_name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {name: _torch_tensor(llm[name], dtype) for name in names}
    save_file(tensors, folder / file_name, metadata={"format": "pt"})
    total += sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map.update({name: file_name for name in names})
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  hf_config = {**(config.to_hf_dict() if config_json is None else config_json), "torch_dtype": dtype}
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return llama.copy_tokenizer(tokenizer_src, folder, tokenizer_files) if tokenizer_src else []


CHATGLM_LAYOUTS = ("chatglm", "hf")


def write_chatglm_dir(llm: dict[str, np.ndarray], config: LlamaConfig, folder: str | pathlib.Path, dtype: str,
                      layout: str, tokenizer_src: str | pathlib.Path | None = None,
                      max_shard_bytes: int = MAX_SHARD_BYTES, code_src: str | pathlib.Path | None = None,
                      regrouped: bool = False) -> list[str]:
  """Writes ChatGLM3 weights (`llm` in original names) as a ChatGLM3 directory; returns lines saying what else it holds.

  `layout` 'chatglm': ChatGLM3's original names and config.json, with the tokenizer's data files
  from `tokenizer_src` and the remote code (tokenization_chatglm.py and what the configs' auto_map
  name) from `code_src`, the ChatGLM3 folder the model came from (`chatglm.code_source`; None:
  not known). Files it cannot copy are named in the lines, with where to get them: the export is
  written all the same. 'hf': an HF `GlmForCausalLM` directory, whose code is transformers' own.
  `regrouped`: the model's query_key_value was regrouped from per head (`chatglm.QKV_REGROUPED`);
  config.json records it (both configuration classes keep unknown keys), so `convert release`
  refuses the directory as a base as it refuses the model directory.
  """
  folder = pathlib.Path(folder)
  if layout == "chatglm":
    head = config.head_size // 2  # ChatGLM rotates half of each head; its checkpoints hold that table's inv_freq
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head, 2, dtype=np.float32) / head))
    tensors, config_json = {**llm, "transformer.rotary_pos_emb.inv_freq": inv_freq}, chatglm.to_original_dict(config)
  elif layout == "hf":
    tensors, config_json = dict(chatglm.original_to_hf(llm.items(), config)), chatglm_model.to_hf_glm_dict(config)
  else:
    raise UserError(f"ChatGLM3 layout must be one of {', '.join(CHATGLM_LAYOUTS)}, got {layout!r}")
  if regrouped:
    config_json[chatglm.QKV_REGROUPED] = True
  write_hf_dir(tensors, config, folder, dtype, tokenizer_src, max_shard_bytes, config_json=config_json,
               tokenizer_files=chatglm.TOKENIZER_FILES)
  if layout != "chatglm":
    return []
  copied, missing = chatglm.copy_remote_code(code_src, folder)
  lines = [f"{folder}: ChatGLM3's remote code copied from {code_src}: {', '.join(copied)}"] if copied else []
  if missing:
    where = (f"they are not in {code_src}, the folder this model's LLM came from" if code_src is not None
             else "the ChatGLM3 folder this model's LLM came from is not recorded")
    lines.append(f"{folder}: copy {', '.join(missing)} into it from your ChatGLM3-6B folder (THUDM's chatglm3-6b): "
                 f"{where}. The folder's config.json and tokenizer_config.json name them, and the release's "
                 "load_pretrained_model loads the tokenizer as remote code")
  return lines
