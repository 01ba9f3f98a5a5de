"""Turning a training workdir into an inference model directory."""

from __future__ import annotations

import pathlib

import jax

from vtimellm_jax import model_io, sharding
from vtimellm_jax.convert import chatglm
from vtimellm_jax.convert.llama import copy_tokenizer
from vtimellm_jax.models import lora
from vtimellm_jax.models.load import save_model
from vtimellm_jax.training import model_setup


def export_workdir(workdir: str | pathlib.Path, out: str | pathlib.Path, keep_lora: bool = False,
                   step: int | None = None) -> pathlib.Path:
  """Writes the model a run trained (base + loads + trained parameters) to `out`; returns `out`.

  The model is assembled split over every local device (`fsdp`), so no device holds it whole. A run
  that trained on a quantised base (QLoRA, `model.quant`) is written with its base in full precision,
  the weights that base was quantised from, as the release answers with a `--bits 4` run's LoRA
  (answering can quantise it again with `--quant`). A model directory
  never holds quantised kernels: their float values would not be the base's.
  """
  config = model_setup.read_run_config(str(workdir))
  config.model.quant = ""
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.local_devices())
  model = model_setup.build_train_model(config, _vocab_size(config), mesh, trained=str(workdir), step=step)
  if not keep_lora:
    lora.merge_lora(model)
  save_model(model, out, source_workdir=str(pathlib.Path(workdir).absolute()), stage=config.stage,
             **_carried_records(config.model.base))
  tokenizer_dir = config.data.tokenizer or config.model.base
  if tokenizer_dir:
    copy_tokenizer(tokenizer_dir, out)
  return pathlib.Path(out)


def _carried_records(base: str) -> dict:
  """Returns the base model directory's records that hold for a model trained from it (the regrouping
  of a per-head ChatGLM3 query_key_value, which `convert release` checks)."""
  if not base or not (pathlib.Path(base) / model_io.MODEL_JSON).is_file():
    return {}
  meta = model_io.read_model_json(base)
  return {chatglm.QKV_REGROUPED: True} if chatglm.was_regrouped(meta) else {}


def _vocab_size(config) -> int | None:
  if config.model.base or config.model.vocab_size:
    return None
  from vtimellm_jax.data import tokenizer as tokenizer_lib

  return len(tokenizer_lib.load_encoder(config.data.tokenizer))
