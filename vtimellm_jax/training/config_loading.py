"""Loading `configs/stageN.py:arg` files and applying `--config.a.b=value` overrides."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

import ml_collections

from vtimellm_jax.errors import UserError


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Returns the ConfigDict of `path/to/config.py[:arg]` with `--config.key=value` overrides applied."""
  path_text, _, arg = spec.partition(":")
  path = pathlib.Path(path_text)
  if not path.is_file():
    raise UserError(f"config file {path} not found")
  # Config files import their siblings (`from configs import common`): make that resolvable.
  root = str(path.absolute().parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(f"_vtimellm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"{path}: has no get_config(arg) function")
  try:
    config = module.get_config(arg or None)
  except ValueError as e:
    raise UserError(f"{spec}: {e}") from e
  for override in overrides:
    apply_override(config, override, source=spec)
  return config


def apply_override(config: ml_collections.ConfigDict, override: str, source: str = "config") -> None:
  """Sets one `--config.a.b=value` (or `a.b=value`) on `config`, keeping the field's type."""
  text = override[len("--config."):] if override.startswith("--config.") else override
  key, sep, raw = text.partition("=")
  if not sep:
    raise UserError(f"override {override!r} must look like --config.key=value")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise UserError(f"{source}: no config field {key!r} (unknown {part!r})")
    node = node[part]
  if leaf not in node:
    raise UserError(f"{source}: no config field {key!r}; known fields here: {sorted(node.keys())}")
  current = node[leaf]
  node[leaf] = _parse(raw, current, key)


_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _parse(raw: str, current, key: str):
  if isinstance(current, str):
    return raw
  if isinstance(current, tuple):
    return tuple(part.strip() for part in raw.split(",") if part.strip())
  if isinstance(current, bool):  # absl's spellings too: true / false
    value = _BOOLS.get(raw.strip().lower())
    if value is None:
      raise UserError(f"--config.{key}={raw}: expected true or false")
    return value
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{key}={raw}: not a valid {type(current).__name__}") from None
  if isinstance(current, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
    if isinstance(current, int) and not isinstance(value, int):
      raise UserError(f"--config.{key}={raw}: expected an integer")
    return type(current)(value)
  raise UserError(f"--config.{key}={raw}: expected {type(current).__name__}")
