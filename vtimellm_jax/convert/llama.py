"""HF LLaMA/Vicuna weights <-> our parameter tree, as one explicit table used in both directions.

Import reads a HF directory one tensor at a time (at most one shard open), checks every shape
against an `nnx.eval_shape` skeleton and reports every missing, unexpected or mis-shaped tensor in
one `ConversionError`. Export is the same table read backwards.
"""

from __future__ import annotations

import dataclasses
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

# (HF name, our path, transform) -- read forwards on import, backwards on export.
LLAMA_TABLE: tuple[table.Rule, ...] = (
    ("model.embed_tokens.weight", "model/embed_tokens", table.identity),
    ("model.norm.weight", "model/norm/weight", table.identity),
    ("lm_head.weight", "lm_head/kernel", table.transpose),
    ("model.layers.{layer}.self_attn.{proj}.weight", "model/layers/{layer}/self_attn/{proj}/kernel", table.transpose),
    ("model.layers.{layer}.mlp.{proj}.weight", "model/layers/{layer}/mlp/{proj}/kernel", table.transpose),
    ("model.layers.{layer}.{norm}.weight", "model/layers/{layer}/{norm}/weight", table.identity),
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
  """Returns {path: array in `dtype`} from (file, hf_name, array) triples, or raises listing all problems."""
  out, problems, seen = {}, [], set()
  for file_name, name, array in tensors:
    mapped = table.translate(name, rules)
    if mapped is None:
      if not any(re.fullmatch(p, name) for p in ignored):
        problems.append(f"unexpected tensor {name} (in {pathlib.Path(file_name).name})")
      continue
    path, transform = mapped
    seen.add(path)
    if path not in expected:
      problems.append(f"tensor {name} maps to {path}, which this config does not have")
      continue
    value = transform(array)
    if tuple(value.shape) != tuple(expected[path].shape):
      problems.append(f"{name}: shape {tuple(array.shape)} does not fit {path} {tuple(expected[path].shape)}")
      continue
    out[path] = value.astype(dtype)
  problems += [f"missing tensor for {path}" for path in expected if path not in seen]
  if problems:
    raise ConversionError(source, problems)
  return out


def to_hf_state_dict(tree: dict, rules=LLAMA_TABLE) -> dict[str, np.ndarray]:
  """Returns the HF state dict (torch layout, numpy arrays) of a LLaMA parameter tree."""
  out, problems = {}, []
  for path, value in model_io.flatten(tree).items():
    mapped = table.translate(path, rules, reverse=True)
    if mapped is None:
      problems.append(f"no HF name for {path}")
      continue
    name, transform = mapped
    out[name] = transform(np.asarray(value))
  if problems:
    raise ConversionError("parameter tree", problems)
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
  model_io.save_model_dir(out, kind="llama", config=dataclasses.asdict(config), params=model_io.nest(flat), source=str(src.absolute()))
  copy_tokenizer(src, out)
  return config


def copy_tokenizer(src: str | pathlib.Path, out: str | pathlib.Path) -> list[str]:
  """Copies the tokenizer files present in `src` to `out`; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    if (pathlib.Path(src) / name).is_file():
      shutil.copy2(pathlib.Path(src) / name, pathlib.Path(out) / name)
      copied.append(name)
  return copied
