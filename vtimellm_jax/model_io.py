"""Model directories: an orbax checkpoint of parameters plus the config that rebuilds the module.

Layout of a model directory written by `save_model_dir`:
  {dir}/model.json   {"kind": "llama" | "clip" | "vtimellm", "config": {...}, ...extra}
  {dir}/params/      orbax checkpoint of a nested dict {name: array}
Converters (`convert llama|clip|release`) and training exports all write this layout; `chat`,
`eval` and `extract-features` read it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vtimellm_jax.errors import UserError

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def save_model_dir(directory: str | pathlib.Path, kind: str, config: dict[str, Any], params: Any, **extra: Any) -> None:
  """Writes `params` (a pytree of arrays) and `{kind, config, **extra}` to `directory`."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  params_path = directory / PARAMS_DIR
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_path, params, force=True)
    checkpointer.wait_until_finished()
  (directory / MODEL_JSON).write_text(json.dumps({"kind": kind, "config": config, **extra}, indent=2) + "\n")


def read_model_json(directory: str | pathlib.Path, kind: str | None = None) -> dict[str, Any]:
  """Returns the parsed `model.json` of a model directory, checking its kind when given."""
  path = pathlib.Path(directory) / MODEL_JSON
  if not path.is_file():
    raise UserError(f"{directory}: not a vtimellm-jax model directory (no {MODEL_JSON})")
  meta = json.loads(path.read_text())
  if kind is not None and meta.get("kind") != kind:
    raise UserError(f"{directory}: holds a '{meta.get('kind')}' model, expected '{kind}'")
  return meta


def load_params(directory: str | pathlib.Path, target: Any | None = None) -> Any:
  """Returns the parameter pytree of a model directory.

  With `target` (a pytree of arrays or `jax.ShapeDtypeStruct`s, possibly sharded) the arrays are
  restored with its shapes, dtypes and shardings; without it, as host numpy-backed arrays.
  """
  params_path = pathlib.Path(directory).absolute() / PARAMS_DIR
  if not params_path.exists():
    raise UserError(f"{directory}: no parameters at {params_path}")
  with ocp.StandardCheckpointer() as checkpointer:
    if target is None:
      return checkpointer.restore(params_path)
    abstract = jax.tree.map(_abstract, target)
    return checkpointer.restore(params_path, abstract)


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


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


def _flat_variables(module, variable_filter):
  from flax import nnx

  return nnx.to_flat_state(nnx.state(module, variable_filter))


def params_tree(module, variable_filter=None) -> dict[str, Any]:
  """Returns the module's variables as a nested {str: ...: array} dict (orbax-friendly keys)."""
  from flax import nnx

  tree: dict[str, Any] = {}
  for path, variable in _flat_variables(module, variable_filter or nnx.Param):
    node = tree
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = variable.get_value()
  return tree


def assign_params(module, tree: dict[str, Any], source: str, variable_filter=None, allow_missing: bool = False) -> None:
  """Sets the module's variables from a `params_tree`-shaped dict, checking every shape.

  All missing, unexpected and mis-shaped entries are reported together in one UserError.
  """
  from flax import nnx

  problems, seen = [], set()
  for path, variable in _flat_variables(module, variable_filter or nnx.Param):
    keys = tuple(str(k) for k in path)
    node = tree
    for key in keys:
      node = node.get(key) if isinstance(node, dict) else None
      if node is None:
        break
    name = "/".join(keys)
    seen.add(name)
    if node is None:
      if not allow_missing:
        problems.append(f"missing {name}")
      continue
    current = variable.get_value()
    if tuple(np.shape(node)) != tuple(current.shape):
      problems.append(f"{name}: shape {tuple(np.shape(node))}, expected {tuple(current.shape)}")
      continue
    variable.set_value(jax.numpy.asarray(node, dtype=current.dtype))
  unexpected = [name for name in flatten(tree) if name not in seen]
  problems += [f"unexpected {name}" for name in unexpected]
  if problems:
    raise UserError(f"{source}: parameters do not fit the model:\n" + "\n".join(f"  - {p}" for p in problems))
