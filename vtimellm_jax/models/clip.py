"""CLIP vision transformer (OpenAI ViT-L/14 and friends) in Flax NNX.

The frozen visual encoder of VTimeLLM: pre-LN ViT with a class token, QuickGELU MLPs, and the
output `ln_post(CLS) @ proj` (what OpenAI's `encode_image` returns, 768-d for ViT-L/14).

Parameter paths mirror Hugging Face's `CLIPVisionModelWithProjection` without the `vision_model.`
prefix (`encoder/layers/3/mlp/fc1/kernel`, `pre_layrnorm/scale` -- HF's spelling), so that
converting a checkpoint is a table (`vtimellm_jax.convert.clip`), not a puzzle. One exception: the
query, key and value projections are one `self_attn/qkv_proj` (kernel [D, 3D], columns [q | k | v],
as OpenAI's `in_proj_weight` holds them), one matmul instead of three. Model directories written
with separate `q_proj` / `k_proj` / `v_proj` still load (`separate_qkv`).

Attention runs as `attention_kernel` chooses: cuDNN's fused flash attention on GPUs for 16-bit
compute (no [B, N, T, T] score tensor in memory), XLA's einsum-softmax-einsum otherwise
(docs/vision.md says why TPUs take XLA too).
Images are channels-last: `float[B, H, W, 3]`, already normalised with CLIP's mean and std.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vtimellm_jax import model_io
from vtimellm_jax.errors import UserError
from vtimellm_jax.sharding import target_platform

ACTIVATIONS = ("quick_gelu", "gelu")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# cuDNN's flash attention takes head dims that are multiples of 8, up to 128 on any GPU (256 from Hopper on).
_CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """Shape of a CLIP vision tower; the defaults are OpenAI's ViT-L/14 at 224 px."""

  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp_ratio: float = 4.0
  output_dim: int = 768
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    problems = []
    if self.act not in ACTIVATIONS:
      problems.append(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
    if self.image_size % self.patch_size:
      problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.width % self.heads:
      problems.append(f"width {self.width} is not divisible by heads {self.heads}")
    if self.width * self.mlp_ratio != int(self.width * self.mlp_ratio):
      problems.append(f"width * mlp_ratio = {self.width * self.mlp_ratio} is not an integer")
    if problems:
      raise UserError("invalid CLIP vision config: " + "; ".join(problems))

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid * self.grid + 1

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @classmethod
  def from_dict(cls, values: dict[str, Any], source: str = "config") -> "ClipVisionConfig":
    """Returns the config held in `values` (e.g. a model.json's "config"), rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise UserError(f"{source}: unknown CLIP config key(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def clip_vit_l14() -> ClipVisionConfig:
  """Returns OpenAI's ViT-L/14 at 224 px, the release's visual encoder."""
  return ClipVisionConfig()


def tiny(image_size: int = 224, patch_size: int = 32) -> ClipVisionConfig:
  """Returns a 2-layer, 64-wide CLIP for tests and the CPU quickstart (224 px unless told, 768-d out)."""
  return ClipVisionConfig(image_size=image_size, patch_size=patch_size, width=64, layers=2, heads=2, output_dim=768)


PRESETS = {"clip_vit_l14": clip_vit_l14, "tiny": tiny}


def _quick_gelu(x: jax.Array) -> jax.Array:
  # OpenAI's approximation, used by every OpenAI CLIP checkpoint; it is not interchangeable with GELU.
  return x * jax.nn.sigmoid(1.702 * x)


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


class LayerNorm(nnx.LayerNorm):
  """LayerNorm computed in float32 whatever the activations' dtype, as OpenAI's fp16 CLIP does."""

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    return super().__call__(x.astype(jnp.float32), *args, **kwargs).astype(x.dtype)


def _layer_norm(cfg: ClipVisionConfig, param_dtype, rngs: nnx.Rngs) -> LayerNorm:
  return LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class Embeddings(nnx.Module):
  """Patchify + class token + learned positions: float[B, H, W, 3] -> float[B, 1 + grid^2, D]."""

  def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    init = nnx.initializers.normal(0.02)
    p = cfg.patch_size
    # kernel[ph, pw, c, d]: HF/OpenAI's conv weight [d, c, ph, pw] transposed.
    self.patch_embedding = nnx.Conv(3, cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                                    kernel_init=init, param_dtype=param_dtype, rngs=rngs)
    self.class_embedding = nnx.Param(init(rngs.params(), (cfg.width,), param_dtype))
    self.position_embedding = nnx.Embed(cfg.num_positions, cfg.width, embedding_init=init,
                                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
    cfg, p = self.cfg, self.cfg.patch_size
    b, h, w, c = pixels_bhwc.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"expected pixels [B, {cfg.image_size}, {cfg.image_size}, 3], got {pixels_bhwc.shape}")
    gh, gw = h // p, w // p
    # A stride-p conv with a p x p kernel is one matmul over flattened patches; this form maps
    # onto the tensor cores directly instead of going through the convolution emitters.
    patches = pixels_bhwc.astype(self.dtype).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p * p * c)
    kernel = self.patch_embedding.kernel[...].astype(self.dtype).reshape(p * p * c, cfg.width)
    tokens_bnd = jnp.einsum("BNK,KD->BND", patches, kernel)
    cls_b1d = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, cfg.width))
    x_btd = jnp.concatenate([cls_b1d, tokens_bnd], axis=1)
    return x_btd + self.position_embedding.embedding[...].astype(self.dtype)[None]


def attention_kernel(requested: str, dtype, head_dim: int) -> str:
  """Returns the `jax.nn.dot_product_attention` implementation `requested` means ("auto" resolved).

  "auto" is decided for the platform being compiled for (`sharding.target_platform`): cuDNN flash
  attention on a GPU when the compute is 16-bit and the head dim fits it, else XLA. The XLA path
  writes float32 scores [B, N, T, T] to memory and reads them back for the softmax; cuDNN keeps
  them on chip. float32 stays on XLA, the exact path the parity tests check. A TPU takes XLA:
  CLIP's 257 tokens are not a multiple of the Pallas kernels' 128-wide blocks (docs/vision.md).
  """
  if requested != "auto":
    return requested
  sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
  fits = head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM
  return "cudnn" if target_platform() in ("gpu", "cuda") and sixteen_bit and fits else "xla"


class Attention(nnx.Module):
  """Multi-head self-attention without masking (every token sees every token); q, k, v from one matmul."""

  def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
    self.heads = cfg.heads
    self.attention_impl = attention_impl
    linear = lambda width: nnx.Linear(cfg.width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
    self.qkv_proj = linear(3 * cfg.width)  # columns [q | k | v]
    self.out_proj = linear(cfg.width)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    b, t, d = x_btd.shape
    h = d // self.heads
    qkv_bt3nh = self.qkv_proj(x_btd).reshape(b, t, 3, self.heads, h)
    q_btnh, k_btnh, v_btnh = qkv_bt3nh[:, :, 0], qkv_bt3nh[:, :, 1], qkv_bt3nh[:, :, 2]
    impl = attention_kernel(self.attention_impl, q_btnh.dtype, h)
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, implementation=impl)
    return self.out_proj(out_btnh.reshape(b, t, d))


class Mlp(nnx.Module):
  """fc1 -> QuickGELU (or GELU) -> fc2."""

  def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.act = _quick_gelu if cfg.act == "quick_gelu" else _gelu
    self.fc1 = nnx.Linear(cfg.width, cfg.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x_btd)))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

  def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, attention_impl, rngs: nnx.Rngs):
    self.layer_norm1 = _layer_norm(cfg, param_dtype, rngs)
    self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
    self.layer_norm2 = _layer_norm(cfg, param_dtype, rngs)
    self.mlp = Mlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x_btd = x_btd + self.self_attn(self.layer_norm1(x_btd))
    return x_btd + self.mlp(self.layer_norm2(x_btd))


class Encoder(nnx.Module):
  """The stack of encoder layers."""

  def __init__(self, cfg: ClipVisionConfig, *, dtype, param_dtype, attention_impl, rngs: nnx.Rngs):
    self.layers = nnx.List([
        EncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
        for _ in range(cfg.layers)
    ])

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    for layer in self.layers:
      x_btd = layer(x_btd)
    return x_btd


class ClipVisionOutput(NamedTuple):
  image_embeds: jax.Array  # float32[B, output_dim]: ln_post(CLS) @ proj
  last_hidden_state: jax.Array  # [B, 1 + grid^2, width]: last layer's tokens, before post_layernorm


class ClipVision(nnx.Module):
  """CLIP's image tower; `encode_image` gives the projected CLS embedding."""

  def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str = "auto", rngs: nnx.Rngs):
    """`dtype` is the compute dtype; `attention_impl` one of `ATTENTION_IMPLS` (see `attention_kernel`)."""
    if attention_impl not in ATTENTION_IMPLS:
      raise UserError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pre_layrnorm = _layer_norm(cfg, param_dtype, rngs)
    self.encoder = Encoder(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
    self.post_layernorm = _layer_norm(cfg, param_dtype, rngs)
    self.visual_projection = nnx.Linear(cfg.width, cfg.output_dim, use_bias=False, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels_bhwc: jax.Array) -> ClipVisionOutput:
    """Returns the projected CLS embedding (float32) and the last layer's tokens."""
    x_btd = self.pre_layrnorm(self.embeddings(pixels_bhwc))
    x_btd = self.encoder(x_btd)
    pooled_bd = self.post_layernorm(x_btd[:, 0])
    return ClipVisionOutput(self.visual_projection(pooled_bd).astype(jnp.float32), x_btd)

  def encode_image(self, pixels_bhwc: jax.Array) -> jax.Array:
    """Returns float32[B, output_dim] = ln_post(CLS) @ proj for normalised float[B, H, W, 3] images."""
    return self(pixels_bhwc).image_embeds


# --- parameters as flat {'/'-joined name: array} dicts (the converters' and model_io's currency) ---


def _name(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def abstract_params(cfg: ClipVisionConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Returns {name: ShapeDtypeStruct(float32)} of every parameter, without allocating any."""
  model = nnx.eval_shape(lambda: ClipVision(cfg, rngs=nnx.Rngs(0)))
  return {_name(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  """Returns the nested dict (string keys) of '/'-joined names, as `model_io.save_model_dir` stores it."""
  return model_io.nest(flat)


def flatten(nested: dict[str, Any]) -> dict[str, Any]:
  """Returns {'/'-joined name: leaf} of a nested dict (the inverse of `nest`)."""
  return model_io.flatten(nested)


# Older model directories (and the draw order of `random_params`) have `self_attn/{q,k,v}_proj`.
_SEPARATE = re.compile(r"(?P<attn>.*/self_attn)/q_proj/(?P<leaf>kernel|bias)")
_FUSED = re.compile(r"(?P<attn>.*/self_attn)/qkv_proj/(?P<leaf>kernel|bias)")


def separate_qkv(names: Iterable[str]) -> dict[str, tuple[str, str, str]]:
  """Returns {fused `qkv_proj` name: its (q, k, v) names} for every complete separate triple in `names`.

  The separate kernels [D, D] (biases [D]) joined along their last axis in q, k, v order are the
  fused kernel [D, 3D] (bias [3D]). An incomplete triple is left out: its names stay unknown and
  the fused name missing, so a loader reports both instead of guessing.
  """
  names = set(names)
  out = {}
  for name in sorted(names):
    if m := _SEPARATE.fullmatch(name):
      parts = tuple(f"{m['attn']}/{p}_proj/{m['leaf']}" for p in "qkv")
      if all(p in names for p in parts):
        out[f"{m['attn']}/qkv_proj/{m['leaf']}"] = parts
  return out


def fuse_qkv(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Returns host params with every separate q/k/v triple joined into its `qkv_proj` (see `separate_qkv`)."""
  groups = separate_qkv(flat)
  parts = {p for group in groups.values() for p in group}
  out = {name: value for name, value in flat.items() if name not in parts}
  out.update({name: np.concatenate([np.asarray(flat[p]) for p in group], axis=-1) for name, group in groups.items()})
  return out


def _separate_shapes(cfg: ClipVisionConfig) -> dict[str, tuple[int, ...]]:
  """Returns {name: shape} of the parameters in the separate q/k/v layout, sorted as nnx orders them."""
  out = {}
  for name, spec in abstract_params(cfg).items():
    shape = tuple(spec.shape)
    if m := _FUSED.fullmatch(name):
      out.update({f"{m['attn']}/{p}_proj/{m['leaf']}": (*shape[:-1], shape[-1] // 3) for p in "qkv"})
    else:
      out[name] = shape
  return dict(sorted(out.items()))


def random_params(cfg: ClipVisionConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Returns flat random float32 parameters: N(0, 1/fan_in) kernels, N(0, 0.02) embeddings, LN at identity.

  Drawn with numpy, so `--clip tiny-random` gives the same weights whatever the jax version, and
  without compiling an initialiser per parameter shape (seconds on a CPU). q, k and v are drawn
  one by one, in the order of the separate q/k/v layout, then joined: a seed's weights are those
  of that layout, so features extracted with a random CLIP of that layout stay valid.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in _separate_shapes(cfg).items():
    if name.endswith("/scale"):
      out[name] = np.ones(shape, np.float32)
    elif name.endswith("/bias"):
      out[name] = np.zeros(shape, np.float32)
    elif name.endswith("/kernel"):
      out[name] = (rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))).astype(np.float32)
    else:
      out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
  return fuse_qkv(out)


def flops_per_image(cfg: ClipVisionConfig) -> int:
  """Returns the model FLOPs of `encode_image` for one image: 2 per multiply-add of every matmul.

  Patch embedding, per layer the q/k/v, output and MLP matmuls of every token plus attention's
  two [T, T] products (4 T^2 D), and the projection of the CLS token; norms and softmax are left out.
  """
  t, d = cfg.num_positions, cfg.width
  patches = 2 * (t - 1) * cfg.patch_size**2 * 3 * d
  per_layer = 2 * t * (4 * d * d + 2 * d * cfg.mlp_dim) + 4 * t * t * d
  return patches + cfg.layers * per_layer + 2 * d * cfg.output_dim


def num_params(cfg: ClipVisionConfig) -> int:
  """Returns the number of parameters of a model with this config."""
  return sum(math.prod(s.shape) for s in abstract_params(cfg).values())
