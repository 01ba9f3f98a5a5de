"""Model directories: an orbax checkpoint of parameters plus the config that rebuilds the module.

Layout of a model directory written by `save_model_dir`:
  {dir}/model.json   {"kind": "llama" | "clip" | "vtimellm", "format": 2, "config": {...}, ...extra}
  {dir}/params/      orbax checkpoint of a nested dict {name: array}
Converters (`convert llama|clip|release`) and training exports all write this layout; `chat`,
`eval`, `extract-features` and training read it through `models.load`.

Memory: saving hands host arrays to orbax without the copy it makes by default (nothing mutates
them while it writes) and moves device arrays to the host a bounded amount at a time; restoring
reads one array at a time straight into its target sharding, so loading a model holds it once
plus its largest array in flight (`vtimellm-jax bench load` measures it).
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.serialization import type_handler_registry, type_handlers

from vtimellm_jax.errors import UserError

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
# 2: the LLaMA decoder's layers stacked along a leading axis (`model/layers/...` is [L, ...]).
# Directories without "format" hold one entry per layer (`model/layers/0/...`).
FORMAT = 2
STACKED_KINDS = ("llama", "vtimellm")
# Arrays are written in chunks of at most this many bytes, so reading one decodes a chunk at a time.
CHUNK_BYTES = 64 * 2**20
# Device-to-host bytes in flight while saving device arrays (orbax counts in units of 1e9 bytes).
SAVE_HOST_GB = 0.5

Path = tuple[str, ...]


def _handler() -> ocp.PyTreeCheckpointHandler:
  # Host arrays are written as they are: orbax's default deep-copies each numpy array first.
  registry = type_handler_registry.create_type_handler_registry(*[
      (kind, type_handlers.NumpyHandler(deepcopy_host_arrays=False) if kind is np.ndarray else handler)
      for kind, handler in type_handler_registry._DEFAULT_TYPE_HANDLERS])  # pylint: disable=protected-access
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_device_host_concurrent_gb=SAVE_HOST_GB)


def save_model_dir(directory: str | pathlib.Path, kind: str, config: dict[str, Any], params: Any, **extra: Any) -> None:
  """Writes `params` (a nested dict of host or device arrays) and `{kind, format, config, **extra}` to `directory`."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
  with ocp.Checkpointer(_handler()) as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params, save_args=save_args, ocdbt_target_data_file_size=CHUNK_BYTES), force=True)
  meta = {"kind": kind, "format": FORMAT, "config": config, **extra}
  (directory / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def read_model_json(directory: str | pathlib.Path, kind: str | None = None) -> dict[str, Any]:
  """Returns the parsed `model.json` of a model directory, checking its kind and format."""
  path = pathlib.Path(directory) / MODEL_JSON
  if not path.is_file():
    raise UserError(f"{directory}: not a vtimellm-jax model directory (no {MODEL_JSON})")
  try:
    meta = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: invalid JSON ({e})") from None
  if kind is not None and meta.get("kind") != kind:
    raise UserError(f"{directory}: holds a '{meta.get('kind')}' model, expected '{kind}'")
  if meta.get("kind") in STACKED_KINDS and meta.get("format", 1) < FORMAT:
    raise UserError(f"{directory}: written by an older vtimellm-jax that stored the decoder's layers one by one; "
                    f"this version stores them stacked. Re-create it: {_recreate_hint(meta)}")
  return meta


def _recreate_hint(meta: dict[str, Any]) -> str:
  source = meta.get("source")
  if meta.get("source_workdir"):
    return f"vtimellm-jax export --model {meta['source_workdir']} --out <dir>"
  if isinstance(source, dict):
    return f"vtimellm-jax convert release --base {source.get('base')} --projector {source.get('projector')} ... --out <dir>"
  if source:
    return f"vtimellm-jax convert llama --src {source} --out <dir>"
  return "convert the source checkpoint again (vtimellm-jax convert llama / release) or re-export the training run"


def storage_path(spec: str | os.PathLike) -> epath.Path:
  """Returns a path that may be local (made absolute) or on a bucket (gs://..., with gcsfs installed).

  The one path layer of everything the project writes: workdirs, model directories, features.
  """
  return epath.Path(spec) if "://" in str(spec) else epath.Path(pathlib.Path(spec).absolute())


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def write_atomic(path: epath.Path, write: Callable[[Any], None], mode: str = "wb") -> None:
  """Writes `path` with `write(file)` so that it is never seen half-written.

  Locally through a temp file beside it and a rename; on a bucket directly, as an object store
  shows an object only once its upload is complete (and has no rename).
  """
  if is_remote(path):
    with path.open(mode) as f:
      write(f)
    return
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, mode) as f:
    write(f)
  os.replace(tmp, path)


def _params_path(directory: str | pathlib.Path) -> epath.Path:
  """Returns `directory/params`, local (made absolute) or on a bucket (gs://...)."""
  root = storage_path(directory)
  path = root / PARAMS_DIR
  if not path.exists():
    raise UserError(f"{directory}: no parameters at {path}")
  return path


def saved_arrays(directory: str | pathlib.Path) -> dict[Path, jax.ShapeDtypeStruct]:
  """Returns {path: ShapeDtypeStruct} of every array a model directory holds, read from metadata only."""
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    tree = checkpointer.metadata(_params_path(directory)).item_metadata.tree
  return {parts: jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype))
          for parts, meta in _leaves(tree, ())}


def restore_arrays(directory: str | pathlib.Path, targets: dict[Path, jax.ShapeDtypeStruct]) -> dict[Path, jax.Array]:
  """Returns {path: array} of the named arrays of a model directory, each placed and cast as its target.

  Every target carries a sharding: each process reads only the shards its devices hold. Arrays are
  restored one at a time (and the reader's buffers collected in between), so the host holds at
  most one array beyond what is placed.
  """
  params_path = _params_path(directory)
  out = {}
  with ocp.Checkpointer(_handler()) as checkpointer:
    for path, target in targets.items():
      item = nest({"/".join(path): target})
      restore_args = jax.tree.map(
          lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), item)
      restored = checkpointer.restore(params_path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
      (out[path],) = jax.tree.leaves(restored)
      del restored
      gc.collect()
  return out


def load_params(directory: str | pathlib.Path) -> Any:
  """Returns the parameter pytree of a model directory as host (numpy) arrays, nested dicts of names."""
  params_path = _params_path(directory)
  with ocp.Checkpointer(_handler()) as checkpointer:
    tree = checkpointer.metadata(params_path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(params_path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def nest(flat: dict[str, Any], sep: str = "/") -> dict[str, Any]:
  """Returns the nested {key: {...}} dict (the checkpoint layout) of `sep`-joined names."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(sep)
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def flatten(tree: dict[str, Any], sep: str = "/") -> dict[str, Any]:
  """Returns {`sep`-joined name: leaf} of a nested dict (the inverse of `nest`)."""
  return {sep.join(parts): leaf for parts, leaf in _leaves(tree, ())}


def _leaves(tree, prefix):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), value
