"""HF LLaMA/Vicuna weights <-> our parameter tree, as one explicit table used in both directions.

Import streams an HF directory one tensor at a time (safetensors read without mapping the file,
`.bin` shards one at a time) into the output arrays, each allocated once in the storage dtype:
per-layer HF tensors go into their slot of our stacked `model/layers/...` arrays. So converting
holds the converted model once plus the tensor in hand. Every shape is checked against an
`nnx.eval_shape` skeleton and every missing, unexpected or mis-shaped tensor is reported in one
`ConversionError`. Export is the same table read backwards, a layer at a time.
"""

from __future__ import annotations

import pathlib
import re
import shutil
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx

from vtimellm_jax import model_io
from vtimellm_jax.convert import table, torch_files
from vtimellm_jax.errors import ConversionError, UserError
from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM

# (HF name, our path, transform) -- read forwards on import, backwards on export. `{layer}` is the
# slot along the stacked layers axis of our arrays.
LLAMA_TABLE: tuple[table.Rule, ...] = (
    ("model.embed_tokens.weight", "model/embed_tokens", table.identity),
    ("model.norm.weight", "model/norm/weight", table.identity),
    ("lm_head.weight", "lm_head/kernel", table.transpose),
    ("model.layers.{layer}.self_attn.{proj}.weight", "model/layers/self_attn/{proj}/kernel", table.transpose),
    ("model.layers.{layer}.mlp.{proj}.weight", "model/layers/mlp/{proj}/kernel", table.transpose),
    ("model.layers.{layer}.{norm}.weight", "model/layers/{norm}/weight", table.identity),
)
# Buffers older checkpoints carry that the model recomputes.
IGNORED = (r".*rotary_emb\.inv_freq",)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def abstract_params(config: LlamaConfig, model_cls=LlamaForCausalLM) -> dict[str, jax.ShapeDtypeStruct]:
  """Returns {path: ShapeDtypeStruct} of the model's parameters without allocating them."""
  abstract = nnx.eval_shape(lambda: model_cls(config, nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  return {"/".join(str(k) for k in path): var.get_value() for path, var in flat}


def convert_tensors(tensors: Iterable[tuple[str, str, np.ndarray]], expected: dict[str, jax.ShapeDtypeStruct],
                    dtype, source: str, rules=LLAMA_TABLE, ignored=IGNORED) -> dict[str, np.ndarray]:
  """Returns {path: array in `dtype`} from (file, source name, array) triples, or raises listing all problems.

  Each output array is allocated once, when its first tensor arrives, and filled in place (a
  stacked array one layer slot at a time), so only the tensor in hand exists beside the output.
  """
  out: dict[str, np.ndarray] = {}
  filled: dict[str, set] = {}
  problems = []
  for file_name, name, array in tensors:
    mapped = table.to_ours(name, rules)
    if mapped is None:
      if not any(re.fullmatch(p, name) for p in ignored):
        problems.append(f"unexpected tensor {name} (in {pathlib.Path(file_name).name})")
      continue
    path, layer, transform = mapped
    if path not in expected:
      problems.append(f"tensor {name} maps to {path}, which this config does not have")
      continue
    shape = tuple(expected[path].shape)
    if layer is not None and layer >= shape[0]:
      problems.append(f"tensor {name}: layer {layer}, but the config has {shape[0]} layers")
      continue
    slots = filled.setdefault(path, set())  # seen, even if mis-shaped: reported once, not also as missing
    if layer in slots:
      problems.append(f"tensor {name} appears twice")
      continue
    slots.add(layer)
    value = transform(array)
    slot_shape = shape[1:] if layer is not None else shape
    if tuple(value.shape) != slot_shape:
      problems.append(f"{name}: shape {tuple(array.shape)} does not fit {path} {slot_shape}")
      continue
    if path not in out:
      out[path] = np.empty(shape, dtype)
    if layer is None:
      out[path][...] = value
    else:
      out[path][layer] = value
  for path, struct in expected.items():
    if path not in filled:
      problems.append(f"missing tensor for {path}")
      continue
    names = table.to_source(path, rules, struct.shape[0] if struct.shape else 0) or []
    problems += [f"missing tensor {name} (for {path})" for name, layer, _ in names
                 if layer is not None and layer not in filled[path]]
  if problems:
    raise ConversionError(source, problems)
  return out


def convert_llama(src: str | pathlib.Path, out: str | pathlib.Path, dtype: str = "bfloat16") -> LlamaConfig:
  """Converts an HF LLaMA directory into a model directory at `out`; returns its config."""
  src = pathlib.Path(src)
  if dtype not in ("bfloat16", "float32"):
    raise UserError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
  config = LlamaConfig.from_hf_file(src, param_dtype=dtype)
  expected = abstract_params(config)
  np_dtype = jax.numpy.dtype(config.storage_dtype)
  flat = convert_tensors(torch_files.iter_checkpoint(src), expected, np_dtype, str(src))
  model_io.save_model_dir(out, kind="llama", config=config.architecture(), params=model_io.nest(flat), source=str(src.absolute()))
  copy_tokenizer(src, out)
  return config


def copy_tokenizer(src: str | pathlib.Path, out: str | pathlib.Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
  """Copies the tokenizer files (`names`) present in `src` to `out`; returns their names."""
  copied = []
  for name in names:
    if (pathlib.Path(src) / name).is_file():
      shutil.copy2(pathlib.Path(src) / name, pathlib.Path(out) / name)
      copied.append(name)
  return copied
