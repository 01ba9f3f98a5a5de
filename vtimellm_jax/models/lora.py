"""Linear layers with optional LoRA factors, and the LoRA operations the recipe needs.

A `Linear` holds a frozen-by-filter `kernel` (`nnx.Param`, [in, out]) and, once LoRA is attached,
`lora_a` [in, r] and `lora_b` [r, out] as `nnx.LoRAParam`, so a stage chooses what trains with a
filter (`nnx.LoRAParam` for stages 2-3). `LoRAParam` subclasses `Param`: frozen base weights are
selected with `BASE_PARAMS` below, never with plain `nnx.Param`.

y = x @ W + (alpha / r) * dropout(x) @ A @ B, as peft's `lora.Linear` computes it (peft stores
A as [r, in] and B as [out, r]; conversion transposes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# The projections of a LLaMA layer LoRA may target, named as in HF / peft.
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters (the recipe: r 64, alpha 128, dropout 0.05 on every projection)."""

  rank: int = 64
  alpha: float = 128.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(ALL_TARGETS))
    if unknown:
      raise ValueError(f"unknown LoRA targets {unknown}; choose from {ALL_TARGETS}")
    if self.rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


def _param(cls, value, axes):
  # Eager sharding is off: logical names are resolved to a mesh by the trainer's rule table.
  return cls(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias) (+ LoRA). Kernel [in, out] carries logical axis names `axes`."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      axes: tuple[str | None, str | None],
      use_bias: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.in_features, self.out_features = in_features, out_features
    self.axes = axes
    self.dtype = dtype
    init = nnx.initializers.lecun_normal()
    self.kernel = _param(nnx.Param, init(rngs.params(), (in_features, out_features), param_dtype), axes)
    self.bias = _param(nnx.Param, jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
    # Declared as data (not static config) so LoRA can be attached and merged after construction.
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_dropout = nnx.data(None)
    self.lora_scaling = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns float[..., out] in the layer's compute dtype."""
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      h = self.lora_dropout(x) if self.lora_dropout is not None else x
      # LoRA factors are kept in fp32 for the optimizer and computed in the layer dtype.
      h = (h @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
      y = y + h * jnp.asarray(self.lora_scaling, self.dtype)
    return y

  @property
  def has_lora(self) -> bool:
    return self.lora_a is not None

  def attach_lora(self, config: LoraConfig, rngs: nnx.Rngs, param_dtype=jnp.float32) -> None:
    """Adds fresh factors: A ~ kaiming-uniform as peft does, B = 0, so the output is unchanged."""
    if self.has_lora:
      raise ValueError("this layer already has LoRA factors; merge them first")
    # peft initialises A with kaiming_uniform(a=sqrt(5)) on [r, in]: bound = 1 / sqrt(in).
    bound = 1.0 / (self.in_features**0.5)
    a = jax.random.uniform(rngs.params(), (self.in_features, config.rank), param_dtype, -bound, bound)
    self.lora_a = nnx.data(_param(nnx.LoRAParam, a, (self.axes[0], None)))
    self.lora_b = nnx.data(_param(nnx.LoRAParam, jnp.zeros((config.rank, self.out_features), param_dtype), (None, self.axes[1])))
    self.lora_scaling = config.scaling
    # The trainer reseeds the "dropout" stream every step, so dropout masks follow the step number.
    dropout_rngs = nnx.Rngs(dropout=rngs.params())
    self.lora_dropout = nnx.data(nnx.Dropout(config.dropout, rngs=dropout_rngs) if config.dropout > 0 else None)

  def merge_lora(self) -> None:
    """Folds the factors into the kernel (W + alpha/r * A @ B, in fp32) and removes them."""
    if not self.has_lora:
      return
    kernel = self.kernel[...]
    delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)
    self.kernel[...] = (kernel.astype(jnp.float32) + self.lora_scaling * delta).astype(kernel.dtype)
    self.lora_a = self.lora_b = self.lora_dropout = nnx.data(None)
    self.lora_scaling = 0.0


def lora_layers(model: nnx.Module, targets: Sequence[str] = ALL_TARGETS) -> Iterator[tuple[tuple, Linear]]:
  """Yields (path, layer) for every `Linear` whose attribute name is one of `targets`."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Linear) and path and path[-1] in targets:
      yield path, module


def attach_lora(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> int:
  """Attaches fresh LoRA factors to every targeted projection; returns how many layers got one."""
  layers = list(lora_layers(model, config.targets))
  for _, layer in layers:
    layer.attach_lora(config, rngs)
  return len(layers)


def merge_lora(model: nnx.Module) -> int:
  """Merges every LoRA into its base kernel; returns how many layers were merged."""
  merged = 0
  for _, layer in lora_layers(model):
    if layer.has_lora:
      layer.merge_lora()
      merged += 1
  return merged
