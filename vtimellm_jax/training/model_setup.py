"""Builds the model a stage trains: base weights, then what the config loads, then fresh LoRA.

Stages differ only in config: `load.adapter` brings a stage-1 adapter, `load.merge_lora` merges a
stage-2 LoRA into the base (stage 3), `lora` attaches fresh factors, and `trainable` says which
variables the optimizer sees. The same function rebuilds the base of a run for `export`.
"""

from __future__ import annotations

import json

import ml_collections
from flax import nnx

from vtimellm_jax import model_io
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import lora, time_code
from vtimellm_jax.models.llama import LlamaConfig
from vtimellm_jax.models.load import load_model
from vtimellm_jax.models.vtimellm import VTimeLLM

TRAINABLE = {
    "adapter": nnx.PathContains("mm_projector"),
    "lora": nnx.LoRAParam,
    "all": nnx.Param,
}

RUN_JSON = "run.json"  # the config of a training run, written into its workdir


def trainable_filter(name: str):
  """Returns the nnx filter of the variables a stage trains ('adapter', 'lora' or 'all')."""
  if name not in TRAINABLE:
    raise UserError(f"config.trainable must be one of {sorted(TRAINABLE)}, got {name!r}")
  return TRAINABLE[name]


# "auto" scans the layers on TPU when the base is split over at least this many devices. The scan
# stacks each device's share of the frozen layers, a copy of 1/N of them: on one device the whole
# base again. AOT compiles of the 7B step (docs/performance.md): on v5e-16 scanning saves 2.65 GiB
# per device, on GPU it costs (8xH100: 32.80 GiB scanned, 12.14 unrolled), so GPUs stay unrolled.
AUTO_SCAN_MIN_SHARDS = 4
_SCAN_VALUES = {"auto": "auto", "on": "on", "true": "on", "off": "off", "false": "off"}


def scan_layers(config: ml_collections.ConfigDict, layer_shards: int, platform: str) -> bool:
  """Returns whether `config.model.scan_layers` (auto | on | off) scans, the base split `layer_shards` ways.

  `platform` is that of the devices trained on (or compiled for). A config without the field runs
  unrolled; scanning changes no numbers, so a resumed run may switch either way.
  """
  raw = str(config.model.get("scan_layers", "off")).lower()
  if raw not in _SCAN_VALUES:
    raise UserError(f"config.model.scan_layers must be auto, on or off, got {raw!r}")
  value = _SCAN_VALUES[raw]
  return value == "on" or (value == "auto" and platform == "tpu" and layer_shards >= AUTO_SCAN_MIN_SHARDS)


def _model_overrides(config: ml_collections.ConfigDict, layer_shards: int, platform: str) -> dict:
  m = config.model
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention_impl=m.attention_impl,
              scan_layers=scan_layers(config, layer_shards, platform))


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig:
  c = config.lora
  return lora.LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets))


def build_base(config: ml_collections.ConfigDict, vocab_size: int | None = None, layer_shards: int = 1,
               platform: str = "cpu") -> VTimeLLM:
  """Returns the VTimeLLM of `model.base` (or a seeded random preset) with the configured loads applied.

  `layer_shards` / `platform`: how many devices the trainer splits the base over, and of what kind
  (they decide scan_layers=auto).
  """
  rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
  overrides = _model_overrides(config, layer_shards, platform)
  if config.model.base:
    model = load_model(config.model.base, VTimeLLM, rngs=rngs, **overrides)
  else:
    vocab = config.model.vocab_size or vocab_size
    sizes = {k: config.model[k] for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads") if config.model[k]}
    if "num_heads" in sizes:
      sizes["num_kv_heads"] = sizes["num_heads"]
    extra = {"vocab_size": vocab} if vocab else {}
    for key in ("time_code", "rope_theta"):
      if config.model.get(key, 0.0):
        extra[key] = float(config.model[key])
    model = VTimeLLM(LlamaConfig.preset(config.model.preset, **overrides, **sizes, **extra), rngs)
    if model.config.time_code:
      time_code.init_time_pieces(model, _time_piece_ids(config))
  if config.load.adapter:
    tree = trained_params(config.load.adapter)
    if "mm_projector" not in tree:
      raise UserError(f"{config.load.adapter}: holds no mm_projector (is it a stage-1 run?)")
    model_io.assign_params(model.mm_projector, tree["mm_projector"], f"{config.load.adapter} (adapter)")
  if config.load.merge_lora:
    source = config.load.merge_lora
    tree = trained_params(source)
    run = read_run_config(source)
    lora.attach_lora(model, lora_config(run), nnx.Rngs(0))
    model_io.assign_params(model, tree, f"{source} (LoRA to merge)", variable_filter=nnx.LoRAParam)
    lora.merge_lora(model)
  return model


def _time_piece_ids(config: ml_collections.ConfigDict) -> list[int]:
  """Returns the ids of the 100 index pieces ("▁00".."▁99", else "00".."99") in the run's tokenizer."""
  from vtimellm_jax.data import tokenizer as tokenizer_lib

  if not config.data.tokenizer:
    raise UserError("config.model.time_code > 0 on a random model needs config.data.tokenizer")
  vocab = tokenizer_lib.load_tokenizer(config.data.tokenizer).get_vocab()
  bare = [p.lstrip(tokenizer_lib.SPACE_MARKER) for p in time_code.TIME_PIECES]
  spaced_ids, bare_ids = ([tokenizer_lib.piece_id(vocab, p) for p in pieces]
                          for pieces in (time_code.TIME_PIECES, bare))
  for ids in (spaced_ids, bare_ids):
    if None not in ids:
      return ids
  missing = [p for p, i in zip(time_code.TIME_PIECES, spaced_ids) if i is None]
  raise UserError(f"{config.data.tokenizer}: config.model.time_code needs the 100 index pieces as single tokens "
                  f"(train_tokenizer(..., pieces=time_code.TIME_PIECES)), or else {bare[0]}..{bare[-1]}; "
                  f"missing {', '.join(repr(p) for p in missing[:5])}")


def build_train_model(config: ml_collections.ConfigDict, vocab_size: int | None = None, layer_shards: int = 1,
                      platform: str = "cpu") -> VTimeLLM:
  """Returns the stage's model: its base (see `build_base`) plus fresh LoRA when LoRA trains."""
  model = build_base(config, vocab_size, layer_shards, platform)
  if config.trainable == "lora":
    lora.attach_lora(model, lora_config(config), nnx.Rngs(params=config.seed + 2))
  return model


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """Returns the config a run was trained with, fields added since then taking today's defaults."""
  from configs import common

  from vtimellm_jax.training.checkpointing import workdir_path

  path = workdir_path(workdir) / RUN_JSON
  if not path.is_file():
    raise UserError(f"{workdir}: not a training workdir (no {RUN_JSON})")
  saved = json.loads(path.read_text())
  config = common.recipe(saved.get("size", "tiny"))
  _merge(config, saved)
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def trained_params(workdir: str) -> dict:
  """Returns the trained parameters of the latest checkpoint of a training workdir."""
  from vtimellm_jax.training import checkpointing

  params = checkpointing.restore_params(workdir)
  if params is None:
    raise UserError(f"{workdir}: no checkpoint found")
  return params
