"""Linear layers with optional LoRA factors, and the LoRA operations the recipe needs.

A `Linear` holds a frozen-by-filter `kernel` (`nnx.Param`, [in, out]) and, once LoRA is attached,
`lora_a` [in, r] and `lora_b` [r, out] as `nnx.LoRAParam`, so a stage chooses what trains with a
filter (`nnx.LoRAParam` for stages 2-3). `LoRAParam` subclasses `Param`: frozen base weights are
selected with `BASE_PARAMS` below, never with plain `nnx.Param`.

y = x @ W + (alpha / r) * dropout(x) @ A @ B, as peft's `lora.Linear` computes it (peft stores
A as [r, in] and B as [out, r]; conversion transposes). The branch is `lora_delta`, whose backward
redraws the dropout mask instead of keeping it. The `nnx.Dropout` a LoRA layer holds supplies the
rate, the train/eval switch and the key stream; the key is drawn from that stream as `nnx.Dropout`
draws it, but the mask is not its Bernoulli draw: an element is kept when a 32-bit hash of the key
and the element's index (`_keep`) is below round((1 - rate) * 2^32), a hash far cheaper than the
threefry of `jax.random`. The keep probability is a multiple of 2^-32 (for the recipe's rate 0.05,
0.95 less 5e-11), and kept elements are scaled by its inverse.

A `Linear` inside the LLaMA decoder's stacked layers holds every layer's weights at once: kernel
[L, in, out], lora_a [L, in, r], lora_b [L, r, out], each dropout stream one key per layer.
Attaching and merging work on the whole stack; the forward pass sees one layer's slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vtimellm_jax import sharding
from vtimellm_jax.models import quant as quant_lib

# The projections of a LLaMA layer LoRA may target, named as in HF / peft: the LLaMA recipe's targets.
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Every `Linear` name LoRA may target: LLaMA's projections, the fused projections of the ChatGLM
# family, and the output layer, which the release's ChatGLM LoRA includes (models/chatglm.py).
KNOWN_TARGETS = ALL_TARGETS + ("qkv_proj", "gate_up_proj", "lm_head")

BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
# Attribute names of a quantised kernel's parts (`Linear.quantize`), in `QuantizedArray` order.
QUANT_PARTS = ("kernel_codes", "kernel_scales", "kernel_scales2", "kernel_offset")
# The projections a quantised base holds quantised: every decoder projection, never lm_head (the
# output layer stays in full precision, as bitsandbytes' conversion leaves it).
QUANTIZED_PROJECTIONS = ALL_TARGETS + ("qkv_proj", "gate_up_proj")
# Attribute names of what attaching LoRA adds to a `Linear`.
LORA_NAMES = ("lora_a", "lora_b", "lora_dropout")


def is_lora_path(path: Sequence[str]) -> bool:
  """Returns whether a variable path names a LoRA factor or LoRA dropout stream."""
  return any(key in LORA_NAMES for key in path)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters (the recipe: r 64, alpha 128, dropout 0.05 on every projection).

  The default targets are LLaMA's; the ChatGLM family's are `chatglm.LORA_TARGETS`.
  """

  rank: int = 64
  alpha: float = 128.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(KNOWN_TARGETS))
    if unknown:
      raise ValueError(f"unknown LoRA targets {unknown}; choose from {KNOWN_TARGETS}")
    if self.rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


def _param(cls, value, axes):
  # Eager sharding is off: logical names are resolved to a mesh by the trainer's rule table.
  return cls(value, out_sharding=tuple(axes), eager_sharding=False)


def quant_axes(axes: tuple, lead_axes: tuple = ()) -> dict[str, tuple]:
  """Returns the logical axes of each part of a quantised kernel whose float kernel has `axes` [in, out].

  Codes and scales are [*L, out, in / ...]: the kernel's axes swapped, except that the scales' block
  axis (in / 64) is not split, as block counts rarely divide a mesh axis; the nested scales and the
  offset, a few numbers a layer, are not split either.
  """
  return {"kernel_codes": (*lead_axes, axes[1], axes[0]), "kernel_scales": (*lead_axes, axes[1], None),
          "kernel_scales2": (*lead_axes, None), "kernel_offset": tuple(lead_axes)}


@functools.cache
def _quantizer(qtype: str, double_quant: bool):
  return jax.jit(functools.partial(quant_lib.quantize_kernel, qtype=qtype, double_quant=double_quant))


@functools.cache
def _scale_decoder(place):
  return jax.jit(quant_lib.block_scales, out_shardings=place)


def sharded_quantize(kernel: jax.Array, qtype: str, double_quant: bool, axes: dict[str, tuple]) -> quant_lib.QuantizedArray:
  """Returns `quant.quantize_kernel(kernel)` computed where the kernel lies, its parts sharded by `axes`.

  A stacked kernel is quantised one layer at a time, each its own program: inside one program XLA
  (its CPU backend at least) keeps float32 temporaries of every layer at once, several times the
  kernel's own bytes.
  """
  quantize = _quantizer(qtype, double_quant)
  if kernel.ndim > 2:
    flat = kernel.reshape(-1, *kernel.shape[-2:])
    layers = [quantize(flat[i]) for i in range(flat.shape[0])]
    lead = kernel.shape[:-2]
    q = jax.tree.map(lambda *parts: jnp.stack(parts).reshape(*lead, *parts[0].shape), *layers)
    del layers
  else:
    q = quantize(kernel)
  mesh = getattr(kernel.sharding, "mesh", None)
  if not isinstance(mesh, jax.sharding.Mesh):
    return q
  place = lambda name, a: None if a is None else jax.device_put(  # noqa: E731
      a, jax.sharding.NamedSharding(mesh, sharding.spec_for(axes[name], a.shape, mesh)))
  return q.replace(**{field: place(name, getattr(q, field)) for field, name in
                      zip(("codes", "scales", "scales2", "offset"), QUANT_PARTS)})


class Linear(nnx.Module):
  """y = x @ kernel (+ bias) (+ LoRA). Kernel [in, out] carries logical axis names `axes`.

  With `quant` (nf4, fp4, int8; `models/quant.py`) the frozen kernel is held quantised instead, as
  bitsandbytes holds a torch weight [out, in]: `kernel` is None and `kernel_codes`, `kernel_scales`
  (and, doubly quantised, `kernel_scales2`, `kernel_offset`) are `QuantizedWeight` variables; the
  matmul is `quant.quantized_matmul`. LoRA attaches to it as to a float kernel but cannot be merged
  into it.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      axes: tuple[str | None, str | None],
      use_bias: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      quant: str = "",
      double_quant: bool = True,
      rngs: nnx.Rngs,
  ):
    self.in_features, self.out_features = in_features, out_features
    self.axes = axes
    self.dtype = dtype
    self.param_dtype = param_dtype
    init = nnx.initializers.lecun_normal()
    kernel = init(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = nnx.data(None)
    self.quant = ""  # the quantisation type of the kernel ("" none; `quantize`)
    for name in QUANT_PARTS:
      setattr(self, name, nnx.data(None))
    if quant:
      self._hold_quantized(quant_lib.quantize_kernel(kernel, quant, double_quant=double_quant), quant, ())
    else:
      self.kernel = _param(nnx.Param, kernel, axes)
    self.bias = _param(nnx.Param, jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
    # Declared as data (not static config) so LoRA can be attached and merged after construction.
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_dropout = nnx.data(None)
    self.lora_scaling = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns float[..., out] in the layer's compute dtype."""
    x = x.astype(self.dtype)
    if self.quant:
      y = quant_lib.quantized_matmul(x, self.quantized_kernel(), self.dtype)
    else:
      y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      dropout = self.lora_dropout
      rate = 0.0 if dropout is None or dropout.deterministic else dropout.rate
      # The key is drawn from the layer's stream as nnx.Dropout draws it; the mask is `_keep`'s.
      key = dropout.rngs() if rate > 0.0 else None
      # LoRA factors are kept in fp32 for the optimizer and computed in the layer dtype.
      y = y + lora_delta(x, self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype), key,
                         self.lora_scaling, rate)
    return y

  @property
  def has_lora(self) -> bool:
    return self.lora_a is not None

  def attach_lora(self, config: LoraConfig, rngs: nnx.Rngs, param_dtype=jnp.float32) -> None:
    """Adds fresh factors: A ~ kaiming-uniform as peft does, B = 0, so the output is unchanged.

    On a stacked kernel [L, in, out] every layer gets its own A [L, in, r] and dropout key.
    """
    if self.has_lora:
      raise ValueError("this layer already has LoRA factors; merge them first")
    lead, lead_axes = self.stack_shape, self.stack_axes
    # peft initialises A with kaiming_uniform(a=sqrt(5)) on [r, in]: bound = 1 / sqrt(in).
    bound = 1.0 / (self.in_features**0.5)
    a = jax.random.uniform(rngs.params(), (*lead, self.in_features, config.rank), param_dtype, -bound, bound)
    b = jnp.zeros((*lead, config.rank, self.out_features), param_dtype)
    self.lora_a = nnx.data(_param(nnx.LoRAParam, a, (*lead_axes, self.axes[0], None)))
    self.lora_b = nnx.data(_param(nnx.LoRAParam, b, (*lead_axes, None, self.axes[1])))
    self.lora_scaling = config.scaling
    self.lora_dropout = nnx.data(_dropout(config.dropout, rngs.params(), lead) if config.dropout > 0 else None)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """The leading (layer) dimensions of a stacked kernel; () for a plain one."""
    return tuple(self._weight.shape[:-2])

  @property
  def stack_axes(self) -> tuple:
    """The logical names of the stacked kernel's leading dimensions."""
    names = self._weight.get_metadata().get("out_sharding") or ()
    return tuple(names[:len(self.stack_shape)]) if names else (None,) * len(self.stack_shape)

  @property
  def _weight(self) -> nnx.Variable:
    # The kernel, or its codes when quantised: both lead with the stacked dimensions.
    return self.kernel_codes if self.quant else self.kernel

  def quantized_kernel(self) -> quant_lib.QuantizedArray:
    """Returns the quantised kernel as a QuantizedArray of float[*L, out, in] (only when `quant`)."""
    value = lambda v: None if v is None else v[...]  # noqa: E731
    return quant_lib.QuantizedArray(value(self.kernel_codes), value(self.kernel_scales), value(self.kernel_scales2),
                                    value(self.kernel_offset), qtype=self.quant, dtype=self.dtype,
                                    blocksize=self.in_features // self.kernel_scales.shape[-1])

  def _hold_quantized(self, q: quant_lib.QuantizedArray, qtype: str, lead_axes: tuple) -> None:
    axes = quant_axes(self.axes, lead_axes)
    for name, array in zip(QUANT_PARTS, (q.codes, q.scales, q.scales2, q.offset)):
      setattr(self, name, nnx.data(None if array is None else _param(quant_lib.QuantizedWeight, array, axes[name])))
    self.quant = qtype

  def quantize(self, qtype: str, double_quant: bool = True) -> None:
    """Replaces the float kernel by its quantisation (`models/quant.py`), in the kernel's sharding.

    The layer lets go of the float kernel, so a model quantised one projection at a time holds one
    float kernel more than its quantised self at most. LoRA must be merged first.
    """
    if self.quant:
      raise ValueError(f"this layer's kernel is already quantised ({self.quant})")
    if self.has_lora:
      raise ValueError("merge this layer's LoRA into its kernel before quantising it")
    kernel = self.kernel.get_value()
    lead_axes = self.stack_axes
    if isinstance(kernel, jax.core.Tracer):  # under nnx.eval_shape: no buffers to place
      q = quant_lib.quantize_kernel(kernel, qtype, double_quant=double_quant)
    else:
      q = sharded_quantize(kernel, qtype, double_quant, quant_axes(self.axes, lead_axes))
    self.kernel = nnx.data(None)
    self._hold_quantized(q, qtype, lead_axes)

  def decode_scales(self) -> bool:
    """Holds a doubly quantised kernel's block scales decoded (float32, `quant.block_scales`), where
    they lie; returns whether there were any. The kernel's values do not change: they are the
    scales every product would decode."""
    if not self.quant or self.kernel_scales2 is None:
      return False
    q = self.quantized_kernel()
    place = getattr(q.scales, "sharding", None)
    scales = _scale_decoder(place)(q) if not isinstance(q.scales, jax.core.Tracer) else quant_lib.block_scales(q)
    axes = quant_axes(self.axes, self.stack_axes)
    self.kernel_scales = nnx.data(_param(quant_lib.QuantizedWeight, scales, axes["kernel_scales"]))
    self.kernel_scales2, self.kernel_offset = nnx.data(None), nnx.data(None)
    return True

  def merge_lora(self) -> None:
    """Folds the factors into the kernel (W + alpha/r * A @ B, in fp32) and removes them."""
    if not self.has_lora:
      return
    if self.quant:
      raise ValueError(f"cannot merge LoRA into a {self.quant} kernel: merge it into the full-precision base, "
                       "then quantise")
    self.kernel.set_value(_merged_kernel(self.kernel.get_value(), self.lora_a.get_value(), self.lora_b.get_value(),
                                         self.lora_scaling))
    self.lora_a = self.lora_b = self.lora_dropout = nnx.data(None)
    self.lora_scaling = 0.0


# Dropout keeps an element when its 32-bit hash is below a threshold: keep probabilities are
# multiples of 2^-32.
_HASH_VALUES = 1 << 32


def _keep_threshold(rate: float) -> int:
  """Returns the hashes an element is kept below: round((1 - rate) * 2^32), within [1, 2^32 - 1]."""
  return min(max(1, round((1.0 - rate) * _HASH_VALUES)), _HASH_VALUES - 1)


def keep_probability(rate: float) -> float:
  """Returns the probability that LoRA dropout at `rate` keeps an element (a multiple of 2^-32)."""
  return _keep_threshold(rate) / _HASH_VALUES


def _mix32(h: jax.Array) -> jax.Array:
  """Returns a 32-bit integer hash of uint32 `h` (the "lowbias32" mixer: xor-shifts and two odd
  multiplies; a bijection in which every input bit flips each output bit with probability ~1/2)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _keep(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Returns the dropout mask (bool, x's shape and sharding): the elements `key` keeps at `rate`.

  Element (row, j) of x [..., in] (row: the leading indices flattened) is kept when
  mix(mix(row * 0x9E3779B9 + k0) ^ mix(j * 0x85EBCA6B + k1)) < round((1 - rate) * 2^32), k0 and k1
  being the key's two 32-bit words and mix `_mix32`: a counter-based hash of the element's index.
  The inner mixes run once per row and once per column; each element costs one xor, one mix and a
  compare, computed where the mask is used (XLA fuses it into the matmul's operand): a small part
  of the integer work of `jax.random.bernoulli`'s threefry, nothing stored, and the same mask on
  every platform and under any sharding (the index is the element's global one). The backward
  recomputes it from the key alone.
  """
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  sharding = jax.typeof(x).sharding
  row = jnp.uint32(0)
  for dim in range(x.ndim - 1):  # [..., 1]: one value per row
    index = jax.lax.broadcasted_iota(jnp.uint32, (*x.shape[:-1], 1), dim)
    row = row * jnp.uint32(x.shape[dim]) + index
  column = jax.lax.iota(jnp.uint32, x.shape[-1])  # [in]
  per_row = _mix32(row * jnp.uint32(0x9E3779B9) + words[0])
  per_column = _mix32(column * jnp.uint32(0x85EBCA6B) + words[1])
  per_row = jax.lax.broadcast_in_dim(per_row, x.shape, tuple(range(x.ndim)), out_sharding=sharding)
  h = _mix32(per_row ^ per_column)
  return h < jnp.uint32(_keep_threshold(rate))


def _dropped(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
  """x with the elements `_keep` drops set to zero (x itself for no key)."""
  if key is None:
    return x
  return jnp.where(_keep(key, x, rate), x, jnp.zeros((), x.dtype))


def _delta_scaling(scaling: float, rate: float, key: jax.Array | None) -> float:
  # Inverted dropout's 1 / keep probability (the quantised one), folded into the LoRA scaling.
  return scaling / keep_probability(rate) if key is not None else scaling


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, key: jax.Array | None, scaling: float,
               rate: float) -> jax.Array:
  """The LoRA branch: scaling * dropout(x) @ a @ b for x [..., in], a [in, r], b [r, out].

  `key` draws the dropout mask (None: no dropout; `_keep` says how). The backward draws the same
  mask again from the key rather than keeping it: automatic differentiation of `dropout(x) @ a`
  keeps the mask and a dropped copy of x for each projection until the layer's backward pass.
  The step memory redrawing saves and the time the second draw costs are measured in
  docs/performance.md ("Step memory").
  """
  return _lora_delta_fwd(x, a, b, key, scaling, rate)[0]


def _lora_delta_fwd(x, a, b, key, scaling, rate):
  z = (_dropped(x, key, rate) @ a) * jnp.asarray(_delta_scaling(scaling, rate, key), x.dtype)
  return z @ b, (x, a, b, key, z)


def _lora_delta_bwd(scaling, rate, residuals, g):
  x, a, b, key, z = residuals
  if key is not None:
    # Without the barrier XLA merges this draw with the forward's and keeps that mask alive.
    key = jax.lax.optimization_barrier(key)
  rows = tuple(range(g.ndim - 1))
  dz = (g @ b.T) * jnp.asarray(_delta_scaling(scaling, rate, key), g.dtype)
  db = jax.lax.dot_general(z, g, ((rows, rows), ((), ())))
  da = jax.lax.dot_general(_dropped(x, key, rate), dz, ((rows, rows), ((), ())))
  dx = _dropped(dz @ a.T, key, rate)
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), None


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def _dropout(rate: float, key: jax.Array, lead: tuple[int, ...]) -> nnx.Dropout:
  """Returns a Dropout whose stream holds one key per stacked layer (shape `lead`)."""
  # The trainer reseeds the "dropout" stream every step, so dropout masks follow the step number.
  dropout = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=key))
  if lead:
    dropout.rngs.key.set_value(jax.random.split(key, lead))
    dropout.rngs.count.set_value(jnp.zeros(lead, jnp.uint32))
  return dropout


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _merged_kernel(kernel, a, b, scaling: float):
  """Returns kernel + scaling * a @ b in the kernel's dtype and sharding; the old kernel's buffer is donated.

  A stacked kernel is merged one layer at a time, so the float32 temporaries are one layer's.
  """
  def merge(k, a, b):
    delta = a.astype(jnp.float32) @ b.astype(jnp.float32)
    return (k.astype(jnp.float32) + scaling * delta).astype(k.dtype)

  merged = jax.lax.map(lambda kab: merge(*kab), (kernel, a, b)) if kernel.ndim > 2 else merge(kernel, a, b)
  sharding = getattr(kernel, "sharding", None)
  return jax.lax.with_sharding_constraint(merged, sharding) if isinstance(sharding, jax.sharding.NamedSharding) else merged


def lora_layers(model: nnx.Module, targets: Sequence[str] | None = None) -> Iterator[tuple[tuple, Linear]]:
  """Yields (path, layer) of every `Linear` named in `targets`; by default of every one holding LoRA."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Linear) and path and (module.has_lora if targets is None else path[-1] in targets):
      yield path, module


def attach_lora(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> int:
  """Attaches fresh LoRA factors to every targeted projection; returns how many per-layer projections got one.

  A target the model has no `Linear` of (a LLaMA's `qkv_proj`) is an error, not a silent no-op.
  """
  layers = list(lora_layers(model, config.targets))
  missing = sorted(set(config.targets) - {str(path[-1]) for path, _ in layers})
  if missing:
    raise ValueError(f"LoRA targets {missing} name no projection of this model")
  count = 0
  for _, layer in layers:
    layer.attach_lora(config, rngs)
    count += math.prod(layer.stack_shape)
  return count


def merge_lora(model: nnx.Module) -> int:
  """Merges every LoRA into its base kernel; returns how many per-layer projections were merged."""
  merged = 0
  for _, layer in list(lora_layers(model)):
    merged += math.prod(layer.stack_shape)
    layer.merge_lora()
  return merged


def quantize_projections(model: nnx.Module, qtype: str, double_quant: bool = True) -> int:
  """Quantises the kernel of every decoder projection (`QUANTIZED_PROJECTIONS`) in place, one
  projection at a time; returns how many per-layer projections were quantised. LoRA must be merged."""
  count = 0
  for _, layer in list(lora_layers(model, QUANTIZED_PROJECTIONS)):
    layer.quantize(qtype, double_quant)
    count += math.prod(layer.stack_shape)
  return count


def quantize_for_answering(model: nnx.Module, qtype: str) -> int:
  """Quantises every decoder projection as answering holds it; returns how many per-layer ones.

  int8 keeps float32 block scales. nf4 and fp4 are doubly quantised as a QLoRA base is (the values
  of bitsandbytes' 4-bit model with double quantisation, as the release loads for `--bits 4`), then
  hold those scales decoded (`Linear.decode_scales`): a decode step reads each kernel once per
  token, and decoding the scales inside it made XLA write them to memory and read them back,
  more bytes than the decoded scales themselves (4 bytes a block against about 1).
  """
  count = quantize_projections(model, qtype, double_quant=qtype != "int8")
  for _, layer in lora_layers(model, QUANTIZED_PROJECTIONS):
    layer.decode_scales()
  return count


def quantized_layers(model: nnx.Module) -> dict[tuple, Linear]:
  """Returns {path: layer} of every `Linear` whose kernel is held quantised."""
  return {tuple(str(k) for k in path): module for path, module in nnx.iter_modules(model)
          if isinstance(module, Linear) and module.quant}
