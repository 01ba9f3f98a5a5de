"""Saving and loading whole models (LLaMA or VTimeLLM) as model directories (see `model_io`)."""

from __future__ import annotations

import dataclasses
import pathlib

from flax import nnx

from vtimellm_jax import model_io
from vtimellm_jax.models import lora
from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vtimellm_jax.models.vtimellm import VTimeLLM

KINDS = {"llama": LlamaForCausalLM, "vtimellm": VTimeLLM}


def save_model(model: LlamaForCausalLM, directory: str | pathlib.Path, **extra) -> None:
  """Writes `model` (LoRA factors included, if attached) to a model directory."""
  kind = "vtimellm" if isinstance(model, VTimeLLM) else "llama"
  attached = [(path, layer) for path, layer in lora.lora_layers(model) if layer.has_lora]
  if attached:
    # The scaling is static module state, not a parameter: it travels in model.json.
    layer = attached[0][1]
    rank = layer.lora_a.shape[-1]
    extra["lora"] = {"rank": rank, "alpha": layer.lora_scaling * rank,
                     "targets": sorted({str(path[-1]) for path, _ in attached})}
  model_io.save_model_dir(directory, kind=kind, config=dataclasses.asdict(model.config),
                          params=model_io.params_tree(model), **extra)


def load_model(directory: str | pathlib.Path, model_cls=None, rngs: nnx.Rngs | None = None, **overrides):
  """Returns the model stored in a model directory.

  `model_cls` defaults to the directory's kind. A LLaMA directory may be opened as a VTimeLLM: its
  `mm_projector` then keeps its fresh initialisation (stage 1 trains it). `overrides` replace
  config fields (e.g. dtype="bfloat16", remat="full").
  """
  meta = model_io.read_model_json(directory)
  model_cls = model_cls or KINDS[meta["kind"]]
  config = LlamaConfig(**{**meta["config"], **overrides})
  model = model_cls(config, rngs or nnx.Rngs(0))
  tree = model_io.load_params(directory)
  if meta["kind"] == "llama" and model_cls is VTimeLLM:
    projector = model_io.params_tree(model.mm_projector)
    tree = {**tree, "mm_projector": projector}
  if "lora" in meta:
    spec = meta["lora"]
    config = lora.LoraConfig(rank=spec["rank"], alpha=spec["alpha"], dropout=0.0, targets=tuple(spec["targets"]))
    lora.attach_lora(model, config, nnx.Rngs(0))
  model_io.assign_params(model, tree, str(directory))
  return model
