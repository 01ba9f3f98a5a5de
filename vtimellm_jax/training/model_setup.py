"""Builds the model a stage trains, every array born in its shards: base, loads, merges, fresh LoRA.

Stages differ only in config: `model.base` is the frozen base (a model directory, its own unmerged
LoRA merged in; or a seeded random preset), `load.adapter` brings a stage-1 adapter, `load.merge_lora`
merges a stage-2 LoRA into the base (stage 3), `lora` attaches fresh factors, and `trainable` says
which variables the optimizer sees. Each step is one `load.sharded_model` pass over the mesh that
reuses the arrays of the pass before, so nothing is whole on one device and nothing is held twice;
merges run on the sharded kernels. The same function rebuilds a run's model for `export`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import ml_collections
from flax import nnx

from vtimellm_jax import model_io
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import families, load, lora, time_code, vtimellm
from vtimellm_jax.models.vtimellm import VTimeLLM
from vtimellm_jax.training import checkpointing, config_files
from vtimellm_jax.training.run_record import RUN_JSON  # the config of a training run, in its workdir

TRAINABLE = vtimellm.TRAINABLE


def trainable_filter(name: str):
  """Returns the nnx filter of the variables a stage trains ('adapter', 'lora' or 'all')."""
  if name not in TRAINABLE:
    raise UserError(f"config.trainable must be one of {sorted(TRAINABLE)}, got {name!r}")
  return TRAINABLE[name]


def _model_overrides(config: ml_collections.ConfigDict) -> dict:
  m = config.model
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention_impl=m.attention_impl,
              quant=m.get("quant", ""), double_quant=m.get("double_quant", True))


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig:
  c = config.lora
  return lora.LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets))


def base_structure(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> Callable[[], VTimeLLM]:
  """Returns a function building the stage's base VTimeLLM, randomly initialised, without LoRA.

  With `model.base` the architecture is that directory's (its weights come later, from the files);
  otherwise the preset's, resized by the config, seeded by `config.seed`.
  """
  overrides = _model_overrides(config)
  if config.model.base:
    meta = {k: v for k, v in model_io.read_model_json(config.model.base).items() if k != "lora"}
    return load.model_builder(meta, VTimeLLM, config.seed, **overrides)
  vocab = config.model.vocab_size or vocab_size
  sizes = {k: config.model[k] for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads") if config.model[k]}
  if "num_heads" in sizes and families.family_of_preset(config.model.preset).kv_head_per_head:
    sizes["num_kv_heads"] = sizes["num_heads"]  # LLaMA's heads each have their own key/value; ChatGLM3 keeps 2 groups
  extra = {"vocab_size": vocab} if vocab else {}
  for key in ("time_code", "rope_theta"):
    if config.model.get(key, 0.0):
      extra[key] = float(config.model[key])
  model_config = families.preset(config.model.preset, **overrides, **sizes, **extra)
  piece_ids = _time_piece_ids(config) if model_config.time_code else None

  def build():
    model = VTimeLLM(model_config, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    if piece_ids is not None:
      time_code.init_time_pieces(model, piece_ids)
    return model

  return build


def with_lora(build: Callable[[], VTimeLLM], config: lora.LoraConfig, seed: int) -> Callable[[], VTimeLLM]:
  """Returns `build` followed by attaching fresh LoRA factors (seeded by `seed`)."""

  def build_with_lora():
    model = build()
    lora.attach_lora(model, config, nnx.Rngs(params=seed))
    return model

  return build_with_lora


def train_structure(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> Callable[[], VTimeLLM]:
  """Returns a function building the module a stage trains (the base, plus fresh LoRA when LoRA trains)."""
  build = base_structure(config, vocab_size)
  return with_lora(build, lora_config(config), config.seed + 2) if config.trainable == "lora" else build


def build_base(config: ml_collections.ConfigDict, vocab_size: int | None = None, mesh=None) -> VTimeLLM:
  """Returns the stage's base on `mesh`: `model.base` (its LoRA merged) or a random preset, then the loads.

  `load.adapter` replaces the adapter with a stage-1 run's; `load.merge_lora` merges a stage-2 run's
  LoRA into the kernels, on their shards. With `model.quant` the decoder projections are quantised
  as they load (`load.QuantizingSource`); when a LoRA merges into them, or the base is random, they
  are quantised after the merge or the initialisation, one projection at a time.
  """
  if config.model.get("quant") and (config.load.merge_lora or not config.model.base):
    # The stage-2 LoRA merges into the full-precision base. A random base is created in full precision
    # too: quantised inside the one jitted initialisation, every layer's float32 temporaries would be
    # live at once (`lora.sharded_quantize`).
    full = config.copy_and_resolve_references()
    full.model.quant = ""
    model = build_base(full, vocab_size, mesh)
    lora.quantize_projections(model, config.model.quant, config.model.double_quant)
    return model
  structure = base_structure(config, vocab_size)
  if config.model.base:
    model = load.load_model(config.model.base, VTimeLLM, mesh=mesh, seed=config.seed, merge_lora=True,
                            **_model_overrides(config))
  else:
    model = load.sharded_model(structure, mesh, what="the random base")
  if config.load.adapter:
    adapter = _workdir_source(config.load.adapter, lambda path: path[0] == "mm_projector", "adapter")
    if not adapter.available():
      raise UserError(f"{config.load.adapter}: holds no mm_projector (is it a stage-1 run?)")
    model = load.sharded_model(structure, mesh, [adapter, load.module_arrays(model)],
                               may_initialise=lambda path: False, what="the base with the stage-1 adapter")
  if config.load.merge_lora:
    source = config.load.merge_lora
    run = read_run_config(source)
    factors = _workdir_source(source, lora.is_lora_path, "LoRA to merge")
    if not factors.available():
      raise UserError(f"{source}: holds no LoRA factors to merge (is it a stage-2 run?)")
    merging = with_lora(structure, dataclasses.replace(lora_config(run), dropout=0.0), seed=0)
    model = load.sharded_model(merging, mesh, [factors, load.module_arrays(model)],
                               may_initialise=lambda path: False, what=f"the base with {source}'s LoRA")
    lora.merge_lora(model)
  return model


def build_train_model(config: ml_collections.ConfigDict, vocab_size: int | None = None, mesh=None,
                      trained: str | None = None, step: int | None = None) -> VTimeLLM:
  """Returns the stage's model on `mesh`: its base (see `build_base`) plus fresh LoRA when LoRA trains.

  With `trained` (a workdir) the trainable parameters come from its latest (or `step`) checkpoint.
  """
  build = train_structure(config, vocab_size)
  sources = [checkpointing.params_source(trained, step)] if trained else []
  if trained and config.trainable == "all":  # the checkpoint holds every parameter: no base to read
    return load.sharded_model(build, mesh, sources, may_initialise=lambda path: False, what=f"{trained}'s model")
  base = build_base(config, vocab_size, mesh)
  return load.sharded_model(build, mesh, [*sources, load.module_arrays(base)], may_initialise=lora.is_lora_path,
                            what="the model to train")


def _workdir_source(workdir: str, keep, what: str) -> load.DirectorySource:
  return checkpointing.params_source(workdir, keep=keep, what=what)


def _time_piece_ids(config: ml_collections.ConfigDict) -> list[int]:
  """Returns the ids of the 100 index pieces ("▁00".."▁99", else "00".."99") in the run's tokenizer."""
  from vtimellm_jax.data import tokenizer as tokenizer_lib

  if not config.data.tokenizer:
    raise UserError("config.model.time_code > 0 on a random model needs config.data.tokenizer")
  vocab = tokenizer_lib.load_encoder(config.data.tokenizer).vocab
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


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """Returns the config a run was trained with, fields added since then taking today's defaults."""
  common = config_files.bundled("common")
  path = checkpointing.workdir_path(workdir) / RUN_JSON
  if not path.is_file():
    raise UserError(f"{workdir}: not a training workdir (no {RUN_JSON})")
  saved = json.loads(path.read_text())
  # The recipe of the run's own family and size: a ChatGLM3 `6b` run is not looked up among Vicuna's.
  config = common.recipe(saved.get("size", "tiny"), saved.get("family", families.VICUNA.name))
  _merge(config, saved)
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value
