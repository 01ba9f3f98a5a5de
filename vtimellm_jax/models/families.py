"""The LLM families VTimeLLM is trained on, one record each: the one place that knows them by name.

The release trains Vicuna v1.5 (7B, 13B) and ChatGLM3-6B. A family's record holds its sizes and
their presets, its default size, the templates its stages build samples with, how its loss is
taken, and the model module that defines its presets and LoRA targets. Configs, the quickstart,
benchmarks and training setup ask this registry instead of branching on a family's name; a third
LLaMA-architecture chat model needs one entry here, its presets in a model module, and its
conversation template (data/templates.py).

Preset names are what a run's config stores (`model.preset`), so they never change: a run.json
written today resolves the same way in every later version.

This module imports no JAX (command-line parsers read it); the family's module is imported when a
preset is built or its LoRA targets are asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Family:
  """What differs between the LLM families, and nothing else."""

  name: str
  module: str  # the model module holding one function per preset (named by `presets`) and LORA_TARGETS
  presets: Mapping[str, tuple[str, str]]  # size -> (preset name a config stores, function in `module`)
  default_size: str  # the size when only the family is named
  template: str  # how stage 2 and 3 samples are built (data/templates.py)
  caption_template: str  # how stage 0 and 1 samples are built
  tokenizer: str  # the quickstart's synthetic tokenizer: "sentencepiece" (LLaMA's) or "chatglm"
  # LoRA covers the output layer, with dropout, so the loss cannot recompute lm_head in chunks.
  lora_on_output: bool
  # A resized config keeps one key/value head per head (LLaMA); False keeps the preset's groups.
  kv_head_per_head: bool

  @property
  def sizes(self) -> tuple[str, ...]:
    return tuple(self.presets)

  @property
  def lora_targets(self) -> tuple[str, ...]:
    """The projections the release's LoRA covers (its `find_all_linear_names`), in our module names."""
    return tuple(importlib.import_module(self.module).LORA_TARGETS)

  def preset_name(self, size: str) -> str:
    if size not in self.presets:
      raise ValueError(f"{self.name} has no size {size!r}; choose from {', '.join(self.presets)}")
    return self.presets[size][0]


VICUNA = Family(
    name="vicuna",
    module="vtimellm_jax.models.llama",
    presets={"tiny": ("tiny", "tiny"), "7b": ("vicuna_7b", "vicuna_7b"), "13b": ("vicuna_13b", "vicuna_13b")},
    default_size="tiny",
    template="v1",
    caption_template="plain",
    tokenizer="sentencepiece",
    lora_on_output=False,
    kv_head_per_head=True,
)

# The release runs its `_glm.sh` stage 1 with `--version plain`, but with a ChatGLM tokenizer its
# dataset builds every sample with `preprocess_glm`, whatever the version says: `glm` throughout.
CHATGLM3 = Family(
    name="chatglm3",
    module="vtimellm_jax.models.chatglm",
    presets={"6b": ("chatglm3_6b", "chatglm3_6b"), "tiny": ("chatglm3_tiny", "tiny")},
    default_size="6b",
    template="glm",
    caption_template="glm",
    tokenizer="chatglm",
    lora_on_output=True,
    kv_head_per_head=False,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (VICUNA, CHATGLM3)}
SIZES = tuple(dict.fromkeys(size for f in FAMILIES.values() for size in f.presets))


def get(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
  return FAMILIES[name]


def _presets() -> dict[str, tuple[Family, str]]:
  """Returns {preset name: (family, function name)}."""
  return {preset: (family, function) for family in FAMILIES.values() for preset, function in family.presets.values()}


def family_of_preset(name: str) -> Family:
  """Returns the family a preset name (a run's `model.preset`) belongs to."""
  presets = _presets()
  if name not in presets:
    raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(presets)}")
  return presets[name][0]


def preset(name: str, **overrides):
  """Returns the LlamaConfig of a preset name (`tiny`, `vicuna_7b`, `vicuna_13b`, `chatglm3_6b`, ...)."""
  family = family_of_preset(name)
  return getattr(importlib.import_module(family.module), _presets()[name][1])(**overrides)


def preset_of_size(size: str) -> str:
  """Returns the preset of a bare size as benchmarks take it (`tiny`, `7b`, `13b`: Vicuna; `6b`: ChatGLM3)."""
  for family in FAMILIES.values():
    if size in family.presets:
      return family.preset_name(size)
  raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
