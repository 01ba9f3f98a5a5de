"""Loading `configs/stageN.py:arg` files, applying `--config.a.b=value` overrides, checking the result.

Every field is checked once the overrides are applied (`check_config`): types, ranges and the rules
between fields, all problems in one `UserError`, before any data is read or a device touched.
"""

from __future__ import annotations

import ast
import math

import ml_collections

from vtimellm_jax import cli_types
from vtimellm_jax.data.templates import TEMPLATES
from vtimellm_jax.errors import UserError
from vtimellm_jax.models.llama import ATTENTION_IMPLS, REMAT_MODES
from vtimellm_jax.models.lora import KNOWN_TARGETS as LORA_TARGETS
from vtimellm_jax.models.quant import QTYPES
from vtimellm_jax.models.vtimellm import TRAINABLE
from vtimellm_jax.training import config_files


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Returns the ConfigDict of `path/to/config.py[:arg]` with `--config.key=value` overrides applied.

  The path is resolved and the file loaded by `config_files` (a bare `stage2.py` names the bundled one).
  """
  path_text, _, arg = spec.partition(":")
  path = config_files.resolve(path_text)
  module = config_files.load_module(path)
  if not hasattr(module, "get_config"):
    raise UserError(f"{path}: has no get_config(arg) function")
  try:
    config = module.get_config(arg or None)
  except ValueError as e:
    raise UserError(f"{spec}: {e}") from e
  for override in overrides:
    apply_override(config, override, source=spec)
  check_config(config, spec)
  return config


_INT, _REAL = "an integer", "a number"


def _rules(c: ml_collections.ConfigDict):
  """Yields (field, value, ok, what it must be) for each checked field present in `c`."""
  def get(key):
    node = c
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return _ABSENT
      node = node[part]
    return node

  def at_least(lo, kind=_INT):
    return lambda v: _is_number(v, kind) and v >= lo, f"{kind} >= {lo}"

  def positive():
    return lambda v: _is_number(v, _REAL) and v > 0, "a number > 0"

  def between(lo, hi, hi_open=False):
    end = ")" if hi_open else "]"
    return (lambda v: _is_number(v, _REAL) and lo <= v and (v < hi if hi_open else v <= hi),
            f"a number in [{lo}, {hi}{end}")

  def one_of(options):
    return lambda v: v in options, f"one of {', '.join(options)}"

  def mesh_axis():
    return lambda v: _is_number(v, _INT) and (v == -1 or v >= 1), "-1 (the remaining devices) or an integer >= 1"

  table = {
      "seed": at_least(0),
      "model.dtype": one_of(cli_types.DTYPES), "model.param_dtype": one_of(cli_types.DTYPES),
      "model.remat": one_of(REMAT_MODES), "model.attention_impl": one_of(ATTENTION_IMPLS),
      "model.loss_chunk": at_least(0), "model.vocab_size": at_least(0),
      "model.hidden_size": at_least(0), "model.intermediate_size": at_least(0),
      "model.num_layers": at_least(0), "model.num_heads": at_least(0),
      "model.rope_theta": at_least(0, _REAL), "model.time_code": at_least(0, _REAL),
      "model.quant": (lambda v: v in ("", *QTYPES), f"empty (no quantisation) or one of {', '.join(QTYPES)}"),
      "model.double_quant": (lambda v: isinstance(v, bool), "true or false"),
      "trainable": one_of(tuple(TRAINABLE)),
      "lora.rank": at_least(1), "lora.alpha": positive(), "lora.dropout": between(0, 1, hi_open=True),
      "lora.targets": (lambda v: isinstance(v, tuple) and bool(v) and set(v) <= set(LORA_TARGETS),
                       f"a non-empty list of {', '.join(LORA_TARGETS)}"),
      "data.template": one_of(TEMPLATES), "data.max_length": at_least(2),
      "data.num_buckets": at_least(1), "data.workers": at_least(0),
      "global_batch": at_least(1), "micro_batch": at_least(1), "epochs": at_least(1), "max_steps": at_least(0),
      "optim.lr": positive(), "optim.warmup_ratio": between(0, 1), "optim.weight_decay": at_least(0, _REAL),
      "optim.b1": between(0, 1, hi_open=True), "optim.b2": between(0, 1, hi_open=True), "optim.eps": positive(),
      "optim.max_grad_norm": positive(),
      "mesh.data": mesh_axis(), "mesh.fsdp": mesh_axis(), "mesh.tensor": mesh_axis(),
      "mesh.devices": at_least(0),
      "checkpoint.every_steps": at_least(1), "checkpoint.keep": at_least(1),
      "log_every": at_least(1),
  }
  for key, (ok, what) in table.items():
    value = get(key)
    if value is not _ABSENT:
      yield key, value, ok(value), what


_ABSENT = object()


def _is_number(value, kind: str) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  return isinstance(value, int) if kind == _INT else math.isfinite(value)


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Returns one message per problem of a loaded config (empty when it can run)."""
  problems = [f"{key} = {value!r}: must be {what}" for key, value, ok, what in _rules(config) if not ok]
  bad = {p.split(" ", 1)[0] for p in problems}
  if not bad & {"global_batch", "micro_batch"} and "global_batch" in config and "micro_batch" in config:
    if config.global_batch % config.micro_batch:
      problems.append(f"global_batch = {config.global_batch} is not a multiple of micro_batch = "
                      f"{config.micro_batch}")
  if "mesh" in config and not bad & {"mesh.data", "mesh.fsdp", "mesh.tensor"}:
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1:
      problems.append(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}: at most one axis may be -1")
  if (not bad & {"lora.targets", "lora.dropout", "model.loss_chunk"} and "lora" in config
      and "lm_head" in config.lora.targets and config.lora.dropout > 0 and config.model.get("loss_chunk", 0) > 0):
    # The chunked loss recomputes lm_head per chunk under one dropout state: every chunk would
    # draw the same mask.
    problems.append(f"lora.targets includes lm_head with lora.dropout = {config.lora.dropout}: LoRA dropout on "
                    f"lm_head needs model.loss_chunk = 0 (it is {config.model.loss_chunk})")
  if (not bad & {"model.quant", "trainable"} and "model" in config and config.model.get("quant")
      and config.get("trainable") == "all"):
    problems.append(f"model.quant = {config.model.quant!r} with trainable = 'all': a quantised kernel is frozen; "
                    "train LoRA on it (trainable = 'lora') or the adapter, or train every parameter unquantised")
  return problems


def check_config(config: ml_collections.ConfigDict, source: str = "config") -> None:
  """Raises a UserError listing every problem of `config` (see `config_problems`)."""
  problems = config_problems(config)
  if problems:
    raise UserError(f"{source}: {len(problems)} setting(s) cannot run:\n  " + "\n  ".join(problems))


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
